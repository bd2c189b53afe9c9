//! One messaging API for Rust services, over Kafka, RabbitMQ, AWS SQS, NATS and an in-process
//! broker.
//!
//! A service depends on this crate, writes its publishers and consumers once against
//! [`Bus`], and picks the broker by configuration: a URL such as `memory://`,
//! `nats://127.0.0.1:4222` or `amqp://guest:guest@127.0.0.1:5672/%2f`, given to [`connect`] or
//! read from the environment by [`BusConfig::from_env`].
//!
//! Everything of [`bus_core`] is re-exported here: [`Envelope`] and typed [`Message`]s,
//! the broker traits ([`Publisher`], [`Subscriber`], [`Queue`], [`Requester`],
//! [`Responder`], [`Broker`]), [`Delivery`] and its settlement, [`Capabilities`], and
//! [`Error`] with its [`ErrorKind`].
//!
//! Services are usually written one level up, with [`Service`] (module [`service`]): typed
//! handlers per message kind, a [`Context`] that publishes with correlation and causation
//! ids, and a graceful run until [`shutdown_signal`]. [`Bus`] and the
//! [`Consumer`] runtime are the lower-level API underneath.
//!
//! # Example
//!
//! ```
//! use bus::{Envelope, Message, SubscribeOptions};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct OrderPlaced {
//!     order_id: String,
//! }
//!
//! impl Message for OrderPlaced {
//!     const KIND: &'static str = "order.placed";
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> bus::Result<()> {
//! let bus = bus::connect("memory://").await?;
//!
//! // Subscribe first: a group receives what is published after it first subscribed.
//! let mut billing = bus.subscribe("orders", SubscribeOptions::group("billing")).await?;
//!
//! let order = OrderPlaced { order_id: "o-1".into() };
//! bus.publish("orders", Envelope::encode(&order)?.with_key("o-1")).await?;
//!
//! let delivery = billing.next().await.expect("subscription open")?;
//! let received: OrderPlaced = delivery.envelope().decode()?;
//! assert_eq!(received.order_id, "o-1");
//! delivery.ack().await?;
//!
//! bus.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Adapters and cargo features
//!
//! | feature | URL schemes | adapter |
//! |---|---|---|
//! | `memory` (default) | `memory://` | the in-process broker (`adapter-memory`) |
//! | `nats` | `nats://` | NATS with JetStream, through async-nats (`adapter-nats`) |
//! | `rabbitmq` | `amqp://`, `amqps://` | RabbitMQ, through lapin (`adapter-rabbitmq`) |
//! | `kafka` | `kafka://` | Kafka, through rdkafka (`adapter-kafka`) |
//! | `sqs` | `sqs://` | AWS SQS with SNS, through the AWS SDK (`adapter-sqs`) |
//! | `opentelemetry` | | tracing and metrics middleware (`middleware::tracing`, `middleware::metrics`) |
//! | `redis`, `postgres` | | idempotency stores (`middleware::idempotency`) |
//!
//! A URL whose adapter's feature is off fails with an [`ErrorKind::Config`] error naming the
//! feature to enable. What each adapter does natively, emulates or cannot do is in its
//! [`Capabilities`] and in docs/ARCHITECTURE.md, section 7.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod handle;
mod scheme;
pub mod service;

pub use bus_core::*;

pub use config::BusConfig;
pub use handle::Bus;
pub use service::{shutdown_signal, Context, Service};

#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use adapter_memory::{MemoryBroker, MemoryConfig};

/// Connects to the broker named by `url`.
///
/// The same as [`BusConfig::new(url).connect()`](BusConfig::connect); see there for the URL
/// schemes and their options.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> bus::Result<()> {
/// let bus = bus::connect("memory://?capacity=1000").await?;
/// assert_eq!(bus.capabilities().name, "memory");
///
/// let err = bus::connect("carrier-pigeon://coop").await.unwrap_err();
/// assert_eq!(err.kind(), bus::ErrorKind::Config);
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// [`ErrorKind::Config`] when the URL is invalid, its scheme unknown or its adapter's cargo
/// feature off; otherwise the adapter's connection errors.
///
/// # Cancel safety
/// Dropping the future abandons the connection attempt; nothing is left behind.
pub async fn connect(url: &str) -> Result<Bus> {
    BusConfig::new(url).connect().await
}

/// The README's example is compiled and run as a doc test, so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExample;

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}
    fn assert_send<T: Send>(_: &T) {}
    fn assert_send_only<T: Send + 'static>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        assert_send_sync::<Bus>();
        assert_send_sync::<BusConfig>();
        assert_send_sync::<Context>();
        assert_send_sync::<service::ServiceReport>();
        assert_send_only::<Service>();
        assert_send_only::<service::ServiceHandle>();
        #[cfg(feature = "memory")]
        assert_send_sync::<MemoryConfig>();
    }

    #[test]
    fn public_futures_are_send() {
        let config = BusConfig::default();
        assert_send(&connect("memory://"));
        assert_send(&config.connect());
    }
}
