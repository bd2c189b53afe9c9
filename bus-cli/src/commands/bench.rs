//! `bus bench`: publish and consume throughput, measured the way the adapter benches measure
//! bus (`adapter-*/benches/throughput.rs`): a group subscribed first, the messages published
//! with `publish_batch` in windows, then consumed and acknowledged one by one; the figures
//! summed up by `bus_core::conformance::bench` (median and range over the rounds).

use std::time::Duration;

use bus::{Bus, Envelope, SubscribeOptions};
use bus_core::conformance::bench::{median, spread};
use serde_json::json;
use tokio::time::Instant;

use super::failed;
use crate::cli::BenchArgs;
use crate::output::{print_json, progress, table};

/// How long consuming may wait for the next message before the bench gives up.
const STALL: Duration = Duration::from_secs(30);

/// One round's times.
struct Round {
    publish: Duration,
    consume: Duration,
}

/// Runs `bus bench`.
pub(crate) async fn run(bus: &Bus, args: &BenchArgs, json: bool) -> Result<(), String> {
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        rounds.push(one_round(bus, args, round, json).await?);
    }
    let n = args.messages as f64;
    let publish: Vec<f64> = rounds.iter().map(|r| n / r.publish.as_secs_f64()).collect();
    let consume: Vec<f64> = rounds.iter().map(|r| n / r.consume.as_secs_f64()).collect();
    let adapter = bus.capabilities().name;
    if json {
        print_json(&json!({
            "adapter": adapter,
            "messages": args.messages,
            "size": args.size,
            "rounds": args.rounds,
            "publish_per_sec": publish,
            "consume_per_sec": consume,
            "publish_median": median(&mut publish.clone()),
            "consume_median": median(&mut consume.clone()),
        }));
    } else {
        let mut shown = table(&["phase", "msg/s median [min–max]", "MB/s median"]);
        for (phase, rates) in [("publish", &publish), ("consume + ack", &consume)] {
            let mb = median(&mut rates.clone()) * args.size as f64 / 1e6;
            shown.add_row(vec![
                phase.to_owned(),
                spread(rates.clone(), 0),
                format!("{mb:.2}"),
            ]);
        }
        println!(
            "{adapter}: {} messages of {} bytes, {} round(s), prefetch {}, batches of {}",
            args.messages, args.size, args.rounds, args.prefetch, args.batch
        );
        println!("{shown}");
    }
    Ok(())
}

async fn one_round(bus: &Bus, args: &BenchArgs, round: u64, json: bool) -> Result<Round, String> {
    let topic = format!("bus-bench.{}", uuid::Uuid::now_v7().simple());
    let payload = bytes::Bytes::from(vec![b'x'; args.size]);
    let mut subscription = bus
        .subscribe(
            &topic,
            SubscribeOptions::group("bench").with_prefetch(args.prefetch),
        )
        .await
        .map_err(|e| failed(&format!("subscribing to `{topic}`"), e))?;

    let bar = progress(args.messages, &format!("publish {round}"), json);
    let started = Instant::now();
    let mut sent = 0;
    while sent < args.messages {
        let n = args.batch.min(args.messages - sent);
        let batch: Vec<Envelope> = (0..n)
            .map(|_| Envelope::new("bus.bench", payload.clone()))
            .collect();
        bus.publish_batch(&topic, batch)
            .await
            .map_err(|e| failed(&format!("publishing to `{topic}` (after {sent})"), e))?;
        sent += n;
        bar.inc(n);
    }
    let publish = started.elapsed();
    bar.finish_and_clear();

    let bar = progress(args.messages, &format!("consume {round}"), json);
    let started = Instant::now();
    for received in 0..args.messages {
        let delivery = match tokio::time::timeout(STALL, subscription.next()).await {
            Err(_) => {
                return Err(format!(
                    "consuming from `{topic}`: nothing for {} after {received} of {}",
                    humantime::format_duration(STALL),
                    args.messages
                ))
            }
            Ok(None) => return Err(format!("the subscription to `{topic}` closed")),
            Ok(Some(delivery)) => {
                delivery.map_err(|e| failed(&format!("consuming from `{topic}`"), e))?
            }
        };
        delivery
            .ack()
            .await
            .map_err(|e| failed("acknowledging", e.error()))?;
        bar.inc(1);
    }
    let consume = started.elapsed();
    bar.finish_and_clear();
    let _ = subscription.close().await;
    Ok(Round { publish, consume })
}
