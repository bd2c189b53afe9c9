//! The envelope every message travels in.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The identifier of a message.
///
/// `bus` makes UUID v7 ids (time-ordered), but a message published by another system may carry
/// any non-empty string (CloudEvents `id`), so the id is kept as text. Cheap to clone.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(Arc<str>);

impl MessageId {
    /// A new, unique, time-ordered id (UUID v7).
    #[must_use]
    pub fn new() -> Self {
        Self(Arc::from(uuid::Uuid::now_v7().to_string()))
    }

    /// A stable id derived from `parts`: the same parts always give the same id (a UUID v5 in a
    /// namespace of `bus`'s own). Adapters use it for a message that arrives without an id, from
    /// the broker's own identity of the message (stream sequence, partition and offset) or,
    /// where the broker has none, a hash of its content, so that every redelivery of it carries
    /// the same id and idempotency can recognise it.
    #[must_use]
    pub fn derived(parts: &[&[u8]]) -> Self {
        // A fixed, random namespace: ids derived by bus never collide with other v5 ids.
        const NAMESPACE: uuid::Uuid =
            uuid::Uuid::from_u128(0x6f1c_2a1e_0d7b_5a8e_9c3f_4b2d_8e61_a907);
        let mut name = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
        for part in parts {
            // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
            name.extend_from_slice(&(part.len() as u64).to_be_bytes());
            name.extend_from_slice(part);
        }
        Self::from(uuid::Uuid::new_v5(&NAMESPACE, &name))
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for MessageId {
    fn from(value: &str) -> Self {
        Self(Arc::from(value))
    }
}

impl From<String> for MessageId {
    fn from(value: String) -> Self {
        Self(Arc::from(value))
    }
}

impl From<uuid::Uuid> for MessageId {
    fn from(value: uuid::Uuid) -> Self {
        Self(Arc::from(value.to_string()))
    }
}

impl AsRef<str> for MessageId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Application headers: text keys to text values, kept sorted by key so that what goes on the
/// wire is deterministic.
pub type Headers = BTreeMap<String, String>;

/// A message as it travels through `bus`: identity, causality, routing key, and the payload.
///
/// Build one with [`Envelope::new`] and the `with_*` methods, or from a typed message with
/// [`Envelope::encode`](crate::Envelope::encode). Cloning is cheap for the payload (a
/// reference-counted [`Bytes`]); the small metadata strings are copied.
///
/// ```
/// use bus_core::Envelope;
/// let placed = Envelope::new("order.placed", r#"{"order":42}"#).with_key("order-42");
/// let paid = Envelope::new("payment.captured", "{}").caused_by(&placed);
/// assert_eq!(paid.correlation_id, placed.correlation_id);
/// assert_eq!(paid.causation_id.as_ref(), Some(&placed.id));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique id of this message (UUID v7 when made by `bus`).
    pub id: MessageId,
    /// The type of event or command, e.g. `order.placed` (CloudEvents `type`).
    pub kind: String,
    /// The id shared by every message of one conversation; a root message's own id.
    pub correlation_id: MessageId,
    /// The id of the message that caused this one, if any.
    pub causation_id: Option<MessageId>,
    /// When the message was created.
    pub timestamp: SystemTime,
    /// The ordering / partition key: messages with the same key are delivered in order.
    pub key: Option<String>,
    /// The payload's media type, e.g. `application/json`.
    pub content_type: Option<String>,
    /// Application headers (W3C `traceparent` and `tracestate` travel here too).
    pub headers: Headers,
    /// The message body.
    pub payload: Bytes,
}

impl Envelope {
    /// A new root message of `kind` with `payload`: a fresh id, and a correlation id equal to it.
    pub fn new(kind: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        let id = MessageId::new();
        Self {
            correlation_id: id.clone(),
            id,
            kind: kind.into(),
            causation_id: None,
            timestamp: SystemTime::now(),
            key: None,
            content_type: None,
            headers: Headers::new(),
            payload: payload.into(),
        }
    }

    /// Marks this message as caused by `parent`: the conversation's correlation id is copied,
    /// and the causation id becomes the parent's id. This is how a chain of events across
    /// services stays traceable.
    #[must_use]
    pub fn caused_by(mut self, parent: &Envelope) -> Self {
        self.correlation_id = parent.correlation_id.clone();
        self.causation_id = Some(parent.id.clone());
        self
    }

    /// A new message of `kind` caused by this one (see [`Envelope::caused_by`]); the key is kept.
    #[must_use]
    pub fn child(&self, kind: impl Into<String>, payload: impl Into<Bytes>) -> Envelope {
        let mut child = Envelope::new(kind, payload).caused_by(self);
        child.key.clone_from(&self.key);
        child
    }

    /// Sets the id (for messages whose id comes from elsewhere, e.g. an outbox row).
    #[must_use]
    pub fn with_id(mut self, id: impl Into<MessageId>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, id: impl Into<MessageId>) -> Self {
        self.correlation_id = id.into();
        self
    }

    /// Sets the ordering key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the content type.
    #[must_use]
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets the timestamp.
    #[must_use]
    pub fn with_timestamp(mut self, timestamp: SystemTime) -> Self {
        self.timestamp = timestamp;
        self
    }

    /// Adds or replaces one header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The value of header `name`, if present.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The payload length plus the length of every header name and value: what most brokers
    /// count against their message size limit.
    #[must_use]
    pub fn wire_size(&self) -> usize {
        self.payload.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("correlation_id", &self.correlation_id)
            .field("causation_id", &self.causation_id)
            .field("timestamp", &self.timestamp)
            .field("key", &self.key)
            .field("content_type", &self.content_type)
            .field("headers", &self.headers)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_message_correlates_with_itself() {
        let e = Envelope::new("a", "x");
        assert_eq!(e.id, e.correlation_id);
        assert!(e.causation_id.is_none());
        assert_eq!(
            uuid::Uuid::parse_str(e.id.as_str())
                .unwrap()
                .get_version_num(),
            7
        );
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let a = MessageId::derived(&[b"stream", b"42"]);
        assert_eq!(a, MessageId::derived(&[b"stream", b"42"]));
        assert_ne!(a, MessageId::derived(&[b"stream4", b"2"]));
        assert_eq!(
            uuid::Uuid::parse_str(a.as_str()).unwrap().get_version_num(),
            5
        );
    }

    #[test]
    fn ids_are_time_ordered() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert!(a < b, "{a} then {b}");
    }

    #[test]
    fn chain_keeps_correlation_and_links_causation() {
        let root = Envelope::new("order.placed", "{}").with_key("o-1");
        let child = root.child("payment.requested", "{}");
        let grandchild = child.child("payment.captured", "{}");
        assert_eq!(grandchild.correlation_id, root.id);
        assert_eq!(grandchild.causation_id, Some(child.id.clone()));
        assert_eq!(grandchild.key.as_deref(), Some("o-1"));
    }
}
