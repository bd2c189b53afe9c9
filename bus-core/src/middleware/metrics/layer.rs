//! The consumer side: counts and times each handler run.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use opentelemetry::KeyValue;
use tower_layer::Layer;

use super::{counts, BusMetrics};
use crate::middleware::tracing::semconv::{self, messaging_system};
use crate::runtime::{Handler, Outcome};
use crate::Delivery;

/// A [`Layer`] that wraps a handler in [`Metered`], recording
/// `messaging.client.consumed.messages`, `messaging.process.duration` and
/// `bus.consumer.outcomes` (see [the module](super)).
///
/// ```
/// use bus_core::{Envelope, middleware::metrics::{BusMetrics, MetricsLayer},
///     runtime::{handler_fn, DeliveryInfo, HandlerBuilder}};
///
/// let handler = HandlerBuilder::new()
///     .layer(MetricsLayer::new(BusMetrics::global(), "memory"))
///     .handler(handler_fn(|_: Envelope, _: DeliveryInfo| async {}));
/// # let _ = handler;
/// ```
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: BusMetrics,
    system: Cow<'static, str>,
}

impl MetricsLayer {
    /// Records into `metrics` for handlers of messages received from the `system` adapter (its
    /// [`Capabilities::name`](crate::Capabilities::name), mapped by
    /// [`messaging_system`](crate::middleware::tracing::semconv::messaging_system)).
    #[must_use]
    pub fn new(metrics: BusMetrics, system: &str) -> Self {
        Self {
            metrics,
            system: messaging_system(system),
        }
    }
}

impl<H> Layer<H> for MetricsLayer {
    type Service = Metered<H>;

    fn layer(&self, inner: H) -> Metered<H> {
        Metered {
            inner,
            metrics: self.metrics.clone(),
            system: self.system.clone(),
            totals: Arc::default(),
        }
    }
}

/// A handler that counts and times its inner handler's runs, made by [`MetricsLayer`].
///
/// A run whose future is dropped (a timeout outside this layer, a shutdown) or that panics
/// through this layer is counted as consumed but records no duration or outcome; place
/// [`CatchPanicLayer`](crate::middleware::CatchPanicLayer) and
/// [`TimeoutLayer`](crate::middleware::TimeoutLayer) inside this layer to count those as
/// retries.
#[derive(Clone)]
pub struct Metered<H> {
    inner: H,
    metrics: BusMetrics,
    system: Cow<'static, str>,
    /// The totals this layer has counted into, shared by its clones.
    totals: Arc<Mutex<Vec<Arc<counts::Totals>>>>,
}

impl<H> Metered<H> {
    /// The wrapped handler.
    pub fn get_ref(&self) -> &H {
        &self.inner
    }

    /// Unwraps the inner handler.
    pub fn into_inner(self) -> H {
        self.inner
    }
}

impl<H: fmt::Debug> fmt::Debug for Metered<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metered")
            .field("inner", &self.inner)
            .field("system", &self.system)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<H: Handler> Handler for Metered<H> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let (source, group) = delivery.names();
        let totals = counts::find(
            &self.totals,
            &self.metrics.instruments.totals,
            &self.system,
            source,
            group,
        );
        totals.consumed();

        let started = Instant::now();
        let outcome = self.inner.handle(delivery).await;
        let elapsed = started.elapsed().as_secs_f64();

        // Room for the outcome and the error type, so the vector never grows.
        let mut attributes = Vec::with_capacity(totals.attributes().len() + 2);
        attributes.extend_from_slice(totals.attributes());
        attributes.push(KeyValue::new(semconv::BUS_OUTCOME, outcome.as_str()));
        if let Some(error) = outcome.error() {
            attributes.push(KeyValue::new(semconv::ERROR_TYPE, error.kind().as_str()));
        }
        self.metrics
            .instruments
            .process_duration
            .record(elapsed, &attributes);
        totals.outcome(&outcome);
        outcome
    }
}
