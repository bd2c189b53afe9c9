//! Middleware: layers that wrap a [`Handler`](crate::runtime::Handler) into another handler.
//!
//! Every middleware is a [`tower_layer::Layer`] whose service is a `Handler`, so layers stack
//! with [`HandlerBuilder`](crate::runtime::HandlerBuilder) (first added is outermost) or with
//! [`Layer::layer`](tower_layer::Layer::layer) directly. One folder per middleware, each with its
//! layer and its handler wrapper:
//!
//! - [`retry`]: immediate retries in process, then broker redeliveries with backoff, then the
//!   dead-letter queue.
//! - [`dead_letter`]: the dead-letter convention, a layer for adapters without a native
//!   dead-letter queue, and [`Redrive`] to move dead letters back.
//! - [`timeout`]: an attempt that takes too long fails with
//!   [`ErrorKind::Timeout`](crate::ErrorKind::Timeout), which is retried.
//! - [`panic`](mod@panic): a panicking handler becomes a failed, retried attempt, visible to the layers
//!   outside it. (The [`Consumer`](crate::runtime::Consumer) catches panics on its own too, so a
//!   panic never stops it; this layer is for middleware that should see the failure.)

pub mod dead_letter;
/// Deduplication: a message already processed is acknowledged without running the handler again.
pub mod idempotency;
#[cfg(feature = "opentelemetry")]
#[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
pub mod metrics;
pub mod panic;
pub mod retry;
pub mod timeout;
#[cfg(feature = "opentelemetry")]
#[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
pub mod tracing;

pub use dead_letter::{DeadLetterLayer, DeadLettering, Redrive};
pub use panic::{CatchPanic, CatchPanicLayer, Panicked};
pub use retry::{Retry, RetryLayer, RetryPolicy};
pub use timeout::{Timeout, TimeoutLayer};
