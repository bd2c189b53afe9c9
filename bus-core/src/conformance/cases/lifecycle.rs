//! Limits and lifecycle: oversize payloads, closing subscriptions and the broker, restarts.

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::conformance::support::{
    ack, assert_nothing_else, assert_quiet, assert_same, consume, next_within, publish, recv, skip,
    subscribe, unique, Next,
};
use crate::conformance::Harness;
use crate::{
    ConsumeOptions, Envelope, Error, ErrorKind, MessageId, ServeOptions, SubscribeOptions,
};

/// Largest declared payload limit the oversize case will allocate for.
const MAX_TESTABLE_PAYLOAD: usize = 128 * 1024 * 1024;

/// A payload one byte over `Capabilities::max_payload_bytes` fails with
/// `ErrorKind::PayloadTooLarge` on publish and on send, and the connection keeps working.
pub async fn oversize_payload_rejected(h: Harness) {
    const CASE: &str = "oversize_payload_rejected";
    let caps = h.capabilities();
    let Some(max) = caps.max_payload_bytes else {
        skip(
            CASE,
            format!(
                "{} declares no payload limit (Capabilities::max_payload_bytes is None)",
                caps.name
            ),
        );
        return;
    };
    if max >= MAX_TESTABLE_PAYLOAD {
        skip(
            CASE,
            format!(
                "{}'s payload limit of {max} bytes is too large to allocate in a test",
                caps.name
            ),
        );
        return;
    }
    let topic = unique("big");
    let mut sub = subscribe(
        &h,
        &topic,
        SubscribeOptions::group(format!("{topic}.g1")),
        CASE,
    )
    .await;
    let oversize = Envelope::new("conf.oversize", vec![b'x'; max + 1]);
    let expect_too_large = |result: Result<(), Error>, how: &str| match result {
        Ok(()) => panic!("{CASE}: {how} of {} bytes (limit {max}) succeeded", max + 1),
        Err(e) => assert_eq!(
            e.kind(),
            ErrorKind::PayloadTooLarge,
            "{CASE}: {how}: error kind ({e})"
        ),
    };
    expect_too_large(h.broker.publish(&topic, oversize.clone()).await, "publish");
    let queue = unique("bigq");
    expect_too_large(h.broker.send(&queue, oversize).await, "send");

    let small = Envelope::new("conf.small", "still works");
    publish(&h, &topic, small.clone(), CASE).await;
    let d = recv(&mut sub, h.receive_timeout, CASE).await;
    assert_same(
        &small,
        d.envelope(),
        &format!("{CASE}: a message after the refusal"),
    );
    ack(d, CASE).await;
    let own = std::iter::once(small.id.clone()).collect();
    assert_nothing_else(&mut sub, h.quiet_period, &own, CASE).await;
}

/// After `Broker::close`, publish, send, subscribe and consume (and request and serve where
/// available) fail with `ErrorKind::Closed`, and a subscription opened before ends.
pub async fn publish_after_close_fails_closed(h: Harness) {
    const CASE: &str = "publish_after_close_fails_closed";
    let topic = unique("closed");
    let mut open = subscribe(&h, &topic, SubscribeOptions::default(), CASE).await;
    h.broker
        .close()
        .await
        .unwrap_or_else(|e| panic!("{CASE}: Broker::close failed: {e}"));
    let expect_closed = |err: Option<Error>, op: &str| match err {
        None => panic!("{CASE}: {op} after close succeeded"),
        Some(e) => {
            assert_eq!(
                e.kind(),
                ErrorKind::Closed,
                "{CASE}: {op} after close: error kind ({e})"
            );
            assert!(e.is_closed(), "{CASE}: Error::is_closed");
        }
    };
    let envelope = Envelope::new("conf.after_close", "too late");
    expect_closed(
        h.broker.publish(&topic, envelope.clone()).await.err(),
        "publish",
    );
    expect_closed(
        h.broker
            .publish_batch(&topic, vec![envelope.clone()])
            .await
            .err(),
        "publish_batch",
    );
    expect_closed(
        h.broker
            .send(&unique("closedq"), envelope.clone())
            .await
            .err(),
        "send",
    );
    expect_closed(
        h.broker
            .subscribe(&topic, SubscribeOptions::default())
            .await
            .err(),
        "subscribe",
    );
    expect_closed(
        h.broker
            .consume(&unique("closedq"), ConsumeOptions::default())
            .await
            .err(),
        "consume",
    );
    if h.capabilities().request_reply.is_available() {
        expect_closed(
            h.broker
                .request(&topic, envelope, Duration::from_secs(1))
                .await
                .err(),
            "request",
        );
        expect_closed(
            h.broker.serve(&topic, ServeOptions::default()).await.err(),
            "serve",
        );
    }
    match next_within(&mut open, h.receive_timeout, CASE).await {
        Next::Ended => {}
        Next::TimedOut => panic!(
            "{CASE}: a subscription opened before Broker::close did not end within {:?}",
            h.receive_timeout
        ),
        Next::Delivery(d) => panic!(
            "{CASE}: got {} after close, which nobody published",
            d.envelope().id
        ),
    }
}

/// `Subscription::close` succeeds (twice, too), ends the stream, and leaves deliveries already
/// received settleable; a new subscription in the group then gets new messages but not the one
/// acked after the close. A closed queue consumer ends as well.
pub async fn subscription_close_ends_stream(h: Harness) {
    const CASE: &str = "subscription_close_ends_stream";
    let topic = unique("subclose");
    let group = format!("{topic}.g1");
    let mut sub = subscribe(&h, &topic, SubscribeOptions::group(&group), CASE).await;
    let first = Envelope::new("conf.before_close", "one");
    publish(&h, &topic, first.clone(), CASE).await;
    let held = recv(&mut sub, h.receive_timeout, CASE).await;
    assert_eq!(held.envelope().id, first.id, "{CASE}: first delivery");
    sub.close()
        .await
        .unwrap_or_else(|e| panic!("{CASE}: Subscription::close failed: {e}"));
    assert!(
        sub.next().await.is_none(),
        "{CASE}: next after close should be None"
    );
    sub.close()
        .await
        .unwrap_or_else(|e| panic!("{CASE}: a second Subscription::close failed: {e}"));
    if let Err(e) = held.ack().await {
        panic!("{CASE}: a delivery received before the close could not be acked after it: {e}");
    }

    let mut next = subscribe(&h, &topic, SubscribeOptions::group(&group), CASE).await;
    let second = Envelope::new("conf.after_close", "two");
    publish(&h, &topic, second.clone(), CASE).await;
    let d = recv(&mut next, h.receive_timeout, CASE).await;
    assert_eq!(
        d.envelope().id,
        second.id,
        "{CASE}: the new subscription got {} (attempt {}) instead of the new message",
        d.envelope().id,
        d.attempt()
    );
    ack(d, CASE).await;
    assert_quiet(&mut next, h.quiet_period, CASE).await;

    let queue = unique("subcloseq");
    let mut consumer = consume(&h, &queue, ConsumeOptions::default(), CASE).await;
    consumer
        .close()
        .await
        .unwrap_or_else(|e| panic!("{CASE}: closing a queue consumer failed: {e}"));
    assert!(
        consumer.next().await.is_none(),
        "{CASE}: a closed queue consumer yielded"
    );
}

/// With a restart hook, on a durable adapter: the broker restarts while messages are being
/// published and consumed, the adapter reconnects by itself, and every publish that returned
/// `Ok` (before, during and after the restart) is received; duplicates are allowed.
pub async fn broker_restart_loses_no_confirmed_message(h: Harness) {
    const CASE: &str = "broker_restart_loses_no_confirmed_message";
    const BEFORE: usize = 30;
    // Publishes while the broker restarts are paced, so they span the restart rather than
    // finishing before the broker has even begun to stop.
    const DURING_MAX: usize = 500;
    const DURING_PACE: Duration = Duration::from_millis(20);
    const AFTER: usize = 20;
    let caps = h.capabilities();
    if !h.can_restart() {
        skip(
            CASE,
            "the harness has no restart hook (Harness::with_restart)",
        );
        return;
    }
    if !caps.durable {
        skip(
            CASE,
            format!("{} is not durable (Capabilities::durable is false): a restart may lose messages by design", caps.name),
        );
        return;
    }
    let topic = unique("restart");
    let mut sub = subscribe(
        &h,
        &topic,
        SubscribeOptions::group(format!("{topic}.g1")),
        CASE,
    )
    .await;
    let (received_tx, mut received) = mpsc::unbounded_channel::<MessageId>();
    let (stop, mut stopped) = watch::channel(false);
    let consumer = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                item = sub.next() => match item {
                    Some(Ok(d)) => {
                        let _ = received_tx.send(d.envelope().id.clone());
                        // A failed ack during the restart means a redelivery: allowed.
                        let _ = d.ack().await;
                    }
                    Some(Err(e)) => {
                        println!("note: {CASE}: receive error: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    None => panic!("{CASE}: the subscription ended during the restart"),
                },
            }
        }
        let _ = sub.close().await;
    });

    let envelope = |i: usize| {
        Envelope::new("conf.restart", format!("message {i}")).with_key(format!("k{}", i % 4))
    };
    let mut confirmed: HashSet<MessageId> = HashSet::new();
    for i in 0..BEFORE {
        let e = envelope(i);
        confirmed.insert(e.id.clone());
        publish(&h, &topic, e, CASE).await;
    }
    let restart = {
        let h = h.clone();
        tokio::spawn(async move { h.restart().await })
    };
    let mut failed = 0usize;
    let mut i = BEFORE;
    while !restart.is_finished() && i < BEFORE + DURING_MAX {
        let e = envelope(i);
        let id = e.id.clone();
        match h.broker.publish(&topic, e).await {
            Ok(()) => {
                confirmed.insert(id);
                tokio::time::sleep(DURING_PACE).await;
            }
            Err(_) => {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        i += 1;
    }
    restart
        .await
        .unwrap_or_else(|e| panic!("{CASE}: the restart hook failed: {e}"));
    // The adapter must reconnect by itself; publishing may fail until it has.
    let recovery = h.receive_timeout * 3;
    for j in 0..AFTER {
        let e = envelope(i + j);
        let deadline = Instant::now() + recovery;
        loop {
            match h.broker.publish(&topic, e.clone()).await {
                Ok(()) => break,
                Err(err) if Instant::now() < deadline => {
                    println!("note: {CASE}: publish after the restart failed, retrying: {err}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => panic!(
                    "{CASE}: publishing did not recover within {recovery:?} of the restart: {err}"
                ),
            }
        }
        confirmed.insert(e.id);
    }

    let mut seen = HashSet::new();
    while !confirmed.is_subset(&seen) {
        match tokio::time::timeout(recovery, received.recv()).await {
            Ok(Some(id)) => {
                seen.insert(id);
            }
            _ => {
                let lost = confirmed.difference(&seen).count();
                panic!(
                    "{CASE}: {lost} of {} confirmed messages never arrived ({failed} publishes \
                     failed during the restart and were not counted)",
                    confirmed.len()
                );
            }
        }
    }
    let _ = stop.send(true);
    consumer
        .await
        .unwrap_or_else(|e| panic!("{CASE}: the consumer task failed: {e}"));
    println!(
        "{CASE}: {} confirmed, {failed} failed during the restart, all confirmed received",
        confirmed.len()
    );
}
