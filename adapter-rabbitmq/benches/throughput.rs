//! Throughput of the RabbitMQ adapter against raw lapin, on the same broker in one run.
//!
//! The same workload both ways: `BUS_BENCH_MESSAGES` messages (default 100,000) of 256 bytes,
//! published with publisher confirms, pipelined in batches of 1,000 (bus: `publish_batch`;
//! raw: `basic_publish` for the whole batch, then every confirm), persistent, into one durable
//! queue bound to the topic exchange; then consumed with manual acks, prefetch 1,000, one ack
//! per message. The broker is `BUS_TEST_RABBITMQ_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! ```text
//! BUS_BENCH_MESSAGES=100000 cargo bench -p adapter-rabbitmq --bench throughput
//! ```
//!
//! Prints a table and, last, `ratio publish=<bus/raw> consume=<bus/raw>`.

use std::time::{Duration, Instant};

use adapter_rabbitmq::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use adapter_rabbitmq::lapin::types::FieldTable;
use adapter_rabbitmq::lapin::{BasicProperties, Connection, ConnectionProperties};
use adapter_rabbitmq::{RabbitMqBroker, RabbitMqConfig};
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

async fn through_lapin(url: &str, n: usize, tag: &str) -> Row {
    let connection = connect_raw(url).await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let queue = format!("bench.{tag}.raw");
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
    let payload = vec![b'x'; SIZE];
    let started = Instant::now();
    let mut sent = 0;
    while sent < n {
        let count = BATCH.min(n - sent);
        let mut confirms = Vec::with_capacity(count);
        for _ in 0..count {
            let props = BasicProperties::default().with_delivery_mode(2);
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
    let started = Instant::now();
    for _ in 0..n {
        let delivery = consumer.next().await.expect("open").expect("delivery");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
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
    let n: usize = std::env::var("BUS_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(100_000);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let tag = format!("{}", std::process::id());
    // Raw first, then bus: the topic exchange exists after the bus connection declared it,
    // so connect bus once to declare it.
    let declare = RabbitMqBroker::connect(&url).await.expect("connect");
    let _ = declare.close().await;
    let raw = through_lapin(&url, n, &tag).await;
    let bus = through_bus(&url, n, &tag).await;

    println!();
    println!(
        "RabbitMQ throughput: {n} messages x {SIZE} B, publisher confirms pipelined in batches \
         of {BATCH}, persistent, prefetch {PREFETCH}, one ack per message"
    );
    println!("machine: {cores} cores (nproc), a shared 2-core box; broker on loopback");
    println!();
    println!(
        "| {:<10} | {:>14} | {:>11} | {:>14} | {:>11} |",
        "client", "publish msg/s", "publish MB/s", "consume msg/s", "consume MB/s"
    );
    println!(
        "|{:-<12}|{:->16}|{:->13}|{:->16}|{:->13}|",
        "", "", "", "", ""
    );
    for (name, row) in [("bus", &bus), ("raw lapin", &raw)] {
        println!(
            "| {:<10} | {:>14.0} | {:>11.2} | {:>14.0} | {:>11.2} |",
            name,
            rate(n, row.publish),
            mb(n, row.publish),
            rate(n, row.consume),
            mb(n, row.consume)
        );
    }
    println!();
    println!(
        "ratio publish={:.2} consume={:.2}",
        raw.publish.as_secs_f64() / bus.publish.as_secs_f64(),
        raw.consume.as_secs_f64() / bus.consume.as_secs_f64()
    );
}
