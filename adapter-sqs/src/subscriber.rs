//! Subscribing and consuming: a group's, a private or a work queue, read through a queue
//! source (module `source`).

use std::time::SystemTime;

use async_trait::async_trait;
use bus_core::{
    ConsumeOptions, Delay, Envelope, Error, ErrorKind, Queue, Result, SubscribeOptions, Subscriber,
    Subscription,
};

use crate::broker::{send_wire_delayed, QueueRole};
use crate::delay;
use crate::source::{self, Target};
use crate::wire::NOT_BEFORE;
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
                        source: topic.into(),
                        group: Some(group.into()),
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
                        source: topic.into(),
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
        self.send_encoded(queue, &envelope, wire, 0).await
    }

    /// SQS `DelaySeconds`, rounded up to whole seconds, for a delay up to 15 minutes; beyond,
    /// 15 minutes and when it is due (`bus-not-before`), which the receive loops honour by
    /// sending it back with `DelaySeconds` until then (see `publish_delayed`). Refused on
    /// FIFO queues, which take no per-message `DelaySeconds`.
    async fn send_delayed(&self, queue: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        self.inner.check_open()?;
        if self.inner.config.fifo {
            return Err(Error::unsupported(
                "SQS: no delayed send on FIFO queues (they take no per-message DelaySeconds)",
            ));
        }
        let plan = delay::plan(delay, SystemTime::now(), false)?;
        let wire = match &plan.not_before {
            Some(due) => self.inner.encode(&envelope, &[(NOT_BEFORE, due)])?,
            None => self.inner.encode(&envelope, &[])?,
        };
        self.send_encoded(queue, &envelope, wire, plan.delay_secs)
            .await
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
                source: queue.into(),
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

impl SqsBroker {
    /// Sends `wire` to the work queue `queue`, created if needed, with `DelaySeconds`
    /// `delay_secs` unless 0.
    async fn send_encoded(
        &self,
        queue: &str,
        envelope: &Envelope,
        wire: crate::wire::Wire,
        delay_secs: i32,
    ) -> Result<()> {
        let name = self.inner.names.queue(queue);
        let url = self
            .inner
            .queue_url(&name, QueueRole::Durable, Some(queue))
            .await?;
        let what = format!("queue `{queue}`");
        let inner = &self.inner;
        match send_wire_delayed(inner, &url, envelope, wire.clone(), delay_secs, &what).await {
            // Deleted behind the cache (or the server restarted): create it again, once.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.inner.forget_queue(&name);
                let url = self
                    .inner
                    .queue_url(&name, QueueRole::Durable, Some(queue))
                    .await?;
                send_wire_delayed(inner, &url, envelope, wire, delay_secs, &what).await
            }
            other => other,
        }
    }
}
