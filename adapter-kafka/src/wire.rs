//! The envelope on the wire: CloudEvents Kafka protocol binding, binary content mode.
//!
//! Attributes travel as headers named `ce_<attribute>` (`ce_id`, `ce_type`, `ce_source`,
//! `ce_specversion`, `ce_time`, and the extensions `ce_correlationid`, `ce_causationid`), the
//! content type as `content-type`, the payload as the record value, and the envelope's key as
//! the record key (which the binding also names `partitionkey`). Application headers travel
//! under their own names; one that would be mistaken for an attribute (`ce_…`,
//! `content-type`) or for a header of the adapter's own (`bus-attempt`, `bus-retry-group`, …)
//! is sent as `bus-esc-<name>` and restored on receipt.
//!
//! Decoding is total: whatever a record holds, [`decode`] makes an envelope of it, and says why
//! when the record is not a message `bus` can hand to a handler (the consumer then
//! dead-letters it). See "Foreign and malformed messages" in `docs/adapters/kafka.md`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bus_core::{headers, Envelope, Error, ErrorKind, Headers, MessageId, Result};
use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::{Message, Timestamp};

pub(crate) const CE_ID: &str = "ce_id";
pub(crate) const CE_TYPE: &str = "ce_type";
pub(crate) const CE_SOURCE: &str = "ce_source";
pub(crate) const CE_SPECVERSION: &str = "ce_specversion";
pub(crate) const CE_TIME: &str = "ce_time";
pub(crate) const CE_CORRELATIONID: &str = "ce_correlationid";
pub(crate) const CE_CAUSATIONID: &str = "ce_causationid";
pub(crate) const CONTENT_TYPE: &str = "content-type";
/// The prefix of an application header whose name `bus` reserves (see [`is_reserved`]).
pub(crate) const ESCAPED: &str = "bus-esc-";

/// Internal headers of the retry scheme, removed before a delivery is handed out.
pub(crate) const NOT_BEFORE: &str = "bus-not-before";
/// The group a retry copy is meant for.
pub(crate) const RETRY_GROUP: &str = "bus-retry-group";
/// The topic or queue a retry copy came from.
pub(crate) const RETRY_ORIGIN: &str = "bus-retry-origin";
/// Marks a record on a retry topic as a delayed publish to the topic or queue it names: for
/// every group reading it, at the first attempt, not before its `bus-not-before`.
pub(crate) const DELAYED: &str = "bus-delayed";
/// The reply topic of a request.
pub(crate) const REPLY_TO: &str = "bus-reply-to";
/// The record key, base64 (standard alphabet), of a record whose key is not UTF-8: the
/// envelope's key then holds it with the invalid bytes replaced (U+FFFD), and a retry copy or
/// dead letter of it is produced with the original key bytes (so it keeps its partition).
pub(crate) const BINARY_KEY: &str = "bus-binary-key";

/// Headers the adapter reads off records itself: an application header of one of these names
/// travels escaped.
const INTERNAL: [&str; 7] = [
    headers::ATTEMPT,
    NOT_BEFORE,
    RETRY_GROUP,
    RETRY_ORIGIN,
    DELAYED,
    REPLY_TO,
    BINARY_KEY,
];

/// Refuses an envelope that a record cannot carry exactly, rather than changing it.
///
/// # Errors
/// [`Serialization`](ErrorKind::Serialization) for an empty id or correlation id (read back
/// as a derived id and as the id), a timestamp before 1970 or after the year 9999 (`ce_time`
/// is RFC 3339), and a header name containing NUL (librdkafka consumers cut header names at
/// the first NUL).
pub(crate) fn check(envelope: &Envelope) -> Result<()> {
    if envelope.id.as_str().is_empty() || envelope.correlation_id.as_str().is_empty() {
        return Err(Error::new(
            ErrorKind::Serialization,
            "the envelope's id or correlation id is empty: a Kafka consumer reads an empty \
             `ce_id` as an id derived from the record's position, and an empty \
             `ce_correlationid` as the id",
        ));
    }
    if envelope.timestamp < UNIX_EPOCH || envelope.timestamp > headers::max_time() {
        return Err(Error::new(
            ErrorKind::Serialization,
            format!(
                "the envelope's timestamp {:?} is outside 1970-01-01 ..= 9999-12-31, which the \
                 CloudEvents `ce_time` header (RFC 3339) cannot carry",
                envelope.timestamp
            ),
        ));
    }
    if let Some(name) = envelope.headers.keys().find(|name| name.contains('\0')) {
        return Err(Error::new(
            ErrorKind::Serialization,
            format!(
                "header name {:?} contains NUL: Kafka consumers (librdkafka) cut header names \
                 at the first NUL",
                headers::shorten(name, 64)
            ),
        ));
    }
    Ok(())
}

/// The record key of `envelope`: its key, or the original bytes of a key that was received
/// as something other than UTF-8 (see [`BINARY_KEY`]).
pub(crate) fn record_key(envelope: &Envelope) -> Option<Cow<'_, [u8]>> {
    let key = envelope.key.as_ref()?;
    Some(binary_key(envelope).map_or(Cow::Borrowed(key.as_bytes()), Cow::Owned))
}

/// The bytes of [`BINARY_KEY`] when they are what the envelope's key was decoded from.
fn binary_key(envelope: &Envelope) -> Option<Vec<u8>> {
    let key = envelope.key.as_deref()?;
    let encoded = envelope.headers.get(BINARY_KEY)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    (std::str::from_utf8(&bytes).is_err() && String::from_utf8_lossy(&bytes) == key)
        .then_some(bytes)
}

/// The record headers of `envelope`, plus `extra` internal headers. Never fails and never
/// panics: what [`check`] refuses at publish is sent as it is.
pub(crate) fn encode(envelope: &Envelope, source: &str, extra: &[(&str, &str)]) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(8 + envelope.headers.len() + extra.len());
    let time = headers::format_time(envelope.timestamp);
    let mut put = |name: &str, value: &str| {
        out = std::mem::take(&mut out).insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    };
    put(CE_SPECVERSION, "1.0");
    put(CE_ID, envelope.id.as_str());
    put(CE_TYPE, &envelope.kind);
    put(CE_SOURCE, source);
    put(CE_TIME, &time);
    put(CE_CORRELATIONID, envelope.correlation_id.as_str());
    if let Some(causation) = &envelope.causation_id {
        put(CE_CAUSATIONID, causation.as_str());
    }
    if let Some(content_type) = &envelope.content_type {
        put(CONTENT_TYPE, content_type);
    }
    // Carried as the record key's bytes instead.
    let key_in_record = binary_key(envelope).is_some();
    for (name, value) in &envelope.headers {
        if name == BINARY_KEY && key_in_record {
            continue;
        }
        if is_reserved(name) {
            put(&format!("{ESCAPED}{name}"), value);
        } else {
            put(name, value);
        }
    }
    for (name, value) in extra {
        put(name, value);
    }
    out
}

/// Whether an application header named `name` travels escaped, as `bus-esc-<name>`: a
/// CloudEvents name, `content-type`, an internal header, or a name that itself starts with
/// `bus-esc-` (so that escaping is one-to-one).
pub(crate) fn is_reserved(name: &str) -> bool {
    name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ce_"))
        || name.eq_ignore_ascii_case(CONTENT_TYPE)
        || name.starts_with(ESCAPED)
        || INTERNAL.contains(&name)
}

/// The application header name that `bus-esc-<name>` stands for, when [`encode`] writes it so
/// (`<name>` is reserved); any other name, `bus-esc-` or not, is read as it is.
fn unescape(name: &str) -> Option<&str> {
    name.strip_prefix(ESCAPED).filter(|rest| is_reserved(rest))
}

/// Internal headers read off a record, next to its envelope.
#[derive(Debug, Default)]
pub(crate) struct Internal {
    pub(crate) attempt: Option<u32>,
    pub(crate) not_before: Option<SystemTime>,
    pub(crate) retry_group: Option<String>,
    pub(crate) retry_origin: Option<String>,
    /// The topic or queue a delayed publish was made to ([`DELAYED`]).
    pub(crate) delayed: Option<String>,
    pub(crate) reply_to: Option<String>,
}

/// A received record as rdkafka lets safe code read it.
#[derive(Debug, Clone)]
pub(crate) struct Record<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) timestamp: Timestamp,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) payload: Option<&'a [u8]>,
    /// The headers whose names rdkafka could read, in record order (a null value is `None`).
    pub(crate) headers: Vec<(&'a str, Option<&'a [u8]>)>,
    /// The positions of headers whose names rdkafka could not read (not UTF-8).
    pub(crate) unreadable: Vec<usize>,
}

impl<'a> Record<'a> {
    /// Reads `message` without panicking.
    ///
    /// rdkafka 0.39 panics on a header name that is not UTF-8 (`Headers::try_get` unwraps
    /// `CStr::to_str`) and offers no other safe way to read names, so each header is read on
    /// its own with that panic caught: the others are kept, and the record is then undecodable
    /// (the panic message still goes to the panic hook, once per such header).
    pub(crate) fn of<M: Message>(message: &'a M) -> Self {
        let (headers, unreadable) = message.headers().map(read_headers).unwrap_or_default();
        Self {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp(),
            key: message.key(),
            payload: message.payload(),
            headers,
            unreadable,
        }
    }

    /// The id of a record that came without one: derived from its topic, partition and offset,
    /// so every redelivery of it (also after a restart, when it is read again) has the same id.
    pub(crate) fn derived_id(&self) -> MessageId {
        MessageId::derived(&[
            b"kafka",
            self.topic.as_bytes(),
            &self.partition.to_be_bytes(),
            &self.offset.to_be_bytes(),
        ])
    }

    fn payload(&self) -> Bytes {
        self.payload.map(Bytes::copy_from_slice).unwrap_or_default()
    }
}

/// The headers of `hs` whose names can be read, and the positions of those whose names cannot
/// (see [`Record::of`]).
#[allow(clippy::type_complexity)]
fn read_headers<H: rdkafka::message::Headers + ?Sized>(
    hs: &H,
) -> (Vec<(&str, Option<&[u8]>)>, Vec<usize>) {
    let mut headers = Vec::new();
    let mut unreadable = Vec::new();
    for idx in 0..hs.count() {
        match panic::catch_unwind(AssertUnwindSafe(|| hs.try_get(idx))) {
            Ok(Some(h)) => headers.push((h.key, h.value)),
            Ok(None) => {}
            Err(_) => unreadable.push(idx),
        }
    }
    (headers, unreadable)
}

/// A received record as `bus` reads it.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) envelope: Envelope,
    pub(crate) internal: Internal,
    /// Why the record is not a message `bus` can hand to a handler; the consumer dead-letters
    /// it with this reason, the envelope keeping what could be read.
    pub(crate) undecodable: Option<String>,
}

/// CloudEvents attributes as received.
#[derive(Debug, Default)]
struct Attributes {
    id: Option<String>,
    kind: Option<String>,
    time: Option<String>,
    correlation: Option<String>,
    causation: Option<String>,
    content_type: Option<String>,
    specversion: Option<String>,
    source: Option<String>,
}

impl Attributes {
    /// The slot of attribute header `name`, if it is one.
    fn slot(&mut self, name: &str) -> Option<&mut Option<String>> {
        Some(match name {
            CE_ID => &mut self.id,
            CE_TYPE => &mut self.kind,
            CE_TIME => &mut self.time,
            CE_CORRELATIONID => &mut self.correlation,
            CE_CAUSATIONID => &mut self.causation,
            CONTENT_TYPE => &mut self.content_type,
            CE_SPECVERSION => &mut self.specversion,
            CE_SOURCE => &mut self.source,
            _ => return None,
        })
    }
}

/// The envelope of a received record; never fails, never panics.
///
/// Lenient where it can be: a record without CloudEvents headers (or with an empty `ce_id`)
/// gets an id derived from its topic, partition and offset ([`Record::derived_id`]), an empty
/// kind, and the record's timestamp; a `ce_time` that is not RFC 3339, or a record timestamp
/// outside 1970..=9999, becomes the receive time with the raw value in
/// [`headers::RAW_TIME`]; an empty `ce_correlationid` is the id, as a missing one; header
/// values that are not UTF-8 are kept base64 ([`headers::insert_bytes`]); a null value reads
/// as empty; of repeated header names the last wins, except that an escaped header
/// (`bus-esc-<name>`) wins over a raw one of the same name wherever they are. Undecodable
/// (with the reason) where it must be: a `ce_specversion` `bus` does not read, a CloudEvents
/// attribute that is not UTF-8, a header name rdkafka cannot read.
pub(crate) fn decode<'a>(record: &Record<'a>, received: SystemTime) -> Decoded {
    // At the millisecond, as `ce_time` carries it, so a retry copy reads back the same.
    let received =
        headers::time_from_unix_millis(headers::unix_millis(received)).unwrap_or(UNIX_EPOCH);
    let mut internal = Internal::default();
    let mut problems: Vec<String> = Vec::new();
    let mut ce = Attributes::default();
    // Application headers by name: (escaped, value).
    let mut app: BTreeMap<&str, (bool, &[u8])> = BTreeMap::new();
    let mut put = |name: &'a str, escaped: bool, bytes: &'a [u8]| {
        if !matches!(app.get(name), Some((true, _)) if !escaped) {
            app.insert(name, (escaped, bytes));
        }
    };
    if !record.unreadable.is_empty() {
        problems.push(format!(
            "{} header name(s) are not UTF-8 and cannot be read (header position(s) {:?}); \
             those headers are lost",
            record.unreadable.len(),
            &record.unreadable[..record.unreadable.len().min(10)]
        ));
    }
    for &(name, value) in &record.headers {
        // librdkafka hands names over as C strings, cut at the first NUL; so does this, so that
        // whatever is read can be produced again.
        let name = name.split('\0').next().unwrap_or_default();
        let bytes = value.unwrap_or_default();
        if let Some(slot) = ce.slot(name) {
            match std::str::from_utf8(bytes) {
                Ok(text) => *slot = Some(text.to_owned()),
                Err(_) => {
                    problems.push(format!("the CloudEvents header `{name}` is not UTF-8"));
                    put(name, false, bytes);
                }
            }
            continue;
        }
        let text = || String::from_utf8_lossy(bytes).into_owned();
        match name {
            headers::ATTEMPT => internal.attempt = text().trim().parse().ok(),
            NOT_BEFORE => internal.not_before = headers::parse_time(&text()).ok(),
            RETRY_GROUP => internal.retry_group = Some(text()),
            RETRY_ORIGIN => internal.retry_origin = Some(text()),
            DELAYED => internal.delayed = Some(text()),
            REPLY_TO => internal.reply_to = Some(text()),
            name => match unescape(name) {
                Some(name) => put(name, true, bytes),
                None => put(name, false, bytes),
            },
        }
    }
    let mut user = Headers::new();
    // The list of binary headers first, so that `insert_bytes` adds to it.
    let binary_list = app.remove_entry(headers::BINARY_HEADERS);
    for (name, (_, bytes)) in binary_list.into_iter().chain(app) {
        headers::insert_bytes(&mut user, name.as_bytes(), bytes);
    }
    if let Some(version) = &ce.specversion {
        if let Err(reason) = headers::check_specversion(version) {
            problems.push(reason);
        }
    }
    let id = match ce.id.take() {
        Some(id) if !id.is_empty() => MessageId::from(id),
        _ => record.derived_id(),
    };
    let timestamp = match &ce.time {
        Some(raw) => headers::parse_time(raw).unwrap_or_else(|_| {
            user.insert(headers::RAW_TIME.to_owned(), raw.clone());
            received
        }),
        None => match record.timestamp {
            Timestamp::NotAvailable => received,
            Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) => {
                headers::time_from_unix_millis(ms).unwrap_or_else(|| {
                    user.insert(headers::RAW_TIME.to_owned(), ms.to_string());
                    received
                })
            }
        },
    };
    let key = record.key.map(|bytes| match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            user.insert(BINARY_KEY.to_owned(), encoded);
            String::from_utf8_lossy(bytes).into_owned()
        }
    });
    let undecodable = if problems.is_empty() {
        None
    } else {
        // Kept for whoever reads the dead letter: the attributes the envelope has no field for.
        for (name, value) in [(CE_SPECVERSION, &ce.specversion), (CE_SOURCE, &ce.source)] {
            if let Some(value) = value {
                user.insert(name.to_owned(), value.clone());
            }
        }
        Some(problems.join("; "))
    };
    let mut envelope = Envelope::new(ce.kind.unwrap_or_default(), record.payload());
    envelope.correlation_id = ce
        .correlation
        .filter(|c| !c.is_empty())
        .map_or_else(|| id.clone(), MessageId::from);
    envelope.id = id;
    envelope.causation_id = ce.causation.map(MessageId::from);
    envelope.timestamp = timestamp;
    envelope.key = key;
    envelope.content_type = ce.content_type;
    envelope.headers = user;
    Decoded {
        envelope,
        internal,
        undecodable,
    }
}

/// What is left of a record whose decoding panicked (it cannot, but the consumer thread must
/// not die of it if it ever did): its payload and derived id, undecodable.
pub(crate) fn salvage(record: &Record<'_>, received: SystemTime, panic: &str) -> Decoded {
    let id = record.derived_id();
    let mut envelope = Envelope::new("", record.payload()).with_id(id.clone());
    envelope.correlation_id = id;
    envelope.timestamp = received;
    Decoded {
        envelope,
        internal: Internal::default(),
        undecodable: Some(format!(
            "decoding the record panicked: {}",
            headers::shorten(panic, 200)
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bus_core::conformance::arbitrary;
    use proptest::prelude::*;
    use rdkafka::message::OwnedMessage;

    use super::*;

    /// `envelope` as a record with `extra` headers, read back.
    fn through_record(envelope: &Envelope, extra: &[(&str, &str)]) -> Decoded {
        let hs = encode(envelope, "bus://test", extra);
        let message = OwnedMessage::new(
            Some(envelope.payload.to_vec()),
            record_key(envelope).map(Cow::into_owned),
            "t".into(),
            Timestamp::now(),
            0,
            42,
            Some(hs),
        );
        decode(&Record::of(&message), SystemTime::now())
    }

    fn bare_record(timestamp: Timestamp) -> Record<'static> {
        Record {
            topic: "orders",
            partition: 2,
            offset: 17,
            timestamp,
            key: None,
            payload: Some(b"x"),
            headers: Vec::new(),
            unreadable: Vec::new(),
        }
    }

    #[test]
    fn round_trip_keeps_every_field_and_escapes_reserved_names() {
        let parent = Envelope::new("order.placed", "{}");
        let envelope = Envelope::new("payment.captured", &b"\x00\xffbin"[..])
            .caused_by(&parent)
            .with_key("order-7")
            .with_content_type("application/json")
            .with_header("traceparent", "00-abc-def-01")
            .with_header("ce_type", "user's own")
            .with_header("bus-attempt", "user's own too")
            .with_header("bus-reply-to", "and this")
            .with_header("tenant", "acme")
            // ce_time carries milliseconds.
            .with_timestamp(UNIX_EPOCH + Duration::from_millis(1_764_000_000_123));
        let got = through_record(&envelope, &[(headers::ATTEMPT, "3")]);
        assert_eq!(got.envelope, envelope);
        assert_eq!(got.internal.attempt, Some(3));
        assert!(got.internal.reply_to.is_none());
        assert!(got.undecodable.is_none());
    }

    #[test]
    fn bare_record_gets_a_stable_id() {
        let record = bare_record(Timestamp::CreateTime(1_764_000_000_000));
        let got = decode(&record, SystemTime::now()).envelope;
        let again = decode(&record, SystemTime::now()).envelope;
        assert_eq!(got.id, again.id, "the same record, the same id");
        assert_eq!(got.id, record.derived_id());
        let other = Record {
            offset: 18,
            ..record.clone()
        };
        assert_ne!(decode(&other, SystemTime::now()).envelope.id, got.id);
        assert_eq!(got.correlation_id, got.id);
        assert!(got.key.is_none());
        assert_eq!(
            got.timestamp,
            UNIX_EPOCH + Duration::from_millis(1_764_000_000_000)
        );
        let empty_id = Record {
            headers: vec![(CE_ID, Some(&b""[..]))],
            ..record.clone()
        };
        assert_eq!(decode(&empty_id, SystemTime::now()).envelope.id, got.id);
    }

    /// Record timestamps a broker can hold, in and out of what a `SystemTime` can be: the
    /// unreadable ones become the receive time with the raw value kept, and the envelope can
    /// be encoded again (for a retry copy) and read back unchanged. Before the fix, i64::MAX
    /// made a time past the year 9999 that `format_time` panicked on when re-encoded.
    #[test]
    fn record_timestamps_saturate() {
        let received = UNIX_EPOCH + Duration::from_millis(1_764_000_000_000);
        for (timestamp, want, raw) in [
            (Timestamp::CreateTime(0), UNIX_EPOCH, None),
            (
                Timestamp::LogAppendTime(5),
                UNIX_EPOCH + Duration::from_millis(5),
                None,
            ),
            (Timestamp::NotAvailable, received, None),
            (Timestamp::CreateTime(-5), received, Some("-5")),
            (
                Timestamp::CreateTime(i64::MAX),
                received,
                Some("9223372036854775807"),
            ),
            (
                Timestamp::LogAppendTime(i64::MIN),
                received,
                Some("-9223372036854775808"),
            ),
        ] {
            let got = decode(&bare_record(timestamp), received);
            assert!(got.undecodable.is_none());
            assert_eq!(got.envelope.timestamp, want, "{timestamp:?}");
            assert_eq!(got.envelope.header(headers::RAW_TIME), raw, "{timestamp:?}");
            check(&got.envelope).expect("a decoded envelope can be published again");
            assert_eq!(through_record(&got.envelope, &[]).envelope, got.envelope);
        }
    }

    #[test]
    fn unreadable_times_and_binary_values_are_kept() {
        let received = UNIX_EPOCH + Duration::from_millis(1_764_000_000_000);
        let record = Record {
            headers: vec![
                (CE_TIME, Some(&b"yesterday"[..])),
                ("blob", Some(&b"\xff\x00"[..])),
                ("nothing", None),
            ],
            key: Some(b"\x00\x00\x00\x00\x00\x00\x00\x2a\xff"),
            ..bare_record(Timestamp::CreateTime(1))
        };
        let got = decode(&record, received);
        assert!(got.undecodable.is_none());
        let envelope = got.envelope;
        assert_eq!(envelope.timestamp, received);
        assert_eq!(envelope.header(headers::RAW_TIME), Some("yesterday"));
        assert_eq!(envelope.header("blob"), Some("/wA="));
        assert_eq!(envelope.header(headers::BINARY_HEADERS), Some("blob"));
        assert_eq!(envelope.header("nothing"), Some(""));
        assert_eq!(envelope.key.as_deref(), Some("\0\0\0\0\0\0\0*\u{fffd}"));
        // A retry copy or dead letter goes out with the original key bytes.
        assert_eq!(
            record_key(&envelope).as_deref(),
            Some(&b"\x00\x00\x00\x00\x00\x00\x00\x2a\xff"[..])
        );
        assert_eq!(through_record(&envelope, &[]).envelope, envelope);
    }

    #[test]
    fn unknown_specversion_is_undecodable_with_what_was_read() {
        let record = Record {
            headers: vec![
                (CE_SPECVERSION, Some(&b"9.9"[..])),
                (CE_ID, Some(b"evt-9")),
                (CE_TYPE, Some(b"com.example")),
                (CE_SOURCE, Some(b"/elsewhere")),
            ],
            ..bare_record(Timestamp::NotAvailable)
        };
        let got = decode(&record, SystemTime::now());
        let reason = got.undecodable.expect("undecodable");
        assert!(reason.contains("9.9"), "{reason}");
        assert_eq!(got.envelope.id.as_str(), "evt-9");
        assert_eq!(got.envelope.kind, "com.example");
        assert_eq!(got.envelope.header(CE_SPECVERSION), Some("9.9"));
        assert_eq!(got.envelope.header(CE_SOURCE), Some("/elsewhere"));
        assert_eq!(&got.envelope.payload[..], b"x");
        // The dead letter carries the received attributes escaped, and reads back as 1.0.
        let dead = through_record(&got.envelope, &[]);
        assert!(dead.undecodable.is_none());
        assert_eq!(dead.envelope, got.envelope);

        let not_utf8 = Record {
            headers: vec![(CE_TYPE, Some(&b"\xff"[..]))],
            ..bare_record(Timestamp::NotAvailable)
        };
        let reason = decode(&not_utf8, SystemTime::now()).undecodable.unwrap();
        assert!(reason.contains("ce_type"), "{reason}");
    }

    /// rdkafka's `Headers::try_get`, as 0.39 has it: it unwraps the name as UTF-8.
    struct RdkafkaLikeHeaders(Vec<(Vec<u8>, Option<Vec<u8>>)>);

    impl rdkafka::message::Headers for RdkafkaLikeHeaders {
        fn count(&self) -> usize {
            self.0.len()
        }

        fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
            let (name, value) = self.0.get(idx)?;
            Some(Header {
                key: std::str::from_utf8(name).unwrap(),
                value: value.as_deref(),
            })
        }
    }

    /// Before the fix, iterating the headers panicked on the consumer thread and the
    /// subscription ended as if closed.
    #[test]
    fn header_names_that_are_not_utf8_are_caught_and_the_rest_kept() {
        let hs = RdkafkaLikeHeaders(vec![
            (b"ce_id".to_vec(), Some(b"evt-1".to_vec())),
            (b"\xff\xfename".to_vec(), Some(b"lost".to_vec())),
            (b"tenant".to_vec(), None),
        ]);
        let (readable, unreadable) = read_headers(&hs);
        assert_eq!(
            readable,
            vec![("ce_id", Some(&b"evt-1"[..])), ("tenant", None)]
        );
        assert_eq!(unreadable, vec![1]);
        let record = Record {
            headers: readable,
            unreadable,
            ..bare_record(Timestamp::NotAvailable)
        };
        let got = decode(&record, SystemTime::now());
        let reason = got.undecodable.expect("undecodable");
        assert!(reason.contains("not UTF-8"), "{reason}");
        assert_eq!(got.envelope.id.as_str(), "evt-1");
        assert_eq!(got.envelope.header("tenant"), Some(""));
    }

    /// Before the fix a foreign `bus-esc-tenant` read as `tenant` (escaping was not
    /// one-to-one), which of `ce_ext` and `bus-esc-ce_ext` won depended on their order, and a
    /// repeated name whose first value was binary stayed listed in `bus-binary-headers` after
    /// a text value replaced it (the text was then read as base64).
    #[test]
    fn escaped_names_read_one_to_one_whatever_the_order() {
        let forward: Vec<(&str, Option<&[u8]>)> = vec![
            ("bus-esc-tenant", Some(b"escaped by nobody")),
            ("tenant", Some(b"acme")),
            ("ce_ext", Some(b"raw")),
            ("bus-esc-ce_ext", Some(b"escaped")),
            ("bus-esc-bus-esc-x", Some(b"double")),
            ("twice", Some(b"\xff")),
            ("twice", Some(b"text")),
        ];
        let mut backward = forward.clone();
        backward.reverse();
        // Reversed, the binary value of `twice` is the last.
        let mut got = Vec::new();
        for hs in [forward, backward] {
            let record = Record {
                headers: hs,
                ..bare_record(Timestamp::NotAvailable)
            };
            let envelope = decode(&record, SystemTime::now()).envelope;
            assert_eq!(envelope.header("tenant"), Some("acme"));
            assert_eq!(envelope.header("bus-esc-tenant"), Some("escaped by nobody"));
            assert_eq!(envelope.header("ce_ext"), Some("escaped"));
            assert_eq!(envelope.header("bus-esc-x"), Some("double"));
            assert_eq!(through_record(&envelope, &[]).envelope, envelope);
            got.push(envelope);
        }
        assert_eq!(got[0].header("twice"), Some("text"));
        assert_eq!(got[0].header(headers::BINARY_HEADERS), None);
        assert_eq!(got[1].header("twice"), Some("/w=="));
        assert_eq!(got[1].header(headers::BINARY_HEADERS), Some("twice"));
    }

    /// Before the fix an empty `ce_correlationid` stayed empty (the other adapters read it as
    /// the id), and publish sent an empty id or correlation id that came back changed.
    #[test]
    fn empty_correlation_id_reads_as_the_id() {
        let record = Record {
            headers: vec![(CE_ID, Some(&b"evt-1"[..])), (CE_CORRELATIONID, Some(b""))],
            ..bare_record(Timestamp::NotAvailable)
        };
        let envelope = decode(&record, SystemTime::now()).envelope;
        assert_eq!(envelope.correlation_id.as_str(), "evt-1");
        let empty = Envelope::new("k", "").with_correlation_id("");
        assert_eq!(check(&empty).unwrap_err().kind(), ErrorKind::Serialization);
        let empty = Envelope::new("k", "").with_id("");
        assert_eq!(check(&empty).unwrap_err().kind(), ErrorKind::Serialization);
    }

    #[test]
    fn publish_refuses_what_a_record_cannot_carry() {
        let old = Envelope::new("k", "").with_timestamp(UNIX_EPOCH - Duration::from_secs(1));
        assert_eq!(check(&old).unwrap_err().kind(), ErrorKind::Serialization);
        let far =
            Envelope::new("k", "").with_timestamp(headers::max_time() + Duration::from_millis(1));
        assert_eq!(check(&far).unwrap_err().kind(), ErrorKind::Serialization);
        let nul = Envelope::new("k", "").with_header("a\0b", "v");
        assert_eq!(check(&nul).unwrap_err().kind(), ErrorKind::Serialization);
        check(&Envelope::new("k", "").with_timestamp(headers::max_time())).unwrap();
    }

    fn hostile_header_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => arbitrary::text().prop_map(String::into_bytes),
            2 => proptest::collection::vec(any::<u8>(), 0..48),
            1 => Just(b"9.9".to_vec()),
            1 => Just(b"1.0".to_vec()),
            1 => Just(b"4294967295".to_vec()),
            1 => Just(b"9999-12-31T23:59:59.999Z".to_vec()),
            1 => Just(b"+275760-09-13T00:00:00Z".to_vec()),
        ]
    }

    /// Header lists as other producers send them: any names and values, CloudEvents and the
    /// adapter's own names among them, null values.
    fn hostile_headers() -> impl Strategy<Value = Vec<(Vec<u8>, Option<Vec<u8>>)>> {
        let known = proptest::sample::select(vec![
            CE_ID,
            CE_TYPE,
            CE_TIME,
            CE_SPECVERSION,
            CE_SOURCE,
            CE_CORRELATIONID,
            CE_CAUSATIONID,
            CONTENT_TYPE,
            headers::ATTEMPT,
            NOT_BEFORE,
            RETRY_GROUP,
            REPLY_TO,
            BINARY_KEY,
            "bus-esc-ce_id",
            headers::BINARY_HEADERS,
        ])
        .prop_map(|name| name.as_bytes().to_vec());
        let named =
            proptest::collection::vec((known, proptest::option::of(hostile_header_value())), 0..8);
        (arbitrary::raw_headers(), named).prop_map(|(raw, named)| {
            raw.into_iter()
                .map(|(name, value)| (name, Some(value)))
                .chain(named)
                .collect()
        })
    }

    fn hostile_timestamp() -> impl Strategy<Value = Timestamp> {
        let millis = prop_oneof![
            any::<i64>(),
            Just(-1),
            Just(0),
            Just(i64::MAX),
            Just(i64::MIN),
            Just(headers::MAX_TIME_MILLIS as i64 + 1),
        ];
        (0..3u8, millis).prop_map(|(kind, ms)| match kind {
            0 => Timestamp::NotAvailable,
            1 => Timestamp::CreateTime(ms),
            _ => Timestamp::LogAppendTime(ms),
        })
    }

    #[test]
    fn property_decode_never_panics() {
        let strategy = (
            hostile_headers(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..24)),
            proptest::option::of(arbitrary::payload()),
            hostile_timestamp(),
            any::<i64>(),
        );
        arbitrary::check(
            "kafka decode never panics",
            256,
            strategy,
            |(raw_headers, key, payload, timestamp, offset)| {
                // What rdkafka hands over: names it can read, positions of those it cannot.
                let mut hs = Vec::new();
                let mut unreadable = Vec::new();
                for (idx, (name, value)) in raw_headers.iter().enumerate() {
                    match std::str::from_utf8(name) {
                        Ok(name) => hs.push((name, value.as_deref())),
                        Err(_) => unreadable.push(idx),
                    }
                }
                let record = Record {
                    topic: "hostile",
                    partition: 0,
                    offset,
                    timestamp,
                    key: key.as_deref(),
                    payload: payload.as_deref(),
                    headers: hs,
                    unreadable: unreadable.clone(),
                };
                let received = SystemTime::now();
                let got = decode(&record, received);
                let envelope = &got.envelope;
                prop_assert!(!envelope.id.as_str().is_empty());
                prop_assert!(envelope.timestamp >= UNIX_EPOCH);
                prop_assert!(envelope.timestamp <= headers::max_time());
                prop_assert_eq!(
                    &envelope.payload[..],
                    payload.as_deref().unwrap_or_default()
                );
                prop_assert_eq!(
                    decode(&record, received).envelope.id,
                    envelope.id.clone(),
                    "the same record, the same id"
                );
                if !unreadable.is_empty() {
                    prop_assert!(got.undecodable.is_some());
                }
                // Whatever was received can be produced again (retry copy, dead letter)
                // and reads back the same.
                prop_assert!(check(envelope).is_ok());
                let again = through_record(envelope, &[]);
                prop_assert_eq!(&again.envelope, envelope);
                prop_assert!(again.undecodable.is_none());
                Ok(())
            },
        );
    }

    #[test]
    fn property_envelope_round_trip() {
        arbitrary::check(
            "kafka envelope round trip",
            256,
            arbitrary::envelope(),
            |envelope| {
                if let Err(e) = check(&envelope) {
                    // The one thing an arbitrary envelope can hold that Kafka cannot carry.
                    prop_assert!(envelope.headers.keys().any(|n| n.contains('\0')), "{e}");
                    return Ok(());
                }
                let got = through_record(&envelope, &[]);
                prop_assert_eq!(got.envelope, envelope);
                prop_assert!(got.undecodable.is_none());
                Ok(())
            },
        );
    }

    #[test]
    fn property_binary_keys_survive_re_encoding() {
        arbitrary::check(
            "kafka binary record keys survive re-encoding",
            256,
            proptest::collection::vec(any::<u8>(), 0..32),
            |key| {
                let record = Record {
                    key: Some(&key),
                    ..bare_record(Timestamp::CreateTime(0))
                };
                let envelope = decode(&record, SystemTime::now()).envelope;
                let sent = record_key(&envelope).map(Cow::into_owned);
                prop_assert_eq!(sent.as_deref(), Some(&key[..]));
                prop_assert_eq!(through_record(&envelope, &[]).envelope, envelope);
                Ok(())
            },
        );
    }
}
