//! [`Bus`]: a connected broker, shared and cheap to clone.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use bus_core::{
    async_trait, Backlog, BacklogOf, Broker, Capabilities, ConsumeOptions, Delay, Envelope,
    Message, MessageId, Publisher, Queue, Requester, Requests, Responder, Result, ServeOptions,
    SubscribeOptions, Subscriber, Subscription,
};

/// A connection to a broker, as returned by [`connect`](crate::connect) and
/// [`BusConfig::connect`](crate::BusConfig::connect).
///
/// `Bus` wraps an `Arc<dyn Broker>`: clone it freely to share one connection between tasks.
/// Every messaging pattern is available as an inherent method (no trait import needed), plus
/// typed helpers that encode [`Message`]s as JSON. `Bus` also implements [`Broker`] itself and
/// dereferences to `dyn Broker`, so it goes wherever a broker is expected.
///
/// Closing is explicit ([`Bus::close`]) and affects every clone; dropping the last clone
/// drops the connection without the clean shutdown.
#[derive(Clone)]
pub struct Bus {
    broker: Arc<dyn Broker>,
}

impl Bus {
    /// Wraps a broker, for instance an adapter built by hand with its own configuration.
    pub fn new(broker: impl Broker + 'static) -> Self {
        Self {
            broker: Arc::new(broker),
        }
    }

    /// Wraps a broker that is already shared.
    #[must_use]
    pub fn from_arc(broker: Arc<dyn Broker>) -> Self {
        Self { broker }
    }

    /// The broker behind this bus.
    #[must_use]
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// What the broker does natively, emulates, or cannot do.
    #[must_use]
    pub fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }

    /// Closes the connection for every clone of this bus: later operations fail with
    /// [`ErrorKind::Closed`](crate::ErrorKind::Closed), open subscriptions end. Messages
    /// already confirmed are not lost.
    ///
    /// # Errors
    /// When the broker could not be told cleanly (it is closed locally regardless).
    pub async fn close(&self) -> Result<()> {
        self.broker.close().await
    }

    /// Publishes `envelope` to `topic` ([`Publisher::publish`]).
    ///
    /// # Errors
    /// As [`Publisher::publish`].
    ///
    /// # Cancel safety
    /// If the future is dropped, the message may or may not have been published.
    pub async fn publish(&self, topic: &str, envelope: Envelope) -> Result<()> {
        self.broker.publish(topic, envelope).await
    }

    /// Publishes several messages to `topic`, in order ([`Publisher::publish_batch`]).
    ///
    /// # Errors
    /// As [`Publisher::publish_batch`].
    ///
    /// # Cancel safety
    /// If the future is dropped, a prefix of the batch may have been published.
    pub async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<()> {
        self.broker.publish_batch(topic, envelopes).await
    }

    /// Subscribes to `topic` ([`Subscriber::subscribe`]).
    ///
    /// # Errors
    /// As [`Subscriber::subscribe`].
    pub async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        self.broker.subscribe(topic, options).await
    }

    /// Sends `envelope` to the work queue `queue` ([`Queue::send`]).
    ///
    /// # Errors
    /// As [`Queue::send`].
    ///
    /// # Cancel safety
    /// If the future is dropped, the message may or may not have been sent.
    pub async fn send(&self, queue: &str, envelope: Envelope) -> Result<()> {
        self.broker.send(queue, envelope).await
    }

    /// Consumes from the work queue `queue` ([`Queue::consume`]).
    ///
    /// # Errors
    /// As [`Queue::consume`].
    pub async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        self.broker.consume(queue, options).await
    }

    /// Sends `request` to `topic` and waits up to `timeout` for the reply
    /// ([`Requester::request`]).
    ///
    /// # Errors
    /// As [`Requester::request`].
    ///
    /// # Cancel safety
    /// If the future is dropped, the request may still reach a responder; its reply is
    /// discarded.
    pub async fn request(
        &self,
        topic: &str,
        request: Envelope,
        timeout: Duration,
    ) -> Result<Envelope> {
        self.broker.request(topic, request, timeout).await
    }

    /// Starts serving requests sent to `topic` ([`Responder::serve`]).
    ///
    /// # Errors
    /// As [`Responder::serve`].
    pub async fn serve(&self, topic: &str, options: ServeOptions) -> Result<Requests> {
        self.broker.serve(topic, options).await
    }

    /// Encodes `message` as JSON in a new root [`Envelope`] and publishes it to `topic`;
    /// returns the id it was published with.
    ///
    /// To set a key or headers, build the envelope yourself with [`Envelope::encode`] and the
    /// `with_*` methods, and call [`Bus::publish`].
    ///
    /// # Errors
    /// [`ErrorKind::Serialization`](crate::ErrorKind::Serialization) when the message cannot be
    /// encoded; otherwise as [`Publisher::publish`].
    ///
    /// # Cancel safety
    /// As [`Bus::publish`].
    pub async fn publish_message<M: Message>(&self, topic: &str, message: &M) -> Result<MessageId> {
        let envelope = Envelope::encode(message)?;
        let id = envelope.id.clone();
        self.broker.publish(topic, envelope).await?;
        Ok(id)
    }

    /// Encodes `message` as JSON in a new root [`Envelope`] and sends it to the work queue
    /// `queue`; returns the id it was sent with.
    ///
    /// # Errors
    /// [`ErrorKind::Serialization`](crate::ErrorKind::Serialization) when the message cannot be
    /// encoded; otherwise as [`Queue::send`].
    ///
    /// # Cancel safety
    /// As [`Bus::send`].
    pub async fn send_message<M: Message>(&self, queue: &str, message: &M) -> Result<MessageId> {
        let envelope = Envelope::encode(message)?;
        let id = envelope.id.clone();
        self.broker.send(queue, envelope).await?;
        Ok(id)
    }

    /// Sends `request` to `topic` as JSON, waits up to `timeout` for the reply and decodes it
    /// as `R` (checking its kind and schema version, see [`Envelope::decode`]). An error reply
    /// of a [`Service`](crate::Service)'s responder (kind
    /// [`bus.error`](crate::service::ERROR_REPLY_KIND)) becomes the error its handler failed
    /// with, as [`Context::request`](crate::service::Context::request) does (see
    /// [`decode_reply`](crate::service::decode_reply)).
    ///
    /// # Errors
    /// For an error reply, an error of the kind the responder's handler failed with;
    /// [`ErrorKind::Serialization`](crate::ErrorKind::Serialization) when the request cannot be
    /// encoded or the reply is not an `R`; otherwise as [`Requester::request`].
    ///
    /// # Cancel safety
    /// As [`Bus::request`].
    pub async fn request_message<Q: Message, R: Message>(
        &self,
        topic: &str,
        request: &Q,
        timeout: Duration,
    ) -> Result<R> {
        let reply = self
            .broker
            .request(topic, Envelope::encode(request)?, timeout)
            .await?;
        crate::service::decode_reply(&reply)
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Bus").field(&self.broker).finish()
    }
}

impl Deref for Bus {
    type Target = dyn Broker;

    fn deref(&self) -> &Self::Target {
        &*self.broker
    }
}

impl From<Arc<dyn Broker>> for Bus {
    fn from(broker: Arc<dyn Broker>) -> Self {
        Self::from_arc(broker)
    }
}

#[async_trait]
impl Publisher for Bus {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<()> {
        self.broker.publish(topic, envelope).await
    }

    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<()> {
        self.broker.publish_batch(topic, envelopes).await
    }

    async fn publish_delayed(&self, topic: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        self.broker.publish_delayed(topic, envelope, delay).await
    }
}

#[async_trait]
impl Subscriber for Bus {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        self.broker.subscribe(topic, options).await
    }
}

#[async_trait]
impl Queue for Bus {
    async fn send(&self, queue: &str, envelope: Envelope) -> Result<()> {
        self.broker.send(queue, envelope).await
    }

    async fn send_delayed(&self, queue: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        self.broker.send_delayed(queue, envelope, delay).await
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        self.broker.consume(queue, options).await
    }
}

#[async_trait]
impl Requester for Bus {
    async fn request(&self, topic: &str, request: Envelope, timeout: Duration) -> Result<Envelope> {
        self.broker.request(topic, request, timeout).await
    }
}

#[async_trait]
impl Responder for Bus {
    async fn serve(&self, topic: &str, options: ServeOptions) -> Result<Requests> {
        self.broker.serve(topic, options).await
    }
}

#[async_trait]
impl Broker for Bus {
    fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }

    async fn backlog(&self, of: &BacklogOf) -> Result<Backlog> {
        self.broker.backlog(of).await
    }

    async fn close(&self) -> Result<()> {
        self.broker.close().await
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use super::*;
    use bus_core::ErrorKind;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ping {
        n: u32,
    }
    impl Message for Ping {
        const KIND: &'static str = "test.ping";
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Pong {
        n: u32,
    }
    impl Message for Pong {
        const KIND: &'static str = "test.pong";
    }

    fn memory() -> Bus {
        Bus::new(adapter_memory::MemoryBroker::new())
    }

    #[tokio::test]
    async fn typed_publish_reaches_a_group_with_its_id() {
        let bus = memory();
        let mut sub = bus
            .subscribe("pings", SubscribeOptions::group("g"))
            .await
            .unwrap();
        let id = bus.publish_message("pings", &Ping { n: 7 }).await.unwrap();
        let delivery = sub.next().await.unwrap().unwrap();
        assert_eq!(delivery.envelope().id, id);
        assert_eq!(delivery.envelope().decode::<Ping>().unwrap(), Ping { n: 7 });
        delivery.ack().await.unwrap();
    }

    #[tokio::test]
    async fn typed_send_reaches_a_queue_consumer() {
        let bus = memory();
        let id = bus.send_message("work", &Ping { n: 1 }).await.unwrap();
        let mut consumer = bus
            .consume("work", ConsumeOptions::default())
            .await
            .unwrap();
        let delivery = consumer.next().await.unwrap().unwrap();
        assert_eq!(delivery.envelope().id, id);
        delivery.ack().await.unwrap();
    }

    #[tokio::test]
    async fn typed_request_decodes_the_reply() {
        let bus = memory();
        let mut requests = bus.serve("ping", ServeOptions::default()).await.unwrap();
        let responder = tokio::spawn(async move {
            let request = requests.next().await.unwrap().unwrap();
            let ping: Ping = request.envelope().decode().unwrap();
            let pong = Envelope::encode(&Pong { n: ping.n + 1 }).unwrap();
            request.reply(pong).await.unwrap();
        });
        let pong: Pong = bus
            .request_message("ping", &Ping { n: 41 }, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(pong, Pong { n: 42 });
        responder.await.unwrap();
    }

    #[tokio::test]
    async fn a_reply_of_the_wrong_kind_is_a_serialization_error() {
        let bus = memory();
        let mut requests = bus.serve("ping", ServeOptions::default()).await.unwrap();
        let responder = tokio::spawn(async move {
            let request = requests.next().await.unwrap().unwrap();
            let wrong = Envelope::encode(&Ping { n: 0 }).unwrap();
            request.reply(wrong).await.unwrap();
        });
        let err = bus
            .request_message::<Ping, Pong>("ping", &Ping { n: 1 }, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Serialization);
        responder.await.unwrap();
    }

    #[tokio::test]
    async fn close_through_one_clone_closes_all_and_bus_is_a_broker() {
        let bus = memory();
        let clone = bus.clone();
        let as_broker: Arc<dyn Broker> = Arc::new(bus.clone());
        assert_eq!(as_broker.capabilities().name, "memory");
        clone.close().await.unwrap();
        let err = bus.publish_message("t", &Ping { n: 0 }).await.unwrap_err();
        assert!(err.is_closed(), "{err}");
    }
}
