//! Leases: a broker that redelivers what its consumer holds too long must not get the chance
//! while the consumer is still working on it.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::conformance::support::{consume, send, skip, unique};
use crate::conformance::Harness;
use crate::runtime::{handler_fn, Consumer, DeliveryInfo};
use crate::{ConsumeOptions, Envelope, MessageId};

/// The longest lease this case waits out (it runs a handler three times as long).
const LONGEST_LEASE: Duration = Duration::from_secs(20);

/// With the broker's lease short (the harness's ack wait or visibility timeout), a handler
/// that runs three times as long runs exactly once, and the delivery queued behind it in the
/// consumer (one handler at a time) is not redelivered either: the consumer extends both
/// leases. Needs a subscription that declares its lease ([`Subscription::lease`]).
///
/// [`Subscription::lease`]: crate::Subscription::lease
pub async fn long_handler_is_not_redelivered(h: Harness) {
    const CASE: &str = "long_handler_is_not_redelivered";
    let caps = h.capabilities();
    let queue = unique("lease");
    let subscription = consume(&h, &queue, ConsumeOptions::default(), CASE).await;
    let Some(lease) = subscription.lease() else {
        skip(
            CASE,
            format!(
                "{}: the subscription declares no lease (Subscription::lease is None): there is \
                 no broker timer for the consumer to extend (see the adapter's docs for what \
                 bounds a handler's time)",
                caps.name
            ),
        );
        return;
    };
    if lease > LONGEST_LEASE {
        skip(
            CASE,
            format!(
                "{}: the harness's lease is {lease:?}, longer than this case waits out \
                 ({LONGEST_LEASE:?}); give the harness a shorter ack wait or visibility timeout",
                caps.name
            ),
        );
        return;
    }
    let slow_for = lease * 3;
    let (runs_tx, mut runs) = mpsc::unbounded_channel::<(MessageId, u32)>();
    let handler = handler_fn(move |envelope: Envelope, info: DeliveryInfo| {
        let _ = runs_tx.send((envelope.id.clone(), info.attempt()));
        async move {
            if envelope.kind == "conf.slow" {
                tokio::time::sleep(slow_for).await;
            }
        }
    });
    let consumer = Consumer::new(subscription, handler)
        .with_concurrency(1)
        .with_max_pending(4)
        .with_shutdown_timeout(h.receive_timeout)
        .spawn();

    let slow = Envelope::new("conf.slow", "takes three leases");
    let behind = Envelope::new("conf.behind", "waits for the slow one");
    send(&h, &queue, slow.clone(), CASE).await;
    send(&h, &queue, behind.clone(), CASE).await;

    let wait = slow_for + h.receive_timeout;
    let mut seen = Vec::new();
    while !seen.iter().any(|(id, _)| *id == behind.id) {
        match tokio::time::timeout(wait, runs.recv()).await {
            Ok(Some(run)) => seen.push(run),
            _ => panic!("{CASE}: both messages not handled within {wait:?}; runs: {seen:?}"),
        }
    }
    // Watch for a redelivery for one more lease and the quiet period.
    let deadline = tokio::time::Instant::now() + lease + h.quiet_period;
    while let Ok(Some(run)) = tokio::time::timeout_at(deadline, runs.recv()).await {
        seen.push(run);
    }
    let report = consumer
        .stop()
        .await
        .unwrap_or_else(|e| panic!("{CASE}: stopping the consumer: {e}"));
    let runs_of = |id: &MessageId| seen.iter().filter(|(i, _)| i == id).count();
    assert_eq!(
        (runs_of(&slow.id), runs_of(&behind.id)),
        (1, 1),
        "{CASE}: with a lease of {lease:?} and a handler of {slow_for:?}, each message must run \
         once; runs (id, attempt): {seen:?}"
    );
    assert!(
        seen.iter().all(|(_, attempt)| *attempt == 1),
        "{CASE}: a redelivery was counted: {seen:?}"
    );
    assert_eq!(
        (report.received, report.acked),
        (2, 2),
        "{CASE}: the consumer received a redelivered copy: {report:?}"
    );
}
