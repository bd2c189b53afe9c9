//! Subscriptions: JetStream pull consumers (groups, private subscriptions, queues) and core
//! NATS subscriptions, and how their deliveries are settled; queues (sent to as JetStream
//! work queues, consumed here).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use async_nats::connection::State;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::AckKind;
use bus_core::{
    async_trait, headers, ConsumeOptions, Delay, Delivery, DeliverySource, Envelope, Error,
    ErrorKind, Queue, Redeliver, Result, Settle, Settlement, SubscribeOptions, Subscriber,
    Subscription,
};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::broker::{Inner, Kind};
use crate::names::{self, QUEUE_CONSUMER};
use crate::pulling::{self, Buffer, Pulled, Spec, Turn};
use crate::{dead_letters, delayed, error, wire, NatsBroker};

#[async_trait]
impl Queue for NatsBroker {
    async fn send(&self, queue: &str, envelope: Envelope) -> Result<()> {
        self.inner
            .publish_stored(Kind::Queue, queue, &envelope)
            .await
    }

    /// Emulated as [`publish_delayed`](bus_core::Publisher::publish_delayed) is: the message
    /// waits in the `<prefix>-delayed` stream and is sent to the queue when due. Also with
    /// `durable=false` (queues are on JetStream either way).
    async fn send_delayed(&self, queue: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        delayed::publish(&self.inner, Kind::Queue, queue, &envelope, delay).await
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        consume(self, queue, options).await
    }
}

/// A private subscription's consumer is removed by the server after this long without pulls
/// (when the process died before closing it).
const PRIVATE_INACTIVE: Duration = Duration::from_secs(300);

#[async_trait]
impl Subscriber for NatsBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        let inner = &self.inner;
        inner.check()?;
        if !inner.config.durable {
            return subscribe_core(inner, topic, options).await;
        }
        let stream = inner.ensure_stream(Kind::Topic, topic).await?;
        let (name, private) = match &options.group {
            Some(group) => (names::group_consumer(group), false),
            None => (format!("p-{}", bus_core::MessageId::new()), true),
        };
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some(match &options.group {
                Some(group) => format!("bus group `{group}` of topic `{topic}`"),
                None => format!("bus private subscription of topic `{topic}`"),
            }),
            // A group gets what is published after it first subscribed; an existing consumer
            // keeps its position (the policy only applies on creation).
            deliver_policy: DeliverPolicy::New,
            ack_policy: AckPolicy::Explicit,
            ack_wait: inner.config.ack_wait(),
            // Unlimited: the retry middleware decides when a message is dead-lettered.
            max_deliver: -1,
            inactive_threshold: if private {
                PRIVATE_INACTIVE
            } else {
                Duration::ZERO
            },
            ..pull::Config::default()
        };
        let consumer = inner.consumer(&stream, &config).await?;
        // Delayed messages for this topic are moved by some connection even if their
        // publisher is gone.
        delayed::start_mover(inner);
        let source = PullSource::new(
            inner.clone(),
            consumer,
            Spec {
                stream,
                config,
                source: Arc::from(topic),
                group: options.group.as_deref().map(Arc::from),
                private,
            },
            options.prefetch.unwrap_or(inner.config.prefetch),
        );
        Ok(Subscription::new(Box::new(source)))
    }
}

pub(crate) async fn consume(
    broker: &NatsBroker,
    queue: &str,
    options: ConsumeOptions,
) -> Result<Subscription> {
    let inner = &broker.inner;
    inner.check()?;
    let stream = inner.ensure_stream(Kind::Queue, queue).await?;
    let config = pull::Config {
        durable_name: Some(QUEUE_CONSUMER.to_owned()),
        description: Some(format!("bus consumers of queue `{queue}`")),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: inner.config.ack_wait(),
        max_deliver: -1,
        ..pull::Config::default()
    };
    let consumer = inner.consumer(&stream, &config).await?;
    delayed::start_mover(inner);
    let source = PullSource::new(
        inner.clone(),
        consumer,
        Spec {
            stream,
            config,
            source: Arc::from(queue),
            group: None,
            private: false,
        },
        options.prefetch.unwrap_or(inner.config.prefetch),
    );
    Ok(Subscription::new(Box::new(source)))
}

/// A JetStream pull consumer behind a subscription. Pulling starts on the first call to
/// `next` (so a subscription that is never read takes no message from its group); `next`
/// reads the pulled messages itself, a task sends the requests (module `pulling`).
struct PullSource {
    inner: Arc<Inner>,
    spec: Arc<Spec>,
    consumer: Option<PullConsumer>,
    /// Pulled messages not yet handed out.
    buffer: Arc<Buffer>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    done: bool,
    /// Whether `next` has reported the connection's loss since it was last connected.
    told_disconnected: bool,
}

/// How often an idle subscription looks whether its connection is still up.
const CONNECTION_CHECK: Duration = Duration::from_millis(500);

impl fmt::Debug for PullSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullSource")
            .field("stream", &self.spec.stream)
            .field("consumer", &self.spec.config.durable_name)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl PullSource {
    fn new(inner: Arc<Inner>, consumer: PullConsumer, spec: Spec, batch: usize) -> Self {
        Self {
            inner,
            spec: Arc::new(spec),
            consumer: Some(consumer),
            buffer: Arc::new(Buffer::new(batch)),
            stop: watch::channel(false).0,
            task: None,
            done: false,
            told_disconnected: false,
        }
    }

    fn start(&mut self) {
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        self.task = Some(self.inner.runtime.spawn(pulling::run(
            self.inner.clone(),
            self.spec.clone(),
            consumer,
            self.buffer.clone(),
            self.stop.subscribe(),
        )));
        self.inner.runtime.spawn(pulling::extend(
            self.inner.clone(),
            Arc::downgrade(&self.buffer),
            self.stop.subscribe(),
        ));
    }

    /// Stops pulling and hands back what was pulled but not handed out; then deletes a
    /// private consumer.
    fn shutdown(&mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.done = true;
        let _ = self.stop.send(true);
        let task = self.task.take();
        let inner = self.inner.clone();
        let spec = self.spec.clone();
        async move {
            if let Some(task) = task {
                // The task ends once its open requests have ended on the server (filled or
                // expired, at most PULL_EXPIRES), having handed back what was pulled.
                let _ = task.await;
                let _ = tokio::time::timeout(Duration::from_secs(5), inner.client.flush()).await;
            }
            if spec.private {
                let name = spec.config.durable_name.clone().unwrap_or_default();
                let _ = inner
                    .jetstream
                    .delete_consumer_from_stream(&name, &spec.stream)
                    .await;
            }
        }
    }
}

impl Drop for PullSource {
    fn drop(&mut self) {
        if !self.done {
            let shutdown = self.shutdown();
            self.inner.runtime.spawn(shutdown);
        }
    }
}

#[async_trait]
impl DeliverySource for PullSource {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.done || self.inner.is_closed() {
            return None;
        }
        self.start();
        // The pull task ends the buffer when the connection closes. What was pulled is handed
        // out first, connected or not.
        let ready = std::future::poll_fn(|cx| Poll::Ready(self.buffer.poll_next(cx))).await;
        if let Poll::Ready(pulled) = ready {
            return Some(Ok(delivery(&self.inner, &self.spec, pulled?)));
        }
        // Nothing to hand out: while the client reconnects, say so once (a consumer counts it
        // as a receive error, a service as degraded health), then go on waiting.
        loop {
            if self.inner.client.connection_state() == State::Connected {
                self.told_disconnected = false;
            } else if !self.told_disconnected {
                self.told_disconnected = true;
                return Some(Err(Error::new(
                    ErrorKind::Connection,
                    "the connection to NATS is lost; the client is reconnecting",
                )));
            }
            let buffer = &self.buffer;
            tokio::select! {
                pulled = std::future::poll_fn(|cx| buffer.poll_next(cx)) => {
                    return Some(Ok(delivery(&self.inner, &self.spec, pulled?)));
                }
                () = tokio::time::sleep(CONNECTION_CHECK) => {}
            }
        }
    }

    /// What the pull task has stored already, without waiting. Polled with a waker that does
    /// nothing: a source found empty is waited on through `next`, whose poll registers the
    /// real one.
    fn try_next(&mut self) -> Option<Result<Delivery>> {
        if self.done || self.inner.is_closed() {
            return None;
        }
        self.start();
        let mut cx = Context::from_waker(Waker::noop());
        match self.buffer.poll_next(&mut cx) {
            Poll::Ready(Some(pulled)) => Some(Ok(delivery(&self.inner, &self.spec, pulled))),
            Poll::Ready(None) | Poll::Pending => None,
        }
    }

    /// The consumer's ack wait: JetStream redelivers a message not acknowledged within it,
    /// unless told the handler is still working (`+WPI`, [`Delivery::in_progress`]).
    fn lease(&self) -> Option<Duration> {
        Some(self.inner.config.ack_wait())
    }

    /// A JetStream consumer delivers a subject's messages in stream order.
    fn keeps_key_order(&self) -> bool {
        true
    }

    async fn close(&mut self) -> Result<()> {
        if !self.done {
            self.shutdown().await;
        }
        Ok(())
    }
}

/// What a JetStream message's acknowledgement subject says of its delivery (ADR-15:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
/// or, from newer servers, with a domain and an account hash before the stream and a token
/// after). Read here rather than by `jetstream::Message::info`, which also builds a calendar
/// date that this only turns back into a time.
#[derive(Debug, Clone, Copy, PartialEq)]
struct AckInfo<'a> {
    stream: &'a str,
    delivered: u64,
    /// The stream sequence, as written (in decimal).
    sequence: &'a str,
    /// When the server stored the message, if after 1970.
    published: Option<SystemTime>,
}

impl<'a> AckInfo<'a> {
    fn read(reply: &'a str) -> Option<Self> {
        let rest = reply.strip_prefix("$JS.ACK.")?;
        let mut tokens = [""; 10];
        let mut count = 0;
        for (slot, token) in tokens.iter_mut().zip(rest.split('.')) {
            *slot = token;
            count += 1;
        }
        // As async-nats reads them: 7 tokens, or 10 and more.
        let tokens = match count {
            7 => &tokens[..7],
            10 => &tokens[2..9],
            _ => return None,
        };
        let [stream, _consumer, delivered, sequence, consumer_sequence, time, pending] = tokens
        else {
            return None;
        };
        for number in [sequence, consumer_sequence, pending] {
            number.parse::<u64>().ok()?;
        }
        let nanos: i128 = time.parse().ok()?;
        Some(Self {
            stream,
            delivered: delivered.parse().ok()?,
            sequence,
            published: u64::try_from(nanos)
                .ok()
                .and_then(|n| SystemTime::UNIX_EPOCH.checked_add(Duration::from_nanos(n))),
        })
    }
}

/// The envelope of a pulled message, from its headers, with the defaults its acknowledgement
/// subject gives.
fn decode_pulled(spec: &Spec, message: &async_nats::Message) -> (wire::Received, u32) {
    let info = message.reply.as_deref().and_then(AckInfo::read);
    let received = wire::decode(
        message.headers.as_ref(),
        message.status.map(|s| (s, message.description.as_deref())),
        message.payload.clone(),
        wire::Defaults {
            stored: info.map(|i| wire::Stored {
                stream: i.stream,
                sequence: i.sequence,
            }),
            kind: &spec.source,
            time: info.and_then(|i| i.published),
        },
    );
    let attempt = info.map_or(1, |i| u32::try_from(i.delivered).unwrap_or(u32::MAX));
    (received, attempt)
}

fn delivery(inner: &Arc<Inner>, spec: &Arc<Spec>, pulled: Pulled) -> Delivery {
    let (received, attempt) = decode_pulled(spec, &pulled.message);
    let delivery = Delivery::with_shared_names(
        received.envelope,
        attempt,
        spec.source.clone(),
        spec.group.clone(),
        Box::new(JetStreamSettle {
            inner: inner.clone(),
            spec: spec.clone(),
            message: pulled.message,
            turn: pulled.turn,
            attempt,
        }),
    );
    marked(delivery, received.undecodable)
}

/// The delivery, marked undecodable for `undecodable` if set.
fn marked(delivery: Delivery, undecodable: Option<String>) -> Delivery {
    match undecodable {
        Some(reason) => delivery.with_undecodable(reason),
        None => delivery,
    }
}

/// Waits for a delivery's turn at its acknowledgement subject, if it has one.
async fn turn_of(turn: Option<&Turn>) -> Option<tokio::sync::MutexGuard<'_, ()>> {
    match turn {
        Some(turn) => Some(turn.lock().await),
        None => None,
    }
}

/// Settles one JetStream delivery: ack, nak (with delay), term after dead-lettering, progress.
struct JetStreamSettle {
    inner: Arc<Inner>,
    spec: Arc<Spec>,
    /// The message as received: its reply subject is where the acknowledgements go, and a
    /// dead letter is decoded from it again (rather than a copy of the envelope kept for
    /// every delivery).
    message: async_nats::Message,
    /// Taken before anything is sent on the acknowledgement subject, if the buffer's extender
    /// may send there.
    turn: Option<Turn>,
    attempt: u32,
}

impl fmt::Debug for JetStreamSettle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamSettle")
            .field("reply", &self.message.reply)
            .field("source", &self.spec.source)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// Sends `kind` to a message's acknowledgement subject.
async fn acknowledge(
    inner: &Inner,
    reply: Option<&async_nats::Subject>,
    kind: AckKind,
    what: &str,
) -> Result<()> {
    let Some(reply) = reply else {
        return Err(Error::new(
            ErrorKind::Connection,
            format!("cannot send the {what}: the message has no reply subject"),
        ));
    };
    inner
        .client
        .publish(reply.clone(), kind.into())
        .await
        .map_err(|e| error::settle(e, what))
}

#[async_trait]
impl Settle for JetStreamSettle {
    async fn settle(&self, settlement: Settlement) -> Result<()> {
        let _turn = turn_of(self.turn.as_ref()).await;
        let (kind, what) = match settlement {
            Settlement::Ack => (AckKind::Ack, "ack"),
            Settlement::Nack(Redeliver::After(delay)) => {
                // Longer delays (up to `Duration::MAX`) are not JSON numbers the server reads:
                // it would redeliver at once.
                (AckKind::Nak(Some(delay.min(headers::MAX_DELAY))), "nak")
            }
            Settlement::Nack(_) => (AckKind::Nak(None), "nak"),
            Settlement::Reject { reason, attempts } => {
                // The dead letter is stored first: if that fails, the delivery stays unsettled.
                let envelope = decode_pulled(&self.spec, &self.message).0.envelope;
                dead_letters::send(
                    &self.inner,
                    &envelope,
                    &self.spec.source,
                    self.spec.group.as_deref(),
                    attempts.max(self.attempt),
                    &reason,
                    None,
                )
                .await?;
                (AckKind::Term, "term")
            }
            other => {
                return Err(Error::unsupported(format!(
                    "the NATS adapter does not know the settlement {other:?}"
                )))
            }
        };
        acknowledge(&self.inner, self.message.reply.as_ref(), kind, what).await
    }

    async fn in_progress(&self) -> Result<()> {
        let _turn = turn_of(self.turn.as_ref()).await;
        acknowledge(
            &self.inner,
            self.message.reply.as_ref(),
            AckKind::Progress,
            "progress",
        )
        .await
    }

    fn abandon(&self) {
        let inner = self.inner.clone();
        let reply = self.message.reply.clone();
        let turn = self.turn.clone();
        // If this fails, JetStream redelivers after the ack wait anyway.
        self.inner.runtime.spawn(async move {
            let _turn = turn_of(turn.as_ref()).await;
            let _ = acknowledge(&inner, reply.as_ref(), AckKind::Nak(None), "nak").await;
        });
    }
}

/// A topic on core NATS (`durable=false`): a plain subscription, or a queue group for a
/// named group, plus the subject where nacked copies come back to this group (or this
/// subscription alone). Returns once the server has both, so that what is published next, from
/// any connection, reaches it.
async fn subscribe_core(
    inner: &Arc<Inner>,
    topic: &str,
    options: SubscribeOptions,
) -> Result<Subscription> {
    let subject = inner.names.topic_subject(topic);
    let (messages, retry_subject, copies) = match &options.group {
        Some(group) => {
            let queue_group = names::encode(group);
            let retry = inner.names.core_group_retry_subject(topic, group);
            let messages = inner
                .client
                .queue_subscribe(subject.clone(), queue_group.clone())
                .await
                .map_err(|e| error::subscribe(e, &subject))?;
            let copies = inner
                .client
                .queue_subscribe(retry.clone(), queue_group)
                .await
                .map_err(|e| error::subscribe(e, &retry))?;
            (messages, retry, copies)
        }
        None => {
            let unique = bus_core::MessageId::new().to_string();
            let retry = inner.names.core_private_retry_subject(topic, &unique);
            let messages = inner
                .client
                .subscribe(subject.clone())
                .await
                .map_err(|e| error::subscribe(e, &subject))?;
            let copies = inner
                .client
                .subscribe(retry.clone())
                .await
                .map_err(|e| error::subscribe(e, &retry))?;
            (messages, retry, copies)
        }
    };
    inner.confirm_subscription(&subject).await?;
    Ok(Subscription::new(Box::new(CoreSource {
        inner: inner.clone(),
        closed: inner.closed_signal(),
        subscriber: Some(futures::stream::select(messages, copies)),
        retry_subject: Arc::from(retry_subject),
        source: Arc::from(topic),
        group: options.group.as_deref().map(Arc::from),
    })))
}

struct CoreSource {
    inner: Arc<Inner>,
    closed: watch::Receiver<bool>,
    /// The topic's messages and the copies nacked by this group (or subscription).
    subscriber: Option<futures::stream::Select<async_nats::Subscriber, async_nats::Subscriber>>,
    retry_subject: Arc<str>,
    /// Shared with every delivery and its settlement.
    source: Arc<str>,
    group: Option<Arc<str>>,
}

impl fmt::Debug for CoreSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreSource")
            .field("source", &self.source)
            .field("group", &self.group)
            .field("retry_subject", &self.retry_subject)
            .finish_non_exhaustive()
    }
}

/// The attempt a core NATS message is on (`bus-attempt`, written on the copies the adapter
/// sends back; 1 when absent or unreadable), and its headers without that one.
fn core_attempt(map: Option<&async_nats::HeaderMap>) -> (u32, Option<async_nats::HeaderMap>) {
    let Some(map) = map else {
        return (1, None);
    };
    if map.get(headers::ATTEMPT).is_none() {
        return (1, Some(map.clone()));
    }
    let attempt = map
        .get_last(headers::ATTEMPT)
        .and_then(|value| value.as_str().trim().parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    let mut rest = async_nats::HeaderMap::new();
    for (name, values) in map.iter() {
        let name: &str = name.as_ref();
        if name == headers::ATTEMPT {
            continue;
        }
        for value in values {
            rest.append(name, value.as_str());
        }
    }
    (attempt, Some(rest))
}

#[async_trait]
impl DeliverySource for CoreSource {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.inner.is_closed() {
            return None;
        }
        let subscriber = self.subscriber.as_mut()?;
        let message = tokio::select! {
            message = subscriber.next() => message?,
            _ = self.closed.wait_for(|closed| *closed) => return None,
        };
        let (attempt, map) = core_attempt(message.headers.as_ref());
        // No broker identity on core NATS: an id-less message gets one derived from its
        // content (without `bus-attempt`, so each copy gets the same id).
        let received = wire::decode(
            map.as_ref(),
            message.status.map(|s| (s, message.description.as_deref())),
            message.payload.clone(),
            wire::Defaults {
                stored: None,
                kind: &self.source,
                time: None,
            },
        );
        let envelope = received.envelope;
        let delivery = Delivery::with_shared_names(
            envelope.clone(),
            attempt,
            self.source.clone(),
            self.group.clone(),
            Box::new(CoreSettle {
                inner: self.inner.clone(),
                envelope,
                source: self.source.clone(),
                group: self.group.clone(),
                attempt,
                retry_subject: self.retry_subject.clone(),
                headers: map,
                payload: message.payload,
            }),
        );
        Some(Ok(marked(delivery, received.undecodable)))
    }

    async fn close(&mut self) -> Result<()> {
        if let Some(subscribers) = self.subscriber.take() {
            let (mut messages, mut copies) = subscribers.into_inner();
            let _ = messages.unsubscribe().await;
            let _ = copies.unsubscribe().await;
        }
        Ok(())
    }

    /// One connection receives a subject's messages in publish order.
    fn keeps_key_order(&self) -> bool {
        true
    }
}

/// Settles a core NATS delivery. Core NATS keeps nothing, so a nack (or a drop) is emulated:
/// the message as received, with `bus-attempt` one higher, is published to the subscription's
/// retry subject (its group's members, or the subscription alone) at once or after the delay,
/// which this process waits out. A reject sends the dead letter to the (JetStream) dead-letter
/// queue.
struct CoreSettle {
    inner: Arc<Inner>,
    envelope: Envelope,
    source: Arc<str>,
    group: Option<Arc<str>>,
    attempt: u32,
    retry_subject: Arc<str>,
    /// The message as received (without `bus-attempt`), for the copy.
    headers: Option<async_nats::HeaderMap>,
    payload: bytes::Bytes,
}

impl fmt::Debug for CoreSettle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreSettle")
            .field("id", &self.envelope.id)
            .field("source", &self.source)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// One copy of a core NATS message on its way back to its group.
#[derive(Debug)]
struct CoreCopy {
    subject: Arc<str>,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
}

impl CoreCopy {
    async fn publish(&self, inner: &Inner) -> Result<()> {
        let subject = self.subject.to_string();
        inner
            .client
            .publish_with_headers(subject.clone(), self.headers.clone(), self.payload.clone())
            .await
            .map_err(|e| error::core_publish(e, &subject))?;
        inner
            .client
            .flush()
            .await
            .map_err(|e| error::flush(e, &subject))
    }
}

/// Counts a delayed copy as pending on the connection until dropped.
struct PendingCopy(Arc<Inner>);

impl PendingCopy {
    fn new(inner: Arc<Inner>) -> Self {
        inner.core_copies.send_modify(|n| *n += 1);
        Self(inner)
    }
}

impl Drop for PendingCopy {
    fn drop(&mut self) {
        self.0.core_copies.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl CoreSettle {
    /// The copy that redelivers this message: the next attempt, to the retry subject.
    fn copy(&self) -> CoreCopy {
        let mut map = self.headers.clone().unwrap_or_default();
        let next = self.attempt.saturating_add(1).to_string();
        map.insert(headers::ATTEMPT, next.as_str());
        CoreCopy {
            subject: self.retry_subject.clone(),
            headers: map,
            payload: self.payload.clone(),
        }
    }

    /// Sends the copy now, or (after a delay) from a task that waits it out and returns at
    /// once. A copy the server would refuse (the added header takes it over `max_payload`)
    /// is dead-lettered instead, cut to fit, so that nothing is lost.
    async fn redeliver(&self, delay: Duration) -> Result<()> {
        let copy = self.copy();
        if let Err(e) = self.inner.check_size(&copy.headers, copy.payload.len()) {
            return self.dead_letter_copy(&e).await;
        }
        if delay.is_zero() {
            return copy.publish(&self.inner).await;
        }
        let inner = self.inner.clone();
        let pending = PendingCopy::new(inner.clone());
        let mut closed = inner.closed_signal();
        self.inner.runtime.spawn(async move {
            let _pending = pending;
            // The connection closing sends the copy early: to the group's other members.
            tokio::select! {
                () = tokio::time::sleep(delay.min(headers::MAX_DELAY)) => {}
                _ = closed.wait_for(|closed| *closed) => {}
            }
            send_copy(&inner, &copy).await;
        });
        Ok(())
    }

    async fn dead_letter_copy(&self, refused: &Error) -> Result<()> {
        dead_letters::send(
            &self.inner,
            &self.envelope,
            &self.source,
            self.group.as_deref(),
            self.attempt,
            &format!("cannot be redelivered on core NATS: {refused}"),
            None,
        )
        .await
    }

    fn duplicate(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            envelope: self.envelope.clone(),
            source: self.source.clone(),
            group: self.group.clone(),
            attempt: self.attempt,
            retry_subject: self.retry_subject.clone(),
            headers: self.headers.clone(),
            payload: self.payload.clone(),
        }
    }
}

/// Publishes a copy from a task, trying a few times (the connection may be re-established
/// meanwhile); what still fails is logged: core NATS keeps nothing to fall back on.
async fn send_copy(inner: &Inner, copy: &CoreCopy) {
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=5 {
        match copy.publish(inner).await {
            Ok(()) => return,
            Err(error) if attempt < 5 => {
                tracing::warn!(%error, subject = %copy.subject, "redelivering a core NATS message failed; trying again");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(error) => {
                tracing::error!(%error, subject = %copy.subject, "redelivering a core NATS message failed; it is lost");
            }
        }
    }
}

#[async_trait]
impl Settle for CoreSettle {
    async fn settle(&self, settlement: Settlement) -> Result<()> {
        match settlement {
            Settlement::Ack => Ok(()),
            Settlement::Nack(Redeliver::After(delay)) => self.redeliver(delay).await,
            Settlement::Nack(_) => self.redeliver(Duration::ZERO).await,
            Settlement::Reject { reason, attempts } => {
                dead_letters::send(
                    &self.inner,
                    &self.envelope,
                    &self.source,
                    self.group.as_deref(),
                    attempts.max(self.attempt),
                    &reason,
                    None,
                )
                .await
            }
            other => Err(Error::unsupported(format!(
                "the NATS adapter does not know the settlement {other:?}"
            ))),
        }
    }

    fn abandon(&self) {
        // Dropped unsettled: redelivered like a nack, at once.
        let settle = self.duplicate();
        let pending = PendingCopy::new(self.inner.clone());
        self.inner.runtime.spawn(async move {
            let _pending = pending;
            let copy = settle.copy();
            match settle.inner.check_size(&copy.headers, copy.payload.len()) {
                Ok(_) => send_copy(&settle.inner, &copy).await,
                Err(refused) => {
                    if let Err(error) = settle.dead_letter_copy(&refused).await {
                        tracing::error!(%error, subject = %copy.subject, "a dropped core NATS message could be neither redelivered nor dead-lettered; it is lost");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgement_subjects_of_old_and_new_servers_are_read() {
        let published = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let old = AckInfo::read("$JS.ACK.ORDERS.workers.3.42.17.1700000000123456789.5");
        assert_eq!(
            old,
            Some(AckInfo {
                stream: "ORDERS",
                delivered: 3,
                sequence: "42",
                published: Some(published),
            })
        );
        let new =
            AckInfo::read("$JS.ACK._.ACCHASH.ORDERS.workers.3.42.17.1700000000123456789.5.tok");
        assert_eq!(new, old);
        // Before 1970: no time, the rest as it is.
        let early = AckInfo::read("$JS.ACK.ORDERS.workers.1.42.17.-5.0").expect("read");
        assert_eq!((early.delivered, early.published), (1, None));
    }

    #[test]
    fn other_subjects_are_not_acknowledgement_subjects() {
        for subject in [
            "_INBOX.abc",
            "$JS.ACK.ORDERS.workers.3.42.17.1700000000",
            "$JS.ACK.ORDERS.workers.x.42.17.1700000000123456789.5",
            "$JS.ACK.ORDERS.workers.3.42.17.1700000000123456789.five",
            "$JS.ACK._.ACCHASH.ORDERS.workers.3.42.17.1700000000123456789.5",
        ] {
            assert_eq!(AckInfo::read(subject), None, "{subject}");
        }
    }
}
