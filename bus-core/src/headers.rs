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

/// Every header [`mark`](crate::middleware::dead_letter::mark) writes on a dead letter.
pub const DEAD_LETTER_HEADERS: [&str; 6] = [
    DLQ_REASON,
    DLQ_ORIGINAL_TOPIC,
    DLQ_GROUP,
    DLQ_ATTEMPTS,
    DLQ_FIRST_FAILURE,
    DLQ_DEAD_LETTERED_AT,
];

/// The headers an adapter keeps when it cuts a copy (a dead letter, a redelivered copy) to fit
/// the broker's limits, shortening them only as a last resort: the dead-letter headers, the
/// trace context, and the notes without which other values would be misread. A foreign header
/// that merely starts with `bus-dlq-` is not among them.
pub const KEPT_WHEN_CUT: [&str; 10] = [
    DLQ_REASON,
    DLQ_ORIGINAL_TOPIC,
    DLQ_GROUP,
    DLQ_ATTEMPTS,
    DLQ_FIRST_FAILURE,
    DLQ_DEAD_LETTERED_AT,
    TRACEPARENT,
    TRACESTATE,
    RAW_TIME,
    BINARY_HEADERS,
];

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

/// Set on a copy `bus` had to cut to fit the broker's limits (a dead letter or a redelivered
/// copy of a message received with more than the broker carries): what was cut, as a
/// comma-separated list of `header:<name>` (dropped), `value:<name>` (shortened), `id`,
/// `kind`, `key`, and `payload:<bytes before>-><bytes after>`. The rest of the message is
/// exactly as received.
pub const TRUNCATED: &str = "bus-truncated";

/// Set on a message whose CloudEvents `time` (or the broker's own timestamp) could not be
/// read: the raw value as received. The envelope's timestamp is then the receive time.
pub const RAW_TIME: &str = "bus-raw-time";

/// Set on a message received with header values that are not UTF-8: the names of those
/// headers, comma-separated. Their values are carried base64-encoded (standard alphabet).
pub const BINARY_HEADERS: &str = "bus-binary-headers";

/// The latest time `bus` formats and reads, 9999-12-31T23:59:59.999Z, in milliseconds since
/// the Unix epoch. Later times saturate to it ([`format_time`], [`time_from_unix_millis`],
/// [`saturating_add`]).
pub const MAX_TIME_MILLIS: u64 = 253_402_300_799_999;

/// [`MAX_TIME_MILLIS`] as a time.
#[must_use]
pub fn max_time() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(MAX_TIME_MILLIS)
}

/// Formats a time as RFC 3339 with millisecond precision, in UTC, as the dead-letter time
/// headers and the CloudEvents `time` attribute carry it.
///
/// Never panics: a time before 1970 is written as the Unix epoch and one after the year 9999
/// as [`max_time`].
#[must_use]
pub fn format_time(time: std::time::SystemTime) -> String {
    let time = time.clamp(std::time::UNIX_EPOCH, max_time());
    humantime::format_rfc3339_millis(time).to_string()
}

/// Parses an RFC 3339 time as written by [`format_time`] (or by another CloudEvents producer).
///
/// # Errors
/// [`ErrorKind::Serialization`](crate::ErrorKind::Serialization) when `text` is not RFC 3339,
/// or names a time before 1970 or after the year 9999.
pub fn parse_time(text: &str) -> crate::Result<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(text).map_err(|e| {
        crate::Error::with_source(
            crate::ErrorKind::Serialization,
            format!("`{}` is not an RFC 3339 time", shorten(text, 64)),
            e,
        )
    })
}

/// The time `millis` milliseconds after the Unix epoch, or `None` when that is before 1970 or
/// after [`max_time`] (a broker's timestamp field can hold either).
#[must_use]
pub fn time_from_unix_millis(millis: i64) -> Option<std::time::SystemTime> {
    let millis = u64::try_from(millis)
        .ok()
        .filter(|m| *m <= MAX_TIME_MILLIS)?;
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(millis))
}

/// The time `secs` seconds after the Unix epoch, or `None` past [`max_time`].
#[must_use]
pub fn time_from_unix_secs(secs: u64) -> Option<std::time::SystemTime> {
    time_from_unix_millis(i64::try_from(secs.checked_mul(1000)?).ok()?)
}

/// Milliseconds since the Unix epoch, saturating: 0 before 1970, at most those of
/// [`max_time`].
#[must_use]
pub fn unix_millis(time: std::time::SystemTime) -> i64 {
    let millis = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    i64::try_from(millis.min(u128::from(MAX_TIME_MILLIS))).unwrap_or(i64::MAX)
}

/// `time + delay`, saturating at [`max_time`] instead of panicking on a huge delay.
#[must_use]
pub fn saturating_add(
    time: std::time::SystemTime,
    delay: std::time::Duration,
) -> std::time::SystemTime {
    time.checked_add(delay)
        .map_or(max_time(), |t| t.min(max_time()))
}

/// The longest delay `bus` waits or asks a broker to wait: about a hundred years. Longer
/// delays (up to `Duration::MAX`) are taken as this one; brokers with a shorter maximum say
/// theirs in their docs.
pub const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);

/// `instant + delay`, saturating about a hundred years ahead instead of panicking on a huge
/// delay (tokio's own timers cap their deadlines the same way).
#[must_use]
pub fn saturating_deadline(
    instant: tokio::time::Instant,
    delay: std::time::Duration,
) -> tokio::time::Instant {
    instant.checked_add(delay.min(MAX_DELAY)).unwrap_or(instant)
}

/// Checks a CloudEvents `specversion` received from the wire: `bus` reads the 1.x attributes
/// and the 0.3 ones it maps (id, type, source, time). A message without the attribute is not a
/// CloudEvent and is read leniently; one that names another version is undecodable.
///
/// # Errors
/// The reason, for the dead letter, when the version is one `bus` does not read.
pub fn check_specversion(specversion: &str) -> Result<(), String> {
    let version = specversion.trim();
    if version == "0.3" || version == "1" || version.starts_with("1.") {
        Ok(())
    } else {
        Err(format!(
            "unsupported CloudEvents specversion `{}` (bus reads 1.x and 0.3)",
            shorten(version, 64)
        ))
    }
}

/// Inserts a header received as bytes: a UTF-8 value as it is; any other value base64-encoded,
/// with its name added to [`BINARY_HEADERS`], so that nothing of it is lost. A name that is not
/// UTF-8 is kept with its invalid bytes replaced (U+FFFD).
pub fn insert_bytes(headers: &mut crate::Headers, name: &[u8], value: &[u8]) {
    use base64::Engine as _;
    let name = String::from_utf8_lossy(name).into_owned();
    match std::str::from_utf8(value) {
        Ok(text) => {
            headers.insert(name, text.to_owned());
        }
        Err(_) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(value);
            // `%` and `,` are escaped in the list, so that any name can be listed.
            let escaped = name.replace('%', "%25").replace(',', "%2C");
            let listed = match headers.get(BINARY_HEADERS) {
                Some(list) if list.split(',').any(|n| n == escaped) => list.clone(),
                Some(list) => format!("{list},{escaped}"),
                None => escaped,
            };
            headers.insert(BINARY_HEADERS.to_owned(), listed);
            headers.insert(name, encoded);
        }
    }
}

/// The names of the headers [`insert_bytes`] carried base64-encoded, read back from
/// [`BINARY_HEADERS`].
#[must_use]
pub fn binary_header_names(headers: &crate::Headers) -> Vec<String> {
    headers.get(BINARY_HEADERS).map_or_else(Vec::new, |list| {
        list.split(',')
            .filter(|n| !n.is_empty())
            .map(|n| n.replace("%2C", ",").replace("%25", "%"))
            .collect()
    })
}

/// At most `max` bytes of `text` (cut at a character boundary), with `…` when cut: for reasons
/// and log lines that quote data from outside.
#[must_use]
pub fn shorten(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…", &text[..end]))
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

    #[test]
    fn time_conversions_saturate() {
        assert_eq!(
            format_time(SystemTime::UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00.000Z"
        );
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX) * 1000);
        assert_eq!(format_time(far), "9999-12-31T23:59:59.999Z");
        assert_eq!(parse_time(&format_time(max_time())).unwrap(), max_time());
        assert_eq!(time_from_unix_millis(i64::MAX), None);
        assert_eq!(time_from_unix_millis(-1), None);
        assert_eq!(time_from_unix_millis(0), Some(SystemTime::UNIX_EPOCH));
        assert_eq!(time_from_unix_secs(u64::MAX), None);
        assert_eq!(unix_millis(far), 253_402_300_799_999);
        assert_eq!(
            unix_millis(SystemTime::UNIX_EPOCH - Duration::from_secs(5)),
            0
        );
        assert_eq!(saturating_add(SystemTime::now(), Duration::MAX), max_time());
        let now = tokio::time::Instant::now();
        assert!(saturating_deadline(now, Duration::MAX) > now);
    }

    #[test]
    fn specversions() {
        assert!(check_specversion("1.0").is_ok());
        assert!(check_specversion("0.3").is_ok());
        let reason = check_specversion("9.9").unwrap_err();
        assert!(reason.contains("`9.9`"), "{reason}");
    }

    #[test]
    fn binary_header_values_are_kept_base64() {
        let mut h = crate::Headers::new();
        insert_bytes(&mut h, b"plain", b"text");
        insert_bytes(&mut h, b"bin", &[0xff, 0x00]);
        insert_bytes(&mut h, &[0xc3, 0x28], &[0x80]);
        insert_bytes(&mut h, b"a,b%", &[0x81]);
        assert_eq!(h["plain"], "text");
        assert_eq!(h["bin"], "/wA=");
        assert_eq!(h[BINARY_HEADERS], "bin,\u{fffd}(,a%2Cb%25");
        assert_eq!(
            binary_header_names(&h),
            vec!["bin".to_owned(), "\u{fffd}(".to_owned(), "a,b%".to_owned()]
        );
        assert_eq!(shorten("ééé", 3), "é…");
    }
}
