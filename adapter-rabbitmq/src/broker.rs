//! The broker handle and what every handle on one connection shares: the link (connection,
//! channels, declarations) and the waiting requests. Publishing, subscribing and
//! request-reply (modules `publisher`, `subscriber`, `requests`) each use it, not one another's
//! state.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bus_core::{
    async_trait, Backlog, BacklogOf, Broker, Capabilities, Delay, Envelope, Error, ErrorKind,
    Result, Support,
};

use crate::link::Link;
use crate::requests::Replies;
use crate::{wire, RabbitMqConfig};

/// What every handle on one connection shares.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) link: Link,
    pub(crate) replies: Replies,
}

impl Inner {
    pub(crate) fn config(&self) -> &RabbitMqConfig {
        self.link.config()
    }

    pub(crate) fn validate(&self, envelope: &Envelope) -> Result<()> {
        let max = self.config().max_payload;
        if envelope.payload.len() > max {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "payload of {} bytes exceeds the limit of {max} bytes (RabbitMqConfig::max_payload)",
                    envelope.payload.len()
                ),
            ));
        }
        Ok(())
    }

    /// Sends `envelope` to the work queue `queue` (declared if needed), as attempt `attempt`.
    pub(crate) async fn send(&self, queue: &str, envelope: &Envelope, attempt: u32) -> Result<()> {
        self.link.check()?;
        self.validate(envelope)?;
        check_name(queue, "queue")?;
        let props = wire::properties(envelope, &self.config().source, attempt)?;
        self.link
            .send_to_queue(queue, &envelope.payload, props)
            .await
    }
}

impl Inner {
    /// Sends `envelope` to the work queue `queue` once `delay` has passed: parked in the
    /// queue's TTL retry queue for the delay's bucket, from which RabbitMQ dead-letters it into
    /// the queue, at its first attempt.
    pub(crate) async fn send_delayed(
        &self,
        queue: &str,
        envelope: &Envelope,
        delay: Delay,
    ) -> Result<()> {
        let Some(wait) = delay_from_now(delay)? else {
            return self.send(queue, envelope, 1).await;
        };
        self.link.check()?;
        self.validate(envelope)?;
        check_name(queue, "queue")?;
        let props = wire::expiring(wire::properties(envelope, &self.config().source, 1)?, wait);
        let session = self.link.session().await?;
        // The queue exists before anything is parked for it: a message dead-lettered to a
        // queue that does not exist is dropped by RabbitMQ.
        session.ensure_queue(queue, &self.link.queue_args()).await?;
        let retry = session.declare_retry_queue(queue, wait).await?;
        self.link
            .publish_on(&session, "", &retry, true, &envelope.payload, props)
            .await?
            .stored(&retry)
    }
}

/// How long from now a delayed message waits: `None` if it is due already, `Unsupported`
/// beyond the longest a TTL queue holds it ([`wire::MAX_DELAY`]).
pub(crate) fn delay_from_now(delay: Delay) -> Result<Option<Duration>> {
    let wait = delay.remaining(SystemTime::now());
    if wait > wire::MAX_DELAY {
        return Err(Error::unsupported(format!(
            "a delay of {wait:?} is longer than RabbitMQ's TTL queues hold a message \
             ({:?}, Capabilities::max_delay)",
            wire::MAX_DELAY
        )));
    }
    Ok((!wait.is_zero()).then_some(wait))
}

/// Refuses names RabbitMQ cannot hold (empty, or longer than 255 bytes).
pub(crate) fn check_name(name: &str, what: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 {
        return Err(Error::config(format!(
            "a RabbitMQ {what} name must be 1 to 255 bytes long, `{name}` is {} bytes",
            name.len()
        )));
    }
    Ok(())
}

/// A connection to RabbitMQ implementing every `bus` pattern. Cheap to clone; clones share
/// the connection.
///
/// - A topic is a routing key on one durable topic exchange ([`RabbitMqConfig::topic_exchange`],
///   `bus.topics`); `*`, `#` and `%` in topic names are escaped so they match literally.
/// - A consumer group is a durable queue `<topic>@<group>` bound to it; a subscription without
///   a group gets an exclusive, auto-deleted, server-named queue.
/// - A work queue is a durable queue of the same name, reached through the default exchange.
/// - Publishes return once the broker confirmed them.
///
/// See the crate docs for settlement, request-reply and recovery.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> bus_core::Result<()> {
/// use adapter_rabbitmq::RabbitMqBroker;
/// use bus_core::{Envelope, Publisher, SubscribeOptions, Subscriber};
///
/// let broker = RabbitMqBroker::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
/// let mut billing = broker.subscribe("orders", SubscribeOptions::group("billing")).await?;
/// broker.publish("orders", Envelope::new("order.placed", "{}")).await?;
/// let delivery = billing.next().await.expect("open")?;
/// delivery.ack().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RabbitMqBroker {
    pub(crate) inner: Arc<Inner>,
}

impl RabbitMqBroker {
    /// Connects to `url` with the default configuration.
    ///
    /// # Errors
    /// [`ErrorKind::Connection`] when the broker cannot be reached, [`ErrorKind::Rejected`]
    /// when it refuses the credentials or virtual host.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the connection attempt.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(RabbitMqConfig::new(url)).await
    }

    /// Connects with `config`. The first connection is made now; later losses are recovered
    /// with backoff.
    ///
    /// # Errors
    /// As [`connect`](RabbitMqBroker::connect).
    ///
    /// # Cancel safety
    /// Dropping the future abandons the connection attempt.
    pub async fn with_config(config: RabbitMqConfig) -> Result<Self> {
        let link = Link::connect(config).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                link,
                replies: Replies::default(),
            }),
        })
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> &RabbitMqConfig {
        self.inner.config()
    }

    /// How many times the connection was made (1 until it is first lost and re-made).
    #[must_use]
    pub fn connection_generation(&self) -> u64 {
        self.inner.link.generation()
    }
}

#[async_trait]
impl Broker for RabbitMqBroker {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "rabbitmq",
            durable: true,
            consumer_groups: true,
            per_key_order: true,
            per_key_order_across_members: false,
            // A nack goes through a retry queue, behind the queue's later messages; the
            // Consumer's retries in place keep the order.
            key_order_across_retries: Support::Emulated,
            request_reply: Support::Native,
            no_responders_detection: true,
            delayed_redelivery: Support::Emulated,
            dead_letter: Support::Emulated,
            prompt_redelivery_of_dropped: true,
            // Quorum queues count every delivery (`x-delivery-count`), also those cut short by a
            // crash. On classic queues the attempt travels in a header of the copy republished
            // on nack; a crash is not counted.
            delivery_count: if self.inner.config().quorum_queues {
                Support::Native
            } else {
                Support::Emulated
            },
            max_payload_bytes: Some(self.inner.config().max_payload),
            max_headers: None,
            // Parked in TTL queues, as delayed retries are (RabbitMQ 3.10 has no delayed
            // message plugin), rounded up to their ladder of buckets.
            delayed_publish: Support::Emulated,
            max_delay: Some(wire::MAX_DELAY),
            backlog: Support::Native,
        }
    }

    /// The ready messages of the group's queue (or the work queue) in `waiting`, from a
    /// passive `queue.declare`: exact at the moment it is read.
    ///
    /// `in_flight` is `None`: AMQP does not tell unacknowledged messages (only the management
    /// plugin's HTTP API does), so they are not counted. `delayed` is `None`: messages parked
    /// in the queue's TTL retry queues (`nack(After)`, `send_delayed`) are not counted, as
    /// finding which of the 55 exist would take a passive declaration of each, and every one
    /// missing closes a channel and makes lapin log an error; a topic's delayed publishes wait
    /// in queues shared by every group. `oldest_age` is `None`: AMQP does not tell it.
    async fn backlog(&self, of: &BacklogOf) -> Result<Backlog> {
        let link = &self.inner.link;
        link.check()?;
        let queue = match of {
            BacklogOf::Group { topic, group } => wire::group_queue(topic, group),
            BacklogOf::Queue(name) => name.clone(),
            other => {
                return Err(Error::unsupported(format!(
                    "cannot count the backlog of {other}"
                )))
            }
        };
        check_name(&queue, "queue")?;
        let session = link.session().await?;
        let Some(waiting) = session.ready(&queue).await? else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("RabbitMQ has no queue `{queue}` ({of})"),
            ));
        };
        let mut backlog = Backlog::default();
        backlog.waiting = u64::from(waiting);
        Ok(backlog)
    }

    async fn close(&self) -> Result<()> {
        self.inner.link.close().await
    }
}
