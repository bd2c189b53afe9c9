//! What is specific to the memory broker: bounded memory, its limits, private groups. The
//! shared semantics are in tests/conformance.rs.

use std::time::Duration;

use adapter_memory::{MemoryBroker, MemoryConfig};
use bus_core::{
    Broker, ConsumeOptions, Envelope, ErrorKind, Publisher, Queue, SubscribeOptions, Subscriber,
};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_full_group_pushes_back_then_accepts_once_room_is_freed() {
    let broker = MemoryBroker::with_config(
        MemoryConfig::default()
            .with_capacity(3)
            .with_publish_timeout(Duration::from_millis(100)),
    );
    let mut sub = broker
        .subscribe("t", SubscribeOptions::group("g"))
        .await
        .unwrap();
    for i in 0..3 {
        broker
            .publish("t", Envelope::new("n", format!("{i}")))
            .await
            .unwrap();
    }
    let err = broker
        .publish("t", Envelope::new("n", "3"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backpressure);
    assert!(err.is_retryable());
    assert_eq!(broker.group_len("t", "g"), 3);

    // Taking a message does not free room; settling it does.
    let first = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let publisher = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.publish("t", Envelope::new("n", "3")).await })
    };
    first.ack().await.unwrap();
    publisher.await.unwrap().unwrap();
    assert_eq!(broker.group_len("t", "g"), 3);
}

#[tokio::test]
async fn configured_limits_are_enforced_with_typed_errors() {
    let broker = MemoryBroker::with_config(
        MemoryConfig::default()
            .with_max_payload(8)
            .with_max_headers(2),
    );
    let caps = broker.capabilities();
    assert_eq!(caps.max_payload_bytes, Some(8));
    assert_eq!(caps.max_headers, Some(2));
    let err = broker
        .send("q", Envelope::new("n", "123456789"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    let many = Envelope::new("n", "")
        .with_header("a", "1")
        .with_header("b", "2")
        .with_header("c", "3");
    let err = broker.publish("t", many).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::HeadersTooLarge);
    assert_eq!(broker.queue_len("q"), 0);
}

#[tokio::test]
async fn a_private_group_goes_away_with_its_subscription() {
    let broker = MemoryBroker::new();
    let mut private = broker
        .subscribe("t", SubscribeOptions::default())
        .await
        .unwrap();
    broker.publish("t", Envelope::new("n", "1")).await.unwrap();
    let d = tokio::time::timeout(WAIT, private.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.group(), None);
    d.ack().await.unwrap();
    drop(private);
    // With no group left, a publish is dropped rather than buffered for nobody.
    broker.publish("t", Envelope::new("n", "2")).await.unwrap();
    let mut later = broker
        .subscribe("t", SubscribeOptions::group("late"))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), later.next())
            .await
            .is_err(),
        "a group only gets what is published after it subscribed"
    );
}

#[tokio::test]
async fn close_ends_open_streams_and_wakes_blocked_publishers() {
    let broker = MemoryBroker::with_config(MemoryConfig::default().with_capacity(1));
    let mut sub = broker
        .consume("q", ConsumeOptions::default())
        .await
        .unwrap();
    broker.send("q", Envelope::new("n", "1")).await.unwrap();
    let held = sub.next().await.unwrap().unwrap();
    let blocked = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.send("q", Envelope::new("n", "2")).await })
    };
    tokio::task::yield_now().await;
    broker.close().await.unwrap();
    let err = tokio::time::timeout(WAIT, blocked)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert!(tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap()
        .is_none());
    drop(held);
}

#[test]
fn config_reads_from_serde_and_refuses_unknown_fields() {
    let config: MemoryConfig =
        serde_json::from_str(r#"{"capacity": 5, "max_payload": 1024}"#).unwrap();
    assert_eq!(config.capacity, 5);
    assert_eq!(config.max_payload, Some(1024));
    assert_eq!(config.publish_timeout_ms, 5_000);
    assert!(serde_json::from_str::<MemoryConfig>(r#"{"capacty": 5}"#).is_err());
}

#[tokio::test]
async fn chaos_duplicates_and_delays_but_never_loses_or_reorders_a_key() {
    use adapter_memory::Chaos;
    use std::collections::HashMap;

    let broker = MemoryBroker::with_config(
        MemoryConfig::default().with_chaos(
            Chaos::default()
                .with_duplicate_rate(0.2)
                .with_redeliver_rate(0.2)
                .with_delay_rate(0.3, Duration::from_millis(20))
                .with_seed(42),
        ),
    );
    let mut sub = broker
        .consume("work", ConsumeOptions::default())
        .await
        .unwrap();
    for i in 0..200u32 {
        let envelope = Envelope::new("n", i.to_string()).with_key(format!("k{}", i % 7));
        broker.send("work", envelope).await.unwrap();
    }
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut last_per_key: HashMap<String, u32> = HashMap::new();
    let mut deliveries = 0;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        deliveries += 1;
        let e = d.envelope();
        let n: u32 = std::str::from_utf8(&e.payload).unwrap().parse().unwrap();
        let key = e.key.clone().unwrap();
        let last = last_per_key.entry(key.clone()).or_insert(0);
        assert!(n >= *last, "key {key}: {n} came after {last}");
        *last = n;
        *seen.entry(e.id.to_string()).or_default() += 1;
        d.ack().await.unwrap();
    }
    assert_eq!(seen.len(), 200, "every message arrived");
    assert!(
        deliveries > 230,
        "duplicates and lost acks were injected ({deliveries} deliveries)"
    );
    assert_eq!(broker.queue_len("work"), 0);
}

/// `try_next` hands out what the buffer holds, in order, without waiting and without a
/// second message of a key in flight; a nack settled at once comes back as the next attempt,
/// after its delay if it has one; nothing ready, or a closed broker, is `None`.
#[tokio::test]
async fn try_next_takes_what_is_ready_and_keeps_each_key_in_order() {
    let broker = MemoryBroker::new();
    let mut sub = broker
        .subscribe("t", SubscribeOptions::group("g"))
        .await
        .unwrap();
    assert!(sub.try_next().is_none(), "nothing published yet");
    for (payload, key) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("c1", "c")] {
        broker
            .publish("t", Envelope::new("n", payload).with_key(key))
            .await
            .unwrap();
    }
    let take = |sub: &mut bus_core::Subscription| {
        sub.try_next().map(|d| d.expect("a delivery, not an error"))
    };
    let a1 = take(&mut sub).expect("a1 is ready");
    let b1 = take(&mut sub).expect("b1 is ready");
    let c1 = take(&mut sub).expect("c1 is ready");
    let payloads: Vec<_> = [&a1, &b1, &c1]
        .iter()
        .map(|d| d.envelope().payload.clone())
        .collect();
    assert_eq!(payloads, ["a1", "b1", "c1"]);
    // a2 waits while a1 is in flight.
    assert!(take(&mut sub).is_none(), "a2 must wait behind a1");

    a1.nack(bus_core::Redeliver::Now).await.unwrap();
    let again = take(&mut sub).expect("a1 again, before a2");
    assert_eq!(
        (again.envelope().payload.as_ref(), again.attempt()),
        (&b"a1"[..], 2)
    );
    again.ack().await.unwrap();
    let a2 = take(&mut sub).expect("a2 once a1 is acked");
    assert_eq!(a2.envelope().payload, "a2");
    for delivery in [a2, b1, c1] {
        delivery.ack().await.unwrap();
    }
    assert!(take(&mut sub).is_none());
    assert_eq!(broker.group_len("t", "g"), 0);

    // A nack with a delay is settled at once too, and the message is not ready before then.
    broker.publish("t", Envelope::new("n", "d1")).await.unwrap();
    let d1 = take(&mut sub).expect("d1 is ready");
    d1.nack(bus_core::Redeliver::After(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert!(take(&mut sub).is_none(), "d1 waits out its delay");
    assert_eq!(broker.group_len("t", "g"), 1);

    broker
        .publish("t", Envelope::new("n", "late"))
        .await
        .unwrap();
    broker.close().await.unwrap();
    assert!(
        take(&mut sub).is_none(),
        "a closed broker hands out nothing"
    );
}
