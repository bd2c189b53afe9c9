//! Bounds the time one attempt may take.
//!
//! When the handler has not finished within the limit, its future is dropped and the attempt
//! fails with [`ErrorKind::Timeout`](crate::ErrorKind::Timeout), which is
//! [retryable](crate::Error::is_retryable): the outcome is
//! [`Outcome::Retry`] and the broker redelivers.
//!
//! ```
//! use std::time::Duration;
//! use bus_core::{Envelope, middleware::TimeoutLayer, runtime::{handler_fn, DeliveryInfo}};
//! use tower_layer::Layer;
//!
//! let handler = TimeoutLayer::new(Duration::from_secs(10))
//!     .layer(handler_fn(|_: Envelope, _: DeliveryInfo| async {}));
//! # let _ = handler;
//! ```

use std::time::Duration;

use async_trait::async_trait;
use tower_layer::Layer;

use crate::runtime::{Handler, Outcome};
use crate::{Delivery, Error};

/// A [`Layer`] that wraps a handler in a [`Timeout`].
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// Attempts fail once they have run for `timeout`.
    #[must_use]
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<H> Layer<H> for TimeoutLayer {
    type Service = Timeout<H>;

    fn layer(&self, inner: H) -> Timeout<H> {
        Timeout::new(inner, self.timeout)
    }
}

/// A handler that fails an attempt of its inner handler after a time limit.
#[derive(Debug, Clone)]
pub struct Timeout<H> {
    inner: H,
    timeout: Duration,
}

impl<H> Timeout<H> {
    /// Wraps `inner`: attempts fail once they have run for `timeout`.
    pub fn new(inner: H, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    /// The time limit.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The wrapped handler.
    pub fn get_ref(&self) -> &H {
        &self.inner
    }

    /// Unwraps the inner handler.
    pub fn into_inner(self) -> H {
        self.inner
    }
}

#[async_trait]
impl<H: Handler> Handler for Timeout<H> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        match tokio::time::timeout(self.timeout, self.inner.handle(delivery)).await {
            Ok(outcome) => outcome,
            Err(_elapsed) => Outcome::retry(Error::timeout(format!(
                "handler did not finish within {}",
                humantime::format_duration(self.timeout)
            ))),
        }
    }
}
