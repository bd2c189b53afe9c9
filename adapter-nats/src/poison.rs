//! Messages the client cannot read.
//!
//! `async-nats` reads a message's header block strictly: one that is not UTF-8, has a line
//! without a colon, a header name outside `!`..`~`, or a version line other than `NATS/1.0`
//! with an optional numeric status, makes it drop the whole connection, before anything
//! reaches `bus`. The server relays and JetStream stores such blocks as they are (any client
//! that writes the protocol itself, or a Go service with a space in a header name, can send
//! one), and JetStream would deliver the message again after every ack wait, cutting the
//! connection each time, for ever.
//!
//! So after the connection was lost, each pull loop looks at the messages its consumer has
//! delivered but that are not acknowledged yet, reading them with `STREAM.MSG.GET` (whose
//! JSON carries the header block base64-encoded, which the client does not parse). Each one
//! the client could not read is dead-lettered like any undecodable delivery, its header block
//! read leniently (`wire::decode_raw`), and then terminated with a `+TERM` sent to the
//! consumer's acknowledgement subject for its stream sequence (`$JS.ACK.<stream>.<consumer>.…`,
//! the subject JetStream's own replies use; the server finds the delivery by that sequence).

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use base64::Engine as _;
use bus_core::{headers, Error, ErrorKind, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::broker::Inner;
use crate::subscriber::{dead_letter, Spec};
use crate::wire;

/// At most this many stream sequences are read per look (half from the oldest unacknowledged
/// one up, half from the last delivered one down).
const SWEEP_MAX: u64 = 2048;

#[derive(Serialize)]
struct GetRequest {
    seq: u64,
}

#[derive(Deserialize)]
struct GetResponse {
    message: Option<Stored>,
}

#[derive(Deserialize)]
struct Stored {
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    time: Option<String>,
}

/// Finds the messages `consumer` delivered that the client cannot read, dead-letters them and
/// terminates them (module docs).
pub(crate) async fn sweep(inner: &Inner, spec: &Spec, consumer: &PullConsumer) -> Result<()> {
    let info = consumer.get_info().await.map_err(|e| {
        Error::with_source(ErrorKind::Connection, "reading the consumer's state", e)
    })?;
    if info.num_ack_pending == 0 {
        return Ok(());
    }
    let first = info.ack_floor.stream_sequence.saturating_add(1);
    let last = info.delivered.stream_sequence;
    if first > last {
        return Ok(());
    }
    let sequences: Vec<u64> = if last - first < SWEEP_MAX {
        (first..=last).collect()
    } else {
        (first..first + SWEEP_MAX / 2)
            .chain(last + 1 - SWEEP_MAX / 2..=last)
            .collect()
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    for seq in sequences {
        let response: GetResponse = inner
            .jetstream
            .request(
                format!("STREAM.MSG.GET.{}", spec.stream),
                &GetRequest { seq },
            )
            .await
            .map_err(|e| {
                Error::with_source(ErrorKind::Connection, "reading a stored message", e)
            })?;
        // Gone (acknowledged from a work queue, or expired), or a block the client reads.
        let Some(stored) = response.message else {
            continue;
        };
        let block = stored
            .hdrs
            .and_then(|h| b64.decode(h).ok())
            .unwrap_or_default();
        let Some(problem) = wire::client_cannot_read(&block) else {
            continue;
        };
        let payload = stored
            .data
            .and_then(|d| b64.decode(d).ok())
            .map(Bytes::from)
            .unwrap_or_default();
        let received = wire::decode_raw(
            &block,
            payload,
            wire::Defaults {
                id: Some(format!("{}:{seq}", spec.stream)),
                kind: spec.source.clone(),
                time: stored.time.and_then(|t| headers::parse_time(&t).ok()),
            },
            format!("{problem} (the NATS client cannot read it)"),
        );
        let reason = format!(
            "undecodable: {}",
            received.undecodable.as_deref().unwrap_or(&problem)
        );
        let consumer_name = spec.config.durable_name.clone().unwrap_or_default();
        tracing::warn!(
            stream = %spec.stream,
            seq,
            %reason,
            "dead-lettering a stored message the NATS client cannot read"
        );
        dead_letter(
            inner,
            &received.envelope,
            &spec.source,
            spec.group.as_deref(),
            1,
            &reason,
            Some(format!("bus-poison:{}:{consumer_name}:{seq}", spec.stream)),
        )
        .await?;
        // The delivery's own reply subject never reached us; the server finds the delivery by
        // the stream sequence (the other numbers only matter for its own replies).
        let term = format!("$JS.ACK.{}.{consumer_name}.1.{seq}.0.0.0", spec.stream);
        inner
            .client
            .publish(term, Bytes::from_static(b"+TERM"))
            .await
            .map_err(|e| Error::with_source(ErrorKind::Connection, "terminating a message", e))?;
        let _ = tokio::time::timeout(Duration::from_secs(5), inner.client.flush()).await;
    }
    Ok(())
}
