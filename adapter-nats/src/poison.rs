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
//! So when one of a pull loop's own requests ended without the server's word (the connection
//! dropped while it was open), the loop sweeps its consumer's delivered range, from just above
//! the ack floor to the last delivered sequence, reading each stored message with
//! `STREAM.MSG.GET` (whose JSON carries the header block base64-encoded, which the client does
//! not parse). Each one the client could not read is dead-lettered like any undecodable
//! delivery, its header block read leniently (`wire::decode_raw`), and then terminated with a
//! `+TERM` sent to the consumer's acknowledgement subject for its stream sequence
//! (`$JS.ACK.<stream>.<consumer>.…`, the subject JetStream's own replies use; the server finds
//! the delivery by that sequence). A message stored without headers has no block: it is
//! readable.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use base64::Engine as _;
use bus_core::{headers, Error, ErrorKind, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::broker::Inner;
use crate::{dead_letters, wire};

/// At most this many stream sequences are read per sweep: half the newest delivered ones, half
/// from where the previous sweep stopped, so that successive sweeps cover any range.
const SWEEP_MAX: u64 = 2048;
/// How many terminated sequences a sweep remembers, so as not to dead-letter one twice.
const SWEPT_MAX: usize = 4096;

/// The consumer a sweep looks at, and where its dead letters go.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) stream: String,
    pub(crate) consumer: String,
    /// The topic or queue name, as the user gave it.
    pub(crate) source: String,
    pub(crate) group: Option<String>,
}

/// The sweeps of one pull consumer: where the next starts, and what earlier ones terminated.
#[derive(Debug)]
pub(crate) struct Sweeper {
    target: Target,
    cursor: u64,
    swept: VecDeque<u64>,
    swept_set: HashSet<u64>,
}

#[derive(Serialize)]
struct GetRequest {
    seq: u64,
}

#[derive(Deserialize)]
struct GetResponse {
    #[serde(default)]
    message: Option<Stored>,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    description: String,
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

impl Sweeper {
    pub(crate) fn new(target: Target) -> Self {
        Self {
            target,
            cursor: 0,
            swept: VecDeque::new(),
            swept_set: HashSet::new(),
        }
    }

    /// Finds the messages `consumer` delivered that the client cannot read, dead-letters them
    /// and terminates them (module docs).
    ///
    /// # Cancel safety
    /// Dropping the future stops the sweep; a message dead-lettered but not yet terminated is
    /// found again by the next one (and JetStream drops the second dead letter within its
    /// duplicate window).
    pub(crate) async fn run(&mut self, inner: &Inner, consumer: &PullConsumer) -> Result<()> {
        let info = consumer.get_info().await.map_err(|e| {
            Error::with_source(ErrorKind::Connection, "reading the consumer's state", e)
        })?;
        if info.num_ack_pending == 0 {
            return Ok(());
        }
        let sequences = self.sequences(
            info.ack_floor.stream_sequence,
            info.delivered.stream_sequence,
        );
        let b64 = base64::engine::general_purpose::STANDARD;
        let Target {
            stream,
            consumer: consumer_name,
            source,
            group,
        } = self.target.clone();
        for seq in sequences {
            if self.swept_set.contains(&seq) {
                // Dead-lettered already; the +TERM may have been lost.
                terminate(inner, &stream, &consumer_name, seq).await?;
                continue;
            }
            let response: GetResponse = inner
                .jetstream
                .request(format!("STREAM.MSG.GET.{stream}"), &GetRequest { seq })
                .await
                .map_err(|e| {
                    Error::with_source(ErrorKind::Connection, "reading a stored message", e)
                })?;
            if let Some(error) = response.error {
                if error.code == 404 {
                    // Gone: acknowledged from a work queue, or expired.
                    continue;
                }
                tracing::warn!(
                    %stream,
                    seq,
                    code = error.code,
                    description = %error.description,
                    "JetStream refused to show a stored message to the sweep"
                );
                return Err(Error::new(
                    ErrorKind::Rejected,
                    format!(
                        "STREAM.MSG.GET of sequence {seq} on `{stream}` failed with {}: {}",
                        error.code, error.description
                    ),
                ));
            }
            let Some(stored) = response.message else {
                continue;
            };
            // A message stored without headers has no block (readable).
            let Some(block) = stored
                .hdrs
                .and_then(|h| b64.decode(h).ok())
                .filter(|b| !b.is_empty())
            else {
                continue;
            };
            let Some(problem) = wire::client_cannot_read(&block) else {
                continue;
            };
            let reason = format!("undecodable: {problem} (the NATS client cannot read it)");
            let payload = stored
                .data
                .and_then(|d| b64.decode(d).ok())
                .map(Bytes::from)
                .unwrap_or_default();
            let received = wire::decode_raw(
                &block,
                payload,
                wire::Defaults {
                    stored: Some(wire::Stored {
                        stream: &stream,
                        sequence: &seq.to_string(),
                    }),
                    kind: &source,
                    time: stored.time.and_then(|t| headers::parse_time(&t).ok()),
                },
                reason.clone(),
            );
            tracing::warn!(
                %stream,
                seq,
                %reason,
                "dead-lettering a stored message the NATS client cannot read"
            );
            dead_letters::send(
                inner,
                &received.envelope,
                &source,
                group.as_deref(),
                1,
                &reason,
                Some(&format!("bus-poison:{stream}:{consumer_name}:{seq}")),
            )
            .await?;
            self.remember(seq);
            terminate(inner, &stream, &consumer_name, seq).await?;
        }
        Ok(())
    }

    /// The stream sequences the next sweep reads, of those delivered above the ack floor.
    fn sequences(&mut self, floor: u64, last: u64) -> Vec<u64> {
        if floor >= last {
            return Vec::new();
        }
        let first = floor + 1;
        if last - first < SWEEP_MAX {
            return (first..=last).collect();
        }
        let half = SWEEP_MAX / 2;
        let newest = last - (half - 1);
        let mut start = self.cursor.max(first);
        if start >= newest {
            start = first;
        }
        let end = start.saturating_add(half).min(newest);
        self.cursor = end;
        (start..end).chain(newest..=last).collect()
    }

    fn remember(&mut self, seq: u64) {
        if self.swept_set.insert(seq) {
            self.swept.push_back(seq);
        }
        while self.swept.len() > SWEPT_MAX {
            if let Some(old) = self.swept.pop_front() {
                self.swept_set.remove(&old);
            }
        }
    }
}

/// Terminates the delivery of `seq`. Its own reply subject never reached the client; the
/// server finds the delivery by the stream sequence (the other numbers only matter for its own
/// replies).
async fn terminate(inner: &Inner, stream: &str, consumer: &str, seq: u64) -> Result<()> {
    let term = format!("$JS.ACK.{stream}.{consumer}.1.{seq}.0.0.0");
    inner
        .client
        .publish(term, Bytes::from_static(b"+TERM"))
        .await
        .map_err(|e| Error::with_source(ErrorKind::Connection, "terminating a message", e))?;
    let _ = tokio::time::timeout(Duration::from_secs(5), inner.client.flush()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweeper() -> Sweeper {
        Sweeper::new(Target {
            stream: "s".into(),
            consumer: "c".into(),
            source: "q".into(),
            group: None,
        })
    }

    #[test]
    fn successive_sweeps_cover_a_large_range() {
        let mut sweeper = sweeper();
        let (floor, last) = (10_000, 110_000);
        let mut seen = HashSet::new();
        for _ in 0..100 {
            let sequences = sweeper.sequences(floor, last);
            assert!(sequences.len() as u64 <= SWEEP_MAX);
            assert!(sequences.iter().all(|s| (floor + 1..=last).contains(s)));
            seen.extend(sequences);
        }
        assert_eq!(
            seen.len() as u64,
            last - floor,
            "every sequence read at last"
        );
        assert!(sweeper.sequences(5, 9).eq(&[6, 7, 8, 9]));
        assert!(sweeper.sequences(9, 9).is_empty());
    }

    #[test]
    fn sequences_near_the_end_of_the_range_do_not_overflow() {
        let mut sweeper = sweeper();
        let sequences = sweeper.sequences(u64::MAX - 100_000, u64::MAX);
        assert_eq!(sequences.len() as u64, SWEEP_MAX);
        assert_eq!(sequences.last(), Some(&u64::MAX));
        assert_eq!(sweeper.sequences(u64::MAX - 1, u64::MAX), vec![u64::MAX]);
        assert!(sweeper.sequences(u64::MAX, u64::MAX).is_empty());
    }

    #[test]
    fn a_terminated_sequence_is_remembered_within_bounds() {
        let mut sweeper = sweeper();
        for seq in 0..(SWEPT_MAX as u64 + 10) {
            sweeper.remember(seq);
        }
        assert_eq!(sweeper.swept.len(), SWEPT_MAX);
        assert!(!sweeper.swept_set.contains(&0));
        assert!(sweeper.swept_set.contains(&(SWEPT_MAX as u64 + 9)));
    }
}
