//! Turns a panicking handler into a failed attempt.
//!
//! A panic inside the wrapped handler is caught and becomes
//! [`Outcome::Retry`] with an
//! [`ErrorKind::Handler`] error whose source is a [`Panicked`] holding
//! the panic message. Layers outside this one (retry, dead letter, metrics) see that outcome like
//! any other failure.
//!
//! The [`Consumer`](crate::runtime::Consumer) catches panics itself as well, so a panic never
//! stops it even without this layer.

use std::any::Any;
use std::fmt;
use std::panic::AssertUnwindSafe;

use async_trait::async_trait;
use futures::FutureExt;
use tower_layer::Layer;

use crate::runtime::{Handler, Outcome};
use crate::{Delivery, Error, ErrorKind};

/// A [`Layer`] that wraps a handler in a [`CatchPanic`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CatchPanicLayer {
    _priv: (),
}

impl CatchPanicLayer {
    /// The layer.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

impl<H> Layer<H> for CatchPanicLayer {
    type Service = CatchPanic<H>;

    fn layer(&self, inner: H) -> CatchPanic<H> {
        CatchPanic::new(inner)
    }
}

/// A handler that turns a panic of its inner handler into [`Outcome::Retry`].
#[derive(Debug, Clone)]
pub struct CatchPanic<H> {
    inner: H,
}

impl<H> CatchPanic<H> {
    /// Wraps `inner`.
    pub fn new(inner: H) -> Self {
        Self { inner }
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
impl<H: Handler> Handler for CatchPanic<H> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        match AssertUnwindSafe(self.inner.handle(delivery))
            .catch_unwind()
            .await
        {
            Ok(outcome) => outcome,
            Err(payload) => Outcome::retry(Panicked::from_payload(payload.as_ref()).into_error()),
        }
    }
}

/// The source of the error made from a caught handler panic: the panic message.
///
/// Find it with [`Error::source_ref`] and `downcast_ref::<Panicked>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Panicked {
    message: String,
}

impl Panicked {
    /// From the payload of a caught panic (`&str` and `String` payloads keep their text).
    #[must_use]
    pub fn from_payload(payload: &(dyn Any + Send)) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "panic payload is not text".to_owned()
        };
        Self { message }
    }

    /// The panic message.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    /// An [`ErrorKind::Handler`] error (retryable) with this panic as its source.
    #[must_use]
    pub fn into_error(self) -> Error {
        Error::with_source(
            ErrorKind::Handler,
            format!("handler panicked: {}", self.message),
            self,
        )
    }
}

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "handler panicked: {}", self.message)
    }
}

impl std::error::Error for Panicked {}
