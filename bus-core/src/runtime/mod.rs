//! Running handlers over subscriptions: [`Handler`], [`Outcome`], and the [`Consumer`].
//!
//! A service writes a [`Handler`] (often a closure through [`handler_fn`]) that says, for each
//! delivery, whether it was processed ([`Outcome::Ack`]), should come again
//! ([`Outcome::Retry`]) or can never be processed ([`Outcome::Reject`]). Middleware from
//! [`crate::middleware`] wraps it ([`HandlerBuilder`]). A [`Consumer`] runs it over a
//! [`Subscription`](crate::Subscription) with bounded concurrency and order per key, settles
//! every delivery from the outcome, survives panicking handlers, and shuts down gracefully.
//!
//! ```no_run
//! use std::time::Duration;
//! use bus_core::{Envelope, Error, SubscribeOptions, Subscriber};
//! use bus_core::middleware::TimeoutLayer;
//! use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo, HandlerBuilder};
//!
//! # async fn example(bus: &dyn Subscriber) -> bus_core::Result<()> {
//! let handler = HandlerBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_secs(30)))
//!     .handler(handler_fn(|envelope: Envelope, info: DeliveryInfo| async move {
//!         let order: serde_json::Value = serde_json::from_slice(&envelope.payload)?;
//!         tracing::info!(attempt = info.attempt(), %order, "order placed");
//!         Ok::<_, Error>(())
//!     }));
//!
//! let subscription = bus.subscribe("orders", SubscribeOptions::group("billing")).await?;
//! let consumer = Consumer::new(subscription, handler)
//!     .with_concurrency(32)
//!     .with_shutdown_timeout(Duration::from_secs(10))
//!     .spawn();
//! // … until the service is told to stop:
//! let report = consumer.stop().await?;
//! tracing::info!(?report, "consumer stopped");
//! # Ok(()) }
//! ```

pub(crate) mod consumer;
mod handler;
mod outcome;

#[cfg(test)]
mod tests;

pub use consumer::{
    Consumer, ConsumerGauges, ConsumerHandle, ConsumerReport, KeyOrder, DEFAULT_CONCURRENCY,
    DEFAULT_MAX_PARKED, DEFAULT_SETTLE_ATTEMPTS, DEFAULT_SHUTDOWN_TIMEOUT,
};
pub use handler::{handler_fn, DeliveryInfo, Handler, HandlerBuilder, HandlerFn};
pub use outcome::Outcome;
