//! Subscriptions: JetStream pull consumers (groups, private subscriptions, queues) and core
//! NATS subscriptions, and how their deliveries are settled.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::{self};
use async_nats::StatusCode;
use bus_core::middleware::dead_letter;
use bus_core::{
    async_trait, headers, ConsumeOptions, Delivery, DeliverySource, Envelope, Error, MessageId,
    Redeliver, Result, Settle, Settlement, SubscribeOptions, Subscriber, Subscription,
};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::broker::{Inner, Kind, MAX_STORED_HEADER_LEN};
use crate::names::{self, QUEUE_CONSUMER};
use crate::{error, poison, wire, NatsBroker};

/// How long one pull (batch) request stays open on the server. Short, because a pull request
/// cannot be cancelled: closing a subscription waits for its open request to end before
/// handing messages back, since the server may still send messages (redeliveries too) to it.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// A private subscription's consumer is removed by the server after this long without pulls
/// (when the process died before closing it).
const PRIVATE_INACTIVE: Duration = Duration::from_secs(300);
/// How much longer than `PULL_EXPIRES` to wait for the end of a pull request.
const PULL_GRACE: Duration = Duration::from_secs(2);
/// The longest delay a `-NAK` asks for: about a hundred years. Longer ones (up to
/// `Duration::MAX`) are not valid JSON numbers for the server, which would redeliver at once.
const MAX_NAK_DELAY: Duration = Duration::from_secs(100 * 365 * 86_400);

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
        let source = PullSource::new(
            inner.clone(),
            consumer,
            Spec {
                stream,
                config,
                source: topic.to_owned(),
                group: options.group.clone(),
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
    let source = PullSource::new(
        inner.clone(),
        consumer,
        Spec {
            stream,
            config,
            source: queue.to_owned(),
            group: None,
            private: false,
        },
        options.prefetch.unwrap_or(inner.config.prefetch),
    );
    Ok(Subscription::new(Box::new(source)))
}

/// What a pull source reads from, and how to make its consumer again.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) stream: String,
    pub(crate) config: pull::Config,
    /// The topic or queue name, as the user gave it.
    pub(crate) source: String,
    pub(crate) group: Option<String>,
    /// A private subscription: its consumer is deleted when it closes.
    pub(crate) private: bool,
}

/// A JetStream pull consumer behind a subscription. Pulling starts on the first call to
/// `next` (so a subscription that is never read takes no message from its group), in a task
/// that hands messages over a channel, which makes `next` cancel safe.
struct PullSource {
    inner: Arc<Inner>,
    spec: Arc<Spec>,
    batch: usize,
    consumer: Option<PullConsumer>,
    messages: Option<mpsc::Receiver<jetstream::Message>>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    closed: watch::Receiver<bool>,
    done: bool,
}

impl fmt::Debug for PullSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullSource")
            .field("stream", &self.spec.stream)
            .field("consumer", &self.spec.config.durable_name)
            .field("batch", &self.batch)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl PullSource {
    fn new(inner: Arc<Inner>, consumer: PullConsumer, spec: Spec, batch: usize) -> Self {
        let closed = inner.closed_signal();
        Self {
            inner,
            spec: Arc::new(spec),
            batch: batch.max(1),
            consumer: Some(consumer),
            messages: None,
            stop: watch::channel(false).0,
            task: None,
            closed,
            done: false,
        }
    }

    fn start(&mut self) {
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        let (tx, rx) = mpsc::channel(self.batch);
        self.messages = Some(rx);
        self.task = Some(self.inner.runtime.spawn(pull_loop(
            self.inner.clone(),
            self.spec.clone(),
            consumer,
            self.batch,
            tx,
            self.stop.subscribe(),
        )));
    }

    /// Stops pulling and hands back what was pulled but not handed out; then deletes a
    /// private consumer.
    fn shutdown(&mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.done = true;
        let _ = self.stop.send(true);
        let task = self.task.take();
        let messages = self.messages.take();
        let inner = self.inner.clone();
        let spec = self.spec.clone();
        async move {
            if let Some(task) = task {
                // The task ends once its last batch request has ended on the server (filled or
                // expired, at most PULL_EXPIRES), having handed back what that batch brought.
                let _ = task.await;
                let _ = tokio::time::timeout(Duration::from_secs(5), inner.client.flush()).await;
            }
            if spec.private {
                let name = spec.config.durable_name.clone().unwrap_or_default();
                let _ = inner
                    .jetstream
                    .delete_consumer_from_stream(&name, &spec.stream)
                    .await;
                return;
            }
            if let Some(mut messages) = messages {
                messages.close();
                while let Some(message) = messages.recv().await {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
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
        let messages = self.messages.as_mut()?;
        tokio::select! {
            message = messages.recv() => {
                let message = message?;
                Some(Ok(delivery(&self.inner, &self.spec, message)))
            }
            _ = self.closed.wait_for(|closed| *closed) => None,
        }
    }

    async fn close(&mut self) -> Result<()> {
        if !self.done {
            self.shutdown().await;
        }
        Ok(())
    }
}

/// Pulls from `consumer` into `tx` until told to stop, starting over (with the consumer looked
/// up or made again) after errors such as a server restart.
///
/// Each pull is one batch request that ends by itself (filled, or expired after
/// `PULL_EXPIRES`). When told to stop, the loop keeps reading the open batch until it ends,
/// and only then naks what it holds: a nak while the request is still open would have the
/// server redeliver the message to that same request, which is about to go away, and the
/// message would then wait out the whole ack wait.
async fn pull_loop(
    inner: Arc<Inner>,
    spec: Arc<Spec>,
    consumer: PullConsumer,
    batch: usize,
    tx: mpsc::Sender<jetstream::Message>,
    mut stop: watch::Receiver<bool>,
) {
    let mut closed = inner.closed_signal();
    let mut consumer = Some(consumer);
    let mut backoff = Duration::from_millis(100);
    let mut seen_connects = inner.client.statistics().connects.load(Ordering::Relaxed);
    loop {
        if *stop.borrow() || inner.is_closed() {
            return;
        }
        let current = match consumer.take() {
            Some(c) => Ok(c),
            None => inner.consumer(&spec.stream, &spec.config).await,
        };
        if let Ok(c) = &current {
            // The connection was lost since the last look: perhaps because of a message the
            // client cannot read, which would be redelivered (and cut the connection) for ever.
            let connects = inner.client.statistics().connects.load(Ordering::Relaxed);
            if connects != seen_connects {
                match poison::sweep(&inner, &spec, c).await {
                    Ok(()) => seen_connects = connects,
                    Err(e) => tracing::warn!(
                        stream = %spec.stream,
                        error = %e,
                        "looking for messages the client cannot read failed; trying again"
                    ),
                }
            }
        }
        let pulled = match &current {
            Ok(c) => PullBatch::start(&inner, c, batch).await,
            Err(e) => Err(e.to_string()),
        };
        match pulled {
            Ok(mut messages) => {
                let mut stopping = false;
                let mut hand_back = Vec::new();
                let mut failed = false;
                loop {
                    let item = if stopping {
                        messages.next().await
                    } else {
                        tokio::select! {
                            item = messages.next() => item,
                            () = stopped(&mut stop) => { stopping = true; continue; }
                            () = stopped(&mut closed) => { stopping = true; continue; }
                        }
                    };
                    match item {
                        Some(Ok(message)) if stopping => hand_back.push(message),
                        Some(Ok(message)) => {
                            backoff = Duration::from_millis(100);
                            let permit = tokio::select! {
                                permit = tx.reserve() => permit.ok(),
                                () = stopped(&mut stop) => None,
                                () = stopped(&mut closed) => None,
                            };
                            match permit {
                                Some(permit) => permit.send(message),
                                None => {
                                    // Nobody will take it: hand it back once the batch ends.
                                    stopping = true;
                                    hand_back.push(message);
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(
                                stream = %spec.stream,
                                error = %e,
                                "pulling from JetStream failed; pulling again"
                            );
                            failed = true;
                            break;
                        }
                        None => break,
                    }
                }
                for message in hand_back {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
                if stopping {
                    return;
                }
                if !failed {
                    // The batch ended normally: pull the next one with the same consumer.
                    consumer = current.ok();
                    continue;
                }
            }
            Err(e) => tracing::warn!(
                stream = %spec.stream,
                error = %e,
                "starting a JetStream pull failed; retrying in {backoff:?}"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One pull request, read from its own inbox. Unlike `async-nats`' batch stream, this tells
/// the server's status messages (no reply subject) from stored messages (replied to on
/// `$JS.ACK.…`), so that a stored message whose header block carries a status line
/// (`NATS/1.0 408 …`) is delivered (and found undecodable) rather than taken for the end of
/// the request and redelivered for ever.
struct PullBatch {
    subscriber: async_nats::Subscriber,
    context: jetstream::Context,
    remaining: usize,
    deadline: tokio::time::Instant,
}

impl PullBatch {
    async fn start(
        inner: &Inner,
        consumer: &PullConsumer,
        batch: usize,
    ) -> std::result::Result<Self, String> {
        let inbox = inner.client.new_inbox();
        let subscriber = inner
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| e.to_string())?;
        let request = pull::BatchConfig {
            batch,
            expires: Some(PULL_EXPIRES),
            ..pull::BatchConfig::default()
        };
        consumer
            .request_batch(request, inbox.into())
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            subscriber,
            context: inner.jetstream.clone(),
            remaining: batch,
            // The server ends the request at expiry (408); this bounds the wait when that
            // status is lost with the connection.
            deadline: tokio::time::Instant::now() + PULL_EXPIRES + PULL_GRACE,
        })
    }

    /// The next stored message, `None` once the request has ended, or the error status that
    /// ended it.
    async fn next(&mut self) -> Option<std::result::Result<jetstream::Message, String>> {
        loop {
            if self.remaining == 0 {
                return None;
            }
            let message = tokio::time::timeout_at(self.deadline, self.subscriber.next())
                .await
                .ok()??;
            if message
                .reply
                .as_ref()
                .is_some_and(|reply| reply.starts_with("$JS.ACK."))
            {
                self.remaining -= 1;
                return Some(Ok(jetstream::Message {
                    message,
                    context: self.context.clone(),
                }));
            }
            match message.status {
                Some(StatusCode::IDLE_HEARTBEAT) | None => {}
                Some(StatusCode::TIMEOUT | StatusCode::NOT_FOUND) => return None,
                Some(status) => {
                    return Some(Err(format!(
                        "the pull request ended with status {status} ({})",
                        message.description.unwrap_or_default()
                    )))
                }
            }
        }
    }
}

/// Completes once the flag is set (or its sender is gone).
async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

fn delivery(inner: &Arc<Inner>, spec: &Arc<Spec>, message: jetstream::Message) -> Delivery {
    let (attempt, id, time) = match message.info() {
        Ok(info) => (
            u32::try_from(info.delivered).unwrap_or(u32::MAX),
            Some(format!("{}:{}", info.stream, info.stream_sequence)),
            u64::try_from(info.published.unix_timestamp_nanos())
                .ok()
                .and_then(|n| SystemTime::UNIX_EPOCH.checked_add(Duration::from_nanos(n))),
        ),
        Err(_) => (1, None, None),
    };
    let (message, acker) = message.split();
    let received = wire::decode(
        message.headers.as_ref(),
        message.status.map(|s| (s, message.description.as_deref())),
        message.payload,
        wire::Defaults {
            id,
            kind: spec.source.clone(),
            time,
        },
    );
    let envelope = received.envelope;
    let delivery = Delivery::new(
        envelope.clone(),
        attempt,
        spec.source.clone(),
        spec.group.clone(),
        Box::new(JetStreamSettle {
            inner: inner.clone(),
            acker: Arc::new(acker),
            envelope,
            source: spec.source.clone(),
            group: spec.group.clone(),
            attempt,
        }),
    );
    match received.undecodable {
        Some(reason) => delivery.with_undecodable(reason),
        None => delivery,
    }
}

/// Settles one JetStream delivery: ack, nak (with delay), term after dead-lettering, progress.
struct JetStreamSettle {
    inner: Arc<Inner>,
    acker: Arc<Acker>,
    envelope: Envelope,
    source: String,
    group: Option<String>,
    attempt: u32,
}

impl fmt::Debug for JetStreamSettle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamSettle")
            .field("id", &self.envelope.id)
            .field("source", &self.source)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// Sends the dead letter of `envelope` to the queue named by `headers::dead_letter_queue`.
///
/// Never refused for its content: attributes NATS cannot carry are written as it can
/// (`wire::encode_lossy`), and a dead letter over the server's `max_payload` (or with more
/// headers than JetStream stores) loses its largest headers, then the end of its payload,
/// saying so in headers, rather than not being stored
/// (a message that can be neither handled nor dead-lettered would come back for ever).
pub(crate) async fn dead_letter(
    inner: &Inner,
    envelope: &Envelope,
    source: &str,
    group: Option<&str>,
    attempts: u32,
    reason: &str,
    msg_id: Option<String>,
) -> Result<()> {
    let dead = dead_letter::mark(
        envelope.clone(),
        &dead_letter::DeadLetterInfo {
            reason: &headers::shorten(reason, 4096),
            source,
            group,
            attempts,
            first_failure: None,
        },
    );
    let (mut map, payload) = fit(dead, &inner.config.source, inner.max_payload());
    if let Some(id) = msg_id {
        // JetStream drops a second copy stored within its duplicate window.
        map.insert(wire::NATS_MSG_ID, id);
    }
    inner
        .publish_encoded(
            Kind::Queue,
            &headers::dead_letter_queue(source),
            map,
            payload,
        )
        .await
}

/// Encodes a dead letter within `max` bytes (0: no limit) and JetStream's header limit: see
/// [`dead_letter`].
fn fit(mut dead: Envelope, source: &str, max: usize) -> (async_nats::HeaderMap, bytes::Bytes) {
    // Room for the notes and `Nats-Msg-Id`.
    const SLACK: usize = 256;
    // An attribute of a dead letter whose headers exceed JetStream's limit keeps at most this.
    const MAX_ATTRIBUTE_LEN: usize = 1024;
    let max = if max == 0 { usize::MAX } else { max };
    let mut dropped = 0usize;
    let mut shortened = false;
    let mut rounds = 0;
    loop {
        let map = wire::encode_lossy(&dead, source);
        let header_len = wire::header_len(&map) + SLACK;
        let size = header_len + dead.payload.len();
        let header_over = header_len.saturating_sub(MAX_STORED_HEADER_LEN);
        if size <= max && header_over == 0 {
            return (map, dead.payload);
        }
        let mut over = size.saturating_sub(max).max(header_over);
        let mut droppable: Vec<(String, usize)> = dead
            .headers
            .iter()
            .filter(|(name, _)| {
                !name.starts_with("bus-dlq-") && !name.starts_with(wire::NOTE_PREFIX)
            })
            .map(|(name, value)| (name.clone(), name.len() + value.len() + 4))
            .collect();
        if droppable.is_empty() && header_over > 0 && !shortened {
            // The attributes themselves are too long (a foreign 60 kB id): cut them down.
            shortened = true;
            let cut = |text: &str| headers::shorten(text, MAX_ATTRIBUTE_LEN).into_owned();
            dead.id = MessageId::from(cut(dead.id.as_str()));
            dead.correlation_id = MessageId::from(cut(dead.correlation_id.as_str()));
            dead.causation_id = dead.causation_id.map(|c| MessageId::from(cut(c.as_str())));
            dead.kind = cut(&dead.kind);
            dead.key = dead.key.as_deref().map(cut);
            dead.content_type = dead.content_type.as_deref().map(cut);
            dead.headers.insert(
                wire::SHORTENED_ATTRIBUTES.to_owned(),
                MAX_ATTRIBUTE_LEN.to_string(),
            );
            continue;
        }
        if droppable.is_empty() {
            if rounds > 8 {
                // Cannot happen with the limits above; never loop for ever on a dead letter.
                return (map, dead.payload);
            }
            rounds += 1;
            let original = dead.payload.len();
            let keep = original.saturating_sub(over);
            dead.payload = dead.payload.slice(..keep);
            dead.headers
                .entry(wire::TRUNCATED_PAYLOAD.to_owned())
                .or_insert_with(|| original.to_string());
            continue;
        }
        droppable.sort_by_key(|(_, len)| std::cmp::Reverse(*len));
        for (name, len) in droppable {
            if over == 0 {
                break;
            }
            dead.headers.remove(&name);
            dropped += 1;
            over = over.saturating_sub(len);
        }
        dead.headers
            .insert(wire::DROPPED_HEADERS.to_owned(), dropped.to_string());
    }
}

#[async_trait]
impl Settle for JetStreamSettle {
    async fn settle(&self, settlement: Settlement) -> Result<()> {
        let (kind, what) = match settlement {
            Settlement::Ack => (AckKind::Ack, "ack"),
            Settlement::Nack(Redeliver::After(delay)) => {
                (AckKind::Nak(Some(delay.min(MAX_NAK_DELAY))), "nak")
            }
            Settlement::Nack(_) => (AckKind::Nak(None), "nak"),
            Settlement::Reject { reason } => {
                // The dead letter is stored first: if that fails, the delivery stays unsettled.
                dead_letter(
                    &self.inner,
                    &self.envelope,
                    &self.source,
                    self.group.as_deref(),
                    self.attempt,
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
        self.acker
            .ack_with(kind)
            .await
            .map_err(|e| error::settle(e, what))
    }

    async fn in_progress(&self) -> Result<()> {
        self.acker
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| error::settle(e, "progress"))
    }

    fn abandon(&self) {
        let acker = self.acker.clone();
        // If this fails, JetStream redelivers after the ack wait anyway.
        self.inner.runtime.spawn(async move {
            let _ = acker.ack_with(AckKind::Nak(None)).await;
        });
    }
}

/// A topic on core NATS (`durable=false`): a plain subscription, or a queue group for a
/// named group.
async fn subscribe_core(
    inner: &Arc<Inner>,
    topic: &str,
    options: SubscribeOptions,
) -> Result<Subscription> {
    let subject = inner.names.topic_subject(topic);
    let subscriber = match &options.group {
        Some(group) => {
            inner
                .client
                .queue_subscribe(subject.clone(), names::encode(group))
                .await
        }
        None => inner.client.subscribe(subject.clone()).await,
    }
    .map_err(|e| error::subscribe(e, &subject))?;
    Ok(Subscription::new(Box::new(CoreSource {
        inner: inner.clone(),
        closed: inner.closed_signal(),
        subscriber: Some(subscriber),
        source: topic.to_owned(),
        group: options.group,
    })))
}

struct CoreSource {
    inner: Arc<Inner>,
    closed: watch::Receiver<bool>,
    subscriber: Option<async_nats::Subscriber>,
    source: String,
    group: Option<String>,
}

impl fmt::Debug for CoreSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreSource")
            .field("source", &self.source)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
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
        // No broker identity on core NATS: an id-less message gets one derived from its content.
        let received = wire::decode(
            message.headers.as_ref(),
            message.status.map(|s| (s, message.description.as_deref())),
            message.payload,
            wire::Defaults {
                id: None,
                kind: self.source.clone(),
                time: None,
            },
        );
        let envelope = received.envelope;
        let delivery = Delivery::new(
            envelope.clone(),
            1,
            self.source.clone(),
            self.group.clone(),
            Box::new(CoreSettle {
                inner: self.inner.clone(),
                envelope,
                source: self.source.clone(),
                group: self.group.clone(),
            }),
        );
        Some(Ok(match received.undecodable {
            Some(reason) => delivery.with_undecodable(reason),
            None => delivery,
        }))
    }

    async fn close(&mut self) -> Result<()> {
        if let Some(mut subscriber) = self.subscriber.take() {
            let _ = subscriber.unsubscribe().await;
        }
        Ok(())
    }
}

/// Settles a core NATS delivery: nothing to acknowledge, no redelivery; a reject still sends
/// the dead letter to the (JetStream) dead-letter queue.
struct CoreSettle {
    inner: Arc<Inner>,
    envelope: Envelope,
    source: String,
    group: Option<String>,
}

impl fmt::Debug for CoreSettle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreSettle")
            .field("id", &self.envelope.id)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Settle for CoreSettle {
    async fn settle(&self, settlement: Settlement) -> Result<()> {
        match settlement {
            Settlement::Ack => Ok(()),
            Settlement::Reject { reason } => {
                dead_letter(
                    &self.inner,
                    &self.envelope,
                    &self.source,
                    self.group.as_deref(),
                    1,
                    &reason,
                    None,
                )
                .await
            }
            _ => Err(Error::unsupported(
                "core NATS topics (durable=false) cannot redeliver: nack is unsupported",
            )),
        }
    }

    fn abandon(&self) {
        // Core NATS has delivered and forgotten it: not durable, as the capabilities say.
    }
}
