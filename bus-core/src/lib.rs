//! The core of `bus`: one messaging API over Kafka, RabbitMQ, SQS, NATS and an in-process
//! broker.
//!
//! This crate holds the vocabulary every adapter and every user shares:
//! - [`Envelope`]: a message with its id, kind, correlation and causation ids, key, headers
//!   and payload; [`Message`] for typed messages with a [`Codec`] (JSON by default).
//! - The broker traits: [`Publisher`], [`Subscriber`], [`Queue`], [`Requester`],
//!   [`Responder`], and [`Broker`], which is all of them behind one object-safe trait.
//! - [`Delivery`] and its settlement: [`Delivery::ack`], [`Delivery::nack`] with a
//!   [`Redeliver`], [`Delivery::reject`] to the dead-letter queue; each consumes the delivery.
//! - [`Capabilities`]: what an adapter does natively, emulates, or cannot do.
//! - [`Error`] with a non-exhaustive [`ErrorKind`] and the typed source kept.
//! - [`runtime`]: handlers and the consumer that runs them (bounded concurrency, per-key
//!   order, graceful shutdown), and [`middleware`]: retry, dead letter, timeout, panic
//!   recovery, idempotency, tracing and metrics, each a `tower_layer::Layer`.
//! - With the `conformance` feature, the shared adapter conformance suite (the
//!   `conformance` module).
//!
//! Most applications depend on the `bus` facade crate, which re-exports this one.
//!
//! # Features
//! - `opentelemetry`: tracing and metrics middleware (`middleware::tracing`,
//!   `middleware::metrics`).
//! - `redis`, `postgres`: the Redis and PostgreSQL idempotency stores.
//! - `conformance`: the adapter conformance suite (not semver-stable).
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backlog;
mod broker;
mod capabilities;
#[doc(hidden)]
pub mod cost;
mod delivery;
mod envelope;
mod error;
pub mod headers;
mod message;
pub mod middleware;
pub mod runtime;
pub mod secrets;

#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;

pub use backlog::{Backlog, BacklogOf, PartitionBacklog};
pub use broker::{
    Broker, ConsumeOptions, Delay, DeliverySource, Publisher, Queue, Reply, Request, RequestSource,
    Requester, Requests, Responder, ServeOptions, SubscribeOptions, Subscriber, Subscription,
};
pub use capabilities::{Capabilities, Support};
pub use delivery::{Delivery, Redeliver, Settle, SettleError, Settlement};
pub use envelope::{Envelope, Headers, MessageId};
pub use error::{BoxError, Error, ErrorKind, Result};
pub use message::{Codec, JsonCodec, Message};
pub use runtime::{
    handler_fn, Consumer, ConsumerHandle, ConsumerReport, DeliveryInfo, Handler, HandlerBuilder,
    KeyOrder, Outcome,
};

pub use async_trait::async_trait;
pub use bytes::Bytes;
