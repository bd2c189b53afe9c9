//! The envelope on the wire, seen by and sent from a plain `async-nats` client: CloudEvents
//! binary mode in NATS headers (`BUS_TEST_NATS_URL`).

use std::time::Duration;

use adapter_nats::{header_names as ce, NatsBroker};
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use bus_core::conformance::broker_url;
use bus_core::{headers, Envelope, Publisher, Queue, SubscribeOptions, Subscriber};
use futures::StreamExt;

fn unique(tag: &str) -> String {
    format!("wire.{tag}.{}", bus_core::MessageId::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_reads_the_cloudevents_headers() {
    let Some(url) = broker_url("BUS_TEST_NATS_URL") else {
        return;
    };
    let bus = NatsBroker::connect(&url).await.expect("connect");
    let raw = async_nats::connect(url.as_str())
        .await
        .expect("raw connect");
    let js = async_nats::jetstream::new(raw);
    let topic = unique("out");
    // Publishing makes the stream; a raw consumer reads from its start.
    let parent = Envelope::new("order.placed", "{}");
    let sent = parent
        .child("payment.requested", &b"\x00\xffbody"[..])
        .with_key("order-42")
        .with_content_type("application/octet-stream")
        .with_header(
            headers::TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with_header("tenant", "acme");
    bus.publish(&topic, sent.clone()).await.expect("publish");

    let stream = js
        .get_stream(bus.topic_stream(&topic))
        .await
        .expect("stream");
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ..pull::Config::default()
        })
        .await
        .expect("raw consumer");
    let mut messages = consumer.messages().await.expect("pull");
    let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .expect("a message in time")
        .expect("open")
        .expect("no error");
    assert_eq!(message.subject.as_str(), bus.topic_subject(&topic));
    assert_eq!(&message.payload[..], &sent.payload[..]);
    let h = message.headers.as_ref().expect("headers");
    let get = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(get(ce::CE_SPECVERSION).as_deref(), Some("1.0"));
    assert_eq!(get(ce::CE_ID).as_deref(), Some(sent.id.as_str()));
    assert_eq!(get(ce::CE_TYPE).as_deref(), Some("payment.requested"));
    assert_eq!(get(ce::CE_SOURCE).as_deref(), Some("bus"));
    assert_eq!(
        get(ce::CE_TIME).as_deref(),
        Some(headers::format_time(sent.timestamp).as_str())
    );
    assert_eq!(
        get(ce::CONTENT_TYPE).as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(
        get(ce::CE_CORRELATIONID).as_deref(),
        Some(parent.id.as_str())
    );
    assert_eq!(get(ce::CE_CAUSATIONID).as_deref(), Some(parent.id.as_str()));
    assert_eq!(get(ce::CE_PARTITIONKEY).as_deref(), Some("order-42"));
    assert_eq!(
        get("traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(get("tenant").as_deref(), Some("acme"));
    message.ack().await.expect("raw ack");
    let _ = js.delete_stream(bus.topic_stream(&topic)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_reads_what_a_plain_client_publishes() {
    let Some(url) = broker_url("BUS_TEST_NATS_URL") else {
        return;
    };
    let bus = NatsBroker::connect(&url).await.expect("connect");
    let raw = async_nats::connect(url.as_str())
        .await
        .expect("raw connect");
    let js = async_nats::jetstream::new(raw);
    let topic = unique("in");
    let mut sub = bus
        .subscribe(&topic, SubscribeOptions::group("readers"))
        .await
        .expect("subscribe");

    // A CloudEvent from another producer, then a bare message with no headers at all.
    let mut h = async_nats::HeaderMap::new();
    h.insert("ce-specversion", "1.0");
    h.insert("ce-id", "evt-1");
    h.insert("ce-type", "com.example.thing");
    h.insert("ce-source", "/elsewhere");
    h.insert("ce-time", "2026-11-24T06:00:00.250Z");
    h.insert("Content-Type", "application/json");
    h.insert("ce-partitionkey", "k1");
    h.insert("x-extra", "kept");
    js.publish_with_headers(bus.topic_subject(&topic), h, "{\"a\":1}".into())
        .await
        .expect("raw publish")
        .await
        .expect("stored");
    js.publish(bus.topic_subject(&topic), "bare".into())
        .await
        .expect("raw publish")
        .await
        .expect("stored");
    let mut bad = async_nats::HeaderMap::new();
    bad.insert("ce-time", "not a time");
    bad.insert("ce-id", "");
    js.publish_with_headers(bus.topic_subject(&topic), bad, "bad".into())
        .await
        .expect("raw publish")
        .await
        .expect("stored");

    let d = next(&mut sub).await;
    let e = d.envelope().clone();
    assert_eq!(e.id.as_str(), "evt-1");
    assert_eq!(e.correlation_id.as_str(), "evt-1");
    assert_eq!(e.kind, "com.example.thing");
    assert_eq!(e.content_type.as_deref(), Some("application/json"));
    assert_eq!(e.key.as_deref(), Some("k1"));
    assert_eq!(e.header("x-extra"), Some("kept"));
    assert_eq!(
        e.timestamp,
        headers::parse_time("2026-11-24T06:00:00.250Z").unwrap()
    );
    assert_eq!(d.attempt(), 1);
    d.ack().await.expect("ack");

    let d = next(&mut sub).await;
    let e = d.envelope().clone();
    assert_eq!(&e.payload[..], b"bare");
    assert_eq!(e.kind, topic, "a bare message's kind is its topic");
    assert_eq!(
        e.id.as_str(),
        format!("{}:2", bus.topic_stream(&topic)),
        "a bare message's id is stream:sequence"
    );
    assert!(e.causation_id.is_none());
    d.ack().await.expect("ack");

    let d = next(&mut sub).await;
    assert_eq!(&d.envelope().payload[..], b"bad");
    assert_eq!(
        d.envelope().id.as_str(),
        format!("{}:3", bus.topic_stream(&topic))
    );
    d.ack().await.expect("ack");
    let _ = sub.close().await;
    let _ = js.delete_stream(bus.topic_stream(&topic)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_mode_is_not_durable_and_still_dead_letters() {
    let Some(url) = broker_url("BUS_TEST_NATS_URL") else {
        return;
    };
    let separator = if url.contains('?') { '&' } else { '?' };
    let bus = NatsBroker::connect(&format!("{url}{separator}durable=false"))
        .await
        .expect("connect");
    let caps = bus_core::Broker::capabilities(&bus);
    assert!(!caps.durable);
    // Redelivery is the adapter's: a copy with the next attempt (tests/core.rs).
    assert_eq!(caps.delayed_redelivery, bus_core::Support::Emulated);
    assert_eq!(caps.delivery_count, bus_core::Support::Emulated);
    let topic = unique("core");
    let mut sub = bus
        .subscribe(&topic, SubscribeOptions::group("g"))
        .await
        .expect("subscribe");
    bus.publish(&topic, Envelope::new("k", "one"))
        .await
        .expect("publish");
    let d = next(&mut sub).await;
    assert_eq!(d.attempt(), 1);
    d.nack(bus_core::Redeliver::Now)
        .await
        .expect("nack on core NATS");
    let d = next(&mut sub).await;
    assert_eq!(d.attempt(), 2);
    d.reject("poison").await.expect("reject");
    let mut dlq = bus
        .consume(&headers::dead_letter_queue(&topic), Default::default())
        .await
        .expect("consume dlq");
    let dead = tokio::time::timeout(Duration::from_secs(10), dlq.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("no error");
    assert_eq!(dead.envelope().header(headers::DLQ_REASON), Some("poison"));
    assert_eq!(dead.envelope().header(headers::DLQ_ATTEMPTS), Some("2"));
    dead.ack().await.expect("ack");
}

async fn next(sub: &mut bus_core::Subscription) -> bus_core::Delivery {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("no error")
}

/// `nack(After(Duration::MAX))` asks for the longest delay JetStream takes, not for none (a
/// delay of `Duration::MAX` in nanoseconds is no JSON number the server reads, and it would
/// redeliver at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_nack_delay_saturates() {
    let Some(url) = broker_url("BUS_TEST_NATS_URL") else {
        return;
    };
    let bus = NatsBroker::connect(&url).await.expect("connect");
    let queue = unique("huge-delay");
    let mut consumer = bus
        .consume(&queue, Default::default())
        .await
        .expect("consume");
    bus.send(&queue, Envelope::new("k", "later"))
        .await
        .expect("send");
    let d = next(&mut consumer).await;
    d.nack(bus_core::Redeliver::After(Duration::MAX))
        .await
        .expect("nack");
    let again = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await;
    assert!(
        again.is_err(),
        "redelivered at once after a nack with Duration::MAX: {again:?}"
    );
    let _ = consumer.close().await;
}
