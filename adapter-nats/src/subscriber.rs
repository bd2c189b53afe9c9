//! Subscriptions: JetStream pull consumers (groups, private subscriptions, queues) and core
//! NATS subscriptions, and how their deliveries are settled.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::{self};
use async_nats::StatusCode;
use bus_core::{
    async_trait, headers, ConsumeOptions, Delivery, DeliverySource, Envelope, Error, Redeliver,
    Result, Settle, Settlement, SubscribeOptions, Subscriber, Subscription,
};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::broker::{Inner, Kind};
use crate::names::{self, QUEUE_CONSUMER};
use crate::{dead_letters, error, poison, wire, NatsBroker};

/// How long one pull (batch) request stays open on the server. Short, because a pull request
/// cannot be cancelled: closing a subscription waits for its open request to end before
/// handing messages back, since the server may still send messages (redeliveries too) to it.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// A private subscription's consumer is removed by the server after this long without pulls
/// (when the process died before closing it).
const PRIVATE_INACTIVE: Duration = Duration::from_secs(300);
/// How much longer than `PULL_EXPIRES` to wait for the end of a pull request.
const PULL_GRACE: Duration = Duration::from_secs(2);
/// How long a pull loop waits before sweeping again after a sweep failed, at first and at most.
const SWEEP_RETRY: Duration = Duration::from_secs(1);
const SWEEP_RETRY_MAX: Duration = Duration::from_secs(60);
/// The shortest interval between two extensions of the buffered deliveries.
const MIN_EXTEND_EVERY: Duration = Duration::from_millis(100);

/// A pulled message and its number in [`Buffered`].
type Pulled = (u64, jetstream::Message);

/// A delivery's turn at its acknowledgement subject: the buffer's extender holds it while it
/// sends `+WPI` for the delivery, settlement and `in_progress` take it first, so a `+WPI` is
/// never sent after (and never undoes the delay of) a `-NAK`.
type Turn = Arc<tokio::sync::Mutex<()>>;

/// The messages pulled and waiting in a subscription's buffer, which nobody else extends yet:
/// the subscription sends `+WPI` for them until `next()` hands them out (from then on the
/// holder does, the `Consumer` at a third of the ack wait).
#[derive(Default)]
struct Buffered {
    next: u64,
    waiting: HashMap<u64, Waiting>,
}

/// One message waiting in the buffer.
struct Waiting {
    /// Its acknowledgement subject.
    reply: async_nats::Subject,
    /// When it arrived or was last extended.
    extended: Instant,
    turn: Turn,
}

impl Buffered {
    /// Takes `number` out of the buffer's extension list and gives its turn.
    fn take(this: &Mutex<Self>, number: u64) -> Turn {
        this.lock()
            .expect("buffered messages")
            .waiting
            .remove(&number)
            .map(|w| w.turn)
            .unwrap_or_default()
    }
}

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
struct Spec {
    stream: String,
    config: pull::Config,
    /// The topic or queue name, as the user gave it.
    source: String,
    group: Option<String>,
    /// A private subscription: its consumer is deleted when it closes.
    private: bool,
}

impl Spec {
    fn sweep_target(&self) -> poison::Target {
        poison::Target {
            stream: self.stream.clone(),
            consumer: self.config.durable_name.clone().unwrap_or_default(),
            source: self.source.clone(),
            group: self.group.clone(),
        }
    }
}

/// A JetStream pull consumer behind a subscription. Pulling starts on the first call to
/// `next` (so a subscription that is never read takes no message from its group), in a task
/// that hands messages over a channel, which makes `next` cancel safe.
struct PullSource {
    inner: Arc<Inner>,
    spec: Arc<Spec>,
    batch: usize,
    consumer: Option<PullConsumer>,
    messages: Option<mpsc::Receiver<Pulled>>,
    /// Pulled messages not yet handed out, extended while they wait.
    buffered: Arc<Mutex<Buffered>>,
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
            buffered: Arc::default(),
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
            self.buffered.clone(),
            self.stop.subscribe(),
        )));
        self.inner.runtime.spawn(extend_buffered(
            self.inner.clone(),
            Arc::downgrade(&self.buffered),
            self.stop.subscribe(),
        ));
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
        let buffered = self.buffered.clone();
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
                while let Some((number, message)) = messages.recv().await {
                    let turn = Buffered::take(&buffered, number);
                    let _turn = turn.lock().await;
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
                let (number, message) = message?;
                // From here its holder extends it (the `Consumer` does).
                let turn = Buffered::take(&self.buffered, number);
                Some(Ok(delivery(&self.inner, &self.spec, message, turn)))
            }
            _ = self.closed.wait_for(|closed| *closed) => None,
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
    tx: mpsc::Sender<Pulled>,
    buffered: Arc<Mutex<Buffered>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut closed = inner.closed_signal();
    let mut consumer = Some(consumer);
    let mut backoff = Duration::from_millis(100);
    let mut sweeper = poison::Sweeper::new(spec.sweep_target());
    // When to sweep for messages the client cannot read (module `poison`), if it is due.
    let mut sweep_at: Option<tokio::time::Instant> = None;
    let mut sweep_retry = SWEEP_RETRY;
    loop {
        if *stop.borrow() || inner.is_closed() {
            return;
        }
        let current = match consumer.take() {
            Some(c) => Ok(c),
            None => inner.consumer(&spec.stream, &spec.config).await,
        };
        if let (Ok(c), Some(at)) = (&current, sweep_at) {
            if tokio::time::Instant::now() >= at {
                let swept = tokio::select! {
                    swept = sweeper.run(&inner, c) => swept,
                    () = stopped(&mut stop) => return,
                    () = stopped(&mut closed) => return,
                };
                match swept {
                    Ok(()) => {
                        sweep_at = None;
                        sweep_retry = SWEEP_RETRY;
                    }
                    Err(e) => {
                        tracing::warn!(
                            stream = %spec.stream,
                            error = %e,
                            "looking for messages the client cannot read failed; trying again \
                             in {sweep_retry:?}"
                        );
                        sweep_at = Some(tokio::time::Instant::now() + sweep_retry);
                        sweep_retry = (sweep_retry * 2).min(SWEEP_RETRY_MAX);
                    }
                }
            }
        }
        // Pull only what the buffer has room for: every pulled message goes straight into the
        // buffer, where its ack wait is extended until it is handed out. (Messages the client
        // held while waiting for room were redelivered once their ack wait ran out.)
        let first = tokio::select! {
            permit = tx.reserve() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = stopped(&mut stop) => return,
            () = stopped(&mut closed) => return,
        };
        let mut permits = vec![first];
        while permits.len() < batch {
            match tx.try_reserve() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        let pulled = match &current {
            Ok(c) => PullBatch::start(&inner, c, permits.len()).await,
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
                            // The request asked for as many messages as there are permits.
                            match permits.pop() {
                                Some(permit) => {
                                    let mut buffered = buffered.lock().expect("buffered messages");
                                    let number = buffered.next;
                                    buffered.next += 1;
                                    if let Some(reply) = message.message.reply.clone() {
                                        let waiting = Waiting {
                                            reply,
                                            extended: Instant::now(),
                                            turn: Turn::default(),
                                        };
                                        buffered.waiting.insert(number, waiting);
                                    }
                                    permit.send((number, message));
                                }
                                None => hand_back.push(message),
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
                if messages.lost(&inner) {
                    // Perhaps cut by a message the client cannot read, which would be
                    // redelivered (and cut the connection) for ever.
                    sweep_at.get_or_insert_with(tokio::time::Instant::now);
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
/// the server's status messages (no reply subject) from stored messages (with one), so that a stored message whose header block carries a status line
/// (`NATS/1.0 408 …`) is delivered (and found undecodable) rather than taken for the end of
/// the request and redelivered for ever.
struct PullBatch {
    subscriber: async_nats::Subscriber,
    context: jetstream::Context,
    remaining: usize,
    deadline: tokio::time::Instant,
    /// The client's connection count when the request was sent.
    connects: u64,
    /// Whether the request ended as the server ends it: filled, or with a status.
    ended: bool,
}

impl PullBatch {
    async fn start(
        inner: &Inner,
        consumer: &PullConsumer,
        batch: usize,
    ) -> std::result::Result<Self, String> {
        let connects = inner.client.statistics().connects.load(Ordering::Relaxed);
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
            connects,
            ended: false,
        })
    }

    /// Whether the connection dropped while the request was open: it ended without the
    /// server's word, or the client reconnected meanwhile.
    fn lost(&self, inner: &Inner) -> bool {
        !self.ended || inner.client.statistics().connects.load(Ordering::Relaxed) != self.connects
    }

    /// The next stored message, `None` once the request has ended, or the error status that
    /// ended it.
    async fn next(&mut self) -> Option<std::result::Result<jetstream::Message, String>> {
        loop {
            if self.remaining == 0 {
                self.ended = true;
                return None;
            }
            let message = tokio::time::timeout_at(self.deadline, self.subscriber.next())
                .await
                .ok()??;
            // The server's status messages never carry a reply subject.
            if message.reply.is_some() {
                self.remaining -= 1;
                return Some(Ok(jetstream::Message {
                    message,
                    context: self.context.clone(),
                }));
            }
            match message.status {
                Some(StatusCode::IDLE_HEARTBEAT) | None => {}
                Some(StatusCode::TIMEOUT | StatusCode::NOT_FOUND) => {
                    self.ended = true;
                    return None;
                }
                Some(status) => {
                    self.ended = true;
                    return Some(Err(format!(
                        "the pull request ended with status {status} ({})",
                        message.description.unwrap_or_default()
                    )));
                }
            }
        }
    }
}

/// Keeps the messages waiting in a subscription's buffer from being redelivered: at a third of
/// the ack wait, `+WPI` for every one that arrived or was extended more than a sixth of it
/// ago. Without it a slow consumer's buffered messages were redelivered while they waited, and
/// arrived twice with inflated attempts. Ends with the subscription.
async fn extend_buffered(
    inner: Arc<Inner>,
    buffered: Weak<Mutex<Buffered>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut closed = inner.closed_signal();
    let every = (inner.config.ack_wait() / 3).max(MIN_EXTEND_EVERY);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stopped(&mut stop) => return,
            () = stopped(&mut closed) => return,
        }
        let Some(buffered) = buffered.upgrade() else {
            return;
        };
        // Each message's turn is taken while it is still in the buffer: once `next()` has
        // handed it out, its holder settles or extends it, never this task.
        let due: Vec<(u64, async_nats::Subject, tokio::sync::OwnedMutexGuard<()>)> = {
            let buffered = buffered.lock().expect("buffered messages");
            buffered
                .waiting
                .iter()
                .filter(|(_, w)| w.extended.elapsed() >= every / 2)
                .filter_map(|(number, w)| {
                    let turn = w.turn.clone().try_lock_owned().ok()?;
                    Some((*number, w.reply.clone(), turn))
                })
                .collect()
        };
        for (number, reply, _turn) in due {
            let sent = Instant::now();
            match inner
                .client
                .publish(reply, bytes::Bytes::from_static(b"+WPI"))
                .await
            {
                Ok(()) => {
                    if let Some(w) = buffered
                        .lock()
                        .expect("buffered messages")
                        .waiting
                        .get_mut(&number)
                    {
                        w.extended = sent;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "extending a buffered message failed"),
            }
        }
    }
}

/// Completes once the flag is set (or its sender is gone).
async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

fn delivery(
    inner: &Arc<Inner>,
    spec: &Arc<Spec>,
    message: jetstream::Message,
    turn: Turn,
) -> Delivery {
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
            turn,
            envelope,
            source: spec.source.clone(),
            group: spec.group.clone(),
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

/// Settles one JetStream delivery: ack, nak (with delay), term after dead-lettering, progress.
struct JetStreamSettle {
    inner: Arc<Inner>,
    acker: Arc<Acker>,
    /// Taken before anything is sent on the acknowledgement subject.
    turn: Turn,
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

#[async_trait]
impl Settle for JetStreamSettle {
    async fn settle(&self, settlement: Settlement) -> Result<()> {
        let _turn = self.turn.lock().await;
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
                dead_letters::send(
                    &self.inner,
                    &self.envelope,
                    &self.source,
                    self.group.as_deref(),
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
        self.acker
            .ack_with(kind)
            .await
            .map_err(|e| error::settle(e, what))
    }

    async fn in_progress(&self) -> Result<()> {
        let _turn = self.turn.lock().await;
        self.acker
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| error::settle(e, "progress"))
    }

    fn abandon(&self) {
        let acker = self.acker.clone();
        let turn = self.turn.clone();
        // If this fails, JetStream redelivers after the ack wait anyway.
        self.inner.runtime.spawn(async move {
            let _turn = turn.lock().await;
            let _ = acker.ack_with(AckKind::Nak(None)).await;
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
        source: topic.to_owned(),
        group: options.group,
    })))
}

struct CoreSource {
    inner: Arc<Inner>,
    closed: watch::Receiver<bool>,
    /// The topic's messages and the copies nacked by this group (or subscription).
    subscriber: Option<futures::stream::Select<async_nats::Subscriber, async_nats::Subscriber>>,
    retry_subject: Arc<str>,
    source: String,
    group: Option<String>,
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
                id: None,
                kind: self.source.clone(),
                time: None,
            },
        );
        let envelope = received.envelope;
        let delivery = Delivery::new(
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
    source: String,
    group: Option<String>,
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
