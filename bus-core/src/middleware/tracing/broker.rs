//! The producer side: a [`Broker`] that opens a PRODUCER span around every publish and carries
//! its context in the envelope.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry::trace::{
    FutureExt as _, Link, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider,
};
use opentelemetry::{Context, KeyValue};

use super::propagation::{inject_context, remote_span_context};
use super::semconv::{self, messaging_system};
use super::TracerSource;
use crate::headers::TRACEPARENT;
use crate::{
    Backlog, BacklogOf, Broker, Capabilities, ConsumeOptions, Delay, Envelope, Publisher, Queue,
    Requester, Requests, Responder, Result, ServeOptions, SubscribeOptions, Subscriber,
    Subscription,
};

/// Wraps `broker` in a [`TracedBroker`] that reports to the global tracer provider.
///
/// ```
/// # fn example(broker: std::sync::Arc<dyn bus_core::Broker>) {
/// let broker = bus_core::middleware::tracing::traced(broker);
/// # let _ = broker; }
/// ```
#[must_use]
pub fn traced(broker: Arc<dyn Broker>) -> Arc<dyn Broker> {
    Arc::new(TracedBroker::new(broker))
}

/// A [`Broker`] that traces what it sends.
///
/// [`publish`](Publisher::publish), [`publish_batch`](Publisher::publish_batch),
/// [`send`](Queue::send) and [`request`](Requester::request) each open a span named
/// `publish {destination}`, of kind PRODUCER, as a child of the
/// [current context](opentelemetry::Context::current), with the attributes
/// `messaging.system`, `messaging.destination.name`, `messaging.operation.type` and
/// `messaging.operation.name` (both `publish`), and for a single message
/// `messaging.message.id`, `messaging.message.conversation_id` (the correlation id) and
/// `messaging.message.body.size`, for a batch `messaging.batch.message_count`. The span's
/// context is written into each envelope's `traceparent` / `tracestate` headers, so the
/// consumer's span ([`TracingLayer`](super::TracingLayer)) continues the trace.
///
/// An envelope that already carries a `traceparent` keeps it: that is a creation context the
/// caller chose, and the span links to it instead. A failed operation sets the span's status to
/// error and `error.type` to the [`ErrorKind`](crate::ErrorKind) name.
///
/// Everything else — subscribe, consume, serve, capabilities, close — is passed through
/// unchanged; consumer spans come from [`TracingLayer`](super::TracingLayer).
pub struct TracedBroker<B: ?Sized = dyn Broker> {
    inner: Arc<B>,
    tracer: TracerSource,
    system: Cow<'static, str>,
}

impl<B: Broker + ?Sized> TracedBroker<B> {
    /// Traces `inner`, reporting to the global tracer provider as it is at each span (so the
    /// provider may be installed after this is made). `messaging.system` is taken from
    /// `inner`'s [`Capabilities::name`](crate::Capabilities::name).
    #[must_use]
    pub fn new(inner: Arc<B>) -> Self {
        let system = messaging_system(inner.capabilities().name);
        Self {
            inner,
            tracer: TracerSource::Global,
            system,
        }
    }
}

impl<B: ?Sized> TracedBroker<B> {
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

    /// Sets the `messaging.system` attribute (by default the adapter's name).
    #[must_use]
    pub fn with_system(mut self, system: impl Into<Cow<'static, str>>) -> Self {
        self.system = system.into();
        self
    }

    /// The traced broker.
    #[must_use]
    pub fn get_ref(&self) -> &Arc<B> {
        &self.inner
    }

    /// Unwraps the traced broker.
    #[must_use]
    pub fn into_inner(self) -> Arc<B> {
        self.inner
    }

    /// Opens the PRODUCER span for `envelopes` going to `destination`, and writes its context
    /// into those envelopes that carry none.
    fn start(&self, destination: &str, envelopes: &mut [Envelope]) -> Context {
        let parent = Context::current();
        let mut attributes = vec![
            KeyValue::new(semconv::MESSAGING_SYSTEM, self.system.clone()),
            KeyValue::new(semconv::MESSAGING_DESTINATION_NAME, destination.to_owned()),
            KeyValue::new(
                semconv::MESSAGING_OPERATION_TYPE,
                semconv::OPERATION_PUBLISH,
            ),
            KeyValue::new(
                semconv::MESSAGING_OPERATION_NAME,
                semconv::OPERATION_PUBLISH,
            ),
        ];
        if let [envelope] = &*envelopes {
            attributes.push(KeyValue::new(
                semconv::MESSAGING_MESSAGE_ID,
                envelope.id.to_string(),
            ));
            attributes.push(KeyValue::new(
                semconv::MESSAGING_MESSAGE_CONVERSATION_ID,
                envelope.correlation_id.to_string(),
            ));
            attributes.push(KeyValue::new(
                semconv::MESSAGING_MESSAGE_BODY_SIZE,
                i64::try_from(envelope.payload.len()).unwrap_or(i64::MAX),
            ));
        } else {
            attributes.push(KeyValue::new(
                semconv::MESSAGING_BATCH_MESSAGE_COUNT,
                i64::try_from(envelopes.len()).unwrap_or(i64::MAX),
            ));
        }
        // The conventions: a creation context the caller put into a message is not replaced,
        // and the publish span links to it.
        let links: Vec<Link> = envelopes
            .iter()
            .filter_map(remote_span_context)
            .map(Link::with_context)
            .collect();
        let span = self.tracer.with(|tracer| {
            tracer
                .span_builder(format!("{} {destination}", semconv::OPERATION_PUBLISH))
                .with_kind(SpanKind::Producer)
                .with_attributes(attributes)
                .with_links(links)
                .start_with_context(tracer, &parent)
        });
        let cx = parent.with_span(span);
        for envelope in envelopes
            .iter_mut()
            .filter(|e| !e.headers.contains_key(TRACEPARENT))
        {
            inject_context(&cx, envelope);
        }
        cx
    }
}

/// Ends the span of `cx`, recording the error of a failed operation.
fn finish<T>(cx: &Context, result: &Result<T>) {
    let span = cx.span();
    if let Err(error) = result {
        span.set_attribute(KeyValue::new(semconv::ERROR_TYPE, error.kind().as_str()));
        span.set_status(Status::error(error.to_string()));
    }
    span.end();
}

impl<B: ?Sized> fmt::Debug for TracedBroker<B>
where
    B: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracedBroker")
            .field("inner", &self.inner)
            .field("system", &self.system)
            .finish_non_exhaustive()
    }
}

impl<B: ?Sized> Clone for TracedBroker<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            tracer: self.tracer.clone(),
            system: self.system.clone(),
        }
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Publisher for TracedBroker<B> {
    async fn publish(&self, topic: &str, mut envelope: Envelope) -> Result<()> {
        let cx = self.start(topic, std::slice::from_mut(&mut envelope));
        let result = self
            .inner
            .publish(topic, envelope)
            .with_context(cx.clone())
            .await;
        finish(&cx, &result);
        result
    }

    async fn publish_batch(&self, topic: &str, mut envelopes: Vec<Envelope>) -> Result<()> {
        let cx = self.start(topic, &mut envelopes);
        let result = self
            .inner
            .publish_batch(topic, envelopes)
            .with_context(cx.clone())
            .await;
        finish(&cx, &result);
        result
    }

    async fn publish_delayed(
        &self,
        topic: &str,
        mut envelope: Envelope,
        delay: Delay,
    ) -> Result<()> {
        let cx = self.start(topic, std::slice::from_mut(&mut envelope));
        let result = self
            .inner
            .publish_delayed(topic, envelope, delay)
            .with_context(cx.clone())
            .await;
        finish(&cx, &result);
        result
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Subscriber for TracedBroker<B> {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        self.inner.subscribe(topic, options).await
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Queue for TracedBroker<B> {
    async fn send(&self, queue: &str, mut envelope: Envelope) -> Result<()> {
        let cx = self.start(queue, std::slice::from_mut(&mut envelope));
        let result = self
            .inner
            .send(queue, envelope)
            .with_context(cx.clone())
            .await;
        finish(&cx, &result);
        result
    }

    async fn send_delayed(&self, queue: &str, mut envelope: Envelope, delay: Delay) -> Result<()> {
        let cx = self.start(queue, std::slice::from_mut(&mut envelope));
        let result = self
            .inner
            .send_delayed(queue, envelope, delay)
            .with_context(cx.clone())
            .await;
        finish(&cx, &result);
        result
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        self.inner.consume(queue, options).await
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Requester for TracedBroker<B> {
    async fn request(
        &self,
        topic: &str,
        mut request: Envelope,
        timeout: Duration,
    ) -> Result<Envelope> {
        let cx = self.start(topic, std::slice::from_mut(&mut request));
        let result = self
            .inner
            .request(topic, request, timeout)
            .with_context(cx.clone())
            .await;
        finish(&cx, &result);
        result
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Responder for TracedBroker<B> {
    async fn serve(&self, topic: &str, options: ServeOptions) -> Result<Requests> {
        self.inner.serve(topic, options).await
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Broker for TracedBroker<B> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn backlog(&self, of: &BacklogOf) -> Result<Backlog> {
        self.inner.backlog(of).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
