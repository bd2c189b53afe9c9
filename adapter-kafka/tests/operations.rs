//! What is Kafka's own in backlog counts and delayed publish, beyond the conformance cases:
//! the per-partition detail of a backlog, `NotFound` for a group that never subscribed, a
//! delayed message surviving its group's consumer closing before it is due (it waits on the
//! retry topic, not in the publisher) and reaching a private subscription, and records on the retry topic written by other
//! clients: with the delayed-publish mark but an unreadable or missing due time (delivered at
//! once, at attempt 1), and without the mark (not delivered: another group's retry).
//!
//! Needs `BUS_TEST_KAFKA_URL`; skipped without it (failed with `BUS_REQUIRE_BROKERS=1`).

use std::collections::HashSet;
use std::time::Duration;

use adapter_kafka::rdkafka::message::{Header, OwnedHeaders};
use adapter_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use adapter_kafka::rdkafka::ClientConfig;
use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::conformance::broker_url;
use bus_core::{
    BacklogOf, Broker, Delay, Envelope, ErrorKind, Publisher, SubscribeOptions, Subscriber,
    Subscription,
};
use tokio::time::{timeout, Instant};

const WAIT: Duration = Duration::from_secs(40);

async fn broker() -> Option<(KafkaBroker, String)> {
    let url = broker_url("BUS_TEST_KAFKA_URL")?;
    let config = KafkaConfig::from_url(&url).expect("a kafka:// URL");
    let servers = config.bootstrap_servers.clone();
    Some((
        KafkaBroker::connect(config).await.expect("connect"),
        servers,
    ))
}

fn unique(tag: &str) -> String {
    format!("ops.{tag}.{}", uuid::Uuid::now_v7().simple())
}

async fn next(sub: &mut Subscription, what: &str) -> bus_core::Delivery {
    timeout(WAIT, sub.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
        .expect("open")
        .expect("a delivery")
}

/// Nothing more arrives within `quiet`.
async fn nothing_more(sub: &mut Subscription, quiet: Duration, what: &str) {
    if let Ok(Some(Ok(d))) = timeout(quiet, sub.next()).await {
        panic!(
            "{what}: unexpected delivery {} (kind `{}`, attempt {})",
            d.envelope().id,
            d.envelope().kind,
            d.attempt()
        );
    }
}

#[tokio::test]
async fn backlog_has_one_entry_per_partition() {
    let Some((broker, _)) = broker().await else {
        return;
    };
    let topic = unique("partitions");
    let group = "g1";
    let partitions = broker.config().partitions;
    let mut first = broker
        .subscribe(&topic, SubscribeOptions::group(group))
        .await
        .expect("subscribe");
    first.close().await.expect("close");
    // Keys spread over the partitions; three per key.
    let keys = ["a", "b", "c", "d", "e", "f"];
    for key in keys {
        for i in 0..3 {
            broker
                .publish(&topic, Envelope::new("ops.p", format!("{i}")).with_key(key))
                .await
                .expect("publish");
        }
    }
    let backlog = broker
        .backlog(&BacklogOf::group(&topic, group))
        .await
        .expect("backlog");
    assert_eq!(backlog.waiting, 18, "{backlog:?}");
    assert_eq!(backlog.total(), 18, "{backlog:?}");
    assert_eq!(
        (backlog.in_flight, backlog.delayed, backlog.oldest_age),
        (None, None, None)
    );
    assert_eq!(
        backlog
            .partitions
            .iter()
            .map(|p| p.partition)
            .collect::<Vec<_>>(),
        (0..partitions).collect::<Vec<_>>(),
        "one entry per partition, in order: {backlog:?}"
    );
    for p in &backlog.partitions {
        let committed = p
            .committed
            .unwrap_or_else(|| panic!("the group committed its start on every partition: {p:?}"));
        assert_eq!(p.lag, u64::try_from(p.end_offset - committed).unwrap());
        assert_eq!(p.lag % 3, 0, "whole keys per partition: {p:?}");
    }
    assert_eq!(backlog.partitions.iter().map(|p| p.lag).sum::<u64>(), 18);

    let unknown = broker
        .backlog(&BacklogOf::group(&topic, "never-subscribed"))
        .await
        .expect_err("a group that never subscribed");
    assert_eq!(unknown.kind(), ErrorKind::NotFound, "{unknown}");
    let unknown = broker
        .backlog(&BacklogOf::queue(unique("nowhere")))
        .await
        .expect_err("a queue that does not exist");
    assert_eq!(unknown.kind(), ErrorKind::NotFound, "{unknown}");
    broker.close().await.expect("close");
}

#[tokio::test]
async fn a_delayed_message_outlives_its_groups_consumer() {
    let Some((broker, _)) = broker().await else {
        return;
    };
    let topic = unique("restart");
    let group = "g1";
    let delay = Duration::from_secs(4);
    let mut first = broker
        .subscribe(&topic, SubscribeOptions::group(group))
        .await
        .expect("subscribe");
    // A private subscription open at publish time gets it too.
    let mut private = broker
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .expect("private subscription");
    let sent = Envelope::new("ops.delayed", "later").with_header("x-test", "kept");
    let published_at = Instant::now();
    broker
        .publish_delayed(&topic, sent.clone(), Delay::For(delay))
        .await
        .expect("publish_delayed");
    // The consumer holding it goes away before it is due; the group's next one gets it.
    nothing_more(&mut first, Duration::from_millis(500), "before the delay").await;
    first.close().await.expect("close");
    let mut second = broker
        .subscribe(&topic, SubscribeOptions::group(group))
        .await
        .expect("subscribe again");
    let d = next(&mut second, "the group's second consumer").await;
    assert!(
        published_at.elapsed() >= delay,
        "{:?}",
        published_at.elapsed()
    );
    assert_eq!(d.envelope().id, sent.id);
    assert_eq!(d.envelope().header("x-test"), Some("kept"));
    assert_eq!(d.attempt(), 1);
    assert!(
        d.envelope().header("bus-delayed").is_none()
            && d.envelope().header("bus-not-before").is_none(),
        "the adapter's own headers are not the application's: {:?}",
        d.envelope().headers
    );
    d.ack().await.expect("ack");
    nothing_more(
        &mut second,
        Duration::from_secs(2),
        "after the delayed message",
    )
    .await;
    second.close().await.expect("close");
    let d = next(&mut private, "the private subscription").await;
    assert_eq!((d.envelope().id.clone(), d.attempt()), (sent.id.clone(), 1));
    d.ack().await.expect("ack");
    private.close().await.expect("close");
    broker.close().await.expect("close");
}

#[tokio::test]
async fn foreign_records_on_the_retry_topic_do_not_break_delivery() {
    let Some((broker, servers)) = broker().await else {
        return;
    };
    let topic = unique("foreign");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g1"))
        .await
        .expect("subscribe");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .create()
        .expect("a plain producer");
    let retry = format!("{topic}.retry");
    let produce = |id: &'static str, extra: &[(&'static str, &'static str)]| {
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "ce_id",
            value: Some(id),
        });
        for (key, value) in extra {
            headers = headers.insert(Header {
                key,
                value: Some(*value),
            });
        }
        let producer = producer.clone();
        let retry = retry.clone();
        async move {
            producer
                .send(
                    FutureRecord::<(), [u8]>::to(&retry)
                        .payload(b"foreign".as_slice())
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .expect("produce");
        }
    };
    // Marked as a delayed publish, with a due time nobody can read: due at once.
    produce(
        "malformed-due",
        &[("bus-delayed", "elsewhere"), ("bus-not-before", "soon")],
    )
    .await;
    // Marked, without a due time: at once too.
    produce("no-due", &[("bus-delayed", "x")]).await;
    // Not marked and for no group: another group's retry as far as this one can tell.
    produce("unmarked", &[]).await;
    // Marked, but also some group's retry: that group's alone.
    produce(
        "other-groups-retry",
        &[
            ("bus-delayed", "x"),
            ("bus-retry-group", "g2"),
            ("bus-attempt", "2"),
        ],
    )
    .await;
    // Then a delayed message of bus's own, due shortly.
    let own = Envelope::new("ops.own", "mine");
    broker
        .publish_delayed(&topic, own.clone(), Delay::For(Duration::from_secs(1)))
        .await
        .expect("publish_delayed");
    let mut got = HashSet::new();
    while got.len() < 3 {
        let d = next(&mut sub, "the records meant for g1").await;
        assert_eq!(d.attempt(), 1, "{}", d.envelope().id);
        got.insert(d.envelope().id.to_string());
        d.ack().await.expect("ack");
    }
    let expected: HashSet<String> = [
        "malformed-due".to_owned(),
        "no-due".to_owned(),
        own.id.to_string(),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, expected);
    nothing_more(
        &mut sub,
        Duration::from_secs(2),
        "records for nobody or for g2",
    )
    .await;
    sub.close().await.expect("close");
    broker.close().await.expect("close");
}
