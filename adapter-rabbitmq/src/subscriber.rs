//! Consuming: group, private and work queues with manual acks and a prefetch, re-attached
//! after a connection loss; and the settlement of each delivery.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::middleware::dead_letter;
use bus_core::{
    async_trait, headers, ConsumeOptions, Delay, Delivery, DeliverySource, Envelope, Error,
    ErrorKind, Queue, Redeliver, Result, Settle, Settlement, SubscribeOptions, Subscriber,
    Subscription,
};
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::{BasicProperties, Channel};

use crate::broker::{check_name, Inner};
use crate::error::map;
use crate::link::Session;
use crate::source::{prefetch, Endpoint, Raw, Source};
use crate::{wire, RabbitMqBroker};

/// A topic subscription or queue consumer.
#[derive(Debug)]
struct Deliveries {
    source: Source,
    /// The topic or queue name deliveries report, and their group: shared by every delivery
    /// and its settlement, never copied per message.
    name: Arc<str>,
    group: Option<Arc<str>>,
}

impl Deliveries {
    /// The delivery of one raw lapin delivery, with its settlement.
    fn delivery(&self, raw: Raw) -> Delivery {
        let Raw {
            delivery,
            channel,
            queue,
            generation,
        } = raw;
        let received = wire::envelope(&delivery.properties, delivery.data);
        let state = Arc::new(SettleState {
            inner: self.source.inner(),
            channel,
            generation,
            tag: delivery.delivery_tag,
            queue,
            private: matches!(self.source.endpoint, Endpoint::Private { .. }),
            source: self.name.clone(),
            group: self.group.clone(),
            envelope: received.envelope.clone(),
            attempt: received.attempt,
            forwarded: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::try_current().ok(),
        });
        let delivery = Delivery::with_shared_names(
            received.envelope,
            received.attempt,
            self.name.clone(),
            self.group.clone(),
            Box::new(RabbitSettle(state)),
        );
        match received.undecodable {
            Some(reason) => delivery.with_undecodable(reason),
            None => delivery,
        }
    }
}

#[async_trait]
impl DeliverySource for Deliveries {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let raw = self.source.next_raw().await?;
        Some(raw.map(|raw| self.delivery(raw)))
    }

    /// What lapin has buffered already (up to the prefetch), without waiting.
    fn try_next(&mut self) -> Option<Result<Delivery>> {
        let raw = self.source.try_next_raw()?;
        Some(raw.map(|raw| self.delivery(raw)))
    }

    async fn close(&mut self) -> Result<()> {
        self.source.close().await
    }

    /// A queue hands its messages to one consumer in the order they were enqueued.
    fn keeps_key_order(&self) -> bool {
        true
    }
}

/// What settling one delivery needs.
#[derive(Debug)]
struct SettleState {
    inner: Arc<Inner>,
    /// Keeps the channel open until the delivery is settled.
    channel: Channel,
    /// The connection of that channel: copies for a redelivery or a dead letter go over it
    /// or not at all.
    generation: u64,
    tag: u64,
    /// The queue it came from, where a redelivery goes back to.
    queue: Arc<str>,
    /// Whether that queue is a private subscription's exclusive, server-named one.
    private: bool,
    source: Arc<str>,
    group: Option<Arc<str>>,
    envelope: Envelope,
    attempt: u32,
    /// The copy for the next attempt or the dead letter was already stored: a retried
    /// settlement only acks.
    forwarded: AtomicBool,
    runtime: Option<tokio::runtime::Handle>,
}

impl SettleState {
    /// Whether the channel the delivery came on is still open. Once it is not, RabbitMQ has
    /// requeued the delivery (it does so for every unacked delivery of a channel that closes,
    /// whatever closed it) and will deliver it again: nothing may settle or copy it any more.
    fn channel_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Refuses to settle a delivery of a closed channel: `Closed`, not retryable.
    fn check_channel(&self) -> Result<()> {
        if self.channel_open() {
            Ok(())
        } else {
            Err(self.channel_gone())
        }
    }

    fn channel_gone(&self) -> Error {
        Error::closed(self.gone_message())
    }

    fn gone_message(&self) -> String {
        format!(
            "the channel message {} came on was closed (lost connection or channel error): \
             RabbitMQ requeued it and will deliver it again, so it is not settled here",
            self.envelope.id
        )
    }

    async fn ack(&self) -> Result<()> {
        self.check_channel()?;
        match self
            .channel
            .basic_ack(self.tag, BasicAckOptions::default())
            .await
        {
            Ok(()) => Ok(()),
            // Closed while acking: requeued by the broker all the same.
            Err(e) if !self.channel_open() => Err(Error::with_source(
                ErrorKind::Closed,
                self.gone_message(),
                e,
            )),
            Err(e) => Err(map(e, "acknowledging (basic.ack)")),
        }
    }

    /// The live connection the delivery came on, or `Closed` once it (or the delivery's
    /// channel) is gone: a copy is stored only where the original can still be acked.
    fn session(&self) -> Result<Arc<Session>> {
        self.check_channel()?;
        self.inner
            .link
            .session_of(self.generation)
            .map_err(|_| self.channel_gone())
    }

    /// Stores the next attempt, now or through the TTL retry queue, then acks this one.
    /// RabbitMQ's own requeue does not count attempts on classic queues, so the count travels
    /// in the `bus-attempt` header of the copy.
    async fn redeliver(&self, delay: Option<Duration>) -> Result<()> {
        if !self.forwarded.load(Ordering::Acquire) {
            let session = self.session()?;
            let props =
                self.copy_properties(&session, &self.envelope, self.attempt.saturating_add(1));
            let link = &self.inner.link;
            let payload = &self.envelope.payload;
            match delay {
                // A private subscription's server-named queue cannot be declared by name.
                None if self.private => link
                    .publish_on(&session, "", &self.queue, true, payload, props)
                    .await?
                    .stored(&self.queue)?,
                None => {
                    link.send_to_queue_on(&session, &self.queue, payload, props)
                        .await?
                }
                Some(delay) => {
                    let retry = session.declare_retry_queue(&self.queue, delay).await?;
                    link.publish_on(&session, "", &retry, true, payload, props)
                        .await?
                        .stored(&retry)?;
                }
            }
            self.forwarded.store(true, Ordering::Release);
        }
        self.ack().await
    }

    /// The properties of a copy of `envelope` (its next attempt or its dead letter), made to
    /// fit whatever it was received with.
    fn copy_properties(
        &self,
        session: &Session,
        envelope: &Envelope,
        attempt: u32,
    ) -> BasicProperties {
        wire::properties_fitted(
            envelope,
            &self.inner.config().source,
            attempt,
            session.frame_max(),
        )
    }

    async fn dead_letter(&self, reason: &str, attempts: u32) -> Result<()> {
        if !self.forwarded.load(Ordering::Acquire) {
            let session = self.session()?;
            let dead = dead_letter::mark(
                self.envelope.clone(),
                &dead_letter::DeadLetterInfo {
                    reason,
                    source: &self.source,
                    group: self.group.as_deref(),
                    attempts: attempts.max(self.attempt),
                    first_failure: None,
                },
            );
            // Its name was checked when subscribing.
            let dlq = headers::dead_letter_queue(&self.source);
            // Not `Inner::send`: the dead letter goes as received, whatever its size or
            // headers, or it would come back for ever.
            let props = self.copy_properties(&session, &dead, 1);
            self.inner
                .link
                .send_to_queue_on(&session, &dlq, &dead.payload, props)
                .await?;
            self.forwarded.store(true, Ordering::Release);
        }
        self.ack().await
    }
}

#[derive(Debug)]
struct RabbitSettle(Arc<SettleState>);

#[async_trait]
impl Settle for RabbitSettle {
    async fn settle(&self, settlement: Settlement) -> Result<()> {
        match settlement {
            Settlement::Ack => self.0.ack().await,
            Settlement::Nack(Redeliver::After(delay)) => self.0.redeliver(Some(delay)).await,
            Settlement::Nack(_) => self.0.redeliver(None).await,
            Settlement::Reject { reason, attempts } => self.0.dead_letter(&reason, attempts).await,
            _ => Err(Error::unsupported("unknown settlement")),
        }
    }

    fn abandon(&self) {
        let state = self.0.clone();
        let Some(runtime) = state.runtime.clone() else {
            // No runtime to act on: the message comes back when the channel closes.
            return;
        };
        if !state.channel_open() {
            // The broker requeued it when the channel closed: a copy would be a second one.
            tracing::debug!(id = %state.envelope.id, "dropped delivery of a closed channel: requeued by the broker");
            return;
        }
        runtime.spawn(async move {
            if state.redeliver(None).await.is_err() && state.channel_open() {
                // Could not store the next attempt: let the broker requeue this one
                // (`basic.reject`, which RabbitMQ 4 quorum queues count as a delivery).
                let _ = state
                    .channel
                    .basic_reject(state.tag, BasicRejectOptions { requeue: true })
                    .await;
            }
        });
    }
}

#[async_trait]
impl Subscriber for RabbitMqBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        let inner = self.inner.clone();
        inner.link.check()?;
        check_dead_letter_name(topic)?;
        let endpoint = match &options.group {
            Some(group) => Endpoint::Group {
                topic: topic.to_owned(),
                group: group.clone(),
            },
            None => Endpoint::Private {
                topic: topic.to_owned(),
            },
        };
        let prefetch = prefetch(options.prefetch, inner.config().prefetch);
        let source = Source::open(inner, endpoint, prefetch).await?;
        Ok(Subscription::new(Box::new(Deliveries {
            source,
            name: topic.into(),
            group: options.group.map(Arc::from),
        })))
    }
}

#[async_trait]
impl Queue for RabbitMqBroker {
    async fn send(&self, queue: &str, envelope: Envelope) -> Result<()> {
        self.inner.send(queue, &envelope, 1).await
    }

    /// Parks the message in the queue's TTL retry queue for the delay's bucket (as
    /// `nack(After)` does), from which it dead-letters into the queue: see
    /// [`RabbitMqBroker`]'s delayed publish.
    async fn send_delayed(&self, queue: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        self.inner.send_delayed(queue, &envelope, delay).await
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        let inner = self.inner.clone();
        inner.link.check()?;
        check_dead_letter_name(queue)?;
        let prefetch = prefetch(options.prefetch, inner.config().prefetch);
        let endpoint = Endpoint::Queue {
            name: queue.to_owned(),
        };
        let source = Source::open(inner, endpoint, prefetch).await?;
        Ok(Subscription::new(Box::new(Deliveries {
            source,
            name: queue.into(),
            group: None,
        })))
    }
}

/// Refuses, before consuming, a topic or queue whose dead-letter queue RabbitMQ cannot name
/// (252 to 255 bytes long): its messages could be neither handled nor dead-lettered.
fn check_dead_letter_name(source: &str) -> Result<()> {
    check_name(&headers::dead_letter_queue(source), "dead-letter queue").map_err(|e| {
        Error::config(format!(
            "cannot consume from `{}`: {e}",
            headers::shorten(source, 64)
        ))
    })
}
