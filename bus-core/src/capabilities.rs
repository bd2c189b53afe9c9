//! What an adapter can do: read by users and by the conformance suite.

use std::fmt;
use std::time::Duration;

/// How an adapter provides a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Support {
    /// The broker does it itself.
    Native,
    /// The adapter builds it from other broker features (e.g. delay through TTL queues).
    Emulated,
    /// Not available: calls return [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported),
    /// and the conformance suite skips the cases that need it, printing the reason.
    Unsupported(&'static str),
}

impl Support {
    /// Whether the feature can be used at all (natively or emulated).
    #[must_use]
    pub fn is_available(self) -> bool {
        !matches!(self, Support::Unsupported(_))
    }

    /// The reason it is unsupported, if it is.
    #[must_use]
    pub fn unsupported_reason(self) -> Option<&'static str> {
        match self {
            Support::Unsupported(reason) => Some(reason),
            _ => None,
        }
    }
}

impl fmt::Display for Support {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Support::Native => f.write_str("native"),
            Support::Emulated => f.write_str("emulated"),
            Support::Unsupported(reason) => write!(f, "unsupported ({reason})"),
        }
    }
}

/// What an adapter does natively, emulates, or cannot do.
///
/// Adapters build it from [`Capabilities::default`], which claims nothing optional, and set
/// what they have:
///
/// ```
/// use bus_core::{Capabilities, Support};
/// let caps = Capabilities {
///     name: "example",
///     durable: true,
///     dead_letter: Support::Native,
///     ..Capabilities::default()
/// };
/// assert!(caps.dead_letter.is_available());
/// assert!(!caps.request_reply.is_available());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// The adapter's name (`memory`, `nats`, `kafka`, …), for messages and metrics
    /// (`messaging.system`).
    pub name: &'static str,
    /// Messages survive a broker restart once publish returned.
    pub durable: bool,
    /// Named consumer groups: each group gets every message, members of a group share them.
    pub consumer_groups: bool,
    /// Messages with the same key are delivered in publish order to a single subscriber.
    pub per_key_order: bool,
    /// Per-key order also holds across the competing members of one group: a key's first
    /// deliveries (and the [`Consumer`](crate::Consumer)'s retries in place) are only ever in
    /// flight at one member at a time (Kafka partitions, SQS FIFO groups, the memory broker).
    /// A delivery nacked to the broker follows
    /// [`key_order_across_retries`](Capabilities::key_order_across_retries): on Kafka its copy
    /// on the retry topic may be read by another member.
    pub per_key_order_across_members: bool,
    /// Whether a failed message still takes effect before the later messages of its key.
    /// `Native` where the broker itself holds a key back while one of its messages waits for
    /// redelivery (memory). `Emulated` where only the [`Consumer`](crate::Consumer) keeps it,
    /// by retrying in place ([`KeyOrder::Ordered`](crate::runtime::KeyOrder::Ordered), its
    /// default on these subscriptions): a delivery nacked to the broker lets the key's later
    /// messages pass. `Unsupported` where there is no per-key order to keep.
    pub key_order_across_retries: Support,
    /// Request-reply.
    pub request_reply: Support,
    /// A request to a topic nobody serves fails fast with
    /// [`ErrorKind::NoResponders`](crate::ErrorKind::NoResponders) instead of timing out.
    pub no_responders_detection: bool,
    /// `nack(Redeliver::After(d))` waits at least `d` before redelivery.
    pub delayed_redelivery: Support,
    /// `reject` moves the message to the dead-letter queue. `Native` where the broker moves it
    /// (memory; SQS with a redrive policy also moves messages received too often), `Emulated`
    /// where the adapter sends a marked copy and then settles the original.
    pub dead_letter: Support,
    /// A delivery dropped unsettled comes back while the subscription is still open (not only
    /// after a timeout the test cannot wait for).
    pub prompt_redelivery_of_dropped: bool,
    /// [`Delivery::attempt`](crate::Delivery::attempt) counts every delivery of a message,
    /// also those cut short by a consumer that crashed before settling: a message that kills
    /// the process every time still reaches the dead-letter queue after the retry policy's
    /// attempts. `Native` where the broker counts (NATS, SQS, RabbitMQ quorum queues),
    /// `Emulated` where the adapter counts in a header it rewrites (the count then misses
    /// deliveries cut short by a crash), `Unsupported` where nothing counts.
    pub delivery_count: Support,
    /// [`Publisher::publish_delayed`](crate::Publisher::publish_delayed) and
    /// [`Queue::send_delayed`](crate::Queue::send_delayed): `Native` where the broker holds the
    /// message until it is due (SQS `DelaySeconds`, the memory broker's timers), `Emulated`
    /// where the adapter parks it and brings it back, as it does a delayed retry.
    pub delayed_publish: Support,
    /// The longest delay [`delayed_publish`](Capabilities::delayed_publish) accepts; `None`
    /// for no limit but the clock's.
    pub max_delay: Option<Duration>,
    /// [`Broker::backlog`](crate::Broker::backlog) counts what waits for a group or in a
    /// queue. `Native` where the broker reports the counts (exact, or approximate as the
    /// [`Backlog`](crate::Backlog) says).
    pub backlog: Support,
    /// The largest payload accepted, in bytes, if the adapter knows one.
    pub max_payload_bytes: Option<usize>,
    /// The most headers a message may carry, if limited (adapters that pack headers report
    /// `None`).
    pub max_headers: Option<usize>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            name: "unknown",
            durable: false,
            consumer_groups: false,
            per_key_order: false,
            per_key_order_across_members: false,
            key_order_across_retries: Support::Unsupported(
                "the adapter does not declare order across retries",
            ),
            request_reply: Support::Unsupported("the adapter does not declare request-reply"),
            no_responders_detection: false,
            delayed_redelivery: Support::Unsupported(
                "the adapter does not declare delayed redelivery",
            ),
            dead_letter: Support::Unsupported("the adapter does not declare dead-lettering"),
            prompt_redelivery_of_dropped: false,
            delivery_count: Support::Unsupported(
                "the adapter does not declare how it counts deliveries",
            ),
            delayed_publish: Support::Unsupported("the adapter does not declare delayed publish"),
            max_delay: None,
            backlog: Support::Unsupported("the adapter does not declare backlog counts"),
            max_payload_bytes: None,
            max_headers: None,
        }
    }
}
