//! Quickstart: typed events fanned out to two consumer groups, then a request-reply.
//!
//! The program connects to the broker named by `BUS_URL` (the in-process `memory://` broker
//! when it is unset), publishes a few `OrderPlaced` events keyed by order id, consumes them
//! concurrently in two groups, `billing` and `shipping`, and checks that each group got every
//! one. Then a responder task serves `pricing.quote` while the main task asks it for quotes
//! with a timeout. It prints each step, closes the bus, and exits non-zero with a message if
//! anything it expected did not happen.
//!
//! ```text
//! cargo run -p examples --example quickstart
//! BUS_URL=nats://127.0.0.1:4222 cargo run -p examples --example quickstart --features nats
//! ```
//!
//! Subscriptions are opened before publishing: a consumer group receives what is published
//! after it first subscribed. Each delivery is acknowledged once handled; one dropped without
//! a settlement would be delivered again.

use std::collections::HashSet;
use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use bus::{
    Bus, BusConfig, Envelope, Message, MessageId, ServeOptions, SubscribeOptions, Subscription,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::{timeout_at, Instant};

const ORDERS: &str = "orders.placed";
const QUOTES: &str = "pricing.quote";

/// How long each consumer group may take to receive every order.
const CONSUME_DEADLINE: Duration = Duration::from_secs(10);
/// How long a requester waits for a quote.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An event: a customer placed an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    customer: String,
    total_cents: u64,
}

impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
}

/// A request: what would this many of that item cost?
#[derive(Debug, Clone, Serialize, Deserialize)]
struct QuoteRequest {
    sku: String,
    quantity: u32,
}

impl Message for QuoteRequest {
    const KIND: &'static str = "pricing.quote.requested";
}

/// The reply to a [`QuoteRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// Publishes orders and checks that both the billing and the shipping group get all of them.
async fn fan_out_to_two_groups(bus: &Bus) -> Result<(), Box<dyn Error + Send + Sync>> {
    let billing = bus
        .subscribe(ORDERS, SubscribeOptions::group("billing"))
        .await?;
    let shipping = bus
        .subscribe(ORDERS, SubscribeOptions::group("shipping"))
        .await?;
    println!("subscribed to {ORDERS} as groups billing and shipping");

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

    // Both groups consume at the same time, each on its own task.
    let deadline = Instant::now() + CONSUME_DEADLINE;
    let billing = tokio::spawn(consume_all("billing", billing, published.clone(), deadline));
    let shipping = tokio::spawn(consume_all(
        "shipping",
        shipping,
        published.clone(),
        deadline,
    ));
    let billed = billing.await??;
    let shipped = shipping.await??;

    for (group, received) in [("billing", &billed), ("shipping", &shipped)] {
        if received.len() != published.len() {
            return Err(format!(
                "{group} received {} of the {} orders published",
                received.len(),
                published.len()
            )
            .into());
        }
        println!("{group} received all {} orders", received.len());
    }
    Ok(())
}

/// Receives from `subscription` until every id in `published` has arrived, acknowledging each
/// delivery; fails if that takes past `deadline`.
async fn consume_all(
    group: &'static str,
    mut subscription: Subscription,
    published: HashSet<MessageId>,
    deadline: Instant,
) -> bus::Result<Vec<OrderPlaced>> {
    let mut expected = published.clone();
    let mut received = Vec::new();
    while !expected.is_empty() {
        let delivery = match timeout_at(deadline, subscription.next()).await {
            Err(_elapsed) => {
                return Err(bus::Error::timeout(format!(
                    "{group}: {} order(s) still missing after {CONSUME_DEADLINE:?}",
                    expected.len()
                )))
            }
            Ok(None) => {
                return Err(bus::Error::closed(format!(
                    "{group}: the subscription ended with {} order(s) missing",
                    expected.len()
                )))
            }
            // A receive error leaves the subscription usable (e.g. while reconnecting).
            Ok(Some(Err(error))) => {
                eprintln!("{group}: receive failed, retrying: {error}");
                continue;
            }
            Ok(Some(Ok(delivery))) => delivery,
        };

        let id = delivery.envelope().id.clone();
        if !expected.remove(&id) {
            if published.contains(&id) {
                // Delivery is at least once: a redelivered message may arrive twice.
                println!("  [{group}] {id} again (a redelivery), already handled");
            } else {
                // On a durable broker the group may hold events left over from an earlier run.
                println!("  [{group}] skipping {id}, not published by this run");
            }
            delivery.ack().await?;
            continue;
        }
        match delivery.envelope().decode::<OrderPlaced>() {
            Ok(order) => {
                println!(
                    "  [{group}] {} for {}: {} cents (attempt {})",
                    order.order_id,
                    order.customer,
                    order.total_cents,
                    delivery.attempt()
                );
                delivery.ack().await?;
                received.push(order);
            }
            Err(error) => {
                // A message that can never be read goes to the dead-letter queue.
                let reason = error.to_string();
                delivery.reject(reason.clone()).await?;
                return Err(bus::Error::new(
                    error.kind(),
                    format!("{group}: could not read order {id}: {reason}"),
                ));
            }
        }
    }
    subscription.close().await?;
    Ok(received)
}

/// Serves `pricing.quote` on a task and asks it for a few quotes.
async fn request_reply(bus: &Bus) -> Result<(), Box<dyn Error + Send + Sync>> {
    // Serve before the first request is sent, so that it finds a responder.
    let requests = bus.serve(QUOTES, ServeOptions::default()).await?;
    let (stop, stopped) = oneshot::channel();
    let responder = tokio::spawn(serve_quotes(requests, stopped));
    println!("serving {QUOTES}");

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

    // Ask the responder to stop, and check it answered every request.
    let _ = stop.send(());
    let served = responder.await??;
    if served != asks.len() {
        return Err(format!(
            "the responder served {served} requests, expected {}",
            asks.len()
        )
        .into());
    }
    println!("responder served {served} requests and stopped");
    Ok(())
}

/// Answers quote requests until told to stop; returns how many it answered.
async fn serve_quotes(
    mut requests: bus::Requests,
    mut stop: oneshot::Receiver<()>,
) -> bus::Result<usize> {
    let mut served = 0;
    loop {
        let request = tokio::select! {
            _ = &mut stop => break,
            next = requests.next() => match next {
                Some(request) => request?,
                None => break,
            },
        };
        let ask: QuoteRequest = request.envelope().decode()?;
        let unit_price_cents = price_of(&ask.sku);
        let quote = Quote {
            total_cents: unit_price_cents * u64::from(ask.quantity),
            unit_price_cents,
            quantity: ask.quantity,
            sku: ask.sku,
        };
        println!("  [pricing] quoting {} x {}", quote.quantity, quote.sku);
        // The reply carries the request's correlation id, which is how it finds its requester.
        request.reply(Envelope::encode(&quote)?).await?;
        served += 1;
    }
    requests.close().await?;
    Ok(served)
}

/// A made-up price list.
fn price_of(sku: &str) -> u64 {
    sku.bytes().map(u64::from).sum::<u64>() % 500 + 100
}
