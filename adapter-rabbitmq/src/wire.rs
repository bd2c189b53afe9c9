//! The envelope on the wire: AMQP 0-9-1 properties plus the CloudEvents AMQP binding's
//! application properties (binary content mode), and the names of what the adapter declares.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bus_core::{headers, Envelope, Headers, MessageId};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

/// The CloudEvents attribute prefix of the AMQP binding (`cloudEvents:`); `cloudEvents_` (the
/// JMS-friendly form) is read too.
pub(crate) const CE_PREFIX: &str = "cloudEvents:";
const CE_PREFIX_ALT: &str = "cloudEvents_";

/// CloudEvents attribute names `bus` maps onto envelope fields.
pub(crate) mod ce {
    pub(crate) const ID: &str = "id";
    pub(crate) const TYPE: &str = "type";
    pub(crate) const SOURCE: &str = "source";
    pub(crate) const SPECVERSION: &str = "specversion";
    pub(crate) const TIME: &str = "time";
    pub(crate) const CORRELATION: &str = "correlationid";
    pub(crate) const CAUSATION: &str = "causationid";
    pub(crate) const PARTITIONKEY: &str = "partitionkey";
    pub(crate) const DATACONTENTTYPE: &str = "datacontenttype";
}

/// AMQP short strings hold at most 255 bytes.
fn short(value: &str) -> Option<ShortString> {
    (value.len() <= 255).then(|| ShortString::from(value))
}

fn long(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// The AMQP properties of `envelope`, published to `source` (a topic or queue name), on its
/// `attempt`-th delivery (the attempt header is written from 2 on).
pub(crate) fn properties(envelope: &Envelope, source: &str, attempt: u32) -> BasicProperties {
    let mut table = FieldTable::default();
    let mut ce = |name: &str, value: &str| {
        table.insert(ShortString::from(format!("{CE_PREFIX}{name}")), long(value));
    };
    ce(ce::SPECVERSION, "1.0");
    ce(ce::ID, envelope.id.as_str());
    ce(ce::TYPE, &envelope.kind);
    ce(ce::SOURCE, &format!("/bus/{source}"));
    ce(ce::TIME, &headers::format_time(envelope.timestamp));
    ce(ce::CORRELATION, envelope.correlation_id.as_str());
    if let Some(causation) = &envelope.causation_id {
        ce(ce::CAUSATION, causation.as_str());
    }
    if let Some(key) = &envelope.key {
        ce(ce::PARTITIONKEY, key);
    }
    for (name, value) in &envelope.headers {
        if let Some(name) = short(name) {
            table.insert(name, long(value));
        }
    }
    if attempt > 1 {
        table.insert(
            ShortString::from(headers::ATTEMPT),
            AMQPValue::LongLongInt(i64::from(attempt)),
        );
    }
    let seconds = envelope
        .timestamp
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(seconds)
        .with_headers(table);
    if let Some(id) = short(envelope.id.as_str()) {
        props = props.with_message_id(id);
    }
    if let Some(correlation) = short(envelope.correlation_id.as_str()) {
        props = props.with_correlation_id(correlation);
    }
    if let Some(kind) = short(&envelope.kind) {
        props = props.with_type(kind);
    }
    if let Some(content_type) = envelope.content_type.as_deref().and_then(short) {
        props = props.with_content_type(content_type);
    }
    props
}

/// An upper bound of the size of the AMQP content-header frame carrying `props`, which must
/// fit in one frame (`frame_max`): the headers cannot be split like a body.
pub(crate) fn header_frame_size(props: &BasicProperties) -> usize {
    fn value_size(value: &AMQPValue) -> usize {
        match value {
            AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
            AMQPValue::ShortString(s) => 1 + s.as_str().len(),
            AMQPValue::FieldTable(t) => 4 + table_size(t),
            AMQPValue::FieldArray(a) => {
                4 + a
                    .as_slice()
                    .iter()
                    .map(|v| 1 + value_size(v))
                    .sum::<usize>()
            }
            AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
            _ => 9,
        }
    }
    fn table_size(table: &FieldTable) -> usize {
        table
            .inner()
            .iter()
            .map(|(k, v)| 1 + k.as_str().len() + 1 + value_size(v))
            .sum()
    }
    let short = |s: &Option<ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    // Frame header and end (8), class, weight, body size, flags (14), the fixed-size
    // properties (timestamp, delivery mode, priority: 10), and room for the rest.
    8 + 14
        + 10
        + 4
        + props.headers().as_ref().map_or(0, table_size)
        + short(props.message_id())
        + short(props.correlation_id())
        + short(props.kind())
        + short(props.content_type())
        + short(props.content_encoding())
        + short(props.reply_to())
        + short(props.expiration())
        + short(props.user_id())
        + short(props.app_id())
        + short(props.cluster_id())
}

/// A header value as text: strings as they are (lossily for non-UTF-8 bytes), numbers and
/// booleans printed, anything else in its debug form. Never fails.
fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(t) => headers::format_time(UNIX_EPOCH + Duration::from_secs(*t)),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        other => format!("{other:?}"),
    }
}

/// What a received message carries: its envelope and the attempt recorded in its headers.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) envelope: Envelope,
    /// The attempt written by a previous nack or drop (1 when absent).
    pub(crate) attempt: u32,
    /// The reply-to address, for requests.
    pub(crate) reply_to: Option<String>,
}

/// Reads a message published by `bus` or by any other AMQP client. Missing attributes get
/// defaults (a fresh id, an empty kind, the id as correlation id, the receive time).
pub(crate) fn envelope(props: &BasicProperties, payload: Vec<u8>) -> Received {
    let mut ce_attrs: Vec<(String, String)> = Vec::new();
    let mut user = Headers::new();
    let mut attempt = 1u32;
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            let name = name.as_str();
            if name == headers::ATTEMPT {
                attempt = text(value).trim().parse().unwrap_or(1).max(1);
            } else if let Some(attr) = name
                .strip_prefix(CE_PREFIX)
                .or_else(|| name.strip_prefix(CE_PREFIX_ALT))
            {
                ce_attrs.push((attr.to_owned(), text(value)));
            } else {
                user.insert(name.to_owned(), text(value));
            }
        }
    }
    let mut take = |attr: &str| {
        ce_attrs
            .iter()
            .position(|(name, _)| name == attr)
            .map(|i| ce_attrs.swap_remove(i).1)
    };
    let id: MessageId = take(ce::ID)
        .filter(|s| !s.is_empty())
        .or_else(|| props.message_id().as_ref().map(|s| s.as_str().to_owned()))
        .filter(|s| !s.is_empty())
        .map_or_else(MessageId::new, MessageId::from);
    let kind = take(ce::TYPE)
        .or_else(|| props.kind().as_ref().map(|s| s.as_str().to_owned()))
        .unwrap_or_default();
    let correlation_id = take(ce::CORRELATION)
        .or_else(|| {
            props
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
        })
        .filter(|s| !s.is_empty())
        .map_or_else(|| id.clone(), MessageId::from);
    let causation_id = take(ce::CAUSATION)
        .filter(|s| !s.is_empty())
        .map(MessageId::from);
    let timestamp = take(ce::TIME)
        .and_then(|t| headers::parse_time(&t).ok())
        .or_else(|| {
            props
                .timestamp()
                .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        })
        .unwrap_or_else(SystemTime::now);
    let key = take(ce::PARTITIONKEY);
    let content_type = props
        .content_type()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .or_else(|| take(ce::DATACONTENTTYPE));
    // The binding's own attributes are not application headers; other extensions are.
    let _ = (take(ce::SOURCE), take(ce::SPECVERSION));
    for (attr, value) in ce_attrs {
        user.insert(format!("{CE_PREFIX}{attr}"), value);
    }
    let envelope = Envelope {
        id,
        kind,
        correlation_id,
        causation_id,
        timestamp,
        key,
        content_type,
        headers: user,
        payload: payload.into(),
    };
    Received {
        envelope,
        attempt,
        reply_to: props.reply_to().as_ref().map(|s| s.as_str().to_owned()),
    }
}

/// Escapes a topic for use as a routing or binding key of a topic exchange, so that `*` and
/// `#` words are taken literally: `%` → `%25`, `*` → `%2A`, `#` → `%23`. Dots stay dots.
pub(crate) fn routing_key(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len());
    for c in topic.chars() {
        match c {
            '%' => out.push_str("%25"),
            '*' => out.push_str("%2A"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

/// The queue of consumer group `group` on `topic`: `<topic>@<group>`, with `%` and `@` in the
/// topic escaped so that no two (topic, group) pairs share a queue.
pub(crate) fn group_queue(topic: &str, group: &str) -> String {
    let topic = topic.replace('%', "%25").replace('@', "%40");
    format!("{topic}@{group}")
}

/// The queue of responder group `group` serving requests on `topic`.
pub(crate) fn responder_queue(topic: &str, group: &str) -> String {
    format!("bus.rpc.{}", group_queue(topic, group))
}

/// The TTL queue that holds messages nacked from `queue` for `delay` before they go back:
/// `bus.retry.<ms>ms.<queue>` (a prefix, as server-named queues start with the reserved `amq.`).
pub(crate) fn retry_queue(queue: &str, delay: Duration) -> String {
    format!("bus.retry.{}ms.{queue}", delay_millis(delay))
}

/// `delay` in whole milliseconds, rounded up (so the wait is never shorter than asked), at
/// least 1.
pub(crate) fn delay_millis(delay: Duration) -> u64 {
    let ms = delay.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_through_properties() {
        let parent = Envelope::new("order.placed", "{}");
        let sent = Envelope::new("payment.captured", vec![0xff, 0x00, 0x80])
            .caused_by(&parent)
            .with_key("o-1")
            .with_content_type("application/octet-stream")
            .with_header("traceparent", "00-abc-def-01")
            .with_header("tenant", "acme");
        let props = properties(&sent, "payments", 3);
        let got = envelope(&props, sent.payload.to_vec());
        assert_eq!(got.attempt, 3);
        let got = got.envelope;
        assert_eq!(got.id, sent.id);
        assert_eq!(got.kind, sent.kind);
        assert_eq!(got.correlation_id, parent.id);
        assert_eq!(got.causation_id, Some(parent.id.clone()));
        assert_eq!(got.key.as_deref(), Some("o-1"));
        assert_eq!(got.content_type, sent.content_type);
        assert_eq!(got.headers, sent.headers);
        assert_eq!(got.payload, sent.payload);
        let skew = sent.timestamp.duration_since(got.timestamp).unwrap();
        assert!(skew < Duration::from_millis(1));
    }

    #[test]
    fn a_bare_message_gets_defaults() {
        let got = envelope(&BasicProperties::default(), b"raw".to_vec());
        assert_eq!(got.attempt, 1);
        assert_eq!(got.envelope.correlation_id, got.envelope.id);
        assert_eq!(got.envelope.kind, "");
        assert!(got.envelope.headers.is_empty());
    }

    #[test]
    fn wildcards_are_escaped_and_names_do_not_collide() {
        assert_eq!(routing_key("orders.*.#"), "orders.%2A.%23");
        assert_eq!(routing_key("a%2A"), "a%252A");
        assert_ne!(group_queue("a@b", "c"), group_queue("a", "b@c"));
        assert_eq!(group_queue("orders", "billing"), "orders@billing");
        assert_eq!(delay_millis(Duration::from_micros(1500)), 2);
        assert_eq!(delay_millis(Duration::ZERO), 1);
    }
}
