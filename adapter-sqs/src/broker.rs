//! The broker handle and its connection: SDK clients, the queue and topic caches, and the
//! resources `bus` creates. Publishing, subscribing and request-reply (modules `publisher`,
//! `subscriber`, `requests`) each use it, not one another.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::QueueAttributeName;
use bus_core::secrets::{redact_url, Secret};
use bus_core::{
    headers, Backlog, BacklogOf, Broker, Capabilities, Envelope, Error, ErrorKind, Result, Support,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{CredentialsSource, SqsConfig};
use crate::error::map;
use crate::names::{fnv1a, Names};
use crate::requests::Replies;
use crate::wire::{self, Wire};

/// What kind of queue to create: the attributes differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueRole {
    /// A work queue or a group's queue: a redrive policy where configured.
    Durable,
    /// A dead-letter queue, private queue, reply or request queue: plain.
    Plain,
}

/// Shared by the broker handle, its subscriptions and its deliveries.
pub(crate) struct Inner {
    pub(crate) sqs: aws_sdk_sqs::Client,
    pub(crate) sns: aws_sdk_sns::Client,
    pub(crate) config: SqsConfig,
    pub(crate) names: Names,
    queues: Mutex<HashMap<String, String>>,
    topics: Mutex<HashMap<String, String>>,
    wired: Mutex<HashSet<String>>,
    /// The running send batchers, by queue URL; each leaves this map when it stops.
    senders: Arc<Mutex<HashMap<String, Batcher>>>,
    next_batcher: AtomicU64,
    /// Batcher tasks running (counted by the tasks themselves).
    live_batchers: Arc<AtomicUsize>,
    /// FIFO queues' receive locks, held by the receive loops reading them: an entry whose
    /// loops all ended is dead and pruned when the next one is added.
    receive_locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    closed: watch::Sender<bool>,
}

/// A running send batcher: its number (told apart from its successor for the same queue) and
/// its channel.
struct Batcher {
    id: u64,
    tx: mpsc::UnboundedSender<SendRequest>,
}

/// One message waiting for a `SendMessageBatch` call.
struct SendRequest {
    wire: Wire,
    fifo: Option<(String, String)>,
    /// `DelaySeconds` (0 for none).
    delay_secs: i32,
    what: String,
    done: oneshot::Sender<Result<()>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("config", &self.config)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Inner {
    pub(crate) async fn connect(config: SqsConfig) -> Result<Self> {
        config.check_max_message_bytes()?;
        config.check_connection_settings()?;
        let (sqs, sns) = clients(&config).await?;
        // Fail fast on a wrong endpoint, certificate or credentials rather than at the first
        // publish, and within the connect timeout whatever the SDK's retries and credential
        // lookups take.
        let probe = sqs.list_queues().max_results(1).send();
        match tokio::time::timeout(config.connect_timeout(), probe).await {
            Ok(result) => {
                result.map_err(|e| map(e, "connecting to SQS"))?;
            }
            Err(_) => {
                return Err(Error::new(
                    bus_core::ErrorKind::Timeout,
                    format!(
                        "connecting to SQS at {}: no answer within {} ms (`connect_timeout_ms`)",
                        config
                            .endpoint
                            .as_deref()
                            .map_or_else(|| "AWS".to_owned(), redact_url),
                        config.connect_timeout_ms
                    ),
                ))
            }
        }
        let names = Names::new(&config.name_prefix, config.fifo);
        Ok(Self {
            sqs,
            sns,
            config,
            names,
            queues: Mutex::default(),
            topics: Mutex::default(),
            wired: Mutex::default(),
            senders: Arc::default(),
            next_batcher: AtomicU64::new(0),
            live_batchers: Arc::default(),
            receive_locks: Mutex::default(),
            closed: watch::channel(false).0,
        })
    }

    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    pub(crate) fn close(&self) {
        self.closed.send_replace(true);
    }

    /// A receiver that sees `true` once the broker is closed.
    pub(crate) fn closed_signal(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::closed("the SQS broker connection is closed"))
        } else {
            Ok(())
        }
    }

    pub(crate) fn encode(
        &self,
        envelope: &bus_core::Envelope,
        extra: &[(&str, &str)],
    ) -> Result<Wire> {
        wire::encode(
            envelope,
            &self.config.source,
            extra,
            self.config.max_message_bytes,
        )
    }

    /// The URL of the SQS queue `name`, created if needed (`CreateQueue` is idempotent).
    /// `dead_letters` names the `bus` queue whose messages a redrive policy moves.
    pub(crate) async fn queue_url(
        &self,
        name: &str,
        role: QueueRole,
        redrive_source: Option<&str>,
    ) -> Result<String> {
        if let Some(url) = self.queues.lock().expect("queue cache").get(name) {
            return Ok(url.clone());
        }
        let mut create = self.sqs.create_queue().queue_name(name);
        if self.config.fifo {
            create = create.attributes(QueueAttributeName::FifoQueue, "true");
        }
        if let (QueueRole::Durable, Some(count), Some(source)) =
            (role, self.config.max_receive_count, redrive_source)
        {
            if !source.ends_with(".dlq") {
                let dlq_name = self.names.queue(&headers::dead_letter_queue(source));
                let dlq_url = Box::pin(self.queue_url(&dlq_name, QueueRole::Plain, None)).await?;
                let dlq_arn = self.queue_arn(&dlq_url).await?;
                let policy = serde_json::json!({
                    "deadLetterTargetArn": dlq_arn,
                    "maxReceiveCount": count.to_string(),
                });
                create = create.attributes(QueueAttributeName::RedrivePolicy, policy.to_string());
            }
        }
        let url = match create.send().await {
            Ok(out) => out.queue_url().unwrap_or_default().to_owned(),
            // Exists with other attributes (made by an older configuration): use it as it is.
            Err(e) if matches!(e.code(), Some("QueueAlreadyExists" | "QueueNameExists")) => self
                .sqs
                .get_queue_url()
                .queue_name(name)
                .send()
                .await
                .map_err(|e| map(e, &format!("looking up queue `{name}`")))?
                .queue_url()
                .unwrap_or_default()
                .to_owned(),
            Err(e) => return Err(map(e, &format!("creating queue `{name}`"))),
        };
        self.queues
            .lock()
            .expect("queue cache")
            .insert(name.to_owned(), url.clone());
        Ok(url)
    }

    /// On FIFO queues, the lock every receive loop of this connection takes around its
    /// `ReceiveMessage` on `url`: one receive at a time per queue, so that two members never
    /// race for one message group even on servers that do not lock groups across concurrent
    /// receives (moto). `None` on standard queues. The loops hold it for their lifetime; the
    /// map keeps only a weak reference, so it holds no more than the queues being read (and
    /// dead entries until the next lock is made).
    pub(crate) fn receive_lock(&self, url: &str) -> Option<Arc<tokio::sync::Mutex<()>>> {
        if !self.config.fifo {
            return None;
        }
        let mut locks = self.receive_locks.lock().expect("receive locks");
        if let Some(lock) = locks.get(url).and_then(Weak::upgrade) {
            return Some(lock);
        }
        locks.retain(|_, lock| lock.strong_count() > 0);
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(url.to_owned(), Arc::downgrade(&lock));
        Some(lock)
    }

    /// How many FIFO queues have a receive lock in use.
    pub(crate) fn receive_locks(&self) -> usize {
        self.receive_locks
            .lock()
            .expect("receive locks")
            .values()
            .filter(|lock| lock.strong_count() > 0)
            .count()
    }

    /// Sends `wire` to the queue at `url` through that queue's batcher, with `DelaySeconds`
    /// `delay_secs` unless 0.
    pub(crate) async fn send_batched(
        &self,
        url: &str,
        wire: Wire,
        fifo: Option<(String, String)>,
        delay_secs: i32,
        what: &str,
    ) -> Result<()> {
        let (done, result) = oneshot::channel();
        let mut request = SendRequest {
            wire,
            fifo,
            delay_secs,
            what: what.to_owned(),
            done,
        };
        loop {
            let sender = {
                let mut senders = self.senders.lock().expect("send batchers");
                senders
                    .entry(url.to_owned())
                    .or_insert_with(|| self.spawn_batcher(url))
                    .tx
                    .clone()
            };
            match sender.send(request) {
                Ok(()) => break,
                // It stopped for idleness between the lookup and the send (it leaves the map
                // before it stops taking messages): start another.
                Err(mpsc::error::SendError(back)) => {
                    request = back;
                    let mut senders = self.senders.lock().expect("send batchers");
                    if senders
                        .get(url)
                        .is_some_and(|batcher| batcher.tx.same_channel(&sender))
                    {
                        senders.remove(url);
                    }
                }
            }
        }
        result
            .await
            .map_err(|_| Error::closed("the send batcher stopped"))?
    }

    fn spawn_batcher(&self, url: &str) -> Batcher {
        let id = self.next_batcher.fetch_add(1, Ordering::Relaxed);
        let tx = spawn_sender(
            SenderSpec {
                sqs: self.sqs.clone(),
                url: url.to_owned(),
                limit: self.config.batch_size.clamp(1, 10) as usize,
                max_bytes: self.config.max_message_bytes,
                idle: self.config.sender_idle(),
                id,
                senders: self.senders.clone(),
            },
            LiveBatcher::new(self.live_batchers.clone()),
        );
        Batcher { id, tx }
    }

    /// How many send batcher tasks are running.
    pub(crate) fn live_batchers(&self) -> usize {
        self.live_batchers.load(Ordering::SeqCst)
    }

    /// Forgets a cached queue URL (after deleting it, or when SQS says it is gone).
    pub(crate) fn forget_queue(&self, name: &str) {
        self.queues.lock().expect("queue cache").remove(name);
        self.wired.lock().expect("wired cache").remove(name);
    }

    /// Forgets a cached topic ARN (when SNS says it is gone).
    pub(crate) fn forget_topic(&self, topic: &str) {
        let name = self.names.topic(topic);
        self.topics.lock().expect("topic cache").remove(&name);
    }

    pub(crate) async fn queue_arn(&self, url: &str) -> Result<String> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| map(e, "reading a queue's ARN"))?;
        out.attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .cloned()
            .ok_or_else(|| Error::new(bus_core::ErrorKind::Other, "SQS returned no queue ARN"))
    }

    /// The ARN of the SNS topic behind `topic`, created if needed (`CreateTopic` is
    /// idempotent).
    pub(crate) async fn topic_arn(&self, topic: &str) -> Result<String> {
        let name = self.names.topic(topic);
        if let Some(arn) = self.topics.lock().expect("topic cache").get(&name) {
            return Ok(arn.clone());
        }
        let mut create = self.sns.create_topic().name(&name);
        if self.config.fifo {
            create = create.attributes("FifoTopic", "true");
        }
        let arn = create
            .send()
            .await
            .map_err(|e| map(e, &format!("creating SNS topic `{name}`")))?
            .topic_arn()
            .unwrap_or_default()
            .to_owned();
        self.topics
            .lock()
            .expect("topic cache")
            .insert(name, arn.clone());
        Ok(arn)
    }

    /// Subscribes the queue `queue_url` to `topic` with raw message delivery, after giving the
    /// topic the right to send to it. Idempotent; returns the subscription ARN.
    pub(crate) async fn wire_topic(
        &self,
        topic: &str,
        queue_name: &str,
        queue_url: &str,
    ) -> Result<String> {
        let topic_arn = self.topic_arn(topic).await?;
        let queue_arn = self.queue_arn(queue_url).await?;
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "bus-sns-to-sqs",
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
            }],
        });
        self.sqs
            .set_queue_attributes()
            .queue_url(queue_url)
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .send()
            .await
            .map_err(|e| {
                map(
                    e,
                    &format!("allowing topic `{topic}` to send to `{queue_name}`"),
                )
            })?;
        let out = self
            .sns
            .subscribe()
            .topic_arn(&topic_arn)
            .protocol("sqs")
            .endpoint(&queue_arn)
            .attributes("RawMessageDelivery", "true")
            .return_subscription_arn(true)
            .send()
            .await
            .map_err(|e| map(e, &format!("subscribing `{queue_name}` to topic `{topic}`")))?;
        self.wired
            .lock()
            .expect("wired cache")
            .insert(queue_name.to_owned());
        Ok(out.subscription_arn().unwrap_or_default().to_owned())
    }

    /// The URL of the existing SQS queue `name`, from the cache or `GetQueueUrl`: never created.
    async fn existing_queue_url(&self, name: &str) -> Result<String> {
        if let Some(url) = self.queues.lock().expect("queue cache").get(name) {
            return Ok(url.clone());
        }
        let out = self
            .sqs
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .map_err(|e| map(e, &format!("looking up queue `{name}`")))?;
        Ok(out.queue_url().unwrap_or_default().to_owned())
    }

    /// The counts of the SQS queue `name` (see `Broker::backlog`).
    async fn backlog(&self, name: &str, of: &BacklogOf) -> Result<Backlog> {
        let url = self.existing_queue_url(name).await?;
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(|e| map(e, &format!("reading the backlog of {of}")))?;
        let count = |attribute: QueueAttributeName| {
            out.attributes()
                .and_then(|a| a.get(&attribute))
                .and_then(|n| n.trim().parse::<u64>().ok())
        };
        let mut backlog = Backlog::default();
        backlog.waiting = count(QueueAttributeName::ApproximateNumberOfMessages).unwrap_or(0);
        backlog.in_flight = count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible);
        backlog.delayed = count(QueueAttributeName::ApproximateNumberOfMessagesDelayed);
        backlog.approximate = true;
        Ok(backlog)
    }

    pub(crate) fn is_wired(&self, queue_name: &str) -> bool {
        self.wired.lock().expect("wired cache").contains(queue_name)
    }

    /// The FIFO parameters of a message: group = key (or the id, for unkeyed messages, which
    /// then keep no order among themselves), deduplication id = the envelope id (or a fresh
    /// one per call without `fifo_dedup_by_id`). A dead letter, and a message a redrive sends
    /// back, carry [`wire::DEAD_LETTER_ID`]: their deduplication id is the envelope id and that
    /// together, so neither is dropped as a copy of the original (or of an earlier dead letter)
    /// within SQS's 5 minutes, while a retried send of the same dead letter or redrive still
    /// is. Values SQS would refuse (over 128 characters, other characters) are replaced by a
    /// stable hash.
    pub(crate) fn fifo_ids(&self, envelope: &bus_core::Envelope) -> Option<(String, String)> {
        if !self.config.fifo {
            return None;
        }
        let group = envelope
            .key
            .clone()
            .unwrap_or_else(|| envelope.id.to_string());
        let dedup = if !self.config.fifo_dedup_by_id {
            uuid::Uuid::now_v7().simple().to_string()
        } else if let Some(dead_letter) = envelope.header(wire::DEAD_LETTER_ID) {
            fifo_safe(&format!("{}/{dead_letter}", envelope.id))
        } else {
            fifo_safe(envelope.id.as_str())
        };
        Some((fifo_safe(&group), dedup))
    }
}

/// The SQS and SNS clients the configuration describes: endpoint, region, TLS, credentials
/// (static, profile, default chain or dummy for a local server, then an assumed role), the
/// connect timeout, then the hooks.
async fn clients(config: &SqsConfig) -> Result<(aws_sdk_sqs::Client, aws_sdk_sns::Client)> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
        aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(config.connect_timeout())
            .build(),
    );
    if let Some(region) = &config.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(profile) = &config.profile {
        loader = loader.profile_name(profile);
    }
    match config.credentials_source() {
        CredentialsSource::Static => {
            let secret_access_key = match &config.secret_access_key {
                Some(secret) => secret.resolve()?,
                None => String::new(),
            };
            let session_token = config
                .session_token
                .as_ref()
                .map(Secret::resolve)
                .transpose()?;
            loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
                config.access_key_id.clone().unwrap_or_default(),
                secret_access_key,
                session_token,
                None,
                "bus-sqs-config",
            ));
        }
        // The profile's credentials only: a profile that is missing or holds none is an
        // error, never a fall back to the rest of the chain (an instance role, say).
        CredentialsSource::Profile => {
            let name = config.profile.clone().unwrap_or_default();
            loader = loader.credentials_provider(
                aws_config::profile::ProfileFileCredentialsProvider::builder()
                    .profile_name(name)
                    .build(),
            );
        }
        CredentialsSource::LocalTest => loader = loader.test_credentials(),
        CredentialsSource::DefaultChain => {}
    }
    if let Some(client) = crate::tls::http_client(config)? {
        loader = loader.http_client(client);
    }
    if let Some(hook) = &config.loader {
        loader = hook(loader);
    }
    let mut shared = loader.load().await;
    if let Some(role) = &config.role_arn {
        let base = shared.credentials_provider().ok_or_else(|| {
            Error::config(format!(
                "SQS: no credentials to assume the role `{role}` with (give keys, a profile, \
                 or credentials in the environment)"
            ))
        })?;
        let mut sts = shared.to_builder();
        if let Some(endpoint) = &config.sts_endpoint {
            sts.set_endpoint_url(Some(endpoint.clone()));
        }
        let mut assume = aws_config::sts::AssumeRoleProvider::builder(role)
            .configure(&sts.build())
            .session_name(
                config
                    .role_session_name
                    .clone()
                    .unwrap_or_else(|| format!("bus-{}", uuid::Uuid::now_v7().simple())),
            );
        if let Some(id) = &config.external_id {
            assume = assume.external_id(id);
        }
        let provider = assume.build_from_provider(base).await;
        shared = shared
            .into_builder()
            .credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
                provider,
            ))
            .build();
    }
    let mut sqs = aws_sdk_sqs::config::Builder::from(&shared);
    let mut sns = aws_sdk_sns::config::Builder::from(&shared);
    if let Some(endpoint) = &config.endpoint {
        sqs = sqs.endpoint_url(endpoint);
        sns = sns.endpoint_url(endpoint);
    }
    if let Some(hook) = &config.sqs_config {
        sqs = hook(sqs);
    }
    Ok((
        aws_sdk_sqs::Client::from_conf(sqs.build()),
        aws_sdk_sns::Client::from_conf(sns.build()),
    ))
}

/// What a batcher sends to, and when it stops.
struct SenderSpec {
    sqs: aws_sdk_sqs::Client,
    url: String,
    limit: usize,
    max_bytes: usize,
    /// It stops after this long without a message.
    idle: Duration,
    id: u64,
    senders: Arc<Mutex<HashMap<String, Batcher>>>,
}

/// Counts a running batcher task until dropped.
struct LiveBatcher(Arc<AtomicUsize>);

impl LiveBatcher {
    fn new(live: Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::SeqCst);
        Self(live)
    }
}

impl Drop for LiveBatcher {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The batcher of one queue: takes what waits (up to `limit` messages and `max_bytes` in
/// all), sends it in one `SendMessageBatch`, answers each sender, repeats. One call at a time,
/// so sends keep their order (FIFO queues rely on it). After `idle` without a message it leaves
/// the map (the next send starts another batcher), stops taking messages, sends what raced in
/// meanwhile, and ends.
fn spawn_sender(spec: SenderSpec, live: LiveBatcher) -> mpsc::UnboundedSender<SendRequest> {
    let (tx, mut rx) = mpsc::unbounded_channel::<SendRequest>();
    tokio::spawn(async move {
        let _live = live;
        let SenderSpec {
            sqs,
            url,
            limit,
            max_bytes,
            idle,
            id,
            senders,
        } = spec;
        let mut carried: Option<SendRequest> = None;
        loop {
            let first = match carried.take() {
                Some(first) => first,
                None => match tokio::time::timeout(idle, rx.recv()).await {
                    Ok(Some(first)) => first,
                    Ok(None) => return,
                    Err(_) => {
                        {
                            let mut senders = senders.lock().expect("send batchers");
                            if senders.get(&url).is_some_and(|batcher| batcher.id == id) {
                                senders.remove(&url);
                            }
                        }
                        // Sends from now on fail and go to a new batcher; `recv` hands out
                        // what is already queued, then ends the loop.
                        rx.close();
                        continue;
                    }
                },
            };
            let mut size = first.wire.size();
            let mut batch = vec![first];
            while batch.len() < limit {
                match rx.try_recv() {
                    Ok(next) if size + next.wire.size() <= max_bytes => {
                        size += next.wire.size();
                        batch.push(next);
                    }
                    Ok(next) => {
                        carried = Some(next);
                        break;
                    }
                    Err(_) => break,
                }
            }
            send_batch(&sqs, &url, batch).await;
        }
    });
    tx
}

async fn send_batch(sqs: &aws_sdk_sqs::Client, url: &str, batch: Vec<SendRequest>) {
    let mut entries = Vec::with_capacity(batch.len());
    let mut waiting = Vec::with_capacity(batch.len());
    for (i, request) in batch.into_iter().enumerate() {
        let attributes = match sqs_attributes(&request.wire) {
            Ok(a) => a,
            Err(e) => {
                let _ = request.done.send(Err(e));
                continue;
            }
        };
        let mut entry = aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
            .id(i.to_string())
            .message_body(&request.wire.body)
            .set_message_attributes(Some(attributes));
        if let Some((group, dedup)) = &request.fifo {
            entry = entry
                .message_group_id(group)
                .message_deduplication_id(dedup);
        }
        if request.delay_secs > 0 {
            entry = entry.delay_seconds(request.delay_secs);
        }
        match entry.build() {
            Ok(entry) => {
                entries.push(entry);
                waiting.push((i.to_string(), request));
            }
            Err(e) => {
                let _ = request.done.send(Err(Error::with_source(
                    bus_core::ErrorKind::Serialization,
                    "a SendMessageBatch entry",
                    e,
                )));
            }
        }
    }
    if entries.is_empty() {
        return;
    }
    let result = sqs
        .send_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await;
    match result {
        Ok(out) => {
            let mut failed: HashMap<&str, (&str, Option<&str>)> = out
                .failed()
                .iter()
                .map(|f| (f.id(), (f.code(), f.message())))
                .collect();
            for (id, request) in waiting {
                let outcome = match failed.remove(id.as_str()) {
                    Some((code, message)) => Err(crate::error::batch_entry(
                        code,
                        message,
                        &format!("sending to {}", request.what),
                    )),
                    None => Ok(()),
                };
                let _ = request.done.send(outcome);
            }
        }
        Err(e) => {
            let kind = crate::error::kind_of(&e);
            let mut source = Some(e);
            for (_, request) in waiting {
                let doing = format!("sending to {}", request.what);
                let error = match source.take() {
                    Some(e) => map(e, &doing),
                    None => Error::new(kind, format!("{doing}: the batch call failed")),
                };
                let _ = request.done.send(Err(error));
            }
        }
    }
}

fn fifo_safe(value: &str) -> String {
    let ok = !value.is_empty() && value.len() <= 128 && value.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        value.to_owned()
    } else {
        format!("h-{:016x}", fnv1a(value.as_bytes()))
    }
}

/// Shared handle to [`Inner`].
pub(crate) type Shared = Arc<Inner>;

/// The SQS message attributes of `wire`.
pub(crate) fn sqs_attributes(
    wire: &Wire,
) -> Result<HashMap<String, aws_sdk_sqs::types::MessageAttributeValue>> {
    wire.attributes
        .iter()
        .map(|(name, value)| {
            aws_sdk_sqs::types::MessageAttributeValue::builder()
                .data_type(wire::STRING)
                .string_value(value)
                .build()
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::with_source(ErrorKind::Serialization, "message attribute", e))
        })
        .collect()
}

/// Sends one encoded message to the queue at `url`, through the queue's batcher: sends
/// waiting at the same time go out in one `SendMessageBatch` call.
pub(crate) async fn send_wire(
    inner: &Inner,
    url: &str,
    envelope: &Envelope,
    wire: Wire,
    what: &str,
) -> Result<()> {
    send_wire_delayed(inner, url, envelope, wire, 0, what).await
}

/// [`send_wire`] with SQS `DelaySeconds` (standard queues only; 0 for none).
pub(crate) async fn send_wire_delayed(
    inner: &Inner,
    url: &str,
    envelope: &Envelope,
    wire: Wire,
    delay_secs: i32,
    what: &str,
) -> Result<()> {
    let fifo = inner.fifo_ids(envelope);
    inner.send_batched(url, wire, fifo, delay_secs, what).await
}

/// A connection to SQS and SNS implementing every `bus` pattern.
///
/// Cheap to clone: clones share the SDK clients and caches. See the crate docs for how topics,
/// groups, queues, settlement and request-reply map onto SQS and SNS.
#[derive(Clone, Debug)]
pub struct SqsBroker {
    pub(crate) inner: Shared,
    pub(crate) replies: Arc<Replies>,
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
            // SQS DelaySeconds up to 15 minutes on a queue; through SNS, and beyond 15
            // minutes, the receive loops re-delay what comes early (module `delay`), so a
            // consumer outside `bus` sees such a message early.
            delayed_publish: if fifo {
                Support::Unsupported(
                    "SQS FIFO queues take no per-message DelaySeconds, and holding a message \
                     back in the queue would hold up every later message of its key",
                )
            } else {
                Support::Emulated
            },
            // Each hop is at most 15 minutes and a new message, so retention never runs out.
            max_delay: None,
            // ApproximateNumberOfMessages / …NotVisible / …Delayed.
            backlog: Support::Native,
        }
    }

    /// SQS's `ApproximateNumberOfMessages` (waiting), `…NotVisible` (in flight: received and
    /// not yet deleted, including what waits in a subscription's buffer, and a message a
    /// receiver is re-delaying) and `…Delayed` (sent with `DelaySeconds`, among them a delayed
    /// message between two hops) of the group's queue or the work queue, always
    /// `approximate`: SQS's counts lag by up to a minute on AWS. A message published with a
    /// delay through a topic waits visible in the group's queue until a receiver re-delays
    /// it, so it counts as waiting until then. SQS does not tell the age of the oldest
    /// message (CloudWatch's `ApproximateAgeOfOldestMessage` does): `oldest_age` is `None`.
    /// A group counts only once it has subscribed (its queue exists).
    async fn backlog(&self, of: &BacklogOf) -> Result<Backlog> {
        self.inner.check_open()?;
        let name = match of {
            BacklogOf::Group { topic, group } => self.inner.names.group_queue(topic, group),
            BacklogOf::Queue(queue) => self.inner.names.queue(queue),
            other => {
                return Err(Error::unsupported(format!(
                    "SQS cannot count the backlog of {other}"
                )))
            }
        };
        match self.inner.backlog(&name, of).await {
            // Deleted behind the cache: look it up again, once.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.inner.forget_queue(&name);
                self.inner.backlog(&name, of).await
            }
            other => other,
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
