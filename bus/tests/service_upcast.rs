//! Old schema versions read through the conversions a service registers, on the in-process
//! broker.

use std::time::Duration;

use bus::{headers, Bus, ConsumeOptions, Context, Envelope, Error, ErrorKind, Message, Service};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

/// Version 3: the total in cents and a currency. Version 2 had `total_cents` only; version 1
/// had `total`, in euros.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    total_cents: u64,
    currency: String,
}
impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
    const SCHEMA_VERSION: u32 = 3;
}

#[derive(Deserialize)]
struct OrderPlacedV1 {
    order_id: String,
    total: f64,
}

/// A message as an old producer wrote it: `payload` with the schema version `version`.
fn written_at(version: u32, payload: serde_json::Value) -> Envelope {
    Envelope::new(OrderPlaced::KIND, payload.to_string())
        .with_header(headers::SCHEMA_VERSION, version.to_string())
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn from_v1(old: OrderPlacedV1) -> bus::Result<OrderPlaced> {
    if old.total < 0.0 {
        return Err(Error::new(ErrorKind::Serialization, "a negative total"));
    }
    Ok(OrderPlaced {
        order_id: old.order_id,
        total_cents: (old.total * 100.0).round() as u64,
        currency: "EUR".into(),
    })
}

/// Version 2 lacked the currency: add it to the JSON.
fn from_v2(mut old: serde_json::Value) -> bus::Result<OrderPlaced> {
    old["currency"] = "EUR".into();
    serde_json::from_value(old).map_err(|e| Error::with_source(ErrorKind::Serialization, "v2", e))
}

async fn billing(
    bus: &Bus,
) -> (
    bus::service::ServiceHandle,
    mpsc::UnboundedReceiver<OrderPlaced>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let service = Service::new("billing", bus.clone())
        .on("orders", move |order: OrderPlaced, _: Context| {
            let tx = tx.clone();
            async move {
                tx.send(order).unwrap();
                Ok(())
            }
        })
        .upcast(1, from_v1)
        .upcast(2, from_v2)
        .start()
        .await
        .unwrap();
    (service, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<OrderPlaced>) -> OrderPlaced {
    timeout(WAIT, rx.recv())
        .await
        .expect("handled in time")
        .unwrap()
}

fn order(id: &str, cents: u64, currency: &str) -> OrderPlaced {
    OrderPlaced {
        order_id: id.into(),
        total_cents: cents,
        currency: currency.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_old_version_reaches_the_handler_as_the_current_type() {
    let bus = bus::connect("memory://").await.unwrap();
    let (service, mut handled) = billing(&bus).await;

    // One key: handled in publish order.
    let v1 = written_at(1, serde_json::json!({"order_id": "o-1", "total": 12.5}));
    let v2 = written_at(
        2,
        serde_json::json!({"order_id": "o-2", "total_cents": 700}),
    );
    let v3 = Envelope::encode(&order("o-3", 900, "CHF")).unwrap();
    for envelope in [v1, v2, v3] {
        bus.publish("orders", envelope.with_key("k")).await.unwrap();
    }
    assert_eq!(next(&mut handled).await, order("o-1", 1_250, "EUR"));
    assert_eq!(next(&mut handled).await, order("o-2", 700, "EUR"));
    assert_eq!(next(&mut handled).await, order("o-3", 900, "CHF"));

    let report = service.stop().await;
    let orders = report.subscription("orders").unwrap();
    assert_eq!((orders.upcast, orders.undecodable), (2, 0), "{report:?}");
    assert_eq!(orders.consumer.as_ref().unwrap().acked, 3);
}

async fn dead_letter(dlq: &mut bus::Subscription) -> Envelope {
    let delivery = timeout(WAIT, dlq.next()).await.unwrap().unwrap().unwrap();
    let envelope = delivery.envelope().clone();
    delivery.ack().await.unwrap();
    envelope
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_conversion_and_a_newer_version_are_dead_lettered_with_the_reason() {
    let bus = bus::connect("memory://").await.unwrap();
    let (service, mut handled) = billing(&bus).await;
    let mut dlq = bus
        .consume(
            &headers::dead_letter_queue("orders"),
            ConsumeOptions::default(),
        )
        .await
        .unwrap();

    let negative = written_at(1, serde_json::json!({"order_id": "o-1", "total": -1.0}));
    bus.publish("orders", negative.clone()).await.unwrap();
    let dead = dead_letter(&mut dlq).await;
    assert_eq!(dead.id, negative.id);
    let reason = dead.header(headers::DLQ_REASON).unwrap();
    assert!(
        reason.contains("upcasting from schema version 1 to 3")
            && reason.contains("a negative total"),
        "{reason}"
    );

    let not_v1 = written_at(1, serde_json::json!({"id": "o-2"}));
    bus.publish("orders", not_v1).await.unwrap();
    let reason = dead_letter(&mut dlq)
        .await
        .header(headers::DLQ_REASON)
        .unwrap()
        .to_owned();
    assert!(reason.contains("missing field `order_id`"), "{reason}");

    let newer = written_at(4, serde_json::json!({"order_id": "o-3"}));
    bus.publish("orders", newer).await.unwrap();
    let reason = dead_letter(&mut dlq)
        .await
        .header(headers::DLQ_REASON)
        .unwrap()
        .to_owned();
    assert!(
        reason.contains("schema version 4, newer than the 3"),
        "{reason}"
    );

    let report = service.stop().await;
    let orders = report.subscription("orders").unwrap();
    assert_eq!((orders.upcast, orders.undecodable), (0, 3), "{report:?}");
    assert!(handled.try_recv().is_err(), "the handler never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_without_a_conversion_is_read_as_the_current_type() {
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Shipped {
        order_id: String,
        #[serde(default)]
        carrier: Option<String>,
    }
    impl Message for Shipped {
        const KIND: &'static str = "order.shipped";
        const SCHEMA_VERSION: u32 = 2;
    }
    let bus = bus::connect("memory://").await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let service = Service::new("tracking", bus.clone())
        .on("shipments", move |shipped: Shipped, _: Context| {
            let tx = tx.clone();
            async move {
                tx.send(shipped).unwrap();
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    let v1 = Envelope::new(Shipped::KIND, r#"{"order_id":"o-1"}"#)
        .with_header(headers::SCHEMA_VERSION, "1");
    bus.publish("shipments", v1).await.unwrap();
    let shipped = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(
        shipped,
        Shipped {
            order_id: "o-1".into(),
            carrier: None
        }
    );
    let report = service.stop().await;
    assert_eq!(report.subscription("shipments").unwrap().upcast, 0);
}

#[test]
#[should_panic(expected = "cannot upcast `order.placed` from schema version 3")]
fn upcasting_from_the_current_version_panics() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let bus = runtime.block_on(bus::connect("memory://")).unwrap();
    let _ = Service::new("billing", bus).upcast(3, |old: OrderPlaced| Ok(old));
}
