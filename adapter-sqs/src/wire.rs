//! The envelope on the wire: an SQS message body and at most 10 message attributes.
//!
//! Attributes (all of data type `String`), after the CloudEvents HTTP binary-mode names:
//!
//! | attribute | envelope |
//! |---|---|
//! | `ce-specversion` | `1.0` |
//! | `ce-id` | `id` |
//! | `ce-source` | the configured source |
//! | `ce-type` | `kind` (left out when empty) |
//! | `ce-time` | `timestamp` (RFC 3339, milliseconds) |
//! | `ce-correlationid` | `correlation_id` |
//! | `traceparent`, `tracestate` | W3C trace context headers, if any |
//! | `ce-causationid` | `causation_id`, if any |
//! | `ce-partitionkey` | `key`, if any |
//! | `content-type` | `content_type`, if any |
//! | any other name | a header |
//! | `bus-packed` | a JSON object of the attributes that did not fit |
//! | `bus-body-encoding` | `base64` (binary payload) or `empty` (empty payload) |
//! | `bus-reply-to` | the reply queue URL of a request |
//! | `bus-not-before` | when a delayed message is due (Unix milliseconds) |
//!
//! SQS allows 10 attributes: the required ones take their own; the optional ones (trace
//! context, causation id, key, content type, then the other headers by name) take the rest in
//! that order, and when they are more than the slots left, the last slot holds `bus-packed`
//! with the remainder. Attributes whose name or value SQS would refuse (other characters, an
//! empty value), required ones included, always go to `bus-packed`. A header whose name is one
//! of the names above, or starts with `ce-` or `bus-header-`, travels as `bus-header-<name>`
//! (and only such a `bus-header-<name>` is read back as `<name>`).
//! Builds of `bus` before issue 17 wrote the extensions without the `ce-` prefix (`correlationid`,
//! `causationid`, `partitionkey`): those names are still read, and still escaped as header
//! names, so that messages written then decode the same.
//! An envelope with an empty id or correlation id is refused: a reader takes a missing or
//! empty id for the SQS message id.
//!
//! The body is the payload when it is non-empty UTF-8 text of characters SQS accepts; else
//! it is base64 (standard alphabet, padded) with `bus-body-encoding: base64`, or a
//! placeholder with `bus-body-encoding: empty` (SQS refuses empty bodies).
//!
//! Decoding never fails: what cannot be read (a `ce-specversion` `bus` does not read,
//! `bus-packed` that is not a JSON object of strings, a `bus-body-encoding` that is unknown or
//! does not match the body) makes the message undecodable, with the raw body as payload and the
//! attributes kept as headers, for the consumer to dead-letter.

use std::collections::BTreeMap;
use std::time::SystemTime;

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use base64::Engine as _;
use bus_core::{headers, Envelope, Error, ErrorKind, Headers, MessageId, Result};
use bytes::Bytes;

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
/// The correlation id (CloudEvents extension `correlationid`).
pub const CORRELATION_ID: &str = "ce-correlationid";
/// The causation id (CloudEvents extension `causationid`).
pub const CAUSATION_ID: &str = "ce-causationid";
/// The ordering key (CloudEvents extension `partitionkey`).
pub const PARTITION_KEY: &str = "ce-partitionkey";
/// The names of the three extensions above as builds before issue 17 wrote them, without
/// the `ce-` prefix of the other CloudEvents attributes: read when the prefixed name is absent.
const UNPREFIXED_CORRELATION_ID: &str = "correlationid";
const UNPREFIXED_CAUSATION_ID: &str = "causationid";
const UNPREFIXED_PARTITION_KEY: &str = "partitionkey";
/// The payload's media type.
pub const CONTENT_TYPE: &str = "content-type";
/// A JSON object of the attributes that did not fit in SQS's 10.
pub const PACKED: &str = "bus-packed";
/// `base64` when the body is the base64 of a binary payload, `empty` for an empty one.
pub const BODY_ENCODING: &str = "bus-body-encoding";
/// The reply queue URL of a request.
pub const REPLY_TO: &str = "bus-reply-to";
/// When a delayed message is due, in milliseconds since the Unix epoch: written by
/// `publish_delayed` (always: SNS has no delay) and `send_delayed` (when the delay is longer
/// than SQS's 15 minutes of `DelaySeconds`). A receiver that gets the message earlier sends a
/// copy back to the queue with `DelaySeconds` and deletes it, unseen by the consumer. A value
/// that is not a number of milliseconds (a foreign client's) is not honoured: the message is
/// delivered at once, the attribute kept as a header.
pub const NOT_BEFORE: &str = "bus-not-before";
/// On FIFO queues, the identity of a dead letter (the SQS message id of the message it was
/// made from), written when it is dead-lettered. A message carrying it (a dead letter, or one
/// sent back by a redrive, which keeps it) is deduplicated by envelope id and this value
/// together, so SQS does not drop it as a copy of the original within its 5-minute window.
pub const DEAD_LETTER_ID: &str = "bus-dead-letter-id";
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
    UNPREFIXED_CORRELATION_ID,
    UNPREFIXED_CAUSATION_ID,
    UNPREFIXED_PARTITION_KEY,
    CONTENT_TYPE,
    PACKED,
    BODY_ENCODING,
    REPLY_TO,
    NOT_BEFORE,
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
///
/// # Errors
/// [`ErrorKind::Serialization`] for an empty id or correlation id (a receiver would read
/// another id), [`ErrorKind::PayloadTooLarge`] over `max_bytes`.
pub(crate) fn encode(
    envelope: &Envelope,
    source: &str,
    extra: &[(&str, &str)],
    max_bytes: usize,
) -> Result<Wire> {
    for (what, value) in [
        ("id", envelope.id.as_str()),
        ("correlation id", envelope.correlation_id.as_str()),
    ] {
        if value.is_empty() {
            return Err(Error::new(
                ErrorKind::Serialization,
                format!(
                    "message {} has an empty {what}, which SQS cannot carry: a receiver reads a \
                     missing or empty one as another id",
                    envelope.id
                ),
            ));
        }
    }
    let wire = build(envelope, source, extra);
    let size = wire.size();
    if size > max_bytes {
        return Err(Error::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "message {} is {size} bytes on the wire (body and attributes), over the limit \
                 of {max_bytes}",
                headers::shorten(envelope.id.as_str(), 128)
            ),
        ));
    }
    Ok(wire)
}

/// The wire form of `envelope`, whatever its size.
fn build(envelope: &Envelope, source: &str, extra: &[(&str, &str)]) -> Wire {
    let mut required: Vec<(String, String)> = vec![
        (CE_SPECVERSION.into(), "1.0".into()),
        (CE_ID.into(), envelope.id.to_string()),
        (CE_SOURCE.into(), non_empty(source, "bus")),
    ];
    // An empty kind is left out (SQS refuses empty values); a reader's default is empty.
    if !envelope.kind.is_empty() {
        required.push((CE_TYPE.into(), envelope.kind.clone()));
    }
    required.push((CE_TIME.into(), headers::format_time(envelope.timestamp)));
    required.push((CORRELATION_ID.into(), envelope.correlation_id.to_string()));
    for (name, value) in extra {
        required.push(((*name).into(), (*value).into()));
    }
    let body = match std::str::from_utf8(&envelope.payload) {
        _ if envelope.payload.is_empty() => {
            required.push((BODY_ENCODING.into(), "empty".into()));
            EMPTY_BODY.to_owned()
        }
        Ok(text) if text.chars().all(allowed_char) => text.to_owned(),
        _ => {
            required.push((BODY_ENCODING.into(), "base64".into()));
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

    // Required values SQS would refuse (an id with control characters, …) travel packed.
    let (fixed, mut forced): (Vec<_>, Vec<_>) =
        required.into_iter().partition(|(_, v)| valid_value(v));
    let free = MAX_ATTRIBUTES - fixed.len();
    let (valid, invalid): (Vec<_>, Vec<_>) = candidates
        .into_iter()
        .partition(|(n, v)| valid_name(n) && valid_value(v));
    forced.extend(invalid);
    let mut attributes = fixed;
    if forced.is_empty() && valid.len() <= free {
        attributes.extend(valid);
    } else {
        let mut valid = valid.into_iter();
        attributes.extend(valid.by_ref().take(free - 1));
        let packed: BTreeMap<String, String> = valid.chain(forced).collect();
        attributes.push((PACKED.into(), pack(&packed)));
    }
    Wire { body, attributes }
}

/// `packed` as JSON made only of characters SQS accepts: serde_json escapes control
/// characters, and U+FFFE and U+FFFF are escaped here.
fn pack(packed: &BTreeMap<String, String>) -> String {
    let json = serde_json::to_string(packed).unwrap_or_else(|_| "{}".to_owned());
    if json.contains(['\u{fffe}', '\u{ffff}']) {
        json.replace('\u{fffe}', "\\ufffe")
            .replace('\u{ffff}', "\\uffff")
    } else {
        json
    }
}

/// A message attribute as SQS delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AttributeValue {
    /// `String`, `Number` and custom types based on them (`Number.int`, `String.x`).
    Text(String),
    /// `Binary` and custom types based on it.
    Binary(Vec<u8>),
}

/// A received message as SQS delivered it.
#[derive(Debug, Clone)]
pub(crate) struct Received<'a> {
    pub(crate) body: &'a str,
    pub(crate) attributes: Vec<(String, AttributeValue)>,
    /// SQS's message id, the same on every redelivery.
    pub(crate) message_id: &'a str,
    /// SQS's `SentTimestamp`, if it gave a readable one.
    pub(crate) sent: Option<SystemTime>,
}

impl<'a> Received<'a> {
    /// What `message` carries, with every message attribute whatever its data type.
    pub(crate) fn from_message(message: &'a Message) -> Self {
        let attributes = message
            .message_attributes()
            .map(|attrs| {
                attrs
                    .iter()
                    .map(|(name, value)| {
                        let text = || value.string_value().map(|s| AttributeValue::Text(s.into()));
                        let binary = || {
                            value
                                .binary_value()
                                .map(|b| AttributeValue::Binary(b.as_ref().to_vec()))
                        };
                        let read = if value.data_type().starts_with("Binary") {
                            binary().or_else(text)
                        } else {
                            text().or_else(binary)
                        };
                        let read = read.unwrap_or_else(|| AttributeValue::Text(String::new()));
                        (name.clone(), read)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let sent = message
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
            .and_then(|millis| millis.parse::<i64>().ok())
            .and_then(headers::time_from_unix_millis);
        Self {
            body: message.body().unwrap_or_default(),
            attributes,
            message_id: message.message_id().unwrap_or_default(),
            sent,
        }
    }

    /// The id of a message that names none: SQS's message id, or (should SQS give none) a
    /// hash of the body and attributes. Both are the same on every redelivery.
    fn fallback_id(&self) -> MessageId {
        if !self.message_id.is_empty() {
            return MessageId::from(self.message_id);
        }
        let mut sorted: Vec<&(String, AttributeValue)> = self.attributes.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut parts: Vec<&[u8]> = vec![self.body.as_bytes()];
        for (name, value) in sorted {
            parts.push(name.as_bytes());
            parts.push(match value {
                AttributeValue::Text(text) => text.as_bytes(),
                AttributeValue::Binary(bytes) => bytes,
            });
        }
        MessageId::derived(&parts)
    }
}

/// A message received: the envelope, the wire-only attributes (`bus-reply-to`), and why it
/// cannot be read, if it cannot.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) envelope: Envelope,
    pub(crate) reply_to: Option<String>,
    pub(crate) undecodable: Option<String>,
}

/// Decodes a received message; never fails (see the module docs). Lenient where the message
/// is only incomplete: a missing or empty id is the SQS message id, a missing or empty
/// correlation id the id, a missing or unreadable `ce-time` the time SQS got the message (the
/// unreadable value kept in [`headers::RAW_TIME`]).
pub(crate) fn decode(received: Received<'_>) -> Decoded {
    let fallback_id = received.fallback_id();
    let received_at = received.sent.unwrap_or_else(SystemTime::now);
    let body = received.body;
    let mut problems: Vec<String> = Vec::new();
    // Wire attributes that could not be read, kept for the dead letter.
    let mut kept = Headers::new();
    // Sorted, so that what a forged message makes of colliding names is the same on every
    // redelivery (SQS hands the attributes out in no particular order).
    let mut attributes: BTreeMap<String, String> = BTreeMap::new();
    let mut binary: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (name, value) in received.attributes {
        match value {
            AttributeValue::Text(text) => {
                insert_attribute(&mut attributes, name, text);
            }
            AttributeValue::Binary(bytes) => match String::from_utf8(bytes) {
                Ok(text) => {
                    insert_attribute(&mut attributes, name, text);
                }
                Err(e) => {
                    binary.insert(name, e.into_bytes());
                }
            },
        }
    }
    if let Some(packed) = attributes.remove(PACKED) {
        match serde_json::from_str::<BTreeMap<String, String>>(&packed) {
            Ok(entries) => {
                for (name, value) in entries {
                    insert_attribute(&mut attributes, name, value);
                }
            }
            Err(e) => {
                problems.push(format!(
                    "attribute `{PACKED}` is not a JSON object of strings ({})",
                    headers::shorten(&e.to_string(), 160)
                ));
                kept.insert(PACKED.into(), packed);
            }
        }
    }
    let raw_body = || Bytes::copy_from_slice(body.as_bytes());
    let payload = match attributes.remove(BODY_ENCODING) {
        None => raw_body(),
        Some(encoding) => {
            let decoded = match encoding.as_str() {
                "base64" => base64::engine::general_purpose::STANDARD
                    .decode(body.trim())
                    .map(Bytes::from)
                    .map_err(|e| format!("the body is marked `{BODY_ENCODING}: base64` but {e}")),
                "empty" if body == EMPTY_BODY => Ok(Bytes::new()),
                "empty" => Err(format!(
                    "the body is marked `{BODY_ENCODING}: empty` but is not `{EMPTY_BODY}`"
                )),
                other => Err(format!(
                    "unknown `{BODY_ENCODING}` `{}` (bus writes `base64` and `empty`)",
                    headers::shorten(other, 64)
                )),
            };
            decoded.unwrap_or_else(|problem| {
                problems.push(problem);
                kept.insert(BODY_ENCODING.into(), encoding);
                raw_body()
            })
        }
    };
    let specversion = attributes.remove(CE_SPECVERSION);
    if let Some(Err(problem)) = specversion.as_deref().map(headers::check_specversion) {
        problems.push(problem);
    }
    let source = attributes.remove(CE_SOURCE);
    let id = attributes
        .remove(CE_ID)
        .filter(|id| !id.is_empty())
        .map_or(fallback_id, MessageId::from);
    let correlation_id = attributes
        .remove(CORRELATION_ID)
        .filter(|id| !id.is_empty())
        .map_or_else(|| id.clone(), MessageId::from);
    let mut raw_time = None;
    let timestamp = match attributes.remove(CE_TIME) {
        None => received_at,
        Some(text) => headers::parse_time(&text).unwrap_or_else(|_| {
            raw_time = Some(text);
            received_at
        }),
    };
    let mut envelope = Envelope::new(attributes.remove(CE_TYPE).unwrap_or_default(), payload)
        .with_id(id)
        .with_correlation_id(correlation_id)
        .with_timestamp(timestamp);
    envelope.causation_id = attributes.remove(CAUSATION_ID).map(MessageId::from);
    envelope.key = attributes.remove(PARTITION_KEY);
    envelope.content_type = attributes.remove(CONTENT_TYPE);
    let reply_to = attributes.remove(REPLY_TO);
    // Wire-only when it is ours (the receive loop honoured it); a foreign value stays a header.
    if attributes
        .get(NOT_BEFORE)
        .is_some_and(|value| parse_not_before(value).is_some())
    {
        attributes.remove(NOT_BEFORE);
    }
    let mut headers = Headers::new();
    for (name, value) in attributes {
        headers.insert(unescape(name), value);
    }
    for (name, bytes) in binary {
        headers::insert_bytes(&mut headers, unescape(name).as_bytes(), &bytes);
    }
    if let Some(raw) = raw_time {
        headers.insert(headers::RAW_TIME.into(), raw);
    }
    let undecodable = if problems.is_empty() {
        None
    } else {
        // What the message said about itself goes to the dead letter with it.
        kept.extend(
            [(CE_SPECVERSION, specversion), (CE_SOURCE, source)]
                .into_iter()
                .filter_map(|(name, value)| Some((name.to_owned(), value?))),
        );
        headers.extend(kept);
        Some(problems.join("; "))
    };
    envelope.headers = headers;
    Decoded {
        envelope,
        reply_to,
        undecodable,
    }
}

/// The value of [`NOT_BEFORE`] for a message due at `due`: milliseconds since the Unix epoch.
/// `None` for a moment before the epoch or too far to write.
pub(crate) fn not_before_value(due: SystemTime) -> Option<String> {
    let millis = due.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis();
    u64::try_from(millis).ok().map(|m| m.to_string())
}

/// The moment a [`NOT_BEFORE`] value names; `None` unless it is a plain number of
/// milliseconds since the Unix epoch (at most 20 digits, no sign).
pub(crate) fn parse_not_before(value: &str) -> Option<SystemTime> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let millis = value.parse::<u64>().ok()?;
    SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(millis))
}

/// When `message` is due, if it carries a [`NOT_BEFORE`] `bus` can read (a `String` or
/// `Number` attribute of Unix milliseconds).
pub(crate) fn not_before(message: &Message) -> Option<SystemTime> {
    message
        .message_attributes()?
        .get(NOT_BEFORE)?
        .string_value()
        .and_then(parse_not_before)
}

/// Keeps a received attribute, the unprefixed old name of an extension as its `ce-` name
/// (the prefixed one wins when a message carries both, whatever their order).
fn insert_attribute(attributes: &mut BTreeMap<String, String>, name: String, value: String) {
    let prefixed = match name.as_str() {
        UNPREFIXED_CORRELATION_ID => CORRELATION_ID,
        UNPREFIXED_CAUSATION_ID => CAUSATION_ID,
        UNPREFIXED_PARTITION_KEY => PARTITION_KEY,
        _ => {
            attributes.insert(name, value);
            return;
        }
    };
    attributes.entry(prefixed.to_owned()).or_insert(value);
}

/// The header name of an attribute: `bus-header-<name>` is `<name>` only when `encode` would
/// have escaped `<name>`, so that escaping is one-to-one.
fn unescape(name: String) -> String {
    match name.strip_prefix(HEADER_ESCAPE) {
        Some(original) if is_reserved_header(original) => original.to_owned(),
        _ => name,
    }
}

/// How much of the reason a dead letter keeps when values have to be shortened.
const CUT_REASON: usize = 4096;
/// How much of any other value a dead letter keeps when values have to be shortened.
const CUT_VALUE: usize = 1024;
/// The longest [`headers::TRUNCATED`] note: past it, the rest of the list is only counted.
const NOTE_BUDGET: usize = 2048;
/// The last resort shortens every value to this, then to half of it, …
const LAST_RESORT: usize = 512;
/// … down to this.
const LAST_RESORT_FLOOR: usize = 8;

/// Encodes a dead letter so that SQS takes it whatever the message carried, since a message
/// that can be neither handled nor dead-lettered would come back forever. Over `max_bytes` it
/// is cut, measured again after each step, until it fits:
///
/// 1. values over 1 KiB (header values, id, kind, correlation and causation ids, key, content
///    type; the reason over 4 KiB) are shortened to that, the largest first;
/// 2. application headers are dropped, the largest first; never those
///    [`mark`](bus_core::middleware::dead_letter::mark) writes, the trace context,
///    `bus-raw-time` and `bus-binary-headers`;
/// 3. the payload is cut;
/// 4. as a last resort every value left, those headers and the source included, is shortened
///    to 512 bytes, then 256, and so on, which fits in [`SQS_MIN_MESSAGE_BYTES`].
///
/// [`headers::TRUNCATED`] then lists what was cut. Returns the envelope as sent.
///
/// [`SQS_MIN_MESSAGE_BYTES`]: crate::SQS_MIN_MESSAGE_BYTES
pub(crate) fn encode_dead_letter(
    mut dead: Envelope,
    source: &str,
    max_bytes: usize,
) -> (Envelope, Wire) {
    if dead.id.as_str().is_empty() {
        dead.id = MessageId::derived(&[&dead.payload]);
    }
    if dead.correlation_id.as_str().is_empty() {
        dead.correlation_id = dead.id.clone();
    }
    let mut source = source.to_owned();
    let mut cut = Cut::new(dead.headers.remove(headers::TRUNCATED));
    let mut stage = Stage::Oversized;
    loop {
        let candidate = cut.noted(&dead);
        let wire = build(&candidate, &source, &[]);
        let over = wire.size().saturating_sub(max_bytes);
        if over == 0 {
            return (candidate, wire);
        }
        stage = match stage {
            Stage::Oversized if shorten_oversized(&mut dead, &mut cut, over) => stage,
            Stage::Oversized => Stage::Headers,
            Stage::Headers if drop_headers(&mut dead, &mut cut, over) => stage,
            Stage::Headers => Stage::Payload,
            Stage::Payload if cut_payload(&mut dead, &mut cut, &wire, over) => stage,
            Stage::Payload => Stage::LastResort(LAST_RESORT),
            Stage::LastResort(max) if max >= LAST_RESORT_FLOOR => {
                last_resort(&mut dead, &mut source, &mut cut, max);
                Stage::LastResort(max / 2)
            }
            // Nothing left to cut: only a limit far below the minimum gets here.
            Stage::LastResort(_) => return (candidate, wire),
        };
    }
}

/// The steps of [`encode_dead_letter`].
#[derive(Debug, Clone, Copy)]
enum Stage {
    Oversized,
    Headers,
    Payload,
    /// Every value cut to this many bytes.
    LastResort(usize),
}

/// Headers a dead letter keeps until the last resort: those `mark` writes (not foreign ones
/// that merely start with `bus-dlq-`), the trace context, and those that say how to read the
/// rest.
fn is_protected(name: &str) -> bool {
    headers::KEPT_WHEN_CUT.contains(&name) || name == headers::TRUNCATED || name == DEAD_LETTER_ID
}

/// At most `max` bytes of `text`, `…` included, when it is longer.
fn cut_to(text: &str, max: usize) -> Option<String> {
    (text.len() > max)
        .then(|| headers::shorten(text, max.saturating_sub('…'.len_utf8())).into_owned())
}

/// Step 1: shortens values over their limit, the largest first, until about `over` bytes are
/// freed. `false` when none is over.
fn shorten_oversized(dead: &mut Envelope, cut: &mut Cut, over: usize) -> bool {
    let mut parts: Vec<(usize, Part)> = Field::ALL
        .into_iter()
        .filter_map(|field| {
            let len = field.get(dead)?.len();
            (len > CUT_VALUE).then(|| (len - CUT_VALUE, Part::Field(field)))
        })
        .collect();
    for (name, value) in &dead.headers {
        let keep = match name.as_str() {
            headers::DLQ_REASON => CUT_REASON,
            name if is_protected(name) => continue,
            _ => CUT_VALUE,
        };
        if value.len() > keep {
            parts.push((value.len() - keep, Part::Header(name.clone(), keep)));
        }
    }
    if parts.is_empty() {
        return false;
    }
    parts.sort_unstable_by(|a, b| b.cmp(a));
    let mut freed = 0;
    for (size, part) in parts {
        if freed >= over {
            break;
        }
        freed += size;
        match part {
            Part::Field(field) => field.shorten(dead, CUT_VALUE, cut),
            Part::Header(name, keep) => cut.shorten_header(dead, &name, keep),
        }
    }
    true
}

/// Step 2: drops application headers, the largest first, until about `over` bytes are freed.
/// `false` when none is left.
fn drop_headers(dead: &mut Envelope, cut: &mut Cut, over: usize) -> bool {
    let mut droppable: Vec<(usize, String)> = dead
        .headers
        .iter()
        .filter(|(name, _)| !is_protected(name))
        .map(|(name, value)| (name.len() + value.len(), name.clone()))
        .collect();
    if droppable.is_empty() {
        return false;
    }
    droppable.sort_unstable_by(|a, b| b.cmp(a));
    let mut freed = 0;
    for (size, name) in droppable {
        if freed >= over {
            break;
        }
        freed += size;
        dead.headers.remove(&name);
        cut.dropped(&name);
    }
    true
}

/// Step 3: cuts about `over` bytes of the payload. `false` when it is empty.
fn cut_payload(dead: &mut Envelope, cut: &mut Cut, wire: &Wire, over: usize) -> bool {
    if dead.payload.is_empty() {
        return false;
    }
    let base64 = wire
        .attributes
        .iter()
        .any(|(n, v)| n == BODY_ENCODING && v == "base64");
    let drop = if base64 { over / 4 * 3 + 3 } else { over };
    let mut keep = dead.payload.len().saturating_sub(drop.max(1));
    if let Ok(text) = std::str::from_utf8(&dead.payload) {
        while !text.is_char_boundary(keep) {
            keep -= 1;
        }
    }
    cut.payload.get_or_insert(dead.payload.len());
    dead.payload = dead.payload.slice(..keep);
    true
}

/// Step 4: every value left, protected headers and the source included, cut to `max` bytes.
fn last_resort(dead: &mut Envelope, source: &mut String, cut: &mut Cut, max: usize) {
    for field in Field::ALL {
        field.shorten(dead, max, cut);
    }
    let names: Vec<String> = dead.headers.keys().cloned().collect();
    for name in names {
        cut.shorten_header(dead, &name, max);
    }
    if let Some(short) = cut_to(source, max) {
        *source = short;
        cut.add("source".to_owned());
    }
    cut.budget = max;
}

/// Something step 1 can shorten.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Field(Field),
    /// A header, and how much of it to keep.
    Header(String, usize),
}

/// An envelope field a dead letter may have to shorten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    Id,
    Kind,
    CorrelationId,
    CausationId,
    Key,
    ContentType,
}

impl Field {
    const ALL: [Self; 6] = [
        Self::Id,
        Self::Kind,
        Self::CorrelationId,
        Self::CausationId,
        Self::Key,
        Self::ContentType,
    ];

    /// Its item in the [`headers::TRUNCATED`] list (`id`, `kind` and `key` are the common ones).
    fn noted(self) -> &'static str {
        match self {
            Self::Id => "id",
            Self::Kind => "kind",
            Self::CorrelationId => "correlation-id",
            Self::CausationId => "causation-id",
            Self::Key => "key",
            Self::ContentType => "content-type",
        }
    }

    fn get(self, envelope: &Envelope) -> Option<&str> {
        match self {
            Self::Id => Some(envelope.id.as_str()),
            Self::Kind => Some(&envelope.kind),
            Self::CorrelationId => Some(envelope.correlation_id.as_str()),
            Self::CausationId => envelope.causation_id.as_ref().map(MessageId::as_str),
            Self::Key => envelope.key.as_deref(),
            Self::ContentType => envelope.content_type.as_deref(),
        }
    }

    /// Cuts it to `max` bytes if it is longer, noting it in `cut`.
    fn shorten(self, envelope: &mut Envelope, max: usize, cut: &mut Cut) {
        let Some(short) = self.get(envelope).and_then(|value| cut_to(value, max)) else {
            return;
        };
        match self {
            Self::Id => envelope.id = short.into(),
            Self::Kind => envelope.kind = short,
            Self::CorrelationId => envelope.correlation_id = short.into(),
            Self::CausationId => envelope.causation_id = Some(short.into()),
            Self::Key => envelope.key = Some(short),
            Self::ContentType => envelope.content_type = Some(short),
        }
        cut.add(self.noted().to_owned());
    }
}

/// What [`encode_dead_letter`] cut, for the [`headers::TRUNCATED`] note.
#[derive(Debug)]
struct Cut {
    /// The note the message arrived with: its items come first.
    earlier: Option<String>,
    /// `header:<name>`, `value:<name>`, `id`, …, in the order they were cut.
    items: Vec<String>,
    /// The payload's size before it was cut.
    payload: Option<usize>,
    /// The longest note; items past it are only counted (`more:<n>`).
    budget: usize,
}

impl Cut {
    fn new(earlier: Option<String>) -> Self {
        Self {
            earlier,
            items: Vec::new(),
            payload: None,
            budget: NOTE_BUDGET,
        }
    }

    fn add(&mut self, item: String) {
        if !self.items.contains(&item) {
            self.items.push(item);
        }
    }

    fn shorten_header(&mut self, dead: &mut Envelope, name: &str, max: usize) {
        // A base64 value (see `bus-binary-headers`) is cut to whole groups, so it still decodes.
        let base64 = dead
            .headers
            .get(name)
            .is_some_and(|value| value.len() > max && value.is_ascii())
            && headers::binary_header_names(&dead.headers)
                .iter()
                .any(|n| n == name);
        let Some(value) = dead.headers.get_mut(name) else {
            return;
        };
        let short = if base64 {
            Some(value[..max / 4 * 4].to_owned())
        } else {
            cut_to(value, max)
        };
        if let Some(short) = short {
            *value = short;
            self.add(format!("value:{}", escape_listed(name)));
        }
    }

    fn dropped(&mut self, name: &str) {
        let name = escape_listed(name);
        let shortened = format!("value:{name}");
        self.items.retain(|item| *item != shortened);
        self.items.push(format!("header:{name}"));
    }

    /// `dead` with the note, once anything was cut (before, with the note it arrived with).
    fn noted(&self, dead: &Envelope) -> Envelope {
        let mut dead = dead.clone();
        let untouched = self.items.is_empty() && self.payload.is_none();
        if untouched && self.budget == NOTE_BUDGET {
            if let Some(earlier) = &self.earlier {
                dead.headers
                    .insert(headers::TRUNCATED.into(), earlier.clone());
            }
            return dead;
        }
        let payload = self
            .payload
            .map(|before| format!("payload:{before}->{}", dead.payload.len()));
        let items = (self.earlier.iter().flat_map(|earlier| earlier.split(',')))
            .chain(payload.as_deref())
            .chain(self.items.iter().map(String::as_str))
            .filter(|item| !item.is_empty());
        let mut note = String::new();
        let mut more = 0;
        for item in items {
            if more == 0 && note.len() + 1 + item.len() <= self.budget {
                if !note.is_empty() {
                    note.push(',');
                }
                note.push_str(item);
            } else {
                more += 1;
            }
        }
        if more > 0 {
            if !note.is_empty() {
                note.push(',');
            }
            note.push_str(&format!("more:{more}"));
        }
        if !note.is_empty() {
            dead.headers.insert(headers::TRUNCATED.into(), note);
        }
        dead
    }
}

/// A header name as a [`headers::TRUNCATED`] item: `%` and `,` escaped, as in
/// `bus-binary-headers`.
fn escape_listed(name: &str) -> String {
    name.replace('%', "%25").replace(',', "%2C")
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
    use crate::SQS_MIN_MESSAGE_BYTES;
    use bus_core::conformance::arbitrary;
    use bus_core::middleware::dead_letter::{mark, DeadLetterInfo};
    use proptest::prelude::*;

    const LIMIT: usize = 262_144;

    fn received(wire: &Wire) -> Received<'_> {
        Received {
            body: &wire.body,
            attributes: wire
                .attributes
                .iter()
                .map(|(n, v)| (n.clone(), AttributeValue::Text(v.clone())))
                .collect(),
            message_id: "sqs-id",
            sent: None,
        }
    }

    fn raw<'a>(body: &'a str, attributes: &[(&str, &str)]) -> Received<'a> {
        Received {
            body,
            attributes: attributes
                .iter()
                .map(|(n, v)| ((*n).to_owned(), AttributeValue::Text((*v).to_owned())))
                .collect(),
            message_id: "sqs-id",
            sent: None,
        }
    }

    /// What SQS would refuse in a message `encode` produced.
    fn refusal(wire: &Wire) -> Option<String> {
        if wire.attributes.len() > MAX_ATTRIBUTES {
            return Some(format!("{} attributes", wire.attributes.len()));
        }
        if let Some((n, v)) = wire
            .attributes
            .iter()
            .find(|(n, v)| !valid_name(n) || !valid_value(v))
        {
            return Some(format!("attribute {n:?} = {v:?}"));
        }
        if wire.body.is_empty() || !wire.body.chars().all(allowed_char) {
            return Some(format!("body {:?}", wire.body));
        }
        None
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
        let wire = encode(&env, "svc", &[], LIMIT).unwrap();
        assert!(wire.attributes.len() <= MAX_ATTRIBUTES);
        let back = decode(received(&wire)).envelope;
        assert_eq!(back, env.with_timestamp(back.timestamp));
    }

    #[test]
    fn binary_and_empty_payloads_round_trip() {
        for payload in [vec![0u8, 159, 146, 150, 255], vec![], b"\x01ctl".to_vec()] {
            let env = Envelope::new("bin", payload.clone());
            let wire = encode(&env, "svc", &[], LIMIT).unwrap();
            assert!(!wire.body.is_empty());
            let back = decode(received(&wire)).envelope;
            assert_eq!(back.payload.as_ref(), payload.as_slice());
        }
    }

    #[test]
    fn oversize_counts_attributes() {
        let env = Envelope::new("big", vec![b'x'; LIMIT]);
        let err = encode(&env, "svc", &[], LIMIT).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    }

    /// Builds before issue 17 wrote the extensions without `ce-`: such messages decode the same,
    /// a header of one of those names still round-trips, and the prefixed name wins.
    #[test]
    fn unprefixed_extension_names_of_old_writers_still_decode() {
        let old = decode(raw(
            "{}",
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "m-1"),
                ("ce-source", "bus"),
                ("ce-type", "order.placed"),
                ("correlationid", "c-1"),
                ("causationid", "p-1"),
                ("partitionkey", "k-1"),
            ],
        ));
        assert_eq!(old.undecodable, None);
        let envelope = old.envelope;
        assert_eq!(envelope.correlation_id.as_str(), "c-1");
        assert_eq!(
            envelope.causation_id.as_ref().map(MessageId::as_str),
            Some("p-1")
        );
        assert_eq!(envelope.key.as_deref(), Some("k-1"));
        assert!(envelope.headers.is_empty(), "{:?}", envelope.headers);

        let both = decode(raw(
            "{}",
            &[
                ("ce-id", "m-1"),
                ("correlationid", "old"),
                ("ce-correlationid", "new"),
            ],
        ));
        assert_eq!(both.envelope.correlation_id.as_str(), "new");
        assert!(both.envelope.headers.is_empty());

        let env = Envelope::new("k", "{}").with_header("correlationid", "a header");
        let wire = encode(&env, "svc", &[], LIMIT).unwrap();
        assert!(wire
            .attributes
            .iter()
            .any(|(n, _)| n == "bus-header-correlationid"));
        let back = decode(received(&wire)).envelope;
        assert_eq!(back.header("correlationid"), Some("a header"));
        assert_eq!(back.correlation_id, env.correlation_id);
    }

    #[test]
    fn bare_messages_get_defaults() {
        let d = decode(raw("hello", &[]));
        assert_eq!(d.envelope.id.as_str(), "sqs-id");
        assert_eq!(d.envelope.correlation_id.as_str(), "sqs-id");
        assert_eq!(d.envelope.payload.as_ref(), b"hello");
        assert_eq!(d.undecodable, None);
    }

    /// Before: an empty kind was sent as `-` and read back as `-`; an id with a control
    /// character went out as an attribute SQS refuses.
    #[test]
    fn encode_changes_nothing_it_accepts_and_refuses_empty_ids() {
        let env = Envelope::new("", "x")
            .with_id("id\u{1}with control")
            .with_correlation_id("c\u{ffff}");
        let wire = encode(&env, "svc", &[], LIMIT).unwrap();
        assert_eq!(refusal(&wire), None);
        let back = decode(received(&wire)).envelope;
        assert_eq!(back, env.clone().with_timestamp(back.timestamp));
        let err = encode(&env.clone().with_id(""), "svc", &[], LIMIT).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Serialization);
        let err = encode(&env.with_correlation_id(""), "svc", &[], LIMIT).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Serialization);
    }

    /// Before: `decode` returned an error for these, and the message came back after every
    /// visibility timeout.
    #[test]
    fn malformed_bus_attributes_are_undecodable_with_the_raw_message_kept() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: [Case<'_>; 6] = [
            ("body", &[(PACKED, "not json")], PACKED),
            ("body", &[(PACKED, "[1,2]")], PACKED),
            ("body", &[(PACKED, r#"{"a":1}"#)], PACKED),
            (
                "%%% not base64",
                &[(BODY_ENCODING, "base64")],
                BODY_ENCODING,
            ),
            ("body", &[(BODY_ENCODING, "gzip")], BODY_ENCODING),
            ("body", &[(BODY_ENCODING, "empty")], BODY_ENCODING),
        ];
        for (body, attributes, kept) in cases {
            let mut all = vec![(CE_ID, "the-id"), ("tenant", "acme")];
            all.extend_from_slice(attributes);
            let d = decode(raw(body, &all));
            let reason = d.undecodable.expect("undecodable");
            assert!(reason.contains(kept), "{reason}");
            assert_eq!(d.envelope.id.as_str(), "the-id");
            assert_eq!(d.envelope.payload.as_ref(), body.as_bytes());
            assert_eq!(d.envelope.header(kept), Some(attributes[0].1));
            assert_eq!(d.envelope.header("tenant"), Some("acme"));
            // Its dead letter keeps them too.
            let (dead, wire) = encode_dead_letter(d.envelope.clone(), "svc", LIMIT);
            assert_eq!(dead, d.envelope);
            let back = decode(received(&wire));
            assert_eq!(back.undecodable, None);
            assert_eq!(
                back.envelope,
                dead.clone().with_timestamp(back.envelope.timestamp)
            );
        }
        let d = decode(raw("x", &[(CE_SPECVERSION, "9.9"), (CE_SOURCE, "/far")]));
        assert!(d.undecodable.unwrap().contains("9.9"));
        assert_eq!(d.envelope.header(CE_SPECVERSION), Some("9.9"));
        assert_eq!(d.envelope.header(CE_SOURCE), Some("/far"));
    }

    #[test]
    fn odd_times_and_typed_attributes_are_read_leniently() {
        for time in [
            "1969-12-31T23:59:59Z",
            "+10000-01-01T00:00:00Z",
            "yesterday",
            "0",
        ] {
            let d = decode(raw("x", &[(CE_TIME, time)]));
            assert_eq!(d.undecodable, None);
            assert_eq!(d.envelope.header(headers::RAW_TIME), Some(time));
        }
        let max = decode(raw("x", &[(CE_TIME, "9999-12-31T23:59:59.999Z")]));
        assert_eq!(max.envelope.timestamp, headers::max_time());
        let sent = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let mut r = raw("x", &[(CE_ID, "")]);
        r.sent = Some(sent);
        r.attributes
            .push(("bin".into(), AttributeValue::Binary(vec![0xff, 0])));
        r.attributes
            .push(("utf8".into(), AttributeValue::Binary(b"text".to_vec())));
        let d = decode(r).envelope;
        assert_eq!(d.timestamp, sent);
        assert_eq!(d.id.as_str(), "sqs-id");
        assert_eq!(d.header("bin"), Some("/wA="));
        assert_eq!(d.header(headers::BINARY_HEADERS), Some("bin"));
        assert_eq!(d.header("utf8"), Some("text"));
    }

    #[test]
    fn content_ids_are_stable() {
        let mut a = raw("same", &[("x", "1"), ("y", "2")]);
        a.message_id = "";
        let mut b = raw("same", &[("y", "2"), ("x", "1")]);
        b.message_id = "";
        assert_eq!(decode(a.clone()).envelope.id, decode(b).envelope.id);
        let mut c = a.clone();
        c.body = "other";
        assert_ne!(decode(a).envelope.id, decode(c).envelope.id);
    }

    /// Before: the dead letter was encoded like any message, so one over the limit (a 200 KiB
    /// binary attribute is 267 KiB in base64) failed to send, and the message came back forever.
    #[test]
    fn dead_letters_are_cut_to_fit() {
        let mut r = raw("body", &[(CE_ID, "big-one")]);
        r.attributes.push((
            "blob".into(),
            AttributeValue::Binary(vec![0xff; 200 * 1024]),
        ));
        let envelope = decode(r).envelope;
        let dead = mark(envelope, &info(&"why ".repeat(5_000)));
        let (sent, wire) = encode_dead_letter(dead, "svc", LIMIT);
        assert!(wire.size() <= LIMIT, "{}", wire.size());
        assert_eq!(refusal(&wire), None);
        assert_eq!(sent.id.as_str(), "big-one");
        let blob = sent.header("blob").unwrap();
        assert_eq!(blob.len(), 1024);
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(blob)
            .unwrap();
        assert_eq!(decoded, vec![0xff; 768]);
        assert_eq!(sent.header(headers::TRUNCATED), Some("value:blob"));
        assert_eq!(sent.header(headers::DLQ_REASON).map(str::len), Some(20_000));
        assert_eq!(sent.payload.as_ref(), b"body");
    }

    /// Before: a header named `bus-header-x` lost its prefix whatever `x` was, so a message
    /// carrying both `x` and `bus-header-x` got one value for `x`, which one depending on the
    /// order SQS listed them in.
    #[test]
    fn escaping_is_one_to_one_and_collisions_are_stable() {
        let pairs = [
            ("x", "plain"),
            ("bus-header-x", "prefixed"),
            ("ce-subject", "raw"),
            ("bus-header-ce-subject", "escaped"),
        ];
        let mut reversed = pairs;
        reversed.reverse();
        let forward = decode(raw("b", &pairs)).envelope;
        let backward = decode(raw("b", &reversed)).envelope;
        assert_eq!(forward.header("x"), Some("plain"));
        assert_eq!(forward.header("bus-header-x"), Some("prefixed"));
        assert_eq!(forward.headers, backward.headers);
        // Binary attributes are listed in the same order whatever the order received.
        let binary = |names: &[&str]| {
            let mut r = raw("b", &[]);
            for name in names {
                r.attributes
                    .push(((*name).into(), AttributeValue::Binary(vec![0xff])));
            }
            decode(r).envelope
        };
        assert_eq!(
            binary(&["a", "b"]).header(headers::BINARY_HEADERS),
            binary(&["b", "a"]).header(headers::BINARY_HEADERS),
        );
        // What bus escapes still reads back.
        let env = Envelope::new("k", "v")
            .with_header("bus-header-x", "1")
            .with_header("ce-subject", "2")
            .with_header("bus-header-ce-id", "3");
        let back = decode(received(&encode(&env, "svc", &[], LIMIT).unwrap())).envelope;
        assert_eq!(back.headers, env.headers);
    }

    /// Before: headers were dropped the largest first, so the small `bus-binary-headers` and
    /// `bus-raw-time` went while the values they describe stayed, and the note was prose.
    #[test]
    fn dead_letters_keep_the_headers_that_describe_others() {
        let mut r = raw("body", &[(CE_ID, "many"), (CE_TIME, "yesterday")]);
        r.attributes
            .push(("blob".into(), AttributeValue::Binary(vec![0xff, 0xfe])));
        let mut envelope = decode(r).envelope;
        envelope
            .headers
            .insert(headers::TRACEPARENT.into(), "00-abc-def-01".into());
        envelope
            .headers
            .insert("bus-dlq-foreign".into(), "x".repeat(40));
        for i in 0..3_000 {
            envelope.headers.insert(format!("h{i:04}"), "v".into());
        }
        let (sent, wire) = encode_dead_letter(
            mark(envelope, &info("failed")),
            "svc",
            SQS_MIN_MESSAGE_BYTES,
        );
        assert!(wire.size() <= SQS_MIN_MESSAGE_BYTES, "{}", wire.size());
        for name in [
            headers::BINARY_HEADERS,
            headers::RAW_TIME,
            headers::TRACEPARENT,
            headers::DLQ_REASON,
            headers::DLQ_ATTEMPTS,
        ] {
            assert!(sent.header(name).is_some(), "{name} dropped");
        }
        assert_eq!(sent.header("bus-dlq-foreign"), None);
        // Dropped the largest first, and all listed, the last ones only counted.
        let note = sent.header(headers::TRUNCATED).unwrap();
        assert!(
            note.starts_with("header:bus-dlq-foreign,header:blob,header:h2999,"),
            "{note}"
        );
        assert!(note.len() < 2100, "{}", note.len());
        let listed = note.split(',').filter(|i| i.starts_with("header:")).count();
        let more: usize = note.rsplit_once(",more:").unwrap().1.parse().unwrap();
        let kept = sent.headers.keys().filter(|n| n.starts_with('h')).count();
        assert_eq!(listed + more, 3_002 - kept, "{note}");
    }

    /// Before: a header over 1 KiB was dropped whole although shortening it was enough.
    #[test]
    fn dead_letters_shorten_large_values_before_dropping_headers() {
        let envelope = Envelope::new("k", "body")
            .with_header("big", "b".repeat(100_000))
            .with_header("a,b%", "c".repeat(20_000))
            .with_header("small", "s");
        let (sent, wire) = encode_dead_letter(mark(envelope, &info("failed")), "svc", 65_536);
        assert!(wire.size() <= 65_536);
        assert_eq!(sent.header("big").map(str::len), Some(1024));
        assert_eq!(sent.header("a,b%").map(str::len), Some(20_000));
        assert_eq!(sent.header("small"), Some("s"));
        assert_eq!(sent.header(headers::TRUNCATED), Some("value:big"));
        let (sent, _) = encode_dead_letter(sent, "svc", SQS_MIN_MESSAGE_BYTES);
        assert_eq!(
            sent.header(headers::TRUNCATED),
            Some("value:big,value:a%2Cb%25")
        );
    }

    /// Before: with protected values larger than the limit, the dead letter came out over it
    /// and SQS refused it, so the message came back forever.
    #[test]
    fn dead_letters_fit_at_the_minimum_whatever_they_carry() {
        let huge = "\u{1}".repeat(20_000);
        let mut envelope = Envelope::new(huge.clone(), huge.clone())
            .with_id(huge.clone())
            .with_correlation_id(huge.clone())
            .with_key(huge.clone())
            .with_content_type(huge.clone());
        envelope.causation_id = Some(huge.as_str().into());
        for name in [
            headers::TRACEPARENT,
            headers::TRACESTATE,
            headers::RAW_TIME,
            headers::BINARY_HEADERS,
            headers::TRUNCATED,
        ] {
            envelope.headers.insert(name.into(), huge.clone());
        }
        let info = DeadLetterInfo {
            reason: &huge,
            source: &huge,
            group: Some(&huge),
            attempts: u32::MAX,
            first_failure: None,
        };
        let (sent, wire) = encode_dead_letter(mark(envelope, &info), &huge, SQS_MIN_MESSAGE_BYTES);
        assert!(wire.size() <= SQS_MIN_MESSAGE_BYTES, "{}", wire.size());
        assert_eq!(refusal(&wire), None);
        assert!(sent.header(headers::DLQ_ATTEMPTS).is_some());
        assert!(sent.header(headers::TRUNCATED).unwrap().contains("more:"));
    }

    fn info(reason: &str) -> DeadLetterInfo<'_> {
        DeadLetterInfo {
            reason,
            source: "orders",
            group: Some("billing"),
            attempts: 3,
            first_failure: None,
        }
    }

    #[test]
    fn property_envelope_round_trip() {
        arbitrary::check(
            "adapter-sqs envelope_round_trip",
            256,
            arbitrary::envelope(),
            |envelope| {
                let wire = encode(&envelope, "svc", &[], usize::MAX)
                    .map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
                prop_assert_eq!(refusal(&wire), None);
                let decoded = decode(received(&wire));
                prop_assert_eq!(decoded.undecodable, None);
                prop_assert_eq!(decoded.envelope, envelope);
                Ok(())
            },
        );
    }

    fn attribute_name() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => proptest::sample::select(RESERVED.to_vec()).prop_map(str::to_owned),
            2 => arbitrary::text(),
            1 => arbitrary::text().prop_map(|t| format!("{HEADER_ESCAPE}{t}")),
        ]
    }

    fn attribute_value() -> impl Strategy<Value = AttributeValue> {
        prop_oneof![
            3 => arbitrary::text().prop_map(AttributeValue::Text),
            1 => Just(AttributeValue::Text("base64".into())),
            1 => proptest::collection::btree_map(arbitrary::text(), arbitrary::text(), 0..8)
                .prop_map(|m| AttributeValue::Text(serde_json::to_string(&m).unwrap())),
            1 => arbitrary::payload().prop_map(|b| AttributeValue::Binary(b.to_vec())),
        ]
    }

    fn raw_message() -> impl Strategy<Value = (String, Vec<(String, AttributeValue)>, String)> {
        (
            prop_oneof![
                arbitrary::text(),
                Just(EMPTY_BODY.to_owned()),
                "[A-Za-z0-9+/=]{0,40}"
            ],
            proptest::collection::vec((attribute_name(), attribute_value()), 0..12),
            prop_oneof![Just(String::new()), arbitrary::text()],
        )
    }

    #[test]
    fn property_decode_never_panics() {
        arbitrary::check(
            "adapter-sqs decode_never_panics",
            256,
            raw_message(),
            |(body, attributes, message_id)| {
                let again = attributes.clone();
                let received = Received {
                    body: &body,
                    attributes,
                    message_id: &message_id,
                    sent: None,
                };
                let decoded = decode(received.clone());
                prop_assert!(!decoded.envelope.id.as_str().is_empty());
                prop_assert!(!decoded.envelope.correlation_id.as_str().is_empty());
                // The same message again (a redelivery) gets the same id.
                let redelivered = decode(Received {
                    attributes: again,
                    ..received
                });
                prop_assert_eq!(decoded.envelope.id, redelivered.envelope.id);
                Ok(())
            },
        );
    }

    /// A value of up to 20,000 bytes, in characters that cost from 1 to 6 bytes on the wire.
    fn long_value() -> impl Strategy<Value = String> {
        prop_oneof![
            arbitrary::text(),
            ("[a-zé\u{1}]", 0..20_000usize).prop_map(|(c, n)| c.repeat(n)),
        ]
    }

    #[test]
    fn property_dead_letter_always_fits() {
        let protected = proptest::collection::vec(
            proptest::sample::select(vec![
                headers::TRACEPARENT,
                headers::TRACESTATE,
                headers::RAW_TIME,
                headers::BINARY_HEADERS,
                headers::TRUNCATED,
            ]),
            0..5,
        );
        let strategy = (
            (raw_message(), arbitrary::envelope()),
            (long_value(), long_value(), long_value()),
            proptest::collection::vec("[a-z]{100,3000}", 0..8),
            (protected, long_value()),
        );
        arbitrary::check(
            "adapter-sqs dead_letter_always_fits",
            256,
            strategy,
            |(
                ((body, attributes, message_id), envelope),
                (reason, topic, field),
                big,
                (names, value),
            )| {
                let message = Received {
                    body: &body,
                    attributes,
                    message_id: &message_id,
                    sent: None,
                };
                for mut envelope in [decode(message).envelope, envelope] {
                    for (i, value) in big.iter().enumerate() {
                        envelope.headers.insert(format!("big-{i}"), value.clone());
                    }
                    for name in &names {
                        envelope.headers.insert((*name).into(), value.clone());
                    }
                    if !field.is_empty() {
                        envelope.kind.clone_from(&field);
                        envelope.key = Some(field.clone());
                        envelope.id = field.as_str().into();
                    }
                    let info = DeadLetterInfo {
                        reason: &reason,
                        source: &topic,
                        group: Some(&topic),
                        attempts: 3,
                        first_failure: None,
                    };
                    let dead = mark(envelope, &info);
                    let max = SQS_MIN_MESSAGE_BYTES;
                    let (sent, wire) = encode_dead_letter(dead, &topic, max);
                    prop_assert!(wire.size() <= max, "{} bytes", wire.size());
                    prop_assert_eq!(refusal(&wire), None);
                    let back = decode(received(&wire));
                    prop_assert_eq!(back.undecodable, None);
                    let expected = sent.clone().with_timestamp(back.envelope.timestamp);
                    prop_assert_eq!(back.envelope, expected);
                }
                Ok(())
            },
        );
    }
}
