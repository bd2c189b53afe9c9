//! The producer side: counts and times what a broker sends.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use opentelemetry::KeyValue;

use super::BusMetrics;
use crate::middleware::tracing::semconv::{self, messaging_system};
use crate::{
    Backlog, BacklogOf, Broker, Capabilities, ConsumeOptions, Delay, Envelope, Publisher, Queue,
    Requester, Requests, Responder, Result, ServeOptions, SubscribeOptions, Subscriber,
    Subscription,
};

/// A [`Broker`] that records `messaging.client.sent.messages` and
/// `messaging.client.operation.duration` for [`publish`](Publisher::publish),
/// [`publish_batch`](Publisher::publish_batch) (one message per envelope),
/// [`send`](Queue::send) and [`request`](Requester::request), with `error.type` when the
/// operation failed (see [the module](super)). Everything else is passed through unchanged.
///
/// Stacks with [`TracedBroker`](crate::middleware::tracing::TracedBroker) in either order.
pub struct MeteredBroker<B: ?Sized = dyn Broker> {
    inner: Arc<B>,
    metrics: BusMetrics,
    system: Cow<'static, str>,
}

impl<B: Broker + ?Sized> MeteredBroker<B> {
    /// Records into `metrics` what `inner` sends; `messaging.system` is taken from `inner`'s
    /// [`Capabilities::name`](crate::Capabilities::name).
    #[must_use]
    pub fn new(inner: Arc<B>, metrics: BusMetrics) -> Self {
        let system = messaging_system(inner.capabilities().name);
        Self {
            inner,
            metrics,
            system,
        }
    }
}

impl<B: ?Sized> MeteredBroker<B> {
    /// Sets the `messaging.system` attribute (by default the adapter's name).
    #[must_use]
    pub fn with_system(mut self, system: impl Into<Cow<'static, str>>) -> Self {
        self.system = system.into();
        self
    }

    /// The wrapped broker.
    #[must_use]
    pub fn get_ref(&self) -> &Arc<B> {
        &self.inner
    }

    /// Unwraps the wrapped broker.
    #[must_use]
    pub fn into_inner(self) -> Arc<B> {
        self.inner
    }

    fn record<T>(&self, destination: &str, messages: usize, started: Instant, result: &Result<T>) {
        let mut attributes = vec![
            KeyValue::new(semconv::MESSAGING_SYSTEM, self.system.clone()),
            KeyValue::new(semconv::MESSAGING_DESTINATION_NAME, destination.to_owned()),
            KeyValue::new(
                semconv::MESSAGING_OPERATION_NAME,
                semconv::OPERATION_PUBLISH,
            ),
        ];
        if let Err(error) = result {
            attributes.push(KeyValue::new(semconv::ERROR_TYPE, error.kind().as_str()));
        }
        let instruments = &self.metrics.instruments;
        instruments
            .operation_duration
            .record(started.elapsed().as_secs_f64(), &attributes);
        instruments
            .sent
            .add(u64::try_from(messages).unwrap_or(u64::MAX), &attributes);
    }
}

impl<B: ?Sized + fmt::Debug> fmt::Debug for MeteredBroker<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeteredBroker")
            .field("inner", &self.inner)
            .field("system", &self.system)
            .finish_non_exhaustive()
    }
}

impl<B: ?Sized> Clone for MeteredBroker<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            metrics: self.metrics.clone(),
            system: self.system.clone(),
        }
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Publisher for MeteredBroker<B> {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<()> {
        let started = Instant::now();
        let result = self.inner.publish(topic, envelope).await;
        self.record(topic, 1, started, &result);
        result
    }

    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<()> {
        let started = Instant::now();
        let count = envelopes.len();
        let result = self.inner.publish_batch(topic, envelopes).await;
        self.record(topic, count, started, &result);
        result
    }

    async fn publish_delayed(&self, topic: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        let started = Instant::now();
        let result = self.inner.publish_delayed(topic, envelope, delay).await;
        self.record(topic, 1, started, &result);
        result
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Subscriber for MeteredBroker<B> {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        self.inner.subscribe(topic, options).await
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Queue for MeteredBroker<B> {
    async fn send(&self, queue: &str, envelope: Envelope) -> Result<()> {
        let started = Instant::now();
        let result = self.inner.send(queue, envelope).await;
        self.record(queue, 1, started, &result);
        result
    }

    async fn send_delayed(&self, queue: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        let started = Instant::now();
        let result = self.inner.send_delayed(queue, envelope, delay).await;
        self.record(queue, 1, started, &result);
        result
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        self.inner.consume(queue, options).await
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Requester for MeteredBroker<B> {
    async fn request(&self, topic: &str, request: Envelope, timeout: Duration) -> Result<Envelope> {
        let started = Instant::now();
        let result = self.inner.request(topic, request, timeout).await;
        self.record(topic, 1, started, &result);
        result
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Responder for MeteredBroker<B> {
    async fn serve(&self, topic: &str, options: ServeOptions) -> Result<Requests> {
        self.inner.serve(topic, options).await
    }
}

#[async_trait]
impl<B: Broker + ?Sized> Broker for MeteredBroker<B> {
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
