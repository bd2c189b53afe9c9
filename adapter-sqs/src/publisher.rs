//! Publishing to SNS topics (sending to a queue, which work queues, subscriptions and requests
//! all do, is `broker::send_wire`).

use std::collections::HashMap;

use async_trait::async_trait;
use std::time::SystemTime;

use bus_core::{Delay, Envelope, Error, ErrorKind, Publisher, Result};

use crate::delay;
use crate::error::{batch_entry, map};
use crate::wire::{Wire, NOT_BEFORE, STRING};
use crate::SqsBroker;

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
        self.publish_encoded(topic, &envelope, wire).await
    }

    /// SNS has no delay: the message goes to every group's queue at once, carrying when it is
    /// due (`bus-not-before`), and each group's receive loop sends it back to its queue with
    /// `DelaySeconds` (15 minutes at most per hop) until it is due, so every group subscribed
    /// now gets it then, once, at attempt 1. Until a receive loop of the group runs, it waits
    /// visible in the group's queue, and a consumer that is not `bus` sees it at once.
    /// Refused on FIFO topics (see `Capabilities::delayed_publish`).
    async fn publish_delayed(&self, topic: &str, envelope: Envelope, delay: Delay) -> Result<()> {
        self.inner.check_open()?;
        if self.inner.config.fifo {
            return Err(Error::unsupported(
                "SQS: no delayed publish on FIFO topics (FIFO queues take no per-message \
                 DelaySeconds)",
            ));
        }
        let plan = delay::plan(delay, SystemTime::now(), true)?;
        let wire = match &plan.not_before {
            Some(due) => self.inner.encode(&envelope, &[(NOT_BEFORE, due)])?,
            None => self.inner.encode(&envelope, &[])?,
        };
        self.publish_encoded(topic, &envelope, wire).await
    }
    /// Publishes with SNS `PublishBatch`, up to the configured batch size (10 at most) and
    /// 256 KiB per call. Order holds within a call; calls go one after the other.
    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<()> {
        self.inner.check_open()?;
        if envelopes.is_empty() {
            return Ok(());
        }
        self.publish_batch_encoded(topic, envelopes).await
    }
}

impl SqsBroker {
    async fn publish_encoded(&self, topic: &str, envelope: &Envelope, wire: Wire) -> Result<()> {
        match self.publish_wire(topic, envelope, wire.clone()).await {
            // The topic was deleted behind the cache (or the server restarted): create it
            // again, once.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.inner.forget_topic(topic);
                self.publish_wire(topic, envelope, wire).await
            }
            other => other,
        }
    }

    async fn publish_batch_encoded(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<()> {
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
