//! Throughput of the RabbitMQ adapter against raw lapin, on the same broker in one run.
//!
//! The same workload both ways: `BUS_BENCH_MESSAGES` messages (default 100,000) of 256 bytes,
//! published with publisher confirms, pipelined in batches of 1,000 (bus: `publish_batch`;
//! raw: `basic_publish` for the whole batch, then every confirm), persistent, into one durable
//! queue bound to the topic exchange; then consumed with manual acks, prefetch 1,000, one ack
//! per message. The raw client sends what a service needs to say the same thing: a message id,
//! type, time, correlation id and source, as AMQP properties and the same CloudEvents header
//! table bus writes, built per message (a second raw row, `raw bare`, sends the payload with no
//! properties at all, for reference: the difference is what the broker does with the headers,
//! not client code). `BUS_BENCH_ROUNDS` rounds (default 3) alternate which client goes first;
//! the table shows the median and the range of each figure. The broker is
//! `BUS_TEST_RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! ```text
//! BUS_BENCH_MESSAGES=100000 BUS_BENCH_ROUNDS=5 cargo bench -p adapter-rabbitmq --bench throughput
//! ```
//!
//! Prints a table, the range of the per-round ratios, and, last, `ratio publish=<bus/raw>
//! consume=<bus/raw>` (medians of the per-round ratios of rates), against the raw client with
//! the same headers.

use std::time::{Duration, Instant};

use adapter_rabbitmq::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use adapter_rabbitmq::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use adapter_rabbitmq::lapin::{BasicProperties, Connection, ConnectionProperties};
use adapter_rabbitmq::{RabbitMqBroker, RabbitMqConfig};
use bus_core::conformance::bench::{env_number, median, print_ratios, ratios, spread};
use bus_core::{Broker, Envelope, Publisher, SubscribeOptions, Subscriber};
use futures::StreamExt;

const SIZE: usize = 256;
const BATCH: usize = 1_000;
const PREFETCH: u16 = 1_000;

struct Row {
    publish: Duration,
    consume: Duration,
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn mb(n: usize, d: Duration) -> f64 {
    (n * SIZE) as f64 / d.as_secs_f64() / 1e6
}

async fn through_bus(url: &str, n: usize, tag: &str) -> Row {
    let config = RabbitMqConfig::new(url).with_prefetch(PREFETCH);
    let broker = RabbitMqBroker::with_config(config).await.expect("connect");
    let topic = format!("bench.{tag}.bus");
    let group = "bench";
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(group))
        .await
        .expect("subscribe");
    let payload = vec![b'x'; SIZE];
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let batch: Vec<Envelope> = (sent..(sent + BATCH).min(n))
            .map(|_| Envelope::new("bench.message", payload.clone()))
            .collect();
        sent += batch.len();
        broker.publish_batch(&topic, batch).await.expect("publish");
    }
    let publish = started.elapsed();
    let started = Instant::now();
    for _ in 0..n {
        let delivery = sub.next().await.expect("open").expect("delivery");
        delivery.ack().await.expect("ack");
    }
    let consume = started.elapsed();
    sub.close().await.expect("close");
    drop(sub);
    delete_queue(url, &format!("{topic}@{group}")).await;
    broker.close().await.expect("close");
    Row { publish, consume }
}

async fn connect_raw(url: &str) -> Connection {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    Connection::connect(url, props).await.expect("connect")
}

async fn delete_queue(url: &str, queue: &str) {
    let connection = connect_raw(url).await;
    let channel = connection.create_channel().await.expect("channel");
    let _ = channel
        .queue_delete(queue, QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done").await;
}

/// The properties the raw client sends per message: with `headers`, what bus writes for an
/// envelope (the CloudEvents attributes as headers, id, type, correlation id and time as
/// properties), built per message as a service would; without, persistence only.
fn raw_properties(headers: bool, queue: &str) -> BasicProperties {
    let props = BasicProperties::default().with_delivery_mode(2);
    if !headers {
        return props;
    }
    let id = bus_core::MessageId::new().to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let time = format!("{}", now.as_millis());
    let mut table = FieldTable::default();
    let mut put = |name: &str, value: &str| {
        table.insert(
            ShortString::from(format!("cloudEvents:{name}")),
            AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
        );
    };
    put("specversion", "1.0");
    put("id", &id);
    put("type", "bench.message");
    put("source", &format!("/bus/{queue}"));
    put("time", &time);
    put("correlationid", &id);
    props
        .with_timestamp(now.as_secs())
        .with_message_id(ShortString::from(id.clone()))
        .with_correlation_id(ShortString::from(id))
        .with_type(ShortString::from("bench.message"))
        .with_headers(table)
}

async fn through_lapin(url: &str, n: usize, tag: &str, headers: bool) -> Row {
    let connection = connect_raw(url).await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let queue = format!("bench.{tag}.raw{}", if headers { "" } else { ".bare" });
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(&queue, durable, FieldTable::default())
        .await
        .expect("declare");
    channel
        .queue_bind(
            &queue,
            "bus.topics",
            &queue,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    // Consuming from before the publish, as the bus subscription does: both sides have a
    // prefetch window filled while publishing.
    let consumer_channel = connection.create_channel().await.expect("channel");
    consumer_channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consumer_channel
        .basic_consume(
            &queue,
            "bench",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let payload = vec![b'x'; SIZE];
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let count = BATCH.min(n - sent);
        let mut confirms = Vec::with_capacity(count);
        for _ in 0..count {
            let props = raw_properties(headers, &queue);
            confirms.push(
                channel
                    .basic_publish(
                        "bus.topics",
                        &queue,
                        BasicPublishOptions::default(),
                        &payload,
                        props,
                    )
                    .await
                    .expect("publish"),
            );
        }
        for confirm in confirms {
            assert!(confirm.await.expect("confirm").is_ack());
        }
        sent += count;
    }
    let publish = started.elapsed();
    let started = Instant::now();
    for _ in 0..n {
        let delivery = consumer.next().await.expect("open").expect("delivery");
        // By tag on the channel, as bus acks.
        consumer_channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await
            .expect("ack");
    }
    let consume = started.elapsed();
    drop(consumer);
    let _ = channel
        .queue_delete(&queue, QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done").await;
    Row { publish, consume }
}

#[tokio::main]
async fn main() {
    let url = std::env::var("BUS_TEST_RABBITMQ_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let n = env_number("BUS_BENCH_MESSAGES", 100_000);
    let rounds = env_number("BUS_BENCH_ROUNDS", 3);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    // The topic exchange exists once a bus connection declared it.
    let declare = RabbitMqBroker::connect(&url).await.expect("connect");
    let _ = declare.close().await;

    let mut bus_rows = Vec::new();
    let mut raw_rows = Vec::new();
    let mut bare_rows = Vec::new();
    for round in 0..rounds {
        let tag = format!("{}.{round}", std::process::id());
        if round % 2 == 0 {
            raw_rows.push(through_lapin(&url, n, &tag, true).await);
            bus_rows.push(through_bus(&url, n, &tag).await);
        } else {
            bus_rows.push(through_bus(&url, n, &tag).await);
            raw_rows.push(through_lapin(&url, n, &tag, true).await);
        }
        bare_rows.push(through_lapin(&url, n, &tag, false).await);
        eprintln!("round {} of {rounds} done", round + 1);
    }

    println!();
    println!(
        "RabbitMQ throughput: {n} messages x {SIZE} B, publisher confirms pipelined in batches \
         of {BATCH}, persistent, prefetch {PREFETCH}, one ack per message; {rounds} rounds, \
         median [min–max]"
    );
    println!("machine: {cores} cores (nproc), a shared 2-core box; broker on loopback");
    println!();
    println!(
        "| {:<14} | {:>26} | {:>26} |",
        "client", "publish msg/s", "consume msg/s"
    );
    println!("|{:-<16}|{:->28}|{:->28}|", "", "", "");
    for (name, rows) in [
        ("bus", &bus_rows),
        ("raw lapin", &raw_rows),
        ("raw bare", &bare_rows),
    ] {
        println!(
            "| {:<14} | {:>26} | {:>26} |",
            name,
            spread(rows.iter().map(|r| rate(n, r.publish)).collect(), 0),
            spread(rows.iter().map(|r| rate(n, r.consume)).collect(), 0),
        );
    }
    let mb_rows = |rows: &[Row]| {
        let mut v: Vec<f64> = rows.iter().map(|r| mb(n, r.publish)).collect();
        median(&mut v)
    };
    println!();
    println!("bus publish MB/s (median): {:.2}", mb_rows(&bus_rows));
    let ratio = |pick: fn(&Row) -> Duration| ratios(&bus_rows, &raw_rows, pick);
    print_ratios(&ratio(|r| r.publish), &ratio(|r| r.consume), &[]);
}
