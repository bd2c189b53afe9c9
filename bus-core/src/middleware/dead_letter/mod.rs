//! Dead letters: where messages go when they cannot be processed, what they carry, and how
//! they come back.
//!
//! A rejected delivery ([`Delivery::reject`], or a handler's [`Outcome::Reject`], which the
//! retry middleware also produces after the last delivery) goes to the dead-letter queue of
//! its topic or queue, named by [`headers::dead_letter_queue`] (`<topic>.dlq`), and is read
//! with [`Queue::consume`](crate::Queue::consume) on every adapter. Every adapter sends the
//! dead letter there itself (the memory broker stores it), so every dead letter carries the
//! same headers, written by [`mark`]; only SQS's optional redrive policy
//! (`max_receive_count`) also moves messages natively, without these headers:
//!
//! | header | value |
//! |---|---|
//! | [`headers::DLQ_REASON`] | the error's text |
//! | [`headers::DLQ_ORIGINAL_TOPIC`] | the topic or queue it was consumed from |
//! | [`headers::DLQ_GROUP`] | the consumer group, if any |
//! | [`headers::DLQ_ATTEMPTS`] | deliveries it had |
//! | [`headers::DLQ_FIRST_FAILURE`] | when its first attempt failed, where known |
//! | [`headers::DLQ_DEAD_LETTERED_AT`] | when it was dead-lettered |
//!
//! The message keeps its id, kind, key, correlation and causation ids and payload.
//!
//! For an adapter that declares no dead-letter support, [`DeadLetterLayer`] does the same in
//! the handler pipeline: it sends the rejected message to the dead-letter queue itself and
//! acknowledges the original.
//!
//! [`Redrive`] moves dead letters back to their topic or queue once the cause is fixed.

mod layer;
mod redrive;

use std::time::SystemTime;

pub use layer::{DeadLetterLayer, DeadLettering};
pub use redrive::{Redrive, RedriveReport};

use crate::{headers, Envelope};

#[cfg(doc)]
use crate::{runtime::Outcome, Delivery};

/// Why and from where a message is dead-lettered: what [`mark`] writes into its headers.
#[derive(Debug, Clone)]
pub struct DeadLetterInfo<'a> {
    /// The reason (the error's text).
    pub reason: &'a str,
    /// The topic or queue it was consumed from.
    pub source: &'a str,
    /// The consumer group, if any.
    pub group: Option<&'a str>,
    /// How many deliveries it had.
    pub attempts: u32,
    /// When the first attempt failed, if known.
    pub first_failure: Option<SystemTime>,
}

/// Writes the dead-letter headers into `envelope` (see the module docs).
#[must_use]
pub fn mark(mut envelope: Envelope, info: &DeadLetterInfo<'_>) -> Envelope {
    let now = SystemTime::now();
    let h = &mut envelope.headers;
    h.insert(headers::DLQ_REASON.into(), info.reason.to_owned());
    h.insert(headers::DLQ_ORIGINAL_TOPIC.into(), info.source.to_owned());
    match info.group {
        Some(group) => h.insert(headers::DLQ_GROUP.into(), group.to_owned()),
        None => h.remove(headers::DLQ_GROUP),
    };
    h.insert(headers::DLQ_ATTEMPTS.into(), info.attempts.to_string());
    match info.first_failure {
        Some(first) => h.insert(
            headers::DLQ_FIRST_FAILURE.into(),
            headers::format_time(first),
        ),
        None => h.remove(headers::DLQ_FIRST_FAILURE),
    };
    h.insert(
        headers::DLQ_DEAD_LETTERED_AT.into(),
        headers::format_time(now),
    );
    envelope
}

/// Removes the dead-letter headers, as [`Redrive`] does before sending a message back.
#[must_use]
pub fn unmark(mut envelope: Envelope) -> Envelope {
    for name in headers::DEAD_LETTER_HEADERS {
        envelope.headers.remove(name);
    }
    envelope
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_then_unmark_restores_the_message() {
        let original = Envelope::new("order.placed", "{}")
            .with_key("o-1")
            .with_header("tenant", "acme");
        let dead = mark(
            original.clone(),
            &DeadLetterInfo {
                reason: "handler: card declined",
                source: "orders",
                group: Some("billing"),
                attempts: 5,
                first_failure: Some(SystemTime::UNIX_EPOCH),
            },
        );
        assert_eq!(
            dead.header(headers::DLQ_REASON),
            Some("handler: card declined")
        );
        assert_eq!(dead.header(headers::DLQ_ORIGINAL_TOPIC), Some("orders"));
        assert_eq!(dead.header(headers::DLQ_GROUP), Some("billing"));
        assert_eq!(dead.header(headers::DLQ_ATTEMPTS), Some("5"));
        assert_eq!(
            dead.header(headers::DLQ_FIRST_FAILURE),
            Some("1970-01-01T00:00:00.000Z")
        );
        assert!(dead.header(headers::DLQ_DEAD_LETTERED_AT).is_some());
        assert_eq!(unmark(dead), original);
    }
}
