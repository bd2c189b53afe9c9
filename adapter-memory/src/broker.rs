//! The broker: topics with consumer groups, queues, and their deliveries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bus_core::middleware::dead_letter;
use bus_core::{
    async_trait, headers, Backlog, BacklogOf, Broker, Capabilities, ConsumeOptions, Delay,
    Delivery, DeliverySource, Envelope, Error, ErrorKind, Publisher, Queue, Result, Settle,
    Settlement, SubscribeOptions, Subscriber, Subscription, Support,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::buffer::{Buffer, Entry, Faults, Take};
use crate::chaos::Dice;
use crate::reply::Responders;
use crate::MemoryConfig;

/// The closed flag of a broker, with a way to wait for it.
#[derive(Debug, Default)]
pub(crate) struct Closed {
    flag: AtomicBool,
    notify: Notify,
}

impl Closed {
    pub(crate) fn is_closed(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    fn close(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Completes once the broker is closed.
    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::closed("the memory broker was closed"))
        } else {
            Ok(())
        }
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: MemoryConfig,
    pub(crate) closed: Closed,
    /// topic → group → buffer.
    topics: Mutex<HashMap<String, HashMap<String, Arc<Buffer>>>>,
    queues: Mutex<HashMap<String, Arc<Buffer>>>,
    pub(crate) responders: Responders,
    dice: Option<Dice>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Maps are only inserted into or removed from under these locks: no broken invariant to
    // fear after a panic elsewhere.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    pub(crate) fn validate(&self, envelope: &Envelope) -> Result<()> {
        if let Some(max) = self.config.max_payload {
            if envelope.payload.len() > max {
                return Err(Error::new(
                    ErrorKind::PayloadTooLarge,
                    format!(
                        "payload of {} bytes exceeds the configured limit of {max} bytes",
                        envelope.payload.len()
                    ),
                ));
            }
        }
        if let Some(max) = self.config.max_headers {
            if envelope.headers.len() > max {
                return Err(Error::new(
                    ErrorKind::HeadersTooLarge,
                    format!(
                        "{} headers exceed the configured limit of {max}",
                        envelope.headers.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn faults(&self) -> Faults {
        match &self.dice {
            Some(dice) => Faults {
                copies: dice.copies(),
                delay: dice.delay(),
            },
            None => Faults::NONE,
        }
    }

    fn deadline(&self) -> Instant {
        headers::saturating_deadline(Instant::now(), self.config.publish_timeout())
    }

    fn queue(&self, name: &str) -> Arc<Buffer> {
        lock(&self.queues)
            .entry(name.to_owned())
            .or_insert_with(|| Buffer::new(name, None, self.config.capacity))
            .clone()
    }

    async fn send(&self, queue: &str, envelope: Envelope, due: Option<Instant>) -> Result<()> {
        self.closed.check()?;
        self.validate(&envelope)?;
        self.queue(queue)
            .push(envelope, self.faults(), due, self.deadline(), &self.closed)
            .await
    }

    /// Pushes `envelope` to every group of `topic` (not deliverable before `due`, if given).
    async fn publish(&self, topic: &str, envelope: Envelope, due: Option<Instant>) -> Result<()> {
        self.closed.check()?;
        self.validate(&envelope)?;
        let groups: Vec<Arc<Buffer>> = lock(&self.topics)
            .get(topic)
            .map(|groups| groups.values().cloned().collect())
            .unwrap_or_default();
        // A topic nobody subscribed to drops the message, as a topic exchange without queues
        // does. If one group is full past the timeout, the groups before it keep their copy:
        // the caller sees the error and may publish again (at-least-once).
        let deadline = self.deadline();
        // Each group but the last gets a copy; the last gets the envelope itself.
        let mut groups = groups.into_iter().peekable();
        let mut envelope = Some(envelope);
        while let Some(group) = groups.next() {
            let envelope = match groups.peek() {
                Some(_) => envelope.clone(),
                None => envelope.take(),
            }
            .expect("the last group takes the envelope");
            group
                .push(envelope, self.faults(), due, deadline, &self.closed)
                .await?;
        }
        Ok(())
    }

    fn backlog(&self, of: &BacklogOf) -> Result<Backlog> {
        self.closed.check()?;
        let buffer = match of {
            BacklogOf::Group { topic, group } => lock(&self.topics)
                .get(topic)
                .and_then(|groups| groups.get(group))
                .cloned(),
            BacklogOf::Queue(name) => lock(&self.queues).get(name).cloned(),
            other => {
                return Err(Error::unsupported(format!(
                    "the memory broker cannot count the backlog of {other}"
                )))
            }
        };
        buffer.map(|b| b.backlog()).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("the memory broker has no {of}: nothing subscribed or sent to it yet"),
            )
        })
    }

    fn remove_group(&self, topic: &str, group: &str) {
        let mut topics = lock(&self.topics);
        if let Some(groups) = topics.get_mut(topic) {
            groups.remove(group);
            if groups.is_empty() {
                topics.remove(topic);
            }
        }
    }
}

/// The in-process broker: the embedded default of `bus` and the reference semantics every
/// adapter is measured against.
///
/// - Topics fan out to consumer groups: every group gets every message published after it
///   first subscribed; the members of a group compete. A subscription without a group gets a
///   private group, removed when it closes.
/// - Queues keep messages until a consumer takes them.
/// - Per-key order: a key is in flight at one member of a group at a time, in publish order,
///   including across nacks and redeliveries.
/// - `nack(After(d))` waits `d`; a dropped delivery comes back at once with `attempt + 1`;
///   `reject` moves the message to the queue named
///   [`headers::dead_letter_queue`](bus_core::headers::dead_letter_queue) with the reason
///   headers.
/// - Request-reply is native and knows when nobody serves a topic.
/// - Memory is bounded: each group and queue holds at most
///   [`MemoryConfig::capacity`] messages and publishers wait for room.
///
/// Nothing is durable: the broker lives and dies with the process. Clones share one broker.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> bus_core::Result<()> {
/// use adapter_memory::MemoryBroker;
/// use bus_core::{Envelope, Publisher, SubscribeOptions, Subscriber};
///
/// let broker = MemoryBroker::new();
/// let mut billing = broker.subscribe("orders", SubscribeOptions::group("billing")).await?;
/// broker.publish("orders", Envelope::new("order.placed", "{}")).await?;
/// let delivery = billing.next().await.expect("open")?;
/// assert_eq!(delivery.envelope().kind, "order.placed");
/// delivery.ack().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A broker with the default [`MemoryConfig`].
    #[must_use]
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A broker with `config`.
    #[must_use]
    pub fn with_config(config: MemoryConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                closed: Closed::default(),
                topics: Mutex::new(HashMap::new()),
                queues: Mutex::new(HashMap::new()),
                responders: Responders::default(),
                dice: config.chaos.clone().map(Dice::new),
                config,
            }),
        }
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> &MemoryConfig {
        &self.inner.config
    }

    /// How many messages a queue holds (waiting plus unsettled); 0 for an unknown queue.
    #[must_use]
    pub fn queue_len(&self, queue: &str) -> usize {
        lock(&self.inner.queues).get(queue).map_or(0, |b| b.len())
    }

    /// How many messages a topic's group holds (waiting plus unsettled); 0 for an unknown
    /// group.
    #[must_use]
    pub fn group_len(&self, topic: &str, group: &str) -> usize {
        lock(&self.inner.topics)
            .get(topic)
            .and_then(|groups| groups.get(group))
            .map_or(0, |b| b.len())
    }
}

#[async_trait]
impl Publisher for MemoryBroker {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<()> {
        self.inner.publish(topic, envelope, None).await
    }

    /// Every group subscribed to `topic` now (private ones included) holds the message, in
    /// its place after the messages published before, until it is due: it holds no later
    /// message back, not even one of its key. It counts in the groups' capacity meanwhile.
    async fn publish_delayed(&self, topic: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        self.inner.publish(topic, envelope, Some(due(delay))).await
    }
}

/// The instant a delayed message becomes deliverable.
fn due(delay: Delay) -> Instant {
    headers::saturating_deadline(Instant::now(), delay.remaining(SystemTime::now()))
}

#[async_trait]
impl Subscriber for MemoryBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        let inner = &self.inner;
        inner.closed.check()?;
        let (name, private) = match &options.group {
            Some(group) => (group.clone(), false),
            None => (format!("private.{}", bus_core::MessageId::new()), true),
        };
        let buffer = lock(&inner.topics)
            .entry(topic.to_owned())
            .or_default()
            .entry(name.clone())
            .or_insert_with(|| Buffer::new(topic, options.group.as_deref(), inner.config.capacity))
            .clone();
        Ok(Subscription::new(Box::new(Member::join(
            inner.clone(),
            buffer,
            private.then(|| (topic.to_owned(), name)),
        ))))
    }
}

#[async_trait]
impl Queue for MemoryBroker {
    async fn send(&self, queue: &str, envelope: Envelope) -> Result<()> {
        self.inner.send(queue, envelope, None).await
    }

    /// The queue holds the message until it is due, as
    /// [`publish_delayed`](Publisher::publish_delayed) does for a group.
    async fn send_delayed(&self, queue: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        self.inner.send(queue, envelope, Some(due(delay))).await
    }

    async fn consume(&self, queue: &str, _options: ConsumeOptions) -> Result<Subscription> {
        self.inner.closed.check()?;
        let buffer = self.inner.queue(queue);
        Ok(Subscription::new(Box::new(Member::join(
            self.inner.clone(),
            buffer,
            None,
        ))))
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "memory",
            durable: false,
            consumer_groups: true,
            per_key_order: true,
            per_key_order_across_members: true,
            // A nacked message waits in its place and holds its key back.
            key_order_across_retries: Support::Native,
            request_reply: Support::Native,
            no_responders_detection: true,
            delayed_redelivery: Support::Native,
            dead_letter: Support::Native,
            prompt_redelivery_of_dropped: true,
            // Every delivery of an entry is counted, and a crash loses the whole broker anyway.
            delivery_count: Support::Native,
            max_payload_bytes: self.inner.config.max_payload,
            max_headers: self.inner.config.max_headers,
            // A timer per message in the group's or queue's buffer; no limit but the
            // hundred years `bus` waits at most.
            delayed_publish: Support::Native,
            max_delay: None,
            // Exact: waiting, in flight and delayed (publish delays and nacks with a delay).
            backlog: Support::Native,
        }
    }

    /// Counts a group's or queue's buffer exactly (`approximate` is false): `waiting` is due,
    /// `delayed` is held back by a delayed publish or a nack with a delay, `in_flight` is
    /// delivered and unsettled; `oldest_age` is how long the oldest due message has waited
    /// since it was published or became due.
    ///
    /// # Errors
    /// [`NotFound`](ErrorKind::NotFound) for a group that never subscribed or a queue nothing
    /// was sent to or consumed from; [`Closed`](ErrorKind::Closed) once closed.
    async fn backlog(&self, of: &BacklogOf) -> Result<Backlog> {
        self.inner.backlog(of)
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.close();
        self.inner.responders.clear();
        Ok(())
    }
}

/// One subscription or queue consumer: a member of a buffer.
#[derive(Debug)]
struct Member {
    inner: Arc<Inner>,
    buffer: Arc<Buffer>,
    /// For a private group: the topic and group to remove when the member leaves.
    private: Option<(String, String)>,
    left: bool,
}

impl Member {
    fn join(inner: Arc<Inner>, buffer: Arc<Buffer>, private: Option<(String, String)>) -> Self {
        buffer.join();
        Self {
            inner,
            buffer,
            private,
            left: false,
        }
    }

    fn leave(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        let remaining = self.buffer.leave();
        if let Some((topic, group)) = &self.private {
            if remaining == 0 {
                self.inner.remove_group(topic, group);
            }
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.leave();
    }
}

#[async_trait]
impl DeliverySource for Member {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.left || self.inner.closed.is_closed() {
                return None;
            }
            // Most calls find a message waiting: only an empty-handed one registers for
            // `readable`, then looks again so that no push in between is missed.
            if let Take::Taken(entry) = self.buffer.take(false) {
                return Some(Ok(self.delivery(entry)));
            }
            let readable = self.buffer.readable().notified();
            tokio::pin!(readable);
            readable.as_mut().enable();
            let due = match self.buffer.take(true) {
                Take::Taken(entry) => return Some(Ok(self.delivery(entry))),
                Take::Wait(due) => due,
            };
            // Counted as waiting until this is dropped, also when this future is.
            let _waiting = Waiting(&self.buffer);
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                () = &mut readable => {}
                () = tokio::time::sleep_until(due.unwrap_or(far)) => {}
                () = self.inner.closed.wait() => return None,
            }
        }
    }

    fn try_next(&mut self) -> Option<Result<Delivery>> {
        if self.left || self.inner.closed.is_closed() {
            return None;
        }
        match self.buffer.take(false) {
            Take::Taken(entry) => Some(Ok(self.delivery(entry))),
            Take::Wait(_) => None,
        }
    }

    async fn close(&mut self) -> Result<()> {
        self.leave();
        Ok(())
    }

    /// A key's messages are handed out in publish order, one at a time per group.
    fn keeps_key_order(&self) -> bool {
        true
    }
}

/// A member counted among those waiting for its buffer to become readable.
struct Waiting<'a>(&'a Buffer);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.stop_waiting();
    }
}

impl Member {
    fn delivery(&self, entry: Entry) -> Delivery {
        let envelope = entry.envelope.clone();
        let attempt = entry.attempt;
        Delivery::with_shared_names(
            envelope,
            attempt,
            self.buffer.source.clone(),
            self.buffer.group.clone(),
            Box::new(MemorySettle {
                inner: self.inner.clone(),
                buffer: self.buffer.clone(),
                entry: Mutex::new(Some(entry)),
            }),
        )
    }
}

/// Settles one delivery against its buffer.
#[derive(Debug)]
struct MemorySettle {
    inner: Arc<Inner>,
    buffer: Arc<Buffer>,
    entry: Mutex<Option<Entry>>,
}

impl MemorySettle {
    fn take_entry(&self) -> Option<Entry> {
        lock(&self.entry).take()
    }

    fn dead_letter(&self, entry: &Entry, reason: &str, attempts: u32) -> Envelope {
        dead_letter::mark(
            entry.envelope.clone(),
            &dead_letter::DeadLetterInfo {
                reason,
                source: &self.buffer.source,
                group: self.buffer.group.as_deref(),
                attempts: attempts.max(entry.attempt),
                first_failure: Some(entry.first_failure.unwrap_or_else(SystemTime::now)),
            },
        )
    }
}

#[async_trait]
impl Settle for MemorySettle {
    /// Acks and nacks change the buffer in place; a reject stores a dead letter first, which
    /// may wait for room.
    fn try_settle(&self, settlement: &Settlement) -> Option<Result<()>> {
        match settlement {
            Settlement::Ack => {
                if let Some(entry) = self.take_entry() {
                    if self.inner.dice.as_ref().is_some_and(Dice::lose_ack) {
                        self.buffer.requeue(entry, None);
                    } else {
                        self.buffer.settle(&entry);
                    }
                }
            }
            Settlement::Nack(redeliver) => {
                if let Some(mut entry) = self.take_entry() {
                    entry.first_failure.get_or_insert_with(SystemTime::now);
                    let not_before = match redeliver {
                        bus_core::Redeliver::After(delay) => {
                            Some(headers::saturating_deadline(Instant::now(), *delay))
                        }
                        _ => None,
                    };
                    self.buffer.requeue(entry, not_before);
                }
            }
            _ => return None,
        }
        Some(Ok(()))
    }

    async fn settle(&self, settlement: Settlement) -> Result<()> {
        if let Some(done) = self.try_settle(&settlement) {
            return done;
        }
        match settlement {
            Settlement::Reject { reason, attempts } => {
                // Store the dead letter first: if that fails the delivery stays unsettled and
                // the caller gets it back to try again.
                let dead = {
                    let guard = lock(&self.entry);
                    let Some(entry) = guard.as_ref() else {
                        return Ok(());
                    };
                    self.dead_letter(entry, &reason, attempts)
                };
                let dlq = headers::dead_letter_queue(&self.buffer.source);
                self.inner
                    .queue(&dlq)
                    .push(
                        dead,
                        Faults::NONE,
                        None,
                        self.inner.deadline(),
                        &self.inner.closed,
                    )
                    .await?;
                if let Some(entry) = self.take_entry() {
                    self.buffer.settle(&entry);
                }
            }
            other => {
                return Err(Error::unsupported(format!(
                    "the memory broker does not know the settlement {other:?}"
                )))
            }
        }
        Ok(())
    }

    fn abandon(&self) {
        if let Some(entry) = self.take_entry() {
            self.buffer.requeue(entry, None);
        }
    }
}
