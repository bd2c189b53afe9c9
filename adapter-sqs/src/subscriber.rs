//! Subscribing and consuming: a group's, a private or a work queue, read through a queue
//! source (module `source`).

use async_trait::async_trait;
use bus_core::{
    ConsumeOptions, Envelope, ErrorKind, Queue, Result, SubscribeOptions, Subscriber, Subscription,
};

use crate::broker::{send_wire, QueueRole};
use crate::source::{self, Target};
use crate::SqsBroker;

#[async_trait]
impl Subscriber for SqsBroker {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        self.inner.check_open()?;
        let prefetch = options.prefetch.unwrap_or(self.inner.config.prefetch);
        let source = match options.group {
            Some(group) => {
                let name = self.inner.names.group_queue(topic, &group);
                let url = self
                    .inner
                    .queue_url(&name, QueueRole::Durable, Some(topic))
                    .await?;
                if !self.inner.is_wired(&name) {
                    self.inner.wire_topic(topic, &name, &url).await?;
                }
                source::start(
                    self.inner.clone(),
                    Target {
                        source: topic.to_owned(),
                        group: Some(group),
                        queue_name: name,
                        url,
                        private: None,
                    },
                    prefetch,
                )
            }
            None => {
                let unique = uuid::Uuid::now_v7().simple().to_string();
                let name = self.inner.names.private_queue(topic, &unique);
                let url = self.inner.queue_url(&name, QueueRole::Plain, None).await?;
                let subscription_arn = match self.inner.wire_topic(topic, &name, &url).await {
                    Ok(arn) => arn,
                    Err(e) => {
                        let _ = self.inner.sqs.delete_queue().queue_url(&url).send().await;
                        return Err(e);
                    }
                };
                source::start(
                    self.inner.clone(),
                    Target {
                        source: topic.to_owned(),
                        group: None,
                        queue_name: name,
                        url,
                        private: Some(subscription_arn),
                    },
                    prefetch,
                )
            }
        };
        Ok(Subscription::new(Box::new(source)))
    }
}

#[async_trait]
impl Queue for SqsBroker {
    async fn send(&self, queue: &str, envelope: Envelope) -> Result<()> {
        self.inner.check_open()?;
        let wire = self.inner.encode(&envelope, &[])?;
        let name = self.inner.names.queue(queue);
        let url = self
            .inner
            .queue_url(&name, QueueRole::Durable, Some(queue))
            .await?;
        let what = format!("queue `{queue}`");
        match send_wire(&self.inner, &url, &envelope, wire.clone(), &what).await {
            // Deleted behind the cache (or the server restarted): create it again, once.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.inner.forget_queue(&name);
                let url = self
                    .inner
                    .queue_url(&name, QueueRole::Durable, Some(queue))
                    .await?;
                send_wire(&self.inner, &url, &envelope, wire, &what).await
            }
            other => other,
        }
    }

    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        self.inner.check_open()?;
        let name = self.inner.names.queue(queue);
        let url = self
            .inner
            .queue_url(&name, QueueRole::Durable, Some(queue))
            .await?;
        let prefetch = options.prefetch.unwrap_or(self.inner.config.prefetch);
        let source = source::start(
            self.inner.clone(),
            Target {
                source: queue.to_owned(),
                group: None,
                queue_name: name,
                url,
                private: None,
            },
            prefetch,
        );
        Ok(Subscription::new(Box::new(source)))
    }
}
