//! Input from outside `bus`: messages sent with the broker's own client that `bus` cannot read
//! must not stop a consumer, loop, or vanish.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::conformance::support::{ack, assert_quiet, consume, recv, send, skip, unique};
use crate::conformance::{Harness, RawMessage};
use crate::runtime::{handler_fn, Consumer, DeliveryInfo};
use crate::{headers, ConsumeOptions, Envelope};

/// A message the adapter cannot decode (here: a CloudEvent of a `specversion` `bus` does not
/// read, sent with the broker's own client) is dead-lettered with the reason, its body and id
/// kept; the consumer stays up and handles the next good message; the handler never sees the
/// bad one. Needs the harness's raw-publish hook.
pub async fn undecodable_message_is_dead_lettered(h: Harness) {
    const CASE: &str = "undecodable_message_is_dead_lettered";
    let caps = h.capabilities();
    if !h.can_raw_publish() {
        skip(
            CASE,
            format!(
                "the harness of {} has no raw-publish hook: its broker carries envelopes, not \
                 bytes, so nothing it delivers can be undecodable",
                caps.name
            ),
        );
        return;
    }
    if let Some(reason) = caps.dead_letter.unsupported_reason() {
        skip(CASE, reason);
        return;
    }
    let queue = unique("undecodable");
    let subscription = consume(&h, &queue, ConsumeOptions::default(), CASE).await;
    let (handled_tx, mut handled) = mpsc::unbounded_channel::<Envelope>();
    let handler = handler_fn(move |envelope: Envelope, _: DeliveryInfo| {
        let _ = handled_tx.send(envelope);
        async {}
    });
    let consumer = Consumer::new(subscription, handler)
        .with_concurrency(4)
        .spawn();

    let bad_id = format!("conf-bad-{}", uuid::Uuid::now_v7().simple());
    let bad_payload: &[u8] = b"\x00\xffnot a message bus can read";
    let attributes = [
        ("specversion", "9.9"),
        ("id", bad_id.as_str()),
        ("type", "conf.undecodable"),
        ("source", "/conformance/raw-client"),
    ];
    let raw = RawMessage {
        queue: queue.clone(),
        cloudevents: attributes
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
        payload: bytes::Bytes::from_static(bad_payload),
    };
    assert!(h.raw_publish(raw).await, "{CASE}: raw publish hook");
    let good = Envelope::new("conf.good", "sent after the undecodable one");
    send(&h, &queue, good.clone(), CASE).await;

    let deadline = tokio::time::Instant::now() + h.receive_timeout;
    loop {
        let envelope = tokio::time::timeout_at(deadline, handled.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{CASE}: the good message sent after the undecodable one was not handled \
                     within {:?} (consumer finished: {})",
                    h.receive_timeout,
                    consumer.is_finished()
                )
            })
            .expect("the handler lives as long as the consumer");
        assert_ne!(
            envelope.id.as_str(),
            bad_id,
            "{CASE}: the handler was given the undecodable message"
        );
        if envelope.id == good.id {
            assert_eq!(envelope.payload, good.payload, "{CASE}: good payload");
            break;
        }
    }
    assert!(
        !consumer.is_finished(),
        "{CASE}: the consumer stopped after the undecodable message"
    );

    let dlq = headers::dead_letter_queue(&queue);
    let what = format!("{CASE}: dead-letter queue `{dlq}`");
    let mut dead_letters = consume(&h, &dlq, ConsumeOptions::default(), &what).await;
    let dead = recv(&mut dead_letters, h.receive_timeout, &what).await;
    let got = dead.envelope();
    assert_eq!(got.id.as_str(), bad_id, "{what}: the id it was sent with");
    assert_eq!(got.payload.as_ref(), bad_payload, "{what}: the raw body");
    let reason = got.header(headers::DLQ_REASON).unwrap_or_default();
    assert!(
        reason.contains("undecodable") && reason.contains("9.9"),
        "{what}: header `{}` is {reason:?}, not the decoding failure",
        headers::DLQ_REASON
    );
    assert_eq!(
        got.header(headers::DLQ_ORIGINAL_TOPIC),
        Some(queue.as_str()),
        "{what}: original queue"
    );
    ack(dead, &what).await;
    assert_quiet(&mut dead_letters, h.quiet_period, &what).await;

    // Nothing else reaches the handler: the bad message is not redelivered to it.
    tokio::time::sleep(h.quiet_period.max(Duration::from_millis(200))).await;
    while let Ok(envelope) = handled.try_recv() {
        assert_ne!(
            envelope.id.as_str(),
            bad_id,
            "{CASE}: the handler was given the undecodable message"
        );
    }
    let report = consumer.stop().await.expect("stop the consumer");
    assert!(
        report.undecodable >= 1 && report.rejected >= 1,
        "{CASE}: the report does not count the dead-lettered message: {report:?}"
    );
    assert_eq!(report.panicked, 0, "{CASE}: {report:?}");
}
