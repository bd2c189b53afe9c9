//! The [`Handler`] trait, closures as handlers, and stacking middleware.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use tower_layer::{Identity, Layer, Stack};

use crate::delivery::Name;
use crate::runtime::Outcome;
use crate::{Delivery, Envelope};

/// Processes one delivery and says how to settle it.
///
/// The [`Consumer`](crate::runtime::Consumer) calls [`handle`](Handler::handle) and settles the
/// delivery from the returned [`Outcome`]; a handler never settles the delivery itself.
/// Middleware (see [`crate::middleware`]) wraps a handler into another handler through
/// [`tower_layer::Layer`].
///
/// Most handlers are closures made with [`handler_fn`]; implement the trait for handlers that
/// hold state or need the whole [`Delivery`]:
///
/// ```
/// use bus_core::{async_trait, Delivery, runtime::{Handler, Outcome}};
///
/// struct CountOrders(std::sync::atomic::AtomicU64);
///
/// #[async_trait]
/// impl Handler for CountOrders {
///     async fn handle(&self, delivery: &Delivery) -> Outcome {
///         if delivery.envelope().kind == "order.placed" {
///             self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         }
///         Outcome::Ack
///     }
/// }
/// ```
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Processes `delivery`.
    ///
    /// # Cancel safety
    /// The future may be dropped before it completes (a timeout, or a shutdown that ran out of
    /// time); the delivery is then redelivered, so the work must be safe to do again.
    async fn handle(&self, delivery: &Delivery) -> Outcome;
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for Arc<H> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        (**self).handle(delivery).await
    }
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for Box<H> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        (**self).handle(delivery).await
    }
}

/// What a [`handler_fn`] closure learns about a delivery besides its envelope: owned, so the
/// closure's future can keep it. Cheap to make when the adapter shares its names with its
/// deliveries ([`Delivery::with_shared_names`]): it shares them too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    attempt: u32,
    source: Name,
    group: Option<Name>,
}

impl DeliveryInfo {
    /// Which delivery this is: 1 on the first, 2 after one redelivery, …
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The topic or queue the message was received from.
    #[must_use]
    pub fn source(&self) -> &str {
        self.source.as_str()
    }

    /// The consumer group it was received in, if any.
    #[must_use]
    pub fn group(&self) -> Option<&str> {
        self.group.as_ref().map(Name::as_str)
    }
}

impl From<&Delivery> for DeliveryInfo {
    fn from(delivery: &Delivery) -> Self {
        let (source, group) = delivery.names();
        Self {
            attempt: delivery.attempt(),
            source: source.clone(),
            group: group.cloned(),
        }
    }
}

/// Makes a [`Handler`] from an async closure taking the envelope and a [`DeliveryInfo`].
///
/// The closure's output is anything that converts into an [`Outcome`]: an `Outcome`, `()`
/// (ack), or `Result<(), Error>` (ack, or retry/reject by
/// [`Error::is_retryable`](crate::Error::is_retryable)), so `?` works inside.
///
/// ```
/// use bus_core::{Envelope, Error, runtime::{handler_fn, DeliveryInfo}};
///
/// let handler = handler_fn(|envelope: Envelope, info: DeliveryInfo| async move {
///     let order: serde_json::Value = serde_json::from_slice(&envelope.payload)?;
///     println!("attempt {}: {order}", info.attempt());
///     Ok::<_, Error>(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<F, Fut, O>(f: F) -> HandlerFn<F>
where
    F: Fn(Envelope, DeliveryInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = O> + Send,
    O: Into<Outcome>,
{
    HandlerFn { f }
}

/// A [`Handler`] made from a closure by [`handler_fn`].
#[derive(Clone, Copy)]
pub struct HandlerFn<F> {
    f: F,
}

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn")
            .field("f", &std::any::type_name::<F>())
            .finish()
    }
}

#[async_trait]
impl<F, Fut, O> Handler for HandlerFn<F>
where
    F: Fn(Envelope, DeliveryInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = O> + Send,
    O: Into<Outcome>,
{
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        (self.f)(delivery.envelope().clone(), DeliveryInfo::from(delivery))
            .await
            .into()
    }
}

/// Stacks middleware layers around a handler, the first layer added outermost (as tower's
/// `ServiceBuilder` does).
///
/// ```
/// use std::time::Duration;
/// use bus_core::{Envelope, middleware::{CatchPanicLayer, TimeoutLayer},
///     runtime::{handler_fn, DeliveryInfo, HandlerBuilder}};
///
/// let handler = HandlerBuilder::new()
///     .layer(CatchPanicLayer::new())                      // sees the timeout's outcome too
///     .layer(TimeoutLayer::new(Duration::from_secs(30)))  // innermost: around the closure
///     .handler(handler_fn(|_: Envelope, _: DeliveryInfo| async {}));
/// # let _ = handler;
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `handler` is called"]
pub struct HandlerBuilder<L> {
    layer: L,
}

impl HandlerBuilder<Identity> {
    /// A builder with no layers.
    pub fn new() -> Self {
        Self {
            layer: Identity::new(),
        }
    }
}

impl Default for HandlerBuilder<Identity> {
    fn default() -> Self {
        Self::new()
    }
}

impl<L> HandlerBuilder<L> {
    /// Adds `layer` inside the layers added so far.
    pub fn layer<T>(self, layer: T) -> HandlerBuilder<Stack<T, L>> {
        HandlerBuilder {
            layer: Stack::new(layer, self.layer),
        }
    }

    /// Wraps `handler` in the layers.
    pub fn handler<H>(self, handler: H) -> L::Service
    where
        L: Layer<H>,
        L::Service: Handler,
    {
        self.layer.layer(handler)
    }

    /// The stacked layers, to apply elsewhere.
    pub fn into_inner(self) -> L {
        self.layer
    }
}
