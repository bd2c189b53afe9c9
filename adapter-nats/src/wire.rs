//! The envelope on the wire: CloudEvents binary mode over NATS headers.
//!
//! | envelope | NATS header |
//! |---|---|
//! | `id` | `ce-id` |
//! | `kind` | `ce-type` |
//! | (the configured source) | `ce-source` |
//! | `timestamp` | `ce-time` (RFC 3339, milliseconds) |
//! | | `ce-specversion: 1.0` |
//! | `content_type` | `content-type` (read also as `Content-Type` or `ce-datacontenttype`) |
//! | `correlation_id` | `ce-correlationid` |
//! | `causation_id` | `ce-causationid` |
//! | `key` | `ce-partitionkey` (the CloudEvents partitioning extension) |
//! | `headers` | as they are (`traceparent`, `tracestate` included) |
//! | `payload` | the message body |
//!
//! A user header whose name would be read back as something else or mean something to
//! JetStream (it starts with `ce-` or `Nats-` in any case, is `content-type` in any case, or
//! starts with `bus-esc-`), whose name NATS cannot carry (bytes
//! outside `!`..`~`, or `:`), or whose value NATS would alter (CR or LF, leading or trailing
//! whitespace) travels as `bus-esc-<name>` with name and value percent-encoded, and is decoded
//! on receipt. Every other header is written exactly as named.

use std::str::FromStr;
use std::time::SystemTime;

use async_nats::{HeaderMap, HeaderName, StatusCode};
use bus_core::{headers, Envelope, Error, ErrorKind, Headers, MessageId, Result};
use bytes::Bytes;

/// The message id (`id`).
pub const CE_ID: &str = "ce-id";
/// The kind (`type`).
pub const CE_TYPE: &str = "ce-type";
/// The producer (`source`).
pub const CE_SOURCE: &str = "ce-source";
/// The timestamp, RFC 3339 (`time`).
pub const CE_TIME: &str = "ce-time";
/// Always `1.0` (`specversion`).
pub const CE_SPECVERSION: &str = "ce-specversion";
/// The content type as a `ce-` attribute, read when `content-type` is absent.
pub const CE_DATACONTENTTYPE: &str = "ce-datacontenttype";
/// The content type (`datacontenttype`).
pub const CONTENT_TYPE: &str = "content-type";
/// The correlation id (extension `correlationid`).
pub const CE_CORRELATIONID: &str = "ce-correlationid";
/// The causation id (extension `causationid`).
pub const CE_CAUSATIONID: &str = "ce-causationid";
/// The ordering key (partitioning extension `partitionkey`).
pub const CE_PARTITIONKEY: &str = "ce-partitionkey";
/// JetStream's de-duplication id, which a plain NATS producer may set: the id of a message
/// without `ce-id`.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
/// On a dead letter only: an envelope attribute NATS could not carry as it was (with a line
/// break, or leading or trailing whitespace), as it was; the attribute itself then carries it
/// with line breaks as spaces, trimmed. Named `bus-nats-original-<attribute>` (`ce-type`, …).
pub const ORIGINAL_PREFIX: &str = "bus-nats-original-";
const ESCAPED: &str = "bus-esc-";

/// The NATS headers carrying `envelope`.
///
/// # Errors
/// [`ErrorKind::Serialization`] when an attribute would not come back as it is: an empty id or
/// correlation id (read back as a derived one), an empty causation id (read back as none),
/// or an id, kind, key or content type with CR or LF or leading or trailing whitespace (NATS
/// header values cannot hold line breaks and lose that whitespace).
pub(crate) fn encode(envelope: &Envelope, source: &str) -> Result<HeaderMap> {
    let mut map = HeaderMap::new();
    let mut refused = None;
    write_attributes(envelope, source, &mut map, |name, _| {
        refused.get_or_insert(name);
    });
    if let Some(name) = refused {
        return Err(Error::new(
            ErrorKind::Serialization,
            format!(
                "the envelope's `{name}` cannot travel in a NATS header as it is (empty where an \
                 id is needed, or with a line break or leading or trailing whitespace)"
            ),
        ));
    }
    write_user_headers(envelope, &mut map);
    Ok(map)
}

/// The NATS headers carrying a dead letter: like [`encode`], but never refusing. An attribute
/// NATS cannot carry is written with line breaks as spaces, trimmed (an empty id as a derived
/// one), and its exact value kept in the header `bus-nats-original-<attribute>`, so that the
/// dead letter is always stored.
pub(crate) fn encode_lossy(envelope: &Envelope, source: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    let mut originals = Headers::new();
    write_attributes(envelope, source, &mut map, |name, value| {
        originals.insert(format!("{ORIGINAL_PREFIX}{name}"), value.to_owned());
    });
    write_user_headers(envelope, &mut map);
    for (name, value) in &originals {
        user_header(&mut map, name, value);
    }
    map
}

/// Writes the CloudEvents attributes; calls `altered` with each one written differently from
/// the envelope's value.
fn write_attributes(
    envelope: &Envelope,
    source: &str,
    map: &mut HeaderMap,
    mut altered: impl FnMut(&'static str, &str),
) {
    let mut attribute = |name: &'static str, value: &str, id: bool| {
        let refused = (id && value.is_empty()) || needs_escape_value(value);
        if !refused {
            // The usual case: written as it is, without building a cleaned copy first, under
            // a name that is not copied either.
            map.insert(HeaderName::from_static(name), value);
            return;
        }
        altered(name, value);
        let mut written = value.replace(['\r', '\n'], " ").trim().to_owned();
        if id && written.is_empty() {
            written = MessageId::derived(&[value.as_bytes()]).to_string();
        }
        map.insert(HeaderName::from_static(name), written);
    };
    attribute(CE_SPECVERSION, "1.0", false);
    attribute(CE_ID, envelope.id.as_str(), true);
    attribute(CE_TYPE, &envelope.kind, false);
    // The configured source and the formatted time are not the envelope's: never refused.
    let source = if source.contains(['\r', '\n']) {
        std::borrow::Cow::Owned(source.replace(['\r', '\n'], " "))
    } else {
        std::borrow::Cow::Borrowed(source)
    };
    attribute(CE_SOURCE, source.trim(), false);
    attribute(CE_TIME, &headers::format_time(envelope.timestamp), false);
    attribute(CE_CORRELATIONID, envelope.correlation_id.as_str(), true);
    if let Some(causation) = &envelope.causation_id {
        attribute(CE_CAUSATIONID, causation.as_str(), true);
    }
    if let Some(key) = &envelope.key {
        attribute(CE_PARTITIONKEY, key, false);
    }
    if let Some(content_type) = &envelope.content_type {
        attribute(CONTENT_TYPE, content_type, false);
    }
}

fn write_user_headers(envelope: &Envelope, map: &mut HeaderMap) {
    for (name, value) in &envelope.headers {
        user_header(map, name, value);
    }
}

/// Writes a user header, escaped when it would not come back intact (module docs).
fn user_header(map: &mut HeaderMap, name: &str, value: &str) {
    let has_prefix = |prefix: &str| {
        name.get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    // `Nats-…` headers mean something to JetStream (de-duplication, expected sequences,
    // roll-ups): never written as a user header.
    let reserved = has_prefix("ce-")
        || has_prefix("nats-")
        || name.eq_ignore_ascii_case(CONTENT_TYPE)
        || name.starts_with(ESCAPED);
    let bad_name = name.is_empty() || name.bytes().any(|b| b == b':' || !(33..=126).contains(&b));
    if reserved || bad_name || needs_escape_value(value) {
        map.insert(
            format!("{ESCAPED}{}", pct_encode(name)).as_str(),
            pct_encode(value),
        );
    } else {
        map.insert(name, value);
    }
}

/// Whether NATS would alter the value: it cannot hold line breaks, and the client trims
/// (Unicode) whitespace at both ends when reading.
fn needs_escape_value(value: &str) -> bool {
    // Bytewise: CR and LF never occur inside a multi-byte character.
    value.bytes().any(|b| b == b'\r' || b == b'\n')
        || value.starts_with(char::is_whitespace)
        || value.ends_with(char::is_whitespace)
}

fn pct_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (33..=126).contains(&byte) && byte != b'%' && byte != b':' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn pct_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The bytes one user header takes on the wire, escaped as [`encode`] writes it.
pub(crate) fn user_header_len(name: &str, value: &str) -> usize {
    let mut map = HeaderMap::new();
    user_header(&mut map, name, value);
    header_len(&map) - header_len(&HeaderMap::new())
}

/// The bytes the headers take on the wire (`NATS/1.0\r\n`, `name: value\r\n` each, `\r\n`),
/// which the server counts against its max_payload together with the body.
pub(crate) fn header_len(map: &HeaderMap) -> usize {
    let mut len = "NATS/1.0\r\n\r\n".len();
    for (name, values) in map.iter() {
        let name: &str = name.as_ref();
        for value in values {
            len += name.len() + 2 + value.as_str().len() + 2;
        }
    }
    len
}

/// What to use where a message carries no CloudEvents attributes (published by a plain
/// client).
#[derive(Debug)]
pub(crate) struct Defaults<'a> {
    /// Where JetStream stored it, which gives its id, stable across redeliveries. Without it,
    /// an id derived from the message's content.
    pub(crate) stored: Option<Stored<'a>>,
    /// The kind: the topic or queue it was received from.
    pub(crate) kind: &'a str,
    /// When the server stored it, if known.
    pub(crate) time: Option<SystemTime>,
}

/// Where JetStream stored a message: `<stream>:<sequence>` is its id when it names none. Built
/// only then: most messages name theirs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stored<'a> {
    pub(crate) stream: &'a str,
    /// The stream sequence, in decimal.
    pub(crate) sequence: &'a str,
}

impl Stored<'_> {
    fn id(self) -> MessageId {
        let mut id = String::with_capacity(self.stream.len() + 1 + self.sequence.len());
        id.push_str(self.stream);
        id.push(':');
        id.push_str(self.sequence);
        MessageId::from(id)
    }
}

/// A received message: its envelope, and why it cannot be handled if it cannot.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) envelope: Envelope,
    /// Set when the message is undecodable (see `Delivery::with_undecodable`).
    pub(crate) undecodable: Option<String>,
}

/// The envelope of a message as the client read it. Never fails: missing or malformed
/// attributes get defaults; a message that is not one `bus` can read (a CloudEvents
/// `specversion` it does not know, a status line in a stored message) is returned with the
/// reason, and as much of it as could be kept.
pub(crate) fn decode(
    map: Option<&HeaderMap>,
    status: Option<(StatusCode, Option<&str>)>,
    payload: Bytes,
    defaults: Defaults<'_>,
) -> Received {
    // Borrowed: only what the envelope keeps is copied.
    let mut fields: Vec<(&str, &str)> =
        Vec::with_capacity(map.map_or(0, |m| m.iter().map(|(_, v)| v.len()).sum()));
    if let Some(map) = map {
        for (name, values) in map.iter() {
            let name: &str = name.as_ref();
            for value in values {
                fields.push((name, value.as_str()));
            }
        }
    }
    // The client's map has no order between names: sort by name, so that a derived id is the
    // same every time, keeping the values of a repeated header in the order received (the
    // last one wins).
    fields.sort_by(|a, b| a.0.cmp(b.0));
    let problem = match status {
        Some((code, description)) if code != StatusCode::OK => Some(format!(
            "the message carries the status line `{}`, which only the server may send",
            format!(
                "{} {}",
                code.as_u16(),
                headers::shorten(description.unwrap_or_default(), 64)
            )
            .trim_end()
        )),
        _ => None,
    };
    build(&fields, Headers::new(), payload, defaults, problem)
}

/// The envelope of a message from its raw header block (as `STREAM.MSG.GET` returns it), read
/// leniently: lines without a colon become headers with an empty value, values that are not
/// UTF-8 are kept base64-encoded (`bus_core::headers::insert_bytes`). Always undecodable, for
/// `reason`: it is only read this way because the client could not read it.
pub(crate) fn decode_raw(
    block: &[u8],
    payload: Bytes,
    defaults: Defaults<'_>,
    reason: String,
) -> Received {
    let mut fields = Vec::new();
    let mut binary = Headers::new();
    let mut lines = block
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    // The version line (`NATS/1.0`, maybe with a status): the reason says what was wrong.
    let _ = lines.next();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (name, value) = match line.iter().position(|b| *b == b':') {
            Some(at) => (&line[..at], line[at + 1..].trim_ascii()),
            None => (line, &b""[..]),
        };
        match (std::str::from_utf8(name), std::str::from_utf8(value)) {
            (Ok(name), Ok(value)) => fields.push((name.to_owned(), value.to_owned())),
            _ => headers::insert_bytes(&mut binary, name, value),
        }
    }
    let fields: Vec<(&str, &str)> = fields
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    build(&fields, binary, payload, defaults, Some(reason))
}

/// Why `async-nats` (0.46) would fail to read this header block, if it would: it then drops
/// the whole connection instead of the message, so such a message must never be delivered to
/// it again.
pub(crate) fn client_cannot_read(block: &[u8]) -> Option<String> {
    if block.is_empty() {
        // A message stored without headers: nothing for the client to read.
        return None;
    }
    let Ok(text) = std::str::from_utf8(block) else {
        return Some("the header block is not UTF-8".to_owned());
    };
    let mut lines = text.lines().peekable();
    let Some(version) = lines.next() else {
        return Some("the header block has no version line".to_owned());
    };
    let Some(rest) = version.strip_prefix("NATS/1.0").map(str::trim) else {
        return Some(format!(
            "the header block starts with `{}`, not `NATS/1.0`",
            headers::shorten(version, 64)
        ));
    };
    let status = rest.split_once(' ').map_or(rest, |(s, _)| s.trim());
    if !status.is_empty() && StatusCode::from_str(status).is_err() {
        return Some(format!(
            "the header block has the status `{}`, not a number from 100 to 999",
            headers::shorten(status, 64)
        ));
    }
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some((name, _)) = line.split_once(':') else {
            return Some(format!(
                "the header line `{}` has no colon",
                headers::shorten(line, 64)
            ));
        };
        if HeaderName::from_str(name).is_err() {
            return Some(format!(
                "the header name `{}` is not a NATS header name",
                headers::shorten(name, 64)
            ));
        }
        while lines
            .next_if(|l| l.starts_with(char::is_whitespace))
            .is_some()
        {}
    }
    None
}

/// The CloudEvents attribute (or content type) a header name stands for, in any case.
fn attribute(name: &str) -> Option<&'static str> {
    [
        CE_ID,
        CE_TYPE,
        CE_TIME,
        CE_CORRELATIONID,
        CE_CAUSATIONID,
        CE_PARTITIONKEY,
        CONTENT_TYPE,
        CE_DATACONTENTTYPE,
        CE_SPECVERSION,
        CE_SOURCE,
    ]
    .into_iter()
    .find(|attribute| attribute.eq_ignore_ascii_case(name))
}

fn build(
    fields: &[(&str, &str)],
    mut user: Headers,
    payload: Bytes,
    defaults: Defaults<'_>,
    mut problem: Option<String>,
) -> Received {
    let mut id = None;
    let mut msg_id = None;
    let mut kind = None;
    let mut raw_time = None;
    let mut correlation = None;
    let mut causation = None;
    let mut key = None;
    let mut content_type = None;
    let mut ce_content_type = None;
    let mut specversion = None;
    for &(name, value) in fields {
        if let Some(escaped) = name.strip_prefix(ESCAPED) {
            // Always a user header, whatever its decoded name looks like.
            user.insert(pct_decode(escaped), pct_decode(value));
            continue;
        }
        match attribute(name) {
            Some(CE_ID) => id = Some(value),
            Some(CE_TYPE) => kind = Some(value),
            Some(CE_TIME) => raw_time = Some(value),
            Some(CE_CORRELATIONID) => correlation = Some(value),
            Some(CE_CAUSATIONID) => causation = Some(value),
            Some(CE_PARTITIONKEY) => key = Some(value),
            Some(CONTENT_TYPE) => content_type = Some(value),
            Some(CE_DATACONTENTTYPE) => ce_content_type = Some(value),
            Some(CE_SPECVERSION) => specversion = Some(value),
            Some(_) => {}
            None => {
                if name.eq_ignore_ascii_case(NATS_MSG_ID) {
                    msg_id = Some(value);
                }
                user.insert(name.to_owned(), value.to_owned());
            }
        }
    }
    if let Some(Err(reason)) = specversion.map(headers::check_specversion) {
        problem.get_or_insert(reason);
    }
    let id: MessageId = match (
        id.filter(|s| !s.is_empty())
            .or(msg_id.filter(|s| !s.is_empty())),
        defaults.stored,
    ) {
        (Some(id), _) => MessageId::from(id),
        (None, Some(stored)) => stored.id(),
        (None, None) => content_id(defaults.kind, fields, &user, &payload),
    };
    let correlation_id = correlation
        .filter(|s| !s.is_empty())
        .map_or_else(|| id.clone(), MessageId::from);
    let time = match raw_time {
        None => None,
        Some(raw) => match headers::parse_time(raw) {
            Ok(time) => Some(time),
            Err(_) => {
                user.insert(headers::RAW_TIME.to_owned(), raw.to_owned());
                None
            }
        },
    };
    Received {
        envelope: Envelope {
            id,
            kind: kind.unwrap_or(defaults.kind).to_owned(),
            correlation_id,
            causation_id: causation.filter(|s| !s.is_empty()).map(MessageId::from),
            timestamp: time.or(defaults.time).unwrap_or_else(SystemTime::now),
            key: key.map(str::to_owned),
            content_type: content_type.or(ce_content_type).map(str::to_owned),
            headers: user,
            payload,
        },
        undecodable: problem,
    }
}

/// An id for a message that names none and has no broker identity (core NATS): derived from
/// where it came from and everything it carries, so that the same message gets the same id.
fn content_id(kind: &str, fields: &[(&str, &str)], user: &Headers, payload: &[u8]) -> MessageId {
    let mut parts: Vec<&[u8]> = vec![b"nats", kind.as_bytes()];
    let user = user.iter().map(|(n, v)| (n.as_str(), v.as_str()));
    for (name, value) in fields.iter().copied().chain(user) {
        parts.push(name.as_bytes());
        parts.push(value.as_bytes());
    }
    parts.push(payload);
    MessageId::derived(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(envelope: &Envelope) -> Envelope {
        let map = encode(envelope, "test").expect("encodable");
        decode(
            Some(&map),
            None,
            envelope.payload.clone(),
            Defaults {
                stored: None,
                kind: "fallback",
                time: None,
            },
        )
        .envelope
    }

    #[test]
    fn every_field_round_trips() {
        let parent = Envelope::new("order.placed", "{}");
        let envelope = parent
            .child("payment.requested", "body")
            .with_key("order-42")
            .with_content_type("application/json")
            .with_header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .with_header("tenant", "acme");
        let got = round_trip(&envelope);
        assert_eq!(got.id, envelope.id);
        assert_eq!(got.kind, envelope.kind);
        assert_eq!(got.correlation_id, envelope.correlation_id);
        assert_eq!(got.causation_id, envelope.causation_id);
        assert_eq!(got.key, envelope.key);
        assert_eq!(got.content_type, envelope.content_type);
        assert_eq!(got.headers, envelope.headers);
    }

    #[test]
    fn awkward_headers_are_escaped_and_restored() {
        let envelope = Envelope::new("k", "")
            .with_header("ce-id", "not the id")
            .with_header("Content-Type", "not the content type")
            .with_header("spaced", "  padded  ")
            .with_header("multi", "line\r\nbreak")
            .with_header("ünïcödé name", "ünïcödé ✓ 漢字")
            .with_header("colon:name", "a:b%c")
            .with_header("bus-esc-x", "y");
        let map = encode(&envelope, "test").expect("encodable");
        assert_eq!(map.get(CE_ID).unwrap().as_str(), envelope.id.as_str());
        let got = round_trip(&envelope);
        assert_eq!(got.id, envelope.id);
        assert_eq!(got.headers, envelope.headers);
        assert!(got.content_type.is_none());
    }

    #[test]
    fn a_bare_message_gets_defaults() {
        let got = decode(
            None,
            None,
            Bytes::from_static(b"raw"),
            Defaults {
                stored: Some(Stored {
                    stream: "stream",
                    sequence: "7",
                }),
                kind: "orders",
                time: None,
            },
        )
        .envelope;
        assert_eq!(got.id.as_str(), "stream:7");
        assert_eq!(got.correlation_id.as_str(), "stream:7");
        assert_eq!(got.kind, "orders");
        assert!(got.causation_id.is_none());

        let mut map = HeaderMap::new();
        map.insert("ce-time", "yesterday");
        map.insert("Content-Type", "text/plain");
        map.insert("x-mine", "kept");
        let got = decode(
            Some(&map),
            None,
            Bytes::new(),
            Defaults {
                stored: None,
                kind: "t",
                time: None,
            },
        )
        .envelope;
        assert_eq!(got.content_type.as_deref(), Some("text/plain"));
        assert_eq!(got.header("x-mine"), Some("kept"));
    }

    /// `id` is `<stream>:<sequence>`.
    fn defaults(id: Option<&str>) -> Defaults<'_> {
        Defaults {
            stored: id.map(|id| {
                let (stream, sequence) = id.split_once(':').expect("stream:sequence");
                Stored { stream, sequence }
            }),
            kind: "orders",
            time: None,
        }
    }

    #[test]
    fn the_last_value_of_a_repeated_header_wins() {
        let mut map = HeaderMap::new();
        map.append("x-twice", "zzz first");
        map.append("x-twice", "aaa last");
        let got = decode(Some(&map), None, Bytes::new(), defaults(Some("s:1")));
        assert_eq!(got.envelope.header("x-twice"), Some("aaa last"));
    }

    #[test]
    fn foreign_oddities_are_read_leniently() {
        let mut map = HeaderMap::new();
        map.insert("ce-time", "not a time");
        map.insert("ce-id", "");
        map.insert("Nats-Msg-Id", "producer-7");
        let got = decode(Some(&map), None, Bytes::new(), defaults(Some("s:1")));
        assert!(got.undecodable.is_none());
        assert_eq!(
            got.envelope.id.as_str(),
            "producer-7",
            "Nats-Msg-Id is the id"
        );
        assert_eq!(got.envelope.header(headers::RAW_TIME), Some("not a time"));
        assert_eq!(got.envelope.header("Nats-Msg-Id"), Some("producer-7"));

        // No broker identity: the same content gets the same id.
        let mut map = HeaderMap::new();
        map.insert("b", "2");
        map.insert("a", "1");
        let one = decode(Some(&map), None, Bytes::from_static(b"x"), defaults(None));
        let two = decode(Some(&map), None, Bytes::from_static(b"x"), defaults(None));
        let other = decode(Some(&map), None, Bytes::from_static(b"y"), defaults(None));
        assert_eq!(one.envelope.id, two.envelope.id);
        assert_ne!(one.envelope.id, other.envelope.id);
    }

    #[test]
    fn unknown_specversion_and_status_lines_are_undecodable() {
        let mut map = HeaderMap::new();
        map.insert("ce-specversion", "9.9");
        map.insert("ce-id", "bad-1");
        let got = decode(Some(&map), None, Bytes::new(), defaults(None));
        assert!(got.undecodable.as_deref().unwrap().contains("9.9"));
        assert_eq!(got.envelope.id.as_str(), "bad-1");

        let got = decode(
            None,
            Some((StatusCode::TIMEOUT, Some("Request Timeout"))),
            Bytes::new(),
            defaults(Some("s:2")),
        );
        assert!(got.undecodable.as_deref().unwrap().contains("408"));
    }

    #[test]
    fn what_the_client_cannot_read_is_found_and_read_leniently() {
        for (block, readable) in [
            (&b"NATS/1.0\r\nx: y\r\n\r\n"[..], true),
            (b"NATS/1.0 408 Request Timeout\r\n\r\n", true),
            (b"NATS/1.0\r\nx: \xff\r\n\r\n", false),
            (b"NATS/1.0\r\nno colon\r\n\r\n", false),
            (b"NATS/1.0\r\nbad name: v\r\n\r\n", false),
            (b"NATS/1.0 abc\r\n\r\n", false),
            (b"GARBAGE\r\n\r\n", false),
            // A message stored without headers: `STREAM.MSG.GET` has no block for it.
            (b"", true),
        ] {
            assert_eq!(
                client_cannot_read(block).is_none(),
                readable,
                "{:?}",
                String::from_utf8_lossy(block)
            );
        }
        let got = decode_raw(
            b"NATS/1.0\r\nce-id: raw-1\r\nbin: \xff\r\nno colon\r\n\r\n",
            Bytes::from_static(b"body"),
            defaults(Some("s:3")),
            "why".into(),
        );
        assert_eq!(got.undecodable.as_deref(), Some("why"));
        assert_eq!(got.envelope.id.as_str(), "raw-1");
        assert_eq!(got.envelope.header("bin"), Some("/w=="));
        assert_eq!(got.envelope.header(headers::BINARY_HEADERS), Some("bin"));
        assert_eq!(got.envelope.header("no colon"), Some(""));
    }

    #[test]
    fn encode_refuses_what_nats_would_change_and_lossy_keeps_it() {
        for envelope in [
            Envelope::new("line\nbreak", ""),
            Envelope::new(" padded", ""),
            Envelope::new("k", "").with_id(""),
            Envelope::new("k", "").with_key("key\r"),
        ] {
            let error = encode(&envelope, "test").expect_err("refused");
            assert_eq!(error.kind(), ErrorKind::Serialization);
            let map = encode_lossy(&envelope, "test");
            let got = decode(Some(&map), None, Bytes::new(), defaults(None)).envelope;
            let originals: Vec<_> = got
                .headers
                .keys()
                .filter(|n| n.starts_with(ORIGINAL_PREFIX))
                .collect();
            assert_eq!(originals.len(), 1, "{envelope:?} -> {got:?}");
        }
        // A `Nats-` user header is not handed to JetStream.
        let envelope = Envelope::new("k", "").with_header("Nats-Rollup", "all");
        let map = encode(&envelope, "test").unwrap();
        assert!(map.get("Nats-Rollup").is_none());
        assert_eq!(round_trip(&envelope).headers, envelope.headers);
    }

    #[test]
    fn property_decode_never_panics() {
        use bus_core::conformance::arbitrary;
        use proptest::prelude::*;
        let value = prop_oneof![
            arbitrary::text(),
            Just("9.9".to_owned()),
            Just("9999-12-31T23:59:59.999Z".to_owned()),
            Just("+10000-01-01T00:00:00Z".to_owned()),
            Just("1969-12-31T23:59:59Z".to_owned()),
        ];
        let name = prop_oneof![
            Just(CE_ID.to_owned()),
            Just(CE_TIME.to_owned()),
            Just(CE_SPECVERSION.to_owned()),
            Just(CE_CORRELATIONID.to_owned()),
            Just("bus-esc-%ZZ%".to_owned()),
            Just(NATS_MSG_ID.to_owned()),
            "[!-9;-~]{1,12}",
        ];
        let fields = proptest::collection::vec((name, value), 0..24);
        arbitrary::check(
            "nats decode never panics",
            256,
            (fields, arbitrary::raw_headers(), arbitrary::payload()),
            |(fields, raw, payload)| {
                let mut map = HeaderMap::new();
                for (name, value) in &fields {
                    if let (Ok(name), Ok(value)) = (
                        HeaderName::from_str(name),
                        async_nats::HeaderValue::from_str(value),
                    ) {
                        map.append(name, value);
                    }
                }
                let got = decode(Some(&map), None, payload.clone(), defaults(None));
                prop_assert!(!got.envelope.id.as_str().is_empty());
                let mut block = b"NATS/1.0\r\n".to_vec();
                for (name, value) in &raw {
                    block.extend_from_slice(name);
                    block.extend_from_slice(b": ");
                    block.extend_from_slice(value);
                    block.extend_from_slice(b"\r\n");
                }
                let _ = client_cannot_read(&block);
                let got = decode_raw(&block, payload, defaults(Some("s:1")), "r".into());
                prop_assert_eq!(got.envelope.id.as_str().is_empty(), false);
                Ok(())
            },
        );
    }

    #[test]
    fn property_envelope_round_trip() {
        use bus_core::conformance::arbitrary;
        arbitrary::check(
            "nats envelope round trip",
            256,
            arbitrary::envelope(),
            |envelope| {
                match encode(&envelope, "test") {
                    Ok(map) => {
                        // What the server relays is what the client parses: go through bytes.
                        let got = decode(
                            Some(&parse_like_the_client(&map)),
                            None,
                            envelope.payload.clone(),
                            defaults(Some("s:1")),
                        );
                        proptest::prop_assert!(got.undecodable.is_none());
                        proptest::prop_assert_eq!(&got.envelope, &envelope);
                    }
                    Err(error) => {
                        proptest::prop_assert_eq!(error.kind(), ErrorKind::Serialization);
                    }
                }
                // A dead letter is never refused, and keeps every header.
                let map = encode_lossy(&envelope, "test");
                let got = decode(
                    Some(&parse_like_the_client(&map)),
                    None,
                    envelope.payload.clone(),
                    defaults(Some("s:1")),
                );
                for (name, value) in &envelope.headers {
                    proptest::prop_assert_eq!(got.envelope.headers.get(name), Some(value));
                }
                Ok(())
            },
        );
    }

    /// The headers as `async-nats` reads them back from the wire (0.46: lines, a colon, values
    /// trimmed): asserts that the block is one it can read.
    fn parse_like_the_client(map: &HeaderMap) -> HeaderMap {
        let mut block = Vec::from(&b"NATS/1.0\r\n"[..]);
        for (name, values) in map.iter() {
            for value in values {
                block.extend_from_slice(name.as_ref());
                block.extend_from_slice(b": ");
                block.extend_from_slice(value.as_str().as_bytes());
                block.extend_from_slice(b"\r\n");
            }
        }
        block.extend_from_slice(b"\r\n");
        assert_eq!(client_cannot_read(&block), None);
        let text = std::str::from_utf8(&block).unwrap();
        let mut out = HeaderMap::new();
        for line in text.lines().skip(1).filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':').unwrap();
            out.append(HeaderName::from_str(name).unwrap(), value.trim());
        }
        out
    }
}
