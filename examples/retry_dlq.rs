//! Retry → dead-letter flow, end to end, with and without per-key order across retries, with
//! counts computed from what happened.
//!
//! A payment service consumes 200 `payment.requested` messages (keyed by account, ten
//! accounts) through the consumer runtime, with the retry middleware in front of its handler:
//! - every 7th message fails transiently on its first two runs (a flaky downstream): the retry
//!   middleware runs it again at once, then asks for a retry after a backoff, and it succeeds;
//! - every 10th-plus-3 message is poison (its payload cannot be decoded): a permanent error, so
//!   it is rejected at once and lands in the dead-letter queue `<topic>.dlq` with the reason
//!   headers;
//! - the rest succeed on the first run.
//!
//! The flow runs twice, each on its own topic and dead-letter queue:
//! - `payments.ordered`, with the consumer's default key order (`KeyOrder::Ordered` wherever
//!   the broker hands out a key's messages in order): the consumer keeps a failed message and
//!   retries it in place, and the account's later payments wait behind it, so each account's
//!   payments take effect in the order they were published;
//! - `payments.unordered`, with `KeyOrder::Unordered`: the failed message goes back to the
//!   broker with the backoff as its delay and the account moves on, so a later payment can take
//!   effect before the retried one. On the memory broker it does not, because that broker
//!   itself holds a nacked message's key back (`Capabilities::key_order_across_retries` is
//!   `Native`); on Kafka, NATS and RabbitMQ (`Emulated`: only the consumer keeps that order)
//!   later payments pass.
//!
//! Each run drains its dead-letter queue and prints one line:
//! `order=<ordered|unordered> processed=<n> retried=<r> retried_in_place=<p> dead_lettered=<d>
//! lost=<l> duplicates_applied=<u> out_of_order=<o>`, where `retried` counts handler runs
//! after the first of a message, `retried_in_place` the failed attempts the consumer retried in
//! place (`ConsumerReport::retried_in_place`), `lost` the published messages neither applied
//! nor dead-lettered, `duplicates_applied` the messages applied twice, and `out_of_order` the
//! payments applied after a later payment of the same account. It exits non-zero unless, in
//! both runs, nothing was lost or applied twice and exactly the poison messages were
//! dead-lettered, and, in an ordered run, no payment was applied out of order.
//!
//! ```text
//! cargo run -p examples --example retry_dlq
//! BUS_URL=nats://127.0.0.1:4222 cargo run -p examples --example retry_dlq --features nats
//! BUS_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run -p examples --example retry_dlq --features rabbitmq
//! ```
//!
//! Without `BUS_URL` it runs on the in-process memory broker, with no setup.
//!
//! It is written on the lower-level API the service API is built on (`Bus::subscribe`,
//! `runtime::Consumer`, `handler_fn`, `HandlerBuilder`) on purpose, since what it shows is
//! that machinery: the consumer's default key order comes from the subscription it is given
//! (`Subscription::keeps_key_order`), which it prints and checks, and the handler sees the
//! raw envelope, so it counts the poison messages itself as they fail to decode. A service
//! runs the same flow as below, where an undecodable payload is dead-lettered before any
//! handler runs (see `examples/quickstart.rs` and docs/ARCHITECTURE.md §14):
//!
//! ```ignore
//! Service::new("payment-service", bus)
//!     .with_layer(RetryLayer::new(policy))
//!     .with_key_order(order)
//!     .with_concurrency(16)
//!     .on(topic, apply_payment) // async fn(PaymentRequested, Context) -> bus::Result<()>
//!     .run(bus::shutdown_signal()?)
//!     .await?;
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::middleware::{RetryLayer, RetryPolicy};
use bus::runtime::{handler_fn, Consumer, DeliveryInfo, HandlerBuilder, KeyOrder};
use bus::{
    headers, Bus, BusConfig, ConsumeOptions, Envelope, Error, ErrorKind, Message, SubscribeOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const MESSAGES: u32 = 200;
const ACCOUNTS: u32 = 10;

/// The two runs: the topic, and the key order asked of the consumer (`None`: its default).
const RUNS: [(&str, Option<KeyOrder>); 2] = [
    ("payments.ordered", None),
    ("payments.unordered", Some(KeyOrder::Unordered)),
];

#[derive(Debug, Serialize, Deserialize)]
struct PaymentRequested {
    number: u32,
    account: String,
    cents: u64,
}

impl Message for PaymentRequested {
    const KIND: &'static str = "payment.requested";
}

fn is_flaky(number: u32) -> bool {
    number % 7 == 0
}

fn is_poison(number: u32) -> bool {
    number % 10 == 3
}

/// What the handler observed in one run, shared with `main`.
#[derive(Default)]
struct Ledger {
    /// Runs per message id.
    runs: HashMap<String, u32>,
    /// Ids whose effect was applied (the "database").
    applied: HashSet<String>,
    /// Per account, the numbers of the payments applied, in the order they were applied.
    applied_order: HashMap<String, Vec<u32>>,
    duplicates_applied: u32,
    poison_seen: HashSet<String>,
}

/// What one run found.
struct Tally {
    order: KeyOrder,
    processed: usize,
    retried: u32,
    retried_in_place: u64,
    dead_lettered: usize,
    lost: usize,
    duplicates_applied: u32,
    out_of_order: usize,
}

impl Tally {
    fn holds(&self, poison_expected: usize) -> bool {
        self.lost == 0
            && self.duplicates_applied == 0
            && self.dead_lettered == poison_expected
            && (self.order != KeyOrder::Ordered || self.out_of_order == 0)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = BusConfig::from_env()?;
    println!("connecting to {}", config.redacted_url());
    let bus = config.connect().await?;
    println!(
        "key order across retries on this broker: {}",
        bus.capabilities().key_order_across_retries
    );

    let poison_expected = (0..MESSAGES).filter(|n| is_poison(*n)).count();
    let mut all_held = true;
    for (topic, order) in RUNS {
        let tally = run(&bus, topic, order).await?;
        println!(
            "order={} processed={} retried={} retried_in_place={} dead_lettered={} lost={} \
             duplicates_applied={} out_of_order={}",
            order_name(tally.order),
            tally.processed,
            tally.retried,
            tally.retried_in_place,
            tally.dead_lettered,
            tally.lost,
            tally.duplicates_applied,
            tally.out_of_order
        );
        all_held &= tally.holds(poison_expected);
    }
    bus.close().await?;
    if !all_held {
        return Err("the retry / dead-letter flow did not hold".into());
    }
    Ok(())
}

/// Runs the flow once on `topic`: consume with `order` (the consumer's default if `None`),
/// publish, wait until every message was applied or found poison, stop, drain the dead-letter
/// queue, and count.
async fn run(
    bus: &Bus,
    topic: &str,
    order: Option<KeyOrder>,
) -> Result<Tally, Box<dyn std::error::Error>> {
    let mut envelopes = Vec::new();
    for number in 0..MESSAGES {
        let message = PaymentRequested {
            number,
            account: format!("acct-{}", number % ACCOUNTS),
            cents: 100 + u64::from(number),
        };
        let mut envelope = Envelope::encode(&message)?.with_key(message.account.clone());
        if is_poison(number) {
            envelope.payload = bus::Bytes::from_static(b"\xff not json");
        }
        envelopes.push(envelope);
    }
    let published: Arc<HashSet<String>> =
        Arc::new(envelopes.iter().map(|e| e.id.to_string()).collect());

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let progress = Arc::new(Notify::new());
    let handler = {
        let ledger = ledger.clone();
        let progress = progress.clone();
        let published = published.clone();
        handler_fn(move |envelope: Envelope, _info: DeliveryInfo| {
            let ledger = ledger.clone();
            let progress = progress.clone();
            let published = published.clone();
            async move {
                let id = envelope.id.to_string();
                if !published.contains(&id) {
                    // Left on a durable broker by an earlier run that did not finish.
                    return Ok(());
                }
                let runs = {
                    let mut ledger = ledger.lock().expect("ledger lock");
                    let runs = ledger.runs.entry(id.clone()).or_default();
                    *runs += 1;
                    *runs
                };
                let outcome = apply(&envelope, runs, &id, &ledger);
                progress.notify_one();
                outcome
            }
        })
    };
    let policy = RetryPolicy::new()
        .with_immediate_retries(1, Duration::from_millis(5))
        .with_max_deliveries(4)
        .with_backoff(Duration::from_millis(20), 2.0, Duration::from_millis(200));
    let handler = HandlerBuilder::new()
        .layer(RetryLayer::new(policy))
        .handler(handler);

    let subscription = bus
        .subscribe(topic, SubscribeOptions::group("payment-service"))
        .await?;
    // What the consumer does when `order` is `None`.
    let order = order.unwrap_or(if subscription.keeps_key_order() {
        KeyOrder::Ordered
    } else {
        KeyOrder::Unordered
    });
    let consumer = Consumer::new(subscription, handler)
        .with_key_order(order)
        .with_concurrency(16)
        .spawn();

    for envelope in envelopes {
        bus.publish(topic, envelope).await?;
    }

    let settled = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let notified = progress.notified();
            {
                let ledger = ledger.lock().expect("ledger lock");
                if ledger.applied.len() + ledger.poison_seen.len() >= published.len() {
                    return;
                }
            }
            notified.await;
        }
    })
    .await;
    let report = consumer.stop().await?;
    if settled.is_err() {
        return Err(format!("{topic}: timed out waiting for the messages to be processed").into());
    }

    // Drain the dead-letter queue, checking what each dead letter says: until the dead letter
    // of every poison message came, then until it stays quiet, to catch any other. The first
    // wait is long because the poison messages are all of one account: on SQS FIFO their dead
    // letters form one message group, held back until those received are deleted.
    let poison_seen = ledger.lock().expect("ledger lock").poison_seen.clone();
    let dead_letter_queue = headers::dead_letter_queue(topic);
    let mut dead_letters = bus
        .consume(&dead_letter_queue, ConsumeOptions::default())
        .await?;
    let mut dead = HashSet::new();
    loop {
        let quiet = if poison_seen.is_subset(&dead) {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(30)
        };
        let Ok(Some(delivery)) = tokio::time::timeout(quiet, dead_letters.next()).await else {
            break;
        };
        let delivery = delivery?;
        let envelope = delivery.envelope();
        let id = envelope.id.to_string();
        if published.contains(&id) {
            if envelope.header(headers::DLQ_ORIGINAL_TOPIC) != Some(topic) {
                return Err(format!("dead letter {id} lacks its original topic").into());
            }
            if envelope.header(headers::DLQ_REASON).is_none() {
                return Err(format!("dead letter {id} lacks its reason").into());
            }
            dead.insert(id);
        }
        delivery.ack().await?;
    }
    dead_letters.close().await?;

    let ledger = ledger.lock().expect("ledger lock");
    Ok(Tally {
        order,
        processed: ledger.applied.len(),
        retried: ledger.runs.values().map(|runs| runs - 1).sum(),
        retried_in_place: report.retried_in_place,
        dead_lettered: dead.len(),
        lost: published
            .iter()
            .filter(|id| !ledger.applied.contains(*id) && !dead.contains(*id))
            .count(),
        duplicates_applied: ledger.duplicates_applied,
        out_of_order: ledger.applied_order.values().map(|n| out_of_order(n)).sum(),
    })
}

/// How many of `applied` (one account's payment numbers, in the order applied) came after a
/// later-published payment of the account.
fn out_of_order(applied: &[u32]) -> usize {
    let mut latest = None;
    let mut late = 0;
    for &number in applied {
        match latest {
            Some(latest) if number < latest => late += 1,
            _ => latest = Some(number),
        }
    }
    late
}

fn order_name(order: KeyOrder) -> &'static str {
    match order {
        KeyOrder::Ordered => "ordered",
        KeyOrder::Unordered => "unordered",
        _ => "other",
    }
}

/// The handler's work: decode, fail like a flaky downstream would, apply once.
fn apply(envelope: &Envelope, runs: u32, id: &str, ledger: &Mutex<Ledger>) -> Result<(), Error> {
    let payment: PaymentRequested = match envelope.decode() {
        Ok(payment) => payment,
        Err(error) => {
            ledger
                .lock()
                .expect("ledger lock")
                .poison_seen
                .insert(id.to_owned());
            return Err(error);
        }
    };
    if is_flaky(payment.number) && runs <= 2 {
        return Err(Error::new(
            ErrorKind::Timeout,
            format!("payment gateway timed out (run {runs})"),
        ));
    }
    let mut ledger = ledger.lock().expect("ledger lock");
    if ledger.applied.insert(id.to_owned()) {
        ledger
            .applied_order
            .entry(payment.account)
            .or_default()
            .push(payment.number);
    } else {
        ledger.duplicates_applied += 1;
    }
    Ok(())
}
