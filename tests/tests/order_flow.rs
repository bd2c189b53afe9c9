//! One service flow, unchanged over every configured broker: orders fan out to two consumer
//! groups; billing (consumer runtime + retry + idempotency) fails transiently on some orders,
//! then publishes a payment request caused by each order; a payment service consumes those;
//! an audit group sees every order; a pricing responder answers requests.
//!
//! The memory broker always runs. Each other broker runs when its `BUS_TEST_<BROKER>_URL` is
//! set (scripts/test.sh sets them); with `BUS_REQUIRE_BROKERS=1` a missing URL fails the test.

use bus_core::conformance::broker_url;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::middleware::idempotency::{IdempotencyLayer, MemoryStore};
use bus::middleware::{RetryLayer, RetryPolicy};
use bus::runtime::{handler_fn, Consumer, DeliveryInfo, HandlerBuilder};
use bus::{Bus, Envelope, Error, ErrorKind, Message, MessageId, ServeOptions, SubscribeOptions};
use serde::{Deserialize, Serialize};

const ORDERS: u32 = 20;
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    number: u32,
    customer: String,
}

impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
}

#[derive(Debug, Serialize, Deserialize)]
struct PaymentRequested {
    order: u32,
}

impl Message for PaymentRequested {
    const KIND: &'static str = "payment.requested";
}

/// Waits until `done` holds, checking each time `changed` is notified.
async fn until(changed: &tokio::sync::Notify, what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a notification in between is not missed.
            notified.as_mut().enable();
            if done() {
                return;
            }
            notified.await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[derive(Default)]
struct Observed {
    billing_runs: HashMap<u32, u32>,
    billed: Vec<u32>,
    audited: HashSet<u32>,
    payments: HashMap<u32, (MessageId, Option<MessageId>)>,
}

async fn order_flow(bus: Bus) {
    let run = MessageId::new().to_string().replace('-', "");
    let orders_topic = format!("scenario.orders.{run}");
    let payments_topic = format!("scenario.payments.{run}");
    let quotes_topic = format!("scenario.quotes.{run}");

    let observed = Arc::new(Mutex::new(Observed::default()));
    let changed = Arc::new(tokio::sync::Notify::new());

    // Billing: fails transiently on the first run of every 5th order, then publishes a payment
    // request caused by the order. Retries and idempotency come from the middleware.
    let billing = {
        let (bus, observed, changed, payments_topic) = (
            bus.clone(),
            observed.clone(),
            changed.clone(),
            payments_topic.clone(),
        );
        handler_fn(move |envelope: Envelope, _: DeliveryInfo| {
            let (bus, observed, changed, payments_topic) = (
                bus.clone(),
                observed.clone(),
                changed.clone(),
                payments_topic.clone(),
            );
            async move {
                let order: OrderPlaced = envelope.decode()?;
                let runs = {
                    let mut seen = observed.lock().unwrap();
                    let runs = seen.billing_runs.entry(order.number).or_default();
                    *runs += 1;
                    *runs
                };
                changed.notify_waiters();
                if order.number % 5 == 0 && runs == 1 {
                    return Err(Error::new(ErrorKind::Timeout, "card processor timed out"));
                }
                let payment = Envelope::encode(&PaymentRequested {
                    order: order.number,
                })?
                .caused_by(&envelope);
                let payment = match &envelope.key {
                    Some(key) => payment.with_key(key.clone()),
                    None => payment,
                };
                bus.publish(&payments_topic, payment).await?;
                observed.lock().unwrap().billed.push(order.number);
                changed.notify_waiters();
                Ok::<_, Error>(())
            }
        })
    };
    let billing = HandlerBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .layer(RetryLayer::new(
            RetryPolicy::new()
                .with_immediate_retries(0, Duration::ZERO)
                .with_backoff(Duration::from_millis(50), 2.0, Duration::from_millis(500)),
        ))
        .handler(billing);

    let audit = {
        let (observed, changed) = (observed.clone(), changed.clone());
        handler_fn(move |envelope: Envelope, _: DeliveryInfo| {
            let (observed, changed) = (observed.clone(), changed.clone());
            async move {
                let order: OrderPlaced = envelope.decode()?;
                observed.lock().unwrap().audited.insert(order.number);
                changed.notify_waiters();
                Ok::<_, Error>(())
            }
        })
    };
    let payments = {
        let (observed, changed) = (observed.clone(), changed.clone());
        handler_fn(move |envelope: Envelope, _: DeliveryInfo| {
            let (observed, changed) = (observed.clone(), changed.clone());
            async move {
                let payment: PaymentRequested = envelope.decode()?;
                observed.lock().unwrap().payments.insert(
                    payment.order,
                    (
                        envelope.correlation_id.clone(),
                        envelope.causation_id.clone(),
                    ),
                );
                changed.notify_waiters();
                Ok::<_, Error>(())
            }
        })
    };

    let sub = |topic: &str, group: &str| {
        let (bus, topic, group) = (bus.clone(), topic.to_owned(), group.to_owned());
        async move {
            bus.subscribe(&topic, SubscribeOptions::group(group))
                .await
                .expect("subscribe")
        }
    };
    let billing = Consumer::new(sub(&orders_topic, "billing").await, billing)
        .with_concurrency(8)
        .spawn();
    let audit = Consumer::new(sub(&orders_topic, "audit").await, audit).spawn();
    let payments = Consumer::new(sub(&payments_topic, "payments").await, payments).spawn();

    let mut requests = bus
        .serve(&quotes_topic, ServeOptions::default())
        .await
        .expect("serve quotes");
    let pricing = tokio::spawn(async move {
        while let Some(Ok(request)) = requests.next().await {
            let asked = request.envelope().payload.clone();
            let quote = Envelope::new(
                "quote",
                format!("price of {}", String::from_utf8_lossy(&asked)),
            );
            if request.reply(quote).await.is_err() {
                break;
            }
        }
    });

    let mut order_ids = HashMap::new();
    for number in 0..ORDERS {
        let order = OrderPlaced {
            number,
            customer: format!("customer-{}", number % 4),
        };
        let envelope = Envelope::encode(&order)
            .unwrap()
            .with_key(order.customer.clone());
        order_ids.insert(number, envelope.id.clone());
        bus.publish(&orders_topic, envelope)
            .await
            .expect("publish order");
    }

    until(&changed, "every payment request", || {
        observed.lock().unwrap().payments.len() == ORDERS as usize
    })
    .await;
    until(&changed, "the audit group to see every order", || {
        observed.lock().unwrap().audited.len() == ORDERS as usize
    })
    .await;

    let reply = bus
        .request(
            &quotes_topic,
            Envelope::new("quote.request", "sku-1"),
            Duration::from_secs(10),
        )
        .await
        .expect("a quote");
    assert_eq!(&reply.payload[..], b"price of sku-1");

    for consumer in [billing, audit, payments] {
        consumer.stop().await.expect("consumer stops cleanly");
    }
    pricing.abort();
    bus.close().await.expect("close");

    let seen = observed.lock().unwrap();
    let mut billed = seen.billed.clone();
    billed.sort_unstable();
    billed.dedup();
    assert_eq!(
        billed.len(),
        seen.billed.len(),
        "an order was billed twice: {:?}",
        seen.billed
    );
    assert_eq!(billed, (0..ORDERS).collect::<Vec<_>>());
    for number in (0..ORDERS).filter(|n| n % 5 == 0) {
        assert!(
            seen.billing_runs[&number] >= 2,
            "order {number} was retried after its transient failure"
        );
    }
    for (number, (correlation, causation)) in &seen.payments {
        let order_id = &order_ids[number];
        assert_eq!(
            correlation, order_id,
            "payment {number} keeps the conversation"
        );
        assert_eq!(
            causation.as_ref(),
            Some(order_id),
            "payment {number} names its cause"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_flow_on_memory() {
    order_flow(bus::connect("memory://").await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_flow_on_nats() {
    if let Some(url) = broker_url("BUS_TEST_NATS_URL") {
        order_flow(bus::connect(&url).await.expect("connect to NATS")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_flow_on_rabbitmq() {
    if let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") {
        order_flow(bus::connect(&url).await.expect("connect to RabbitMQ")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_flow_on_kafka() {
    if let Some(url) = broker_url("BUS_TEST_KAFKA_URL") {
        order_flow(bus::connect(&url).await.expect("connect to Kafka")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_flow_on_sqs() {
    if let Some(url) = broker_url("BUS_TEST_SQS_URL") {
        order_flow(bus::connect(&url).await.expect("connect to SQS")).await;
    }
}
