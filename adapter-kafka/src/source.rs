//! Consuming: one consumer per subscription, on a thread of its own, feeding deliveries to
//! the async side; offsets committed per partition only as far as everything is settled.
//!
//! Each subscription runs an rdkafka `BaseConsumer` on a dedicated thread. The thread polls,
//! turns records into deliveries, and keeps per partition an [`OffsetTracker`]; it commits the
//! contiguous settled prefix every 100 ms, at revocation and at close. Partition assignments
//! get an epoch: a delivery settled after its partition was revoked changes nothing (the new
//! owner gets the message again, as at-least-once allows), and stale deliveries still buffered
//! are not handed out.
//!
//! The subscription reads the topic and its retry topic (`<topic>.retry`). A nack produces a
//! copy to the retry topic with the next attempt number, the time before which it must not
//! come back, and the group it is meant for; the consumer of that group holds it locally until
//! then. A dropped delivery is handed out again from memory (its offset was never committed),
//! and if the consumer dies first, the group reads it again from Kafka.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bus_core::middleware::dead_letter::{mark, DeadLetterInfo};
use bus_core::Redeliver;
use bus_core::{headers, Delivery, DeliverySource, Envelope, Error, Result, Settle, Settlement};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot, watch};

use crate::broker::Shared;
use crate::oauth::Auth;
use crate::offsets::OffsetTracker;
use crate::{error, fit, names, wire};

/// Where a group starts reading a partition it has never committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// At the end: what is published after the group first subscribed (topics).
    Latest,
    /// At the beginning: everything kept (queues).
    Earliest,
}

/// What to consume and how.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// The topic or queue name the user gave (the Kafka topic of the same name).
    pub(crate) source: String,
    /// The Kafka consumer group id.
    pub(crate) group: String,
    /// The group as deliveries report it.
    pub(crate) user_group: Option<String>,
    pub(crate) start: Start,
    pub(crate) prefetch: usize,
    /// Whether to read the retry topic too (not for reply inboxes).
    pub(crate) retries: bool,
    /// Whether the group is this subscription's own (`bus.private.*`): nobody else reads its
    /// offsets, so it is deleted from the broker when the subscription closes.
    pub(crate) private: bool,
}

/// Received records held while the subscriber is behind; past this, fetching pauses.
const STASH_LIMIT: usize = 1024;

struct PartState {
    epoch: u64,
    tracker: OffsetTracker,
    /// Records below this offset were fetched only because of the rewind (see `Ctx::assign`)
    /// and are skipped.
    floor: i64,
}

#[derive(Default)]
struct State {
    /// Per topic, per partition: looked up by `&str`, without a `String` made per record.
    parts: HashMap<String, HashMap<i32, PartState>>,
    next_epoch: u64,
    /// Assignments (rebalances) seen so far.
    assignments: u64,
    /// The most retry copies held waiting at once (what the bound on them is tested by).
    #[cfg(test)]
    peak_delayed: usize,
    /// The subscription is closing or closed: its last revocation keeps the trackers, so that
    /// deliveries settled after the close are still committed (see `KafkaSettle::settle`).
    closing: bool,
}

impl State {
    fn part(&self, topic: &str, partition: i32) -> Option<&PartState> {
        self.parts.get(topic)?.get(&partition)
    }

    fn part_mut(&mut self, topic: &str, partition: i32) -> Option<&mut PartState> {
        self.parts.get_mut(topic)?.get_mut(&partition)
    }

    fn is_current(&self, topic: &str, partition: i32, epoch: u64, offset: i64) -> bool {
        self.part(topic, partition)
            .is_some_and(|p| p.epoch == epoch && p.tracker.is_unsettled(offset))
    }

    fn settle(&mut self, topic: &str, partition: i32, epoch: u64, offset: i64) {
        if let Some(p) = self.part_mut(topic, partition) {
            if p.epoch == epoch {
                p.tracker.settle(offset);
            }
        }
    }

    /// The offsets to commit: every partition whose contiguous settled prefix moved since the
    /// last confirmed commit.
    fn to_commit(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (topic, parts) in &self.parts {
            for (partition, p) in parts {
                if let Some(offset) = p.tracker.to_commit() {
                    let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset));
                }
            }
        }
        tpl
    }

    fn mark_committed(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if let (Some(p), Offset::Offset(o)) =
                (self.part_mut(e.topic(), e.partition()), e.offset())
            {
                p.tracker.mark_committed(o);
            }
        }
    }
}

type SharedState = Arc<Mutex<State>>;

fn lock(state: &SharedState) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One received record, on its way to becoming a [`Delivery`].
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub(crate) envelope: Envelope,
    pub(crate) attempt: u32,
    topic: String,
    partition: i32,
    offset: i64,
    epoch: u64,
    pub(crate) reply_to: Option<String>,
    /// Why the record cannot be handed to a handler (see `wire::decode`).
    pub(crate) undecodable: Option<String>,
}

/// The consumer context: chooses start offsets at assignment and commits at revocation.
struct Ctx {
    state: SharedState,
    start: Start,
    rewind: i64,
    assigned: watch::Sender<u64>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    /// Hands out OAUTHBEARER tokens, served by the worker's polls.
    auth: Auth,
}

impl ClientContext for Ctx {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        config: Option<&str>,
    ) -> std::result::Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        self.auth.generate(config)
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                commit(consumer, &self.state);
                let mut state = lock(&self.state);
                if !state.closing {
                    state.parts.clear();
                }
                drop(state);
                let _ = consumer.unassign();
            }
            other => {
                tracing::warn!(error = ?other, "Kafka rebalance error");
                lock(&self.state).parts.clear();
                let _ = consumer.unassign();
            }
        }
    }
}

impl Ctx {
    /// Starts each assigned partition at the group's committed offset, or, for a group that
    /// never committed there, at the end (topics) or the beginning (queues), and commits that
    /// start at once: so a group receives everything published after it first subscribed,
    /// even if its first member leaves before anything arrives.
    ///
    /// The committed offsets and watermarks are fetched until the broker answers: a failed or
    /// slow fetch is never taken for "never committed", which would move a topic group to the
    /// end (skipping messages for good) or a queue group back to the beginning. If the
    /// subscription closes meanwhile, nothing is assigned.
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let Some(committed) = self.committed(consumer, tpl) else {
            return;
        };
        let mut assignment = TopicPartitionList::new();
        let mut first = TopicPartitionList::new();
        let mut starts = Vec::new();
        for e in tpl.elements() {
            let (topic, partition) = (e.topic(), e.partition());
            let known = committed
                .find_partition(topic, partition)
                .map(|c| c.offset());
            let (start, fresh) = match known {
                Some(Offset::Offset(o)) if o >= 0 => (o, false),
                _ => {
                    let Some((low, high)) = self.watermarks(consumer, topic, partition) else {
                        return;
                    };
                    let o = match self.start {
                        Start::Latest => high,
                        Start::Earliest => low,
                    };
                    let _ = first.add_partition_offset(topic, partition, Offset::Offset(o));
                    (o, true)
                }
            };
            // Fetch a little before a committed offset: brokers that only return record
            // batches starting at or after the fetch offset (tansu 0.6) would otherwise skip
            // the rest of the batch the offset falls in. The records before it are skipped here.
            let rewound = if fresh {
                start
            } else {
                (start - self.rewind).max(0)
            };
            let _ = assignment.add_partition_offset(topic, partition, Offset::Offset(rewound));
            starts.push(((topic.to_owned(), partition), start, fresh));
        }
        let first_committed = first.count() == 0
            || {
                match consumer.commit(&first, CommitMode::Sync) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "committing a new group's start offsets failed; will try again");
                        false
                    }
                }
            };
        {
            let mut state = lock(&self.state);
            state.parts.clear();
            for (key, start, fresh) in starts {
                state.next_epoch += 1;
                let epoch = state.next_epoch;
                let tracker = if fresh && !first_committed {
                    OffsetTracker::starting_uncommitted(start)
                } else {
                    OffsetTracker::starting_at(Some(start))
                };
                let (topic, partition) = key;
                state.parts.entry(topic).or_default().insert(
                    partition,
                    PartState {
                        epoch,
                        tracker,
                        floor: start,
                    },
                );
            }
            state.assignments += 1;
        }
        if let Err(e) = consumer.assign(&assignment) {
            tracing::warn!(error = %e, "assigning partitions failed");
        }
        self.assigned.send_modify(|n| *n += 1);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.shared.is_closed()
    }

    /// Calls `fetch` until it succeeds, backing off between attempts; `None` once the
    /// subscription is closing.
    fn until_answered<T>(&self, what: &str, mut fetch: impl FnMut() -> Option<T>) -> Option<T> {
        let mut pause = Duration::from_millis(100);
        loop {
            if let Some(answer) = fetch() {
                return Some(answer);
            }
            if self.stopping() {
                return None;
            }
            tracing::warn!("{what} failed; trying again in {pause:?}");
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// The group's committed offsets of every partition of `tpl`, as the broker answered them.
    fn committed(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
    ) -> Option<TopicPartitionList> {
        self.until_answered("fetching the group's committed offsets", || match consumer
            .committed_offsets(tpl.clone(), self.fetch_timeout())
        {
            Ok(committed) => {
                let complete = tpl.elements().iter().all(|e| {
                    committed
                        .find_partition(e.topic(), e.partition())
                        .is_some_and(|c| c.error().is_ok())
                });
                complete.then_some(committed)
            }
            Err(e) => {
                tracing::debug!(error = %e, "fetching committed offsets");
                None
            }
        })
    }

    /// The low and high watermarks of a partition.
    fn watermarks(
        &self,
        consumer: &BaseConsumer<Self>,
        topic: &str,
        partition: i32,
    ) -> Option<(i64, i64)> {
        self.until_answered("fetching watermarks", || {
            consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(5))
                .map_err(|e| tracing::debug!(error = %e, topic, partition, "fetching watermarks"))
                .ok()
        })
    }

    /// How long one fetch of committed offsets may take. Tests make the first ones time out
    /// at once, as a slow broker would.
    fn fetch_timeout(&self) -> Duration {
        #[cfg(test)]
        if self.shared.faults.take_offset_fetch_timeout() {
            return Duration::ZERO;
        }
        Duration::from_secs(10)
    }
}

/// Commits what moved, synchronously: an offset counts as committed only once the broker
/// confirmed it, and one that failed (lost in a rebalance, no coordinator) is committed again
/// next time. (rdkafka reports the outcome of an asynchronous commit made with explicit
/// offsets to nobody: librdkafka posts it only to a C callback rdkafka does not set.)
fn commit(consumer: &BaseConsumer<Ctx>, state: &SharedState) {
    let tpl = lock(state).to_commit();
    if tpl.count() == 0 {
        return;
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => lock(state).mark_committed(&tpl),
        Err(e) => tracing::debug!(error = %e, "committing offsets failed; will try again"),
    }
}

/// Starts consuming as `spec` says; returns once the consumer has its first assignment.
pub(crate) async fn open(shared: &Arc<Shared>, spec: Spec) -> Result<KafkaSource> {
    shared.check_open()?;
    names::check_topic(&spec.source)?;
    let retry = names::retry_topic(&spec.source);
    let mut topics = vec![spec.source.as_str()];
    if spec.retries {
        topics.push(retry.as_str());
    }
    shared.ensure_topics(&topics, None).await?;

    // Deliveries of an earlier subscription of this group, dropped after it closed, are being
    // handed back (and their offsets committed): join once that is done, or they and the
    // acked ones after them would come again.
    let mut handbacks = shared.handbacks(&spec.group).subscribe();
    let _ = tokio::time::timeout(Duration::from_secs(10), handbacks.wait_for(|n| *n == 0)).await;

    let state: SharedState = Arc::default();
    let (assigned_tx, mut assigned_rx) = watch::channel(0u64);
    let stop = Arc::new(AtomicBool::new(false));
    let ctx = Ctx {
        state: state.clone(),
        start: spec.start,
        rewind: shared.config.fetch_rewind,
        assigned: assigned_tx,
        shared: shared.clone(),
        stop: stop.clone(),
        auth: Auth::new(shared.config.token_provider()),
    };
    let consumer: BaseConsumer<Ctx> = shared
        .config
        .consumer_config(&spec.group)?
        .create_with_context(ctx)
        .map_err(|e| error::map(e, "creating a Kafka consumer"))?;
    consumer
        .subscribe(&topics)
        .map_err(|e| error::map(e, format!("subscribing to {topics:?}")))?;

    let prefetch = spec.prefetch.max(1);
    let (tx, rx) = mpsc::channel(prefetch);
    let (redeliver_tx, redeliver_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = oneshot::channel();
    let worker = Worker {
        consumer,
        state: state.clone(),
        tx,
        stop: stop.clone(),
        shared: shared.clone(),
        group: spec.group.clone(),
        retry_topic: retry,
        stash: VecDeque::new(),
        delayed: BTreeMap::new(),
        max_delayed: shared.config.max_delayed.max(1),
        seq: 0,
        paused: HashSet::new(),
        applied: (false, false),
        seen_assignments: 0,
        rewind: shared.config.fetch_rewind,
        private: spec.private,
    };
    thread::Builder::new()
        .name(format!("bus-kafka-{}", spec.source))
        .spawn(move || {
            worker.run();
            let _ = done_tx.send(());
        })
        .map_err(|e| {
            Error::with_source(
                bus_core::ErrorKind::Other,
                "spawning the consumer thread",
                e,
            )
        })?;

    // The group's start is fixed at the first assignment: wait for it, so that what is
    // published after subscribe returns is received.
    let wait = Duration::from_millis(shared.config.session_timeout_ms) * 3;
    if tokio::time::timeout(wait, assigned_rx.wait_for(|n| *n > 0))
        .await
        .is_err()
    {
        tracing::warn!(
            group = spec.group,
            "no partition assignment within {wait:?}; the subscription starts anyway"
        );
    }
    Ok(KafkaSource {
        shared: shared.clone(),
        names: Names {
            source: spec.source.as_str().into(),
            group: spec.group.as_str().into(),
            user_group: spec.user_group.as_deref().map(Arc::from),
        },
        spec,
        state,
        rx,
        redeliver_tx,
        redeliver_rx,
        stop,
        done: Some(done_rx),
        closed: shared.closed_tx.subscribe(),
        late_commits: Arc::default(),
    })
}

struct Worker {
    consumer: BaseConsumer<Ctx>,
    state: SharedState,
    tx: mpsc::Sender<Item>,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    group: String,
    retry_topic: String,
    /// Received, due, waiting for room in the channel.
    stash: VecDeque<Item>,
    /// Retry copies waiting for their not-before time.
    delayed: BTreeMap<(SystemTime, u64), Item>,
    /// How many retry copies may wait in `delayed`; at the bound the retry topic pauses.
    max_delayed: usize,
    seq: u64,
    /// The partitions this consumer paused.
    paused: HashSet<(String, i32)>,
    /// (behind, delayed full) as last applied by `flow_control`.
    applied: (bool, bool),
    /// The assignment `paused` refers to (`State::assignments`).
    seen_assignments: u64,
    rewind: i64,
    private: bool,
}

impl Worker {
    fn run(mut self) {
        let mut last_commit = Instant::now();
        while !self.stop.load(Ordering::SeqCst) && !self.shared.is_closed() {
            self.release_due();
            if !self.forward() {
                break;
            }
            self.flow_control();
            if last_commit.elapsed() >= Duration::from_millis(100) {
                commit(&self.consumer, &self.state);
                last_commit = Instant::now();
            }
            match self.consumer.poll(Duration::from_millis(50)) {
                Some(Ok(message)) => {
                    if let Some((item, not_before)) =
                        route(&self.state, &self.group, &self.retry_topic, &message)
                    {
                        match not_before {
                            Some(at) => {
                                self.seq += 1;
                                self.delayed.insert((at, self.seq), item);
                                #[cfg(test)]
                                {
                                    let mut state = lock(&self.state);
                                    state.peak_delayed = state.peak_delayed.max(self.delayed.len());
                                }
                            }
                            None => self.stash.push_back(item),
                        }
                    }
                }
                Some(Err(e)) => tracing::debug!(error = %e, "Kafka consumer error"),
                None => {}
            }
        }
        lock(&self.state).closing = true;
        commit(&self.consumer, &self.state);
        // Dropping the consumer leaves the group; the revocation commits once more.
        let Worker {
            consumer,
            shared,
            group,
            private,
            ..
        } = self;
        drop(consumer);
        if private {
            // Nobody else reads a private group's offsets: remove it rather than leave it to
            // the broker's offset retention.
            if let Err(e) = futures::executor::block_on(shared.delete_group(&group)) {
                tracing::debug!(error = %e, group, "deleting a private group failed");
            }
        }
    }

    fn release_due(&mut self) {
        let now = SystemTime::now();
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.stash.push_back(entry.remove());
        }
    }

    /// Moves stashed items into the channel while it has room; `false` once the source is gone.
    fn forward(&mut self) -> bool {
        while let Some(item) = self.stash.pop_front() {
            match self.tx.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    self.stash.push_front(item);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    }

    /// Pauses fetching while the subscriber is behind (every partition), or while as many
    /// retry copies wait for their time as `max_delayed` allows (the retry topic's
    /// partitions), so memory stays bounded; resumes each where this consumer stopped reading.
    fn flow_control(&mut self) {
        let wanted = (
            self.stash.len() > STASH_LIMIT,
            self.delayed.len() >= self.max_delayed,
        );
        let assignments = lock(&self.state).assignments;
        let reassigned = assignments != self.seen_assignments;
        if !reassigned && wanted == self.applied {
            return;
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        if reassigned {
            // A new assignment starts where `Ctx::assign` put it, unpaused.
            self.paused.clear();
            let _ = self.consumer.resume(&assignment);
            self.seen_assignments = assignments;
        }
        let (behind, delayed_full) = wanted;
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        for e in assignment.elements() {
            let key = (e.topic().to_owned(), e.partition());
            let want = behind || (delayed_full && e.topic() == self.retry_topic);
            match (want, self.paused.contains(&key)) {
                (true, false) => {
                    pause.add_partition(e.topic(), e.partition());
                }
                (false, true) => {
                    resume.add_partition(e.topic(), e.partition());
                }
                _ => {}
            }
        }
        if pause.count() > 0 {
            if self.consumer.pause(&pause).is_err() {
                return;
            }
            for e in pause.elements() {
                self.paused.insert((e.topic().to_owned(), e.partition()));
            }
        }
        if resume.count() > 0 {
            if self.consumer.resume(&resume).is_err() {
                return;
            }
            for e in resume.elements() {
                self.paused.remove(&(e.topic().to_owned(), e.partition()));
                self.reposition(e.topic(), e.partition());
            }
        }
        self.applied = wanted;
    }

    /// Points a resumed partition back to where this consumer stopped reading it.
    /// librdkafka resumes at the offset after the last record polled; a broker that returns
    /// only the record batches starting at or after the fetch offset (tansu) would skip the
    /// rest of that record's batch. So fetching restarts `fetch_rewind` offsets earlier and
    /// the records already seen are skipped.
    fn reposition(&self, topic: &str, partition: i32) {
        if self.rewind == 0 {
            return;
        }
        let next = {
            let mut state = lock(&self.state);
            let Some(p) = state.part_mut(topic, partition) else {
                return;
            };
            let Some(next) = p.tracker.next() else {
                return;
            };
            p.floor = p.floor.max(next);
            next
        };
        let from = Offset::Offset((next - self.rewind).max(0));
        if let Err(e) = self.consumer.seek(topic, partition, from, Duration::ZERO) {
            tracing::warn!(error = %e, topic, partition, "seeking a resumed partition failed");
        }
    }
}

/// Turns a record into an item for this consumer, with its not-before time if it must wait;
/// `None` for records that are not for it (another group's retries, revoked partitions).
fn route<M: Message>(
    state: &SharedState,
    group: &str,
    retry_topic: &str,
    message: &M,
) -> Option<(Item, Option<SystemTime>)> {
    let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
    let record = wire::Record::of(message);
    let received = SystemTime::now();
    // Decoding cannot panic; if it ever did, the consumer thread would end and the
    // subscription with it, so the record is dead-lettered instead.
    let wire::Decoded {
        envelope,
        internal,
        undecodable,
    } = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wire::decode(&record, received)
    }))
    .unwrap_or_else(|panic| {
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        wire::salvage(&record, received, &text)
    });
    let is_retry = topic == retry_topic;
    // A delayed publish on the retry topic is for every group, at its first attempt.
    let delayed_publish = is_retry && internal.delayed.is_some() && internal.retry_group.is_none();
    let epoch = {
        let mut state = lock(state);
        let p = state.part_mut(topic, partition)?;
        if offset < p.floor {
            return None;
        }
        p.tracker.track(offset);
        if is_retry && !delayed_publish && internal.retry_group.as_deref() != Some(group) {
            // Another group's retry: nothing to do here.
            p.tracker.settle(offset);
            return None;
        }
        p.epoch
    };
    let attempt = if is_retry && !delayed_publish {
        internal.attempt.unwrap_or(2).max(2)
    } else {
        1
    };
    let not_before = internal
        .not_before
        .filter(|at| is_retry && *at > SystemTime::now());
    let item = Item {
        envelope,
        attempt,
        topic: topic.to_owned(),
        partition,
        offset,
        epoch,
        reply_to: internal.reply_to,
        undecodable,
    };
    Some((item, not_before))
}

/// The `bus-not-before` of a retry copy nacked at `now` with `redeliver`: a delay is capped at
/// [`headers::MAX_DELAY`] (a nack with `Duration::MAX` parks the message for a hundred years)
/// and rounded up to the millisecond the header keeps, so the wait is never shorter.
fn not_before(now: SystemTime, redeliver: Redeliver) -> String {
    let delay = match redeliver {
        Redeliver::After(d) => d.min(headers::MAX_DELAY),
        _ => Duration::ZERO,
    };
    let round_up = if delay.is_zero() {
        delay
    } else {
        Duration::from_millis(1)
    };
    headers::format_time(headers::saturating_add(now, delay + round_up))
}

/// The async side of a subscription.
pub(crate) struct KafkaSource {
    shared: Arc<Shared>,
    spec: Spec,
    /// The spec's names, made once: every delivery and its settlement share them.
    names: Names,
    state: SharedState,
    rx: mpsc::Receiver<Item>,
    redeliver_tx: mpsc::UnboundedSender<Item>,
    redeliver_rx: mpsc::UnboundedReceiver<Item>,
    stop: Arc<AtomicBool>,
    done: Option<oneshot::Receiver<()>>,
    closed: watch::Receiver<bool>,
    late_commits: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("source", &self.spec.source)
            .field("group", &self.spec.group)
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// The next item still owned by this consumer, with its delivery.
    pub(crate) async fn next_item(&mut self) -> Option<(Delivery, Option<String>)> {
        loop {
            if *self.closed.borrow() || self.stop.load(Ordering::SeqCst) {
                return None;
            }
            let item = tokio::select! {
                biased;
                item = self.redeliver_rx.recv() => item,
                item = self.rx.recv() => match item {
                    Some(item) => Some(item),
                    None => return None,
                },
                _ = self.closed.changed() => return None,
            };
            let Some(item) = item else { continue };
            let current =
                lock(&self.state).is_current(&item.topic, item.partition, item.epoch, item.offset);
            if !current {
                continue;
            }
            let reply_to = item.reply_to.clone();
            let undecodable = item.undecodable.clone();
            let mut delivery = Delivery::with_shared_names(
                item.envelope.clone(),
                item.attempt,
                self.names.source.clone(),
                self.names.user_group.clone(),
                Box::new(KafkaSettle {
                    shared: self.shared.clone(),
                    state: self.state.clone(),
                    redeliver: self.redeliver_tx.clone(),
                    names: self.names.clone(),
                    item,
                    late_commits: self.late_commits.clone(),
                    private: self.spec.private,
                }),
            );
            if let Some(reason) = undecodable {
                delivery = delivery.with_undecodable(reason);
            }
            return Some((delivery, reply_to));
        }
    }

    /// Stops the consumer thread and waits (up to 30 s) until it has committed and left.
    pub(crate) async fn shut_down(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), done).await;
        }
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl DeliverySource for KafkaSource {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.next_item().await.map(|(d, _)| Ok(d))
    }

    async fn close(&mut self) -> Result<()> {
        self.shut_down().await;
        Ok(())
    }

    /// A partition is read in offset order, and a key always maps to one partition.
    fn keeps_key_order(&self) -> bool {
        true
    }
}

/// A subscription's names, shared by its deliveries and their settlements.
#[derive(Clone)]
struct Names {
    /// The topic or queue name the user gave.
    source: Arc<str>,
    /// The Kafka consumer group id.
    group: Arc<str>,
    /// The group as deliveries report it.
    user_group: Option<Arc<str>>,
}

/// Settles one delivery: marks its offset settled, after producing the retry copy or the dead
/// letter it needs.
#[derive(Clone)]
struct KafkaSettle {
    shared: Arc<Shared>,
    state: SharedState,
    redeliver: mpsc::UnboundedSender<Item>,
    names: Names,
    item: Item,
    /// Serialises the commits made after the close, so an older offset never lands last.
    late_commits: Arc<tokio::sync::Mutex<()>>,
    /// The group is the subscription's own, deleted when it closed: nothing is committed or
    /// handed back to it after the close.
    private: bool,
}

impl std::fmt::Debug for KafkaSettle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettle")
            .field("topic", &self.item.topic)
            .field("partition", &self.item.partition)
            .field("offset", &self.item.offset)
            .finish_non_exhaustive()
    }
}

impl KafkaSettle {
    fn mark_settled(&self) {
        self.mark_settled_in(&mut lock(&self.state));
    }

    /// [`mark_settled`](Self::mark_settled) under a lock the caller holds.
    fn mark_settled_in(&self, state: &mut State) {
        let i = &self.item;
        state.settle(&i.topic, i.partition, i.epoch, i.offset);
    }

    /// After the subscription closed, its consumer no longer commits: a delivery settled now
    /// is committed here, by a short-lived client of the same group (a plain offset commit,
    /// which Kafka accepts for a group; at worst a later member sees a duplicate, never a
    /// loss, since only the contiguous settled prefix is committed).
    async fn commit_after_close(&self) {
        if self.private || !lock(&self.state).closing {
            return;
        }
        let _serial = self.late_commits.lock().await;
        let tpl = {
            let state = lock(&self.state);
            if !state.closing {
                return;
            }
            state.to_commit()
        };
        if tpl.count() == 0 {
            return;
        }
        let config = match self.shared.config.consumer_config(&self.names.group) {
            Ok(config) => config,
            Err(e) => {
                tracing::debug!(error = %e, "committing after close failed");
                return;
            }
        };
        let auth = Auth::new(self.shared.config.token_provider());
        let state = self.state.clone();
        let result = tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer<Auth> = config.create_with_context(auth.clone())?;
            // Nothing polls this consumer: its token must be served before the commit, which
            // would otherwise fail, never logged in (tests/tls.rs checks it lands).
            auth.prime(Duration::from_secs(10), || {
                let _ = consumer.poll(Duration::from_millis(50));
            });
            consumer.commit(&tpl, CommitMode::Sync)?;
            lock(&state).mark_committed(&tpl);
            Ok::<_, rdkafka::error::KafkaError>(())
        })
        .await;
        if let Ok(Err(e)) = result {
            tracing::debug!(error = %e, "committing after close failed");
        }
    }
}

impl KafkaSettle {
    /// Produces `dead` to `dlq`, cut to fit what the producer sends (`message.max.bytes`) if
    /// it is larger ([`fit::dead_letter`]); if the broker still refuses it as too large (its
    /// own limit is lower), cut to fit less: a message that can be neither handled nor
    /// dead-lettered would come back forever.
    async fn send_dead_letter(&self, dlq: &str, dead: &Envelope) -> Result<()> {
        let origin = format!(
            "{}/{}@{}",
            self.item.topic, self.item.partition, self.item.offset
        );
        let budgets = [
            self.shared.config.max_record_bytes(),
            64 * 1024,
            fit::MIN_BUDGET,
        ];
        let mut result = Ok(());
        for budget in budgets {
            let fitted = fit::dead_letter(dead, budget, &self.shared.source, &origin);
            result = self.shared.send(dlq, &fitted, &[]).await;
            match &result {
                Err(e) if e.kind() == bus_core::ErrorKind::PayloadTooLarge => {
                    tracing::warn!(
                        error = %e,
                        record = origin,
                        budget,
                        "dead letter too large for Kafka; cutting it to fit less"
                    );
                }
                _ => break,
            }
        }
        result
    }
}

#[async_trait]
impl Settle for KafkaSettle {
    /// An ack only marks the offset settled, for the consumer's next commit: done at once,
    /// except after a group subscription closed (a commit of its own, in `settle`). Nacks and
    /// rejects (a produce) take `settle`.
    fn try_settle(&self, settlement: &Settlement) -> Option<Result<()>> {
        if *settlement != Settlement::Ack {
            return None;
        }
        let mut state = lock(&self.state);
        if state.closing && !self.private {
            return None;
        }
        self.mark_settled_in(&mut state);
        Some(Ok(()))
    }

    async fn settle(&self, settlement: Settlement) -> Result<()> {
        match settlement {
            Settlement::Ack => {}
            Settlement::Nack(redeliver) => {
                let not_before = not_before(SystemTime::now(), redeliver);
                let attempt = self.item.attempt.saturating_add(1).to_string();
                let retry = names::retry_topic(&self.names.source);
                self.shared.ensure_topics(&[&retry], None).await?;
                self.shared
                    .send(
                        &retry,
                        &self.item.envelope,
                        &[
                            (headers::ATTEMPT, &attempt),
                            (wire::NOT_BEFORE, &not_before),
                            (wire::RETRY_GROUP, &self.names.group),
                            (wire::RETRY_ORIGIN, &self.names.source),
                        ],
                    )
                    .await?;
            }
            Settlement::Reject { reason, attempts } => {
                let dlq = headers::dead_letter_queue(&self.names.source);
                let dead = mark(
                    self.item.envelope.clone(),
                    &DeadLetterInfo {
                        reason: &reason,
                        source: &self.names.source,
                        group: self.names.user_group.as_deref(),
                        attempts: attempts.max(self.item.attempt),
                        first_failure: None,
                    },
                );
                self.shared.ensure_topics(&[&dlq], None).await?;
                self.send_dead_letter(&dlq, &dead).await?;
            }
            _ => return Err(Error::unsupported("unknown settlement")),
        }
        self.mark_settled();
        self.commit_after_close().await;
        Ok(())
    }

    fn abandon(&self) {
        if lock(&self.state).closing {
            if self.private {
                return;
            }
            // The subscription is closed: nobody here will take it again. Hand it to the
            // group through the retry topic (then its offset, and the acked ones after it,
            // can be committed). Without a runtime the offset simply stays uncommitted.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let settle = self.clone();
                let pending = self.shared.handbacks(&self.names.group);
                pending.send_modify(|n| *n += 1);
                runtime.spawn(async move {
                    if let Err(e) = settle.settle(Settlement::Nack(Redeliver::Now)).await {
                        tracing::debug!(error = %e, "handing back a dropped delivery failed");
                    }
                    pending.send_modify(|n| *n -= 1);
                });
            }
            return;
        }
        let mut again = self.item.clone();
        again.attempt = again.attempt.saturating_add(1);
        // Handed out again from memory while this consumer still owns the partition; after a
        // revocation the offset is uncommitted, so the group reads it again from Kafka.
        let _ = self.redeliver.send(again);
    }
}

#[cfg(test)]
mod broker_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// Before the fix a huge delay saturated at the year 9999 instead of the common cap.
    #[test]
    fn nack_delays_are_capped_at_max_delay() {
        let now = std::time::UNIX_EPOCH + Duration::from_millis(1_764_000_000_000);
        let capped = headers::format_time(now + headers::MAX_DELAY + Duration::from_millis(1));
        assert_eq!(not_before(now, Redeliver::After(Duration::MAX)), capped);
        assert_eq!(
            not_before(now, Redeliver::After(headers::MAX_DELAY * 2)),
            capped
        );
        assert_eq!(
            not_before(now, Redeliver::After(Duration::from_micros(1))),
            headers::format_time(now + Duration::from_millis(1))
        );
        assert_eq!(not_before(now, Redeliver::Now), headers::format_time(now));
    }
}
