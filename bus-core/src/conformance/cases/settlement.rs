//! Settlement: nack now and with delay, reject to the dead-letter queue, dropped deliveries.

use std::time::Duration;

use tokio::time::Instant;

use crate::conformance::support::{
    ack, assert_quiet, assert_same, consume, next_within, no_dead_letter, publish, recv, send,
    skip, subscribe, unique, Next,
};
use crate::conformance::Harness;
use crate::{
    headers, ConsumeOptions, Delivery, Envelope, Redeliver, SubscribeOptions, Subscription,
};

/// The reason the reject cases give.
const REJECT_REASON: &str = "conformance: payload cannot be processed";

/// `nack(Redeliver::Now)` brings the same message back as the next attempt, twice over, on a
/// topic and on a queue; once acked it stays away.
pub async fn nack_now_redelivers(h: Harness) {
    const CASE: &str = "nack_now_redelivers";
    let topic = unique("nack");
    let mut sub = subscribe(
        &h,
        &topic,
        SubscribeOptions::group(format!("{topic}.g1")),
        CASE,
    )
    .await;
    let envelope = Envelope::new("conf.nacked", "nack me")
        .with_key("k")
        .with_header("x-conf", "kept");
    publish(&h, &topic, envelope.clone(), CASE).await;
    nack_twice_then_ack(
        &mut sub,
        &envelope,
        h.receive_timeout,
        &format!("{CASE} (topic)"),
    )
    .await;
    assert_quiet(&mut sub, h.quiet_period, CASE).await;

    let queue = unique("nackq");
    let envelope = Envelope::new("conf.nacked", "nack me on a queue");
    send(&h, &queue, envelope.clone(), CASE).await;
    let mut consumer = consume(&h, &queue, ConsumeOptions::default(), CASE).await;
    nack_twice_then_ack(
        &mut consumer,
        &envelope,
        h.receive_timeout,
        &format!("{CASE} (queue)"),
    )
    .await;
    assert_quiet(&mut consumer, h.quiet_period, CASE).await;
}

async fn nack_twice_then_ack(sub: &mut Subscription, sent: &Envelope, wait: Duration, what: &str) {
    for attempt in 1..=3 {
        let d = recv(sub, wait, what).await;
        assert_same(sent, d.envelope(), what);
        assert_eq!(
            d.attempt(),
            attempt,
            "{what}: attempt after {} nack(s)",
            attempt - 1
        );
        if attempt < 3 {
            if let Err(e) = d.nack(Redeliver::Now).await {
                panic!("{what}: nack failed: {e}");
            }
        } else {
            ack(d, what).await;
        }
    }
}

/// `nack(Redeliver::After(1 s))` brings the message back as attempt 2 no sooner than 1 s later,
/// and a message published meanwhile is not held up behind it.
pub async fn nack_after_delay_waits(h: Harness) {
    const CASE: &str = "nack_after_delay_waits";
    const DELAY: Duration = Duration::from_secs(1);
    // Timer granularity only; a broker counting in whole seconds must round up, not down.
    const MARGIN: Duration = Duration::from_millis(20);
    let caps = h.capabilities();
    if let Some(reason) = caps.delayed_redelivery.unsupported_reason() {
        skip(
            CASE,
            format!("{}: delayed redelivery unsupported: {reason}", caps.name),
        );
        return;
    }
    let topic = unique("delay");
    let mut sub = subscribe(
        &h,
        &topic,
        SubscribeOptions::group(format!("{topic}.g1")),
        CASE,
    )
    .await;
    let delayed = Envelope::new("conf.delayed", "come back later");
    publish(&h, &topic, delayed.clone(), CASE).await;
    let d = recv(&mut sub, h.receive_timeout, CASE).await;
    assert_eq!(d.envelope().id, delayed.id, "{CASE}: first delivery");
    let nacked_at = Instant::now();
    if let Err(e) = d.nack(Redeliver::After(DELAY)).await {
        panic!("{CASE}: nack failed: {e}");
    }
    let meanwhile = Envelope::new("conf.meanwhile", "not held up");
    publish(&h, &topic, meanwhile.clone(), CASE).await;

    let mut meanwhile_arrived = false;
    loop {
        let d = recv(&mut sub, DELAY + h.receive_timeout, CASE).await;
        let id = d.envelope().id.clone();
        if id == meanwhile.id {
            meanwhile_arrived = true;
            ack(d, CASE).await;
            continue;
        }
        assert_eq!(
            id, delayed.id,
            "{CASE}: received {id}, which was not sent here"
        );
        let elapsed = nacked_at.elapsed();
        assert!(
            elapsed + MARGIN >= DELAY,
            "{CASE}: redelivered {elapsed:?} after nack(After({DELAY:?}))"
        );
        assert_eq!(d.attempt(), 2, "{CASE}: attempt of the delayed redelivery");
        assert_same(&delayed, d.envelope(), CASE);
        ack(d, CASE).await;
        break;
    }
    assert!(
        meanwhile_arrived,
        "{CASE}: a message published after the nack arrived only after the delayed one: the \
         subscription was held up behind the delay"
    );
}

/// A message rejected on a topic lands in `headers::dead_letter_queue(topic)` with its id,
/// kind, key, payload and headers, plus the reason, original topic, group and attempt count;
/// the group does not get it again.
pub async fn reject_dead_letters_from_topic(h: Harness) {
    const CASE: &str = "reject_dead_letters_from_topic";
    let caps = h.capabilities();
    if no_dead_letter(CASE, &caps) {
        return;
    }
    let topic = unique("rej");
    let group = format!("{topic}.g1");
    let mut sub = subscribe(&h, &topic, SubscribeOptions::group(&group), CASE).await;
    let poison = Envelope::new("conf.poison", "poison pill")
        .with_key("poison-key")
        .with_header("x-conf", "kept");
    publish(&h, &topic, poison.clone(), CASE).await;
    reject_on_second_attempt(&mut sub, &poison, h.receive_timeout, CASE).await;
    assert_dead_letter(&h, &topic, Some(&group), &poison, CASE).await;
    assert_quiet(&mut sub, h.quiet_period, CASE).await;
}

/// A message rejected on a queue lands in `headers::dead_letter_queue(queue)` with the reason,
/// original queue and attempt count; the queue does not deliver it again.
pub async fn reject_dead_letters_from_queue(h: Harness) {
    const CASE: &str = "reject_dead_letters_from_queue";
    let caps = h.capabilities();
    if no_dead_letter(CASE, &caps) {
        return;
    }
    let queue = unique("rejq");
    let poison = Envelope::new("conf.poison", "poison pill on a queue")
        .with_key("poison-key")
        .with_header("x-conf", "kept");
    send(&h, &queue, poison.clone(), CASE).await;
    let mut consumer = consume(&h, &queue, ConsumeOptions::default(), CASE).await;
    reject_on_second_attempt(&mut consumer, &poison, h.receive_timeout, CASE).await;
    assert_dead_letter(&h, &queue, None, &poison, CASE).await;
    assert_quiet(&mut consumer, h.quiet_period, CASE).await;
}

async fn reject_on_second_attempt(
    sub: &mut Subscription,
    sent: &Envelope,
    wait: Duration,
    what: &str,
) {
    let first = recv(sub, wait, what).await;
    assert_eq!(first.envelope().id, sent.id, "{what}: first delivery");
    if let Err(e) = first.nack(Redeliver::Now).await {
        panic!("{what}: nack failed: {e}");
    }
    let second = recv(sub, wait, what).await;
    assert_eq!(second.envelope().id, sent.id, "{what}: redelivery");
    assert_eq!(second.attempt(), 2, "{what}: attempt of the redelivery");
    if let Err(e) = second.reject(REJECT_REASON).await {
        panic!("{what}: reject failed: {e}");
    }
}

async fn assert_dead_letter(
    h: &Harness,
    origin: &str,
    group: Option<&str>,
    sent: &Envelope,
    case: &str,
) {
    let dlq = headers::dead_letter_queue(origin);
    let what = format!("{case}: dead-letter queue `{dlq}`");
    let mut dead_letters = consume(h, &dlq, ConsumeOptions::default(), &what).await;
    let dead: Delivery = match next_within(&mut dead_letters, h.receive_timeout, &what).await {
        Next::Delivery(d) => *d,
        _ => panic!(
            "{what}: the rejected message did not arrive within {:?}",
            h.receive_timeout
        ),
    };
    let got = dead.envelope();
    assert_eq!(got.id, sent.id, "{what}: id");
    assert_eq!(got.kind, sent.kind, "{what}: kind");
    assert_eq!(got.key, sent.key, "{what}: key");
    assert_eq!(got.payload, sent.payload, "{what}: payload");
    assert_eq!(
        got.header("x-conf"),
        Some("kept"),
        "{what}: the message's own header"
    );
    let reason = got.header(headers::DLQ_REASON).unwrap_or_default();
    assert!(
        reason.contains(REJECT_REASON),
        "{what}: header `{}` is {reason:?}, not the reason given to reject",
        headers::DLQ_REASON
    );
    assert_eq!(
        got.header(headers::DLQ_ORIGINAL_TOPIC),
        Some(origin),
        "{what}: original topic"
    );
    assert_eq!(
        got.header(headers::DLQ_ATTEMPTS),
        Some("2"),
        "{what}: attempts"
    );
    if let Some(group) = group {
        if let Some(recorded) = got.header(headers::DLQ_GROUP) {
            assert_eq!(recorded, group, "{what}: group");
        }
    }
    ack(dead, &what).await;
    assert_quiet(&mut dead_letters, h.quiet_period, &what).await;
}

/// A delivery dropped without settlement comes back, same message, as attempt 2, while the
/// subscription is still open; on a topic and on a queue.
pub async fn dropped_delivery_is_redelivered(h: Harness) {
    const CASE: &str = "dropped_delivery_is_redelivered";
    let caps = h.capabilities();
    if !caps.prompt_redelivery_of_dropped {
        skip(
            CASE,
            format!(
                "{} redelivers dropped deliveries only after a broker timeout \
                 (Capabilities::prompt_redelivery_of_dropped is false)",
                caps.name
            ),
        );
        return;
    }
    let topic = unique("drop");
    let mut sub = subscribe(
        &h,
        &topic,
        SubscribeOptions::group(format!("{topic}.g1")),
        CASE,
    )
    .await;
    let envelope = Envelope::new("conf.dropped", "dropped").with_header("x-conf", "kept");
    publish(&h, &topic, envelope.clone(), CASE).await;
    drop_then_receive_again(
        &mut sub,
        &envelope,
        h.receive_timeout,
        &format!("{CASE} (topic)"),
    )
    .await;
    assert_quiet(&mut sub, h.quiet_period, CASE).await;

    let queue = unique("dropq");
    let envelope = Envelope::new("conf.dropped", "dropped from a queue");
    send(&h, &queue, envelope.clone(), CASE).await;
    let mut consumer = consume(&h, &queue, ConsumeOptions::default(), CASE).await;
    drop_then_receive_again(
        &mut consumer,
        &envelope,
        h.receive_timeout,
        &format!("{CASE} (queue)"),
    )
    .await;
    assert_quiet(&mut consumer, h.quiet_period, CASE).await;
}

async fn drop_then_receive_again(
    sub: &mut Subscription,
    sent: &Envelope,
    wait: Duration,
    what: &str,
) {
    let first = recv(sub, wait, what).await;
    assert_eq!(first.envelope().id, sent.id, "{what}: first delivery");
    drop(first);
    let again = recv(sub, wait, what).await;
    assert_same(sent, again.envelope(), what);
    assert_eq!(again.attempt(), 2, "{what}: attempt after the dropped one");
    ack(again, what).await;
}
