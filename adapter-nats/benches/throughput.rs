//! Throughput of bus over NATS JetStream against raw async-nats JetStream on the same server, in
//! one run.
//!
//! The same workload both ways: `BUS_BENCH_MESSAGES` messages (default 100,000) of 256 bytes,
//! file storage, published pipelined (a window of 1,000 unacknowledged publishes on both
//! sides: bus through `publish_batch`) and consumed (pull, prefetch 256, each message acked);
//! one-at-a-time publishing (each PubAck awaited) on a smaller count. The raw client sends what
//! a service needs to say the same thing: the CloudEvents headers bus writes (`ce-id`,
//! `ce-type`, `ce-source`, `ce-time`, `ce-specversion`, `ce-correlationid`), built per message;
//! a `raw bare` row sends the payload without headers, for reference (the difference is what
//! the server does with headers, not client code). Both consumers pull from before the publish.
//! `BUS_BENCH_ROUNDS` rounds (default 3) alternate which client goes first; the table shows the
//! median and the range of each figure.
//!
//! `BUS_TEST_NATS_URL` (default `nats://127.0.0.1:4222`). Run:
//!
//! ```text
//! BUS_BENCH_MESSAGES=100000 BUS_BENCH_ROUNDS=5 cargo bench -p adapter-nats --bench throughput
//! ```
//!
//! Prints a table, the range of the per-round ratios, and, last, `ratio publish=<bus/raw>
//! consume=<bus/raw>` (medians of the per-round ratios of rates), against the raw client with
//! the same headers.

use std::time::{Duration, Instant, SystemTime};

use adapter_nats::header_names::{
    CE_CORRELATIONID, CE_ID, CE_SOURCE, CE_SPECVERSION, CE_TIME, CE_TYPE,
};
use adapter_nats::{NatsBroker, NatsConfig};
use async_nats::jetstream::{self, consumer::pull, stream};
use async_nats::{HeaderMap, HeaderName};
use bus_core::conformance::bench::{env_number, print_ratios, ratios, spread};
use bus_core::{Broker, Envelope, MessageId, Publisher, SubscribeOptions, Subscriber};
use futures::StreamExt;

const SIZE: usize = 256;
const WINDOW: usize = 1_000;
const PREFETCH: usize = 256;

/// One client's times in one round.
struct Row {
    publish: Duration,
    consume: Duration,
    single: Duration,
}

async fn through_bus(bus: &NatsBroker, n: usize, single: usize, tag: &str) -> Row {
    let payload = vec![b'x'; SIZE];
    let topic = format!("bench.{tag}");
    let mut sub = bus
        .subscribe(
            &topic,
            SubscribeOptions::group("bench").with_prefetch(PREFETCH),
        )
        .await
        .expect("subscribe");
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let batch: Vec<Envelope> = (sent..(sent + WINDOW).min(n))
            .map(|_| Envelope::new("bench.message", payload.clone()))
            .collect();
        sent += batch.len();
        bus.publish_batch(&topic, batch).await.expect("bus publish");
    }
    let publish = started.elapsed();
    let started = Instant::now();
    for _ in 0..n {
        let d = sub.next().await.expect("open").expect("delivery");
        d.ack().await.expect("ack");
    }
    let consume = started.elapsed();
    let _ = sub.close().await;
    let single_topic = format!("bench.single.{tag}");
    let started = Instant::now();
    for _ in 0..single {
        bus.publish(
            &single_topic,
            Envelope::new("bench.message", payload.clone()),
        )
        .await
        .expect("bus publish");
    }
    let single = started.elapsed();
    let js = jetstream::new(bus.client().clone());
    let _ = js.delete_stream(bus.topic_stream(&topic)).await;
    let _ = js.delete_stream(bus.topic_stream(&single_topic)).await;
    Row {
        publish,
        consume,
        single,
    }
}

/// The headers bus writes for an envelope, built per message as a service would (constant
/// names as static `HeaderName`s, as bus writes them).
fn raw_headers(subject: &str) -> HeaderMap {
    let id = MessageId::new().to_string();
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let mut map = HeaderMap::new();
    map.insert(HeaderName::from_static(CE_SPECVERSION), "1.0");
    map.insert(HeaderName::from_static(CE_ID), id.as_str());
    map.insert(HeaderName::from_static(CE_TYPE), "bench.message");
    map.insert(
        HeaderName::from_static(CE_SOURCE),
        format!("/bus/{subject}").as_str(),
    );
    map.insert(
        HeaderName::from_static(CE_TIME),
        millis.to_string().as_str(),
    );
    map.insert(HeaderName::from_static(CE_CORRELATIONID), id.as_str());
    map
}

async fn through_raw(
    client: &async_nats::Client,
    n: usize,
    single: usize,
    tag: &str,
    headers: bool,
) -> Row {
    let js = jetstream::new(client.clone());
    let name = format!("bench-raw-{}-{tag}", if headers { "h" } else { "bare" }).replace('.', "-");
    let subject = format!("benchraw.{name}");
    js.create_stream(stream::Config {
        name: name.clone(),
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
            name.as_str(),
        )
        .await
        .expect("raw consumer");
    // Pulling from before the publish, as the bus subscription does.
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(PREFETCH)
        .messages()
        .await
        .expect("raw pull");
    let body = bytes::Bytes::from(vec![b'x'; SIZE]);
    let publish_one = |subject: String| {
        let js = js.clone();
        let body = body.clone();
        async move {
            if headers {
                let map = raw_headers(&subject);
                js.publish_with_headers(subject, map, body).await
            } else {
                js.publish(subject, body).await
            }
        }
    };
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let count = WINDOW.min(n - sent);
        let mut acks = Vec::with_capacity(count);
        for _ in 0..count {
            acks.push(publish_one(subject.clone()).await.expect("raw publish"));
        }
        for ack in acks {
            ack.await.expect("raw puback");
        }
        sent += count;
    }
    let publish = started.elapsed();
    let started = Instant::now();
    for _ in 0..n {
        let m = messages.next().await.expect("open").expect("message");
        m.ack().await.expect("raw ack");
    }
    let consume = started.elapsed();
    drop(messages);
    let started = Instant::now();
    for _ in 0..single {
        publish_one(subject.clone())
            .await
            .expect("raw publish")
            .await
            .expect("raw puback");
    }
    let single = started.elapsed();
    let _ = js.delete_stream(&name).await;
    Row {
        publish,
        consume,
        single,
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("BUS_TEST_NATS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    let n = env_number("BUS_BENCH_MESSAGES", 100_000);
    let rounds = env_number("BUS_BENCH_ROUNDS", 3);
    let single = n.min(5_000);
    let bus = NatsBroker::connect_with(
        NatsConfig::from_url(&url)
            .expect("NATS URL")
            .with_max_age(Duration::from_secs(3600)),
    )
    .await
    .expect("connect bus");
    let client = async_nats::connect(url.as_str())
        .await
        .expect("raw connect");

    let (mut bus_rows, mut raw_rows, mut bare_rows) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let tag = format!("{}.{round}", MessageId::new().as_str().replace('-', ""));
        if round % 2 == 0 {
            raw_rows.push(through_raw(&client, n, single, &tag, true).await);
            bus_rows.push(through_bus(&bus, n, single, &tag).await);
        } else {
            bus_rows.push(through_bus(&bus, n, single, &tag).await);
            raw_rows.push(through_raw(&client, n, single, &tag, true).await);
        }
        bare_rows.push(through_raw(&client, n, single, &tag, false).await);
        eprintln!("round {} of {rounds} done", round + 1);
    }
    let _ = bus.close().await;

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "NATS JetStream throughput: {n} messages of {SIZE} B ({single} for one-at-a-time), file \
         storage, window {WINDOW}, prefetch {PREFETCH}; {rounds} rounds, median [min–max]"
    );
    println!("machine: nproc = {cores}, a 2-core shared box; server on loopback");
    println!();
    println!(
        "| {:<14} | {:>24} | {:>24} | {:>24} |",
        "client", "publish msg/s", "consume msg/s", "one at a time msg/s"
    );
    println!("|{:-<16}|{:->26}|{:->26}|{:->26}|", "", "", "", "");
    for (name, rows) in [
        ("bus", &bus_rows),
        ("raw async-nats", &raw_rows),
        ("raw bare", &bare_rows),
    ] {
        println!(
            "| {:<14} | {:>24} | {:>24} | {:>24} |",
            name,
            spread(rows.iter().map(|r| rate(n, r.publish)).collect(), 0),
            spread(rows.iter().map(|r| rate(n, r.consume)).collect(), 0),
            spread(rows.iter().map(|r| rate(single, r.single)).collect(), 0),
        );
    }
    let ratio = |pick: fn(&Row) -> Duration| ratios(&bus_rows, &raw_rows, pick);
    println!();
    print_ratios(
        &ratio(|r| r.publish),
        &ratio(|r| r.consume),
        &[("one-at-a-time", ratio(|r| r.single))],
    );
}
