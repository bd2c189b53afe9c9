//! Names of the headers `bus` itself reads and writes.
//!
//! Envelope fields (id, kind, correlation and causation ids, time, content type) are mapped by
//! each adapter onto its broker's CloudEvents binding; the names here are ordinary headers that
//! travel in [`Envelope::headers`](crate::Envelope::headers) on every broker.

/// The schema version of a typed message (a CloudEvents extension attribute name).
pub const SCHEMA_VERSION: &str = "schemaversion";

/// W3C trace context: the parent span.
pub const TRACEPARENT: &str = "traceparent";

/// W3C trace context: vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// Why a message was dead-lettered (the error's text).
pub const DLQ_REASON: &str = "bus-dlq-reason";

/// The topic or queue the dead-lettered message was consumed from.
pub const DLQ_ORIGINAL_TOPIC: &str = "bus-dlq-original-topic";

/// The consumer group that dead-lettered the message, if it was consumed in one.
pub const DLQ_GROUP: &str = "bus-dlq-group";

/// How many delivery attempts the message had when it was dead-lettered.
pub const DLQ_ATTEMPTS: &str = "bus-dlq-attempts";

/// When the first attempt failed (RFC 3339), where known.
pub const DLQ_FIRST_FAILURE: &str = "bus-dlq-first-failure";

/// When the message was dead-lettered (RFC 3339).
pub const DLQ_DEAD_LETTERED_AT: &str = "bus-dlq-at";

/// The delivery attempt a message is on, for brokers that cannot count redeliveries
/// themselves (the retry-topic scheme on Kafka, for example).
pub const ATTEMPT: &str = "bus-attempt";

/// The name of the dead-letter queue for messages consumed from `topic_or_queue`.
///
/// Dead letters are read with [`Queue::consume`](crate::Queue::consume) on this name, on
/// every adapter.
#[must_use]
pub fn dead_letter_queue(topic_or_queue: &str) -> String {
    format!("{topic_or_queue}.dlq")
}

/// Formats a time as RFC 3339 with millisecond precision, in UTC, as the dead-letter time
/// headers and the CloudEvents `time` attribute carry it.
#[must_use]
pub fn format_time(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// Parses an RFC 3339 time as written by [`format_time`] (or by another CloudEvents producer).
///
/// # Errors
/// [`ErrorKind::Serialization`](crate::ErrorKind::Serialization) when `text` is not RFC 3339.
pub fn parse_time(text: &str) -> crate::Result<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(text).map_err(|e| {
        crate::Error::with_source(
            crate::ErrorKind::Serialization,
            format!("`{text}` is not an RFC 3339 time"),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn time_round_trips_at_millisecond_precision() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
        let text = format_time(t);
        assert_eq!(text, "2025-11-24T16:00:00.123Z");
        assert_eq!(parse_time(&text).unwrap(), t);
        assert!(parse_time("yesterday").is_err());
    }
}
