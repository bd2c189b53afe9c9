//! The RabbitMQ adapter of `bus`, over [`lapin`].
//!
//! [`RabbitMqBroker`] implements every `bus` pattern on RabbitMQ 3.10 or later, without
//! plugins:
//!
//! - **Topics** are routing keys on one durable topic exchange (`bus.topics`); each consumer
//!   group is a durable queue `<topic>@<group>` bound to it (classic, or quorum with
//!   [`RabbitMqConfig::quorum_queues`]). A group keeps what is published after it first
//!   subscribed, whether or not a member is connected. A subscription without a group gets an
//!   exclusive, auto-deleted queue. Publishing to a topic nobody subscribed to drops the
//!   message, as on the memory broker.
//! - **Work queues** are durable queues of the same name, reached through the default exchange
//!   with `mandatory` set, declared on first use: a send is never silently dropped.
//! - **Publisher confirms**: `publish` and `send` return once the broker confirmed the message
//!   (persistent, delivery mode 2).
//! - **Settlement**: manual acks with a `basic.qos` prefetch. `ack` is `basic.ack`.
//!   `nack(Now)` stores the next attempt at the back of the queue and acks this one (RabbitMQ's
//!   own requeue does not count attempts on classic queues; the count travels in the
//!   `bus-attempt` header). `nack(After(d))` goes through a per-queue TTL queue
//!   (`bus.retry.<ms>ms.<queue>`, `x-message-ttl`) that dead-letters back to the queue through the
//!   default exchange; `d` is rounded up to a fixed ladder of 55 delays (10 ms to about 49.7
//!   days, steps of at most ×5/3, listed in docs/adapters/rabbitmq.md), so jittered delays
//!   share a few queues. `reject` sends the message with the dead-letter reason headers to the
//!   queue `<topic or queue>.dlq`, confirmed, then acks (a `basic.reject` into a dead-letter
//!   exchange cannot add headers). A delivery dropped unsettled is stored again as the next
//!   attempt from a spawned task (or requeued with `basic.reject` if that fails).
//!   Copies go over the connection the delivery came on, and only while its channel is
//!   open: once that channel has closed (lost connection, channel error), RabbitMQ has
//!   requeued the delivery itself, so settling it fails with a non-retryable
//!   `ErrorKind::Closed`, dropping it does nothing, and the message comes again.
//! - **Delayed publish** (`publish_delayed`, `send_delayed`; `Capabilities::delayed_publish`
//!   `Emulated`, `max_delay` about 49.7 days) parks the message in a TTL queue on the same
//!   ladder of buckets as `nack(After)` (the delay's bucket rounded up) with the delay as its
//!   own `expiration`, so it is due on time unless a message ahead of it holds it, at the
//!   latest until its bucket's end: a queue's own retry queue, which
//!   dead-letters into the queue; for a topic, the shared `bus.delay.<ms>ms.<topic exchange>`
//!   (a fanout exchange and its queue), which dead-letters into the topic exchange with the
//!   topic's routing key, so every group (and private subscription) bound when it is due gets
//!   it, at attempt 1. The message lives in the broker while it waits.
//! - **Backlog** (`Broker::backlog`): the ready messages of the group's or work queue's queue
//!   (`waiting`), from a passive `queue.declare`; unacked messages (`in_flight`: only the
//!   management plugin tells them) and those parked in retry or delay queues (`delayed`) are
//!   not counted.
//! - **Request-reply** uses direct reply-to; a request to a topic nobody serves is returned by
//!   the broker (mandatory) and fails fast with `NoResponders`.
//! - **Recovery**: a lost connection is re-made with exponential backoff and jitter (backon);
//!   subscriptions re-attach their consumers by themselves. A publish returns `Ok` only once
//!   confirmed, so a confirmed message is never lost; an error means *not confirmed*, and a
//!   `Connection` or `Timeout` error may still have stored the message.
//! - **On the wire**: AMQP properties (`message_id`, `correlation_id`, `timestamp`, `type`,
//!   `content_type`) plus the CloudEvents AMQP binding's `cloudEvents:*` application
//!   properties, and the envelope's headers (including `traceparent`) in the headers table.
//!
//! See docs/adapters/rabbitmq.md for the whole mapping, the capabilities and the limits.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod broker;
mod config;
#[doc(hidden)]
pub mod cost;
mod endpoint;
mod error;
mod link;
mod publisher;
mod requests;
mod source;
mod subscriber;
mod wire;

pub use broker::RabbitMqBroker;
pub use config::{AuthMechanism, Pem, PropertiesHook, RabbitMqConfig};
pub use endpoint::URL_PARAMETERS;

/// Re-exported so the escape hatch ([`RabbitMqConfig::with_properties`]) and downcasts of
/// error sources use the same lapin as the adapter.
pub use lapin;

/// Connects to the RabbitMQ at `url` with the default configuration.
///
/// # Errors
/// As [`RabbitMqBroker::connect`].
pub async fn connect(url: &str) -> bus_core::Result<RabbitMqBroker> {
    RabbitMqBroker::connect(url).await
}

/// Prefix of the headers an undecodable message's dead letter keeps what it said about itself
/// in: `bus-rabbitmq-original-specversion` and `bus-rabbitmq-original-source` (the copy is
/// written as CloudEvents 1.0 from `bus`, so that it can be read from the dead-letter queue).
pub const ORIGINAL_PREFIX: &str = "bus-rabbitmq-original-";

/// The CloudEvents AMQP binding's prefix of application-property names (`cloudEvents:`).
pub const CLOUDEVENTS_PREFIX: &str = wire::CE_PREFIX;

const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<RabbitMqBroker>();
    send_sync::<RabbitMqConfig>();
};
