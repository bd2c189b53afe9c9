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
//! A user header whose name would be read back as something else (it starts with `ce-`, is
//! `content-type` in any case, or starts with `bus-esc-`), whose name NATS cannot carry (bytes
//! outside `!`..`~`, or `:`), or whose value NATS would alter (CR or LF, leading or trailing
//! whitespace) travels as `bus-esc-<name>` with name and value percent-encoded, and is decoded
//! on receipt. Every other header is written exactly as named.

use std::time::SystemTime;

use async_nats::HeaderMap;
use bus_core::{headers, Envelope, Headers, MessageId};
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
const ESCAPED: &str = "bus-esc-";

/// The NATS headers carrying `envelope`.
pub(crate) fn encode(envelope: &Envelope, source: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    attribute(&mut map, CE_SPECVERSION, "1.0");
    attribute(&mut map, CE_ID, envelope.id.as_str());
    attribute(&mut map, CE_TYPE, &envelope.kind);
    attribute(&mut map, CE_SOURCE, source);
    attribute(&mut map, CE_TIME, &headers::format_time(envelope.timestamp));
    attribute(&mut map, CE_CORRELATIONID, envelope.correlation_id.as_str());
    if let Some(causation) = &envelope.causation_id {
        attribute(&mut map, CE_CAUSATIONID, causation.as_str());
    }
    if let Some(key) = &envelope.key {
        attribute(&mut map, CE_PARTITIONKEY, key);
    }
    if let Some(content_type) = &envelope.content_type {
        attribute(&mut map, CONTENT_TYPE, content_type);
    }
    for (name, value) in &envelope.headers {
        user_header(&mut map, name, value);
    }
    map
}

/// Writes a CloudEvents attribute. NATS header values cannot hold CR or LF and lose leading
/// and trailing whitespace: such values (never made by `bus` itself) are written with line
/// breaks as spaces, trimmed.
fn attribute(map: &mut HeaderMap, name: &'static str, value: &str) {
    if needs_escape_value(value) {
        map.insert(name, value.replace(['\r', '\n'], " ").trim());
    } else {
        map.insert(name, value);
    }
}

/// Writes a user header, escaped when it would not come back intact (module docs).
fn user_header(map: &mut HeaderMap, name: &str, value: &str) {
    let reserved = name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ce-"))
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

fn needs_escape_value(value: &str) -> bool {
    value.contains(['\r', '\n'])
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
pub(crate) struct Defaults {
    /// The id: e.g. the stream and sequence, stable across redeliveries.
    pub(crate) id: Option<String>,
    /// The kind: the topic or queue it was received from.
    pub(crate) kind: String,
    /// When the server stored it, if known.
    pub(crate) time: Option<SystemTime>,
}

/// The envelope of a received message; missing or malformed attributes get defaults.
pub(crate) fn decode(map: Option<&HeaderMap>, payload: Bytes, defaults: Defaults) -> Envelope {
    let mut id = None;
    let mut kind = None;
    let mut time = None;
    let mut correlation = None;
    let mut causation = None;
    let mut key = None;
    let mut content_type = None;
    let mut ce_content_type = None;
    let mut user = Headers::new();
    if let Some(map) = map {
        for (name, values) in map.iter() {
            let name: &str = name.as_ref();
            let Some(value) = values.last().map(|v| v.as_str().to_owned()) else {
                continue;
            };
            if let Some(escaped) = name.strip_prefix(ESCAPED) {
                // Always a user header, whatever its decoded name looks like.
                user.insert(pct_decode(escaped), pct_decode(&value));
                continue;
            }
            let name = name.to_owned();
            match name.to_ascii_lowercase().as_str() {
                CE_ID => id = Some(value),
                CE_TYPE => kind = Some(value),
                CE_TIME => time = headers::parse_time(&value).ok(),
                CE_CORRELATIONID => correlation = Some(value),
                CE_CAUSATIONID => causation = Some(value),
                CE_PARTITIONKEY => key = Some(value),
                CONTENT_TYPE => content_type = Some(value),
                CE_DATACONTENTTYPE => ce_content_type = Some(value),
                CE_SOURCE | CE_SPECVERSION => {}
                // JetStream's own headers (on republished or direct-get messages).
                lower if lower.starts_with("nats-") => {}
                _ => {
                    user.insert(name, value);
                }
            }
        }
    }
    let id: MessageId = match id.filter(|s| !s.is_empty()).or(defaults.id) {
        Some(id) => MessageId::from(id),
        None => MessageId::new(),
    };
    let correlation_id = correlation
        .filter(|s| !s.is_empty())
        .map_or_else(|| id.clone(), MessageId::from);
    Envelope {
        id,
        kind: kind.unwrap_or(defaults.kind),
        correlation_id,
        causation_id: causation.filter(|s| !s.is_empty()).map(MessageId::from),
        timestamp: time.or(defaults.time).unwrap_or_else(SystemTime::now),
        key,
        content_type: content_type.or(ce_content_type),
        headers: user,
        payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(envelope: &Envelope) -> Envelope {
        let map = encode(envelope, "test");
        decode(
            Some(&map),
            envelope.payload.clone(),
            Defaults {
                id: None,
                kind: "fallback".into(),
                time: None,
            },
        )
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
        let map = encode(&envelope, "test");
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
            Bytes::from_static(b"raw"),
            Defaults {
                id: Some("stream:7".into()),
                kind: "orders".into(),
                time: None,
            },
        );
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
            Bytes::new(),
            Defaults {
                id: None,
                kind: "t".into(),
                time: None,
            },
        );
        assert_eq!(got.content_type.as_deref(), Some("text/plain"));
        assert_eq!(got.header("x-mine"), Some("kept"));
    }
}
