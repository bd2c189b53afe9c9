//! A test harness for services: an in-process bus that records what is published, sent and
//! consumed on it, and waits for it by message type.
//!
//! A test builds its [`Service`](super::Service) on [`TestHarness::bus`], starts it, sends
//! it a message, and awaits what it should have done:
//!
//! ```
//! use bus::{Message, Service, service::{Context, testing::TestHarness}};
//!
//! #[derive(Debug, serde::Serialize, serde::Deserialize)]
//! struct OrderPlaced { order_id: String }
//! impl Message for OrderPlaced { const KIND: &'static str = "order.placed"; }
//!
//! #[derive(Debug, serde::Serialize, serde::Deserialize)]
//! struct PaymentRequested { order_id: String }
//! impl Message for PaymentRequested { const KIND: &'static str = "payment.requested"; }
//!
//! async fn request_payment(order: OrderPlaced, ctx: Context) -> bus::Result<()> {
//!     ctx.publish("payments", &PaymentRequested { order_id: order.order_id }).await?;
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> bus::Result<()> {
//! let harness = TestHarness::new();
//! let service = Service::new("billing", harness.bus()).on("orders", request_payment).start().await?;
//!
//! let order = harness.publish("orders", &OrderPlaced { order_id: "o-1".into() }).await?;
//!
//! let consumed = harness.acked::<OrderPlaced>().await;
//! assert_eq!(consumed.envelope.id, order);
//! let payment = harness.published::<PaymentRequested>().await;
//! assert_eq!(payment.destination, "payments");
//! assert_eq!(payment.message.order_id, "o-1");
//! assert_eq!(payment.envelope.causation_id.as_ref(), Some(&order));
//!
//! service.stop().await;
//! # Ok(())
//! # }
//! ```
//!
//! Each wait returns the first recorded message of its type that matches, at once if it was
//! recorded already, and panics after the harness's timeout (default
//! [`DEFAULT_TIMEOUT`]) with what was recorded instead, so a failing test says what
//! happened. Messages whose payload does not decode as the awaited type are not matched.
//! Requests and the replies of responders are recorded too
//! ([`requested`](TestHarness::requested), [`replied`](TestHarness::replied)).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use adapter_memory::MemoryBroker;
use bus_core::{
    async_trait, Backlog, BacklogOf, Broker, Capabilities, ConsumeOptions, Delay, Delivery,
    DeliverySource, Envelope, Error, ErrorKind, Message, MessageId, Publisher, Queue, Reply,
    Request, RequestSource, Requester, Requests, Responder, Result, ServeOptions, Settle,
    Settlement, SubscribeOptions, Subscriber, Subscription,
};
use tokio::sync::{watch, Mutex};

use crate::Bus;

/// How long a [`TestHarness`] waits for a message unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// An in-process bus (`memory://`) that records what is published, sent and consumed on it;
/// see the [module docs](self).
///
/// Cheap to clone: every clone records into, and waits on, the same log.
#[derive(Clone)]
pub struct TestHarness {
    bus: Bus,
    log: Arc<watch::Sender<Log>>,
    fault: Arc<watch::Sender<Option<ErrorKind>>>,
    timeout: Duration,
}

/// One message published to a topic or sent to a queue, as a test awaits it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Recorded<M> {
    /// The decoded message.
    pub message: M,
    /// Its envelope: ids, correlation and causation, key, headers.
    pub envelope: Envelope,
    /// The topic it was published to, or the queue it was sent to.
    pub destination: String,
}

/// One message a consumer settled, as a test awaits it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Consumed<M> {
    /// The decoded message.
    pub message: M,
    /// Its envelope.
    pub envelope: Envelope,
    /// The topic or queue it was received from.
    pub source: String,
    /// The consumer group it was received in (`None` on a queue).
    pub group: Option<String>,
    /// How the consumer settled it: acked, handed back for a retry, or dead-lettered with a
    /// reason.
    pub settlement: Settlement,
}

impl<M> Consumed<M> {
    /// Whether the consumer acknowledged it (its handler succeeded).
    #[must_use]
    pub fn is_acked(&self) -> bool {
        self.settlement == Settlement::Ack
    }

    /// Why it was dead-lettered, if it was.
    #[must_use]
    pub fn dead_letter_reason(&self) -> Option<&str> {
        match &self.settlement {
            Settlement::Reject { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// What the harness recorded, in order.
#[derive(Debug, Default)]
struct Log {
    published: Vec<Sent>,
    sent: Vec<Sent>,
    consumed: Vec<Settled>,
    requested: Vec<Sent>,
    replied: Vec<Sent>,
}

#[derive(Debug, Clone)]
struct Sent {
    destination: String,
    envelope: Envelope,
}

#[derive(Debug, Clone)]
struct Settled {
    source: String,
    group: Option<String>,
    envelope: Envelope,
    settlement: Settlement,
}

impl TestHarness {
    /// A harness on a new in-process broker with the default configuration.
    #[must_use]
    pub fn new() -> Self {
        Self::with_memory(MemoryBroker::new())
    }

    /// A harness on `broker`: an in-process broker of your configuration (capacity, chaos).
    #[must_use]
    pub fn with_memory(broker: MemoryBroker) -> Self {
        let log = Arc::new(watch::channel(Log::default()).0);
        let fault = Arc::new(watch::channel(None).0);
        let recording = Recording {
            inner: Arc::new(broker),
            log: log.clone(),
            fault: fault.clone(),
        };
        Self {
            bus: Bus::new(recording),
            log,
            fault,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Waits at most `timeout` for each awaited message (default [`DEFAULT_TIMEOUT`]).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The recorded bus: build the services under test on it, and publish through it.
    #[must_use]
    pub fn bus(&self) -> Bus {
        self.bus.clone()
    }

    /// Publishes `message` to `topic` as a new root message; returns its id.
    ///
    /// # Errors
    /// As [`Bus::publish_message`].
    pub async fn publish<M: Message>(&self, topic: &str, message: &M) -> Result<MessageId> {
        self.bus.publish_message(topic, message).await
    }

    /// Sends `message` to the work queue `queue` as a new root message; returns its id.
    ///
    /// # Errors
    /// As [`Bus::send_message`].
    pub async fn send<M: Message>(&self, queue: &str, message: &M) -> Result<MessageId> {
        self.bus.send_message(queue, message).await
    }

    /// Makes every subscription and queue consumer on the harness's bus fail to receive,
    /// with an error of `kind` (e.g. [`ErrorKind::Connection`]), until
    /// [`heal`](TestHarness::heal): what a lost broker connection looks like to a consumer,
    /// to test what a service reports ([`ServiceHandle::health`](super::ServiceHandle::health))
    /// meanwhile. Messages published in the meantime wait in the broker.
    pub fn fail_receiving(&self, kind: ErrorKind) {
        self.fault.send_replace(Some(kind));
    }

    /// Ends [`fail_receiving`](TestHarness::fail_receiving): subscriptions receive again.
    pub fn heal(&self) {
        self.fault.send_replace(None);
    }

    /// The first `M` published to any topic, waiting for it.
    ///
    /// # Panics
    /// When none was published within the timeout; the message lists what was.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads the log.
    pub async fn published<M: Message>(&self) -> Recorded<M> {
        self.wait::<M, _>("published", |log| find_sent(&log.published, |_| true))
            .await
    }

    /// The first `M` sent to any queue, waiting for it.
    ///
    /// # Panics
    /// When none was sent within the timeout; the message lists what was.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads the log.
    pub async fn sent<M: Message>(&self) -> Recorded<M> {
        self.wait::<M, _>("sent", |log| find_sent(&log.sent, |_| true))
            .await
    }

    /// The first `M` a consumer settled, however (acked, retried or dead-lettered), waiting
    /// for it.
    ///
    /// # Panics
    /// When none was consumed within the timeout; the message lists what was.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads the log.
    pub async fn consumed<M: Message>(&self) -> Consumed<M> {
        self.wait::<M, _>("consumed", |log| find_consumed(&log.consumed, |_| true))
            .await
    }

    /// The first `M` a consumer acknowledged (its handler succeeded), waiting for it.
    ///
    /// # Panics
    /// When none was acknowledged within the timeout; the message lists what was consumed.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads the log.
    pub async fn acked<M: Message>(&self) -> Consumed<M> {
        self.wait::<M, _>("acked", |log| {
            find_consumed(&log.consumed, |s| s.settlement == Settlement::Ack)
        })
        .await
    }

    /// The first `M` a consumer dead-lettered, waiting for it.
    ///
    /// # Panics
    /// When none was dead-lettered within the timeout; the message lists what was consumed.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads the log.
    pub async fn dead_lettered<M: Message>(&self) -> Consumed<M> {
        self.wait::<M, _>("dead-lettered", |log| {
            find_consumed(&log.consumed, |s| {
                matches!(s.settlement, Settlement::Reject { .. })
            })
        })
        .await
    }

    /// The first `M` published to any topic for which `condition` holds, waiting for it:
    /// for a test that publishes one type several times.
    ///
    /// ```
    /// # use bus::{Message, service::testing::TestHarness};
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced { order_id: String }
    /// # impl Message for OrderPlaced { const KIND: &'static str = "order.placed"; }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> bus::Result<()> {
    /// let harness = TestHarness::new();
    /// for id in ["o-1", "o-2"] {
    ///     harness.publish("orders", &OrderPlaced { order_id: id.into() }).await?;
    /// }
    /// let second = harness.published_where(|o: &OrderPlaced| o.order_id == "o-2").await;
    /// assert_eq!(second.destination, "orders");
    /// # Ok(()) }
    /// ```
    ///
    /// # Panics
    /// When none was published within the timeout; the message lists what was.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads the log.
    pub async fn published_where<M: Message>(&self, condition: impl Fn(&M) -> bool) -> Recorded<M> {
        self.wait::<M, _>("published (matching the condition)", |log| {
            log.published
                .iter()
                .filter_map(recorded::<M>)
                .find(|r| condition(&r.message))
        })
        .await
    }

    /// The first `M` a consumer settled (however) for which `condition` holds, waiting for
    /// it.
    ///
    /// # Panics
    /// When none was consumed within the timeout; the message lists what was.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads the log.
    pub async fn consumed_where<M: Message>(
        &self,
        condition: impl Fn(&Consumed<M>) -> bool,
    ) -> Consumed<M> {
        self.wait::<M, _>("consumed (matching the condition)", |log| {
            log.consumed
                .iter()
                .filter_map(consumed_as::<M>)
                .find(|c| condition(c))
        })
        .await
    }

    /// The first request of type `M` sent to any request channel (through
    /// [`Context::request`](super::Context::request) or [`Bus::request`]), waiting for it.
    ///
    /// # Panics
    /// When none was sent within the timeout; the message lists what was recorded.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads the log.
    pub async fn requested<M: Message>(&self) -> Recorded<M> {
        self.wait::<M, _>("requested", |log| find_sent(&log.requested, |_| true))
            .await
    }

    /// The first reply of type `M` a responder on the harness's bus sent (its
    /// `destination` is the request channel), waiting for it. A service's error replies
    /// are of kind [`ERROR_REPLY_KIND`](super::ERROR_REPLY_KIND).
    ///
    /// # Panics
    /// When none was sent within the timeout; the message lists what was recorded.
    ///
    /// # Cancel safety
    /// Cancel safe: it only reads the log.
    pub async fn replied<M: Message>(&self) -> Recorded<M> {
        self.wait::<M, _>("replied", |log| find_sent(&log.replied, |_| true))
            .await
    }

    /// Every `M` published so far, in order, without waiting.
    #[must_use]
    pub fn published_all<M: Message>(&self) -> Vec<Recorded<M>> {
        all_sent(&self.log.borrow().published)
    }

    /// Every `M` sent to a queue so far, in order, without waiting.
    #[must_use]
    pub fn sent_all<M: Message>(&self) -> Vec<Recorded<M>> {
        all_sent(&self.log.borrow().sent)
    }

    /// Every settlement of an `M` by a consumer so far (one per attempt), in order, without
    /// waiting.
    #[must_use]
    pub fn consumed_all<M: Message>(&self) -> Vec<Consumed<M>> {
        self.log
            .borrow()
            .consumed
            .iter()
            .filter_map(consumed_as)
            .collect()
    }

    async fn wait<M: Message, T>(&self, what: &str, find: impl Fn(&Log) -> Option<T>) -> T {
        let mut log = self.log.subscribe();
        let found = tokio::time::timeout(self.timeout, async {
            // Never errs: `self` holds the sender.
            let log = log.wait_for(|log| find(log).is_some()).await;
            log.ok().and_then(|log| find(&log))
        })
        .await;
        if let Ok(Some(found)) = found {
            return found;
        }
        let log = self.log.borrow();
        panic!(
            "no `{}` message ({}) was {what} within {:?}; the harness recorded:\n{}",
            M::KIND,
            std::any::type_name::<M>(),
            self.timeout,
            Summary(&log)
        )
    }
}

impl Default for TestHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for TestHarness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let log = self.log.borrow();
        f.debug_struct("TestHarness")
            .field("published", &log.published.len())
            .field("sent", &log.sent.len())
            .field("consumed", &log.consumed.len())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn recorded<M: Message>(sent: &Sent) -> Option<Recorded<M>> {
    if sent.envelope.kind != M::KIND {
        return None;
    }
    Some(Recorded {
        message: sent.envelope.decode().ok()?,
        envelope: sent.envelope.clone(),
        destination: sent.destination.clone(),
    })
}

fn find_sent<M: Message>(log: &[Sent], keep: impl Fn(&Sent) -> bool) -> Option<Recorded<M>> {
    log.iter().filter(|s| keep(s)).find_map(recorded)
}

fn all_sent<M: Message>(log: &[Sent]) -> Vec<Recorded<M>> {
    log.iter().filter_map(recorded).collect()
}

fn consumed_as<M: Message>(settled: &Settled) -> Option<Consumed<M>> {
    if settled.envelope.kind != M::KIND {
        return None;
    }
    Some(Consumed {
        message: settled.envelope.decode().ok()?,
        envelope: settled.envelope.clone(),
        source: settled.source.clone(),
        group: settled.group.clone(),
        settlement: settled.settlement.clone(),
    })
}

fn find_consumed<M: Message>(
    log: &[Settled],
    keep: impl Fn(&Settled) -> bool,
) -> Option<Consumed<M>> {
    log.iter().filter(|s| keep(s)).find_map(consumed_as)
}

/// What the harness recorded, for a failure message: counts by destination and kind.
struct Summary<'a>(&'a Log);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut any = false;
        let mut section = |f: &mut fmt::Formatter<'_>,
                           title: &str,
                           lines: BTreeMap<String, usize>|
         -> fmt::Result {
            if lines.is_empty() {
                return Ok(());
            }
            any = true;
            writeln!(f, "  {title}:")?;
            for (line, count) in lines {
                writeln!(f, "    {line} x{count}")?;
            }
            Ok(())
        };
        let count = |items: Vec<String>| {
            let mut lines = BTreeMap::new();
            for item in items {
                *lines.entry(item).or_insert(0) += 1;
            }
            lines
        };
        let sent = |log: &[Sent]| {
            count(
                log.iter()
                    .map(|s| format!("`{}` to {}", s.envelope.kind, s.destination))
                    .collect(),
            )
        };
        section(f, "published", sent(&self.0.published))?;
        section(f, "sent", sent(&self.0.sent))?;
        section(f, "requested", sent(&self.0.requested))?;
        section(f, "replied", sent(&self.0.replied))?;
        let consumed = count(
            self.0
                .consumed
                .iter()
                .map(|s| {
                    let how = match &s.settlement {
                        Settlement::Ack => "acked".to_owned(),
                        Settlement::Reject { reason, .. } => format!("dead-lettered ({reason})"),
                        other => format!("{other:?}"),
                    };
                    format!("`{}` from {}: {how}", s.envelope.kind, s.source)
                })
                .collect(),
        );
        section(f, "consumed", consumed)?;
        if !any {
            writeln!(f, "  nothing")?;
        }
        Ok(())
    }
}

/// The broker behind a [`TestHarness`]'s bus: the in-process broker, recording.
#[derive(Debug)]
struct Recording {
    inner: Arc<MemoryBroker>,
    log: Arc<watch::Sender<Log>>,
    fault: Arc<watch::Sender<Option<ErrorKind>>>,
}

#[async_trait]
impl Publisher for Recording {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<()> {
        self.inner.publish(topic, envelope.clone()).await?;
        let sent = Sent {
            destination: topic.to_owned(),
            envelope,
        };
        self.log.send_modify(|log| log.published.push(sent));
        Ok(())
    }

    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<()> {
        for envelope in envelopes {
            self.publish(topic, envelope).await?;
        }
        Ok(())
    }

    /// Recorded as published when the broker takes it, not when it becomes due.
    async fn publish_delayed(&self, topic: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        self.inner
            .publish_delayed(topic, envelope.clone(), delay)
            .await?;
        let sent = Sent {
            destination: topic.to_owned(),
            envelope,
        };
        self.log.send_modify(|log| log.published.push(sent));
        Ok(())
    }
}

#[async_trait]
impl Subscriber for Recording {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        let inner = self.inner.subscribe(topic, options).await?;
        Ok(self.watch(inner))
    }
}

#[async_trait]
impl Queue for Recording {
    async fn send(&self, queue: &str, envelope: Envelope) -> Result<()> {
        self.inner.send(queue, envelope.clone()).await?;
        let sent = Sent {
            destination: queue.to_owned(),
            envelope,
        };
        self.log.send_modify(|log| log.sent.push(sent));
        Ok(())
    }

    /// Recorded as sent when the broker takes it, not when it becomes due.
    async fn send_delayed(&self, queue: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        self.inner
            .send_delayed(queue, envelope.clone(), delay)
            .await?;
        let sent = Sent {
            destination: queue.to_owned(),
            envelope,
        };
        self.log.send_modify(|log| log.sent.push(sent));
        Ok(())
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        let inner = self.inner.consume(queue, options).await?;
        Ok(self.watch(inner))
    }
}

#[async_trait]
impl Requester for Recording {
    async fn request(&self, topic: &str, request: Envelope, timeout: Duration) -> Result<Envelope> {
        // Recorded when sent, so a test sees a request whose reply is still awaited.
        let sent = Sent {
            destination: topic.to_owned(),
            envelope: request.clone(),
        };
        self.log.send_modify(|log| log.requested.push(sent));
        self.inner.request(topic, request, timeout).await
    }
}

#[async_trait]
impl Responder for Recording {
    async fn serve(&self, topic: &str, options: ServeOptions) -> Result<Requests> {
        let inner = self.inner.serve(topic, options).await?;
        Ok(Requests::new(Box::new(Serving {
            inner,
            topic: topic.to_owned(),
            log: self.log.clone(),
        })))
    }
}

/// A responder's requests, whose replies are recorded.
#[derive(Debug)]
struct Serving {
    inner: Requests,
    topic: String,
    log: Arc<watch::Sender<Log>>,
}

#[async_trait]
impl RequestSource for Serving {
    async fn next(&mut self) -> Option<Result<Request>> {
        let request = match self.inner.next().await? {
            Ok(request) => request,
            Err(error) => return Some(Err(error)),
        };
        let envelope = request.envelope().clone();
        let reply = RecordReply {
            request: std::sync::Mutex::new(Some(request)),
            topic: self.topic.clone(),
            log: self.log.clone(),
        };
        Some(Ok(Request::new(envelope, Box::new(reply))))
    }

    async fn close(&mut self) -> Result<()> {
        self.inner.close().await
    }
}

/// Answers the request it holds and records the reply.
#[derive(Debug)]
struct RecordReply {
    request: std::sync::Mutex<Option<Request>>,
    topic: String,
    log: Arc<watch::Sender<Log>>,
}

#[async_trait]
impl Reply for RecordReply {
    async fn reply(&self, response: Envelope) -> Result<()> {
        let request = self
            .request
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(request) = request else {
            return Err(Error::new(
                ErrorKind::Other,
                "the request was answered already",
            ));
        };
        request.reply(response.clone()).await?;
        let sent = Sent {
            destination: self.topic.clone(),
            envelope: response,
        };
        self.log.send_modify(|log| log.replied.push(sent));
        Ok(())
    }
}

#[async_trait]
impl Broker for Recording {
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

impl Recording {
    fn watch(&self, inner: Subscription) -> Subscription {
        Subscription::new(Box::new(Watched {
            inner,
            log: self.log.clone(),
            fault: self.fault.subscribe(),
        }))
    }
}

/// A subscription whose settlements are recorded.
#[derive(Debug)]
struct Watched {
    inner: Subscription,
    log: Arc<watch::Sender<Log>>,
    fault: watch::Receiver<Option<ErrorKind>>,
}

impl Watched {
    /// The next item of the subscription, or the injected failure as soon as there is one.
    async fn receive(&mut self) -> Option<Result<Delivery>> {
        loop {
            if let Some(kind) = *self.fault.borrow_and_update() {
                return Some(Err(Error::new(
                    kind,
                    "receiving failed: injected by the test harness",
                )));
            }
            tokio::select! {
                // Cancel safe: a message not handed out stays in the broker.
                item = self.inner.next() => return item,
                changed = self.fault.changed() => {
                    if changed.is_err() {
                        // The harness is gone: nobody injects any more.
                        return self.inner.next().await;
                    }
                }
            }
        }
    }
}

#[async_trait]
impl DeliverySource for Watched {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let delivery = match self.receive().await? {
            Ok(delivery) => delivery,
            Err(error) => return Some(Err(error)),
        };
        let envelope = delivery.envelope().clone();
        let (attempt, source) = (delivery.attempt(), delivery.source().to_owned());
        let group = delivery.group().map(str::to_owned);
        let undecodable = delivery.undecodable().map(str::to_owned);
        let settle = RecordSettle {
            inner: Mutex::new(Some(delivery)),
            log: self.log.clone(),
        };
        let outer = Delivery::new(envelope, attempt, source, group, Box::new(settle));
        Some(Ok(match undecodable {
            Some(reason) => outer.with_undecodable(reason),
            None => outer,
        }))
    }

    async fn close(&mut self) -> Result<()> {
        self.inner.close().await
    }

    fn lease(&self) -> Option<Duration> {
        self.inner.lease()
    }

    fn keeps_key_order(&self) -> bool {
        self.inner.keeps_key_order()
    }
}

/// Settles the delivery it holds and records how.
#[derive(Debug)]
struct RecordSettle {
    inner: Mutex<Option<Delivery>>,
    log: Arc<watch::Sender<Log>>,
}

#[async_trait]
impl Settle for RecordSettle {
    async fn settle(&self, settlement: Settlement) -> Result<()> {
        let mut held = self.inner.lock().await;
        let Some(delivery) = held.take() else {
            return Ok(());
        };
        let settled = Settled {
            source: delivery.source().to_owned(),
            group: delivery.group().map(str::to_owned),
            envelope: delivery.envelope().clone(),
            settlement: settlement.clone(),
        };
        match delivery.settle(settlement).await {
            Ok(()) => {
                self.log.send_modify(|log| log.consumed.push(settled));
                Ok(())
            }
            Err(error) => {
                let (error, delivery) = error.into_parts();
                *held = Some(delivery);
                Err(error)
            }
        }
    }

    async fn in_progress(&self) -> Result<()> {
        match self.inner.lock().await.as_ref() {
            Some(delivery) => delivery.in_progress().await,
            None => Ok(()),
        }
    }

    fn abandon(&self) {
        // The held delivery abandons itself when this is dropped with it.
    }
}
