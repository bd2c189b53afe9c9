//! The broker handle and the publishing side: SNS topics and SQS work queues (sending to a
//! queue, which subscriptions and requests also do, is `broker::send_wire`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bus_core::{
    Broker, Capabilities, ConsumeOptions, Envelope, Error, ErrorKind, Publisher, Queue, Requester,
    Requests, Responder, Result, ServeOptions, SubscribeOptions, Subscriber, Subscription, Support,
};

use crate::broker::{send_wire, Inner, QueueRole, Shared};
use crate::config::SqsConfig;
use crate::error::{batch_entry, map};
use crate::requests::Replies;
use crate::subscriber::{self, Target};
use crate::wire::{Wire, STRING};

/// A connection to SQS and SNS implementing every `bus` pattern.
///
/// Cheap to clone: clones share the SDK clients and caches. See the crate docs for how topics,
/// groups, queues, settlement and request-reply map onto SQS and SNS.
#[derive(Clone, Debug)]
pub struct SqsBroker {
    inner: Shared,
    replies: Arc<Replies>,
}

impl SqsBroker {
    /// Connects with the configuration an `sqs://` URL describes
    /// ([`SqsConfig::from_url`]).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a bad URL; as [`SqsBroker::connect_with`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(SqsConfig::from_url(url)?).await
    }

    /// Connects with `config`: builds the SDK clients and checks the endpoint and credentials
    /// with one `ListQueues` call.
    ///
    /// # Errors
    /// [`ErrorKind::Connection`] when SQS cannot be reached, [`ErrorKind::Config`] when it
    /// refuses the credentials or `max_message_bytes` is below [`SQS_MIN_MESSAGE_BYTES`].
    ///
    /// [`SQS_MIN_MESSAGE_BYTES`]: crate::SQS_MIN_MESSAGE_BYTES
    pub async fn connect_with(config: SqsConfig) -> Result<Self> {
        let inner = Arc::new(Inner::connect(config).await?);
        Ok(Self {
            replies: Arc::new(Replies::new(inner.clone())),
            inner,
        })
    }

    /// The SQS client, for what `bus` does not cover.
    #[must_use]
    pub fn sqs_client(&self) -> &aws_sdk_sqs::Client {
        &self.inner.sqs
    }

    /// The SNS client, for what `bus` does not cover.
    #[must_use]
    pub fn sns_client(&self) -> &aws_sdk_sns::Client {
        &self.inner.sns
    }

    /// The configuration in use.
    #[must_use]
    pub fn config(&self) -> &SqsConfig {
        &self.inner.config
    }

    /// The SQS queue name behind the work queue `queue` (see the crate docs on names).
    #[must_use]
    pub fn queue_name(&self, queue: &str) -> String {
        self.inner.names.queue(queue)
    }

    /// The SQS queue name behind consumer group `group` of `topic`.
    #[must_use]
    pub fn group_queue_name(&self, topic: &str, group: &str) -> String {
        self.inner.names.group_queue(topic, group)
    }

    /// How many send batchers are running: one task per destination queue that messages were
    /// sent to (work queues, dead-letter queues, reply queues), each stopping after
    /// [`SqsConfig::sender_idle_ms`] without a message. For monitoring and tests.
    #[must_use]
    pub fn send_batchers(&self) -> usize {
        self.inner.live_batchers()
    }

    /// The SQS queue name behind the requests of `topic` (what responders of it read).
    #[must_use]
    pub fn request_queue_name(&self, topic: &str) -> String {
        self.inner.names.request_queue(topic)
    }

    /// How many FIFO queues this connection's subscriptions are reading: one receive lock each
    /// (receives from one FIFO queue go one at a time), dropped when the last subscription
    /// reading the queue ends. For monitoring and tests.
    #[must_use]
    pub fn fifo_receive_locks(&self) -> usize {
        self.inner.receive_locks()
    }

    /// The SNS topic name behind `topic`.
    #[must_use]
    pub fn topic_name(&self, topic: &str) -> String {
        self.inner.names.topic(topic)
    }
}

fn sns_attributes(
    wire: &Wire,
) -> Result<HashMap<String, aws_sdk_sns::types::MessageAttributeValue>> {
    wire.attributes
        .iter()
        .map(|(name, value)| {
            aws_sdk_sns::types::MessageAttributeValue::builder()
                .data_type(STRING)
                .string_value(value)
                .build()
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::with_source(ErrorKind::Serialization, "message attribute", e))
        })
        .collect()
}

/// Splits encoded messages into batches SQS and SNS accept: at most `batch_size` entries and
/// at most `max_bytes` in all.
fn batches<T>(items: Vec<(T, Wire)>, batch_size: usize, max_bytes: usize) -> Vec<Vec<(T, Wire)>> {
    let mut out: Vec<Vec<(T, Wire)>> = Vec::new();
    let mut size = 0;
    for item in items {
        let item_size = item.1.size();
        match out.last_mut() {
            Some(last) if last.len() < batch_size && size + item_size <= max_bytes => {
                size += item_size;
                last.push(item);
            }
            _ => {
                size = item_size;
                out.push(vec![item]);
            }
        }
    }
    out
}

#[async_trait]
impl Publisher for SqsBroker {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<()> {
        self.inner.check_open()?;
        let wire = self.inner.encode(&envelope, &[])?;
        match self.publish_wire(topic, &envelope, wire.clone()).await {
            // The topic was deleted behind the cache (or the server restarted): create it
            // again, once.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.inner.forget_topic(topic);
                self.publish_wire(topic, &envelope, wire).await
            }
            other => other,
        }
    }
    /// Publishes with SNS `PublishBatch`, up to the configured batch size (10 at most) and
    /// 256 KiB per call. Order holds within a call; calls go one after the other.
    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<()> {
        self.inner.check_open()?;
        if envelopes.is_empty() {
            return Ok(());
        }
        let mut encoded = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            let wire = self.inner.encode(&envelope, &[])?;
            encoded.push((envelope, wire));
        }
        let arn = self.inner.topic_arn(topic).await?;
        let config = &self.inner.config;
        for batch in batches(
            encoded,
            config.batch_size as usize,
            config.max_message_bytes,
        ) {
            let mut entries = Vec::with_capacity(batch.len());
            for (i, (envelope, wire)) in batch.iter().enumerate() {
                let mut entry = aws_sdk_sns::types::PublishBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message(&wire.body)
                    .set_message_attributes(Some(sns_attributes(wire)?));
                if let Some((group, dedup)) = self.inner.fifo_ids(envelope) {
                    entry = entry
                        .message_group_id(group)
                        .message_deduplication_id(dedup);
                }
                entries.push(entry.build().map_err(|e| {
                    Error::with_source(ErrorKind::Serialization, "a PublishBatch entry", e)
                })?);
            }
            let out = self
                .inner
                .sns
                .publish_batch()
                .topic_arn(&arn)
                .set_publish_batch_request_entries(Some(entries))
                .send()
                .await
                .map_err(|e| map(e, &format!("publishing a batch to topic `{topic}`")))?;
            if let Some(failed) = out.failed().first() {
                return Err(batch_entry(
                    failed.code(),
                    failed.message(),
                    &format!("publishing a batch to topic `{topic}`"),
                ));
            }
        }
        Ok(())
    }
}

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
                subscriber::start(
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
                subscriber::start(
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
        let source = subscriber::start(
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

#[async_trait]
impl Requester for SqsBroker {
    async fn request(&self, topic: &str, request: Envelope, timeout: Duration) -> Result<Envelope> {
        self.inner.check_open()?;
        self.replies.request(topic, request, timeout).await
    }
}

#[async_trait]
impl Responder for SqsBroker {
    async fn serve(&self, topic: &str, _options: ServeOptions) -> Result<Requests> {
        self.inner.check_open()?;
        crate::requests::serve(self.inner.clone(), topic).await
    }
}

#[async_trait]
impl Broker for SqsBroker {
    fn capabilities(&self) -> Capabilities {
        let fifo = self.inner.config.fifo;
        Capabilities {
            name: "sqs",
            durable: true,
            consumer_groups: true,
            per_key_order: fifo,
            per_key_order_across_members: fifo,
            // A FIFO group is held back while a message of it is invisible, but not the
            // messages of the group already received; the Consumer's retries in place keep
            // the order.
            key_order_across_retries: if fifo {
                Support::Emulated
            } else {
                Support::Unsupported("standard queues keep no order")
            },
            request_reply: Support::Emulated,
            no_responders_detection: false,
            delayed_redelivery: Support::Native,
            dead_letter: if self.inner.config.max_receive_count.is_some() {
                Support::Native
            } else {
                Support::Emulated
            },
            prompt_redelivery_of_dropped: true,
            // ApproximateReceiveCount.
            delivery_count: Support::Native,
            max_payload_bytes: Some(self.inner.config.max_message_bytes),
            max_headers: None,
        }
    }

    async fn close(&self) -> Result<()> {
        if self.inner.is_closed() {
            return Ok(());
        }
        self.inner.close();
        self.replies.close().await;
        Ok(())
    }
}

impl SqsBroker {
    async fn publish_wire(&self, topic: &str, envelope: &Envelope, wire: Wire) -> Result<()> {
        let arn = self.inner.topic_arn(topic).await?;
        let mut publish = self
            .inner
            .sns
            .publish()
            .topic_arn(arn)
            .set_message_attributes(Some(sns_attributes(&wire)?))
            .message(wire.body);
        if let Some((group, dedup)) = self.inner.fifo_ids(envelope) {
            publish = publish
                .message_group_id(group)
                .message_deduplication_id(dedup);
        }
        publish
            .send()
            .await
            .map_err(|e| map(e, &format!("publishing to topic `{topic}`")))?;
        Ok(())
    }
}
