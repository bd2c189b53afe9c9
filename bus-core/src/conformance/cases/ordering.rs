//! Per-key order across failures: with the [`Consumer`]'s default
//! [`KeyOrder::Ordered`](crate::runtime::KeyOrder::Ordered), a failing message parks its key,
//! is retried in place, and the key's later messages wait behind it while other keys flow.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::conformance::support::{
    ack, assert_quiet, consume, no_dead_letter, recv, skip, subscribe, unique, SEQ,
};
use crate::conformance::{report, Harness};
use crate::middleware::{RetryLayer, RetryPolicy};
use crate::runtime::{handler_fn, Consumer, ConsumerHandle, DeliveryInfo, HandlerBuilder};
use crate::{
    headers, Capabilities, ConsumeOptions, Envelope, Error, ErrorKind, SubscribeOptions,
    Subscription,
};

/// Messages on key `A`.
const ON_A: u32 = 20;
/// The message of `A` that fails (1-based, as the issue counts).
const FAILING: u32 = 5;
/// Keys other than `A`, and messages on each.
const OTHER_KEYS: u32 = 10;
const PER_OTHER_KEY: u32 = 10;
const CONCURRENCY: usize = 8;

/// What the handler saw: a run of message `seq` of `key` at its `attempt`, and whether it
/// took effect (acked) or failed.
#[derive(Debug, Clone)]
struct Run {
    key: String,
    seq: u32,
    attempt: u32,
    ok: bool,
    at: Instant,
}

/// The `ON_A` messages on key `A` (seq 1..=20).
fn messages_on_a() -> Vec<Envelope> {
    (1..=ON_A)
        .map(|seq| {
            Envelope::new("conf.ordered", format!("A {seq}"))
                .with_key("A")
                .with_header(SEQ, seq.to_string())
        })
        .collect()
}

/// `PER_OTHER_KEY` messages on each of `OTHER_KEYS` keys other than `A`.
fn messages_on_other_keys() -> Vec<Envelope> {
    let mut sent = Vec::new();
    for seq in 1..=PER_OTHER_KEY {
        for key in 0..OTHER_KEYS {
            sent.push(
                Envelope::new("conf.ordered", format!("B{key} {seq}"))
                    .with_key(format!("B{key}"))
                    .with_header(SEQ, seq.to_string()),
            );
        }
    }
    sent
}

/// Publishes `sent` in batches of ten.
async fn publish_all(h: &Harness, topic: &str, sent: Vec<Envelope>, what: &str) {
    for chunk in sent.chunks(10) {
        h.broker
            .publish_batch(topic, chunk.to_vec())
            .await
            .unwrap_or_else(|e| panic!("{what}: publishing to `{topic}` failed: {e}"));
    }
}

/// Skips `case` (returning `true`) when the adapter has no per-key order to keep.
fn no_order_across_retries(case: &str, caps: &Capabilities) -> bool {
    let Some(reason) = caps.key_order_across_retries.unsupported_reason() else {
        return false;
    };
    skip(
        case,
        format!("{}: no per-key order across retries: {reason}", caps.name),
    );
    true
}

/// Subscribes in a group of the case's own (or privately), with a prefetch window wide enough
/// for a parked key's messages and a full set of running handlers.
async fn ordered_subscription(h: &Harness, topic: &str, what: &str) -> Subscription {
    let caps = h.capabilities();
    let options = if caps.consumer_groups {
        SubscribeOptions::group(format!("{topic}.g1"))
    } else {
        SubscribeOptions::default()
    }
    .with_prefetch(64);
    let sub = subscribe(h, topic, options, what).await;
    assert!(
        sub.keeps_key_order(),
        "{what}: {} declares key order across retries, but its subscription does not say it \
         keeps key order (DeliverySource::keeps_key_order), so the Consumer would not retry in \
         place",
        caps.name
    );
    sub
}

/// A consumer with the default key order, whose handler reports every run and fails message
/// `FAILING` of key `A` on the attempts `fails_on` accepts; the retry policy parks it for
/// `park` (to twice that, jittered) per failure and gives up after `max_deliveries`.
fn start_consumer(
    sub: Subscription,
    park: Duration,
    max_deliveries: u32,
    fails_on: fn(u32) -> bool,
    runs: mpsc::UnboundedSender<Run>,
    h: &Harness,
) -> ConsumerHandle {
    let policy = RetryPolicy::new()
        .with_immediate_retries(0, Duration::ZERO)
        .with_max_deliveries(max_deliveries)
        .with_backoff(park, 1.0, park);
    let handler = HandlerBuilder::new()
        .layer(RetryLayer::new(policy))
        .handler(handler_fn(move |envelope: Envelope, info: DeliveryInfo| {
            let key = envelope.key.clone().unwrap_or_default();
            let seq: u32 = envelope
                .header(SEQ)
                .and_then(|s| s.parse().ok())
                .unwrap_or(u32::MAX);
            let ok = !(key == "A" && seq == FAILING && fails_on(info.attempt()));
            let _ = runs.send(Run {
                key,
                seq,
                attempt: info.attempt(),
                ok,
                at: Instant::now(),
            });
            async move {
                if ok {
                    Ok(())
                } else {
                    Err(Error::new(
                        ErrorKind::Handler,
                        "conformance: A5 is not ready",
                    ))
                }
            }
        }));
    Consumer::new(sub, handler)
        .with_concurrency(CONCURRENCY)
        .with_shutdown_timeout(h.receive_timeout)
        .spawn()
}

/// Collects runs until `done` says so, failing the case when none comes within the receive
/// timeout.
async fn collect_runs(
    runs: &mut mpsc::UnboundedReceiver<Run>,
    h: &Harness,
    what: &str,
    done: impl Fn(&[Run]) -> bool,
) -> Vec<Run> {
    let mut seen = Vec::new();
    while !done(&seen) {
        // A parked key is quiet for up to twice the park time on top of the broker's pace.
        let wait = h.receive_timeout * 2;
        match tokio::time::timeout(wait, runs.recv()).await {
            Ok(Some(run)) => seen.push(run),
            Ok(None) => panic!("{what}: the handler is gone after {} runs", seen.len()),
            Err(_) => panic!(
                "{what}: no run within {wait:?}; {} runs so far, last: {:?}",
                seen.len(),
                seen.last()
            ),
        }
    }
    seen
}

/// Asserts that the messages of `A` took effect once each, in order, and returns the attempts
/// the failing one was run with.
fn assert_a_in_order(runs: &[Run], expected: &[u32], what: &str) -> Vec<u32> {
    let effects: Vec<u32> = runs
        .iter()
        .filter(|r| r.key == "A" && r.ok)
        .map(|r| r.seq)
        .collect();
    assert_eq!(
        effects, expected,
        "{what}: the messages of key A took effect in this order"
    );
    runs.iter()
        .filter(|r| r.key == "A" && r.seq == FAILING)
        .map(|r| r.attempt)
        .collect()
}

/// Twenty messages on key `A`, whose fifth fails twice, then succeeds; once it has failed, a
/// hundred messages on ten other keys are published. `A`'s messages take effect in order
/// 1..20, the fifth on attempts 1, 2, 3 (retried in place, not through the broker), and every
/// message of the other keys takes effect, in its key's order, while `A` is parked: before
/// `A`'s fifth succeeds. Reports how long `A` was parked and how long the other keys took.
pub async fn per_key_order_kept_across_retries(h: Harness) {
    const CASE: &str = "per_key_order_kept_across_retries";
    let caps = h.capabilities();
    if no_order_across_retries(CASE, &caps) {
        return;
    }
    let topic = unique("orderretry");
    let sub = ordered_subscription(&h, &topic, CASE).await;
    publish_all(&h, &topic, messages_on_a(), CASE).await;
    // Long enough for the other keys' messages to be published and handled meanwhile.
    let park = (h.receive_timeout / 10).max(Duration::from_secs(1));
    let (runs_tx, mut runs) = mpsc::unbounded_channel();
    let consumer = start_consumer(sub, park, 5, |attempt| attempt <= 2, runs_tx, &h);

    let mut seen = collect_runs(&mut runs, &h, CASE, |seen| {
        seen.iter().any(|r| r.key == "A" && !r.ok)
    })
    .await;
    let others = messages_on_other_keys();
    let total = ON_A as usize + others.len();
    publish_all(&h, &topic, others, CASE).await;
    let done_before = seen.iter().filter(|r| r.ok).count();
    seen.extend(
        collect_runs(&mut runs, &h, CASE, |more| {
            done_before + more.iter().filter(|r| r.ok).count() >= total
        })
        .await,
    );
    // Nothing more: a message that took effect twice would show here.
    let late = {
        let deadline = Instant::now() + h.quiet_period;
        let mut late = Vec::new();
        while let Ok(Some(run)) = tokio::time::timeout_at(deadline, runs.recv()).await {
            late.push(run);
        }
        late
    };
    let report_of_consumer = consumer
        .stop()
        .await
        .unwrap_or_else(|e| panic!("{CASE}: stopping the consumer failed: {e}"));
    assert!(
        late.is_empty(),
        "{CASE}: runs after every message took effect: {late:?}"
    );

    let attempts = assert_a_in_order(&seen, &(1..=ON_A).collect::<Vec<_>>(), CASE);
    assert_eq!(
        attempts,
        [1, 2, 3],
        "{CASE}: attempts of A's message {FAILING} (fails twice, then succeeds)"
    );
    let mut by_key: HashMap<&str, Vec<u32>> = HashMap::new();
    for run in seen.iter().filter(|r| r.key != "A") {
        assert!(run.ok, "{CASE}: {run:?} failed");
        by_key.entry(&run.key).or_default().push(run.seq);
    }
    let expected: Vec<u32> = (1..=PER_OTHER_KEY).collect();
    assert_eq!(by_key.len(), OTHER_KEYS as usize, "{CASE}: other keys seen");
    for (key, seqs) in &by_key {
        assert_eq!(seqs, &expected, "{CASE}: order of key {key}");
    }

    let failing = |attempt: u32| {
        seen.iter()
            .find(|r| r.key == "A" && r.seq == FAILING && r.attempt == attempt)
            .map(|r| r.at)
            .expect("checked above")
    };
    let (parked_at, succeeded_at) = (failing(1), failing(3));
    let first_other = seen
        .iter()
        .filter(|r| r.key != "A")
        .map(|r| r.at)
        .min()
        .expect("checked above");
    let others_while_parked = seen
        .iter()
        .filter(|r| r.key != "A" && r.at > parked_at && r.at < succeeded_at)
        .count();
    let last_other = seen
        .iter()
        .filter(|r| r.key != "A")
        .map(|r| r.at)
        .max()
        .expect("checked above");
    assert!(
        last_other < succeeded_at,
        "{CASE}: A's message {FAILING} succeeded before the other keys were done: only \
         {others_while_parked} of {} other messages took effect while A was parked for {:?}",
        OTHER_KEYS * PER_OTHER_KEY,
        succeeded_at - parked_at
    );
    assert_eq!(
        (
            report_of_consumer.retried,
            report_of_consumer.retried_in_place
        ),
        (0, 2),
        "{CASE}: (retried through the broker, retried in place) in {report_of_consumer:?}"
    );
    report(&format!(
        "{} ordered retries: key A parked {:.1} s (attempt 1 failed → attempt 3 acked); \
         {others_while_parked} of {} other-key messages, published after A parked, took effect \
         meanwhile, from +{:.2} s to +{:.2} s; A's order 1..{ON_A} kept, retried in place {}×, \
         through the broker {}×",
        caps.name,
        (succeeded_at - parked_at).as_secs_f64(),
        OTHER_KEYS * PER_OTHER_KEY,
        first_other
            .saturating_duration_since(parked_at)
            .as_secs_f64(),
        last_other
            .saturating_duration_since(parked_at)
            .as_secs_f64(),
        report_of_consumer.retried_in_place,
        report_of_consumer.retried,
    ));
}

/// Twenty messages on key `A`, the fifth always failing, with a policy of 3 deliveries: the
/// fifth runs on attempts 1, 2, 3, lands once in the dead-letter queue with 3 attempts and the
/// handler's error as reason, and then 6..20 take effect, in order.
pub async fn parked_key_dead_letters_and_moves_on(h: Harness) {
    const CASE: &str = "parked_key_dead_letters_and_moves_on";
    const FAILURE: &str = "conformance: A5 is not ready";
    const MAX_DELIVERIES: u32 = 3;
    let caps = h.capabilities();
    if no_order_across_retries(CASE, &caps) {
        return;
    }
    if no_dead_letter(CASE, &caps) {
        return;
    }
    let topic = unique("orderdlq");
    let sub = ordered_subscription(&h, &topic, CASE).await;
    publish_all(&h, &topic, messages_on_a(), CASE).await;
    let (runs_tx, mut runs) = mpsc::unbounded_channel();
    let park = Duration::from_millis(200);
    let consumer = start_consumer(sub, park, MAX_DELIVERIES, |_| true, runs_tx, &h);

    let seen = collect_runs(&mut runs, &h, CASE, |seen| {
        seen.iter().filter(|r| r.ok).count() >= (ON_A - 1) as usize
    })
    .await;
    let dlq = headers::dead_letter_queue(&topic);
    let what = format!("{CASE}: dead-letter queue `{dlq}`");
    let mut dead_letters = consume(&h, &dlq, ConsumeOptions::default(), &what).await;
    let dead = recv(&mut dead_letters, h.receive_timeout, &what).await;
    let got = dead.envelope().clone();
    ack(dead, &what).await;
    assert_quiet(&mut dead_letters, h.quiet_period, &what).await;
    let report_of_consumer = consumer
        .stop()
        .await
        .unwrap_or_else(|e| panic!("{CASE}: stopping the consumer failed: {e}"));

    let expected: Vec<u32> = (1..=ON_A).filter(|seq| *seq != FAILING).collect();
    let attempts = assert_a_in_order(&seen, &expected, CASE);
    assert_eq!(
        attempts,
        (1..=MAX_DELIVERIES).collect::<Vec<_>>(),
        "{CASE}: attempts of A's message {FAILING} (always fails)"
    );
    let gave_up = seen
        .iter()
        .filter(|r| r.key == "A" && r.seq == FAILING)
        .map(|r| r.at)
        .max()
        .expect("checked above");
    let next = seen
        .iter()
        .find(|r| r.key == "A" && r.seq == FAILING + 1)
        .expect("checked above");
    assert!(
        next.at >= gave_up,
        "{CASE}: A's message {} ran before {FAILING} was given up",
        FAILING + 1
    );
    assert_eq!(got.key.as_deref(), Some("A"), "{what}: key");
    assert_eq!(
        got.header(SEQ),
        Some(FAILING.to_string().as_str()),
        "{what}: the dead letter is A's message {FAILING}"
    );
    assert_eq!(
        got.header(headers::DLQ_ATTEMPTS),
        Some(MAX_DELIVERIES.to_string().as_str()),
        "{what}: attempts (retries in place count)"
    );
    let reason = got.header(headers::DLQ_REASON).unwrap_or_default();
    assert!(
        reason.contains(FAILURE),
        "{what}: reason {reason:?} without the handler's error"
    );
    assert_eq!(
        (
            report_of_consumer.acked,
            report_of_consumer.rejected,
            report_of_consumer.retried,
            report_of_consumer.retried_in_place
        ),
        (u64::from(ON_A - 1), 1, 0, u64::from(MAX_DELIVERIES - 1)),
        "{CASE}: (acked, rejected, retried, retried in place) in {report_of_consumer:?}"
    );
}
