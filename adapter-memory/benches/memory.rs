//! The memory broker end to end against a plain channel (issue 14).
//!
//! Publish → [`Consumer`] → ack on the [`MemoryBroker`], against a tokio mpsc channel carrying
//! the same envelopes (same count, same payload size) from a producer task to a consumer task
//! that counts and drops each. Rounds alternate (bus, channel, bus, channel, …) so that noise
//! from the rest of the machine falls on both sides alike; the figures are medians. Two more
//! bus rows: 16 keys round robin (per-key order), and the consumer running each handler as a
//! task of its own (`Consumer::with_task_per_delivery`) instead of inside its task.
//!
//! ```text
//! cargo bench -p adapter-memory --bench memory
//! BUS_BENCH_MESSAGES=500000 BUS_BENCH_ROUNDS=9 cargo bench -p adapter-memory --bench memory
//! ```
//!
//! Prints a table, then the line `memory msgs/s=<bus> ratio_vs_channel=<bus/channel>`.
//! Times are printed, never asserted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapter_memory::{MemoryBroker, MemoryConfig};
use bus_core::conformance::bench::{env_number, median, spread};
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo};
use bus_core::{Bytes, Envelope, Publisher, SubscribeOptions, Subscriber};
use tokio::sync::{mpsc, Notify};

const TOPIC: &str = "bench";
/// Payload bytes of every message, both sides.
const PAYLOAD: usize = 256;
/// Room in the broker's group buffer and in the channel.
const CAPACITY: usize = 10_000;

/// `count` envelopes as a publisher would make them: without a key (`keys` 0), or with
/// `keys` distinct keys round robin.
fn envelopes(count: usize, keys: usize) -> Vec<Envelope> {
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    (0..count)
        .map(|i| {
            let envelope = Envelope::new("bench.event", payload.clone());
            if keys == 0 {
                envelope
            } else {
                envelope.with_key(format!("key-{}", i % keys))
            }
        })
        .collect()
}

/// Publishes `envelopes` on one task while a [`Consumer`] (default concurrency) acks them on
/// another (its handlers inside its task, or with `task_per_delivery` a task each); the time
/// from the first publish to the consumer's stop, all acked.
async fn bus_round(envelopes: Vec<Envelope>, task_per_delivery: bool) -> Duration {
    let count = envelopes.len();
    let broker = MemoryBroker::with_config(MemoryConfig::default().with_capacity(CAPACITY));
    let subscription = broker
        .subscribe(TOPIC, SubscribeOptions::group("bench"))
        .await
        .expect("subscribe");
    let handled = Arc::new(AtomicUsize::new(0));
    let all_handled = Arc::new(Notify::new());
    let handler = {
        let handled = handled.clone();
        let all_handled = all_handled.clone();
        handler_fn(move |_: Envelope, _: DeliveryInfo| {
            if handled.fetch_add(1, Ordering::Relaxed) + 1 == count {
                all_handled.notify_one();
            }
            async {}
        })
    };
    let consumer = Consumer::new(subscription, handler)
        .with_task_per_delivery(task_per_delivery)
        .spawn();

    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        for envelope in envelopes {
            broker.publish(TOPIC, envelope).await.expect("publish");
        }
    });
    all_handled.notified().await;
    // Stopping waits for the running handlers' settlements: every ack is in the time.
    let report = consumer.stop().await.expect("consumer");
    let elapsed = started.elapsed();
    publisher.await.expect("publisher");
    assert_eq!(
        report.acked, count as u64,
        "every message acked: {report:?}"
    );
    elapsed
}

/// The same envelopes through a tokio mpsc channel: a producer task sends, a consumer task
/// receives, counts and drops.
async fn channel_round(envelopes: Vec<Envelope>) -> Duration {
    let count = envelopes.len();
    let (tx, mut rx) = mpsc::channel::<Envelope>(CAPACITY);
    let started = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut received = 0;
        while let Some(envelope) = rx.recv().await {
            drop(std::hint::black_box(envelope));
            received += 1;
            if received == count {
                break;
            }
        }
        received
    });
    let producer = tokio::spawn(async move {
        for envelope in envelopes {
            tx.send(envelope).await.expect("send");
        }
    });
    let received = consumer.await.expect("consumer");
    let elapsed = started.elapsed();
    producer.await.expect("producer");
    assert_eq!(received, count);
    elapsed
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

fn main() {
    let messages = env_number("BUS_BENCH_MESSAGES", 200_000);
    let rounds = env_number("BUS_BENCH_ROUNDS", 7).max(1);
    let keys = env_number("BUS_BENCH_KEYS", 16);
    let workers = env_number("BUS_BENCH_WORKERS", 2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");

    println!(
        "memory broker vs tokio mpsc: {messages} messages of {PAYLOAD} B, {rounds} interleaved \
         rounds, {workers} worker threads, consumer concurrency {}",
        bus_core::runtime::DEFAULT_CONCURRENCY
    );
    let mut bus = Vec::new();
    let mut bus_keyed = Vec::new();
    let mut bus_tasks = Vec::new();
    let mut channel = Vec::new();
    // One round of each first, unmeasured: page faults, allocator warm-up.
    runtime.block_on(async {
        bus_round(envelopes(messages / 10, 0), false).await;
        channel_round(envelopes(messages / 10, 0)).await;
    });
    for _ in 0..rounds {
        runtime.block_on(async {
            bus.push(rate(
                messages,
                bus_round(envelopes(messages, 0), false).await,
            ));
            channel.push(rate(messages, channel_round(envelopes(messages, 0)).await));
            bus_keyed.push(rate(
                messages,
                bus_round(envelopes(messages, keys), false).await,
            ));
            bus_tasks.push(rate(
                messages,
                bus_round(envelopes(messages, 0), true).await,
            ));
        });
    }

    println!("{:<34} msgs/s: median [min–max]", "path");
    let bus_median = median(&mut bus.clone());
    let channel_median = median(&mut channel.clone());
    println!("{:<34} {}", "bus: publish → Consumer → ack", spread(bus, 0));
    println!(
        "{:<34} {}",
        format!("bus, {keys} keys (per-key order)"),
        spread(bus_keyed, 0)
    );
    println!(
        "{:<34} {}",
        "bus, a task per delivery",
        spread(bus_tasks, 0)
    );
    println!(
        "{:<34} {}",
        "tokio mpsc: send → recv → drop",
        spread(channel, 0)
    );
    println!(
        "memory msgs/s={:.0} ratio_vs_channel={:.3}",
        bus_median,
        bus_median / channel_median
    );
}
