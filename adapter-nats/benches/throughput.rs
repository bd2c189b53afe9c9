//! Throughput of bus over NATS JetStream against raw async-nats JetStream on the same server, in
//! one run: N messages of 256 bytes published (pipelined, a window of 1,000 unacknowledged
//! publishes on both sides: bus through `publish_batch`) and consumed (pull, prefetch 256, each
//! message acked). One-at-a-time publishing (each PubAck awaited) is measured too, on a
//! smaller count, for both.
//!
//! `BUS_TEST_NATS_URL` (default `nats://127.0.0.1:4222`), `BUS_BENCH_MESSAGES` (default
//! 100,000). Run: `cargo bench -p adapter-nats --bench throughput`.

use std::time::{Duration, Instant};

use adapter_nats::{NatsBroker, NatsConfig};
use async_nats::jetstream::{self, consumer::pull, stream};
use bus_core::{Broker, Envelope, Publisher, SubscribeOptions, Subscriber};
use futures::StreamExt;

const SIZE: usize = 256;
const WINDOW: usize = 1_000;
const PREFETCH: usize = 256;

struct Row {
    what: String,
    count: usize,
    elapsed: Duration,
}

impl Row {
    fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("BUS_TEST_NATS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    let count: usize = std::env::var("BUS_BENCH_MESSAGES")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(100_000);
    let single = count.min(5_000);
    let payload = vec![b'x'; SIZE];
    let run = bus_core::MessageId::new().to_string();
    let mut rows = Vec::new();

    // --- bus ---------------------------------------------------------------------------
    let bus = NatsBroker::connect_with(
        NatsConfig::from_url(&url)
            .expect("NATS URL")
            .with_max_age(Duration::from_secs(3600)),
    )
    .await
    .expect("connect bus");
    let topic = format!("bench.{run}");
    let mut sub = bus
        .subscribe(
            &topic,
            SubscribeOptions::group("bench").with_prefetch(PREFETCH),
        )
        .await
        .expect("subscribe");
    let envelopes: Vec<Envelope> = (0..count)
        .map(|_| Envelope::new("bench.message", payload.clone()))
        .collect();
    let started = Instant::now();
    for chunk in envelopes.chunks(WINDOW) {
        bus.publish_batch(&topic, chunk.to_vec())
            .await
            .expect("bus publish");
    }
    let bus_publish = Row {
        what: format!("bus publish_batch (window {WINDOW})"),
        count,
        elapsed: started.elapsed(),
    };
    let started = Instant::now();
    for _ in 0..count {
        let d = sub.next().await.expect("open").expect("delivery");
        d.ack().await.expect("ack");
    }
    let bus_consume = Row {
        what: format!("bus consume + ack (prefetch {PREFETCH})"),
        count,
        elapsed: started.elapsed(),
    };
    let single_topic = format!("bench.single.{run}");
    let started = Instant::now();
    for _ in 0..single {
        bus.publish(
            &single_topic,
            Envelope::new("bench.message", payload.clone()),
        )
        .await
        .expect("bus publish");
    }
    let bus_single = Row {
        what: "bus publish, one at a time".to_owned(),
        count: single,
        elapsed: started.elapsed(),
    };
    let _ = sub.close().await;

    // --- raw async-nats ------------------------------------------------------------------
    let client = async_nats::connect(url.as_str())
        .await
        .expect("raw connect");
    let js = jetstream::new(client);
    let raw_stream = format!("bench-raw-{run}");
    let subject = format!("benchraw.{run}");
    js.create_stream(stream::Config {
        name: raw_stream.clone(),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::File,
        ..stream::Config::default()
    })
    .await
    .expect("raw stream");
    let consumer: jetstream::consumer::PullConsumer = js
        .create_consumer_on_stream(
            pull::Config {
                durable_name: Some("bench".to_owned()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..pull::Config::default()
            },
            raw_stream.as_str(),
        )
        .await
        .expect("raw consumer");
    let body = bytes::Bytes::from(payload.clone());
    let started = Instant::now();
    let mut sent = 0;
    while sent < count {
        let n = WINDOW.min(count - sent);
        let mut acks = Vec::with_capacity(n);
        for _ in 0..n {
            acks.push(
                js.publish(subject.clone(), body.clone())
                    .await
                    .expect("raw publish"),
            );
        }
        for ack in acks {
            ack.await.expect("raw puback");
        }
        sent += n;
    }
    let raw_publish = Row {
        what: format!("raw publish (window {WINDOW})"),
        count,
        elapsed: started.elapsed(),
    };
    let started = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(PREFETCH)
        .messages()
        .await
        .expect("raw pull");
    for _ in 0..count {
        let m = messages.next().await.expect("open").expect("message");
        m.ack().await.expect("raw ack");
    }
    let raw_consume = Row {
        what: format!("raw consume + ack (prefetch {PREFETCH})"),
        count,
        elapsed: started.elapsed(),
    };
    drop(messages);
    let started = Instant::now();
    for _ in 0..single {
        js.publish(subject.clone(), body.clone())
            .await
            .expect("raw publish")
            .await
            .expect("raw puback");
    }
    let raw_single = Row {
        what: "raw publish, one at a time".to_owned(),
        count: single,
        elapsed: started.elapsed(),
    };

    // --- clean up and report --------------------------------------------------------------
    let _ = js.delete_stream(&raw_stream).await;
    let _ = js.delete_stream(bus.topic_stream(&topic)).await;
    let _ = js.delete_stream(bus.topic_stream(&single_topic)).await;
    let _ = bus.close().await;

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "NATS JetStream throughput: {count} messages of {SIZE} B ({single} for one-at-a-time), \
         file storage, {url}"
    );
    println!("machine: nproc = {cores}, a 2-core shared box (other builds and tests may run)");
    println!();
    println!(
        "| {:<38} | {:>8} | {:>10} | {:>7} | {:>8} |",
        "what", "messages", "msgs/s", "MB/s", "seconds"
    );
    println!(
        "|{:-<40}|{:->10}|{:->12}|{:->9}|{:->10}|",
        "", "", "", "", ""
    );
    rows.extend([
        bus_publish,
        raw_publish,
        bus_consume,
        raw_consume,
        bus_single,
        raw_single,
    ]);
    for row in &rows {
        println!(
            "| {:<38} | {:>8} | {:>10.0} | {:>7.2} | {:>8.2} |",
            row.what,
            row.count,
            row.rate(),
            row.rate() * SIZE as f64 / 1e6,
            row.elapsed.as_secs_f64()
        );
    }
    println!();
    println!(
        "one at a time: bus/raw = {:.2}",
        rows[4].rate() / rows[5].rate()
    );
    println!(
        "ratio publish={:.2} consume={:.2}",
        rows[0].rate() / rows[1].rate(),
        rows[2].rate() / rows[3].rate()
    );
}
