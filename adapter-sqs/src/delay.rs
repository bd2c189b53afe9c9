//! Delayed publish and send: SQS `DelaySeconds` (at most 15 minutes, standard queues only) and,
//! beyond it or through SNS (which has no delay), the [`NOT_BEFORE`](crate::wire::NOT_BEFORE)
//! attribute the receive loops honour by re-delaying.
//!
//! A message received before it is due is never handed out: the receive loop sends a copy of
//! it (same body, same attributes) back to its queue with `DelaySeconds` up to the rest of
//! the delay, at most 15 minutes, then deletes what it received. The message stays in SQS the
//! whole time (the copy is sent before the original is deleted), and each copy is a new SQS
//! message, so its `ApproximateReceiveCount`, the delivery's attempt, starts again from 0:
//! the receive that finds it due is attempt 1, and a redrive policy's `maxReceiveCount` never
//! counts the early receives. Re-changing the received message's visibility instead would
//! keep one message but count every early receive as an attempt and, with
//! `max_receive_count`, dead-letter a message delayed long enough.

use std::time::{Duration, SystemTime};

use std::collections::HashMap;

use aws_sdk_sqs::types::{Message, MessageAttributeValue};
use bus_core::{Delay, Error, Result};

use crate::broker::Shared;
use crate::error::map;
use crate::wire;

/// SQS's longest `DelaySeconds`: 15 minutes.
pub(crate) const MAX_DELAY_SECONDS: u32 = 900;

/// How a delayed message is sent: the `DelaySeconds` it goes with and the
/// [`NOT_BEFORE`](crate::wire::NOT_BEFORE) value it carries, if the receiver has to finish
/// the delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) delay_secs: i32,
    pub(crate) not_before: Option<String>,
}

/// How to send a message delayed by `delay` from `now`: to a queue (`through_topic` false)
/// SQS's `DelaySeconds` alone up to 15 minutes, 15 minutes and the due time beyond; through
/// SNS the due time alone, for the group queues' receivers to honour.
///
/// # Errors
/// [`Unsupported`](bus_core::ErrorKind::Unsupported) for a moment the clock cannot hold.
pub(crate) fn plan(delay: Delay, now: SystemTime, through_topic: bool) -> Result<Plan> {
    let remaining = delay.remaining(now);
    if remaining.is_zero() {
        return Ok(Plan {
            delay_secs: 0,
            not_before: None,
        });
    }
    let due = now
        .checked_add(remaining)
        .and_then(wire::not_before_value)
        .ok_or_else(|| {
            Error::unsupported(format!(
                "SQS: a delay of {remaining:?} ends beyond what the clock can hold"
            ))
        })?;
    let secs = ceil_secs(remaining);
    Ok(if through_topic {
        Plan {
            delay_secs: 0,
            not_before: Some(due),
        }
    } else if secs <= u64::from(MAX_DELAY_SECONDS) {
        Plan {
            delay_secs: i32::try_from(secs).unwrap_or(0),
            not_before: None,
        }
    } else {
        Plan {
            delay_secs: hop_secs(remaining),
            not_before: Some(due),
        }
    })
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// The `DelaySeconds` of the next hop for a message `remaining` from due: whole seconds
/// rounded up (never early), at most SQS's 15 minutes.
pub(crate) fn hop_secs(remaining: Duration) -> i32 {
    let secs = ceil_secs(remaining).min(u64::from(MAX_DELAY_SECONDS));
    i32::try_from(secs).unwrap_or(0)
}

/// When `message` is due, if it is not yet at `now` (see the module docs).
pub(crate) fn early(message: &Message, now: SystemTime) -> Option<SystemTime> {
    wire::not_before(message).filter(|due| *due > now)
}

/// Sends a copy of `message`, received from the queue at `url` before it is `due`, back to
/// that queue with `DelaySeconds` for the next hop, then deletes what was received. If the
/// copy cannot be sent the received message stays, and comes back after its visibility
/// timeout to be re-delayed then; if it cannot be deleted, it comes back too, and its copy
/// is a duplicate (at least once).
pub(crate) async fn redelay(inner: Shared, url: String, message: Message, due: SystemTime) {
    let remaining = due
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let sent = inner
        .sqs
        .send_message()
        .queue_url(&url)
        .message_body(message.body().unwrap_or_default())
        .set_message_attributes(Some(copied_attributes(&message)))
        .delay_seconds(hop_secs(remaining))
        .send()
        .await;
    if let Err(e) = sent {
        let error = map(e, "re-delaying a message not yet due (send)");
        tracing::warn!(queue = %url, %error, "re-delaying a message failed; it comes back after its visibility timeout");
        return;
    }
    let receipt = message.receipt_handle().unwrap_or_default();
    let mut last = None;
    for pause in [0, 200, 1000] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        match inner
            .sqs
            .delete_message()
            .queue_url(&url)
            .receipt_handle(receipt)
            .send()
            .await
        {
            Ok(_) => return,
            Err(e) => last = Some(map(e, "re-delaying a message not yet due (delete)")),
        }
    }
    if let Some(error) = last {
        tracing::warn!(queue = %url, %error, "deleting a re-delayed message failed; it will arrive twice");
    }
}

/// The attributes of the copy: those of `message`, and, for a message naming no `ce-id` (a
/// foreign client's, whose id is read from SQS's message id), its SQS message id as `ce-id`
/// where a slot is free, so that the copy keeps the id the message would have had.
fn copied_attributes(message: &Message) -> HashMap<String, MessageAttributeValue> {
    let mut attributes = message.message_attributes().cloned().unwrap_or_default();
    let named = attributes
        .get(wire::CE_ID)
        .and_then(MessageAttributeValue::string_value)
        .is_some_and(|id| !id.is_empty());
    if let Some(id) = message.message_id().filter(|id| !id.is_empty()) {
        if !named && attributes.len() < wire::MAX_ATTRIBUTES {
            if let Ok(value) = MessageAttributeValue::builder()
                .data_type(wire::STRING)
                .string_value(id)
                .build()
            {
                attributes.insert(wire::CE_ID.to_owned(), value);
            }
        }
    }
    attributes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn queues_use_delay_seconds_alone_up_to_15_minutes() {
        let now = at(1_000_000);
        let p = plan(Delay::For(Duration::from_millis(1500)), now, false).unwrap();
        assert_eq!(
            p,
            Plan {
                delay_secs: 2,
                not_before: None
            }
        );
        let p = plan(Delay::For(Duration::from_secs(900)), now, false).unwrap();
        assert_eq!(p.delay_secs, 900);
        assert_eq!(p.not_before, None);
    }

    #[test]
    fn longer_delays_carry_the_due_time_and_hop_15_minutes() {
        let now = at(1_000_000);
        let p = plan(Delay::For(Duration::from_secs(3600)), now, false).unwrap();
        assert_eq!(p.delay_secs, 900);
        let due = p.not_before.as_deref().and_then(wire::parse_not_before);
        assert_eq!(due, Some(at(1_003_600)));
        // One millisecond beyond 15 minutes is beyond: rounded up, never early.
        let p = plan(Delay::For(Duration::from_millis(900_001)), now, false).unwrap();
        assert_eq!(p.delay_secs, 900);
        assert!(p.not_before.is_some());
    }

    #[test]
    fn topics_carry_the_due_time_only() {
        let now = at(1_000_000);
        let p = plan(Delay::Until(at(1_000_010)), now, true).unwrap();
        assert_eq!(p.delay_secs, 0);
        assert_eq!(p.not_before.as_deref(), Some("1000010000"));
    }

    #[test]
    fn past_or_zero_delays_are_immediate() {
        let now = at(1_000_000);
        let immediate = Plan {
            delay_secs: 0,
            not_before: None,
        };
        assert_eq!(plan(Delay::Until(at(5)), now, true).unwrap(), immediate);
        assert_eq!(
            plan(Delay::For(Duration::ZERO), now, false).unwrap(),
            immediate
        );
    }

    #[test]
    fn a_delay_beyond_the_clock_is_unsupported() {
        let e = plan(Delay::For(Duration::MAX), SystemTime::now(), false).unwrap_err();
        assert_eq!(e.kind(), bus_core::ErrorKind::Unsupported);
    }

    #[test]
    fn a_copy_keeps_the_id_of_a_message_that_names_none() {
        let due = MessageAttributeValue::builder()
            .data_type("String")
            .string_value("1")
            .build()
            .unwrap();
        let foreign = Message::builder()
            .message_id("sqs-id-1")
            .message_attributes(wire::NOT_BEFORE, due.clone())
            .build();
        let copied = copied_attributes(&foreign);
        assert_eq!(
            copied.get(wire::CE_ID).and_then(|v| v.string_value()),
            Some("sqs-id-1")
        );
        assert!(copied.contains_key(wire::NOT_BEFORE));
        let named = Message::builder()
            .message_id("sqs-id-2")
            .message_attributes(
                wire::CE_ID,
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value("mine")
                    .build()
                    .unwrap(),
            )
            .build();
        assert_eq!(
            copied_attributes(&named)
                .get(wire::CE_ID)
                .and_then(|v| v.string_value()),
            Some("mine")
        );
    }

    #[test]
    fn hops_round_up_and_stop_at_15_minutes() {
        assert_eq!(hop_secs(Duration::from_millis(1)), 1);
        assert_eq!(hop_secs(Duration::from_millis(2001)), 3);
        assert_eq!(hop_secs(Duration::from_secs(899)), 899);
        assert_eq!(hop_secs(Duration::from_secs(86_400)), 900);
        assert_eq!(hop_secs(Duration::MAX), 900);
    }

    #[test]
    fn a_long_delay_takes_hops_of_15_minutes_until_due() {
        // What the receivers do with a message due in 40 minutes, each hop received on time.
        let mut remaining = Duration::from_secs(2400);
        let mut hops = Vec::new();
        while !remaining.is_zero() {
            let hop = hop_secs(remaining);
            hops.push(hop);
            remaining = remaining.saturating_sub(Duration::from_secs(hop.unsigned_abs().into()));
        }
        assert_eq!(hops, [900, 900, 600]);
    }

    #[test]
    fn not_before_values_read_back_and_foreign_ones_are_refused() {
        let due = at(1_700_000_000) + Duration::from_millis(123);
        let value = wire::not_before_value(due).unwrap();
        assert_eq!(value, "1700000000123");
        assert_eq!(wire::parse_not_before(&value), Some(due));
        for foreign in [
            "",
            "soon",
            "-5",
            "+5",
            "1.5",
            " 17",
            "2026-12-01T15:00:00Z",
            "99999999999999999999999",
        ] {
            assert_eq!(wire::parse_not_before(foreign), None, "{foreign:?}");
        }
        // The largest u64 fits in SystemTime on the platforms we build for, or is refused:
        // never a panic.
        let _ = wire::parse_not_before("18446744073709551615");
    }
}
