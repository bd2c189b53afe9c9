//! `bus dlq list|show|redrive`: the dead-letter queue `<name>.dlq` of a topic or queue.
//!
//! Reading a queue takes its messages, so every command reads the same careful way: it
//! receives until nothing arrived for `--idle`, holding each delivery unsettled (so none is
//! handed to it twice), then closes the consumer and releases what it keeps with
//! `nack(Redeliver::Now)`, which every adapter turns into "available again at once" (a
//! delivery dropped unsettled would come back only after the broker's ack wait or visibility
//! timeout on NATS and SQS). On SQS they are released with a one-second delay instead, and
//! read with short polls: a receive the closing consumer still has in flight would otherwise
//! take them back, and hand them back only through a task this short-lived process may not
//! outlive, which leaves them invisible for the whole visibility timeout. Redrive acknowledges
//! a dead letter only after it was sent back, as `bus_core`'s `Redrive` does, whose
//! `send_back` moves each one, with filters added.

use std::collections::{BTreeMap, HashSet};

use bus::headers::{self, dead_letter_queue};
use bus::middleware::dead_letter::Redrive;
use bus::{Bus, ConsumeOptions, Delivery, Envelope, Redeliver, Subscription};
use serde_json::{json, Value};

use super::failed;
use crate::cli::{DlqListArgs, DlqRead, DlqRedriveArgs, DlqShowArgs};
use crate::output::{delivery_json, envelope_pretty, print_json, table};

/// The dead letters read from one dead-letter queue, held unsettled.
struct Held {
    dlq: String,
    subscription: Subscription,
    deliveries: Vec<Delivery>,
    /// Copies of messages already held (at-least-once brokers may hand one out twice):
    /// released with the rest, shown once.
    duplicates: Vec<Delivery>,
    /// Whether `--limit` stopped the reading (more may wait).
    limited: bool,
    /// How the deliveries kept are handed back.
    release: Redeliver,
}

/// How held deliveries are handed back on the broker behind `bus` (see the module docs).
fn release_for(bus: &Bus) -> Redeliver {
    if bus.capabilities().name == "sqs" {
        Redeliver::After(std::time::Duration::from_secs(1))
    } else {
        Redeliver::Now
    }
}

/// Reads the dead-letter queue of `read.name` until idle, holding every delivery.
async fn read_all(bus: &Bus, read: &DlqRead) -> Result<Held, String> {
    let dlq = dead_letter_queue(&read.name);
    let limit = usize::try_from(read.limit).unwrap_or(usize::MAX);
    let options = ConsumeOptions::default().with_prefetch(limit.min(1000));
    let subscription = bus
        .consume(&dlq, options)
        .await
        .map_err(|e| failed(&format!("consuming `{dlq}`"), e))?;
    let mut held = Held {
        dlq,
        subscription,
        deliveries: Vec::new(),
        duplicates: Vec::new(),
        limited: false,
        release: release_for(bus),
    };
    let mut seen = HashSet::new();
    loop {
        if held.deliveries.len() >= limit {
            held.limited = true;
            break;
        }
        let wait = if held.deliveries.is_empty() {
            read.wait.max(read.idle)
        } else {
            read.idle
        };
        match tokio::time::timeout(wait, held.subscription.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(Err(e))) => {
                release(held).await;
                return Err(failed("receiving a dead letter", e));
            }
            Ok(Some(Ok(delivery))) => {
                if seen.insert(delivery.envelope().id.clone()) {
                    held.deliveries.push(delivery);
                } else {
                    held.duplicates.push(delivery);
                }
            }
        }
    }
    Ok(held)
}

/// Closes the consumer, then makes every held delivery available again. Returns how many
/// could not be (they come back after the broker's own timeout instead).
async fn release(held: Held) -> usize {
    release_deliveries(
        held.subscription,
        held.deliveries.into_iter().chain(held.duplicates),
        held.release,
    )
    .await
}

async fn release_deliveries(
    mut subscription: Subscription,
    deliveries: impl Iterator<Item = Delivery>,
    release: Redeliver,
) -> usize {
    // Closed first: a delivery released while the consumer is open could come straight back
    // to it, and sit in its buffer until it closes.
    let _ = subscription.close().await;
    let mut failures = 0;
    for delivery in deliveries {
        if let Err(e) = delivery.nack(release).await {
            failures += 1;
            eprintln!(
                "bus: warning: releasing a dead letter: {} (it comes back after the broker's \
                 redelivery timeout)",
                e.error()
            );
        }
    }
    failures
}

/// Runs `bus dlq list`.
pub(crate) async fn list(bus: &Bus, args: &DlqListArgs, json: bool) -> Result<(), String> {
    let held = read_all(bus, &args.read).await?;
    let envelopes: Vec<Value> = held.deliveries.iter().map(dead_letter_json).collect();
    let reasons = by_reason(held.deliveries.iter().map(Delivery::envelope));
    if json {
        print_json(&json!({
            "dlq": held.dlq,
            "count": held.deliveries.len(),
            "complete": !held.limited,
            "by_reason": reasons_json(&reasons),
            "dead_letters": envelopes,
        }));
    } else if held.deliveries.is_empty() {
        println!("no dead letters in `{}`", held.dlq);
    } else {
        println!(
            "{}",
            dead_letter_table(held.deliveries.iter().map(Delivery::envelope))
        );
        println!("{}", reason_table(&reasons));
        println!(
            "{}{} in `{}`",
            if held.limited { "at least " } else { "" },
            dead_letters(held.deliveries.len()),
            held.dlq
        );
    }
    released(release(held).await)
}

/// Runs `bus dlq show`.
pub(crate) async fn show(bus: &Bus, args: &DlqShowArgs, json: bool) -> Result<(), String> {
    let held = read_all(bus, &args.read).await?;
    let found = held
        .deliveries
        .iter()
        .find(|d| d.envelope().id.as_str() == args.id);
    let outcome = match found {
        Some(delivery) if json => {
            print_json(&dead_letter_json(delivery));
            Ok(())
        }
        Some(delivery) => {
            print!("{}", envelope_pretty(delivery.envelope()));
            Ok(())
        }
        None => Err(format!(
            "no dead letter with id {} in `{}` ({} read{})",
            args.id,
            held.dlq,
            held.deliveries.len(),
            if held.limited {
                "; raise --limit to read more"
            } else {
                ""
            }
        )),
    };
    let failures = release(held).await;
    outcome.and(released(failures))
}

/// Runs `bus dlq redrive`.
pub(crate) async fn redrive(bus: &Bus, args: &DlqRedriveArgs, json: bool) -> Result<(), String> {
    let held = read_all(bus, &args.read).await?;
    let Held {
        dlq,
        subscription,
        deliveries,
        duplicates,
        limited,
        release,
    } = held;
    let (chosen, mut kept): (Vec<Delivery>, Vec<Delivery>) = deliveries
        .into_iter()
        .partition(|d| chosen(args, d.envelope()));
    kept.extend(duplicates);
    let not_found: Vec<&String> = args
        .ids
        .iter()
        .filter(|id| {
            !chosen
                .iter()
                .any(|d| d.envelope().id.as_str() == id.as_str())
        })
        .collect();
    let target = &args.read.name;
    let noun = if args.read.queue { "queue" } else { "topic" };
    let envelopes: Vec<Envelope> = chosen.iter().map(|d| d.envelope().clone()).collect();
    let mut moved = 0;
    let mut error = None;
    if args.dry_run {
        kept.extend(chosen);
    } else {
        let back = if args.read.queue {
            Redrive::queue(target)
        } else {
            Redrive::topic(target)
        };
        let mut chosen = chosen.into_iter();
        for delivery in chosen.by_ref() {
            if let Err(e) = back.send_back(bus, delivery.envelope()).await {
                kept.push(delivery);
                error = Some(failed(
                    &format!("sending a dead letter back to {noun} `{target}` (after {moved})"),
                    e,
                ));
                break;
            }
            // Acknowledged only once it is back: a failure here leaves a duplicate, not a loss.
            if let Err(e) = delivery.ack().await {
                eprintln!(
                    "bus: warning: a dead letter sent back could not be removed from `{dlq}`: {} \
                     (it will be seen there again)",
                    e.error()
                );
            }
            moved += 1;
        }
        kept.extend(chosen);
    }
    let left = kept.len();
    let failures = release_deliveries(subscription, kept.into_iter(), release).await;
    let reasons = by_reason(envelopes.iter());
    if json {
        print_json(&json!({
            "dlq": dlq,
            noun: target,
            "dry_run": args.dry_run,
            "selected": envelopes.len(),
            "moved": moved,
            "left": left,
            "complete": !limited,
            "not_found": not_found,
            "by_reason": reasons_json(&reasons),
            "dead_letters": envelopes.iter().map(|e| dead_letter_fields(e, crate::output::envelope_json(e))).collect::<Vec<_>>(),
        }));
    } else {
        if !envelopes.is_empty() {
            println!("{}", dead_letter_table(envelopes.iter()));
            println!("{}", reason_table(&reasons));
        }
        if args.dry_run {
            println!(
                "dry run: would move {} from `{dlq}` back to {noun} `{target}`; nothing moved",
                dead_letters(envelopes.len())
            );
        } else {
            println!(
                "moved {} from `{dlq}` back to {noun} `{target}` ({left} left in `{dlq}`)",
                dead_letters(moved)
            );
        }
        for id in &not_found {
            println!("not found in `{dlq}`: {id}");
        }
    }
    if let Some(error) = error {
        return Err(error);
    }
    released(failures)?;
    if not_found.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of the ids asked for are not in `{dlq}`",
            not_found.len()
        ))
    }
}

/// `1 dead letter`, `2 dead letters`.
fn dead_letters(n: usize) -> String {
    if n == 1 {
        "1 dead letter".to_owned()
    } else {
        format!("{n} dead letters")
    }
}

fn chosen(args: &DlqRedriveArgs, envelope: &Envelope) -> bool {
    (args.ids.is_empty() || args.ids.iter().any(|id| id == envelope.id.as_str()))
        && args.kind.as_ref().is_none_or(|kind| *kind == envelope.kind)
}

fn released(failures: usize) -> Result<(), String> {
    if failures == 0 {
        Ok(())
    } else {
        Err(format!(
            "{failures} dead letters could not be released at once; the broker hands them \
             out again after its redelivery timeout"
        ))
    }
}

/// How many dead letters there are per reason, most frequent first.
fn by_reason<'a>(envelopes: impl Iterator<Item = &'a Envelope>) -> Vec<(String, usize)> {
    let mut counts = BTreeMap::<String, usize>::new();
    for envelope in envelopes {
        *counts.entry(reason(envelope).to_owned()).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts
}

fn reason(envelope: &Envelope) -> &str {
    envelope
        .header(headers::DLQ_REASON)
        .unwrap_or("(no reason: not dead-lettered by bus)")
}

fn reasons_json(reasons: &[(String, usize)]) -> Value {
    reasons
        .iter()
        .map(|(reason, count)| json!({ "reason": reason, "count": count }))
        .collect()
}

fn dead_letter_json(delivery: &Delivery) -> Value {
    dead_letter_fields(delivery.envelope(), delivery_json(delivery))
}

/// Adds the dead-letter headers as fields of their own to a message's JSON.
fn dead_letter_fields(envelope: &Envelope, mut value: Value) -> Value {
    if let Value::Object(object) = &mut value {
        let header = |name| envelope.header(name);
        object.insert("reason".into(), json!(header(headers::DLQ_REASON)));
        object.insert(
            "original_topic".into(),
            json!(header(headers::DLQ_ORIGINAL_TOPIC)),
        );
        object.insert("group".into(), json!(header(headers::DLQ_GROUP)));
        object.insert(
            "attempts".into(),
            json!(header(headers::DLQ_ATTEMPTS).and_then(|a| a.parse::<u64>().ok())),
        );
        object.insert(
            "first_failure".into(),
            json!(header(headers::DLQ_FIRST_FAILURE)),
        );
        object.insert(
            "dead_lettered_at".into(),
            json!(header(headers::DLQ_DEAD_LETTERED_AT)),
        );
    }
    value
}

fn dead_letter_table<'a>(envelopes: impl Iterator<Item = &'a Envelope>) -> comfy_table::Table {
    let mut rows = table(&[
        "id",
        "kind",
        "reason",
        "from",
        "group",
        "attempts",
        "dead-lettered at",
    ]);
    for envelope in envelopes {
        let header = |name| envelope.header(name).unwrap_or("");
        rows.add_row(vec![
            envelope.id.as_str(),
            envelope.kind.as_str(),
            reason(envelope),
            header(headers::DLQ_ORIGINAL_TOPIC),
            header(headers::DLQ_GROUP),
            header(headers::DLQ_ATTEMPTS),
            header(headers::DLQ_DEAD_LETTERED_AT),
        ]);
    }
    rows
}

fn reason_table(reasons: &[(String, usize)]) -> comfy_table::Table {
    let mut rows = table(&["reason", "count"]);
    for (reason, count) in reasons {
        rows.add_row(vec![reason.clone(), count.to_string()]);
    }
    rows
}
