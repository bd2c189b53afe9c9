//! Subscribing and consuming: a topic in a group (named, or private to the subscription) or a
//! work queue, read through a consumer source (module `source`).

use async_trait::async_trait;
use bus_core::{
    ConsumeOptions, Delay, Envelope, Queue, Result, SubscribeOptions, Subscriber, Subscription,
};

use crate::source::{self, Start};
use crate::{names, KafkaBroker};

#[async_trait]
impl Subscriber for KafkaBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        let spec = self.subscribe_spec(topic, options);
        let source = source::open(&self.shared, spec).await?;
        Ok(Subscription::new(Box::new(source)))
    }
}

#[async_trait]
impl Queue for KafkaBroker {
    async fn send(&self, queue: &str, envelope: Envelope) -> Result<()> {
        self.shared.produce(queue, &envelope, &[]).await
    }

    /// As [`Publisher::publish_delayed`](bus_core::Publisher::publish_delayed): through the
    /// queue's retry topic, held by the queue's group until due.
    async fn send_delayed(&self, queue: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        self.shared.produce_delayed(queue, &envelope, delay).await
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        let spec = self.spec(
            queue,
            names::queue_group(queue),
            None,
            Start::Earliest,
            options.prefetch,
        );
        let source = source::open(&self.shared, spec).await?;
        Ok(Subscription::new(Box::new(source)))
    }
}
