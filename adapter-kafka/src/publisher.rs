//! Publishing: records produced to the topic (created through the admin API first), awaited
//! on their delivery reports; a batch is enqueued in order and awaited together.

use async_trait::async_trait;
use bus_core::{Delay, Envelope, Publisher, Result};

use crate::{names, KafkaBroker};

#[async_trait]
impl Publisher for KafkaBroker {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<()> {
        self.shared.produce(topic, &envelope, &[]).await
    }

    /// Produced to `<topic>.retry`, marked as a delayed publish with its due time: every
    /// group reading the topic holds it until then and hands it out at its first attempt.
    async fn publish_delayed(&self, topic: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        self.shared.produce_delayed(topic, &envelope, delay).await
    }

    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<()> {
        if envelopes.is_empty() {
            return Ok(());
        }
        self.shared.check_open()?;
        names::check_topic(topic)?;
        for e in &envelopes {
            self.shared.check_envelope(e)?;
        }
        self.shared.ensure_topics(&[topic], None).await?;
        // Enqueued in order (the futures are polled in order) and awaited together, so the
        // batch goes out in a few produce requests; the idempotent producer keeps the order.
        let sends = envelopes.iter().map(|e| self.shared.send(topic, e, &[]));
        futures::future::try_join_all(sends).await.map(|_| ())
    }
}
