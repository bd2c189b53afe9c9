//! The Kafka adapter of `bus`, over [`rdkafka`].
//!
//! [`KafkaBroker`] implements every `bus` pattern on a Kafka cluster (or a Kafka-API broker
//! such as tansu):
//!
//! | bus | Kafka |
//! |---|---|
//! | topic | a topic, created through the admin API with [`KafkaConfig::partitions`] |
//! | key | the record key: the default partitioner keeps one key in one partition, in order |
//! | group | a consumer group; a subscription without a group gets a group of its own |
//! | queue | a topic consumed by one group named after the queue |
//! | ack | the partition's offset is committed once every message before it is settled |
//! | nack (now or after a delay) | a copy goes to `<topic>.retry` with the next attempt number and a not-before time |
//! | reject | the dead letter goes to `<topic>.dlq` (read it with `Queue::consume`) |
//! | delayed publish | a record on `<topic>.retry` marked `bus-delayed` with its not-before time: every group reading the topic holds it (offset uncommitted) until due, then hands it out at attempt 1; at most 7 days |
//! | backlog | per partition, the end offset less the group's committed offset (`<topic>.retry` not counted) |
//! | request-reply | a reply topic per connection; the reply's causation id is the request's id |
//!
//! On the wire the envelope follows the CloudEvents Kafka binding in binary mode (`ce_id`,
//! `ce_type`, `ce_source`, `ce_specversion`, `ce_time`, `ce_correlationid`, `ce_causationid`,
//! `content-type`), application headers as they are, the key as the record key.
//! See `docs/adapters/kafka.md` for the whole mapping, the guarantees and the limits.
//!
//! ```no_run
//! use adapter_kafka::{KafkaBroker, KafkaConfig};
//! use bus_core::{Envelope, Publisher};
//! # async fn run() -> bus_core::Result<()> {
//! let broker = KafkaBroker::connect(KafkaConfig::from_url("kafka://127.0.0.1:9092")?).await?;
//! broker.publish("orders", Envelope::new("order.placed", "{}").with_key("o-1")).await?;
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backlog;
mod broker;
mod config;
#[doc(hidden)]
pub mod cost;
mod error;
mod fit;
mod names;
mod oauth;
mod offsets;
mod publisher;
mod requests;
mod source;
mod subscriber;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bus_core::{Backlog, BacklogOf, Broker, Capabilities, Result, SubscribeOptions, Support};

pub use config::{Compression, KafkaConfig};
pub use oauth::{OAuthToken, OAuthTokenProvider};
pub use rdkafka;

use broker::Shared;
use requests::Inbox;
use source::{Spec, Start};

/// A connection to Kafka: publisher, subscriber, queues and request-reply.
///
/// Cheap to share behind an `Arc`; every subscription runs its own consumer (and thread).
#[derive(Debug)]
pub struct KafkaBroker {
    shared: Arc<Shared>,
    inbox: Inbox,
}

impl KafkaBroker {
    /// Connects with `config`: creates the producer and admin client and checks that the
    /// brokers answer.
    ///
    /// # Errors
    /// [`Config`](bus_core::ErrorKind::Config) for an invalid configuration, a secret whose
    /// environment variable or file cannot be read, a client key that cannot be read or
    /// decrypted (a wrong `ssl_key_password`), a broker certificate librdkafka refused (wrong
    /// CA, another host name), or an OAUTHBEARER token librdkafka cannot use;
    /// [`Rejected`](bus_core::ErrorKind::Rejected) when the SASL login or the client
    /// certificate is refused; the [`OAuthTokenProvider`]'s own error, of the kind it gave,
    /// when it fails;
    /// [`Connection`](bus_core::ErrorKind::Connection) when no broker answers within
    /// 10 seconds. The message ends with librdkafka's last reported reason, if any.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        let shared = Arc::new(Shared::new(config)?);
        let probe = shared.clone();
        tokio::task::spawn_blocking(move || error::probe(&probe.config, Duration::from_secs(10)))
            .await
            .map_err(|e| {
                bus_core::Error::with_source(bus_core::ErrorKind::Other, "probe task", e)
            })??;
        Ok(Self {
            shared,
            inbox: Inbox::default(),
        })
    }

    /// Connects to `kafka://host:port[,host:port…][?query]` (see [`KafkaConfig::from_url`]).
    ///
    /// # Errors
    /// As [`KafkaConfig::from_url`] and [`KafkaBroker::connect`].
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(KafkaConfig::from_url(url)?).await
    }

    /// The configuration in use.
    #[must_use]
    pub fn config(&self) -> &KafkaConfig {
        &self.shared.config
    }

    fn spec(
        &self,
        source: &str,
        group: String,
        user_group: Option<String>,
        start: Start,
        prefetch: Option<usize>,
    ) -> Spec {
        Spec {
            source: source.to_owned(),
            group,
            user_group,
            start,
            prefetch: prefetch.unwrap_or(self.shared.config.prefetch),
            retries: true,
            private: false,
        }
    }

    /// What `subscribe` consumes: the group named in `options`, or a private group.
    fn subscribe_spec(&self, topic: &str, options: SubscribeOptions) -> Spec {
        let (group, user_group) = match options.group {
            Some(group) => (group.clone(), Some(group)),
            None => (names::private_group(), None),
        };
        let mut spec = self.spec(topic, group, user_group, Start::Latest, options.prefetch);
        spec.private = spec.user_group.is_none();
        spec
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "kafka",
            durable: true,
            consumer_groups: true,
            per_key_order: true,
            per_key_order_across_members: true,
            // A retry goes through the retry topic, behind the partition's later records;
            // the Consumer's retries in place keep the order.
            key_order_across_retries: Support::Emulated,
            request_reply: Support::Emulated,
            no_responders_detection: false,
            delayed_redelivery: Support::Emulated,
            dead_letter: Support::Emulated,
            prompt_redelivery_of_dropped: true,
            // Kafka does not count deliveries: the attempt travels in a header of the copy put
            // on the retry topic. A delivery cut short by a crash is read again from the
            // committed offset as attempt 1, so a message that kills the process every time
            // comes back forever (docs/adapters/kafka.md, "Foreign and malformed messages").
            delivery_count: Support::Emulated,
            max_payload_bytes: Some(self.shared.config.max_payload_bytes),
            max_headers: None,
            // Through the retry topic, as a delayed retry: every group's consumer holds the
            // record until it is due, its offset uncommitted.
            delayed_publish: Support::Emulated,
            max_delay: Some(broker::MAX_PUBLISH_DELAY),
            backlog: Support::Native,
        }
    }

    /// Per partition of the topic (a queue's topic for [`BacklogOf::Queue`]), the end offset
    /// less the group's committed offset, in [`Backlog::partitions`]; their sum is `waiting`.
    /// It includes what members hold unsettled (Kafka cannot tell them apart, so `in_flight`
    /// is `None`). The retry topic `<topic>.retry` holds every group's retry copies and the
    /// delayed publishes together, so it is not counted (`delayed` is `None`); nor is
    /// `oldest_age`. A group that never subscribed (no committed offset) is `NotFound`.
    async fn backlog(&self, of: &BacklogOf) -> Result<Backlog> {
        backlog::backlog(&self.shared, of).await
    }

    async fn close(&self) -> Result<()> {
        self.shared.close();
        // The reply topic is this connection's alone: removed (after its reader left).
        self.inbox.close(&self.shared).await;
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.flush(Duration::from_secs(5))).await;
        Ok(())
    }
}

const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<KafkaBroker>();
    send_sync::<KafkaConfig>();
    send_sync::<OAuthToken>();
};
