//! What the cases share: unique names, waiting for deliveries with deadlines, comparing
//! envelopes, and running competing members.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::Harness;
use crate::{
    Capabilities, ConsumeOptions, Delivery, Envelope, MessageId, SubscribeOptions, Subscription,
};

/// A name no other run or case uses: `conf.<tag>.<uuid v7>`.
pub(crate) fn unique(tag: &str) -> String {
    format!("conf.{tag}.{}", uuid::Uuid::now_v7().simple())
}

pub(crate) fn skip(case: &str, reason: impl Display) {
    println!("skipped: {case}: {reason}");
}

/// Skips `case` (returning `true`) when the adapter has no named consumer groups.
pub(crate) fn no_groups(case: &str, caps: &Capabilities) -> bool {
    if caps.consumer_groups {
        return false;
    }
    skip(
        case,
        format!(
            "{} has no named consumer groups (Capabilities::consumer_groups is false)",
            caps.name
        ),
    );
    true
}

/// Skips `case` (returning `true`) when the adapter cannot dead-letter.
pub(crate) fn no_dead_letter(case: &str, caps: &Capabilities) -> bool {
    let Some(reason) = caps.dead_letter.unsupported_reason() else {
        return false;
    };
    skip(
        case,
        format!("{}: dead-lettering unsupported: {reason}", caps.name),
    );
    true
}

/// Skips `case` (returning `true`) when the adapter does not keep per-key order.
pub(crate) fn no_per_key_order(case: &str, caps: &Capabilities) -> bool {
    if caps.per_key_order {
        return false;
    }
    skip(
        case,
        format!(
            "{} does not keep per-key order (Capabilities::per_key_order is false)",
            caps.name
        ),
    );
    true
}

pub(crate) fn ids(envelopes: &[Envelope]) -> HashSet<MessageId> {
    envelopes.iter().map(|e| e.id.clone()).collect()
}

pub(crate) async fn subscribe(
    h: &Harness,
    topic: &str,
    options: SubscribeOptions,
    what: &str,
) -> Subscription {
    h.broker
        .subscribe(topic, options.clone())
        .await
        .unwrap_or_else(|e| panic!("{what}: subscribe to `{topic}` ({options:?}) failed: {e}"))
}

pub(crate) async fn consume(
    h: &Harness,
    queue: &str,
    options: ConsumeOptions,
    what: &str,
) -> Subscription {
    h.broker
        .consume(queue, options)
        .await
        .unwrap_or_else(|e| panic!("{what}: consume from `{queue}` failed: {e}"))
}

pub(crate) async fn publish(h: &Harness, topic: &str, envelope: Envelope, what: &str) {
    let id = envelope.id.clone();
    h.broker
        .publish(topic, envelope)
        .await
        .unwrap_or_else(|e| panic!("{what}: publish of {id} to `{topic}` failed: {e}"));
}

pub(crate) async fn send(h: &Harness, queue: &str, envelope: Envelope, what: &str) {
    let id = envelope.id.clone();
    h.broker
        .send(queue, envelope)
        .await
        .unwrap_or_else(|e| panic!("{what}: send of {id} to queue `{queue}` failed: {e}"));
}

pub(crate) async fn ack(delivery: Delivery, what: &str) {
    if let Err(e) = delivery.ack().await {
        panic!("{what}: ack failed: {e}");
    }
}

/// What one call to [`Subscription::next`] under a deadline gave.
pub(crate) enum Next {
    Delivery(Box<Delivery>),
    Ended,
    TimedOut,
}

/// The next delivery within `wait`. Error items are transient by contract (the subscription
/// stays usable), so they are reported and waited through.
pub(crate) async fn next_within(sub: &mut Subscription, wait: Duration, what: &str) -> Next {
    let deadline = Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(Ok(delivery))) => return Next::Delivery(Box::new(delivery)),
            Ok(Some(Err(e))) => {
                println!("note: {what}: receive error, waiting on: {e}");
                // Back off so an adapter that fails at once does not spin the case.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(None) => return Next::Ended,
            Err(_) => return Next::TimedOut,
        }
    }
}

/// The next delivery; fails the case if none comes within `wait`.
pub(crate) async fn recv(sub: &mut Subscription, wait: Duration, what: &str) -> Delivery {
    match next_within(sub, wait, what).await {
        Next::Delivery(delivery) => *delivery,
        Next::Ended => panic!("{what}: the subscription ended while a message was expected"),
        Next::TimedOut => panic!("{what}: no message arrived within {wait:?}"),
    }
}

/// Fails the case if anything arrives within `quiet`.
pub(crate) async fn assert_quiet(sub: &mut Subscription, quiet: Duration, what: &str) {
    if let Next::Delivery(d) = next_within(sub, quiet, what).await {
        panic!(
            "{what}: expected nothing more, but within {quiet:?} got {} (kind `{}`, attempt {})",
            d.envelope().id,
            d.envelope().kind,
            d.attempt()
        );
    }
}

/// Fails the case if anything but copies of `allowed` arrives within `quiet`. For checks where
/// an at-least-once duplicate is not the point; copies are acked.
pub(crate) async fn assert_nothing_else(
    sub: &mut Subscription,
    quiet: Duration,
    allowed: &HashSet<MessageId>,
    what: &str,
) {
    let deadline = Instant::now() + quiet;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Next::Delivery(d) = next_within(sub, left, what).await else {
            return;
        };
        assert!(
            allowed.contains(&d.envelope().id),
            "{what}: expected nothing else, but within {quiet:?} got {} (kind `{}`, attempt {})",
            d.envelope().id,
            d.envelope().kind,
            d.attempt()
        );
        ack(*d, what).await;
    }
}

/// One delivery as the case saw it, after it was settled.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) envelope: Envelope,
    pub(crate) attempt: u32,
    pub(crate) source: String,
    pub(crate) group: Option<String>,
}

impl Received {
    pub(crate) fn of(delivery: &Delivery) -> Self {
        Self {
            envelope: delivery.envelope().clone(),
            attempt: delivery.attempt(),
            source: delivery.source().to_owned(),
            group: delivery.group().map(str::to_owned),
        }
    }
}

/// Receives and acks until every id in `expected` has arrived, waiting up to `wait` for each.
/// Returns every arrival in order, duplicates included; an id not in `expected` fails the case.
pub(crate) async fn receive_all(
    sub: &mut Subscription,
    expected: &HashSet<MessageId>,
    wait: Duration,
    what: &str,
) -> Vec<Received> {
    let mut seen = HashSet::new();
    let mut arrivals = Vec::new();
    while seen.len() < expected.len() {
        let delivery = match next_within(sub, wait, what).await {
            Next::Delivery(d) => *d,
            Next::Ended => panic!(
                "{what}: the subscription ended after {} of {} messages",
                seen.len(),
                expected.len()
            ),
            Next::TimedOut => panic!(
                "{what}: {} of {} messages arrived, then nothing within {wait:?}",
                seen.len(),
                expected.len()
            ),
        };
        let id = delivery.envelope().id.clone();
        assert!(
            expected.contains(&id),
            "{what}: received {id} (kind `{}`), which was not sent here",
            delivery.envelope().kind
        );
        seen.insert(id);
        arrivals.push(Received::of(&delivery));
        ack(delivery, what).await;
    }
    arrivals
}

/// The first arrival of each id.
pub(crate) fn first_arrivals(arrivals: &[Received]) -> Vec<&Received> {
    let mut seen = HashSet::new();
    arrivals
        .iter()
        .filter(|r| seen.insert(r.envelope.id.clone()))
        .collect()
}

/// Asserts `got` is `sent` as it went out: id, kind, correlation and causation ids, key,
/// content type, every header sent (adapters may add their own), payload, and the timestamp to
/// the millisecond.
pub(crate) fn assert_same(sent: &Envelope, got: &Envelope, what: &str) {
    let id = &sent.id;
    assert_eq!(got.id, sent.id, "{what}: id");
    assert_eq!(got.kind, sent.kind, "{what}: kind of {id}");
    assert_eq!(
        got.correlation_id, sent.correlation_id,
        "{what}: correlation id of {id}"
    );
    assert_eq!(
        got.causation_id, sent.causation_id,
        "{what}: causation id of {id}"
    );
    assert_eq!(got.key, sent.key, "{what}: key of {id}");
    assert_eq!(
        got.content_type, sent.content_type,
        "{what}: content type of {id}"
    );
    for (name, value) in &sent.headers {
        assert_eq!(
            got.header(name),
            Some(value.as_str()),
            "{what}: header `{name}` of {id}"
        );
    }
    assert_payload(
        &sent.payload,
        &got.payload,
        &format!("{what}: payload of {id}"),
    );
    let skew = match got.timestamp.duration_since(sent.timestamp) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(
        skew <= Duration::from_millis(1),
        "{what}: timestamp of {id} changed by {skew:?} (sent {:?}, got {:?})",
        sent.timestamp,
        got.timestamp
    );
}

pub(crate) fn assert_payload(sent: &[u8], got: &[u8], what: &str) {
    if sent == got {
        return;
    }
    let first = sent.iter().zip(got).position(|(a, b)| a != b);
    panic!(
        "{what}: sent {} bytes, got {} bytes, first differing byte at {first:?}",
        sent.len(),
        got.len()
    );
}

/// Asserts every arrival is one of `sent`, intact, and that each came first as attempt 1.
pub(crate) fn assert_all_intact(sent: &[Envelope], arrivals: &[Received], what: &str) {
    let by_id: HashMap<&MessageId, &Envelope> = sent.iter().map(|e| (&e.id, e)).collect();
    for r in arrivals {
        assert_same(by_id[&r.envelope.id], &r.envelope, what);
    }
    for r in first_arrivals(arrivals) {
        assert_eq!(
            r.attempt, 1,
            "{what}: first delivery of {} should be attempt 1",
            r.envelope.id
        );
    }
}

/// How a competing member reports: which member settled which message, or what went wrong.
type Report = Result<(usize, Delivered), String>;

/// One message a member received and acked.
#[derive(Debug, Clone)]
pub(crate) struct Delivered {
    pub(crate) id: MessageId,
    pub(crate) key: Option<String>,
    pub(crate) seq: Option<u32>,
}

/// Header carrying a per-key sequence number.
pub(crate) const SEQ: &str = "x-conf-seq";

/// Competing members of one group or queue, each a task that receives, works a little, records
/// and acks, one message at a time.
pub(crate) struct Members {
    reports: mpsc::UnboundedReceiver<Report>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Subscription>>,
}

impl Members {
    /// Starts one task per subscription. `work(member, seq)` is how long a message takes.
    pub(crate) fn start(
        subs: Vec<Subscription>,
        work: fn(usize, u32) -> Duration,
        what: &str,
    ) -> Self {
        let (tx, reports) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let tasks = subs
            .into_iter()
            .enumerate()
            .map(|(member, mut sub)| {
                let tx = tx.clone();
                let mut stop_rx = stop_rx.clone();
                let what = what.to_owned();
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop_rx.changed() => break,
                            item = sub.next() => match item {
                                Some(Ok(delivery)) => {
                                    let env = delivery.envelope();
                                    let seq = env.header(SEQ).and_then(|s| s.parse().ok());
                                    let done = Delivered {
                                        id: env.id.clone(),
                                        key: env.key.clone(),
                                        seq,
                                    };
                                    tokio::time::sleep(work(member, seq.unwrap_or(0))).await;
                                    // Reported before the ack: where the broker keeps one
                                    // message per key in flight, reports then come in key order.
                                    let _ = tx.send(Ok((member, done)));
                                    if let Err(e) = delivery.ack().await {
                                        let _ = tx.send(Err(format!("member {member}: ack failed: {e}")));
                                        break;
                                    }
                                }
                                Some(Err(e)) => {
                                    println!("note: {what}: member {member}: receive error: {e}");
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                None => break,
                            },
                        }
                    }
                    sub
                })
            })
            .collect();
        Self {
            reports,
            stop,
            tasks,
        }
    }

    /// The next report within `wait`; fails the case on timeout or a member's error.
    pub(crate) async fn next(
        &mut self,
        wait: Duration,
        progress: impl Fn() -> String,
        what: &str,
    ) -> (usize, Delivered) {
        match tokio::time::timeout(wait, self.reports.recv()).await {
            Ok(Some(Ok(report))) => report,
            Ok(Some(Err(e))) => panic!("{what}: {e}"),
            Ok(None) => panic!("{what}: every member's subscription ended ({})", progress()),
            Err(_) => panic!("{what}: {}, then nothing within {wait:?}", progress()),
        }
    }

    /// Reports arriving within `quiet` (late duplicates, strays).
    pub(crate) async fn drain(&mut self, quiet: Duration, what: &str) -> Vec<(usize, Delivered)> {
        let deadline = Instant::now() + quiet;
        let mut late = Vec::new();
        while let Ok(Some(report)) = tokio::time::timeout_at(deadline, self.reports.recv()).await {
            late.push(report.unwrap_or_else(|e| panic!("{what}: {e}")));
        }
        late
    }

    /// Stops the members and closes their subscriptions.
    pub(crate) async fn stop(self, what: &str) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let mut sub = task
                .await
                .unwrap_or_else(|e| panic!("{what}: a member task failed: {e}"));
            let _ = sub.close().await;
        }
    }
}

/// Publishes waves of keyed messages through `publish` to competing `subs` until every member
/// has had some (at least 60 and at most 200 messages), then asserts no message was lost, that
/// every member did part of the work, and that duplicates stay within the at-least-once
/// allowance (10 %).
pub(crate) async fn assert_work_is_shared<P, Fut>(
    h: &Harness,
    subs: Vec<Subscription>,
    mut publish: P,
    what: &str,
) where
    P: FnMut(Vec<Envelope>) -> Fut,
    Fut: Future<Output = ()>,
{
    const WAVE: usize = 20;
    const MIN: usize = 60;
    const MAX: usize = 200;
    let members = subs.len();
    // A little work per message, so that one member cannot drain everything at once.
    let mut running = Members::start(subs, |_, _| Duration::from_millis(2), what);
    let mut sent = HashSet::new();
    let mut seen = HashSet::new();
    let mut per_member = vec![0usize; members];
    let mut duplicates = 0usize;
    loop {
        let wave: Vec<Envelope> = (sent.len()..sent.len() + WAVE)
            .map(|i| Envelope::new("conf.work", format!("work item {i}")).with_key(format!("k{i}")))
            .collect();
        sent.extend(wave.iter().map(|e| e.id.clone()));
        publish(wave).await;
        while seen.len() < sent.len() {
            let progress = || format!("{} of {} messages arrived", seen.len(), sent.len());
            let (member, done) = running.next(h.receive_timeout, progress, what).await;
            assert!(
                sent.contains(&done.id),
                "{what}: received {}, which was not sent here",
                done.id
            );
            per_member[member] += 1;
            if !seen.insert(done.id) {
                duplicates += 1;
            }
        }
        let everyone = per_member.iter().all(|&n| n > 0);
        if (everyone && sent.len() >= MIN) || sent.len() >= MAX {
            break;
        }
    }
    for (member, done) in running.drain(h.quiet_period, what).await {
        assert!(
            sent.contains(&done.id),
            "{what}: received {}, which was not sent here",
            done.id
        );
        per_member[member] += 1;
        duplicates += 1;
    }
    running.stop(what).await;
    assert!(
        per_member.iter().all(|&n| n > 0),
        "{what}: the work was not shared: deliveries per member {per_member:?} for {} messages",
        sent.len()
    );
    assert!(
        duplicates * 10 <= sent.len(),
        "{what}: {duplicates} duplicate deliveries for {} messages, beyond the at-least-once \
         allowance of 10%",
        sent.len()
    );
}

/// Asserts that for each key, the first arrivals of its sequence numbers are `0, 1, 2, …,
/// per_key - 1` in that order (later duplicates, as at-least-once allows, are ignored).
pub(crate) fn assert_per_key_order(
    arrivals: impl IntoIterator<Item = (String, u32)>,
    keys: usize,
    per_key: u32,
    what: &str,
) {
    let mut by_key: HashMap<String, Vec<u32>> = HashMap::new();
    for (key, seq) in arrivals {
        let seqs = by_key.entry(key).or_default();
        if !seqs.contains(&seq) {
            seqs.push(seq);
        }
    }
    assert_eq!(
        by_key.len(),
        keys,
        "{what}: messages arrived for {} keys",
        by_key.len()
    );
    let expected: Vec<u32> = (0..per_key).collect();
    for (key, seqs) in &by_key {
        assert_eq!(
            seqs, &expected,
            "{what}: order of key `{key}` (publish order is 0, 1, 2, …)"
        );
    }
}
