//! Core NATS subscriptions (`BUS_TEST_NATS_URL`): topics with `durable=false` and request
//! responders. Core NATS keeps nothing, so a message reaches a subscriber only if the server
//! already has its subscription: once `subscribe` or `serve` has returned, what another
//! connection sends must arrive. A message whose handler fails is redelivered by the adapter
//! (a copy with `bus-attempt` + 1) until the retry policy dead-letters it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use adapter_nats::NatsBroker;
use bus_core::conformance::broker_url;
use bus_core::middleware::retry::{RetryLayer, RetryPolicy};
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo, HandlerBuilder, KeyOrder};
use bus_core::{
    headers, Broker, ConsumeOptions, Envelope, Error, ErrorKind, Publisher, Queue, Redeliver,
    Responder, ServeOptions, SubscribeOptions, Subscriber, Support,
};
use bytes::Bytes;

/// Subscriptions made one after another, each racing a publish from another connection.
const ROUNDS: usize = 20;

async fn connect() -> Option<(NatsBroker, async_nats::Client)> {
    let url = broker_url("BUS_TEST_NATS_URL")?;
    let separator = if url.contains('?') { '&' } else { '?' };
    let bus = NatsBroker::connect(&format!("{url}{separator}durable=false"))
        .await
        .expect("connect");
    let other = async_nats::connect(url.as_str())
        .await
        .expect("connect another client");
    Some((bus, other))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_subscription_is_on_the_server_when_subscribe_returns() {
    let Some((bus, other)) = connect().await else {
        return;
    };
    for round in 0..ROUNDS {
        let topic = format!("core.subscribed.{}", bus_core::MessageId::new());
        let options = if round % 2 == 0 {
            SubscribeOptions::group("g")
        } else {
            SubscribeOptions::default()
        };
        let mut subscription = bus.subscribe(&topic, options).await.expect("subscribe");
        other
            .publish(
                bus.topic_subject(&topic),
                Bytes::from_static(b"right after"),
            )
            .await
            .expect("publish");
        other.flush().await.expect("flush");
        let delivery = tokio::time::timeout(Duration::from_secs(5), subscription.next())
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: published after subscribe returned, never received")
            })
            .expect("open")
            .expect("no error");
        assert_eq!(delivery.envelope().payload.as_ref(), b"right after");
        delivery.ack().await.expect("ack");
        subscription.close().await.expect("close");
    }
    let _ = bus_core::Broker::close(&bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_is_on_the_server_when_serve_returns() {
    let Some((bus, other)) = connect().await else {
        return;
    };
    for round in 0..ROUNDS {
        let topic = format!("core.served.{}", bus_core::MessageId::new());
        let mut requests = bus
            .serve(&topic, ServeOptions::default())
            .await
            .expect("serve");
        let answered = tokio::spawn(async move {
            let request = requests.next().await.expect("open").expect("no error");
            let response = bus_core::Envelope::new("pong", "pong");
            request.reply(response).await.expect("reply");
            requests
        });
        let reply = other
            .request(bus.request_subject(&topic), Bytes::from_static(b"ping"))
            .await
            .unwrap_or_else(|e| panic!("round {round}: requested after serve returned: {e}"));
        assert_eq!(reply.payload.as_ref(), b"pong");
        let mut requests = answered.await.expect("the responder");
        requests.close().await.expect("close");
    }
    let _ = bus_core::Broker::close(&bus).await;
}

/// The issue-11 defect: on core NATS a nack was `Unsupported`, the consumer dropped the
/// delivery, its attempt stayed 1 and the retry middleware never dead-lettered it: a message
/// whose handler always failed vanished. Now every nack comes back with the next attempt, and
/// after the policy's last one the message is in `<topic>.dlq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_on_core_nats_ends_in_the_dead_letter_queue() {
    const MAX_DELIVERIES: u32 = 4;
    let Some((bus, _other)) = connect().await else {
        return;
    };
    let topic = format!("core.failing.{}", bus_core::MessageId::new());
    let runs = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler = handler_fn({
        let runs = runs.clone();
        let seen = seen.clone();
        move |_: Envelope, info: DeliveryInfo| {
            runs.fetch_add(1, Ordering::SeqCst);
            seen.lock().unwrap().push(info.attempt());
            async move { Err::<(), _>(Error::new(ErrorKind::Handler, "always fails")) }
        }
    });
    let policy = RetryPolicy::new()
        .with_immediate_retries(0, Duration::ZERO)
        .with_max_deliveries(MAX_DELIVERIES)
        .with_backoff(Duration::from_millis(20), 2.0, Duration::from_millis(100));
    let handler = HandlerBuilder::new()
        .layer(RetryLayer::new(policy))
        .handler(handler);
    let subscription = bus
        .subscribe(&topic, SubscribeOptions::group("workers"))
        .await
        .expect("subscribe");
    // Through the broker: the nacked copies with `bus-attempt` are what this checks.
    let consumer = Consumer::new(subscription, handler)
        .with_key_order(KeyOrder::Unordered)
        .spawn();

    let sent = Envelope::new("core.failing", "fails every time").with_key("k");
    bus.publish(&topic, sent.clone()).await.expect("publish");

    let mut dlq = bus
        .consume(
            &headers::dead_letter_queue(&topic),
            ConsumeOptions::default(),
        )
        .await
        .expect("consume the dead-letter queue");
    let dead = tokio::time::timeout(Duration::from_secs(20), dlq.next())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no dead letter within 20 s; the handler ran {} times, attempts {:?}",
                runs.load(Ordering::SeqCst),
                seen.lock().unwrap()
            )
        })
        .expect("open")
        .expect("no error");
    assert_eq!(dead.envelope().id, sent.id);
    assert_eq!(dead.envelope().payload, sent.payload);
    assert_eq!(dead.envelope().key, sent.key);
    assert_eq!(
        dead.envelope().header(headers::DLQ_ATTEMPTS),
        Some(MAX_DELIVERIES.to_string().as_str())
    );
    assert_eq!(
        dead.envelope().header(headers::ATTEMPT),
        None,
        "the attempt header is the adapter's, not the message's"
    );
    dead.ack().await.expect("ack the dead letter");
    let report = consumer.stop().await.expect("consumer");
    assert_eq!(runs.load(Ordering::SeqCst), MAX_DELIVERIES);
    assert_eq!(
        *seen.lock().unwrap(),
        (1..=MAX_DELIVERIES).collect::<Vec<_>>()
    );
    assert_eq!(report.rejected, 1, "{report:?}");
    assert_eq!(report.retried, u64::from(MAX_DELIVERIES - 1), "{report:?}");
    let _ = dlq.close().await;
    let caps = bus.capabilities();
    assert!(
        matches!(caps.delayed_redelivery, Support::Emulated),
        "{caps:?}"
    );
    assert!(matches!(caps.delivery_count, Support::Emulated), "{caps:?}");
    let _ = bus_core::Broker::close(&bus).await;
}

async fn next(subscription: &mut bus_core::Subscription) -> bus_core::Delivery {
    tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .expect("a delivery within 5 s")
        .expect("open")
        .expect("no error")
}

/// A nack on core NATS goes to the subscription's own group only (another group of the topic
/// gets the message once), comes back no sooner than its delay, and a delivery dropped
/// unsettled comes back too, each time with the next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_nack_redelivers_to_its_group_only() {
    let Some((bus, _other)) = connect().await else {
        return;
    };
    let topic = format!("core.nack.{}", bus_core::MessageId::new());
    let mut retrying = bus
        .subscribe(&topic, SubscribeOptions::group("retrying"))
        .await
        .expect("subscribe");
    let mut private = bus
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .expect("subscribe");
    let mut other = bus
        .subscribe(&topic, SubscribeOptions::group("other"))
        .await
        .expect("subscribe");
    let sent = Envelope::new("core.nack", "again");
    bus.publish(&topic, sent.clone()).await.expect("publish");

    let first = next(&mut retrying).await;
    assert_eq!(first.attempt(), 1);
    let delay = Duration::from_millis(300);
    let nacked = std::time::Instant::now();
    first.nack(Redeliver::After(delay)).await.expect("nack");
    let second = next(&mut retrying).await;
    assert!(
        nacked.elapsed() >= delay,
        "back after {:?}",
        nacked.elapsed()
    );
    assert_eq!(second.attempt(), 2);
    assert_eq!(second.envelope().id, sent.id);
    assert_eq!(second.envelope().payload, sent.payload);
    drop(second);
    let third = next(&mut retrying).await;
    assert_eq!(third.attempt(), 3, "a dropped delivery comes back too");
    third.ack().await.expect("ack");

    let p = next(&mut private).await;
    assert_eq!(p.attempt(), 1);
    p.nack(Redeliver::Now).await.expect("nack");
    let p = next(&mut private).await;
    assert_eq!(p.attempt(), 2);
    p.ack().await.expect("ack");

    let o = next(&mut other).await;
    assert_eq!(o.attempt(), 1);
    o.ack().await.expect("ack");
    // Nothing else for any of them: each copy went to one subscriber, and a copy sent to
    // another one as well would have been routed with the one that arrived.
    for s in [&mut retrying, &mut private, &mut other] {
        assert!(
            tokio::time::timeout(Duration::from_millis(300), s.next())
                .await
                .is_err(),
            "a stray copy"
        );
    }
    for mut s in [retrying, private, other] {
        s.close().await.expect("close");
    }
    let _ = bus_core::Broker::close(&bus).await;
}
