//! Throughput of the Kafka adapter against raw rdkafka, on the same broker in one run.
//!
//! The same workload both ways (the raw side sends the CloudEvents headers bus writes, built
//! per message): `BUS_BENCH_MESSAGES` messages (default 20,000, not the usual
//! 100,000: tansu 0.6's memory storage lists every stored batch of a partition on each fetch,
//! so consuming slows down as a topic grows, and a 100,000 run did not finish in 15 minutes
//! on the 2-core test machine) of 256 bytes,
//! to a 3-partition topic, keyed round-robin over 64 keys, idempotent producer, acks=all,
//! linger.ms=5 on both sides:
//! - publish, pipelined: batches of 1,000 sent together, every delivery report awaited before
//!   the next batch (bus: `publish_batch`; raw: `FutureProducer::send` × 1,000, then join);
//! - publish, one at a time: each send awaited before the next (bus: `publish`), on the first
//!   2,000 messages only (it is slow by nature: one round trip each);
//! - consume: everything from the beginning in a new group, one ack (bus) or one offset
//!   store (raw) per message, commits in the background (bus: every 100 ms; raw: async every
//!   1,000 messages).
//!
//! The broker is `BUS_TEST_KAFKA_URL` (default `kafka://127.0.0.1:9092`).
//!
//! ```text
//! BUS_BENCH_MESSAGES=100000 cargo bench -p adapter-kafka --bench throughput
//! ```
//!
//! `BUS_BENCH_ROUNDS` rounds (default 3) alternate which client goes first; the table shows the
//! median and the range of each figure. Prints the range of the per-round ratios and, last,
//! `ratio publish=<bus/raw> consume=<bus/raw>` (medians of the per-round ratios; pipelined
//! publish).

use std::time::{Duration, Instant, SystemTime};

use bus_core::conformance::bench::{env_number, median, print_ratios, ratios, spread};

use adapter_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use adapter_kafka::rdkafka::client::DefaultClientContext;
use adapter_kafka::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use adapter_kafka::rdkafka::message::{Header, OwnedHeaders};
use adapter_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use adapter_kafka::rdkafka::{ClientConfig, Message};
use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::{headers, Broker, ConsumeOptions, Envelope, MessageId, Publisher, Queue};

const SIZE: usize = 256;
const BATCH: usize = 1_000;
const SEQUENTIAL: usize = 2_000;
const PARTITIONS: i32 = 3;

struct Row {
    publish: Duration,
    sequential: Duration,
    consume: Duration,
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn mb(n: usize, d: Duration) -> f64 {
    (n * SIZE) as f64 / d.as_secs_f64() / 1e6
}

async fn through_bus(servers: &str, n: usize, tag: &str) -> Row {
    let config = KafkaConfig::new(servers)
        .with_partitions(PARTITIONS)
        .with_linger_ms(5)
        .with_prefetch(1_000);
    let broker = KafkaBroker::connect(config).await.expect("connect");
    let topic = format!("bench.{tag}.bus");
    let payload = bytes::Bytes::from(vec![b'x'; SIZE]);
    let envelope =
        |i: usize| Envelope::new("bench.message", payload.clone()).with_key(format!("k{}", i % 64));
    // Create the topic outside the timings.
    broker.publish(&topic, envelope(0)).await.expect("publish");

    let started = Instant::now();
    let mut sent = 1;
    while sent < n {
        let end = (sent + BATCH).min(n);
        let batch: Vec<Envelope> = (sent..end).map(envelope).collect();
        broker.publish_batch(&topic, batch).await.expect("publish");
        sent = end;
    }
    let publish = started.elapsed();

    let seq_topic = format!("bench.{tag}.bus.seq");
    broker
        .publish(&seq_topic, envelope(0))
        .await
        .expect("publish");
    let started = Instant::now();
    for i in 1..SEQUENTIAL.min(n) {
        broker
            .publish(&seq_topic, envelope(i))
            .await
            .expect("publish");
    }
    let sequential = started.elapsed();

    let started = Instant::now();
    let mut consumer = broker
        .consume(&topic, ConsumeOptions::default().with_prefetch(1_000))
        .await
        .expect("consume");
    for _ in 0..n {
        let delivery = consumer.next().await.expect("open").expect("delivery");
        delivery.ack().await.expect("ack");
    }
    let consume = started.elapsed();
    let _ = consumer.close().await;
    let _ = broker.close().await;
    Row {
        publish,
        sequential,
        consume,
    }
}

/// The headers bus writes for an envelope (CloudEvents binary mode), built per message as a
/// service would.
fn raw_headers() -> OwnedHeaders {
    let id = MessageId::new().to_string();
    let time = headers::format_time(SystemTime::now());
    [
        ("ce_specversion", "1.0"),
        ("ce_id", id.as_str()),
        ("ce_type", "bench.message"),
        ("ce_source", "bus"),
        ("ce_time", time.as_str()),
        ("ce_correlationid", id.as_str()),
    ]
    .into_iter()
    .fold(OwnedHeaders::new_with_capacity(6), |out, (key, value)| {
        out.insert(Header {
            key,
            value: Some(value.as_bytes()),
        })
    })
}

async fn through_rdkafka(servers: &str, n: usize, tag: &str) -> Row {
    let mut common = ClientConfig::new();
    common.set("bootstrap.servers", servers);
    let admin: AdminClient<DefaultClientContext> = common.create().expect("admin");
    let topic = format!("bench.{tag}.raw");
    let seq_topic = format!("bench.{tag}.raw.seq");
    let topics = [
        NewTopic::new(&topic, PARTITIONS, TopicReplication::Fixed(1)),
        NewTopic::new(&seq_topic, PARTITIONS, TopicReplication::Fixed(1)),
    ];
    admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .expect("create topics");
    let producer: FutureProducer = common
        .clone()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let payload = vec![b'x'; SIZE];
    let keys: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
    // Enqueued at once; the future resolves with the delivery report.
    let send = |topic: &str, i: usize| {
        let record = FutureRecord::to(topic)
            .payload(&payload[..])
            .key(keys[i % 64].as_bytes())
            .headers(raw_headers());
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| e)
            .expect("enqueue");
        async move { delivery.await.expect("producer alive").map_err(|(e, _)| e) }
    };
    send(&topic, 0).await.expect("publish");

    let started = Instant::now();
    let mut sent = 1;
    while sent < n {
        let end = (sent + BATCH).min(n);
        let sends: Vec<_> = (sent..end).map(|i| send(&topic, i)).collect();
        for result in futures::future::join_all(sends).await {
            result.expect("publish");
        }
        sent = end;
    }
    let publish = started.elapsed();

    send(&seq_topic, 0).await.expect("publish");
    let started = Instant::now();
    for i in 1..SEQUENTIAL.min(n) {
        send(&seq_topic, i).await.expect("publish");
    }
    let sequential = started.elapsed();

    let topic_for_thread = topic.clone();
    let servers = servers.to_owned();
    let consume = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .set("group.id", format!("bench.raw.{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "100")
            .create()
            .expect("consumer");
        let started = Instant::now();
        consumer.subscribe(&[&topic_for_thread]).expect("subscribe");
        let mut got = 0;
        while got < n {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    consumer
                        .store_offset(m.topic(), m.partition(), m.offset() + 1)
                        .expect("store");
                    got += 1;
                    if got % BATCH == 0 {
                        let _ = consumer.commit_consumer_state(CommitMode::Async);
                    }
                }
                Some(Err(e)) => eprintln!("raw consumer: {e}"),
                None => {}
            }
        }
        let _ = consumer.commit_consumer_state(CommitMode::Sync);
        started.elapsed()
    })
    .await
    .expect("raw consumer thread");
    Row {
        publish,
        sequential,
        consume,
    }
}

#[tokio::main]
async fn main() {
    let url = std::env::var("BUS_TEST_KAFKA_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "kafka://127.0.0.1:9092".to_owned());
    let servers = KafkaConfig::from_url(&url)
        .expect("a kafka:// URL")
        .bootstrap_servers;
    let n = env_number("BUS_BENCH_MESSAGES", 20_000).max(2);
    let rounds = env_number("BUS_BENCH_ROUNDS", 3);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let (mut bus_rows, mut raw_rows) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let tag = format!("{}", uuid::Uuid::now_v7().simple());
        if round % 2 == 0 {
            raw_rows.push(through_rdkafka(&servers, n, &tag).await);
            bus_rows.push(through_bus(&servers, n, &tag).await);
        } else {
            bus_rows.push(through_bus(&servers, n, &tag).await);
            raw_rows.push(through_rdkafka(&servers, n, &tag).await);
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    let seq = SEQUENTIAL.min(n) - 1;

    println!();
    println!(
        "Kafka throughput: {n} messages x {SIZE} B, {PARTITIONS} partitions, 64 keys, idempotent \
         producer, acks=all, linger.ms=5; pipelined = batches of {BATCH} awaited together; \
         one at a time = {seq} sends each awaited; consume = one ack per message"
    );
    println!("machine: {cores} cores (nproc), a shared 2-core box; broker (tansu) on loopback");
    println!(
        "(default count 20,000, not 100,000: tansu's memory storage slows down as a partition \
         grows; set BUS_BENCH_MESSAGES to change it)"
    );
    println!("{rounds} rounds, median [min–max]");
    println!();
    println!(
        "| {:<11} | {:>22} | {:>22} | {:>22} |",
        "client", "publish msg/s", "one-at-a-time msg/s", "consume msg/s"
    );
    println!("|{:-<13}|{:->24}|{:->24}|{:->24}|", "", "", "", "");
    for (name, rows) in [("bus", &bus_rows), ("raw rdkafka", &raw_rows)] {
        println!(
            "| {:<11} | {:>22} | {:>22} | {:>22} |",
            name,
            spread(rows.iter().map(|r| rate(n - 1, r.publish)).collect(), 0),
            spread(rows.iter().map(|r| rate(seq, r.sequential)).collect(), 0),
            spread(rows.iter().map(|r| rate(n, r.consume)).collect(), 0),
        );
    }
    let mut publish_mb: Vec<f64> = bus_rows.iter().map(|r| mb(n - 1, r.publish)).collect();
    println!();
    println!("bus publish MB/s (median): {:.2}", median(&mut publish_mb));
    let ratio = |pick: fn(&Row) -> Duration| ratios(&bus_rows, &raw_rows, pick);
    print_ratios(
        &ratio(|r| r.publish),
        &ratio(|r| r.consume),
        &[("one-at-a-time", ratio(|r| r.sequential))],
    );
}
