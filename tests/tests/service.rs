//! The service layer (`bus::Service`) over every configured broker: two services chained by
//! events keep the conversation (correlation id, causation ids, trace context) across both
//! hops, and a service answers requests, with its handler's errors reaching the requester.
//!
//! - `orders` handles `PlaceOrder` from a work queue and publishes `OrderPlaced`;
//!   `payments` handles `OrderPlaced` and publishes `PaymentTaken`. An observer group reads
//!   both topics and checks every id, with no tracing code in the handlers.
//! - `pricing` answers `GetQuote` with a `Quote` (or an error reply for an unknown SKU) on
//!   every broker whose `Capabilities::request_reply` is supported, asked from outside and
//!   from the handler of another service (`ctx.request`).
//!
//! The memory broker always runs. Each other broker runs when its `BUS_TEST_<BROKER>_URL` is
//! set (scripts/test.sh sets them); with `BUS_REQUIRE_BROKERS=1` a missing URL fails the test.

use bus_core::conformance::broker_url;
use std::time::Duration;

use bus::service::{decode_reply, Context, SubscriptionReport};
use bus::{
    headers, Bus, Delivery, Envelope, Error, ErrorKind, Message, MessageId, Service,
    SubscribeOptions, Subscription, Support,
};
use serde::{Deserialize, Serialize};

const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
struct PlaceOrder {
    order_id: String,
    cents: u64,
}

impl Message for PlaceOrder {
    const KIND: &'static str = "order.place";
}

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    cents: u64,
}

impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
}

#[derive(Debug, Serialize, Deserialize)]
struct PaymentTaken {
    order_id: String,
    cents: u64,
}

impl Message for PaymentTaken {
    const KIND: &'static str = "payment.taken";
}

#[derive(Debug, Serialize, Deserialize)]
struct GetQuote {
    sku: String,
    quantity: u64,
}

impl Message for GetQuote {
    const KIND: &'static str = "quote.get";
}

#[derive(Debug, Serialize, Deserialize)]
struct Quote {
    sku: String,
    cents: u64,
}

impl Message for Quote {
    const KIND: &'static str = "quote";
}

#[derive(Debug, Serialize, Deserialize)]
struct CartCheckedOut {
    sku: String,
    quantity: u64,
}

impl Message for CartCheckedOut {
    const KIND: &'static str = "cart.checked_out";
}

#[derive(Debug, Serialize, Deserialize)]
struct OrderPriced {
    cents: u64,
}

impl Message for OrderPriced {
    const KIND: &'static str = "order.priced";
}

/// A name no earlier run used, so that a durable broker holds nothing left over.
fn unique(what: &str) -> String {
    let run = MessageId::new().to_string().replace('-', "");
    format!("scenario.service.{what}.{run}")
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
fn trace_id(envelope: &Envelope) -> Option<&str> {
    envelope.header(headers::TRACEPARENT)?.split('-').nth(1)
}

/// The first delivery of `kind` on `subscription` (acking every delivery).
async fn next_of_kind(subscription: &mut Subscription, kind: &str) -> Envelope {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let delivery: Delivery = subscription
                .next()
                .await
                .expect("the subscription stays open")
                .expect("receive");
            let envelope = delivery.envelope().clone();
            delivery.ack().await.expect("ack");
            if envelope.kind == kind {
                return envelope;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for a `{kind}` message"))
}

/// `orders`' handler: the handled command's ids and trace context go onto the event by
/// `ctx.publish` alone.
async fn place_order(order: PlaceOrder, ctx: Context, orders_topic: String) -> bus::Result<()> {
    let placed = OrderPlaced {
        order_id: order.order_id,
        cents: order.cents,
    };
    ctx.publish(&orders_topic, &placed).await?;
    Ok(())
}

/// `payments`' handler.
async fn take_payment(order: OrderPlaced, ctx: Context, payments_topic: String) -> bus::Result<()> {
    let taken = PaymentTaken {
        order_id: order.order_id,
        cents: order.cents,
    };
    ctx.publish(&payments_topic, &taken).await?;
    Ok(())
}

async fn causation_across_two_services(bus: Bus) {
    let commands = unique("commands");
    let orders_topic = unique("orders");
    let payments_topic = unique("payments");

    // The observer subscribes first: a group gets what is published after it subscribed.
    let mut orders_seen = bus
        .subscribe(&orders_topic, SubscribeOptions::group("observer"))
        .await
        .expect("subscribe to orders");
    let mut payments_seen = bus
        .subscribe(&payments_topic, SubscribeOptions::group("observer"))
        .await
        .expect("subscribe to payments");

    // Topic names are unique per run, so the handlers take them from the test.
    let orders = {
        let orders_topic = orders_topic.clone();
        Service::new("orders", bus.clone())
            .on_queue(&commands, move |order: PlaceOrder, ctx: Context| {
                place_order(order, ctx, orders_topic.clone())
            })
            .start()
            .await
            .expect("orders starts")
    };
    let payments = {
        let payments_topic = payments_topic.clone();
        Service::new("payments", bus.clone())
            .on(&orders_topic, move |order: OrderPlaced, ctx: Context| {
                take_payment(order, ctx, payments_topic.clone())
            })
            .start()
            .await
            .expect("payments starts")
    };

    let trace = MessageId::new().to_string().replace('-', "");
    let command = Envelope::encode(&PlaceOrder {
        order_id: "o-1".into(),
        cents: 4_200,
    })
    .unwrap()
    .with_header(
        headers::TRACEPARENT,
        format!("00-{trace}-00f067aa0ba902b7-01"),
    );
    bus.send(&commands, command.clone()).await.expect("send");

    let placed = next_of_kind(&mut orders_seen, OrderPlaced::KIND).await;
    let paid = next_of_kind(&mut payments_seen, PaymentTaken::KIND).await;

    let order: OrderPlaced = placed.decode().unwrap();
    let payment: PaymentTaken = paid.decode().unwrap();
    assert_eq!((order.order_id.as_str(), order.cents), ("o-1", 4_200));
    assert_eq!((payment.order_id.as_str(), payment.cents), ("o-1", 4_200));

    assert_eq!(
        placed.correlation_id, command.correlation_id,
        "OrderPlaced keeps the command's correlation id"
    );
    assert_eq!(
        paid.correlation_id, command.correlation_id,
        "PaymentTaken keeps the command's correlation id, two hops on"
    );
    assert_eq!(
        placed.causation_id.as_ref(),
        Some(&command.id),
        "OrderPlaced is caused by PlaceOrder"
    );
    assert_eq!(
        paid.causation_id.as_ref(),
        Some(&placed.id),
        "PaymentTaken is caused by OrderPlaced"
    );
    assert_eq!(trace_id(&placed), Some(trace.as_str()), "first hop's trace");
    assert_eq!(trace_id(&paid), Some(trace.as_str()), "second hop's trace");

    let orders = orders.stop().await;
    let payments = payments.stop().await;
    let acked = |report: Option<&SubscriptionReport>| {
        report
            .and_then(|s| s.consumer.as_ref().ok())
            .map(|c| c.acked)
    };
    assert_eq!(acked(orders.queue(&commands)), Some(1), "{orders:?}");
    assert_eq!(
        acked(payments.subscription(&orders_topic)),
        Some(1),
        "{payments:?}"
    );
    orders_seen.close().await.expect("close");
    payments_seen.close().await.expect("close");
    bus.close().await.expect("close");
}

async fn quote(ask: GetQuote, _ctx: Context) -> bus::Result<Quote> {
    match ask.sku.as_str() {
        "sku-apple" => Ok(Quote {
            cents: 120 * ask.quantity,
            sku: ask.sku,
        }),
        other => Err(Error::new(
            ErrorKind::NotFound,
            format!("no price for `{other}`"),
        )),
    }
}

async fn request_reply_through_a_service(bus: Bus) {
    if let Support::Unsupported(why) = bus.capabilities().request_reply {
        println!(
            "skipped: {} does not support request-reply: {why}",
            bus.capabilities().name
        );
        return;
    }
    let quotes = unique("quotes");
    let pricing = Service::new("pricing", bus.clone())
        .on_request(&quotes, quote)
        .start()
        .await
        .expect("pricing starts");

    let ask = Envelope::encode(&GetQuote {
        sku: "sku-apple".into(),
        quantity: 3,
    })
    .unwrap();
    let reply = bus
        .request(&quotes, ask.clone(), DEADLINE)
        .await
        .expect("a reply");
    let answer: Quote = decode_reply(&reply).expect("a quote");
    assert_eq!((answer.sku.as_str(), answer.cents), ("sku-apple", 360));
    assert_eq!(reply.correlation_id, ask.correlation_id);
    assert_eq!(
        reply.causation_id.as_ref(),
        Some(&ask.id),
        "caused by the request"
    );

    // The handler's error comes back as an error of its kind, at once (no timeout).
    let unknown = Envelope::encode(&GetQuote {
        sku: "sku-durian".into(),
        quantity: 1,
    })
    .unwrap();
    let reply = bus
        .request(&quotes, unknown, DEADLINE)
        .await
        .expect("an error reply");
    let error = decode_reply::<Quote>(&reply).expect_err("the handler failed");
    assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
    assert!(error.to_string().contains("sku-durian"), "{error}");

    // A handler asking another service: `ctx.request` keeps the conversation as publishing
    // does, and the reply comes back to the right requester.
    let carts = unique("carts");
    let priced_topic = unique("priced");
    let mut priced_seen = bus
        .subscribe(&priced_topic, SubscribeOptions::group("observer"))
        .await
        .expect("subscribe to priced orders");
    let checkout = {
        let (quotes, priced_topic) = (quotes.clone(), priced_topic.clone());
        Service::new("checkout", bus.clone())
            .on(&carts, move |cart: CartCheckedOut, ctx: Context| {
                let (quotes, priced_topic) = (quotes.clone(), priced_topic.clone());
                async move {
                    let ask = GetQuote {
                        sku: cart.sku,
                        quantity: cart.quantity,
                    };
                    let quote: Quote = ctx.request(&quotes, &ask, DEADLINE).await?;
                    ctx.publish(&priced_topic, &OrderPriced { cents: quote.cents })
                        .await?;
                    Ok(())
                }
            })
            .start()
            .await
            .expect("checkout starts")
    };
    let cart = Envelope::encode(&CartCheckedOut {
        sku: "sku-apple".into(),
        quantity: 2,
    })
    .unwrap();
    bus.publish(&carts, cart.clone()).await.expect("publish");
    let priced = next_of_kind(&mut priced_seen, OrderPriced::KIND).await;
    assert_eq!(priced.decode::<OrderPriced>().unwrap().cents, 240);
    assert_eq!(priced.correlation_id, cart.correlation_id);
    assert_eq!(priced.causation_id.as_ref(), Some(&cart.id));
    let checkout = checkout.stop().await;
    assert!(checkout.is_clean(), "{checkout:?}");
    priced_seen.close().await.expect("close");

    let report = pricing.stop().await;
    let served = report
        .responder(&quotes)
        .and_then(|s| s.consumer.as_ref().ok())
        .map(|c| c.acked + c.rejected);
    assert_eq!(served, Some(3), "{report:?}");
    bus.close().await.expect("close");
}

async fn connect(var: Option<&str>) -> Option<Bus> {
    let url = match var {
        None => "memory://".to_owned(),
        Some(var) => broker_url(var)?,
    };
    Some(
        bus::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}")),
    )
}

macro_rules! on_every_broker {
    ($($name:ident: $scenario:ident on $var:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            if let Some(bus) = connect($var).await {
                $scenario(bus).await;
            }
        }
    )*};
}

on_every_broker! {
    causation_across_two_services_on_memory: causation_across_two_services on None;
    causation_across_two_services_on_nats: causation_across_two_services on Some("BUS_TEST_NATS_URL");
    causation_across_two_services_on_rabbitmq: causation_across_two_services on Some("BUS_TEST_RABBITMQ_URL");
    causation_across_two_services_on_kafka: causation_across_two_services on Some("BUS_TEST_KAFKA_URL");
    causation_across_two_services_on_sqs: causation_across_two_services on Some("BUS_TEST_SQS_URL");
    request_reply_through_a_service_on_memory: request_reply_through_a_service on None;
    request_reply_through_a_service_on_nats: request_reply_through_a_service on Some("BUS_TEST_NATS_URL");
    request_reply_through_a_service_on_rabbitmq: request_reply_through_a_service on Some("BUS_TEST_RABBITMQ_URL");
    request_reply_through_a_service_on_kafka: request_reply_through_a_service on Some("BUS_TEST_KAFKA_URL");
    request_reply_through_a_service_on_sqs: request_reply_through_a_service on Some("BUS_TEST_SQS_URL");
}
