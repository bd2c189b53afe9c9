//! The envelope on the wire: an SQS message body and at most 10 message attributes.
//!
//! Attributes (all of data type `String`), after the CloudEvents HTTP binary-mode names:
//!
//! | attribute | envelope |
//! |---|---|
//! | `ce-specversion` | `1.0` |
//! | `ce-id` | `id` |
//! | `ce-source` | the configured source |
//! | `ce-type` | `kind` |
//! | `ce-time` | `timestamp` (RFC 3339, milliseconds) |
//! | `correlationid` | `correlation_id` |
//! | `traceparent`, `tracestate` | W3C trace context headers, if any |
//! | `causationid` | `causation_id`, if any |
//! | `partitionkey` | `key`, if any |
//! | `content-type` | `content_type`, if any |
//! | any other name | a header |
//! | `bus-packed` | a JSON object of the attributes that did not fit |
//! | `bus-body-encoding` | `base64` (binary payload) or `empty` (empty payload) |
//! | `bus-reply-to` | the reply queue URL of a request |
//!
//! SQS allows 10 attributes: the required ones take their own; the optional ones (trace
//! context, causation id, key, content type, then the other headers by name) take the rest in that order, and when they are more
//! than the slots left, the last slot holds `bus-packed` with the remainder. Headers whose name
//! or value SQS would refuse as an attribute (other characters, an empty value) always go to
//! `bus-packed`. A header whose name is one of the names above, or starts with `ce-` or
//! `bus-header-`, travels as `bus-header-<name>`.
//!
//! The body is the payload when it is non-empty UTF-8 text of characters SQS accepts; else
//! it is base64 (standard alphabet, padded) with `bus-body-encoding: base64`, or a
//! placeholder with `bus-body-encoding: empty` (SQS refuses empty bodies).

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use base64::Engine as _;
use bus_core::{headers, Envelope, Error, ErrorKind, Headers, MessageId, Result};

/// CloudEvents `specversion` (`1.0`).
pub const CE_SPECVERSION: &str = "ce-specversion";
/// CloudEvents `id`: the envelope id.
pub const CE_ID: &str = "ce-id";
/// CloudEvents `source`: the configured source.
pub const CE_SOURCE: &str = "ce-source";
/// CloudEvents `type`: the envelope kind.
pub const CE_TYPE: &str = "ce-type";
/// CloudEvents `time`: the envelope timestamp, RFC 3339.
pub const CE_TIME: &str = "ce-time";
/// The correlation id (CloudEvents extension).
pub const CORRELATION_ID: &str = "correlationid";
/// The causation id (CloudEvents extension).
pub const CAUSATION_ID: &str = "causationid";
/// The ordering key (CloudEvents `partitionkey` extension).
pub const PARTITION_KEY: &str = "partitionkey";
/// The payload's media type.
pub const CONTENT_TYPE: &str = "content-type";
/// A JSON object of the attributes that did not fit in SQS's 10.
pub const PACKED: &str = "bus-packed";
/// `base64` when the body is the base64 of a binary payload, `empty` for an empty one.
pub const BODY_ENCODING: &str = "bus-body-encoding";
/// The reply queue URL of a request.
pub const REPLY_TO: &str = "bus-reply-to";
const HEADER_ESCAPE: &str = "bus-header-";
const EMPTY_BODY: &str = "(empty)";
/// SQS's limit on message attributes per message.
pub(crate) const MAX_ATTRIBUTES: usize = 10;
/// The data type every attribute is sent with.
pub(crate) const STRING: &str = "String";

const RESERVED: &[&str] = &[
    CE_SPECVERSION,
    CE_ID,
    CE_SOURCE,
    CE_TYPE,
    CE_TIME,
    CORRELATION_ID,
    CAUSATION_ID,
    PARTITION_KEY,
    CONTENT_TYPE,
    PACKED,
    BODY_ENCODING,
    REPLY_TO,
];

/// A message ready to send: body and attributes.
#[derive(Debug, Clone)]
pub(crate) struct Wire {
    pub(crate) body: String,
    pub(crate) attributes: Vec<(String, String)>,
}

impl Wire {
    /// What SQS counts against its size limit: body, attribute names, types and values.
    pub(crate) fn size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(n, v)| n.len() + STRING.len() + v.len())
                .sum::<usize>()
    }
}

/// Encodes `envelope`; `extra` are wire-only attributes (the reply queue of a request).
pub(crate) fn encode(
    envelope: &Envelope,
    source: &str,
    extra: &[(&str, &str)],
    max_bytes: usize,
) -> Result<Wire> {
    let mut fixed: Vec<(String, String)> = vec![
        (CE_SPECVERSION.into(), "1.0".into()),
        (CE_ID.into(), envelope.id.to_string()),
        (CE_SOURCE.into(), non_empty(source, "bus")),
        (CE_TYPE.into(), non_empty(&envelope.kind, "-")),
        (CE_TIME.into(), headers::format_time(envelope.timestamp)),
        (CORRELATION_ID.into(), envelope.correlation_id.to_string()),
    ];
    for (name, value) in extra {
        fixed.push(((*name).into(), (*value).into()));
    }
    let body = match std::str::from_utf8(&envelope.payload) {
        _ if envelope.payload.is_empty() => {
            fixed.push((BODY_ENCODING.into(), "empty".into()));
            EMPTY_BODY.to_owned()
        }
        Ok(text) if text.chars().all(allowed_char) => text.to_owned(),
        _ => {
            fixed.push((BODY_ENCODING.into(), "base64".into()));
            base64::engine::general_purpose::STANDARD.encode(&envelope.payload)
        }
    };

    let mut candidates: Vec<(String, String)> = Vec::new();
    let trace = [headers::TRACEPARENT, headers::TRACESTATE];
    for (name, value) in trace
        .iter()
        .filter_map(|name| envelope.headers.get_key_value(*name))
    {
        candidates.push((name.clone(), value.clone()));
    }
    if let Some(causation) = &envelope.causation_id {
        candidates.push((CAUSATION_ID.into(), causation.to_string()));
    }
    if let Some(key) = &envelope.key {
        candidates.push((PARTITION_KEY.into(), key.clone()));
    }
    if let Some(content_type) = &envelope.content_type {
        candidates.push((CONTENT_TYPE.into(), content_type.clone()));
    }
    let others = envelope
        .headers
        .iter()
        .filter(|(name, _)| !trace.contains(&name.as_str()));
    for (name, value) in others {
        let name = if is_reserved_header(name) {
            format!("{HEADER_ESCAPE}{name}")
        } else {
            name.clone()
        };
        candidates.push((name, value.clone()));
    }

    let free = MAX_ATTRIBUTES - fixed.len();
    let (valid, invalid): (Vec<_>, Vec<_>) = candidates
        .into_iter()
        .partition(|(n, v)| valid_name(n) && valid_value(v));
    let mut attributes = fixed;
    if invalid.is_empty() && valid.len() <= free {
        attributes.extend(valid);
    } else {
        let mut valid = valid.into_iter();
        attributes.extend(valid.by_ref().take(free - 1));
        let packed: BTreeMap<String, String> = valid.chain(invalid).collect();
        attributes.push((PACKED.into(), serde_json::to_string(&packed)?));
    }
    let wire = Wire { body, attributes };
    let size = wire.size();
    if size > max_bytes {
        return Err(Error::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "message {} is {size} bytes on the wire (body and attributes), over the limit \
                 of {max_bytes}",
                envelope.id
            ),
        ));
    }
    Ok(wire)
}

/// A message received: the envelope, and the wire-only attributes (`bus-reply-to`).
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) envelope: Envelope,
    pub(crate) reply_to: Option<String>,
}

/// Decodes a received message. `attributes` are its string-valued message attributes;
/// `fallback_id` (the SQS message id) names a message sent without `ce-id`.
pub(crate) fn decode(
    body: &str,
    mut attributes: HashMap<String, String>,
    fallback_id: &str,
) -> Result<Decoded> {
    if let Some(packed) = attributes.remove(PACKED) {
        let packed: HashMap<String, String> = serde_json::from_str(&packed)?;
        attributes.extend(packed);
    }
    let payload = match attributes.remove(BODY_ENCODING).as_deref() {
        Some("empty") => bytes::Bytes::new(),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(body.trim())
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Serialization,
                    "the message body is marked base64 but does not decode",
                    e,
                )
            })?
            .into(),
        _ => bytes::Bytes::copy_from_slice(body.as_bytes()),
    };
    let id: MessageId = attributes
        .remove(CE_ID)
        .unwrap_or_else(|| fallback_id.to_owned())
        .into();
    let correlation_id = attributes
        .remove(CORRELATION_ID)
        .map_or_else(|| id.clone(), MessageId::from);
    let timestamp = attributes
        .remove(CE_TIME)
        .and_then(|t| headers::parse_time(&t).ok())
        .unwrap_or_else(SystemTime::now);
    let mut envelope = Envelope::new(attributes.remove(CE_TYPE).unwrap_or_default(), payload)
        .with_id(id)
        .with_correlation_id(correlation_id)
        .with_timestamp(timestamp);
    envelope.causation_id = attributes.remove(CAUSATION_ID).map(MessageId::from);
    envelope.key = attributes.remove(PARTITION_KEY);
    envelope.content_type = attributes.remove(CONTENT_TYPE);
    let reply_to = attributes.remove(REPLY_TO);
    attributes.remove(CE_SPECVERSION);
    attributes.remove(CE_SOURCE);
    let mut headers = Headers::new();
    for (name, value) in attributes {
        let name = match name.strip_prefix(HEADER_ESCAPE) {
            Some(original) => original.to_owned(),
            None => name,
        };
        headers.insert(name, value);
    }
    envelope.headers = headers;
    Ok(Decoded { envelope, reply_to })
}

fn non_empty(value: &str, default: &str) -> String {
    if value.is_empty() {
        default.to_owned()
    } else {
        value.to_owned()
    }
}

fn is_reserved_header(name: &str) -> bool {
    RESERVED.contains(&name) || name.starts_with("ce-") || name.starts_with(HEADER_ESCAPE)
}

/// Characters SQS accepts in bodies and attribute values (XML 1.0 characters).
fn allowed_char(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{a}' | '\u{d}' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
}

/// SQS's rules for attribute names.
fn valid_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
}

fn valid_value(value: &str) -> bool {
    !value.is_empty() && value.chars().all(allowed_char)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(wire: &Wire) -> HashMap<String, String> {
        wire.attributes.iter().cloned().collect()
    }

    #[test]
    fn many_headers_round_trip_within_ten_attributes() {
        let mut env = Envelope::new("order.placed", "{}")
            .with_key("k")
            .with_content_type("application/json")
            .with_header("traceparent", "00-abc-def-01")
            .with_header("ce-id", "not the id")
            .with_header("bus-header-x", "tricky")
            .with_header("with space", "v")
            .with_header("empty", "");
        env.causation_id = Some("c-1".into());
        for i in 0..30 {
            env.headers.insert(format!("h{i}"), format!("v{i}"));
        }
        let wire = encode(&env, "svc", &[], 262_144).unwrap();
        assert!(wire.attributes.len() <= MAX_ATTRIBUTES);
        let back = decode(&wire.body, attrs(&wire), "x").unwrap().envelope;
        assert_eq!(back, env.with_timestamp(back.timestamp));
    }

    #[test]
    fn binary_and_empty_payloads_round_trip() {
        for payload in [vec![0u8, 159, 146, 150, 255], vec![], b"\x01ctl".to_vec()] {
            let env = Envelope::new("bin", payload.clone());
            let wire = encode(&env, "svc", &[], 262_144).unwrap();
            assert!(!wire.body.is_empty());
            let back = decode(&wire.body, attrs(&wire), "x").unwrap().envelope;
            assert_eq!(back.payload.as_ref(), payload.as_slice());
        }
    }

    #[test]
    fn oversize_counts_attributes() {
        let env = Envelope::new("big", vec![b'x'; 262_144]);
        let err = encode(&env, "svc", &[], 262_144).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    }

    #[test]
    fn bare_messages_get_defaults() {
        let d = decode("hello", HashMap::new(), "sqs-id").unwrap();
        assert_eq!(d.envelope.id.as_str(), "sqs-id");
        assert_eq!(d.envelope.correlation_id.as_str(), "sqs-id");
        assert_eq!(d.envelope.payload.as_ref(), b"hello");
    }
}
