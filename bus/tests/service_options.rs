//! Settings of one handler over the service's: its own group, layers, concurrency and key
//! order, on the in-process broker.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus::runtime::{Handler, KeyOrder, Outcome};
use bus::service::HandlerOptions;
use bus::{async_trait, Bus, Context, Delivery, Envelope, Error, ErrorKind, Message, Service};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
}
impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderCancelled {
    order_id: String,
}
impl Message for OrderCancelled {
    const KIND: &'static str = "order.cancelled";
}

fn placed(id: &str) -> OrderPlaced {
    OrderPlaced {
        order_id: id.into(),
    }
}

async fn memory() -> Bus {
    bus::connect("memory://").await.unwrap()
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for a handler")
        .expect("every sender dropped")
}

/// A layer that counts the deliveries it sees, by kind.
#[derive(Clone)]
struct Seen(mpsc::UnboundedSender<(&'static str, String)>, &'static str);

struct SeenHandler(Seen, Arc<dyn Handler>);

impl tower_layer::Layer<Arc<dyn Handler>> for Seen {
    type Service = SeenHandler;
    fn layer(&self, inner: Arc<dyn Handler>) -> SeenHandler {
        SeenHandler(self.clone(), inner)
    }
}

#[async_trait]
impl Handler for SeenHandler {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let _ = (self.0)
            .0
            .send(((self.0).1, delivery.envelope().kind.clone()));
        self.1.handle(delivery).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_in_its_own_group_gets_every_message_again() {
    let bus = memory().await;
    let (tx, mut handled) = mpsc::unbounded_channel();
    let (billing_tx, audit_tx) = (tx.clone(), tx);
    let service = Service::new("billing", bus.clone())
        .on("orders", move |order: OrderPlaced, ctx: Context| {
            let tx = billing_tx.clone();
            async move {
                tx.send(("charge", order.order_id, ctx.group().map(str::to_owned)))
                    .unwrap();
                Ok(())
            }
        })
        .on_with(
            "orders",
            HandlerOptions::new().with_group("billing-audit"),
            move |order: OrderPlaced, ctx: Context| {
                let tx = audit_tx.clone();
                async move {
                    tx.send(("audit", order.order_id, ctx.group().map(str::to_owned)))
                        .unwrap();
                    Ok(())
                }
            },
        )
        .start()
        .await
        .unwrap();

    bus.publish_message("orders", &placed("o-1")).await.unwrap();
    let mut seen = vec![recv(&mut handled).await, recv(&mut handled).await];
    seen.sort();
    assert_eq!(
        seen,
        [
            ("audit", "o-1".to_owned(), Some("billing-audit".to_owned())),
            ("charge", "o-1".to_owned(), Some("billing".to_owned())),
        ]
    );

    let report = service.stop().await;
    let groups: Vec<_> = report
        .subscriptions
        .iter()
        .map(|s| (s.name.as_str(), s.group.as_deref()))
        .collect();
    assert_eq!(
        groups,
        [
            ("orders", Some("billing")),
            ("orders", Some("billing-audit"))
        ]
    );
    assert!(report
        .subscriptions
        .iter()
        .all(|s| s.consumer.as_ref().unwrap().acked == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_layer_sees_its_kind_only_inside_the_service_layers() {
    let bus = memory().await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let service = Service::new("billing", bus.clone())
        .with_layer(Seen(seen_tx.clone(), "service"))
        .on_with(
            "orders",
            HandlerOptions::new().with_layer(Seen(seen_tx.clone(), "placed")),
            |_: OrderPlaced, _: Context| async { Ok(()) },
        )
        .on("orders", |_: OrderCancelled, _: Context| async { Ok(()) })
        .start()
        .await
        .unwrap();

    // One key: the second is handled after the first.
    let key = |e: Envelope| e.with_key("o-1");
    bus.publish("orders", key(Envelope::encode(&placed("o-1")).unwrap()))
        .await
        .unwrap();
    let cancelled = OrderCancelled {
        order_id: "o-1".into(),
    };
    bus.publish("orders", key(Envelope::encode(&cancelled).unwrap()))
        .await
        .unwrap();
    let report = {
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(recv(&mut seen).await);
        }
        assert_eq!(
            order,
            [
                ("service", "order.placed".to_owned()),
                ("placed", "order.placed".to_owned()),
                ("service", "order.cancelled".to_owned()),
            ]
        );
        service.stop().await
    };
    assert_eq!(
        report
            .subscription("orders")
            .unwrap()
            .consumer
            .as_ref()
            .unwrap()
            .acked,
        2
    );
    assert!(
        seen.try_recv().is_err(),
        "the handler's layer saw only its kind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_set_per_handler() {
    let bus = memory().await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    // Handlers wait for a permit from the test, so the test decides when each one ends.
    let (invoices, orders) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    let (slow_tx, slow_release) = (started_tx.clone(), invoices.clone());
    let (fast_tx, fast_release) = (started_tx, orders.clone());
    let service = Service::new("billing", bus.clone())
        .with_concurrency(8)
        .on_with(
            "invoices",
            HandlerOptions::new().with_concurrency(1),
            move |order: OrderPlaced, _: Context| {
                let (tx, release) = (slow_tx.clone(), slow_release.clone());
                async move {
                    tx.send(("invoices", order.order_id)).unwrap();
                    release.acquire().await.unwrap().forget();
                    Ok(())
                }
            },
        )
        .on("orders", move |order: OrderPlaced, _: Context| {
            let (tx, release) = (fast_tx.clone(), fast_release.clone());
            async move {
                tx.send(("orders", order.order_id)).unwrap();
                release.acquire().await.unwrap().forget();
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();

    for id in ["a", "b", "c"] {
        bus.publish_message("orders", &placed(id)).await.unwrap();
        bus.publish_message("invoices", &placed(id)).await.unwrap();
    }
    // Three orders run at once under the service's concurrency, one invoice under its own.
    let mut running = Vec::new();
    for _ in 0..4 {
        running.push(recv(&mut started).await.0);
    }
    running.sort_unstable();
    assert_eq!(running, ["invoices", "orders", "orders", "orders"]);
    assert!(
        timeout(Duration::from_millis(300), started.recv())
            .await
            .is_err(),
        "a second invoice started while the first ran"
    );
    // Each released invoice lets the next one start.
    invoices.add_permits(1);
    assert_eq!(recv(&mut started).await.0, "invoices");
    invoices.add_permits(1);
    assert_eq!(recv(&mut started).await.0, "invoices");
    invoices.add_permits(1);
    orders.add_permits(3);

    let report = service.stop().await;
    for topic in ["orders", "invoices"] {
        let counts = report
            .subscription(topic)
            .unwrap()
            .consumer
            .as_ref()
            .unwrap();
        assert_eq!(counts.acked, 3, "{topic}: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_is_set_per_handler() {
    let bus = memory().await;
    let attempts = Arc::new(AtomicU32::new(0));
    let (tx, mut done) = mpsc::unbounded_channel();
    let fail_once = |topic: &'static str| {
        let (attempts, tx) = (attempts.clone(), tx.clone());
        move |_: OrderPlaced, ctx: Context| {
            let (attempts, tx) = (attempts.clone(), tx.clone());
            async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                if ctx.attempt() == 1 {
                    return Err(Error::new(ErrorKind::Handler, "first attempt fails"));
                }
                tx.send(topic).unwrap();
                Ok(())
            }
        }
    };
    let service = Service::new("billing", bus.clone())
        .on("ordered", fail_once("ordered"))
        .on_with(
            "unordered",
            HandlerOptions::new().with_key_order(KeyOrder::Unordered),
            fail_once("unordered"),
        )
        .start()
        .await
        .unwrap();
    for topic in ["ordered", "unordered"] {
        let envelope = Envelope::encode(&placed("o-1")).unwrap().with_key("o-1");
        bus.publish(topic, envelope).await.unwrap();
    }
    let mut finished = vec![recv(&mut done).await, recv(&mut done).await];
    finished.sort_unstable();
    assert_eq!(finished, ["ordered", "unordered"]);

    let report = service.stop().await;
    let counts = |topic| {
        *report
            .subscription(topic)
            .unwrap()
            .consumer
            .as_ref()
            .unwrap()
    };
    let (ordered, unordered) = (counts("ordered"), counts("unordered"));
    assert_eq!(
        (ordered.retried_in_place, ordered.retried),
        (1, 0),
        "{ordered:?}"
    );
    assert_eq!(
        (unordered.retried_in_place, unordered.retried),
        (0, 1),
        "{unordered:?}"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
}

#[tokio::test]
#[should_panic(
    expected = "handlers of topic `orders` in group `billing` set different concurrency limits"
)]
async fn two_handlers_of_one_subscription_with_different_concurrency_panic() {
    let _ = Service::new("billing", memory().await)
        .on_with(
            "orders",
            HandlerOptions::new().with_concurrency(1),
            |_: OrderPlaced, _: Context| async { Ok(()) },
        )
        .on_with(
            "orders",
            HandlerOptions::new().with_concurrency(2),
            |_: OrderCancelled, _: Context| async { Ok(()) },
        );
}

#[tokio::test]
#[should_panic(expected = "queue `jobs` has no consumer groups")]
async fn a_group_on_a_queue_handler_panics() {
    let _ = Service::new("billing", memory().await).on_queue_with(
        "jobs",
        HandlerOptions::new().with_group("other"),
        |_: OrderPlaced, _: Context| async { Ok(()) },
    );
}

/// How many handlers of the `OrderPlaced` messages on `topic` ran at once at most, when each
/// blocks its thread for a while (a handler computing between two `.await`s).
async fn most_at_once(bus: &Bus, topic: &str, options: HandlerOptions) -> u32 {
    let running = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let (now, max) = (running.clone(), most.clone());
    let service = Service::new("billing", bus.clone())
        .with_concurrency(4)
        .on_with(topic, options, move |_: OrderPlaced, _: Context| {
            let (now, max, done) = (now.clone(), max.clone(), done_tx.clone());
            async move {
                let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(at_once, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
                now.fetch_sub(1, Ordering::SeqCst);
                done.send(()).unwrap();
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    for id in ["a", "b", "c", "d"] {
        bus.publish_message(topic, &placed(id)).await.unwrap();
    }
    for _ in 0..4 {
        recv(&mut done).await;
    }
    service.stop().await;
    most.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn task_per_delivery_is_set_per_handler() {
    let bus = memory().await;
    // Polled inside the consumer's task (the default), blocking handlers run one at a time.
    let inline = most_at_once(&bus, "inline", HandlerOptions::new()).await;
    assert_eq!(inline, 1);
    // A task each: they run on the runtime's other workers at the same time.
    let tasks = most_at_once(
        &bus,
        "tasks",
        HandlerOptions::new().with_task_per_delivery(true),
    )
    .await;
    assert!(tasks >= 2, "at most {tasks} handler(s) at once");
}
