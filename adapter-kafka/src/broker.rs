//! The connection state every handle shares (`Shared`): the idempotent producer and its
//! delivery reports, the admin client and the topics created through it, the configuration
//! and the closed signal. Publishing (module `publisher`), subscriptions and requests use it,
//! not one another's state.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bus_core::{headers, Delay, Envelope, Error, ErrorKind, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tokio::sync::watch;

use crate::oauth::Auth;
use crate::{error, names, wire, KafkaConfig};

/// The longest delay of a delayed publish: Kafka's default retention (`retention.ms`, 7
/// days). The record waits on the retry topic from its publish until it is due, so a longer
/// delay could outlive it on a topic with that retention, and a consumer restarting after
/// the record was deleted would never get it.
pub(crate) const MAX_PUBLISH_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// What every part of one connection shares: the producer, the admin client, the topics
/// known to exist, and whether the connection is closed.
pub(crate) struct Shared {
    pub(crate) config: KafkaConfig,
    pub(crate) producer: FutureProducer<Auth>,
    /// None when the clients authenticate with an OAUTHBEARER token provider: rdkafka's admin
    /// client never serves librdkafka's token request (it does not poll its main queue), so it
    /// could never authenticate. Topics are then looked up, not created.
    admin: Option<AdminClient<DefaultClientContext>>,
    created: Mutex<HashSet<String>>,
    closed: AtomicBool,
    pub(crate) closed_tx: watch::Sender<bool>,
    pub(crate) source: String,
    /// Per group: deliveries dropped after their subscription closed, still being handed back.
    handbacks: Mutex<HashMap<String, Arc<watch::Sender<usize>>>>,
    /// Failures this crate's tests inject (see [`Faults`]).
    #[cfg(test)]
    pub(crate) faults: Faults,
}

/// Failures injected by this crate's own tests, through real client calls: the crate-private
/// seam that lets a test make the broker look slow without a mock.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// How many of the next committed-offset fetches are made with a zero timeout, so that
    /// librdkafka reports them timed out, as it would a slow broker's.
    pub(crate) offset_fetch_timeouts: std::sync::atomic::AtomicU32,
}

#[cfg(test)]
impl Faults {
    /// Whether the next committed-offset fetch must time out (and counts it).
    pub(crate) fn take_offset_fetch_timeout(&self) -> bool {
        self.offset_fetch_timeouts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let producer: FutureProducer<Auth> = config
            .producer_config()?
            .create_with_context(Auth::new(config.token_provider()))
            .map_err(|e| error::creating(e, "creating the Kafka producer", &config))?;
        let admin = if config.uses_token_provider() {
            None
        } else {
            let admin: AdminClient<DefaultClientContext> = config
                .probe_config()?
                .create()
                .map_err(|e| error::map(e, "creating the Kafka admin client"))?;
            Some(admin)
        };
        let (closed_tx, _) = watch::channel(false);
        Ok(Self {
            source: config.source.clone(),
            config,
            producer,
            admin,
            created: Mutex::new(HashSet::new()),
            closed: AtomicBool::new(false),
            closed_tx,
            handbacks: Mutex::default(),
            #[cfg(test)]
            faults: Faults::default(),
        })
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::closed("the Kafka connection is closed"))
        } else {
            Ok(())
        }
    }

    /// The count of hand-backs in flight for `group`.
    pub(crate) fn handbacks(&self, group: &str) -> Arc<watch::Sender<usize>> {
        self.handbacks
            .lock()
            .expect("hand-back map poisoned")
            .entry(group.to_owned())
            .or_insert_with(|| Arc::new(watch::channel(0).0))
            .clone()
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.closed_tx.send(true);
    }

    /// Creates the topics that this connection has not seen yet, with the configured
    /// partitions and replication (or `partitions` when given). A topic that already exists is
    /// fine.
    pub(crate) async fn ensure_topics(
        &self,
        topics: &[&str],
        partitions: Option<i32>,
    ) -> Result<()> {
        let missing: Vec<&str> = {
            let created = self.created.lock().expect("topic set poisoned");
            topics
                .iter()
                .copied()
                .filter(|t| !created.contains(*t))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let Some(admin) = &self.admin else {
            for topic in missing {
                self.look_up(topic).await?;
            }
            return Ok(());
        };
        let partitions = partitions.unwrap_or(self.config.partitions);
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    partitions,
                    TopicReplication::Fixed(self.config.replication),
                )
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
        let results = admin
            .create_topics(&new, &options)
            .await
            .map_err(|e| error::map(e, format!("creating topics {missing:?}")))?;
        for result in results {
            match result {
                Ok(name) | Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    self.created
                        .lock()
                        .expect("topic set poisoned")
                        .insert(name);
                }
                Err((name, code)) => {
                    let kind = match code {
                        RDKafkaErrorCode::InvalidTopic
                        | RDKafkaErrorCode::InvalidPartitions
                        | RDKafkaErrorCode::InvalidReplicationFactor => ErrorKind::Config,
                        RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::ClusterAuthorizationFailed => ErrorKind::Rejected,
                        _ => ErrorKind::Connection,
                    };
                    return Err(Error::with_source(
                        kind,
                        format!("creating Kafka topic `{name}` failed: {code}"),
                        rdkafka::error::KafkaError::AdminOp(code),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Deletes a consumer group (one that has no members left). Without an admin client
    /// (see [`Shared::admin`]) the group is left to the broker's offset retention.
    pub(crate) async fn delete_group(&self, group: &str) -> Result<()> {
        let Some(admin) = &self.admin else {
            tracing::debug!(group, "no admin client (OAUTHBEARER provider): group left");
            return Ok(());
        };
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .delete_groups(&[group], &options)
            .await
            .map_err(|e| error::map(e, format!("deleting Kafka group `{group}`")))?;
        admin_results(results, "deleting Kafka group")
    }

    /// Deletes a topic. Without an admin client (see [`Shared::admin`]) it is left.
    pub(crate) async fn delete_topic(&self, topic: &str) -> Result<()> {
        let Some(admin) = &self.admin else {
            tracing::debug!(topic, "no admin client (OAUTHBEARER provider): topic left");
            return Ok(());
        };
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .delete_topics(&[topic], &options)
            .await
            .map_err(|e| error::map(e, format!("deleting Kafka topic `{topic}`")))?;
        self.created
            .lock()
            .expect("topic set poisoned")
            .remove(topic);
        admin_results(results, "deleting Kafka topic")
    }

    /// Without an admin client: checks that `topic` exists. A broker that creates topics when
    /// they are first named (`auto.create.topics.enable`) does so on this metadata request,
    /// and answers that it has no leader yet: asked again a few times before giving up.
    async fn look_up(&self, topic: &str) -> Result<()> {
        let mut pause = Duration::from_millis(200);
        for _ in 0..4 {
            match self.check_exists(topic).await {
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                other => return other,
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        match self.check_exists(topic).await {
            Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "Kafka topic `{topic}` does not exist, and a connection that authenticates \
                     with an OAUTHBEARER token provider cannot create topics (rdkafka's admin \
                     client cannot ask the provider for a token): create it beforehand, or let \
                     the broker create topics (auto.create.topics.enable)"
                ),
            )),
            other => other,
        }
    }

    /// Checks that `topic` exists (made by somebody else), so that sending to it does not wait
    /// for a topic that will never come.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] if the broker does not know it.
    pub(crate) async fn check_exists(&self, topic: &str) -> Result<()> {
        if self
            .created
            .lock()
            .expect("topic set poisoned")
            .contains(topic)
        {
            return Ok(());
        }
        let client = self.producer.clone();
        let name = topic.to_owned();
        let exists = tokio::task::spawn_blocking(move || {
            let metadata = client
                .client()
                .fetch_metadata(Some(&name), Duration::from_secs(10))?;
            Ok::<_, rdkafka::error::KafkaError>(
                metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty()),
            )
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Other, "metadata task", e))?
        .map_err(|e| error::map(e, format!("looking up Kafka topic `{topic}`")))?;
        if !exists {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("Kafka topic `{topic}` does not exist (its requester closed?)"),
            ));
        }
        self.created
            .lock()
            .expect("topic set poisoned")
            .insert(topic.to_owned());
        Ok(())
    }

    /// Produces `envelope` to `topic` (created if needed) and waits for the broker's
    /// acknowledgement.
    pub(crate) async fn produce(
        &self,
        topic: &str,
        envelope: &Envelope,
        extra: &[(&str, &str)],
    ) -> Result<()> {
        self.check_open()?;
        names::check_topic(topic.trim_end_matches(".dlq"))?;
        self.check_envelope(envelope)?;
        self.ensure_topics(&[topic], None).await?;
        self.send(topic, envelope, extra).await
    }

    /// Produces `envelope` for `topic` (a topic or queue) to be delivered once `delay` has
    /// passed: to `topic`'s retry topic, marked as a delayed publish ([`wire::DELAYED`]) with
    /// its not-before time, where every group reading the topic (they all read its retry
    /// topic) holds it until it is due, its offset uncommitted, and hands it out at its first
    /// attempt. Due already: produced to `topic` itself.
    pub(crate) async fn produce_delayed(
        &self,
        topic: &str,
        envelope: &Envelope,
        delay: Delay,
    ) -> Result<()> {
        let now = SystemTime::now();
        let wait = delay.remaining(now);
        if wait > MAX_PUBLISH_DELAY {
            return Err(Error::unsupported(format!(
                "a delay of {wait:?} is longer than the Kafka adapter holds a delayed message \
                 ({MAX_PUBLISH_DELAY:?}, Kafka's default retention; Capabilities::max_delay)"
            )));
        }
        if wait.is_zero() {
            return self.produce(topic, envelope, &[]).await;
        }
        self.check_open()?;
        names::check_topic(topic.trim_end_matches(".dlq"))?;
        self.check_envelope(envelope)?;
        let retry = names::retry_topic(topic);
        self.ensure_topics(&[topic, &retry], None).await?;
        // The header keeps milliseconds: rounded up, so the wait is never shorter.
        let due = headers::format_time(headers::saturating_add(
            now,
            wait + Duration::from_millis(1),
        ));
        self.send(
            &retry,
            envelope,
            &[(wire::NOT_BEFORE, &due), (wire::DELAYED, topic)],
        )
        .await
    }

    /// Refuses, before anything is sent, an envelope over the payload limit or one a record
    /// cannot carry exactly ([`wire::check`]).
    pub(crate) fn check_envelope(&self, envelope: &Envelope) -> Result<()> {
        wire::check(envelope)?;
        let max = self.config.max_payload_bytes;
        if envelope.payload.len() > max {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "payload of {} bytes is over the Kafka adapter's limit of {max} bytes \
                     (KafkaConfig::max_payload_bytes)",
                    envelope.payload.len()
                ),
            ));
        }
        Ok(())
    }

    /// Sends to a topic known to exist.
    pub(crate) async fn send(
        &self,
        topic: &str,
        envelope: &Envelope,
        extra: &[(&str, &str)],
    ) -> Result<()> {
        let headers = wire::encode(envelope, &self.source, extra);
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(&envelope.payload[..])
            .headers(headers);
        let key = wire::record_key(envelope);
        if let Some(key) = &key {
            record = record.key(key.as_ref());
        }
        let queue_timeout = Timeout::After(Duration::from_millis(self.config.publish_timeout_ms));
        match self.producer.send(record, queue_timeout).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(error::map(
                e,
                format!("publishing to Kafka topic `{topic}`"),
            )),
        }
    }

    /// Flushes what the producer still holds, for close.
    pub(crate) fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(Timeout::After(timeout));
    }
}

/// The first failure among the results of an admin operation.
fn admin_results(
    results: Vec<std::result::Result<String, (String, RDKafkaErrorCode)>>,
    what: &str,
) -> Result<()> {
    for result in results {
        if let Err((name, code)) = result {
            return Err(Error::with_source(
                ErrorKind::Connection,
                format!("{what} `{name}` failed: {code}"),
                rdkafka::error::KafkaError::AdminOp(code),
            ));
        }
    }
    Ok(())
}
