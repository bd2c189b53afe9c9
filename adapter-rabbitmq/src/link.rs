//! The connection to RabbitMQ, re-established with backoff when it is lost, and the
//! confirmed publishing channel on it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bus_core::{Error, ErrorKind, Result};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::watch;

use crate::broker::check_name;
use crate::endpoint::Endpoint;
use crate::error::map;
use crate::{wire, RabbitMqConfig};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only caches live behind these locks: nothing is left half-updated by a panic.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// One live connection, with its publishing channel and what was declared on it.
pub(crate) struct Session {
    pub(crate) connection: Connection,
    /// Which connection of the link this is (1 for the first).
    pub(crate) generation: u64,
    publisher: Mutex<Option<Channel>>,
    declared: Mutex<HashSet<String>>,
}

impl Session {
    fn healthy(&self) -> bool {
        self.connection.status().connected()
    }

    /// A channel for declarations, closed when dropped.
    pub(crate) async fn channel(&self) -> Result<Channel> {
        self.connection
            .create_channel()
            .await
            .map_err(|e| map(e, "opening a channel"))
    }

    /// The publishing channel (in confirm mode), reopened if the broker closed it.
    pub(crate) async fn publisher(&self) -> Result<Channel> {
        if let Some(channel) = lock(&self.publisher).as_ref() {
            if channel.status().connected() {
                return Ok(channel.clone());
            }
        }
        let channel = self.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| map(e, "enabling publisher confirms"))?;
        *lock(&self.publisher) = Some(channel.clone());
        Ok(channel)
    }

    /// Refuses properties whose content-header frame would exceed the negotiated
    /// `frame_max`: RabbitMQ answers such a frame by closing the whole connection.
    pub(crate) fn check_headers(&self, properties: &BasicProperties) -> Result<()> {
        let frame_max = self.frame_max();
        let size = crate::wire::header_frame_size(properties);
        if frame_max > 0 && size > frame_max {
            return Err(Error::new(
                ErrorKind::HeadersTooLarge,
                format!(
                    "the message's headers take about {size} bytes, more than the frame size of                      {frame_max} bytes negotiated with the broker (frame_max)"
                ),
            ));
        }
        Ok(())
    }

    /// The largest frame the broker takes on this connection (0: no limit).
    pub(crate) fn frame_max(&self) -> usize {
        self.connection.configuration().frame_max() as usize
    }

    /// Declares the durable work queue `queue` once per connection.
    pub(crate) async fn ensure_queue(&self, queue: &str, args: &FieldTable) -> Result<()> {
        if lock(&self.declared).contains(queue) {
            return Ok(());
        }
        let channel = self.channel().await?;
        declare_queue(&channel, queue, args).await?;
        lock(&self.declared).insert(queue.to_owned());
        Ok(())
    }

    /// Declares the durable queue `queue` now, whether or not it was declared before: for
    /// queues with `x-expires`, which only a declaration or a consumer keeps alive.
    pub(crate) async fn declare_again(&self, queue: &str, args: &FieldTable) -> Result<()> {
        let channel = self.channel().await?;
        declare_queue(&channel, queue, args).await
    }

    /// Forgets that `queue` was declared (it was deleted behind our back).
    pub(crate) fn forget_queue(&self, queue: &str) {
        lock(&self.declared).remove(queue);
    }

    /// How many messages are ready in `queue`, from a passive declaration on a channel of its
    /// own (RabbitMQ closes the channel of a passive declaration of a missing queue, and lapin
    /// logs that as an error); `None` if there is no such queue.
    pub(crate) async fn ready(&self, queue: &str) -> Result<Option<u32>> {
        let channel = self.channel().await?;
        let declared = channel
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(declared) => Ok(Some(declared.message_count())),
            Err(e) => match map(e, &format!("counting the messages of queue `{queue}`")) {
                e if e.kind() == ErrorKind::NotFound => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Declares the TTL queue that holds messages of `queue` for `delay` (its bucket, see
    /// [`wire::retry_delay_ms`]) and returns its name: when their TTL ends they dead-letter,
    /// through the default exchange, back to `queue`. What a `nack(After)` and a delayed
    /// `send` park messages in.
    pub(crate) async fn declare_retry_queue(&self, queue: &str, delay: Duration) -> Result<String> {
        let ms = wire::retry_delay_ms(delay);
        let name = wire::retry_queue(queue, delay);
        check_name(&name, "retry queue")?;
        let mut args = FieldTable::default();
        args.insert(ShortString::from("x-message-ttl"), long_int(ms));
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            ShortString::from("x-dead-letter-routing-key"),
            AMQPValue::LongString(queue.into()),
        );
        // Removed ten minutes after the last message was put in (and so after it went back).
        args.insert(
            ShortString::from("x-expires"),
            long_int(ms + wire::RETRY_QUEUE_EXPIRES_MS),
        );
        // Declared every time: publishing does not count as use for `x-expires`, and a
        // queue expiring with messages in it would lose them.
        self.declare_again(&name, &args).await?;
        Ok(name)
    }

    /// Declares, once per connection, the fanout exchange and the TTL queue bound to it that
    /// hold messages published to topics of `topic_exchange` for `delay` (its bucket), and
    /// returns their name: a message published to the exchange with its topic's routing key
    /// dead-letters, when its TTL ends, into `topic_exchange` under that same routing key, and
    /// so reaches every group bound then. One queue per bucket serves every topic. Each
    /// message carries its own delay as its `expiration`, shorter than or equal to the queue's
    /// TTL; RabbitMQ expires messages only at the head of a queue, so one can wait behind an
    /// earlier one, at the latest until the end of its bucket.
    pub(crate) async fn declare_delay_queue(
        &self,
        topic_exchange: &str,
        delay: Duration,
    ) -> Result<String> {
        let ms = wire::retry_delay_ms(delay);
        let name = wire::delay_queue(topic_exchange, delay);
        check_name(&name, "delay queue")?;
        if lock(&self.declared).contains(&name) {
            return Ok(name);
        }
        let channel = self.channel().await?;
        channel
            .exchange_declare(
                &name,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map(e, &format!("declaring exchange `{name}`")))?;
        let mut args = FieldTable::default();
        args.insert(ShortString::from("x-message-ttl"), long_int(ms));
        // No `x-dead-letter-routing-key`: the message keeps the topic's routing key.
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(topic_exchange.into()),
        );
        declare_queue(&channel, &name, &args).await?;
        channel
            .queue_bind(
                &name,
                &name,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map(e, &format!("binding queue `{name}` to its exchange")))?;
        lock(&self.declared).insert(name.clone());
        Ok(name)
    }
}

fn long_int(n: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX))
}

/// Declares a durable work or group queue.
pub(crate) async fn declare_queue(channel: &Channel, queue: &str, args: &FieldTable) -> Result<()> {
    channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args.clone(),
        )
        .await
        .map_err(|e| map(e, &format!("declaring queue `{queue}`")))?;
    Ok(())
}

/// What the broker said to a confirmed publish.
#[derive(Debug)]
pub(crate) enum Confirmed {
    /// Stored.
    Ack,
    /// Mandatory and unroutable: returned with this reply text.
    Returned(String),
}

/// Waits for a publish's confirm.
pub(crate) async fn confirmed(
    confirm: lapin::publisher_confirm::PublisherConfirm,
    timeout: Duration,
) -> Result<Confirmed> {
    match tokio::time::timeout(timeout, confirm).await {
        Err(_) => Err(Error::timeout(format!(
            "the broker did not confirm the publish within {timeout:?}"
        ))),
        Ok(Err(e)) => Err(map(e, "waiting for the publish confirm")),
        Ok(Ok(Confirmation::Nack(_))) => Err(Error::new(
            ErrorKind::Rejected,
            "the broker refused the message (basic.nack)",
        )),
        Ok(Ok(Confirmation::Ack(Some(returned)))) => {
            Ok(Confirmed::Returned(returned.reply_text.as_str().to_owned()))
        }
        Ok(Ok(_)) => Ok(Confirmed::Ack),
    }
}

/// The connection, made on demand and re-made with backoff after a loss.
pub(crate) struct Link {
    config: RabbitMqConfig,
    current: Mutex<Option<Arc<Session>>>,
    connecting: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    closed: AtomicBool,
    closed_tx: watch::Sender<bool>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("url", &self.config.redacted_url())
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl Link {
    /// Connects once; fails at once if the broker cannot be reached.
    pub(crate) async fn connect(config: RabbitMqConfig) -> Result<Self> {
        let (closed_tx, _) = watch::channel(false);
        let link = Self {
            config,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            closed_tx,
        };
        let session = link.open().await?;
        *lock(&link.current) = Some(session);
        Ok(link)
    }

    pub(crate) fn config(&self) -> &RabbitMqConfig {
        &self.config
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::closed("the RabbitMQ connection was closed"))
        } else {
            Ok(())
        }
    }

    /// Tells when the link is closed.
    pub(crate) fn closed_signal(&self) -> watch::Receiver<bool> {
        self.closed_tx.subscribe()
    }

    /// How many connections were made so far (1 after the first).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn healthy(&self) -> Option<Arc<Session>> {
        lock(&self.current).clone().filter(|s| s.healthy())
    }

    /// The live session if it is still connection `generation`, without reconnecting: what
    /// settles a delivery must go over the connection the delivery came on. Once that one is
    /// lost, RabbitMQ has requeued the delivery, and a copy stored over a new connection
    /// would be a second one.
    pub(crate) fn session_of(&self, generation: u64) -> Result<Arc<Session>> {
        self.check()?;
        match self.healthy() {
            Some(session) if session.generation == generation => Ok(session),
            _ => Err(Error::closed(format!(
                "connection {generation} to RabbitMQ, which this delivery came on, is gone"
            ))),
        }
    }

    /// The live session, reconnecting (with exponential backoff and jitter, for up to the
    /// configured reconnect timeout) if the connection was lost.
    pub(crate) async fn session(&self) -> Result<Arc<Session>> {
        self.check()?;
        if let Some(session) = self.healthy() {
            return Ok(session);
        }
        let limit = self.config.reconnect_timeout();
        let work = async {
            let _one_at_a_time = self.connecting.lock().await;
            if let Some(session) = self.healthy() {
                return Ok(session);
            }
            let backoff = ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(2))
                .with_jitter()
                .without_max_times();
            let session = (|| async {
                self.check()?;
                self.open().await
            })
            .retry(backoff)
            .sleep(tokio::time::sleep)
            // A wrong setting or a refused login stays so: only transient failures are retried.
            .when(|e: &Error| {
                !e.is_closed() && !matches!(e.kind(), ErrorKind::Config | ErrorKind::Rejected)
            })
            .notify(|e: &Error, wait: Duration| {
                tracing::warn!(
                    url = %self.config.redacted_url(),
                    error = %e,
                    "RabbitMQ connection lost; reconnecting in {wait:?}"
                );
            })
            .await?;
            *lock(&self.current) = Some(session.clone());
            Ok(session)
        };
        match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => Err(Error::new(
                ErrorKind::Connection,
                format!(
                    "could not reconnect to {} within {limit:?}",
                    self.config.redacted_url()
                ),
            )),
        }
    }

    /// One connection attempt, bounded by the connect timeout.
    async fn open(&self) -> Result<Arc<Session>> {
        let endpoint = Endpoint::resolve(&self.config)?;
        let limit = endpoint.timeout;
        match tokio::time::timeout(limit, self.open_at(&endpoint)).await {
            Ok(result) => result,
            Err(_) => Err(Error::timeout(format!(
                "connecting to {} took longer than {limit:?} (connect_timeout_ms)",
                endpoint.shown
            ))),
        }
    }

    async fn open_at(&self, endpoint: &Endpoint) -> Result<Arc<Session>> {
        let mut props = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio);
        if let Some(name) = &self.config.connection_name {
            props = props.with_connection_name(name.clone().into());
        }
        if let Some(hook) = &self.config.properties {
            props = hook(props);
        }
        let connection = Connection::connector(endpoint.uri.clone(), endpoint.connector(), props)
            .await
            .map_err(|e| crate::error::connecting(e, endpoint))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| map(e, "opening a channel"))?;
        for exchange in [&self.config.topic_exchange, &self.config.request_exchange] {
            channel
                .exchange_declare(
                    exchange,
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| map(e, &format!("declaring exchange `{exchange}`")))?;
        }
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| map(e, "enabling publisher confirms"))?;
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::debug!(url = %self.config.redacted_url(), generation, "connected to RabbitMQ");
        Ok(Arc::new(Session {
            connection,
            generation,
            publisher: Mutex::new(Some(channel)),
            declared: Mutex::new(HashSet::new()),
        }))
    }

    /// Publishes on the confirmed channel and waits for the confirm.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<Confirmed> {
        let session = self.session().await?;
        self.publish_on(
            &session,
            exchange,
            routing_key,
            mandatory,
            payload,
            properties,
        )
        .await
    }

    /// Publishes on `session`'s confirmed channel and waits for the confirm.
    pub(crate) async fn publish_on(
        &self,
        session: &Session,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<Confirmed> {
        session.check_headers(&properties)?;
        let channel = session.publisher().await?;
        let confirm = channel
            .basic_publish(
                exchange,
                routing_key,
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                payload,
                properties,
            )
            .await
            .map_err(|e| map(e, "publishing"))?;
        confirmed(confirm, self.config.confirm_timeout()).await
    }

    /// Sends to the durable queue `queue` through the default exchange, declaring it first;
    /// never silently dropped (mandatory: a queue deleted meanwhile is declared again).
    pub(crate) async fn send_to_queue(
        &self,
        queue: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        let session = self.session().await?;
        self.send_to_queue_on(&session, queue, payload, properties)
            .await
    }

    /// [`send_to_queue`](Link::send_to_queue) over `session` only.
    pub(crate) async fn send_to_queue_on(
        &self,
        session: &Session,
        queue: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        let args = self.queue_args();
        for _ in 0..2 {
            session.ensure_queue(queue, &args).await?;
            match self
                .publish_on(session, "", queue, true, payload, properties.clone())
                .await?
            {
                Confirmed::Ack => return Ok(()),
                Confirmed::Returned(_) => session.forget_queue(queue),
            }
        }
        Err(Error::new(
            ErrorKind::NotFound,
            format!("queue `{queue}` disappeared twice while sending to it"),
        ))
    }

    /// The arguments every durable queue of `bus` is declared with (the same each time, as
    /// RabbitMQ refuses a redeclaration with other arguments).
    pub(crate) fn queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.config.quorum_queues {
            args.insert(
                ShortString::from("x-queue-type"),
                AMQPValue::LongString("quorum".into()),
            );
        }
        if let Some(ms) = self.config.queue_expires_ms {
            args.insert(
                ShortString::from("x-expires"),
                AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
            );
        }
        args
    }

    /// Closes the connection; every later operation fails with `Closed`.
    pub(crate) async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.closed_tx.send_replace(true);
        let session = lock(&self.current).take();
        if let Some(session) = session {
            if session.healthy() {
                let closing = session
                    .connection
                    .close(200, "bus: closed by the application");
                match tokio::time::timeout(Duration::from_secs(5), closing).await {
                    // A channel or the connection already closing (a dropped subscription's
                    // channel, say) is no failure to close.
                    Ok(Err(
                        lapin::Error::InvalidChannelState(_)
                        | lapin::Error::InvalidConnectionState(_),
                    )) => {}
                    Ok(result) => result.map_err(|e| map(e, "closing the connection"))?,
                    Err(_) => {
                        return Err(Error::timeout(
                            "the broker did not acknowledge closing the connection in 5 s",
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}
