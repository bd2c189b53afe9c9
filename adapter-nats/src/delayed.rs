//! Delayed publish on JetStream, emulated (nats-server before 2.12 has no message schedules):
//! a delayed message is stored at once in one stream per prefix, `<prefix>-delayed`, on the
//! subject `<prefix>.d.t.<topic>` (or `.d.q.<queue>`), with the header [`DUE`]. Every
//! connection that published delayed, subscribed to a topic or consumed a queue runs a mover:
//! a member of the stream's one shared consumer (`movers`), which naks a message with the time
//! left until it is due (JetStream then holds it and redelivers it when due), and publishes a
//! due one to its topic or queue, without [`DUE`], before acking it. So the waiting message
//! lives in the server, survives the publisher and every consumer, and reaches the topic as a
//! new message: attempt 1, and every group subscribed when it is due gets it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bus_core::{headers, Delay, Envelope, Error, ErrorKind, Result};
use futures::StreamExt;
use tokio::sync::watch;

use crate::broker::{Inner, Kind};
use crate::config::Storage;
use crate::error;

/// The header holding when a delayed message is due, in milliseconds since 1970 (rounded up).
/// A message without it, or with one that is not such a number, is due at once.
pub const DUE: &str = "bus-due";

/// The durable consumer every mover shares.
const MOVERS: &str = "movers";

/// How long a message that could not be moved (its topic's stream is gone, the connection
/// failed) waits before the next try.
const RETRY: Duration = Duration::from_secs(5);

/// Publishes `envelope` to be delivered to `name` once `delay` has passed (at once if it has).
pub(crate) async fn publish(
    inner: &Arc<Inner>,
    kind: Kind,
    name: &str,
    envelope: &Envelope,
    delay: Delay,
) -> Result<()> {
    inner.check()?;
    let now = SystemTime::now();
    let remaining = delay.remaining(now).min(headers::MAX_DELAY);
    if remaining.is_zero() {
        return inner.publish_stored(kind, name, envelope).await;
    }
    // The target's stream exists from now on, so the mover can always store the message there
    // (and a group that subscribes meanwhile gets it).
    let target = inner.ensure_stream_subject(kind, name).await?.1;
    let mut headers = crate::wire::encode(envelope, &inner.config.source)?;
    let due = (now + remaining)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .div_ceil(1_000_000);
    headers.insert(DUE, due.to_string().as_str());
    inner.check_stored(&headers, envelope.payload.len())?;
    let stream = ensure_stream(inner).await?;
    let subject = inner.names.delayed_subject(&target);
    let stored = async {
        inner
            .jetstream
            .publish_with_headers(subject.clone(), headers, envelope.payload.clone())
            .await?
            .await
    };
    if let Err(e) = stored.await {
        if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
            inner.forget_stream_named(&stream);
        }
        return Err(error::publish(e, &subject));
    }
    start_mover(inner);
    Ok(())
}

/// How many delayed messages wait for the topic or queue `name`.
pub(crate) async fn waiting_for(inner: &Inner, kind: Kind, name: &str) -> Result<u64> {
    let target = match kind {
        Kind::Topic => inner.names.topic_subject(name),
        Kind::Queue => inner.names.queue_subject(name),
    };
    let subject = inner.names.delayed_subject(&target);
    let stream_name = inner.names.delayed_stream();
    let stream = match inner.jetstream.get_stream_no_info(&stream_name).await {
        Ok(stream) => stream,
        Err(e) => {
            let e = error::get_stream(e, &stream_name);
            // Nothing was ever delayed under this prefix.
            return if e.kind() == ErrorKind::NotFound {
                Ok(0)
            } else {
                Err(e)
            };
        }
    };
    let mut subjects = stream
        .info_with_subjects(&subject)
        .await
        .map_err(|e| error::stream_info(e, &stream_name))?;
    let mut count = 0;
    while let Some(entry) = subjects.next().await {
        let (_, n) = entry.map_err(|e| error::stream_info(e, &stream_name))?;
        count += n as u64;
    }
    Ok(count)
}

/// The delayed stream, created or updated on first use by this connection.
async fn ensure_stream(inner: &Inner) -> Result<String> {
    let name = inner.names.delayed_stream();
    let config = stream::Config {
        name: name.clone(),
        description: Some("bus: delayed messages until they are due".to_owned()),
        subjects: vec![inner.names.delayed_subjects()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: match inner.config.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        },
        num_replicas: inner.config.replicas,
        ..stream::Config::default()
    };
    inner.ensure_stream_config(config).await?;
    Ok(name)
}

/// Starts this connection's mover, once.
pub(crate) fn start_mover(inner: &Arc<Inner>) {
    if inner.mover_started.swap(true, Ordering::AcqRel) {
        return;
    }
    inner
        .runtime
        .spawn(run(Arc::downgrade(inner), inner.closed_signal()));
}

/// Moves due messages until the connection is closed or dropped (the mover holds it only
/// while moving one), starting over after an error.
async fn run(inner: Weak<Inner>, mut closed: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            outcome = move_due(&inner) => outcome,
            // Also when the connection was dropped (its sender with it).
            _ = closed.wait_for(|closed| *closed) => return,
        };
        let Err(error) = outcome else { return };
        tracing::warn!(%error, "moving delayed NATS messages failed; starting over");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = closed.wait_for(|closed| *closed) => return,
        }
        backoff = (backoff * 2).min(RETRY);
    }
}

/// Joins the movers and moves what comes; `Ok` once the connection is gone.
async fn move_due(weak: &Weak<Inner>) -> Result<()> {
    let mut messages = {
        let Some(inner) = weak.upgrade() else {
            return Ok(());
        };
        let stream = ensure_stream(&inner).await?;
        let config = pull::Config {
            durable_name: Some(MOVERS.to_owned()),
            description: Some("bus: moves delayed messages to their topic or queue".to_owned()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: inner.config.ack_wait(),
            max_deliver: -1,
            // Messages waiting out their delay are pending acknowledgement: no limit, or the
            // later ones would wait behind as many earlier ones.
            max_ack_pending: -1,
            ..pull::Config::default()
        };
        inner
            .consumer(&stream, &config)
            .await?
            .messages()
            .await
            .map_err(|e| Error::with_source(ErrorKind::Connection, "pulling delayed messages", e))?
    };
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| {
            Error::with_source(ErrorKind::Connection, "pulling delayed messages", e)
        })?;
        let Some(inner) = weak.upgrade() else {
            return Ok(());
        };
        move_one(&inner, &message).await;
    }
    Err(Error::new(
        ErrorKind::Connection,
        "the delayed messages' pull ended",
    ))
}

/// Holds `message` back until it is due, or moves it to its topic or queue.
async fn move_one(inner: &Inner, message: &jetstream::Message) {
    let now = SystemTime::now();
    if let Some(left) = due(message.headers.as_ref()).and_then(|due| due.duration_since(now).ok()) {
        if !left.is_zero() {
            // If the nak is lost, the ack wait brings it back.
            let _ = message.ack_with(AckKind::Nak(Some(left))).await;
            return;
        }
    }
    let Some(target) = inner.names.delayed_target(&message.subject) else {
        tracing::warn!(subject = %message.subject, "a message on the delayed stream names no topic or queue; dropped");
        let _ = message.ack_with(AckKind::Term).await;
        return;
    };
    let payload = message.payload.clone();
    let stored = async {
        inner
            .jetstream
            .publish_with_headers(
                target.clone(),
                without_due(message.headers.as_ref()),
                payload,
            )
            .await?
            .await
    };
    match stored.await {
        // If the ack is lost, the message is moved again: at least once.
        Ok(_) => {
            let _ = message.ack_with(AckKind::Ack).await;
        }
        // The stream existed when the message was delayed (publish made sure of it): it was
        // deleted since, and the message has nowhere to go.
        Err(error) if error.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
            tracing::warn!(%error, subject = %target, "the stream of a due delayed message was deleted; dropped");
            let _ = message.ack_with(AckKind::Term).await;
        }
        Err(error) => {
            tracing::warn!(%error, subject = %target, "moving a due delayed message failed; trying again");
            let _ = message.ack_with(AckKind::Nak(Some(RETRY))).await;
        }
    }
}

/// When a message is due, from its [`DUE`] header; `None` (due at once) without a readable one.
fn due(map: Option<&HeaderMap>) -> Option<SystemTime> {
    let millis: u64 = map?.get(DUE)?.as_str().trim().parse().ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(millis))
}

/// The headers of a delayed message as its topic or queue gets them: all but [`DUE`].
fn without_due(map: Option<&HeaderMap>) -> HeaderMap {
    let mut rest = HeaderMap::new();
    for (name, values) in map.into_iter().flat_map(HeaderMap::iter) {
        let name: &str = name.as_ref();
        if name.eq_ignore_ascii_case(DUE) {
            continue;
        }
        for value in values {
            rest.append(name, value.as_str());
        }
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_malformed_due_time_means_at_once() {
        let mut map = HeaderMap::new();
        assert_eq!(due(None), None);
        assert_eq!(due(Some(&map)), None);
        for bad in ["soon", "-5", "1.5", "", "99999999999999999999999"] {
            map.insert(DUE, bad);
            assert_eq!(due(Some(&map)), None, "{bad}");
        }
        map.insert(DUE, "1700000000123");
        assert_eq!(
            due(Some(&map)),
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123))
        );
        // Far in the future is a time, not a panic.
        map.insert(DUE, u64::MAX.to_string().as_str());
        let _ = due(Some(&map));
    }

    #[test]
    fn the_due_header_is_all_that_is_removed() {
        let mut map = HeaderMap::new();
        map.insert(DUE, "1");
        map.insert("ce-id", "a");
        map.append("x-many", "1");
        map.append("x-many", "2");
        let rest = without_due(Some(&map));
        assert!(rest.get(DUE).is_none());
        assert_eq!(rest.get("ce-id").map(|v| v.as_str()), Some("a"));
        assert_eq!(rest.get_all("x-many").count(), 2);
    }
}
