//! [`Context`]: what a service handler knows about the message it handles, and how it
//! publishes the messages that message causes.

use std::sync::Arc;
use std::time::Duration;

use bus_core::runtime::DeliveryInfo;
use bus_core::{headers, Delivery, Envelope, Headers, Message, MessageId, Result};

use crate::Bus;

/// What a [`Service`](super::Service) handler receives beside the decoded message: the
/// delivery's attempt, the whole envelope with its headers, and a way to publish follow-up
/// messages that stay in the handled message's conversation.
///
/// Every message published or sent through the context is marked as caused by the handled
/// one ([`Envelope::caused_by`]): its `correlation_id` is the handled message's correlation
/// id and its `causation_id` the handled message's id. Without tracing middleware, the W3C
/// trace context headers (`traceparent`, `tracestate`) of the handled message are copied too,
/// so the follow-up stays in the same trace. With it (feature `opentelemetry`: a
/// `TracingLayer` on the service runs the handler inside its consumer span), they are not:
/// the `TracedBroker` the bus publishes through writes the context of its producer span, a
/// child of the consumer span, so the next service's consumer span is a child of that
/// producer span. So a chain of events across services stays traceable with no code in the
/// handler:
///
/// ```no_run
/// # use bus::{Message, service::Context};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced { order_id: String }
/// # impl Message for OrderPlaced { const KIND: &'static str = "order.placed"; }
/// # #[derive(serde::Serialize, serde::Deserialize)] struct PaymentRequested { order_id: String }
/// # impl Message for PaymentRequested { const KIND: &'static str = "payment.requested"; }
/// async fn on_order(order: OrderPlaced, ctx: Context) -> bus::Result<()> {
///     ctx.publish("payments", &PaymentRequested { order_id: order.order_id }).await?;
///     Ok(())
/// }
/// ```
///
/// A context is cheap to clone (the envelope's payload is shared) and may outlive the
/// handler, e.g. in a task the handler spawns; publishing through it then still works, but
/// the handled message is settled when the handler returns, not when that task ends.
#[derive(Debug, Clone)]
pub struct Context {
    bus: Bus,
    envelope: Envelope,
    info: DeliveryInfo,
    service: Arc<str>,
}

impl Context {
    pub(crate) fn new(bus: Bus, service: Arc<str>, delivery: &Delivery) -> Self {
        Self {
            bus,
            envelope: delivery.envelope().clone(),
            info: DeliveryInfo::from(delivery),
            service,
        }
    }

    /// Which delivery of the message this is: 1 on the first, 2 after one redelivery or
    /// retry, …
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.info.attempt()
    }

    /// The envelope of the message being handled: id, kind, correlation and causation ids,
    /// key, headers and the raw payload.
    #[must_use]
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The headers of the message being handled.
    #[must_use]
    pub fn headers(&self) -> &Headers {
        &self.envelope.headers
    }

    /// The value of the handled message's header `name`, if present.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.envelope.header(name)
    }

    /// The topic (or queue) the message was received from.
    #[must_use]
    pub fn source(&self) -> &str {
        self.info.source()
    }

    /// The consumer group the message was received in, if any.
    #[must_use]
    pub fn group(&self) -> Option<&str> {
        self.info.group()
    }

    /// The name of the service handling the message.
    #[must_use]
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The bus the service runs on, for what the context does not wrap. Messages published
    /// directly on it are root messages, not caused by the handled one (unless marked with
    /// [`Context::follow_up`]).
    #[must_use]
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Marks `envelope` as caused by the handled message: its correlation id becomes the
    /// handled message's correlation id and its causation id the handled message's id; the
    /// handled message's `traceparent` / `tracestate` headers are copied onto it unless it
    /// carries a `traceparent` of its own (a trace context the caller chose, kept whole as
    /// `TracedBroker` keeps it) or the handler runs inside an OpenTelemetry span (the tracing
    /// middleware's consumer span: then the bus's `TracedBroker` writes its producer span's
    /// context at publish, see [`Context`]). Everything else (id, kind, key, other headers,
    /// payload) is kept.
    ///
    /// [`Context::publish`] and [`Context::send`] do this for typed messages; use it to build
    /// an envelope with a key or headers of its own, then publish it with
    /// [`Context::publish_envelope`] (which calls it again, harmlessly).
    #[must_use]
    pub fn follow_up(&self, envelope: Envelope) -> Envelope {
        let mut envelope = envelope.caused_by(&self.envelope);
        if in_recorded_span() {
            // The tracing middleware runs this handler inside its consumer span: the
            // follow-up's trace context is the producer span the `TracedBroker` opens under
            // it, not the handled message's (which would make the next consumer a child of
            // the previous producer instead of this one).
            return envelope;
        }
        let parent_trace = self.envelope.header(headers::TRACEPARENT);
        if let (Some(traceparent), false) = (
            parent_trace,
            envelope.headers.contains_key(headers::TRACEPARENT),
        ) {
            envelope
                .headers
                .insert(headers::TRACEPARENT.to_owned(), traceparent.to_owned());
            // A `tracestate` belongs to its `traceparent`: take the parent's or none.
            match self.envelope.header(headers::TRACESTATE) {
                Some(state) => envelope
                    .headers
                    .insert(headers::TRACESTATE.to_owned(), state.to_owned()),
                None => envelope.headers.remove(headers::TRACESTATE),
            };
        }
        envelope
    }

    /// Encodes `message` as JSON, marks it as caused by the handled message
    /// ([`Context::follow_up`]) and publishes it to `topic`; returns the id it was published
    /// with.
    ///
    /// # Errors
    /// [`ErrorKind::Serialization`](crate::ErrorKind::Serialization) when the message cannot
    /// be encoded; otherwise as [`Bus::publish`]. Returned with `?` from a handler, a
    /// retryable error (a lost connection, backpressure) makes the handled message be retried.
    ///
    /// # Cancel safety
    /// If the future is dropped, the message may or may not have been published.
    pub async fn publish<M: Message>(&self, topic: &str, message: &M) -> Result<MessageId> {
        self.publish_envelope(topic, Envelope::encode(message)?)
            .await
    }

    /// Marks `envelope` as caused by the handled message ([`Context::follow_up`]) and
    /// publishes it to `topic`; returns its id.
    ///
    /// # Errors
    /// As [`Bus::publish`].
    ///
    /// # Cancel safety
    /// If the future is dropped, the message may or may not have been published.
    pub async fn publish_envelope(&self, topic: &str, envelope: Envelope) -> Result<MessageId> {
        let envelope = self.follow_up(envelope);
        let id = envelope.id.clone();
        self.bus.publish(topic, envelope).await?;
        Ok(id)
    }

    /// Encodes `message` as JSON, marks it as caused by the handled message
    /// ([`Context::follow_up`]) and sends it to the work queue `queue`; returns its id.
    ///
    /// # Errors
    /// [`ErrorKind::Serialization`](crate::ErrorKind::Serialization) when the message cannot
    /// be encoded; otherwise as [`Bus::send`].
    ///
    /// # Cancel safety
    /// If the future is dropped, the message may or may not have been sent.
    pub async fn send<M: Message>(&self, queue: &str, message: &M) -> Result<MessageId> {
        let envelope = self.follow_up(Envelope::encode(message)?);
        let id = envelope.id.clone();
        self.bus.send(queue, envelope).await?;
        Ok(id)
    }

    /// Sends `request` to the request channel `topic`, marked as caused by the handled
    /// message ([`Context::follow_up`]: its correlation id, its id as causation id, its trace
    /// context), waits up to `timeout` for the reply and decodes it as `R`
    /// ([`decode_reply`](super::decode_reply)).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use bus::{Message, service::Context};
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced { sku: String }
    /// # impl Message for OrderPlaced { const KIND: &'static str = "order.placed"; }
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct GetQuote { sku: String }
    /// # impl Message for GetQuote { const KIND: &'static str = "quote.get"; }
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Quote { cents: u64 }
    /// # impl Message for Quote { const KIND: &'static str = "quote"; }
    /// async fn on_order(order: OrderPlaced, ctx: Context) -> bus::Result<()> {
    ///     let quote: Quote = ctx
    ///         .request("quotes", &GetQuote { sku: order.sku }, Duration::from_secs(2))
    ///         .await?;
    ///     println!("{} cents", quote.cents);
    ///     Ok(())
    /// }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Serialization`](crate::ErrorKind::Serialization) when the request cannot
    /// be encoded or the reply is not an `R`; the error of the responder's handler when it
    /// answered with an error reply (a [`Service`](super::Service) responder does); otherwise
    /// as [`Bus::request`] ([`Timeout`](crate::ErrorKind::Timeout),
    /// [`NoResponders`](crate::ErrorKind::NoResponders), …). A timeout returned with `?` from
    /// a handler is retryable: the handled message is retried.
    ///
    /// # Cancel safety
    /// If the future is dropped, the request may still reach a responder; its reply is
    /// discarded.
    pub async fn request<Q: Message, R: Message>(
        &self,
        topic: &str,
        request: &Q,
        timeout: Duration,
    ) -> Result<R> {
        let envelope = self.follow_up(Envelope::encode(request)?);
        let reply = self.bus.request(topic, envelope, timeout).await?;
        super::decode_reply(&reply)
    }
}

/// Whether the handler runs inside a valid OpenTelemetry span: the consumer span that the
/// tracing middleware attaches as the current context while the handler runs.
#[cfg(feature = "opentelemetry")]
fn in_recorded_span() -> bool {
    use opentelemetry::trace::TraceContextExt as _;
    opentelemetry::Context::current()
        .span()
        .span_context()
        .is_valid()
}

/// Without the `opentelemetry` feature there is no tracing middleware to run inside.
#[cfg(not(feature = "opentelemetry"))]
fn in_recorded_span() -> bool {
    false
}
