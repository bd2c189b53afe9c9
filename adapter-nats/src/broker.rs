//! The connection: the client, the JetStream context, the streams made so far, and close.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use bus_core::{
    async_trait, Backlog, BacklogOf, Broker, Capabilities, Envelope, Error, ErrorKind, Result,
    Support,
};
use tokio::sync::watch;

use crate::config::{NatsConfig, Storage};
use crate::error;
use crate::names::Names;
use crate::wire;

/// The largest header block JetStream stores with a message (the server refuses more, "header
/// size exceeds maximum allowed of 64k"); core NATS has no such limit.
pub(crate) const MAX_STORED_HEADER_LEN: usize = u16::MAX as usize;

/// Which kind of stream backs a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A topic: limits retention, every consumer (group) reads every message.
    Topic = 0,
    /// A queue: work-queue retention, one shared consumer, a message gone once acked.
    Queue = 1,
}

/// What every handle, subscription and delivery of one connection shares.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: NatsConfig,
    pub(crate) client: async_nats::Client,
    pub(crate) jetstream: jetstream::Context,
    pub(crate) names: Names,
    /// Streams created or updated by this connection (by stream name).
    streams: Mutex<HashSet<String>>,
    /// Where the messages of a topic or queue go, once its stream is known to exist: the
    /// subject, so publishing does not build the names again per message.
    /// Topics first, queues second (by name).
    routes: Mutex<[HashMap<String, async_nats::Subject>; 2]>,
    /// The server's `max_payload`, read again after a reconnect or a second.
    max_payload: Mutex<MaxPayload>,
    closed: watch::Sender<bool>,
    /// Copies of nacked core NATS messages waiting out their delay (`subscriber::CoreSettle`):
    /// close sends them at once and waits for them.
    pub(crate) core_copies: watch::Sender<usize>,
    /// Whether this connection's mover of delayed messages runs (module `delayed`).
    pub(crate) mover_started: AtomicBool,
    pub(crate) runtime: tokio::runtime::Handle,
}

/// The server's `max_payload` as last read, and when: `Client::server_info` copies the whole
/// server information (a dozen strings), too much to do per message.
#[derive(Debug)]
struct MaxPayload {
    value: usize,
    /// The client's connection count when it was read: a reconnect (maybe to another server)
    /// reads it again. 0 before the first read (the count starts at 1).
    connects: u64,
    read: Instant,
}

/// How long a `max_payload` read stays in use at most (the server information can arrive a
/// moment after the reconnect that the connection count shows).
const MAX_PAYLOAD_REFRESH: Duration = Duration::from_secs(1);

/// Locks `mutex`, also when a panic poisoned it: what the crate's locks guard is a few fields
/// set together (inserts, removals, counters), which a panic leaves in no state that matters
/// more than the panic itself.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.is_closed() {
            Err(error::closed())
        } else {
            Ok(())
        }
    }

    /// Completes once the connection is closed.
    pub(crate) fn closed_signal(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Waits until the server has read everything this connection sent so far, such as a
    /// subscription to `subject`: before that, what other connections publish does not reach
    /// it, and core NATS keeps nothing for later. `Client::flush` only writes to the socket;
    /// the server reads a connection in order, so its answer to a request sent now (to an
    /// inbox nobody serves: "no responders") comes after it has the subscription.
    pub(crate) async fn confirm_subscription(&self, subject: &str) -> Result<()> {
        match self
            .client
            .request(self.client.new_inbox(), bytes::Bytes::new())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Err(e) => Err(error::confirm_subscription(e, subject)),
        }
    }

    /// The server's limit on one message (headers and body together).
    pub(crate) fn max_payload(&self) -> usize {
        let connects = self.client.statistics().connects.load(Ordering::Relaxed);
        let mut cached = lock(&self.max_payload);
        let fresh = cached.connects == connects && cached.read.elapsed() < MAX_PAYLOAD_REFRESH;
        if !fresh {
            *cached = MaxPayload {
                value: self.client.server_info().max_payload,
                connects,
                read: Instant::now(),
            };
        }
        cached.value
    }

    /// Refuses a message the server would refuse: headers and payload over `max_payload`.
    /// Returns the length of the header block.
    pub(crate) fn check_size(
        &self,
        headers: &async_nats::HeaderMap,
        payload: usize,
    ) -> Result<usize> {
        let max = self.max_payload();
        let header_len = wire::header_len(headers);
        if max > 0 && payload + header_len > max {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "a payload of {payload} bytes with {header_len} bytes of headers exceeds the \
                     NATS server's max_payload of {max} bytes"
                ),
            ));
        }
        Ok(header_len)
    }

    /// The stream backing `name` (a topic or a queue), created or updated on first use by this
    /// connection.
    pub(crate) async fn ensure_stream(&self, kind: Kind, name: &str) -> Result<String> {
        self.ensure_stream_subject(kind, name)
            .await
            .map(|(stream, _)| stream)
    }

    /// [`ensure_stream`](Self::ensure_stream), also returning the subject the stream holds.
    pub(crate) async fn ensure_stream_subject(
        &self,
        kind: Kind,
        name: &str,
    ) -> Result<(String, String)> {
        let (stream, subject) = match kind {
            Kind::Topic => (
                self.names.topic_stream(name),
                self.names.topic_subject(name),
            ),
            Kind::Queue => (
                self.names.queue_stream(name),
                self.names.queue_subject(name),
            ),
        };
        if lock(&self.streams).contains(&stream) {
            return Ok((stream, subject));
        }
        let config = stream::Config {
            name: stream.clone(),
            description: Some(format!(
                "bus {}: {name}",
                if kind == Kind::Topic {
                    "topic"
                } else {
                    "queue"
                }
            )),
            subjects: vec![subject.clone()],
            retention: match kind {
                Kind::Topic => stream::RetentionPolicy::Limits,
                Kind::Queue => stream::RetentionPolicy::WorkQueue,
            },
            storage: match self.config.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            num_replicas: self.config.replicas,
            max_age: match (kind, self.config.max_age_secs) {
                (Kind::Topic, Some(secs)) => Duration::from_secs(secs),
                _ => Duration::ZERO,
            },
            ..stream::Config::default()
        };
        self.ensure_stream_config(config).await?;
        Ok((stream, subject))
    }

    /// Creates or updates the stream `config` describes, once per connection.
    pub(crate) async fn ensure_stream_config(&self, config: stream::Config) -> Result<()> {
        if lock(&self.streams).contains(&config.name) {
            return Ok(());
        }
        let name = config.name.clone();
        self.jetstream
            .create_or_update_stream(config)
            .await
            .map_err(|e| error::stream(e, &name))?;
        lock(&self.streams).insert(name);
        Ok(())
    }

    /// Forgets that the stream `name` exists (not a topic's or queue's: those are forgotten
    /// by [`forget_stream`](Self::forget_stream)).
    pub(crate) fn forget_stream_named(&self, name: &str) {
        lock(&self.streams).remove(name);
    }

    /// The subject the messages of a topic or queue are sent on, its stream made sure of
    /// ([`ensure_stream`](Self::ensure_stream)) the first time, and remembered until the
    /// stream is forgotten.
    async fn route(&self, kind: Kind, name: &str) -> Result<async_nats::Subject> {
        if let Some(subject) = lock(&self.routes)[kind as usize].get(name) {
            return Ok(subject.clone());
        }
        let (_, subject) = self.ensure_stream_subject(kind, name).await?;
        let subject = async_nats::Subject::from(subject);
        lock(&self.routes)[kind as usize].insert(name.to_owned(), subject.clone());
        Ok(subject)
    }

    /// Forgets that a stream exists (it was deleted behind this connection's back).
    pub(crate) fn forget_stream(&self, kind: Kind, name: &str) {
        let stream = match kind {
            Kind::Topic => self.names.topic_stream(name),
            Kind::Queue => self.names.queue_stream(name),
        };
        lock(&self.streams).remove(&stream);
        lock(&self.routes)[kind as usize].remove(name);
    }

    /// The durable pull consumer `config` names on `stream`: the existing one (keeping its
    /// position) or a new one.
    pub(crate) async fn consumer(
        &self,
        stream: &str,
        config: &pull::Config,
    ) -> Result<jetstream::consumer::PullConsumer> {
        let name = config.durable_name.clone().unwrap_or_default();
        match self
            .jetstream
            .get_consumer_from_stream::<pull::Config, _, _>(&name, stream)
            .await
        {
            Ok(consumer) => Ok(consumer),
            Err(_) => self
                .jetstream
                .create_consumer_on_stream(config.clone(), stream)
                .await
                .map_err(|e| error::consumer(e, &name, stream)),
        }
    }

    /// Publishes to JetStream and waits for the server's acknowledgement (the message is
    /// stored). Creates the stream if it went missing.
    pub(crate) async fn publish_stored(
        &self,
        kind: Kind,
        name: &str,
        envelope: &Envelope,
    ) -> Result<()> {
        let ack = self.send_stored(kind, name, envelope).await?;
        self.await_ack(kind, name, ack).await
    }

    /// Sends to JetStream without waiting for the acknowledgement.
    pub(crate) async fn send_stored(
        &self,
        kind: Kind,
        name: &str,
        envelope: &Envelope,
    ) -> Result<jetstream::context::PublishAckFuture> {
        self.check()?;
        let headers = wire::encode(envelope, &self.config.source)?;
        self.check_stored(&headers, envelope.payload.len())?;
        self.send_encoded(kind, name, headers, envelope.payload.clone())
            .await
    }

    /// Refuses a message JetStream would refuse to store: over `max_payload`, or with more
    /// header bytes than it keeps.
    pub(crate) fn check_stored(
        &self,
        headers: &async_nats::HeaderMap,
        payload: usize,
    ) -> Result<()> {
        let header_len = self.check_size(headers, payload)?;
        if header_len > MAX_STORED_HEADER_LEN {
            return Err(Error::new(
                ErrorKind::HeadersTooLarge,
                format!(
                    "{header_len} bytes of headers exceed the {MAX_STORED_HEADER_LEN} bytes \
                     JetStream stores with a message"
                ),
            ));
        }
        Ok(())
    }

    /// Stores headers and payload already encoded, waiting for the acknowledgement.
    pub(crate) async fn publish_encoded(
        &self,
        kind: Kind,
        name: &str,
        headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<()> {
        self.check()?;
        let ack = self.send_encoded(kind, name, headers, payload).await?;
        self.await_ack(kind, name, ack).await
    }

    async fn send_encoded(
        &self,
        kind: Kind,
        name: &str,
        headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<jetstream::context::PublishAckFuture> {
        let subject = self.route(kind, name).await?;
        self.jetstream
            .publish_with_headers(subject.clone(), headers, payload)
            .await
            .map_err(|e| error::publish(e, &subject))
    }

    pub(crate) async fn await_ack(
        &self,
        kind: Kind,
        name: &str,
        ack: jetstream::context::PublishAckFuture,
    ) -> Result<()> {
        match ack.await {
            Ok(_) => Ok(()),
            Err(e) => {
                if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                    self.forget_stream(kind, name);
                }
                let subject = match kind {
                    Kind::Topic => self.names.topic_subject(name),
                    Kind::Queue => self.names.queue_subject(name),
                };
                Err(error::publish(e, &subject))
            }
        }
    }
}

/// A connection to NATS: JetStream for topics (or core NATS with `durable=false`) and queues,
/// core NATS request-reply.
///
/// Clones share the connection. See the crate docs for what maps to what.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> bus_core::Result<()> {
/// use adapter_nats::NatsBroker;
/// use bus_core::{Envelope, Publisher, SubscribeOptions, Subscriber};
///
/// let broker = NatsBroker::connect("nats://127.0.0.1:4222").await?;
/// let mut billing = broker.subscribe("orders", SubscribeOptions::group("billing")).await?;
/// broker.publish("orders", Envelope::new("order.placed", "{}")).await?;
/// let delivery = billing.next().await.expect("open")?;
/// delivery.ack().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct NatsBroker {
    pub(crate) inner: Arc<Inner>,
}

impl NatsBroker {
    /// Connects with the settings in `url` (see [`NatsConfig::from_url`]).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for an invalid URL; connection errors as
    /// [`NatsBroker::connect_with`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(NatsConfig::from_url(url)?).await
    }

    /// Connects with `config`. Must be called within a tokio runtime.
    ///
    /// # Errors
    /// - [`ErrorKind::Connection`] when the server cannot be reached;
    /// - [`ErrorKind::Timeout`] when connecting took longer than
    ///   [`NatsConfig::connect_timeout`] (the first connect is tried once, never retried);
    /// - [`ErrorKind::Rejected`] when the server refused the credentials (authentication
    ///   failed) or the TLS handshake (a client certificate it requires is missing or not
    ///   trusted);
    /// - [`ErrorKind::Config`] for TLS settings that cannot work: a server certificate the
    ///   configured CA did not sign or that names another host, a CA, certificate or key file
    ///   that cannot be read; and for credentials that cannot be used: a malformed NKey seed,
    ///   a `.creds` file that cannot be read or parsed, a password, token or seed given as an
    ///   environment variable that is unset or a file that cannot be read (named in the
    ///   message), all before anything is sent.
    ///
    /// None of these messages holds a password, token, seed or key. A server without JetStream
    /// is found out on the first stream `bus` needs ([`ErrorKind::Unsupported`]).
    ///
    /// # Cancel safety
    /// Dropping the future abandons the connection attempt.
    pub async fn connect_with(config: NatsConfig) -> Result<Self> {
        let shown = config.redacted_url();
        let options = config.connect_options().await?;
        // async-nats bounds the TCP connect only; a server that never sends INFO or never
        // finishes the TLS handshake would hold the first connect for ever.
        let timeout = config.connect_timeout();
        let client = tokio::time::timeout(timeout, options.connect(config.url.as_str()))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "connecting to NATS at {shown}: not connected within {timeout:?} (no \
                         answer, or the TLS handshake or authentication did not finish)"
                    ),
                )
            })?
            .map_err(|e| error::connect(e, &shown))?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.publish_timeout())
            .build(client.clone());
        let (closed, _) = watch::channel(false);
        tracing::debug!(url = %shown, "connected to NATS");
        Ok(Self {
            inner: Arc::new(Inner {
                names: Names::new(&config.prefix),
                config,
                client,
                jetstream,
                streams: Mutex::new(HashSet::new()),
                routes: Mutex::new([HashMap::new(), HashMap::new()]),
                max_payload: Mutex::new(MaxPayload {
                    value: 0,
                    connects: 0,
                    read: Instant::now(),
                }),
                closed,
                core_copies: watch::channel(0).0,
                mover_started: AtomicBool::new(false),
                runtime: tokio::runtime::Handle::current(),
            }),
        })
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }

    /// The underlying `async-nats` client, for what `bus` does not cover.
    #[must_use]
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The JetStream context `bus` uses.
    #[must_use]
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.jetstream
    }

    /// The NATS subject a topic's messages are published on (for plain NATS clients).
    #[must_use]
    pub fn topic_subject(&self, topic: &str) -> String {
        self.inner.names.topic_subject(topic)
    }

    /// The JetStream stream holding a topic's messages.
    #[must_use]
    pub fn topic_stream(&self, topic: &str) -> String {
        self.inner.names.topic_stream(topic)
    }

    /// The NATS subject a queue's messages are sent on.
    #[must_use]
    pub fn queue_subject(&self, queue: &str) -> String {
        self.inner.names.queue_subject(queue)
    }

    /// The JetStream work-queue stream holding a queue's messages.
    #[must_use]
    pub fn queue_stream(&self, queue: &str) -> String {
        self.inner.names.queue_stream(queue)
    }

    /// The NATS subject requests to `topic` are sent on.
    #[must_use]
    pub fn request_subject(&self, topic: &str) -> String {
        self.inner.names.request_subject(topic)
    }
}

#[async_trait]
impl Broker for NatsBroker {
    fn capabilities(&self) -> Capabilities {
        let config = &self.inner.config;
        let stored = config.storage == Storage::File;
        let base = Capabilities {
            name: "nats",
            durable: config.durable && stored,
            consumer_groups: true,
            per_key_order: true,
            per_key_order_across_members: false,
            // A nak lets the subject's later messages pass; the Consumer's retries in place
            // keep the order.
            key_order_across_retries: Support::Emulated,
            request_reply: Support::Native,
            no_responders_detection: true,
            delayed_redelivery: Support::Native,
            dead_letter: Support::Emulated,
            prompt_redelivery_of_dropped: true,
            // JetStream's delivered count.
            delivery_count: Support::Native,
            max_payload_bytes: Some(self.inner.max_payload()),
            max_headers: None,
            // Parked in the `<prefix>-delayed` stream and moved when due (module `delayed`):
            // nats-server has no message schedules before 2.12. No limit but the hundred
            // years `bus` waits at most.
            delayed_publish: Support::Emulated,
            max_delay: None,
            // The group's consumer (pending, ack-pending), the queue's work-queue stream and
            // the delayed stream's count per subject: exact.
            backlog: Support::Native,
        };
        if config.durable {
            base
        } else {
            // Core NATS keeps nothing: the adapter redelivers a nacked or dropped message by
            // publishing a copy to the subscription's group, counting attempts in
            // `bus-attempt`.
            Capabilities {
                delayed_redelivery: Support::Emulated,
                delivery_count: Support::Emulated,
                delayed_publish: Support::Unsupported(
                    "core NATS (durable=false) keeps nothing to hold a delayed message for a \
                     topic's groups (send_delayed to a queue, on JetStream, works)",
                ),
                backlog: Support::Unsupported(
                    "core NATS (durable=false) keeps nothing for a topic's groups to count \
                     (the backlog of a queue, on JetStream, is counted)",
                ),
                ..base
            }
        }
    }

    /// Counts from JetStream, exactly (`approximate` is false):
    /// - a group: its durable consumer's `num_pending` as `waiting` and `num_ack_pending` as
    ///   `in_flight` (which includes messages nacked with a delay: JetStream holds them as
    ///   unacknowledged until it redelivers them);
    /// - a queue: the same from its shared consumer, or, before anyone consumed, the
    ///   work-queue stream's message count as `waiting`;
    /// - `delayed`: the messages published or sent with a delay that wait in the
    ///   `<prefix>-delayed` stream for that topic or queue;
    /// - `oldest_age`: how long ago the server stored the oldest message not yet settled
    ///   (waiting or in flight).
    ///
    /// # Errors
    /// [`NotFound`](ErrorKind::NotFound) for a group whose consumer or a topic or queue whose
    /// stream does not exist; [`Unsupported`](ErrorKind::Unsupported) for a group with
    /// `durable=false`; connection errors.
    async fn backlog(&self, of: &BacklogOf) -> Result<Backlog> {
        crate::backlog::count(&self.inner, of).await
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.send_replace(true) {
            return Ok(());
        }
        // Delayed copies of nacked core NATS messages go out now (to the other members of
        // their group), rather than being lost with this connection.
        let mut copies = self.inner.core_copies.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            copies.wait_for(|pending| *pending == 0),
        )
        .await;
        // Acknowledgements already handed to the client go out before we return.
        match tokio::time::timeout(Duration::from_secs(5), self.inner.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::with_source(
                ErrorKind::Connection,
                "flushing the NATS connection on close",
                e,
            )),
            Err(_) => Err(Error::timeout(
                "flushing the NATS connection on close took over 5 s",
            )),
        }
    }
}
