//! Broker restarts mid-stream (Watermill's `TestReconnect` is the model): concurrent
//! publishers send while a group consumes, and the broker is killed and started again twice,
//! at about a third and at about half of the stream. Every publish that returned `Ok` must be
//! received (duplicates are counted and allowed, losses are not). The test prints one line:
//!
//! ```text
//! kafka restart: published=1000 confirmed=1000 received=1000 lost=0 duplicates=0
//! ```
//!
//! The shared test broker keeps its data in memory, and a restart of it would lose what it had
//! confirmed: that would prove nothing about the adapter. So this test starts a tansu of its
//! own on 127.0.0.1:19092 with SQLite storage (which survives the restart), in a fresh
//! directory (see `support`). SQLite storage is slow, so by default the stream is 1,000
//! messages from 100 publishers (about 12 s). `BUS_RESTART_MESSAGES` sets the number of
//! messages, as for the other adapters' restart tests; the full Watermill size, 10,000
//! messages from 100 publishers (about 65 s on a 2-core machine), runs with
//!
//! ```text
//! BUS_RESTART_MESSAGES=10000 BUS_REQUIRE_BROKERS=1 cargo test -p adapter-kafka --all-features --test restart -- --nocapture
//! ```
//!
//! What it proves: rdkafka reconnects by itself, a publish in flight during an outage either
//! fails or is delivered (never `Ok` and lost), and the group resumes from its committed
//! offsets. What it cannot prove: replication or fsync behaviour of a real Kafka cluster.
//!
//! Runs when `BUS_TEST_KAFKA_URL` is set (the Kafka tests are on) and `tansu` is on `PATH` (or
//! in `~/.cargo/bin`); with `BUS_REQUIRE_BROKERS=1` a missing `tansu` fails.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::conformance::report;
use bus_core::{Broker, Envelope, MessageId, Publisher, SubscribeOptions, Subscriber};

const PORT: u16 = 19092;
const PUBLISHERS: usize = 100;
/// Between two publishes of one publisher: the stream lasts long enough for both restarts
/// to fall inside it (100 publishers: about 200 messages a second, what tansu on SQLite
/// consumes).
const PACE: Duration = Duration::from_millis(500);
/// How long the broker stays down at each restart.
const OUTAGE: Duration = Duration::from_secs(1);

fn messages() -> usize {
    let count = std::env::var("BUS_RESTART_MESSAGES").map_or(1_000, |v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("BUS_RESTART_MESSAGES={v} is not a number"))
    });
    assert!(
        count >= PUBLISHERS,
        "BUS_RESTART_MESSAGES={count}: at least {PUBLISHERS}"
    );
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_no_confirmed_message() {
    let Some(binary) = support::required_binary() else {
        return;
    };
    let count = messages();
    let mut tansu = support::Tansu::start(binary, PORT).await;
    let config = KafkaConfig::new(tansu.bootstrap())
        .with_client_id("bus-restart-test")
        .with_partitions(3);
    let broker = Arc::new(KafkaBroker::connect(config).await.expect("connect"));
    let topic = format!("restart.{}", uuid::Uuid::now_v7().simple());
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(format!("{topic}.g")))
        .await
        .expect("subscribe");

    let confirmed = Arc::new(Mutex::new(HashSet::<MessageId>::new()));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (broker, topic, confirmed) = (broker.clone(), topic.clone(), confirmed.clone());
            tokio::spawn(async move {
                for i in (p..count).step_by(PUBLISHERS) {
                    let envelope =
                        Envelope::new("restart.item", format!("{i}")).with_key(format!("k{p}"));
                    let id = envelope.id.clone();
                    // An error means "maybe delivered": not counted as confirmed.
                    if broker.publish(&topic, envelope).await.is_ok() {
                        confirmed.lock().unwrap().insert(id);
                    }
                    tokio::time::sleep(PACE).await;
                }
            })
        })
        .collect();

    let deliveries = Arc::new(Mutex::new(HashMap::<MessageId, usize>::new()));
    let consumer = {
        let deliveries = deliveries.clone();
        tokio::spawn(async move {
            while let Some(item) = sub.next().await {
                if let Ok(d) = item {
                    *deliveries
                        .lock()
                        .unwrap()
                        .entry(d.envelope().id.clone())
                        .or_default() += 1;
                    let _ = d.ack().await;
                }
            }
        })
    };

    // Restart at about a third and at about half of the stream (or once publishing ended,
    // should it end first: the broker is restarted twice in any case).
    let publishing_done = || publishers.iter().all(|p| p.is_finished());
    for share in [3, 2] {
        loop {
            let so_far = confirmed.lock().unwrap().len();
            if so_far >= count / share || publishing_done() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tansu.kill().await;
        tokio::time::sleep(OUTAGE).await;
        tansu.up().await;
    }

    let limit = Duration::from_secs(60) + Duration::from_millis(count as u64 * 20);
    let deadline = tokio::time::Instant::now() + limit;
    let lost = loop {
        let lost = {
            let confirmed = confirmed.lock().unwrap();
            let deliveries = deliveries.lock().unwrap();
            confirmed
                .iter()
                .filter(|id| !deliveries.contains_key(*id))
                .count()
        };
        if (lost == 0 && publishing_done()) || tokio::time::Instant::now() >= deadline {
            break lost;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for p in publishers {
        p.abort();
    }
    consumer.abort();
    let confirmed = confirmed.lock().unwrap().len();
    let (received, duplicates) = {
        let deliveries = deliveries.lock().unwrap();
        let total: usize = deliveries.values().sum();
        (deliveries.len(), total - deliveries.len())
    };
    report(&format!(
        "kafka restart: published={count} confirmed={confirmed} received={received} \
         lost={lost} duplicates={duplicates}"
    ));
    assert_eq!(
        lost, 0,
        "{lost} confirmed messages never arrived within {limit:?}"
    );
    assert!(
        confirmed > count / 2,
        "most publishes succeed across the restarts"
    );
    let _ = broker.close().await;
}
