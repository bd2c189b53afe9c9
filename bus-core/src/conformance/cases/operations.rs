//! What operators rely on: backlog counts and delayed publish.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::conformance::support::{
    ack, assert_same, consume, ids, next_within, publish, receive_all, recv, send, skip, subscribe,
    unique, Next,
};
use crate::conformance::Harness;
use crate::{
    Backlog, BacklogOf, ConsumeOptions, Delay, Envelope, ErrorKind, SubscribeOptions, Subscription,
};

/// How many messages the backlog case leaves waiting.
const WAITING: usize = 12;

fn batch(kind: &str, count: usize) -> Vec<Envelope> {
    (0..count)
        .map(|i| Envelope::new(kind, format!("{kind} {i}")))
        .collect()
}

/// Reads the backlog of `of` until `done` holds for it, and returns that reading; fails the
/// case if it does not hold within `wait`. A reading the adapter marks exact must hold at
/// once when `exact_at_once` is set.
async fn backlog_until(
    h: &Harness,
    of: &BacklogOf,
    wait: Duration,
    exact_at_once: bool,
    done: impl Fn(&Backlog) -> bool,
    expected: &str,
    what: &str,
) -> Backlog {
    let deadline = Instant::now() + wait;
    let mut first = true;
    loop {
        let backlog = h
            .broker
            .backlog(of)
            .await
            .unwrap_or_else(|e| panic!("{what}: backlog of {of} failed: {e}"));
        if done(&backlog) {
            return backlog;
        }
        assert!(
            !(first && exact_at_once && !backlog.approximate),
            "{what}: backlog of {of} is {backlog:?}, exact by its own account, but {expected} \
             was expected"
        );
        assert!(
            Instant::now() < deadline,
            "{what}: backlog of {of} still {backlog:?} after {wait:?}; expected {expected}"
        );
        first = false;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `WAITING` messages published to a group with no consumer reading, and sent to a queue
/// nobody consumes, are counted by [`Broker::backlog`](crate::Broker::backlog): at once where
/// the adapter says its count is exact, within the receive timeout where it is approximate.
/// Once every message was consumed and acked, the backlog drains to zero. Kafka's counts come
/// with one entry per partition, which must add up.
pub async fn backlog_counts_what_waits(h: Harness) {
    const CASE: &str = "backlog_counts_what_waits";
    let caps = h.capabilities();
    if let Some(reason) = caps.backlog.unsupported_reason() {
        skip(
            CASE,
            format!("{}: backlog counts unsupported: {reason}", caps.name),
        );
        return;
    }
    let wait = h.receive_timeout;
    let exactly = |n: u64| move |b: &Backlog| b.total() == n;

    // A queue nobody consumes yet.
    let queue = unique("backlog.q");
    let sent = batch("conf.backlog.queue", WAITING);
    for envelope in &sent {
        send(&h, &queue, envelope.clone(), CASE).await;
    }
    let of = BacklogOf::queue(&queue);
    let n = WAITING as u64;
    let counted = backlog_until(&h, &of, wait, true, exactly(n), &format!("{n}"), CASE).await;
    check_partitions(&counted, CASE);
    let mut consumer = consume(&h, &queue, ConsumeOptions::default(), CASE).await;
    receive_all(&mut consumer, &ids(&sent), wait, CASE).await;
    backlog_until(
        &h,
        &of,
        wait,
        false,
        exactly(0),
        "0 once all were acked",
        CASE,
    )
    .await;
    close(consumer, CASE).await;

    // A group that subscribed once and does not read now.
    let topic = unique("backlog.t");
    let group = format!("{topic}.g1");
    let first = subscribe(&h, &topic, SubscribeOptions::group(&group), CASE).await;
    // Where the group outlives its members, nobody is connected while the messages wait;
    // elsewhere the member stays, unread, so that the group exists.
    let idle = if caps.durable {
        close(first, CASE).await;
        None
    } else {
        Some(first)
    };
    let sent = batch("conf.backlog.topic", WAITING);
    for envelope in &sent {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }
    let of = BacklogOf::group(&topic, &group);
    let counted = backlog_until(&h, &of, wait, true, exactly(n), &format!("{n}"), CASE).await;
    check_partitions(&counted, CASE);
    let mut sub = match idle {
        Some(sub) => sub,
        None => subscribe(&h, &topic, SubscribeOptions::group(&group), CASE).await,
    };
    receive_all(&mut sub, &ids(&sent), wait, CASE).await;
    backlog_until(
        &h,
        &of,
        wait,
        false,
        exactly(0),
        "0 once all were acked",
        CASE,
    )
    .await;
    close(sub, CASE).await;
}

/// Per-partition entries, where there are any, add up to the total.
fn check_partitions(backlog: &Backlog, what: &str) {
    if backlog.partitions.is_empty() {
        return;
    }
    let lag: u64 = backlog.partitions.iter().map(|p| p.lag).sum();
    assert_eq!(
        lag,
        backlog.total(),
        "{what}: the partitions' lag does not add up to the total: {backlog:?}"
    );
}

async fn close(mut sub: Subscription, what: &str) {
    if let Err(e) = sub.close().await {
        panic!("{what}: closing a subscription failed: {e}");
    }
}

/// A message published with a delay arrives no sooner than the delay, as the same message
/// (id, kind, payload, headers) at its first attempt, while a message published after it
/// without one is not held up. The same on a queue with a not-before time. A delay longer than
/// [`Capabilities::max_delay`](crate::Capabilities::max_delay) is refused as unsupported, and
/// nothing of it is ever delivered.
pub async fn delayed_publish_arrives_after_delay(h: Harness) {
    const CASE: &str = "delayed_publish_arrives_after_delay";
    const DELAY: Duration = Duration::from_secs(2);
    // Timer granularity only: a broker counting in whole seconds must round up, not down.
    const MARGIN: Duration = Duration::from_millis(20);
    let caps = h.capabilities();
    if let Some(reason) = caps.delayed_publish.unsupported_reason() {
        skip(
            CASE,
            format!("{}: delayed publish unsupported: {reason}", caps.name),
        );
        return;
    }

    // On a topic, after a while.
    let topic = unique("delayed.t");
    let mut sub = subscribe(
        &h,
        &topic,
        SubscribeOptions::group(format!("{topic}.g1")),
        CASE,
    )
    .await;
    let delayed = Envelope::new("conf.delayed", "later").with_header("x-conf-delayed", "yes");
    let published_at = Instant::now();
    if let Err(e) = h
        .broker
        .publish_delayed(&topic, delayed.clone(), Delay::For(DELAY))
        .await
    {
        panic!("{CASE}: publish_delayed to `{topic}` failed: {e}");
    }
    let at_once = Envelope::new("conf.at_once", "now");
    publish(&h, &topic, at_once.clone(), CASE).await;
    expect_after(
        &mut sub,
        &delayed,
        &at_once,
        published_at,
        DELAY - MARGIN,
        &h,
        CASE,
    )
    .await;

    if let Some(max) = caps.max_delay {
        let refused = Envelope::new("conf.too_late", "never");
        match h
            .broker
            .publish_delayed(
                &topic,
                refused.clone(),
                Delay::For(max + Duration::from_secs(1)),
            )
            .await
        {
            Err(e) if e.kind() == ErrorKind::Unsupported => {}
            other => panic!(
                "{CASE}: a delay of {:?}, beyond max_delay {max:?}, gave {other:?} instead of \
                 an Unsupported error",
                max + Duration::from_secs(1)
            ),
        }
    }
    close(sub, CASE).await;

    // On a queue, not before a moment.
    let queue = unique("delayed.q");
    let mut consumer = consume(&h, &queue, ConsumeOptions::default(), CASE).await;
    let delayed = Envelope::new("conf.delayed", "later on a queue");
    let sent_at = Instant::now();
    let not_before = SystemTime::now() + DELAY;
    if let Err(e) = h
        .broker
        .send_delayed(&queue, delayed.clone(), Delay::Until(not_before))
        .await
    {
        panic!("{CASE}: send_delayed to queue `{queue}` failed: {e}");
    }
    let at_once = Envelope::new("conf.at_once", "now on a queue");
    send(&h, &queue, at_once.clone(), CASE).await;
    expect_after(
        &mut consumer,
        &delayed,
        &at_once,
        sent_at,
        DELAY - MARGIN,
        &h,
        CASE,
    )
    .await;
    let early = SystemTime::now();
    assert!(
        early + MARGIN >= not_before,
        "{CASE}: delivered {:?} before its not-before time",
        not_before.duration_since(early).unwrap_or_default()
    );
    close(consumer, CASE).await;
}

/// Receives `at_once` and then `delayed`, the latter no sooner than `min` after `since`.
async fn expect_after(
    sub: &mut Subscription,
    delayed: &Envelope,
    at_once: &Envelope,
    since: Instant,
    min: Duration,
    h: &Harness,
    what: &str,
) {
    let mut at_once_arrived = false;
    loop {
        let d = recv(sub, min + h.receive_timeout, what).await;
        let id = d.envelope().id.clone();
        if id == at_once.id {
            at_once_arrived = true;
            ack(d, what).await;
            continue;
        }
        assert_eq!(
            id, delayed.id,
            "{what}: received {id}, which was not sent here"
        );
        let elapsed = since.elapsed();
        assert!(
            elapsed >= min,
            "{what}: the delayed message arrived {elapsed:?} after it was published, sooner \
             than its delay"
        );
        assert!(
            at_once_arrived,
            "{what}: the message published without a delay arrived only after the delayed one"
        );
        assert_eq!(d.attempt(), 1, "{what}: attempt of a delayed message");
        assert_same(delayed, d.envelope(), what);
        ack(d, what).await;
        break;
    }
    if let Next::Delivery(d) = next_within(sub, h.quiet_period, what).await {
        panic!(
            "{what}: a copy came after the delayed message: {} (kind `{}`, attempt {})",
            d.envelope().id,
            d.envelope().kind,
            d.attempt()
        );
    }
}
