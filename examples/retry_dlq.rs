//! Retry → dead-letter flow, end to end, with counts computed from what happened.
//!
//! A payment service consumes 200 `payment.requested` messages (keyed by account) through the
//! consumer runtime, with the retry middleware in front of its handler:
//! - every 7th message fails transiently on its first two runs (a flaky downstream): the retry
//!   middleware runs it again at once, then has the broker redeliver it after a backoff, and it
//!   succeeds;
//! - every 10th-plus-3 message is poison (its payload cannot be decoded): a permanent error, so
//!   it is rejected at once and lands in the dead-letter queue `payments.dlq` with the reason
//!   headers;
//! - the rest succeed on the first run.
//!
//! At the end it drains the dead-letter queue and prints one line:
//! `processed=<n> retried=<r> dead_lettered=<d> lost=<l> duplicates_applied=<u>`, where
//! `retried` counts handler runs after the first of a message, `lost` counts published
//! messages neither applied nor dead-lettered, and `duplicates_applied` counts messages applied
//! twice. It exits non-zero unless nothing was lost or applied twice and exactly the poison
//! messages were dead-lettered.
//!
//! Run it with `cargo run -p examples --example retry_dlq` (memory broker, no setup). With
//! `BUS_URL` set it runs on that broker instead.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::middleware::{RetryLayer, RetryPolicy};
use bus::runtime::{handler_fn, Consumer, DeliveryInfo, HandlerBuilder};
use bus::{
    headers, BusConfig, ConsumeOptions, Envelope, Error, ErrorKind, Message, SubscribeOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const MESSAGES: u32 = 200;
const TOPIC: &str = "payments";

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

/// What the handler observed, shared with `main`.
#[derive(Default)]
struct Ledger {
    /// Runs per message id.
    runs: HashMap<String, u32>,
    /// Ids whose effect was applied (the "database").
    applied: HashSet<String>,
    duplicates_applied: u32,
    poison_seen: HashSet<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = BusConfig::from_env()?;
    println!("connecting to {}", config.redacted_url());
    let bus = config.connect().await?;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let progress = Arc::new(Notify::new());
    let handler = {
        let ledger = ledger.clone();
        let progress = progress.clone();
        handler_fn(move |envelope: Envelope, _info: DeliveryInfo| {
            let ledger = ledger.clone();
            let progress = progress.clone();
            async move {
                let id = envelope.id.to_string();
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
        .subscribe(TOPIC, SubscribeOptions::group("payment-service"))
        .await?;
    let consumer = Consumer::new(subscription, handler)
        .with_concurrency(16)
        .spawn();

    let mut published = HashSet::new();
    for number in 0..MESSAGES {
        let message = PaymentRequested {
            number,
            account: format!("acct-{}", number % 10),
            cents: 100 + u64::from(number),
        };
        let mut envelope = Envelope::encode(&message)?.with_key(message.account.clone());
        if is_poison(number) {
            envelope.payload = bus::Bytes::from_static(b"\xff not json");
        }
        published.insert(envelope.id.to_string());
        bus.publish(TOPIC, envelope).await?;
    }
    let poison_expected = (0..MESSAGES).filter(|n| is_poison(*n)).count();
    println!("published {MESSAGES} messages ({poison_expected} poison)");

    // Wait until every message was applied or found poison, then stop the consumer.
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
        return Err("timed out waiting for the messages to be processed".into());
    }
    println!(
        "consumer: received={} acked={} retried={} rejected={}",
        report.received, report.acked, report.retried, report.rejected
    );

    // Drain the dead-letter queue, checking what each dead letter says.
    let mut dead_letters = bus
        .consume(
            &headers::dead_letter_queue(TOPIC),
            ConsumeOptions::default(),
        )
        .await?;
    let mut dead = HashSet::new();
    while let Ok(Some(delivery)) =
        tokio::time::timeout(Duration::from_millis(500), dead_letters.next()).await
    {
        let delivery = delivery?;
        let envelope = delivery.envelope();
        let reason = envelope.header(headers::DLQ_REASON).unwrap_or("(none)");
        if envelope.header(headers::DLQ_ORIGINAL_TOPIC) != Some(TOPIC) {
            return Err(format!("dead letter {} lacks its original topic", envelope.id).into());
        }
        if dead.is_empty() {
            println!("first dead letter: reason={reason:?}");
        }
        dead.insert(envelope.id.to_string());
        delivery.ack().await?;
    }
    dead_letters.close().await?;
    bus.close().await?;

    let ledger = ledger.lock().expect("ledger lock");
    let processed = ledger.applied.len();
    let retried: u32 = ledger.runs.values().map(|runs| runs - 1).sum();
    let lost = published
        .iter()
        .filter(|id| !ledger.applied.contains(*id) && !dead.contains(*id))
        .count();
    println!(
        "processed={processed} retried={retried} dead_lettered={} lost={lost} duplicates_applied={}",
        dead.len(),
        ledger.duplicates_applied
    );
    if lost != 0 || ledger.duplicates_applied != 0 || dead.len() != poison_expected {
        return Err("the retry / dead-letter flow did not hold".into());
    }
    Ok(())
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
    if !ledger.applied.insert(id.to_owned()) {
        ledger.duplicates_applied += 1;
    }
    Ok(())
}
