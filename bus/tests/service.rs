//! The service layer on the in-process broker: dispatch by kind, unknown kinds and
//! undecodable payloads, causation across two services, graceful shutdown, retries.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus::middleware::{RetryLayer, RetryPolicy};
use bus::runtime::ConsumerReport;
use bus::service::{ServiceReport, UnknownKinds};
use bus::{
    headers, Bus, ConsumeOptions, Context, Envelope, Error, ErrorKind, Message, Service,
    SubscribeOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

/// How long a test waits for something that should happen at once.
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    total_cents: u64,
}
impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderCancelled {
    order_id: String,
    reason: String,
}
impl Message for OrderCancelled {
    const KIND: &'static str = "order.cancelled";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PaymentRequested {
    order_id: String,
    amount_cents: u64,
}
impl Message for PaymentRequested {
    const KIND: &'static str = "payment.requested";
}

async fn memory() -> Bus {
    bus::connect("memory://").await.expect("memory broker")
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for a handler")
        .expect("every sender dropped")
}

/// The next dead letter of `topic`, acknowledged.
async fn dead_letter(bus: &Bus, topic: &str) -> Envelope {
    let mut dlq = bus
        .consume(
            &headers::dead_letter_queue(topic),
            ConsumeOptions::default(),
        )
        .await
        .unwrap();
    let delivery = timeout(WAIT, dlq.next())
        .await
        .expect("timed out waiting for a dead letter")
        .expect("dead-letter queue open")
        .unwrap();
    let envelope = delivery.envelope().clone();
    delivery.ack().await.unwrap();
    envelope
}

fn consumer<'a>(report: &'a ServiceReport, topic: &str) -> &'a ConsumerReport {
    report
        .subscription(topic)
        .unwrap_or_else(|| panic!("no subscription to {topic} in {report:?}"))
        .consumer
        .as_ref()
        .expect("consumer stopped cleanly")
}

fn order(id: &str) -> OrderPlaced {
    OrderPlaced {
        order_id: id.into(),
        total_cents: 4_200,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_types_on_one_topic_reach_their_own_handlers() {
    let bus = memory().await;
    let (placed_tx, mut placed) = mpsc::unbounded_channel();
    let (cancelled_tx, mut cancelled) = mpsc::unbounded_channel();
    let service = Service::new("fulfilment", bus.clone())
        .on("orders", move |order: OrderPlaced, ctx: Context| {
            let placed_tx = placed_tx.clone();
            async move {
                placed_tx.send((order, ctx.envelope().id.clone())).unwrap();
                Ok(())
            }
        })
        .on("orders", move |cancel: OrderCancelled, _ctx: Context| {
            let cancelled_tx = cancelled_tx.clone();
            async move {
                cancelled_tx.send(cancel).unwrap();
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();

    let placed_id = bus.publish_message("orders", &order("o-1")).await.unwrap();
    let cancel = OrderCancelled {
        order_id: "o-1".into(),
        reason: "changed my mind".into(),
    };
    bus.publish_message("orders", &cancel).await.unwrap();

    assert_eq!(recv(&mut placed).await, (order("o-1"), placed_id));
    assert_eq!(recv(&mut cancelled).await, cancel);

    let report = service.stop().await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.service, "fulfilment");
    assert_eq!(report.subscriptions.len(), 1, "one subscription per topic");
    let orders = report.subscription("orders").unwrap();
    assert_eq!(orders.group.as_deref(), Some("fulfilment"));
    assert_eq!(orders.kinds, ["order.cancelled", "order.placed"]);
    assert_eq!((orders.unknown_kinds, orders.undecodable), (0, 0));
    let counts = consumer(&report, "orders");
    assert_eq!((counts.received, counts.acked), (2, 2), "{counts:?}");
    assert!(placed.try_recv().is_err() && cancelled.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kind_is_acked_and_skipped_by_default() {
    let bus = memory().await;
    let (tx, mut handled) = mpsc::unbounded_channel();
    let service = Service::new("billing", bus.clone())
        .on("orders", move |order: OrderPlaced, _ctx: Context| {
            let tx = tx.clone();
            async move {
                tx.send(order).unwrap();
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();

    // Same key: the consumer handles the second only after it settled the first.
    let unknown = Envelope::new("order.refunded", r#"{"order_id":"o-1"}"#).with_key("o-1");
    bus.publish("orders", unknown).await.unwrap();
    let known = Envelope::encode(&order("o-1")).unwrap().with_key("o-1");
    bus.publish("orders", known).await.unwrap();
    assert_eq!(recv(&mut handled).await, order("o-1"));

    let report = service.stop().await;
    let orders = report.subscription("orders").unwrap();
    assert_eq!(orders.unknown_kinds, 1, "{report:?}");
    let counts = consumer(&report, "orders");
    assert_eq!(
        (counts.received, counts.acked, counts.rejected),
        (2, 2, 0),
        "the unknown kind is acked, not dead-lettered: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kind_is_dead_lettered_when_the_policy_says_so() {
    let bus = memory().await;
    let service = Service::new("billing", bus.clone())
        .with_unknown_kinds(UnknownKinds::DeadLetter)
        .on("orders", |_: OrderPlaced, _: Context| async { Ok(()) })
        .start()
        .await
        .unwrap();

    let unknown = Envelope::new("order.refunded", r#"{"order_id":"o-1"}"#);
    let unknown_id = unknown.id.clone();
    bus.publish("orders", unknown).await.unwrap();

    let dead = dead_letter(&bus, "orders").await;
    assert_eq!(dead.id, unknown_id);
    assert_eq!(dead.kind, "order.refunded");
    let reason = dead.header(headers::DLQ_REASON).unwrap();
    assert!(
        reason.contains("`order.refunded`") && reason.contains("`billing`"),
        "the reason names the kind and the service: {reason}"
    );
    assert_eq!(dead.header(headers::DLQ_GROUP), Some("billing"));

    let report = service.stop().await;
    assert_eq!(report.subscription("orders").unwrap().unknown_kinds, 1);
    let counts = consumer(&report, "orders");
    assert_eq!((counts.acked, counts.rejected), (0, 1), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_payload_is_dead_lettered_with_the_type_and_the_serde_error() {
    let bus = memory().await;
    let ran = Arc::new(AtomicU32::new(0));
    let runs = ran.clone();
    let service = Service::new("billing", bus.clone())
        .on("orders", move |_: OrderPlaced, _: Context| {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
        .start()
        .await
        .unwrap();

    // The right kind, the wrong shape: as another service's old version might publish it.
    let wrong_shape = Envelope::new(OrderPlaced::KIND, r#"{"order":"o-1"}"#);
    let wrong_id = wrong_shape.id.clone();
    bus.publish("orders", wrong_shape).await.unwrap();

    let dead = dead_letter(&bus, "orders").await;
    assert_eq!(dead.id, wrong_id);
    assert_eq!(dead.payload.as_ref(), br#"{"order":"o-1"}"#, "payload kept");
    let reason = dead.header(headers::DLQ_REASON).unwrap();
    assert!(
        reason.contains("OrderPlaced") && reason.contains("missing field `order_id`"),
        "the reason names the type and the serde error: {reason}"
    );
    assert_eq!(dead.header(headers::DLQ_ATTEMPTS), Some("1"), "not retried");

    // A newer schema version than the type knows is refused the same way.
    let newer = Envelope::encode(&order("o-2"))
        .unwrap()
        .with_header(headers::SCHEMA_VERSION, "7");
    bus.publish("orders", newer).await.unwrap();
    let dead = dead_letter(&bus, "orders").await;
    let reason = dead.header(headers::DLQ_REASON).unwrap();
    assert!(
        reason.contains("OrderPlaced") && reason.contains("schema version 7"),
        "{reason}"
    );

    let report = service.stop().await;
    assert_eq!(report.subscription("orders").unwrap().undecodable, 2);
    assert_eq!(consumer(&report, "orders").rejected, 2);
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the handler never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causation_and_trace_context_propagate_across_two_services() {
    let bus = memory().await;

    // Service A: an order causes a payment request, published through its context.
    let orders = Service::new("order-service", bus.clone())
        .on("orders", |order: OrderPlaced, ctx: Context| async move {
            let request = PaymentRequested {
                order_id: order.order_id,
                amount_cents: order.total_cents,
            };
            ctx.publish("payments", &request).await?;
            ctx.send("payments.audit", &request).await?;
            Ok(())
        })
        .start()
        .await
        .unwrap();

    // Service B: receives the payment request and hands what it saw to the test.
    let (tx, mut seen) = mpsc::unbounded_channel();
    let payments = Service::new("payment-service", bus.clone())
        .on(
            "payments",
            move |request: PaymentRequested, ctx: Context| {
                let tx = tx.clone();
                async move {
                    let seen = (
                        request,
                        ctx.envelope().clone(),
                        ctx.attempt(),
                        ctx.source().to_owned(),
                        ctx.group().map(str::to_owned),
                        ctx.service().to_owned(),
                    );
                    tx.send(seen).unwrap();
                    Ok(())
                }
            },
        )
        .start()
        .await
        .unwrap();

    // A message in the middle of a conversation, so correlation id and id differ.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let first = Envelope::encode(&order("o-9"))
        .unwrap()
        .with_correlation_id("checkout-conversation-1")
        .with_header(headers::TRACEPARENT, traceparent)
        .with_header(headers::TRACESTATE, "vendor=1");
    bus.publish("orders", first.clone()).await.unwrap();

    let (request, envelope, attempt, source, group, service) = recv(&mut seen).await;
    assert_eq!(
        request,
        PaymentRequested {
            order_id: "o-9".into(),
            amount_cents: 4_200
        }
    );
    assert_eq!(envelope.kind, PaymentRequested::KIND);
    assert_eq!(envelope.correlation_id, first.correlation_id);
    assert_eq!(envelope.causation_id.as_ref(), Some(&first.id));
    assert_ne!(envelope.id, first.id);
    assert_eq!(envelope.header(headers::TRACEPARENT), Some(traceparent));
    assert_eq!(envelope.header(headers::TRACESTATE), Some("vendor=1"));
    assert_eq!(attempt, 1);
    assert_eq!(source, "payments");
    assert_eq!(group.as_deref(), Some("payment-service"));
    assert_eq!(service, "payment-service");

    // A message sent to a queue through the context is linked the same way.
    let mut audit = bus
        .consume("payments.audit", ConsumeOptions::default())
        .await
        .unwrap();
    let sent = timeout(WAIT, audit.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(sent.envelope().correlation_id, first.correlation_id);
    assert_eq!(sent.envelope().causation_id.as_ref(), Some(&first.id));
    assert_eq!(
        sent.envelope().header(headers::TRACEPARENT),
        Some(traceparent)
    );
    sent.ack().await.unwrap();

    let a = orders.stop().await;
    let b = payments.stop().await;
    assert_eq!(consumer(&a, "orders").acked, 1);
    assert_eq!(consumer(&b, "payments").acked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_in_flight_handler_finish_and_acks_it() {
    let bus = memory().await;
    // `run` subscribes on its own task: make the group exist first so the publish below
    // reaches it (a group gets what is published after it first subscribed).
    let mut group = bus
        .subscribe("orders", SubscribeOptions::group("billing"))
        .await
        .unwrap();
    group.close().await.unwrap();

    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (release_tx, release) = oneshot::channel::<()>();
    let release = Arc::new(tokio::sync::Mutex::new(Some(release)));
    let finished = Arc::new(AtomicU32::new(0));
    let done = finished.clone();
    let service = Service::new("billing", bus.clone())
        .with_shutdown_timeout(WAIT)
        .on("orders", move |order: OrderPlaced, _: Context| {
            let (started_tx, release, done) = (started_tx.clone(), release.clone(), done.clone());
            async move {
                started_tx.send(order.order_id).unwrap();
                let release = release.lock().await.take().expect("handled once");
                release.await.expect("the test releases the handler");
                done.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        });
    let (stop_tx, stop) = oneshot::channel::<()>();
    let mut run = tokio::spawn(service.run(async {
        stop.await.ok();
    }));

    let in_flight = bus.publish_message("orders", &order("o-1")).await.unwrap();
    assert_eq!(recv(&mut started).await, "o-1");
    stop_tx.send(()).unwrap();
    // The service is shutting down but must wait for the handler, however long it takes
    // (up to the shutdown timeout).
    assert!(
        timeout(Duration::from_millis(300), &mut run).await.is_err(),
        "run returned while a handler was still running"
    );
    release_tx.send(()).unwrap();
    let report = timeout(WAIT, run)
        .await
        .expect("run returns once the handler finished")
        .unwrap()
        .unwrap();
    assert_eq!(finished.load(Ordering::SeqCst), 1);
    let counts = consumer(&report, "orders");
    assert_eq!(
        (counts.received, counts.acked, counts.abandoned),
        (1, 1, 0),
        "{counts:?}"
    );

    // Acked, so not redelivered: the group's next message is the one published after it.
    let mut group = bus
        .subscribe("orders", SubscribeOptions::group("billing"))
        .await
        .unwrap();
    let marker = bus.publish_message("orders", &order("o-2")).await.unwrap();
    let next = timeout(WAIT, group.next()).await.unwrap().unwrap().unwrap();
    assert_ne!(
        next.envelope().id,
        in_flight,
        "the in-flight order came back"
    );
    assert_eq!(next.envelope().id, marker);
    next.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_error_is_retried_and_a_permanent_one_dead_lettered() {
    let bus = memory().await;
    let (tx, mut attempts) = mpsc::unbounded_channel();
    let service = Service::new("billing", bus.clone())
        .on("orders", move |order: OrderPlaced, ctx: Context| {
            let tx = tx.clone();
            async move {
                tx.send((order.order_id.clone(), ctx.attempt())).unwrap();
                match (order.order_id.as_str(), ctx.attempt()) {
                    ("flaky", 1) => Err(Error::new(ErrorKind::Handler, "database busy")),
                    ("declined", _) => Err(Error::new(ErrorKind::Rejected, "card declined")),
                    _ => Ok(()),
                }
            }
        })
        .start()
        .await
        .unwrap();

    bus.publish_message("orders", &order("flaky"))
        .await
        .unwrap();
    assert_eq!(recv(&mut attempts).await, ("flaky".to_owned(), 1));
    assert_eq!(recv(&mut attempts).await, ("flaky".to_owned(), 2));

    let declined = bus
        .publish_message("orders", &order("declined"))
        .await
        .unwrap();
    assert_eq!(recv(&mut attempts).await, ("declined".to_owned(), 1));
    let dead = dead_letter(&bus, "orders").await;
    assert_eq!(dead.id, declined);
    assert_eq!(
        dead.header(headers::DLQ_REASON),
        Some("rejected: card declined")
    );

    let report = service.stop().await;
    let counts = consumer(&report, "orders");
    assert_eq!((counts.acked, counts.rejected), (1, 1), "{counts:?}");
    assert_eq!(counts.retried + counts.retried_in_place, 1, "{counts:?}");
    assert!(attempts.try_recv().is_err(), "nothing ran a third time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_wide_retry_layer_dead_letters_after_the_last_delivery() {
    let bus = memory().await;
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let policy = RetryPolicy::new()
        .with_immediate_retries(0, Duration::from_millis(1))
        .with_max_deliveries(3)
        .with_backoff(Duration::from_millis(10), 1.0, Duration::from_millis(10));
    let service = Service::new("billing", bus.clone())
        .with_layer(RetryLayer::new(policy))
        .on("orders", move |_: OrderPlaced, _: Context| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err(Error::new(ErrorKind::Handler, "always down")) }
        })
        .start()
        .await
        .unwrap();

    let id = bus.publish_message("orders", &order("o-1")).await.unwrap();
    let dead = dead_letter(&bus, "orders").await;
    assert_eq!(dead.id, id);
    assert_eq!(dead.header(headers::DLQ_ATTEMPTS), Some("3"));
    assert!(
        dead.header(headers::DLQ_REASON)
            .unwrap()
            .contains("always down"),
        "{dead:?}"
    );

    let report = service.stop().await;
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(consumer(&report, "orders").rejected, 1);
}

#[tokio::test]
async fn a_service_without_handlers_does_not_start() {
    let err = Service::new("idle", memory().await)
        .start()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("`idle`"), "{err}");
}

#[tokio::test]
#[should_panic(expected = "already has a handler for kind `order.placed` on topic `orders`")]
async fn registering_one_kind_twice_on_a_topic_panics() {
    let _ = Service::new("twice", memory().await)
        .on("orders", |_: OrderPlaced, _: Context| async { Ok(()) })
        .on("orders", |_: OrderPlaced, _: Context| async { Ok(()) });
}

#[tokio::test]
async fn shutdown_signal_completes_on_sigterm() {
    let signal = bus::shutdown_signal().unwrap();
    // The handler is installed: SIGTERM no longer ends this process, it completes the future.
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("kill -TERM {}", std::process::id()))
        .status()
        .unwrap();
    assert!(status.success());
    timeout(WAIT, signal)
        .await
        .expect("the shutdown signal completes on SIGTERM");
}

#[tokio::test]
async fn service_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let service =
        Service::new("s", memory().await).on("t", |_: OrderPlaced, ctx: Context| async move {
            let message = order("o");
            let publish = ctx.publish("u", &message);
            assert_send(&publish);
            let request = ctx.request::<_, OrderPlaced>("q", &message, WAIT);
            assert_send(&request);
            drop(request);
            publish.await.map(drop)
        });
    let run = service.run(async {});
    assert_send(&run);
    drop(run);
}
