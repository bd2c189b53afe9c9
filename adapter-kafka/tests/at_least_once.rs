//! At-least-once with concurrent settlement: a consumer that goes away mid-batch, some
//! deliveries acked and some not, loses nothing; the next member of the group gets every
//! unacked one.

use std::collections::HashSet;
use std::time::Duration;

use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::conformance::broker_url;
use bus_core::{Broker, Envelope, MessageId, Publisher, SubscribeOptions, Subscriber};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_dropped_mid_batch_loses_nothing() {
    let Some(url) = broker_url("BUS_TEST_KAFKA_URL") else {
        return;
    };
    let broker = KafkaBroker::connect(KafkaConfig::from_url(&url).unwrap())
        .await
        .expect("connect");
    let topic = format!("alo.{}", uuid::Uuid::now_v7().simple());
    let group = format!("{topic}.g");
    let mut first = broker
        .subscribe(&topic, SubscribeOptions::group(&group).with_prefetch(100))
        .await
        .unwrap();
    let sent: Vec<Envelope> = (0..60)
        .map(|i| Envelope::new("alo.item", format!("{i}")).with_key(format!("k{}", i % 6)))
        .collect();
    broker.publish_batch(&topic, sent.clone()).await.unwrap();

    // Take the whole batch; ack every third, hold the rest unsettled.
    let mut held = Vec::new();
    let mut acked = HashSet::new();
    for i in 0..sent.len() {
        let d = tokio::time::timeout(Duration::from_secs(30), first.next())
            .await
            .expect("delivery in time")
            .unwrap()
            .unwrap();
        if i % 3 == 0 {
            acked.insert(d.envelope().id.clone());
            d.ack().await.unwrap();
        } else {
            held.push(d);
        }
    }
    let unacked: HashSet<MessageId> = held.iter().map(|d| d.envelope().id.clone()).collect();
    // The consumer goes away without settling: the subscription first, then the deliveries.
    drop(first);
    drop(held);

    let mut second = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let mut got = HashSet::new();
    while !unacked.is_subset(&got) {
        let d = tokio::time::timeout(Duration::from_secs(30), second.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} of {} unacked messages never came back",
                    unacked.difference(&got).count(),
                    unacked.len()
                )
            })
            .unwrap()
            .unwrap();
        got.insert(d.envelope().id.clone());
        d.ack().await.unwrap();
    }
    // Acked ones may come again only where an unacked one sat before them in its partition
    // (the commit stops at the first unsettled offset): at-least-once, never a loss.
    second.close().await.unwrap();
    broker.close().await.unwrap();
}
