//! The broker-facing traits every adapter implements.

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::{Backlog, BacklogOf, Capabilities, Delivery, Envelope, Error, Result};

/// When a delayed message ([`Publisher::publish_delayed`], [`Queue::send_delayed`]) becomes
/// deliverable: after a while, or not before a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delay {
    /// This long after the broker accepted it.
    For(Duration),
    /// Not before this moment (at once if it has passed).
    Until(SystemTime),
}

impl Delay {
    /// How long from `now` until the message is due: zero once it is.
    #[must_use]
    pub fn remaining(self, now: SystemTime) -> Duration {
        match self {
            Delay::For(delay) => delay,
            Delay::Until(at) => at.duration_since(now).unwrap_or(Duration::ZERO),
        }
    }

    /// The moment the message is due, counting a [`Delay::For`] from `now`; a delay too long
    /// for the clock is due in a thousand years.
    #[must_use]
    pub fn due(self, now: SystemTime) -> SystemTime {
        const FAR: Duration = Duration::from_secs(1000 * 365 * 24 * 3600);
        match self {
            Delay::For(delay) => now
                .checked_add(delay)
                .unwrap_or_else(|| now.checked_add(FAR).unwrap_or(now)),
            Delay::Until(at) => at,
        }
    }
}

impl From<Duration> for Delay {
    fn from(delay: Duration) -> Self {
        Delay::For(delay)
    }
}

impl From<SystemTime> for Delay {
    fn from(at: SystemTime) -> Self {
        Delay::Until(at)
    }
}

/// Options for [`Subscriber::subscribe`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// The consumer group. Every group gets every message; the members of one group share
    /// them. `None` makes a private group for this subscription alone, removed when it closes.
    pub group: Option<String>,
    /// How many unsettled deliveries the adapter may hold for this subscriber (broker prefetch,
    /// e.g. RabbitMQ `basic.qos`); `None` leaves the adapter's default.
    pub prefetch: Option<usize>,
}

impl SubscribeOptions {
    /// Options for a subscription in `group`.
    #[must_use]
    pub fn group(group: impl Into<String>) -> Self {
        Self {
            group: Some(group.into()),
            ..Self::default()
        }
    }

    /// Sets the group.
    #[must_use]
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Sets the prefetch.
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = Some(prefetch);
        self
    }
}

/// Options for [`Queue::consume`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumeOptions {
    /// How many unsettled deliveries the adapter may hold for this consumer; `None` leaves the
    /// adapter's default.
    pub prefetch: Option<usize>,
}

impl ConsumeOptions {
    /// Sets the prefetch.
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = Some(prefetch);
        self
    }
}

/// Options for [`Responder::serve`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServeOptions {
    /// Responders in the same group share requests (each request to one of them). `None`
    /// joins the default group of the topic.
    pub group: Option<String>,
}

impl ServeOptions {
    /// Sets the group.
    #[must_use]
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
}

/// What an adapter implements behind a [`Subscription`]: a source of deliveries.
#[async_trait]
pub trait DeliverySource: Send + fmt::Debug {
    /// The next delivery, or `None` once the subscription or the bus is closed.
    ///
    /// # Cancel safety
    /// Must be cancel safe: if the future is dropped, no message is lost (it stays with the
    /// broker or in the source's buffer).
    async fn next(&mut self) -> Option<Result<Delivery>>;

    /// A delivery the source can hand out at once, without waiting, or `None` when it has
    /// none ready (a closed source has none either: [`next`](Self::next) then says it is
    /// closed). A source that holds received messages in a buffer implements it so that the
    /// [`Consumer`](crate::Consumer) takes them without a future per delivery. The default
    /// has none: every delivery comes through `next`.
    ///
    /// It may be answered without registering any waker: a caller that found nothing waits
    /// through `next`, never by calling `try_next` again after a wake-up.
    fn try_next(&mut self) -> Option<Result<Delivery>> {
        None
    }

    /// Stops receiving. Deliveries already handed out can still be settled.
    async fn close(&mut self) -> Result<()>;

    /// How long the broker leaves a delivery with this consumer, unsettled, before it hands
    /// the message to another (NATS ack wait, SQS visibility timeout), where there is such a
    /// timer and [`Delivery::in_progress`] restarts it. The [`Consumer`](crate::Consumer)
    /// calls `in_progress` well within it for every delivery it holds. The default is `None`:
    /// the broker keeps an unsettled delivery with its consumer as long as the connection
    /// lives.
    fn lease(&self) -> Option<Duration> {
        None
    }

    /// Whether the broker hands this subscription the messages of one key in the order they
    /// were published (memory, a Kafka partition, a JetStream consumer, a RabbitMQ queue, an
    /// SQS FIFO message group). The [`Consumer`](crate::Consumer) then keeps that order across
    /// failures by default ([`KeyOrder::Ordered`](crate::runtime::KeyOrder::Ordered)). The
    /// default is `false`: nothing to keep.
    fn keeps_key_order(&self) -> bool {
        false
    }
}

/// A stream of [`Delivery`] from a topic (in a group) or a queue.
///
/// Dropping it closes it. Deliveries already received stay valid and must still be settled;
/// unsettled ones are redelivered to the group.
#[derive(Debug)]
pub struct Subscription {
    source: Box<dyn DeliverySource>,
    closed: bool,
}

impl Subscription {
    /// Made by adapters.
    #[must_use]
    pub fn new(source: Box<dyn DeliverySource>) -> Self {
        Self {
            source,
            closed: false,
        }
    }

    /// The next delivery; `None` once closed.
    ///
    /// # Errors
    /// An item is an error when the adapter could not receive (e.g. the connection was lost
    /// and is being re-established); the subscription stays usable.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future loses no message.
    pub async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.closed {
            return None;
        }
        self.source.next().await
    }

    /// A delivery that is ready now, without waiting, or `None` when none is (or the
    /// subscription is closed: [`next`](Subscription::next) tells those apart). Sources that
    /// do not buffer what they receive always answer `None`. To wait for a delivery, call
    /// `next`: `try_next` registers no wake-up.
    ///
    /// # Errors
    /// As [`next`](Subscription::next).
    #[must_use = "a delivery dropped unsettled is redelivered"]
    pub fn try_next(&mut self) -> Option<Result<Delivery>> {
        if self.closed {
            return None;
        }
        self.source.try_next()
    }

    /// Stops receiving; later calls to [`next`](Subscription::next) return `None`.
    ///
    /// # Errors
    /// When the broker could not be told (the subscription is closed locally regardless).
    pub async fn close(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        self.source.close().await
    }

    /// How long the broker leaves a delivery unsettled before redelivering it elsewhere, if it
    /// has such a timer (see [`DeliverySource::lease`]).
    #[must_use]
    pub fn lease(&self) -> Option<Duration> {
        self.source.lease()
    }

    /// Whether the broker hands this subscription the messages of one key in publish order
    /// (see [`DeliverySource::keeps_key_order`]).
    #[must_use]
    pub fn keeps_key_order(&self) -> bool {
        self.source.keeps_key_order()
    }

    /// The deliveries as a [`futures::Stream`], for use with stream combinators.
    #[must_use]
    pub fn into_stream(self) -> BoxStream<'static, Result<Delivery>> {
        Box::pin(futures::stream::unfold(self, |mut sub| async move {
            sub.next().await.map(|item| (item, sub))
        }))
    }
}

/// Publishes messages to topics.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes `envelope` to `topic`. Returns once the broker has accepted it (confirmed,
    /// acknowledged, or stored, as the broker allows): a returned `Ok` is never lost by `bus`.
    ///
    /// # Errors
    /// [`PayloadTooLarge`](crate::ErrorKind::PayloadTooLarge),
    /// [`HeadersTooLarge`](crate::ErrorKind::HeadersTooLarge),
    /// [`Closed`](crate::ErrorKind::Closed) after close, connection and timeout errors.
    ///
    /// # Cancel safety
    /// If the future is dropped, the message may or may not have been published.
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<()>;

    /// Publishes several messages to `topic`, in order. The default publishes them one by one;
    /// adapters override it with the broker's batch API.
    ///
    /// # Errors
    /// As [`publish`](Publisher::publish); on error, a prefix of the batch may have been
    /// published.
    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<()> {
        for envelope in envelopes {
            self.publish(topic, envelope).await?;
        }
        Ok(())
    }

    /// Publishes `envelope` to `topic` to be delivered once `delay` has passed, natively or
    /// emulated as [`Capabilities::delayed_publish`] says, up to
    /// [`Capabilities::max_delay`]. Returns once the broker holds it, as
    /// [`publish`](Publisher::publish) does. The default returns
    /// [`Unsupported`](crate::ErrorKind::Unsupported).
    ///
    /// # Errors
    /// As [`publish`](Publisher::publish);
    /// [`Unsupported`](crate::ErrorKind::Unsupported) where the adapter has no delayed
    /// publish or `delay` is longer than it can hold.
    ///
    /// # Cancel safety
    /// As [`publish`](Publisher::publish).
    async fn publish_delayed(&self, topic: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        let _ = (topic, envelope, delay);
        Err(Error::unsupported("this adapter has no delayed publish"))
    }
}

/// Subscribes to topics.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Subscribes to `topic`. A named group receives the messages published after the group
    /// first subscribed, whether or not a member is connected at the time (on durable
    /// adapters).
    ///
    /// # Errors
    /// Connection errors, [`Closed`](crate::ErrorKind::Closed) after close.
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription>;
}

/// Point-to-point work queues: each message to one consumer.
#[async_trait]
pub trait Queue: Send + Sync {
    /// Sends `envelope` to `queue`, creating the queue if needed. Messages wait in the queue
    /// until consumed.
    ///
    /// # Errors
    /// As [`Publisher::publish`].
    ///
    /// # Cancel safety
    /// As [`Publisher::publish`].
    async fn send(&self, queue: &str, envelope: Envelope) -> Result<()>;

    /// Sends `envelope` to `queue` to be delivered once `delay` has passed, as
    /// [`Publisher::publish_delayed`] does for topics. The default returns
    /// [`Unsupported`](crate::ErrorKind::Unsupported).
    ///
    /// # Errors
    /// As [`send`](Queue::send); [`Unsupported`](crate::ErrorKind::Unsupported) where the
    /// adapter has no delayed send or `delay` is longer than it can hold.
    ///
    /// # Cancel safety
    /// As [`Publisher::publish`].
    async fn send_delayed(&self, queue: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        let _ = (queue, envelope, delay);
        Err(Error::unsupported("this adapter has no delayed send"))
    }

    /// Consumes from `queue`, competing with its other consumers.
    ///
    /// # Errors
    /// Connection errors, [`Closed`](crate::ErrorKind::Closed) after close.
    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription>;
}

/// Sends requests and waits for replies.
#[async_trait]
pub trait Requester: Send + Sync {
    /// Sends `request` to `topic` and waits up to `timeout` for the reply, which is tied to the
    /// request by its correlation id.
    ///
    /// # Errors
    /// [`Timeout`](crate::ErrorKind::Timeout) when no reply came in time,
    /// [`NoResponders`](crate::ErrorKind::NoResponders) where the adapter can tell nobody
    /// serves the topic, [`Unsupported`](crate::ErrorKind::Unsupported) where the adapter has
    /// no request-reply.
    ///
    /// # Cancel safety
    /// If the future is dropped, the request may still reach a responder; its reply is
    /// discarded.
    async fn request(&self, topic: &str, request: Envelope, timeout: Duration) -> Result<Envelope>;
}

/// What an adapter implements to answer one request.
#[async_trait]
pub trait Reply: Send + Sync + fmt::Debug {
    /// Sends `response` back to the requester.
    async fn reply(&self, response: Envelope) -> Result<()>;
}

/// One request received by a responder, to be answered with [`Request::reply`].
#[derive(Debug)]
pub struct Request {
    envelope: Envelope,
    reply: Box<dyn Reply>,
}

impl Request {
    /// Made by adapters.
    #[must_use]
    pub fn new(envelope: Envelope, reply: Box<dyn Reply>) -> Self {
        Self { envelope, reply }
    }

    /// The request message.
    #[must_use]
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Answers the request. The response is marked as caused by the request (same
    /// correlation id, causation id = the request's id), whatever it carried before.
    ///
    /// # Errors
    /// When the reply could not be sent (the requester may have timed out already, in which
    /// case most brokers drop the reply silently instead).
    pub async fn reply(self, response: Envelope) -> Result<()> {
        let response = response.caused_by(&self.envelope);
        self.reply.reply(response).await
    }
}

/// What an adapter implements behind [`Requests`].
#[async_trait]
pub trait RequestSource: Send + fmt::Debug {
    /// The next request, or `None` once closed.
    ///
    /// # Cancel safety
    /// Must be cancel safe.
    async fn next(&mut self) -> Option<Result<Request>>;

    /// Stops serving.
    async fn close(&mut self) -> Result<()>;
}

/// A stream of [`Request`]s for a responder.
#[derive(Debug)]
pub struct Requests {
    source: Box<dyn RequestSource>,
    closed: bool,
}

impl Requests {
    /// Made by adapters.
    #[must_use]
    pub fn new(source: Box<dyn RequestSource>) -> Self {
        Self {
            source,
            closed: false,
        }
    }

    /// The next request; `None` once closed.
    ///
    /// # Errors
    /// An item is an error when the adapter could not receive; the stream stays usable.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn next(&mut self) -> Option<Result<Request>> {
        if self.closed {
            return None;
        }
        self.source.next().await
    }

    /// Stops serving; later calls to [`next`](Requests::next) return `None`.
    ///
    /// # Errors
    /// When the broker could not be told.
    pub async fn close(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        self.source.close().await
    }
}

/// Serves requests.
#[async_trait]
pub trait Responder: Send + Sync {
    /// Starts serving requests sent to `topic`.
    ///
    /// # Errors
    /// [`Unsupported`](crate::ErrorKind::Unsupported) where the adapter has no request-reply,
    /// connection errors, [`Closed`](crate::ErrorKind::Closed) after close.
    async fn serve(&self, topic: &str, options: ServeOptions) -> Result<Requests>;
}

/// A whole broker connection: every messaging pattern, its capabilities, and close.
///
/// This is what [`bus::connect`](https://docs.rs/bus) returns (behind an `Arc`), and what the
/// conformance suite tests. It is object safe.
#[async_trait]
pub trait Broker: Publisher + Subscriber + Queue + Requester + Responder + fmt::Debug {
    /// What this adapter can do.
    fn capabilities(&self) -> Capabilities;

    /// How many messages wait for a consumer group on a topic, or in a queue, as the broker
    /// counts them (see [`Backlog`]); [`Capabilities::backlog`] says whether the adapter can
    /// tell. The default returns [`Unsupported`](crate::ErrorKind::Unsupported).
    ///
    /// # Errors
    /// [`Unsupported`](crate::ErrorKind::Unsupported) where the adapter cannot count;
    /// [`NotFound`](crate::ErrorKind::NotFound) for a group or queue the broker does not know;
    /// connection errors.
    async fn backlog(&self, of: &BacklogOf) -> Result<Backlog> {
        let _ = of;
        Err(Error::unsupported("this adapter cannot count its backlog"))
    }

    /// Closes the connection: later operations fail with
    /// [`Closed`](crate::ErrorKind::Closed), open subscriptions end. Messages already
    /// confirmed are not lost.
    ///
    /// # Errors
    /// When the broker could not be told cleanly.
    async fn close(&self) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_is_due_after_it_and_never_overflows() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let second = Duration::from_secs(1);
        assert_eq!(Delay::For(second).due(now), now + second);
        assert_eq!(Delay::Until(now).due(now + second), now);
        assert_eq!(Delay::Until(now + second).remaining(now), second);
        assert_eq!(Delay::Until(now).remaining(now + second), Duration::ZERO);
        // Longer than the clock can count: far away, not a panic.
        assert!(Delay::For(Duration::MAX).due(now) > now + Duration::from_secs(1 << 32));
    }
}
