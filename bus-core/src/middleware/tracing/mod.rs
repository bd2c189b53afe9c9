//! Distributed tracing with OpenTelemetry: one trace from the producer, through the broker, to
//! the consumer and on to whatever the consumer publishes next.
//!
//! - The producer wraps its broker in a [`TracedBroker`] (or calls [`traced`]): every publish
//!   opens a PRODUCER span `publish {topic}` and writes the W3C trace context of that span into
//!   the envelope's `traceparent` / `tracestate` headers, which every adapter carries.
//! - The consumer wraps its handler in a [`TracingLayer`]: every delivery gets a CONSUMER span
//!   `process {topic}`, a child of the producer's span, which is the current context while the
//!   handler runs. A message the handler publishes through a `TracedBroker` continues the same
//!   trace.
//!
//! Spans and attributes follow the OpenTelemetry messaging semantic conventions (see
//! [`semconv`] for the names). Trace context is read and written with
//! `opentelemetry_sdk`'s `TraceContextPropagator`; [`inject_context`] and
//! [`extract_context`] do it by hand, e.g. for request-reply, whose responder side is not
//! traced.
//!
//! # How the spans are made
//!
//! This module creates its spans with the `opentelemetry` API directly, not as `tracing`
//! spans through `tracing-opentelemetry`: the span kinds, names, parents and links are then
//! exactly those the conventions ask for, whatever `tracing` subscriber the application runs,
//! and the context reaches the next service even without one. The span's context is attached
//! as OpenTelemetry's current [`Context`](opentelemetry::Context) while the handler runs.
//! Applications that log with `tracing` and export through `tracing-opentelemetry` (0.34 or
//! later, whose layer parents new spans on the current OpenTelemetry context) see their own
//! spans inside the handler nested under the `process` span, and a publish made inside one of
//! their spans becomes its child. (The [`Consumer`](crate::runtime::Consumer) opens a
//! debug-level `tracing` span of its own per delivery, before any trace context is known;
//! exported, it is a one-span trace per delivery, so export `info` and above, or filter it.)
//!
//! Spans go to the global tracer provider (`opentelemetry::global::set_tracer_provider`), read
//! at each span, or to a provider given with `with_tracer_provider`.
//!
//! ```
//! use std::sync::Arc;
//! use bus_core::{Broker, Envelope, Error, Publisher};
//! use bus_core::middleware::tracing::{TracedBroker, TracingLayer};
//! use bus_core::runtime::{handler_fn, DeliveryInfo, HandlerBuilder};
//!
//! # fn example(broker: Arc<dyn Broker>) {
//! let system = broker.capabilities().name;
//! let broker = Arc::new(TracedBroker::new(broker));
//!
//! // Publishing through `broker` opens `publish orders` spans; handling opens `process orders`
//! // spans, and the follow-up `publish payments` span joins the same trace.
//! let publisher = broker.clone();
//! let handler = HandlerBuilder::new()
//!     .layer(TracingLayer::new(system))
//!     .handler(handler_fn(move |order: Envelope, _: DeliveryInfo| {
//!         let publisher = publisher.clone();
//!         async move {
//!             let captured = order.child("payment.captured", "{}");
//!             publisher.publish("payments", captured).await?;
//!             Ok::<_, Error>(())
//!         }
//!     }));
//! # let _ = handler; }
//! ```
//!
//! Requires the `opentelemetry` feature.

mod broker;
mod layer;
mod propagation;
pub mod semconv;

use std::sync::Arc;

use opentelemetry::global::{self, BoxedTracer};
use opentelemetry::trace::TracerProvider;
use opentelemetry::InstrumentationScope;

pub use broker::{traced, TracedBroker};
pub use layer::{Tracing, TracingLayer};
pub use propagation::{extract_context, inject_context, HeaderExtractor, HeaderInjector};

/// The instrumentation scope of `bus`'s spans and metrics: `bus` with this crate's version.
pub(crate) fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("bus")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// Where spans go: the global provider as it is when the span starts, or a given provider.
#[derive(Clone)]
enum TracerSource {
    Global,
    Provided(Arc<BoxedTracer>),
}

impl TracerSource {
    fn from_provider<P>(provider: &P) -> Self
    where
        P: TracerProvider,
        P::Tracer: Send + Sync + 'static,
        <P::Tracer as opentelemetry::trace::Tracer>::Span: Send + Sync + 'static,
    {
        TracerSource::Provided(Arc::new(BoxedTracer::new(Box::new(
            provider.tracer_with_scope(scope()),
        ))))
    }

    fn with<R>(&self, f: impl FnOnce(&BoxedTracer) -> R) -> R {
        match self {
            TracerSource::Global => f(&global::tracer_with_scope(scope())),
            TracerSource::Provided(tracer) => f(tracer),
        }
    }
}
