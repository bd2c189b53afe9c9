//! The consumer side: a handler that opens a CONSUMER span around its inner handler, as a child
//! of the producer's context carried in the envelope.

use std::borrow::Cow;
use std::fmt;

use async_trait::async_trait;
use opentelemetry::trace::{
    FutureExt as _, Link, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider,
};
use opentelemetry::{Context, KeyValue, StringValue};
use tower_layer::Layer;

use super::propagation::remote_span_context;
use super::semconv::{self, messaging_system};
use super::TracerSource;
use crate::runtime::{Handler, Outcome};
use crate::Delivery;

/// A [`Layer`] that wraps a handler in [`Tracing`]: one CONSUMER span per delivery, a child of
/// the producer's span.
///
/// ```
/// use bus_core::{Envelope, middleware::tracing::TracingLayer,
///     runtime::{handler_fn, DeliveryInfo, HandlerBuilder}};
///
/// let handler = HandlerBuilder::new()
///     .layer(TracingLayer::new("memory"))
///     .handler(handler_fn(|_: Envelope, _: DeliveryInfo| async {}));
/// # let _ = handler;
/// ```
#[derive(Clone)]
pub struct TracingLayer {
    tracer: TracerSource,
    system: Cow<'static, str>,
}

impl TracingLayer {
    /// Traces handlers of messages received from the `system` adapter (its
    /// [`Capabilities::name`](crate::Capabilities::name), e.g. `broker.capabilities().name`;
    /// mapped to the conventions' `messaging.system` value by
    /// [`messaging_system`](super::semconv::messaging_system)), reporting to the global tracer
    /// provider as it is at each span.
    #[must_use]
    pub fn new(system: &str) -> Self {
        Self {
            tracer: TracerSource::Global,
            system: messaging_system(system),
        }
    }

    /// Reports to `provider` instead of the global tracer provider.
    #[must_use]
    pub fn with_tracer_provider<P>(mut self, provider: &P) -> Self
    where
        P: TracerProvider,
        P::Tracer: Send + Sync + 'static,
        <P::Tracer as opentelemetry::trace::Tracer>::Span: Send + Sync + 'static,
    {
        self.tracer = TracerSource::from_provider(provider);
        self
    }
}

impl fmt::Debug for TracingLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracingLayer")
            .field("system", &self.system)
            .finish_non_exhaustive()
    }
}

impl<H> Layer<H> for TracingLayer {
    type Service = Tracing<H>;

    fn layer(&self, inner: H) -> Tracing<H> {
        Tracing {
            inner,
            tracer: self.tracer.clone(),
            system: self.system.clone(),
        }
    }
}

/// A handler that runs its inner handler inside a CONSUMER span, made by [`TracingLayer`].
///
/// For each delivery it reads the W3C trace context from the envelope's `traceparent` /
/// `tracestate` headers and opens a span named `process {source}` (the topic or queue the
/// delivery came from), of kind CONSUMER, as a child of that context and linked to it (as the
/// conventions ask of process spans). Without a trace context in the envelope the span is a
/// child of the current context. Attributes: `messaging.system`,
/// `messaging.destination.name`, `messaging.operation.type` and `messaging.operation.name`
/// (both `process`), `messaging.message.id`, `messaging.message.conversation_id`,
/// `messaging.message.body.size`, `messaging.consumer.group.name` (when received in a group),
/// `bus.delivery.attempt`, and once the handler returns `bus.outcome` (`ack`, `retry`,
/// `reject`); on retry or reject also `error.type` (the [`ErrorKind`](crate::ErrorKind) name)
/// and an error status.
///
/// The span's context is the [current context](opentelemetry::Context::current) while the
/// inner handler runs, so what the handler publishes through a
/// [`TracedBroker`](super::TracedBroker), and spans it opens itself, belong to the same trace.
///
/// If the inner handler panics or its future is dropped, the span ends without an outcome;
/// place [`CatchPanicLayer`](crate::middleware::CatchPanicLayer) and
/// [`TimeoutLayer`](crate::middleware::TimeoutLayer) inside this layer to see those as
/// retries.
#[derive(Clone)]
pub struct Tracing<H> {
    inner: H,
    tracer: TracerSource,
    system: Cow<'static, str>,
}

impl<H> Tracing<H> {
    /// The wrapped handler.
    pub fn get_ref(&self) -> &H {
        &self.inner
    }

    /// Unwraps the inner handler.
    pub fn into_inner(self) -> H {
        self.inner
    }

    fn start(&self, delivery: &Delivery) -> Context {
        let envelope = delivery.envelope();
        let current = Context::current();
        let remote = remote_span_context(envelope);
        let parent = match &remote {
            Some(remote) => current.with_remote_span_context(remote.clone()),
            None => current,
        };
        let (source, group) = delivery.names();
        // Room for the group, and for the outcome and error type the span gets at its end.
        let mut attributes = Vec::with_capacity(11);
        attributes.extend([
            KeyValue::new(semconv::MESSAGING_SYSTEM, self.system.clone()),
            KeyValue::new(
                semconv::MESSAGING_DESTINATION_NAME,
                StringValue::from(source.to_shared()),
            ),
            KeyValue::new(
                semconv::MESSAGING_OPERATION_TYPE,
                semconv::OPERATION_PROCESS,
            ),
            KeyValue::new(
                semconv::MESSAGING_OPERATION_NAME,
                semconv::OPERATION_PROCESS,
            ),
            KeyValue::new(
                semconv::MESSAGING_MESSAGE_ID,
                envelope.id.as_str().to_owned(),
            ),
            KeyValue::new(
                semconv::MESSAGING_MESSAGE_CONVERSATION_ID,
                envelope.correlation_id.as_str().to_owned(),
            ),
            KeyValue::new(
                semconv::MESSAGING_MESSAGE_BODY_SIZE,
                i64::try_from(envelope.payload.len()).unwrap_or(i64::MAX),
            ),
            KeyValue::new(semconv::BUS_DELIVERY_ATTEMPT, i64::from(delivery.attempt())),
        ]);
        if let Some(group) = group {
            attributes.push(KeyValue::new(
                semconv::MESSAGING_CONSUMER_GROUP_NAME,
                StringValue::from(group.to_shared()),
            ));
        }
        let links = remote.into_iter().map(Link::with_context).collect();
        let span = self.tracer.with(|tracer| {
            tracer
                .span_builder(span_name(delivery.source()))
                .with_kind(SpanKind::Consumer)
                .with_attributes(attributes)
                .with_links(links)
                .start_with_context(tracer, &parent)
        });
        parent.with_span(span)
    }
}

impl<H> fmt::Debug for Tracing<H>
where
    H: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing")
            .field("inner", &self.inner)
            .field("system", &self.system)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<H: Handler> Handler for Tracing<H> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let cx = self.start(delivery);
        let outcome = self.inner.handle(delivery).with_context(cx.clone()).await;
        let span = cx.span();
        span.set_attribute(KeyValue::new(semconv::BUS_OUTCOME, outcome.as_str()));
        if let Some(error) = outcome.error() {
            span.set_attribute(KeyValue::new(semconv::ERROR_TYPE, error.kind().as_str()));
            span.set_status(Status::error(error.to_string()));
        }
        span.end();
        outcome
    }
}

/// `process {source}`, the span's name.
fn span_name(source: &str) -> String {
    let mut name = String::with_capacity(semconv::OPERATION_PROCESS.len() + 1 + source.len());
    name.push_str(semconv::OPERATION_PROCESS);
    name.push(' ');
    name.push_str(source);
    name
}
