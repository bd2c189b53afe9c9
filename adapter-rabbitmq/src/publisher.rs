//! Publishing: topics through the topic exchange, queues through the default exchange, both
//! with publisher confirms.

use bus_core::{async_trait, Delay, Envelope, Error, ErrorKind, Publisher, Result};
use lapin::options::BasicPublishOptions;

use crate::broker::{check_name, delay_from_now, RabbitMqBroker};
use crate::link::{confirmed, Confirmed};
use crate::wire;

#[async_trait]
impl Publisher for RabbitMqBroker {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<()> {
        let inner = &self.inner;
        inner.link.check()?;
        inner.validate(&envelope)?;
        let key = wire::routing_key(topic);
        check_name(&key, "topic")?;
        let props = wire::properties(&envelope, &inner.config().source, 1)?;
        // Not mandatory: a topic no group subscribed to drops the message, as the memory
        // broker does.
        inner
            .link
            .publish(
                &inner.config().topic_exchange,
                &key,
                false,
                &envelope.payload,
                props,
            )
            .await
            .map(|_| ())
    }

    /// Publishes through the fanout exchange `bus.delay.<ms>ms.<topic exchange>` into its TTL
    /// queue, `<ms>` being the delay rounded up to the retry queues' ladder of buckets, with
    /// the delay as the message's own expiration (so it is due on time unless a message ahead
    /// of it in that queue holds it, at the latest until the bucket's end); when it expires
    /// RabbitMQ dead-letters the message into the topic exchange with the topic's
    /// routing key, so every group bound then (those subscribed at publish time, and private
    /// subscriptions still open) gets it, at its first attempt.
    async fn publish_delayed(&self, topic: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        let Some(wait) = delay_from_now(delay)? else {
            return self.publish(topic, envelope).await;
        };
        let inner = &self.inner;
        inner.link.check()?;
        inner.validate(&envelope)?;
        let key = wire::routing_key(topic);
        check_name(&key, "topic")?;
        let props = wire::expiring(
            wire::properties(&envelope, &inner.config().source, 1)?,
            wait,
        );
        let session = inner.link.session().await?;
        // Mandatory: the delay queue deleted behind our back is declared again.
        for _ in 0..2 {
            let parked = session
                .declare_delay_queue(&inner.config().topic_exchange, wait)
                .await?;
            match inner
                .link
                .publish_on(
                    &session,
                    &parked,
                    &key,
                    true,
                    &envelope.payload,
                    props.clone(),
                )
                .await?
            {
                Confirmed::Ack => return Ok(()),
                Confirmed::Returned(_) => session.forget_queue(&parked),
            }
        }
        Err(Error::new(
            ErrorKind::NotFound,
            "the delay queue disappeared twice while publishing to it",
        ))
    }

    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<()> {
        let inner = &self.inner;
        inner.link.check()?;
        if envelopes.is_empty() {
            return Ok(());
        }
        for envelope in &envelopes {
            inner.validate(envelope)?;
        }
        let key = wire::routing_key(topic);
        check_name(&key, "topic")?;
        let session = inner.link.session().await?;
        let channel = session.publisher().await?;
        // Pipelined: every message goes out, then the confirms are awaited in order.
        let properties = envelopes
            .iter()
            .map(|envelope| wire::properties(envelope, &inner.config().source, 1))
            .collect::<Result<Vec<_>>>()?;
        for props in &properties {
            session.check_headers(props)?;
        }
        let mut confirms = Vec::with_capacity(envelopes.len());
        for (envelope, props) in envelopes.iter().zip(properties) {
            let confirm = channel
                .basic_publish(
                    &inner.config().topic_exchange,
                    &key,
                    BasicPublishOptions::default(),
                    &envelope.payload,
                    props,
                )
                .await
                .map_err(|e| crate::error::map(e, "publishing"))?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            confirmed(confirm, inner.config().confirm_timeout()).await?;
        }
        Ok(())
    }
}

impl Confirmed {
    /// `Ok` for a stored message, `NotFound` for one the broker could not route.
    pub(crate) fn stored(self, target: &str) -> Result<()> {
        match self {
            Confirmed::Ack => Ok(()),
            Confirmed::Returned(text) => Err(Error::new(
                ErrorKind::NotFound,
                format!("`{target}` is not routable ({text})"),
            )),
        }
    }
}
