//! The envelope on the wire: AMQP 0-9-1 properties plus the CloudEvents AMQP binding's
//! application properties (binary content mode), and the names of what the adapter declares.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use bus_core::{headers, Envelope, Error, ErrorKind, Headers, MessageId, Result};
use lapin::types::{AMQPValue, DecimalValue, FieldTable, LongString, ShortString};
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
    /// Every attribute the adapter writes or reads itself.
    pub(crate) const MAPPED: [&str; 9] = [
        ID,
        TYPE,
        SOURCE,
        SPECVERSION,
        TIME,
        CORRELATION,
        CAUSATION,
        PARTITIONKEY,
        DATACONTENTTYPE,
    ];

    /// The header names the attributes are written under, `cloudEvents:` and the attribute,
    /// spelled out so that no message builds them.
    pub(crate) mod header {
        pub(crate) const ID: &str = "cloudEvents:id";
        pub(crate) const TYPE: &str = "cloudEvents:type";
        pub(crate) const SOURCE: &str = "cloudEvents:source";
        pub(crate) const SPECVERSION: &str = "cloudEvents:specversion";
        pub(crate) const TIME: &str = "cloudEvents:time";
        pub(crate) const CORRELATION: &str = "cloudEvents:correlationid";
        pub(crate) const CAUSATION: &str = "cloudEvents:causationid";
        pub(crate) const PARTITIONKEY: &str = "cloudEvents:partitionkey";
        pub(crate) const DATACONTENTTYPE: &str = "cloudEvents:datacontenttype";
    }
}

/// RabbitMQ's own count of earlier deliveries of a message on a quorum queue.
pub(crate) const DELIVERY_COUNT: &str = "x-delivery-count";

pub(crate) use crate::ORIGINAL_PREFIX;

/// AMQP short strings (header names, `message_id`, `type`, …) hold at most 255 bytes.
const SHORT_MAX: usize = 255;

fn short(value: &str) -> Option<ShortString> {
    (value.len() <= SHORT_MAX).then(|| ShortString::from(value))
}

fn long(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// A long string of `value`, without copying it.
fn long_owned(value: String) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Header names the adapter writes or reads itself: an application header of that name would
/// not come back as it was sent.
fn reserved(name: &str) -> bool {
    name == headers::ATTEMPT
        || name == DELIVERY_COUNT
        || name.starts_with(CE_PREFIX_ALT)
        || name
            .strip_prefix(CE_PREFIX)
            .is_some_and(|attr| ce::MAPPED.contains(&attr))
}

/// The AMQP properties of `envelope`, sent by `source` (the CloudEvents source: the
/// configured [`RabbitMqConfig::source`](crate::RabbitMqConfig::source)), on its
/// `attempt`-th delivery (the attempt header is written from 2 on).
///
/// # Errors
/// `HeadersTooLarge` for a header name longer than 255 bytes, `Serialization` for a header
/// name the adapter uses itself (`cloudEvents:id`, `cloudEvents_…`, `bus-attempt`,
/// `x-delivery-count`): either would not come back as it was sent.
pub(crate) fn properties(
    envelope: &Envelope,
    source: &str,
    attempt: u32,
) -> Result<BasicProperties> {
    for name in envelope.headers.keys() {
        if name.len() > SHORT_MAX {
            return Err(Error::new(
                ErrorKind::HeadersTooLarge,
                format!(
                    "header name `{}` is {} bytes long; AMQP header names hold at most 255",
                    headers::shorten(name, 64),
                    name.len()
                ),
            ));
        }
        if reserved(name) {
            return Err(Error::new(
                ErrorKind::Serialization,
                format!(
                    "header `{}` is written by the RabbitMQ adapter itself (CloudEvents \
                     attributes, `{}`, `{DELIVERY_COUNT}`); use another name",
                    headers::shorten(name, 64),
                    headers::ATTEMPT
                ),
            ));
        }
    }
    Ok(build(envelope, source, attempt, false))
}

/// Headers a fitted copy keeps, shortened at most: what the dead-letter middleware writes,
/// the trace context, and the notes without which other values would be misread.
fn protected(name: &str) -> bool {
    headers::KEPT_WHEN_CUT.contains(&name) || name.starts_with(ORIGINAL_PREFIX)
}

/// What a fitted copy says it cut, in [`headers::TRUNCATED`]: the items of an earlier copy's
/// note first, then this copy's, each once; names escaped as in [`headers::BINARY_HEADERS`].
#[derive(Debug, Default)]
struct Note {
    items: Vec<String>,
    /// At most this many bytes of items are written; `…` ends a note that was cut.
    max: usize,
}

impl Note {
    /// Room for the note in a frame: it is measured with the rest, but cannot grow past it.
    const MAX: usize = 1024;

    fn push(&mut self, item: String) {
        if !self.items.contains(&item) {
            self.items.push(item);
        }
    }

    fn name(kind: &str, name: &str) -> String {
        format!("{kind}:{}", name.replace('%', "%25").replace(',', "%2C"))
    }

    fn text(&self) -> String {
        let mut text = String::new();
        for item in &self.items {
            if text.len() + item.len() + 1 > self.max {
                text.push_str(if text.is_empty() { "…" } else { ",…" });
                break;
            }
            if !text.is_empty() {
                text.push(',');
            }
            text.push_str(item);
        }
        text
    }
}

/// How hard [`properties_fitted`] cuts, one step after the other until the copy fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cut {
    /// Values of unprotected headers are cut to 256 bytes, the longest first.
    LongValues,
    /// Attributes over 1 KiB: kind, key and content type cut, then ids replaced by ids
    /// derived from them.
    LongAttributes,
    /// Unprotected headers are left out, the largest first.
    Headers,
    /// Protected values and attributes are cut to 256 bytes.
    Protected,
    /// Everything to 64 bytes, the note to 256: fits any frame RabbitMQ negotiates (4 KiB or
    /// more).
    Everything,
}

/// The AMQP properties of a copy of a received `envelope` (its next attempt, or its dead
/// letter), which must be stored whatever the envelope holds, or the message would come back
/// for ever. Header names AMQP cannot carry are left out; if the properties do not fit in a
/// frame of `frame_max` bytes they are cut, step by step ([`Cut`]) and measured again after
/// each, and [`headers::TRUNCATED`] says what was cut. `frame_max` 0 is no limit.
pub(crate) fn properties_fitted(
    envelope: &Envelope,
    source: &str,
    attempt: u32,
    frame_max: usize,
) -> BasicProperties {
    let mut copy = envelope.clone();
    let mut note = Note {
        items: Vec::new(),
        max: Note::MAX,
    };
    if let Some(earlier) = copy.headers.remove(headers::TRUNCATED) {
        for item in earlier.split(',').filter(|i| !i.is_empty() && *i != "…") {
            note.push(headers::shorten(item, 300).into_owned());
        }
    }
    copy.headers.retain(|name, _| {
        let carried = name.len() <= SHORT_MAX && !reserved(name);
        if !carried {
            note.push(Note::name("header", &headers::shorten(name, 64)));
        }
        carried
    });
    let mut steps = [
        Cut::LongValues,
        Cut::LongAttributes,
        Cut::Headers,
        Cut::Protected,
        Cut::Everything,
    ]
    .into_iter();
    let mut step = None;
    loop {
        let mut props = build(&copy, source, attempt, true);
        if !note.items.is_empty() {
            let mut table = props.headers().clone().unwrap_or_default();
            table.insert(ShortString::from(headers::TRUNCATED), long(&note.text()));
            props = props.with_headers(table);
        }
        let size = header_frame_size(&props);
        if frame_max == 0 || size <= frame_max {
            return props;
        }
        let excess = size - frame_max;
        // The same step again while it finds something to cut, then the next.
        let next = match step {
            Some(current) if cut(&mut copy, &mut note, current, excess) => continue,
            _ => steps.next(),
        };
        match next {
            Some(next) => {
                step = Some(next);
                cut(&mut copy, &mut note, next, excess);
            }
            None => {
                tracing::error!(size, frame_max, "a copy could not be cut to fit the frame");
                return props;
            }
        }
    }
}

/// Cuts `copy` by about `excess` bytes at `step`; false when the step found nothing to cut.
fn cut(copy: &mut Envelope, note: &mut Note, step: Cut, mut excess: usize) -> bool {
    /// What header values are cut to first.
    const VALUE: usize = 256;
    /// Attributes longer than this are cut.
    const ATTRIBUTE: usize = 1024;
    match step {
        Cut::LongValues => shorten_values(copy, note, VALUE, Some(excess)),
        // The id last: it is what idempotency and tracing know the message by.
        Cut::LongAttributes => {
            shorten_texts(copy, note, ATTRIBUTE) || shorten_ids(copy, note, ATTRIBUTE)
        }
        Cut::Headers => {
            let mut order: Vec<(usize, String)> = copy
                .headers
                .iter()
                .filter(|(name, _)| !protected(name))
                .map(|(name, value)| (6 + name.len() + value.len(), name.clone()))
                .collect();
            order.sort_by(|a, b| b.cmp(a));
            let mut changed = false;
            for (size, name) in order {
                if excess == 0 {
                    break;
                }
                // A note item can be longer than the header it names: count it against.
                excess = excess.saturating_sub(size.saturating_sub(name.len() + 8));
                copy.headers.remove(&name);
                note.push(Note::name("header", &name));
                changed = true;
            }
            changed
        }
        Cut::Protected => {
            let values = shorten_values(copy, note, VALUE, None);
            let texts = shorten_texts(copy, note, VALUE);
            shorten_ids(copy, note, VALUE) || texts || values
        }
        Cut::Everything => {
            let values = shorten_values(copy, note, 64, None);
            let attributes = shorten_texts(copy, note, 64) | shorten_ids(copy, note, 64);
            let shorter = note.max > 256;
            note.max = note.max.min(256);
            values || attributes || shorter
        }
    }
}

/// Cuts header values of `copy` longer than `keep` bytes, the longest first: unprotected ones
/// until about `excess` bytes are saved, or with no `excess` every one.
fn shorten_values(
    copy: &mut Envelope,
    note: &mut Note,
    keep: usize,
    mut excess: Option<usize>,
) -> bool {
    let mut order: Vec<(usize, String)> = copy
        .headers
        .iter()
        .filter(|(name, value)| (excess.is_none() || !protected(name)) && value.len() > keep + 3)
        .map(|(name, value)| (value.len(), name.clone()))
        .collect();
    order.sort_by(|a, b| b.cmp(a));
    let mut changed = false;
    for (_, name) in order {
        if excess == Some(0) {
            break;
        }
        let value = &copy.headers[&name];
        let shortened = headers::shorten(value, keep).into_owned();
        let saved = value.len() - shortened.len();
        excess = excess.map(|e| e.saturating_sub(saved));
        note.push(Note::name("value", &name));
        copy.headers.insert(name, shortened);
        changed = true;
    }
    changed
}

/// Replaces the ids of `copy` longer than `max` bytes by ids derived from them: the same in
/// every copy, and for a causation id the same as its cause's.
fn shorten_ids(copy: &mut Envelope, note: &mut Note, max: usize) -> bool {
    let mut changed = false;
    let mut id = |id: &mut MessageId, name: &str| {
        if id.as_str().len() > max {
            *id = MessageId::derived(&[id.as_str().as_bytes()]);
            note.push(name.to_owned());
            changed = true;
        }
    };
    let same_correlation = copy.correlation_id == copy.id;
    id(&mut copy.id, "id");
    if same_correlation {
        copy.correlation_id = copy.id.clone();
    } else {
        id(&mut copy.correlation_id, "correlation");
    }
    if let Some(causation) = copy.causation_id.as_mut() {
        id(causation, "causation");
    }
    changed
}

/// Cuts the kind, key and content type of `copy` to `max` bytes.
fn shorten_texts(copy: &mut Envelope, note: &mut Note, max: usize) -> bool {
    let mut changed = false;
    let mut text = |text: &mut String, name: &str| {
        if text.len() > max + 3 {
            *text = headers::shorten(text, max).into_owned();
            note.push(name.to_owned());
            changed = true;
        }
    };
    text(&mut copy.kind, "kind");
    if let Some(key) = copy.key.as_mut() {
        text(key, "key");
    }
    if let Some(content_type) = copy.content_type.as_mut() {
        text(content_type, "content-type");
    }
    changed
}

/// The AMQP properties of `envelope`. A `copy` does not write the correlation id when it is
/// the id (reading restores it), so that an oversized id is not carried twice.
fn build(envelope: &Envelope, source: &str, attempt: u32, copy: bool) -> BasicProperties {
    use ce::header;
    let mut table = FieldTable::default();
    let mut ce = |name: &str, value: AMQPValue| table.insert(ShortString::from(name), value);
    ce(header::SPECVERSION, long("1.0"));
    ce(header::ID, long(envelope.id.as_str()));
    ce(header::TYPE, long(&envelope.kind));
    ce(header::SOURCE, long(source));
    ce(
        header::TIME,
        long_owned(headers::format_time(envelope.timestamp)),
    );
    let correlation = (!copy || envelope.correlation_id != envelope.id)
        .then_some(envelope.correlation_id.as_str());
    if let Some(correlation) = correlation {
        ce(header::CORRELATION, long(correlation));
    }
    if let Some(causation) = &envelope.causation_id {
        ce(header::CAUSATION, long(causation.as_str()));
    }
    if let Some(key) = &envelope.key {
        ce(header::PARTITIONKEY, long(key));
    }
    let content_type = envelope.content_type.as_deref();
    let content_type_property = content_type.and_then(short);
    if let (Some(content_type), None) = (content_type, &content_type_property) {
        // Too long for the AMQP property: carried as the CloudEvents attribute instead.
        ce(header::DATACONTENTTYPE, long(content_type));
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
    let seconds = u64::try_from(headers::unix_millis(envelope.timestamp) / 1000).unwrap_or(0);
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(seconds)
        .with_headers(table);
    if let Some(id) = short(envelope.id.as_str()) {
        props = props.with_message_id(id);
    }
    if let Some(correlation) = correlation.and_then(short) {
        props = props.with_correlation_id(correlation);
    }
    if let Some(kind) = short(&envelope.kind) {
        props = props.with_type(kind);
    }
    if let Some(content_type) = content_type_property {
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

/// Standard base64 of `bytes`, as `bus` writes binary header values everywhere.
fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A decimal value as text: `value` × 10^-`scale`.
fn decimal(value: &DecimalValue) -> String {
    let digits = value.value.to_string();
    let scale = usize::from(value.scale);
    if scale == 0 {
        return digits;
    }
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = digits.split_at(digits.len() - scale);
    format!("{whole}.{fraction}")
}

/// An AMQP timestamp (seconds) as RFC 3339, or as the number itself past the year 9999.
fn timestamp(seconds: u64) -> String {
    headers::time_from_unix_secs(seconds).map_or_else(|| seconds.to_string(), headers::format_time)
}

/// Tables and arrays nested deeper than this are written as `"…"`: a frame holds tens of
/// thousands of levels, which would overflow the stack.
const MAX_DEPTH: usize = 32;

/// A nested header value as JSON: tables as objects, arrays as arrays, strings as strings
/// (`{"base64": …}` for bytes that are not UTF-8), decimals, times (RFC 3339) and numbers that
/// are not finite as strings, void as null; below [`MAX_DEPTH`] levels, `"…"`.
fn json(value: &AMQPValue, depth: usize) -> serde_json::Value {
    use serde_json::Value;
    let bytes = |bytes: &[u8]| match std::str::from_utf8(bytes) {
        Ok(text) => Value::from(text),
        Err(_) => serde_json::json!({ "base64": base64(bytes) }),
    };
    let float = |n: f64, text: String| {
        serde_json::Number::from_f64(n).map_or(Value::String(text), Value::Number)
    };
    match value {
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) if depth >= MAX_DEPTH => {
            Value::from("…")
        }
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(n) => float(f64::from(*n), n.to_string()),
        AMQPValue::Double(n) => float(*n, n.to_string()),
        AMQPValue::DecimalValue(d) => Value::from(decimal(d)),
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongString(s) => bytes(s.as_bytes()),
        AMQPValue::ByteArray(b) => bytes(b.as_slice()),
        AMQPValue::Timestamp(t) => Value::from(timestamp(*t)),
        AMQPValue::Void => Value::Null,
        AMQPValue::FieldArray(array) => array
            .as_slice()
            .iter()
            .map(|item| json(item, depth + 1))
            .collect(),
        AMQPValue::FieldTable(table) => table
            .inner()
            .iter()
            .map(|(name, item)| (name.as_str().to_owned(), json(item, depth + 1)))
            .collect(),
    }
}

/// A header value as text: strings as they are (lossily for bytes that are not UTF-8),
/// numbers and booleans printed, decimals as decimals, times as RFC 3339, void as empty,
/// tables and arrays as JSON. Never fails; borrows the value's own text where it can.
fn text(value: &AMQPValue) -> Cow<'_, str> {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()),
        AMQPValue::ShortString(s) => Cow::Borrowed(s.as_str()),
        AMQPValue::Float(n) => Cow::Owned(n.to_string()),
        AMQPValue::Double(n) => Cow::Owned(n.to_string()),
        AMQPValue::DecimalValue(d) => Cow::Owned(decimal(d)),
        AMQPValue::Timestamp(t) => Cow::Owned(timestamp(*t)),
        AMQPValue::Void => Cow::Borrowed(""),
        other => Cow::Owned(json(other, 0).to_string()),
    }
}

/// An AMQP short-string property's text, if it is set.
fn property(p: &Option<ShortString>) -> Option<Cow<'_, str>> {
    p.as_ref().map(|s| Cow::Borrowed(s.as_str()))
}

/// A count written in a header (`bus-attempt`, `x-delivery-count`), of whatever integer or
/// text type, saturating at `u32::MAX`; `None` when it is no count.
fn count(value: &AMQPValue) -> Option<u32> {
    let n: u128 = match value {
        AMQPValue::ShortShortInt(n) => u128::try_from(*n).ok()?,
        AMQPValue::ShortShortUInt(n) => u128::from(*n),
        AMQPValue::ShortInt(n) => u128::try_from(*n).ok()?,
        AMQPValue::ShortUInt(n) => u128::from(*n),
        AMQPValue::LongInt(n) => u128::try_from(*n).ok()?,
        AMQPValue::LongUInt(n) => u128::from(*n),
        AMQPValue::LongLongInt(n) => u128::try_from(*n).ok()?,
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) | AMQPValue::ByteArray(_) => {
            text(value).trim().parse().ok()?
        }
        _ => return None,
    };
    Some(u32::try_from(n).unwrap_or(u32::MAX))
}

/// Headers that RabbitMQ rewrites as it redelivers or dead-letters a message: left out of the
/// content hash that identifies a message without an id.
fn volatile(name: &str) -> bool {
    name == DELIVERY_COUNT
        || name == headers::ATTEMPT
        || name == "x-death"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// A stable id for a message that came without one: a hash of its body and of the
/// properties and headers RabbitMQ does not change when it redelivers it.
fn content_id(props: &BasicProperties, payload: &[u8]) -> MessageId {
    fn part(meta: &mut Vec<u8>, bytes: &[u8]) {
        meta.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        meta.extend_from_slice(bytes);
    }
    // Absent and empty (or zero) properties differ: presence is hashed too.
    let mut meta = Vec::new();
    for property in [
        props.kind(),
        props.correlation_id(),
        props.content_type(),
        props.content_encoding(),
        props.app_id(),
        props.user_id(),
    ] {
        match property {
            Some(value) => part(&mut meta, value.as_str().as_bytes()),
            None => meta.push(0xff),
        }
    }
    match props.timestamp() {
        Some(seconds) => part(&mut meta, &seconds.to_be_bytes()),
        None => meta.push(0xff),
    }
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            if !volatile(name.as_str()) {
                part(&mut meta, name.as_str().as_bytes());
                part(&mut meta, json(value, 0).to_string().as_bytes());
            }
        }
    }
    MessageId::derived(&[b"amqp-content", &meta, payload])
}

/// What a received message carries: its envelope and the attempt it is on.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) envelope: Envelope,
    /// The attempt: the one written by a previous nack or drop (1 when absent), plus the
    /// broker's redeliveries of this copy (`x-delivery-count` on quorum queues). The
    /// `redelivered` flag is not counted: RabbitMQ also sets it on the messages a closing
    /// subscription hands back unseen, which would make their first run look like a retry.
    pub(crate) attempt: u32,
    /// The reply-to address, for requests.
    pub(crate) reply_to: Option<String>,
    /// Why the message cannot be read as a `bus` message (it is then dead-lettered as it is).
    pub(crate) undecodable: Option<String>,
}

/// Reads a message published by `bus` or by any other AMQP client; never fails.
///
/// Missing attributes get defaults: an id derived from the message's content (stable across
/// redeliveries), an empty kind, the id as correlation id, the receive time (the unreadable
/// time is kept in [`headers::RAW_TIME`]). Header values that are not UTF-8 are kept base64
/// ([`headers::BINARY_HEADERS`]), other types printed. A CloudEvent of a `specversion` `bus`
/// does not read is marked undecodable.
pub(crate) fn envelope(props: &BasicProperties, payload: Vec<u8>) -> Received {
    // The mapped attributes are read where they lie, and only what the envelope keeps is
    // copied out of them.
    let mut mapped: [Option<&AMQPValue>; ce::MAPPED.len()] = [None; ce::MAPPED.len()];
    let mut extensions = Vec::new();
    let mut user = Headers::new();
    let mut written_attempt = None;
    let mut delivery_count = None;
    if let Some(table) = props.headers() {
        // In name order, so `cloudEvents:` comes before `cloudEvents_`: a mapped attribute
        // spelled both ways (`cloudEvents:time` and `cloudEvents_time`) is read in the first
        // spelling, and the second dropped; so is an extension's second spelling.
        for (name, value) in table.inner() {
            let name = name.as_str();
            if name == headers::ATTEMPT {
                written_attempt = count(value);
            } else if name == DELIVERY_COUNT {
                delivery_count = count(value);
            } else if let Some(attr) = name
                .strip_prefix(CE_PREFIX)
                .or_else(|| name.strip_prefix(CE_PREFIX_ALT))
            {
                match ce::MAPPED.iter().position(|mapped| *mapped == attr) {
                    Some(at) => {
                        mapped[at].get_or_insert(value);
                    }
                    None => extensions.push((attr, value)),
                }
            } else {
                match value {
                    AMQPValue::LongString(s) => {
                        headers::insert_bytes(&mut user, name.as_bytes(), s.as_bytes());
                    }
                    AMQPValue::ByteArray(b) => {
                        headers::insert_bytes(&mut user, name.as_bytes(), b.as_slice());
                    }
                    other => {
                        user.insert(name.to_owned(), text(other).into_owned());
                    }
                }
            }
        }
    }
    let attribute = |attr: &str| {
        ce::MAPPED
            .iter()
            .position(|mapped| *mapped == attr)
            .and_then(|at| mapped[at])
            .map(text)
    };
    let specversion = attribute(ce::SPECVERSION);
    let undecodable = specversion
        .as_deref()
        .and_then(|v| headers::check_specversion(v).err());
    let id: MessageId = attribute(ce::ID)
        .filter(|s| !s.is_empty())
        .or_else(|| property(props.message_id()))
        .filter(|s| !s.is_empty())
        .map_or_else(|| content_id(props, &payload), |s| MessageId::from(&*s));
    let kind = attribute(ce::TYPE)
        .or_else(|| property(props.kind()))
        .map(Cow::into_owned)
        .unwrap_or_default();
    let correlation_id = attribute(ce::CORRELATION)
        .or_else(|| property(props.correlation_id()))
        .filter(|s| !s.is_empty())
        .map_or_else(|| id.clone(), |s| MessageId::from(&*s));
    let causation_id = attribute(ce::CAUSATION)
        .filter(|s| !s.is_empty())
        .map(|s| MessageId::from(&*s));
    let ce_time = attribute(ce::TIME);
    let amqp_time = props
        .timestamp()
        .map(|s| (s, headers::time_from_unix_secs(s)));
    let timestamp = match (ce_time, amqp_time) {
        (Some(raw), amqp) => headers::parse_time(&raw).ok().or_else(|| {
            user.insert(headers::RAW_TIME.to_owned(), raw.into_owned());
            amqp.and_then(|(_, time)| time)
        }),
        (None, Some((raw, time))) => time.or_else(|| {
            user.insert(headers::RAW_TIME.to_owned(), raw.to_string());
            None
        }),
        (None, None) => None,
    }
    .unwrap_or_else(SystemTime::now);
    let key = attribute(ce::PARTITIONKEY).map(Cow::into_owned);
    let content_type = property(props.content_type())
        .or_else(|| attribute(ce::DATACONTENTTYPE))
        .map(Cow::into_owned);
    if undecodable.is_some() {
        // What the message said about itself goes to the dead letter with it.
        let source = attribute(ce::SOURCE);
        for (attr, value) in [(ce::SPECVERSION, specversion), (ce::SOURCE, source)] {
            if let Some(value) = value {
                user.insert(format!("{ORIGINAL_PREFIX}{attr}"), value.into_owned());
            }
        }
    }
    // The binding's own attributes are not application headers; other extensions are.
    for (attr, value) in extensions {
        user.entry(format!("{CE_PREFIX}{attr}"))
            .or_insert_with(|| text(value).into_owned());
    }
    let attempt = written_attempt
        .unwrap_or(1)
        .max(1)
        .saturating_add(delivery_count.unwrap_or(0));
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
        undecodable,
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
/// `bus.retry.<ms>ms.<queue>`, `<ms>` being the delay's bucket ([`retry_delay_ms`]; a prefix,
/// as server-named queues start with the reserved `amq.`).
pub(crate) fn retry_queue(queue: &str, delay: Duration) -> String {
    format!("bus.retry.{}ms.{queue}", retry_delay_ms(delay))
}

/// The TTL queue (and the fanout exchange of the same name in front of it) that holds
/// messages published to topics of `topic_exchange` with `delay`, before they go on to it:
/// `bus.delay.<ms>ms.<topic_exchange>`, `<ms>` being the delay's bucket ([`retry_delay_ms`]).
pub(crate) fn delay_queue(topic_exchange: &str, delay: Duration) -> String {
    format!("bus.delay.{}ms.{topic_exchange}", retry_delay_ms(delay))
}

/// `properties` of a delayed message parked for `delay` in the TTL queue of `delay`'s bucket:
/// with its own `expiration` of `delay` (whole milliseconds, rounded up), so that it leaves
/// the queue when due rather than at the end of the bucket, unless a message ahead of it,
/// which expires first at the latest at the bucket's end, holds it (RabbitMQ expires messages
/// at the head of a queue only). RabbitMQ removes the expiration when it dead-letters it.
pub(crate) fn expiring(properties: BasicProperties, delay: Duration) -> BasicProperties {
    properties.with_expiration(ShortString::from(delay_millis(delay).to_string()))
}

/// The longest delay a retry or delay queue holds a message for: the last of
/// [`RETRY_DELAYS_MS`] (about 49.7 days).
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(MAX_TTL_MS - RETRY_QUEUE_EXPIRES_MS);

/// The delays, in milliseconds, that retry queues hold messages for: a delay is rounded up to
/// the next of them, so a queue has at most this many retry queues however its delays are
/// jittered. Steps of at most 5/3 (30 → 50, 3 s → 5 s …), on round values of each unit; the
/// last is the longest a retry queue can hold a message for.
pub(crate) const RETRY_DELAYS_MS: [u64; 55] = [
    // milliseconds
    10,
    15,
    20,
    30,
    50,
    75,
    100,
    150,
    200,
    300,
    500,
    750,
    // seconds: 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 45
    1_000,
    1_500,
    2_000,
    3_000,
    5_000,
    7_500,
    10_000,
    15_000,
    20_000,
    30_000,
    45_000,
    // minutes: 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 45
    60_000,
    90_000,
    120_000,
    180_000,
    300_000,
    450_000,
    600_000,
    900_000,
    1_200_000,
    1_800_000,
    2_700_000,
    // hours: 1, 1.5, 2, 3, 4, 6, 8, 12, 18
    3_600_000,
    5_400_000,
    7_200_000,
    10_800_000,
    14_400_000,
    21_600_000,
    28_800_000,
    43_200_000,
    64_800_000,
    // days: 1, 1.5, 2, 3, 5, 7, 10, 14, 21, 30, 40, and the longest (about 49.7)
    86_400_000,
    129_600_000,
    172_800_000,
    259_200_000,
    432_000_000,
    604_800_000,
    864_000_000,
    1_209_600_000,
    1_814_400_000,
    2_592_000_000,
    3_456_000_000,
    MAX_TTL_MS - RETRY_QUEUE_EXPIRES_MS,
];

/// How long the retry queue for `delay` holds a message: the first of [`RETRY_DELAYS_MS`] at
/// least as long as `delay` (so the wait is never shorter than asked), the last for longer
/// delays.
pub(crate) fn retry_delay_ms(delay: Duration) -> u64 {
    let ms = delay_millis(delay);
    let at = RETRY_DELAYS_MS.partition_point(|&bucket| bucket < ms);
    RETRY_DELAYS_MS[at.min(RETRY_DELAYS_MS.len() - 1)]
}

/// The longest `x-message-ttl` and `x-expires` RabbitMQ takes (2^32 − 1 ms, about 49.7
/// days): it closes the channel (`PRECONDITION_FAILED`) on a larger one.
const MAX_TTL_MS: u64 = 4_294_967_295;

/// How long a retry queue outlives the last message put in it (`x-expires` after the TTL).
pub(crate) const RETRY_QUEUE_EXPIRES_MS: u64 = 600_000;

/// `delay` in whole milliseconds, rounded up (so the wait is never shorter than asked), at
/// least 1 and at most what a retry queue can hold a message for (about 49.7 days, minus the
/// ten minutes the queue outlives it).
pub(crate) fn delay_millis(delay: Duration) -> u64 {
    let ms = delay.min(headers::MAX_DELAY).as_nanos().div_ceil(1_000_000);
    u64::try_from(ms)
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_TTL_MS - RETRY_QUEUE_EXPIRES_MS)
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
        let props = properties(&sent, "payments", 3).unwrap();
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

    #[test]
    fn delays_round_up_to_a_few_buckets() {
        assert!(RETRY_DELAYS_MS.windows(2).all(|w| w[0] < w[1]));
        assert!(RETRY_DELAYS_MS
            .windows(2)
            .all(|w| w[1] * 3 <= w[0] * 5 || w[0] == 10));
        assert_eq!(retry_delay_ms(Duration::ZERO), 10);
        assert_eq!(retry_delay_ms(Duration::from_millis(1_000)), 1_000);
        assert_eq!(retry_delay_ms(Duration::from_micros(1_000_001)), 1_500);
        assert_eq!(retry_delay_ms(Duration::from_secs(31)), 45_000);
        assert_eq!(retry_delay_ms(Duration::from_secs(3_600)), 3_600_000);
        assert_eq!(
            retry_delay_ms(Duration::MAX),
            MAX_TTL_MS - RETRY_QUEUE_EXPIRES_MS
        );
        assert_eq!(
            retry_queue("q", Duration::from_millis(280)),
            "bus.retry.300ms.q"
        );
        // A jittered exponential backoff (100 ms doubling to 10 min, ±50 %): thousands of
        // distinct delays, each waited for at least as long as asked and at most 5/3 as long
        // (10 ms at the least), in a few queues.
        let mut queues = std::collections::BTreeSet::new();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for attempt in 0..10_000u32 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let base = 100u64 << (attempt % 13).min(12);
            let base = base.min(600_000);
            let micros = base * 500 + seed % (base * 1_000);
            let delay = Duration::from_micros(micros);
            let held = retry_delay_ms(delay);
            assert!(
                u128::from(held) * 1_000 >= delay.as_micros(),
                "{delay:?} → {held} ms"
            );
            assert!(
                u128::from(held) * 3_000 <= delay.as_micros() * 5 || held == 10,
                "{delay:?} → {held} ms"
            );
            queues.insert(held);
        }
        assert!(queues.len() <= RETRY_DELAYS_MS.len());
        assert!(queues.len() < 40, "{} buckets", queues.len());
    }

    fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut table = FieldTable::default();
        for (name, value) in entries {
            table.insert(name.into(), value);
        }
        table
    }

    #[test]
    fn timestamps_past_the_year_9999_do_not_panic() {
        // Before: `UNIX_EPOCH + Duration::from_secs(u64::MAX)` panicked in the consumer task.
        let headers_table = table(vec![
            ("sent-at", AMQPValue::Timestamp(u64::MAX)),
            ("epoch", AMQPValue::Timestamp(0)),
        ]);
        let props = BasicProperties::default()
            .with_timestamp(u64::MAX)
            .with_headers(headers_table);
        let before = SystemTime::now();
        let got = envelope(&props, b"x".to_vec()).envelope;
        assert!(got.timestamp >= before, "the receive time");
        assert_eq!(
            got.header(headers::RAW_TIME),
            Some(u64::MAX.to_string().as_str())
        );
        assert_eq!(got.header("sent-at"), Some(u64::MAX.to_string().as_str()));
        assert_eq!(got.header("epoch"), Some("1970-01-01T00:00:00.000Z"));

        let props = BasicProperties::default().with_headers(table(vec![(
            "cloudEvents:time",
            long("10000-01-01T00:00:00Z"),
        )]));
        let got = envelope(&props, Vec::new()).envelope;
        assert_eq!(got.header(headers::RAW_TIME), Some("10000-01-01T00:00:00Z"));
        let props = BasicProperties::default().with_timestamp(0);
        let got = envelope(&props, Vec::new()).envelope;
        assert_eq!(got.timestamp, std::time::UNIX_EPOCH);
        assert_eq!(got.header(headers::RAW_TIME), None);
    }

    #[test]
    fn a_message_without_id_keeps_one_id_across_redeliveries() {
        // Before: a fresh random id at every delivery.
        let props = BasicProperties::default()
            .with_type("legacy".into())
            .with_headers(table(vec![("tenant", long("acme"))]));
        let first = envelope(&props, b"body".to_vec()).envelope;
        let redelivered = BasicProperties::default()
            .with_type("legacy".into())
            .with_headers(table(vec![
                ("tenant", long("acme")),
                (DELIVERY_COUNT, AMQPValue::LongLongInt(3)),
            ]));
        let again = envelope(&redelivered, b"body".to_vec()).envelope;
        assert_eq!(first.id, again.id);
        assert_eq!(first.correlation_id, first.id);
        let other = envelope(&props, b"other body".to_vec()).envelope;
        assert_ne!(first.id, other.id);
        // An absent property is not an empty or zero one.
        let bare = envelope(&BasicProperties::default(), b"x".to_vec()).envelope;
        let zero = BasicProperties::default().with_timestamp(0);
        assert_ne!(bare.id, envelope(&zero, b"x".to_vec()).envelope.id);
        let empty_type = BasicProperties::default().with_type("".into());
        assert_ne!(bare.id, envelope(&empty_type, b"x".to_vec()).envelope.id);
        // Empty ids count as missing.
        let empty = BasicProperties::default()
            .with_message_id("".into())
            .with_type("legacy".into())
            .with_headers(table(vec![
                ("tenant", long("acme")),
                ("cloudEvents:id", long("")),
            ]));
        assert!(!envelope(&empty, b"body".to_vec())
            .envelope
            .id
            .as_str()
            .is_empty());
        // The copy stored on nack carries the derived id.
        let copy = properties_fitted(&first, "q", 2, 0);
        assert_eq!(envelope(&copy, b"body".to_vec()).envelope.id, first.id);
    }

    #[test]
    fn attempts_count_broker_redeliveries() {
        let with = |entries: Vec<(&str, AMQPValue)>| {
            BasicProperties::default().with_headers(table(entries))
        };
        let attempt =
            |props: &BasicProperties, _redelivered: bool| envelope(props, Vec::new()).attempt;
        assert_eq!(attempt(&BasicProperties::default(), false), 1);
        // The flag alone is not counted (it is also set on messages handed back unseen).
        assert_eq!(attempt(&BasicProperties::default(), true), 1);
        let quorum = with(vec![(DELIVERY_COUNT, AMQPValue::LongLongInt(4))]);
        assert_eq!(attempt(&quorum, true), 5);
        let copy = with(vec![
            (headers::ATTEMPT, AMQPValue::LongLongInt(3)),
            (DELIVERY_COUNT, AMQPValue::LongLongInt(1)),
        ]);
        assert_eq!(attempt(&copy, true), 4);
        let hostile = with(vec![
            (headers::ATTEMPT, long("99999999999999999999")),
            (DELIVERY_COUNT, AMQPValue::LongLongInt(i64::MAX)),
        ]);
        assert_eq!(attempt(&hostile, true), u32::MAX);
        let nonsense = with(vec![
            (headers::ATTEMPT, AMQPValue::LongLongInt(-5)),
            (DELIVERY_COUNT, long("many")),
        ]);
        assert_eq!(attempt(&nonsense, false), 1);
        let decoded = envelope(&hostile, Vec::new()).envelope;
        assert!(decoded.headers.is_empty(), "{:?}", decoded.headers);
    }

    #[test]
    fn unknown_specversion_is_undecodable_and_kept() {
        let props = BasicProperties::default().with_headers(table(vec![
            ("cloudEvents:specversion", long("9.9")),
            ("cloudEvents:id", long("bad-1")),
            ("cloudEvents:type", long("t")),
            ("cloudEvents:source", long("/far")),
        ]));
        let got = envelope(&props, vec![0, 0xff]);
        // Before: what the message said of itself was lost.
        assert_eq!(
            got.envelope.header("bus-rabbitmq-original-specversion"),
            Some("9.9")
        );
        assert_eq!(
            got.envelope.header("bus-rabbitmq-original-source"),
            Some("/far")
        );
        let reason = got.undecodable.expect("undecodable");
        assert!(reason.contains("9.9"), "{reason}");
        assert_eq!(got.envelope.id.as_str(), "bad-1");
        assert_eq!(&got.envelope.payload[..], &[0, 0xff]);
        for version in ["1.0", "0.3"] {
            let props = BasicProperties::default()
                .with_headers(table(vec![("cloudEvents_specversion", long(version))]));
            assert_eq!(envelope(&props, Vec::new()).undecodable, None);
        }
    }

    #[test]
    fn odd_header_values_become_text() {
        let mut nested = FieldTable::default();
        nested.insert("n".into(), AMQPValue::LongInt(-1));
        nested.insert("b".into(), AMQPValue::ByteArray(vec![0xff, 0x01].into()));
        nested.insert("v".into(), AMQPValue::Void);
        let mut array = lapin::types::FieldArray::default();
        array.push(AMQPValue::Boolean(true));
        array.push(AMQPValue::Timestamp(0));
        array.push(AMQPValue::Double(f64::NAN));
        array.push(long("q\"uote"));
        let props = BasicProperties::default().with_headers(table(vec![
            ("table", AMQPValue::FieldTable(nested)),
            ("array", AMQPValue::FieldArray(array)),
            (
                "decimal",
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 3,
                    value: 12,
                }),
            ),
            ("void", AMQPValue::Void),
            ("bytes", AMQPValue::ByteArray(vec![0xff, 0xfe].into())),
            ("latin1", AMQPValue::LongString(b"caf\xe9".to_vec().into())),
            ("utf8-bytes", AMQPValue::ByteArray(b"plain".to_vec().into())),
        ]));
        let got = envelope(&props, Vec::new()).envelope;
        assert_eq!(
            got.header("table"),
            Some(r#"{"b":{"base64":"/wE="},"n":-1,"v":null}"#)
        );
        assert_eq!(
            got.header("array"),
            Some(r#"[true,"1970-01-01T00:00:00.000Z","NaN","q\"uote"]"#)
        );
        assert_eq!(got.header("decimal"), Some("0.012"));
        assert_eq!(got.header("void"), Some(""));
        assert_eq!(got.header("bytes"), Some("//4="));
        assert_eq!(got.header("latin1"), Some("Y2Fm6Q=="));
        assert_eq!(got.header("utf8-bytes"), Some("plain"));
        assert_eq!(got.header(headers::BINARY_HEADERS), Some("bytes,latin1"));
    }

    #[test]
    fn headers_bus_cannot_carry_are_refused() {
        // Before: a header name over 255 bytes was silently left out.
        let long_name = Envelope::new("k", "x").with_header("n".repeat(256), "v");
        let err = properties(&long_name, "q", 1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::HeadersTooLarge);
        for name in [
            "cloudEvents:id",
            "cloudEvents_thing",
            "bus-attempt",
            DELIVERY_COUNT,
        ] {
            let reserved = Envelope::new("k", "x").with_header(name, "v");
            let err = properties(&reserved, "q", 1).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Serialization, "{name}");
        }
        assert!(properties(
            &Envelope::new("k", "x").with_header("cloudEvents:ext", "v"),
            "q",
            1
        )
        .is_ok());
        // A long content type travels as the CloudEvents attribute.
        let long_type = Envelope::new("k", "x").with_content_type("t".repeat(300));
        let props = properties(&long_type, "q", 1).unwrap();
        let got = envelope(&props, b"x".to_vec()).envelope;
        assert_eq!(got.content_type, long_type.content_type);
    }

    #[test]
    fn copies_fit_in_a_frame_whatever_they_hold() {
        let mut received = Envelope::new("k", "x")
            .with_header(headers::DLQ_REASON, "r".repeat(10_000))
            .with_header(headers::BINARY_HEADERS, "big")
            .with_header(headers::RAW_TIME, "yesterday")
            .with_header("big", "b".repeat(50_000));
        for i in 0..5_000 {
            received = received.with_header(format!("h{i:05}"), "v".repeat(10));
        }
        let frame_max = 8 * 1024;
        let props = properties_fitted(&received, "q", 7, frame_max);
        assert!(header_frame_size(&props) <= frame_max);
        let got = envelope(&props, b"x".to_vec());
        assert_eq!(got.attempt, 7);
        assert_eq!(got.envelope.id, received.id);
        let reason = got.envelope.header(headers::DLQ_REASON).unwrap();
        assert!(reason.starts_with("rrr") && reason.len() < 300, "{reason}");
        // Before: the notes that make other values readable could be left out.
        assert_eq!(got.envelope.header(headers::BINARY_HEADERS), Some("big"));
        assert_eq!(got.envelope.header(headers::RAW_TIME), Some("yesterday"));
        let note = got.envelope.header(headers::TRUNCATED).unwrap();
        assert!(
            note.contains("value:big") && note.contains("header:h0"),
            "{note}"
        );
        assert!(note.len() <= Note::MAX + 4, "{}", note.len());
        // Without a size limit, nothing is cut.
        let props = properties_fitted(&received, "q", 7, 0);
        let got = envelope(&props, b"x".to_vec()).envelope;
        assert_eq!(got.header("big").map(str::len), Some(50_000));
        assert_eq!(got.header(headers::TRUNCATED), None);
        // A copy of a copy keeps the earlier note.
        let cut = envelope(&properties_fitted(&received, "q", 7, frame_max), Vec::new());
        let again = properties_fitted(&cut.envelope, "q", 8, frame_max);
        let again = envelope(&again, Vec::new()).envelope;
        assert!(again
            .header(headers::TRUNCATED)
            .unwrap()
            .starts_with("value:"));
    }

    /// The smallest frame RabbitMQ negotiates.
    const MIN_FRAME: usize = 4096;

    #[test]
    fn oversized_attributes_are_cut_to_fit() {
        // Before: a 70 KB id without correlation id was written twice (as the correlation id
        // too), and 50 KB of 0xFF in the type tripled (U+FFFD); neither copy fit in a frame.
        let frame_max = 131_072;
        let props = BasicProperties::default().with_headers(table(vec![
            ("cloudEvents:id", long(&"i".repeat(70_000))),
            (
                "cloudEvents:type",
                AMQPValue::LongString(vec![0xff; 50_000].into()),
            ),
        ]));
        let received = envelope(&props, b"x".to_vec()).envelope;
        assert_eq!(received.correlation_id, received.id);
        let copy = properties_fitted(&received, "q", 2, frame_max);
        assert!(header_frame_size(&copy) <= frame_max);
        let got = envelope(&copy, b"x".to_vec()).envelope;
        assert!(got.kind.len() <= 1027, "{}", got.kind.len());
        assert_eq!(got.correlation_id, got.id);
        let note = got.header(headers::TRUNCATED).unwrap_or_default();
        assert!(note.split(',').any(|item| item == "kind"), "{note}");
        // The id fit once the type was cut: it is kept.
        assert!(got.id == received.id, "id replaced");

        // In the smallest frame an oversized id is replaced, the same way in every copy.
        let copy = properties_fitted(&received, "q", 2, MIN_FRAME);
        assert!(header_frame_size(&copy) <= MIN_FRAME);
        let got = envelope(&copy, b"x".to_vec()).envelope;
        let derived = MessageId::derived(&[received.id.as_str().as_bytes()]);
        assert_eq!(got.id, derived);
        assert_eq!(got.correlation_id, derived);
        let again = properties_fitted(&got, "q", 3, MIN_FRAME);
        assert_eq!(envelope(&again, Vec::new()).envelope.id, derived);
        let mut huge = received.clone().with_key("k".repeat(60_000));
        huge.causation_id = Some(MessageId::from("c".repeat(60_000)));
        huge.content_type = Some("t".repeat(60_000));
        let huge = huge.with_header(headers::TRACEPARENT, "p".repeat(60_000));
        let copy = properties_fitted(&huge, "q", 2, MIN_FRAME);
        assert!(header_frame_size(&copy) <= MIN_FRAME);
        let got = envelope(&copy, b"x".to_vec()).envelope;
        assert!(got.header(headers::TRACEPARENT).unwrap().starts_with("ppp"));
        let note = got.header(headers::TRUNCATED).unwrap_or_default();
        for item in ["id", "kind", "key", "causation", "content-type"] {
            assert!(note.split(',').any(|i| i == item), "{item}: {note}");
        }
    }

    #[test]
    fn deeply_nested_values_do_not_overflow_the_stack() {
        // Before: one stack frame per level; a frame holds ~26,000 nested arrays.
        let mut value = AMQPValue::Void;
        for _ in 0..20_000 {
            value = AMQPValue::FieldArray(vec![value].into());
        }
        let props = BasicProperties::default().with_headers(table(vec![("deep", value)]));
        let got = envelope(&props, b"x".to_vec());
        let deep = got.envelope.header("deep").unwrap();
        assert!(deep.starts_with("[[[") && deep.contains("\"…\""), "{deep}");
        assert_eq!(deep.len(), 2 * MAX_DEPTH + "\"…\"".len());
        // Dropping lapin's value recurses once per level too: not this test's business.
        std::mem::forget(props);
    }

    #[test]
    fn attribute_header_names_are_the_prefix_and_the_attribute() {
        use ce::header;
        let names = [
            header::ID,
            header::TYPE,
            header::SOURCE,
            header::SPECVERSION,
            header::TIME,
            header::CORRELATION,
            header::CAUSATION,
            header::PARTITIONKEY,
            header::DATACONTENTTYPE,
        ];
        for (attr, name) in ce::MAPPED.iter().zip(names) {
            assert_eq!(name, format!("{CE_PREFIX}{attr}"));
        }
    }

    #[test]
    fn the_properties_written_are_those_of_the_binding() {
        // Spelled out, name by name: the static names (before: `cloudEvents:` + name per
        // message) and values moved in instead of copied change nothing on the wire.
        let parent = Envelope::new("order.created", "{}");
        let sent = Envelope::new("order.placed", "{}")
            .caused_by(&parent)
            .with_key("order-42")
            .with_content_type("application/json")
            .with_header("traceparent", "00-abc-def-01")
            .with_header("tenant", "acme");
        let time = headers::format_time(sent.timestamp);
        let seconds = u64::try_from(headers::unix_millis(sent.timestamp) / 1000).unwrap();
        let expected = |attempt: Option<i64>| {
            let mut entries = vec![
                ("cloudEvents:specversion", long("1.0")),
                ("cloudEvents:id", long(sent.id.as_str())),
                ("cloudEvents:type", long("order.placed")),
                ("cloudEvents:source", long("orders")),
                ("cloudEvents:time", long(&time)),
                ("cloudEvents:correlationid", long(parent.id.as_str())),
                ("cloudEvents:causationid", long(parent.id.as_str())),
                ("cloudEvents:partitionkey", long("order-42")),
                ("traceparent", long("00-abc-def-01")),
                ("tenant", long("acme")),
            ];
            if let Some(attempt) = attempt {
                entries.push(("bus-attempt", AMQPValue::LongLongInt(attempt)));
            }
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_timestamp(seconds)
                .with_headers(table(entries))
                .with_message_id(sent.id.as_str().into())
                .with_correlation_id(parent.id.as_str().into())
                .with_type("order.placed".into())
                .with_content_type("application/json".into())
        };
        assert_eq!(properties(&sent, "orders", 1).unwrap(), expected(None));
        assert_eq!(properties(&sent, "orders", 3).unwrap(), expected(Some(3)));
        let long_type = Envelope::new("k", "x").with_content_type("t".repeat(300));
        let props = properties(&long_type, "q", 1).unwrap();
        let table = props.headers().clone().unwrap();
        assert_eq!(
            table.inner().get("cloudEvents:datacontenttype"),
            Some(&long(&"t".repeat(300)))
        );
        assert_eq!(props.content_type(), &None);
    }

    #[test]
    fn an_attribute_spelled_twice_is_read_once() {
        let props = BasicProperties::default().with_headers(table(vec![
            ("cloudEvents:time", long("2026-01-01T00:00:00Z")),
            ("cloudEvents_time", long("2027-01-01T00:00:00Z")),
            ("cloudEvents_ext", long("e")),
        ]));
        let got = envelope(&props, Vec::new()).envelope;
        assert_eq!(got.header("cloudEvents:ext"), Some("e"));
        assert_eq!(got.headers.len(), 1, "{:?}", got.headers);
        assert!(properties(&got, "q", 1).is_ok());
        // The `cloudEvents:` spelling is the one read, of an extension too.
        assert_eq!(
            got.timestamp,
            headers::parse_time("2026-01-01T00:00:00Z").unwrap()
        );
        let props = BasicProperties::default().with_headers(table(vec![
            ("cloudEvents:ext", long("colon")),
            ("cloudEvents_ext", long("underscore")),
        ]));
        let got = envelope(&props, Vec::new()).envelope;
        assert_eq!(got.header("cloudEvents:ext"), Some("colon"));
    }

    /// Any header value lapin can hand over, nested a few levels.
    fn amqp_value() -> impl proptest::strategy::Strategy<Value = AMQPValue> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<u8>().prop_map(AMQPValue::ShortShortUInt),
            any::<i16>().prop_map(AMQPValue::ShortInt),
            any::<u16>().prop_map(AMQPValue::ShortUInt),
            any::<i32>().prop_map(AMQPValue::LongInt),
            any::<u32>().prop_map(AMQPValue::LongUInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<f32>().prop_map(AMQPValue::Float),
            any::<f64>().prop_map(AMQPValue::Double),
            (any::<u8>(), any::<u32>())
                .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
            "\\PC{0,40}".prop_map(|s| AMQPValue::ShortString(s.into())),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| AMQPValue::LongString(b.into())),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| AMQPValue::ByteArray(b.into())),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            Just(AMQPValue::Void),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(|items| {
                    let mut array = lapin::types::FieldArray::default();
                    for item in items {
                        array.push(item);
                    }
                    AMQPValue::FieldArray(array)
                }),
                proptest::collection::vec(("[a-z]{0,8}", inner), 0..6).prop_map(|entries| {
                    let mut table = FieldTable::default();
                    for (name, item) in entries {
                        table.insert(name.into(), item);
                    }
                    AMQPValue::FieldTable(table)
                }),
            ]
        })
    }

    /// Arrays nested `depth` levels deep.
    fn nested(depth: usize) -> AMQPValue {
        let mut value = AMQPValue::LongInt(1);
        for _ in 0..depth {
            value = AMQPValue::FieldArray(vec![value].into());
        }
        value
    }

    /// Raw properties as any AMQP client may send them.
    fn raw_properties() -> impl proptest::strategy::Strategy<Value = BasicProperties> {
        use bus_core::conformance::arbitrary;
        use proptest::prelude::*;
        let short_text = || {
            proptest::option::of(
                arbitrary::text().prop_map(|s| headers::shorten(&s, 250).into_owned()),
            )
        };
        let names = prop_oneof![
            4 => "[a-zA-Z0-9_.-]{0,16}",
            1 => proptest::sample::select(vec![
                "cloudEvents:specversion", "cloudEvents:id", "cloudEvents:type",
                "cloudEvents:time", "cloudEvents_time", "cloudEvents:correlationid",
                "cloudEvents:causationid", "cloudEvents:partitionkey",
                "cloudEvents:datacontenttype", "cloudEvents_ext", "bus-attempt",
                "x-delivery-count", "x-death", "bus-binary-headers", "bus-raw-time",
            ]).prop_map(str::to_owned),
        ];
        let special = proptest::collection::vec(
            (
                names,
                prop_oneof![
                    2 => arbitrary::text().prop_map(|s| long(&s)),
                    1 => Just(long("9.9")),
                    1 => Just(long("1.0")),
                    1 => Just(long("2026-11-24T06:00:00Z")),
                    2 => amqp_value(),
                    1 => (0usize..1000).prop_map(nested),
                ],
            ),
            0..12,
        );
        (
            (short_text(), short_text(), short_text(), short_text()),
            proptest::option::of(any::<u64>()),
            arbitrary::raw_headers(),
            special,
        )
            .prop_map(
                |((id, kind, correlation, content_type), time, raw, special)| {
                    let mut table = FieldTable::default();
                    for (name, value) in raw {
                        let name = String::from_utf8_lossy(&name).into_owned();
                        table.insert(name.into(), AMQPValue::LongString(value.into()));
                    }
                    for (name, value) in special {
                        table.insert(name.into(), value);
                    }
                    let mut props = BasicProperties::default().with_headers(table);
                    if let Some(id) = id {
                        props = props.with_message_id(id.into());
                    }
                    if let Some(kind) = kind {
                        props = props.with_type(kind.into());
                    }
                    if let Some(correlation) = correlation {
                        props = props.with_correlation_id(correlation.into());
                    }
                    if let Some(content_type) = content_type {
                        props = props.with_content_type(content_type.into());
                    }
                    if let Some(time) = time {
                        props = props.with_timestamp(time);
                    }
                    props
                },
            )
    }

    #[test]
    fn property_decode_never_panics() {
        use bus_core::conformance::arbitrary;
        use proptest::prelude::*;
        let input = (raw_properties(), arbitrary::payload(), any::<bool>());
        arbitrary::check(
            "adapter-rabbitmq decode_never_panics",
            256,
            input,
            |(props, payload, redelivered)| {
                let got = envelope(&props, payload.to_vec());
                let e = &got.envelope;
                prop_assert!(!e.id.as_str().is_empty());
                prop_assert!(!e.correlation_id.as_str().is_empty());
                prop_assert!(e.timestamp <= headers::max_time());
                prop_assert!(got.attempt >= 1);
                let _ = redelivered;
                prop_assert_eq!(&e.payload, &payload);
                // Decoding again (a redelivery) gives the same id.
                let again = envelope(&props, payload.to_vec());
                prop_assert_eq!(&again.envelope.id, &e.id);
                // The copy stored on nack or dead-lettering is read back as the same message.
                let copy = properties_fitted(e, "q", got.attempt.saturating_add(1), 0);
                let back = envelope(&copy, payload.to_vec());
                prop_assert_eq!(&back.envelope.id, &e.id);
                prop_assert_eq!(&back.envelope.kind, &e.kind);
                prop_assert_eq!(&back.envelope.correlation_id, &e.correlation_id);
                prop_assert_eq!(&back.envelope.key, &e.key);
                prop_assert_eq!(&back.envelope.content_type, &e.content_type);
                prop_assert_eq!(back.attempt, got.attempt.saturating_add(1));
                prop_assert_eq!(back.undecodable, None);
                let fitted = properties_fitted(e, "q", 2, MIN_FRAME);
                prop_assert!(header_frame_size(&fitted) <= MIN_FRAME);
                if !e.headers.keys().any(|n| reserved(n) || n.len() > SHORT_MAX) {
                    prop_assert_eq!(&back.envelope.headers, &e.headers);
                    let skew = e
                        .timestamp
                        .duration_since(back.envelope.timestamp)
                        .unwrap_or_default();
                    prop_assert!(skew < Duration::from_millis(1));
                }
                Ok(())
            },
        );
    }

    #[test]
    fn property_envelope_round_trip() {
        use bus_core::conformance::arbitrary;
        use proptest::prelude::*;
        let input = (arbitrary::envelope(), 1..=u32::MAX);
        arbitrary::check(
            "adapter-rabbitmq envelope_round_trip",
            256,
            input,
            |(sent, attempt)| {
                let props = match properties(&sent, "topic", attempt) {
                    Ok(props) => props,
                    Err(err) => {
                        prop_assert!(
                            sent.headers
                                .keys()
                                .any(|n| n.len() > SHORT_MAX || reserved(n)),
                            "refused an envelope it can carry: {err}"
                        );
                        prop_assert!(matches!(
                            err.kind(),
                            ErrorKind::HeadersTooLarge | ErrorKind::Serialization
                        ));
                        return Ok(());
                    }
                };
                let got = envelope(&props, sent.payload.to_vec());
                prop_assert_eq!(got.attempt, attempt);
                prop_assert_eq!(got.undecodable, None);
                prop_assert_eq!(got.envelope, sent);
                Ok(())
            },
        );
    }

    #[test]
    fn property_copies_fit_the_frame() {
        use bus_core::conformance::arbitrary;
        use proptest::prelude::*;
        // Attributes of any size a foreign message can hold, not only what `bus` publishes.
        let oversized = || proptest::option::of(0usize..100_000);
        let input = (
            arbitrary::envelope(),
            proptest::collection::vec(("[a-z]{1,300}", 0usize..20_000), 0..40),
            (oversized(), oversized(), oversized(), oversized()),
            4096usize..140_000,
        );
        arbitrary::check(
            "adapter-rabbitmq copies_fit_the_frame",
            64,
            input,
            |(mut received, extra, (id, kind, key, causation), frame_max)| {
                for (name, size) in extra {
                    received.headers.insert(name, "x".repeat(size));
                }
                if let Some(size) = id {
                    received.id = MessageId::from("i".repeat(size.max(1)));
                }
                if let Some(size) = kind {
                    received.kind = "\u{fffd}".repeat(size / 3);
                }
                if let Some(size) = key {
                    received.key = Some("k".repeat(size));
                }
                if let Some(size) = causation {
                    received.causation_id = Some(MessageId::from("c".repeat(size.max(1))));
                }
                let dead = bus_core::middleware::dead_letter::mark(
                    received.clone(),
                    &bus_core::middleware::dead_letter::DeadLetterInfo {
                        reason: "poison",
                        source: "q",
                        group: None,
                        attempts: 3,
                        first_failure: None,
                    },
                );
                let props = properties_fitted(&dead, "q", 1, frame_max);
                prop_assert!(header_frame_size(&props) <= frame_max);
                let back = envelope(&props, Vec::new()).envelope;
                let derived = MessageId::derived(&[received.id.as_str().as_bytes()]);
                prop_assert!(back.id == received.id || back.id == derived);
                prop_assert_eq!(back.header(headers::DLQ_REASON), Some("poison"));
                Ok(())
            },
        );
    }
}
