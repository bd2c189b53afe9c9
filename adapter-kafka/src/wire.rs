//! The envelope on the wire: CloudEvents Kafka protocol binding, binary content mode.
//!
//! Attributes travel as headers named `ce_<attribute>` (`ce_id`, `ce_type`, `ce_source`,
//! `ce_specversion`, `ce_time`, and the extensions `ce_correlationid`, `ce_causationid`), the
//! content type as `content-type`, the payload as the record value, and the envelope's key as
//! the record key (which the binding also names `partitionkey`). Application headers travel
//! under their own names; one that would be mistaken for an attribute (`ce_…`,
//! `content-type`) is sent as `bus-esc-<name>` and restored on receipt.

use std::time::SystemTime;

use bus_core::{headers, Envelope, Headers, MessageId};
use bytes::Bytes;
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::Message;

pub(crate) const CE_ID: &str = "ce_id";
pub(crate) const CE_TYPE: &str = "ce_type";
pub(crate) const CE_SOURCE: &str = "ce_source";
pub(crate) const CE_SPECVERSION: &str = "ce_specversion";
pub(crate) const CE_TIME: &str = "ce_time";
pub(crate) const CE_CORRELATIONID: &str = "ce_correlationid";
pub(crate) const CE_CAUSATIONID: &str = "ce_causationid";
pub(crate) const CONTENT_TYPE: &str = "content-type";
const ESCAPED: &str = "bus-esc-";

/// Internal headers of the retry scheme, removed before a delivery is handed out.
pub(crate) const NOT_BEFORE: &str = "bus-not-before";
/// The group a retry copy is meant for.
pub(crate) const RETRY_GROUP: &str = "bus-retry-group";
/// The topic or queue a retry copy came from.
pub(crate) const RETRY_ORIGIN: &str = "bus-retry-origin";
/// The reply topic of a request.
pub(crate) const REPLY_TO: &str = "bus-reply-to";

/// The record headers of `envelope`, plus `extra` internal headers.
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
    for (name, value) in &envelope.headers {
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

fn is_reserved(name: &str) -> bool {
    name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ce_"))
        || name.eq_ignore_ascii_case(CONTENT_TYPE)
        || name.starts_with(ESCAPED)
}

/// Internal headers read off a record, next to its envelope.
#[derive(Debug, Default)]
pub(crate) struct Internal {
    pub(crate) attempt: Option<u32>,
    pub(crate) not_before: Option<SystemTime>,
    pub(crate) retry_group: Option<String>,
    pub(crate) retry_origin: Option<String>,
    pub(crate) reply_to: Option<String>,
}

/// The envelope of a received record. A record from another producer without CloudEvents
/// headers still makes an envelope: its id is `<topic>-<partition>-<offset>` (stable across
/// redeliveries, so idempotency works), its kind empty, its time the record's timestamp.
pub(crate) fn decode<M: Message>(message: &M) -> (Envelope, Internal) {
    let mut internal = Internal::default();
    let mut id = None;
    let mut kind = None;
    let mut time = None;
    let mut correlation = None;
    let mut causation = None;
    let mut content_type = None;
    let mut user = Headers::new();
    if let Some(hs) = message.headers() {
        for h in hs.iter() {
            let value = h
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            match h.key {
                CE_ID => id = Some(value),
                CE_TYPE => kind = Some(value),
                CE_TIME => time = headers::parse_time(&value).ok(),
                CE_CORRELATIONID => correlation = Some(value),
                CE_CAUSATIONID => causation = Some(value),
                CONTENT_TYPE => content_type = Some(value),
                CE_SPECVERSION | CE_SOURCE => {}
                headers::ATTEMPT => internal.attempt = value.parse().ok(),
                NOT_BEFORE => internal.not_before = headers::parse_time(&value).ok(),
                RETRY_GROUP => internal.retry_group = Some(value),
                RETRY_ORIGIN => internal.retry_origin = Some(value),
                REPLY_TO => internal.reply_to = Some(value),
                name => {
                    let name = name.strip_prefix(ESCAPED).unwrap_or(name);
                    user.insert(name.to_owned(), value);
                }
            }
        }
    }
    let id: MessageId = match id {
        Some(id) if !id.is_empty() => id.into(),
        _ => format!(
            "{}-{}-{}",
            message.topic(),
            message.partition(),
            message.offset()
        )
        .into(),
    };
    let timestamp = time.unwrap_or_else(|| {
        message
            .timestamp()
            .to_millis()
            .and_then(|ms| u64::try_from(ms).ok())
            .map_or_else(SystemTime::now, |ms| {
                SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)
            })
    });
    let key = message
        .key()
        .map(|k| String::from_utf8_lossy(k).into_owned());
    let payload = message
        .payload()
        .map(Bytes::copy_from_slice)
        .unwrap_or_default();
    let mut envelope = Envelope::new(kind.unwrap_or_default(), payload).with_id(id.clone());
    envelope.correlation_id = correlation.map_or(id, MessageId::from);
    envelope.causation_id = causation.map(MessageId::from);
    envelope.timestamp = timestamp;
    envelope.key = key;
    envelope.content_type = content_type;
    envelope.headers = user;
    (envelope, internal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::OwnedMessage;
    use rdkafka::Timestamp;

    #[test]
    fn round_trip_keeps_every_field_and_escapes_reserved_names() {
        let parent = Envelope::new("order.placed", "{}");
        let envelope = Envelope::new("payment.captured", &b"\x00\xffbin"[..])
            .caused_by(&parent)
            .with_key("order-7")
            .with_content_type("application/json")
            .with_header("traceparent", "00-abc-def-01")
            .with_header("ce_type", "user's own")
            .with_header("tenant", "acme")
            // ce_time carries milliseconds.
            .with_timestamp(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_000_000_123),
            );
        let hs = encode(&envelope, "bus://test", &[(headers::ATTEMPT, "3")]);
        let message = OwnedMessage::new(
            Some(envelope.payload.to_vec()),
            Some(b"order-7".to_vec()),
            "t".into(),
            Timestamp::now(),
            0,
            42,
            Some(hs),
        );
        let (got, internal) = decode(&message);
        assert_eq!(got, envelope);
        assert_eq!(internal.attempt, Some(3));
    }

    #[test]
    fn bare_record_gets_a_stable_id() {
        let message = OwnedMessage::new(
            Some(b"x".to_vec()),
            None,
            "orders".into(),
            Timestamp::CreateTime(1_764_000_000_000),
            2,
            17,
            None,
        );
        let (got, _) = decode(&message);
        assert_eq!(got.id.as_str(), "orders-2-17");
        assert_eq!(got.correlation_id, got.id);
        assert!(got.key.is_none());
    }
}
