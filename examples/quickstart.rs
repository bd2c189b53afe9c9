//! Quickstart: two services handling typed events in their own consumer groups, and a third
//! answering requests, written with the service API (`bus::Service`).
//!
//! The program connects to the broker named by `BUS_URL` (the in-process `memory://` broker
//! when it is unset) and starts two services on the `orders.placed` topic, `billing` and
//! `shipping`: each is a name (its consumer group) and an async handler per message type,
//! `async fn(OrderPlaced, Context) -> bus::Result<()>`, which receives the message decoded and
//! whose result settles it (`Ok` acknowledges). It publishes a few `OrderPlaced` events keyed
//! by order id and checks that each group handled every one. Then a `pricing` service answers
//! `pricing.quote` requests with a handler from `QuoteRequest` to `Quote`, and the program asks
//! it for quotes with a timeout. It prints each step, stops the services gracefully, closes
//! the bus, and exits non-zero with a message if anything it expected did not happen.
//!
//! ```text
//! cargo run -p examples --example quickstart
//! BUS_URL=nats://127.0.0.1:4222 cargo run -p examples --example quickstart --features nats
//! ```
//!
//! With `--asyncapi <dir>` the program writes the AsyncAPI 3.0 document of each service
//! (`quickstart.billing.json`, `quickstart.shipping.json`, `quickstart.pricing.json`, built by
//! the same functions that build the services below) into `<dir>` and exits;
//! `scripts/asyncapi.sh` validates them with the official AsyncAPI parser.
//!
//! The services start before anything is published: a consumer group receives what is
//! published after it first subscribed, and `Service::start` subscribes before it returns.
//! Receiving, decoding, concurrency, acknowledging and replying are the service's; the
//! lower-level API under it (`Bus::subscribe`, `bus::runtime::Consumer`) stays for what the
//! service API does not cover (`examples/retry_dlq.rs` uses it).

use std::collections::HashSet;
use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use bus::{Bus, BusConfig, Context, Envelope, Message, MessageId, Service};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

const ORDERS: &str = "orders.placed";
const QUOTES: &str = "pricing.quote";

/// How long each consumer group may take to receive every order.
const CONSUME_DEADLINE: Duration = Duration::from_secs(10);
/// How long a requester waits for a quote.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An event: a customer placed an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
struct OrderPlaced {
    order_id: String,
    customer: String,
    total_cents: u64,
}

impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
}

/// A request: what would this many of that item cost?
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
struct QuoteRequest {
    sku: String,
    quantity: u32,
}

impl Message for QuoteRequest {
    const KIND: &'static str = "pricing.quote.requested";
}

/// The reply to a [`QuoteRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
struct Quote {
    sku: String,
    quantity: u32,
    unit_price_cents: u64,
    total_cents: u64,
}

impl Message for Quote {
    const KIND: &'static str = "pricing.quote";
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("quickstart failed: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn Error + Send + Sync>> {
    let config = BusConfig::from_env()?;
    println!("connecting to {}", config.redacted_url());
    let bus = config.connect().await?;
    if let Some(dir) = examples::asyncapi_dir()? {
        let (handled, _) = mpsc::unbounded_channel();
        let services = [
            billing(&bus, handled.clone()),
            shipping(&bus, handled),
            pricing(&bus),
        ];
        for service in &services {
            examples::write_asyncapi(&dir, "quickstart", service, &config.url)?;
        }
        return Ok(bus.close().await?);
    }
    let caps = bus.capabilities();
    println!(
        "connected: {} broker (durable: {}, request-reply: {})",
        caps.name, caps.durable, caps.request_reply
    );

    fan_out_to_two_groups(&bus).await?;
    request_reply(&bus).await?;

    bus.close().await?;
    println!("closed the bus; all done");
    Ok(())
}

/// What a handler tells `main` it handled: the group and the message id.
type Handled = mpsc::UnboundedSender<(&'static str, MessageId)>;

/// The billing service's handler: called once per `OrderPlaced`, already decoded. `Ok`
/// acknowledges the message; an error would retry it, or dead-letter it if it can never
/// succeed. `ctx` knows the delivery (attempt, envelope, group) and publishes follow-ups.
async fn bill(order: OrderPlaced, ctx: Context, handled: Handled) -> bus::Result<()> {
    println!(
        "  [billing] {} for {}: {} cents (attempt {})",
        order.order_id,
        order.customer,
        order.total_cents,
        ctx.attempt()
    );
    let _ = handled.send(("billing", ctx.envelope().id.clone()));
    Ok(())
}

/// The shipping service's handler, the same shape.
async fn ship(order: OrderPlaced, ctx: Context, handled: Handled) -> bus::Result<()> {
    println!("  [shipping] {} for {}", order.order_id, order.customer);
    let _ = handled.send(("shipping", ctx.envelope().id.clone()));
    Ok(())
}

/// The pricing service's request handler: a `QuoteRequest` in, a `Quote` out, sent back as
/// the reply (an error would reach the requester as an error reply).
async fn quote(ask: QuoteRequest, _ctx: Context) -> bus::Result<Quote> {
    let unit_price_cents = price_of(&ask.sku);
    println!("  [pricing] quoting {} x {}", ask.quantity, ask.sku);
    Ok(Quote {
        total_cents: unit_price_cents * u64::from(ask.quantity),
        unit_price_cents,
        quantity: ask.quantity,
        sku: ask.sku,
    })
}

/// The billing service: a name (its consumer group) and a handler per message type.
/// `with_schema` puts the type's JSON Schema in the service's AsyncAPI document.
fn billing(bus: &Bus, handled: Handled) -> Service {
    Service::new("billing", bus.clone())
        .on(ORDERS, move |order, ctx| bill(order, ctx, handled.clone()))
        .with_schema::<OrderPlaced>()
}

/// The shipping service, another consumer group on the same topic.
fn shipping(bus: &Bus, handled: Handled) -> Service {
    Service::new("shipping", bus.clone())
        .on(ORDERS, move |order, ctx| ship(order, ctx, handled.clone()))
        .with_schema::<OrderPlaced>()
}

/// The pricing service, answering quote requests.
fn pricing(bus: &Bus) -> Service {
    Service::new("pricing", bus.clone())
        .on_request(QUOTES, quote)
        .with_schema::<QuoteRequest>()
        .with_schema::<Quote>()
}

/// Runs two services on the orders topic, publishes orders and checks that both groups,
/// billing and shipping, handle all of them.
async fn fan_out_to_two_groups(bus: &Bus) -> Result<(), Box<dyn Error + Send + Sync>> {
    let (handled, mut handled_rx) = mpsc::unbounded_channel();
    // `start` subscribes before it returns.
    let billing = billing(bus, handled.clone()).start().await?;
    let shipping = shipping(bus, handled).start().await?;
    println!("services billing and shipping are consuming {ORDERS}");

    let orders = [
        ("alice", 4_200),
        ("bob", 1_999),
        ("carol", 15_000),
        ("dave", 350),
        ("erin", 8_075),
    ];
    let mut published = HashSet::new();
    for (n, (customer, total_cents)) in orders.into_iter().enumerate() {
        let order = OrderPlaced {
            order_id: format!("order-{}", n + 1),
            customer: customer.to_owned(),
            total_cents,
        };
        // The key keeps all events of one order in order, on brokers that partition.
        let envelope = Envelope::encode(&order)?.with_key(order.order_id.clone());
        published.insert(envelope.id.clone());
        bus.publish(ORDERS, envelope).await?;
        println!(
            "published {} {} for {} ({} cents)",
            OrderPlaced::KIND,
            order.order_id,
            order.customer,
            order.total_cents
        );
    }

    // Wait until each group handled every order of this run. Delivery is at least once (a
    // redelivery may come twice), and a durable broker may hold orders of an earlier run:
    // the sets count each of this run's orders once.
    let mut billed = HashSet::new();
    let mut shipped = HashSet::new();
    let deadline = Instant::now() + CONSUME_DEADLINE;
    while billed.len() < published.len() || shipped.len() < published.len() {
        let Ok(Some((group, id))) = timeout_at(deadline, handled_rx.recv()).await else {
            return Err(format!(
                "after {CONSUME_DEADLINE:?}: billing handled {}, shipping {} of the {} orders",
                billed.len(),
                shipped.len(),
                published.len()
            )
            .into());
        };
        let handled_by = if group == "billing" {
            &mut billed
        } else {
            &mut shipped
        };
        if published.contains(&id) {
            handled_by.insert(id);
        }
    }
    println!(
        "billing and shipping each handled all {} orders",
        published.len()
    );

    // Graceful stop: no more receiving, running handlers finish, their messages are settled.
    for service in [billing, shipping] {
        let report = service.stop().await;
        if !report.is_clean() {
            return Err(format!("{} stopped with an error: {report:?}", report.service).into());
        }
    }
    Ok(())
}

/// Runs a pricing service answering `pricing.quote`, and asks it for a few quotes.
async fn request_reply(bus: &Bus) -> Result<(), Box<dyn Error + Send + Sync>> {
    let pricing = pricing(bus).start().await?;
    println!("service pricing is answering {QUOTES}");

    let asks = [("sku-apple", 3), ("sku-pear", 12), ("sku-fig", 1)];
    for (sku, quantity) in asks {
        let ask = QuoteRequest {
            sku: sku.to_owned(),
            quantity,
        };
        let quote: Quote = bus.request_message(QUOTES, &ask, REQUEST_TIMEOUT).await?;
        if quote.sku != ask.sku || quote.total_cents != quote.unit_price_cents * u64::from(quantity)
        {
            return Err(format!("wrong quote for {quantity} x {sku}: {quote:?}").into());
        }
        println!(
            "quote for {quantity} x {sku}: {} cents ({} each)",
            quote.total_cents, quote.unit_price_cents
        );
    }

    // Stop the responder, and check it answered every request.
    let report = pricing.stop().await;
    let served = match report.responder(QUOTES).map(|r| &r.consumer) {
        Some(Ok(consumer)) => consumer.acked,
        other => return Err(format!("pricing stopped with {other:?}").into()),
    };
    if served != asks.len() as u64 {
        return Err(format!(
            "the responder served {served} requests, expected {}",
            asks.len()
        )
        .into());
    }
    println!("pricing served {served} requests and stopped");
    Ok(())
}

/// A made-up price list.
fn price_of(sku: &str) -> u64 {
    sku.bytes().map(u64::from).sum::<u64>() % 500 + 100
}
