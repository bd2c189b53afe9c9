//! Publishing to topics (sending to queues is `NatsBroker`'s `Queue` impl in module
//! `subscriber`, beside consuming them).

use bus_core::{async_trait, Delay, Envelope, Error, Publisher, Result};

use crate::broker::Kind;
use crate::{delayed, error, wire, NatsBroker};

impl NatsBroker {
    async fn publish_core(&self, topic: &str, envelope: &Envelope) -> Result<()> {
        let inner = &self.inner;
        inner.check()?;
        let headers = wire::encode(envelope, &inner.config.source)?;
        inner.check_size(&headers, envelope.payload.len())?;
        let subject = inner.names.topic_subject(topic);
        inner
            .client
            .publish_with_headers(subject.clone(), headers, envelope.payload.clone())
            .await
            .map_err(|e| error::core_publish(e, &subject))?;
        // Core NATS confirms nothing; a flush at least means the server has read it.
        inner
            .client
            .flush()
            .await
            .map_err(|e| error::flush(e, &subject))
    }
}

#[async_trait]
impl Publisher for NatsBroker {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<()> {
        if !self.inner.config.durable {
            return self.publish_core(topic, &envelope).await;
        }
        self.inner
            .publish_stored(Kind::Topic, topic, &envelope)
            .await
    }

    /// Sends the whole batch before waiting for the server's acknowledgements, which then
    /// arrive together: far fewer round trips than publishing one by one.
    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<()> {
        self.inner.check()?;
        if !self.inner.config.durable {
            for envelope in &envelopes {
                self.publish_core(topic, envelope).await?;
            }
            return Ok(());
        }
        let mut acks = Vec::with_capacity(envelopes.len());
        for envelope in &envelopes {
            acks.push(self.inner.send_stored(Kind::Topic, topic, envelope).await?);
        }
        for ack in acks {
            self.inner.await_ack(Kind::Topic, topic, ack).await?;
        }
        Ok(())
    }

    /// Emulated: the message waits in the `<prefix>-delayed` stream and is published to the
    /// topic when due, by whichever connection's mover (this one's, or that of any process
    /// that subscribes or publishes delayed) takes it; so every group subscribed then gets it,
    /// private subscriptions included, at attempt 1. Its due time is this host's clock plus
    /// `delay`, compared with the mover's clock. A delay that has passed publishes at once.
    ///
    /// # Errors
    /// As [`publish`](Publisher::publish); [`Unsupported`](bus_core::ErrorKind::Unsupported)
    /// with `durable=false`.
    async fn publish_delayed(&self, topic: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        if !self.inner.config.durable {
            return Err(Error::unsupported(
                "core NATS (durable=false) keeps nothing to hold a delayed message in",
            ));
        }
        delayed::publish(&self.inner, Kind::Topic, topic, &envelope, delay).await
    }
}
