//! Flow control loses nothing: a consumer slower than the fetcher, on a backlog produced in
//! batches, gets every record. The subscription pauses fetching while more than a thousand
//! received records wait for the handler and resumes when they drain; on tansu (which returns
//! only the record batches starting at or after the fetch offset) resuming at the offset
//! after the last record read used to skip the rest of that record's batch.

use std::collections::HashSet;
use std::time::Duration;

use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::conformance::broker_url;
use bus_core::{Broker, ConsumeOptions, Envelope, MessageId, Publisher, Queue};

const BACKLOG: usize = 4_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_of_a_batched_backlog_misses_nothing() {
    let Some(url) = broker_url("BUS_TEST_KAFKA_URL") else {
        return;
    };
    let config = KafkaConfig::from_url(&url)
        .unwrap()
        .with_client_id("bus-pause-test")
        .with_partitions(1);
    let broker = KafkaBroker::connect(config).await.expect("connect");
    let queue = format!("pause.{}", uuid::Uuid::now_v7().simple());
    let sent: Vec<Envelope> = (0..BACKLOG)
        .map(|i| Envelope::new("pause.item", format!("{i}")))
        .collect();
    let ids: HashSet<MessageId> = sent.iter().map(|e| e.id.clone()).collect();
    // One publish_batch: records go out in batches of up to `fetch_rewind` (500).
    broker.publish_batch(&queue, sent).await.expect("publish");

    let mut jobs = broker
        .consume(&queue, ConsumeOptions::default().with_prefetch(16))
        .await
        .expect("consume");
    let mut received = HashSet::new();
    while !ids.is_subset(&received) {
        let next = tokio::time::timeout(Duration::from_secs(20), jobs.next()).await;
        let Ok(Some(Ok(delivery))) = next else {
            panic!(
                "{} of {BACKLOG} records never arrived ({} received)",
                ids.difference(&received).count(),
                received.len()
            );
        };
        received.insert(delivery.envelope().id.clone());
        // The handler's work: slower than fetching, so the fetcher pauses and resumes.
        tokio::time::sleep(Duration::from_micros(500)).await;
        delivery.ack().await.expect("ack");
    }
    jobs.close().await.unwrap();
    broker.close().await.unwrap();
}
