//! Receiving: concurrent long-polling loops per subscription, a buffer the subscription reads
//! from, and settlement through delete, visibility changes and the dead-letter queue.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, Message,
    MessageSystemAttributeName,
};
use bus_core::middleware::dead_letter::{mark, DeadLetterInfo};
use bus_core::{
    headers, Delivery, DeliverySource, Error, ErrorKind, Redeliver, Result, Settle, Settlement,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::broker::{send_wire, QueueRole, Shared};
use crate::config::SQS_MAX_VISIBILITY_SECS;
use crate::delay;
use crate::error::{batch_entry, map};
use crate::wire;

/// The queue a subscription reads and what its deliveries report.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The topic or queue name deliveries report as their source, and their group: shared by
    /// every delivery and its settlement, never copied per message.
    pub(crate) source: Arc<str>,
    pub(crate) group: Option<Arc<str>>,
    pub(crate) queue_name: String,
    pub(crate) url: String,
    /// For a private subscription: its SNS subscription ARN; the queue is deleted on close.
    pub(crate) private: Option<String>,
}

/// The pause between empty receives when long polling is off (`wait_time_secs = 0`).
const SHORT_POLL_PAUSE: Duration = Duration::from_millis(50);

/// One acknowledgement waiting for a `DeleteMessageBatch`.
type AckRequest = (String, oneshot::Sender<Result<()>>);

/// What the buffer holds: a received delivery and its number in [`Buffered`], or a receive
/// error.
type Item = Result<(u64, Delivery)>;

/// A delivery's turn at its visibility: the buffer's extender holds it while it extends the
/// delivery, settlement and `in_progress` take it first, so an extension never lands after
/// (and undoes) a nack's visibility or follows a delete.
type Turn = Arc<tokio::sync::Mutex<()>>;

/// The deliveries received and waiting in a subscription's buffer, which nobody else extends
/// yet: the subscription extends their visibility until `next()` hands them out (from then on
/// the holder does, the `Consumer` at a third of the lease).
#[derive(Default)]
struct Buffered {
    next: u64,
    waiting: HashMap<u64, Waiting>,
}

/// One delivery waiting in the buffer.
struct Waiting {
    receipt: String,
    /// When it was received (SQS refuses a visibility reaching beyond 12 hours from then).
    received: Instant,
    /// When its visibility was last set.
    extended: Instant,
    turn: Turn,
}

/// The receiving side of a subscription or queue consumer.
pub(crate) struct SqsSource {
    inner: Shared,
    target: Target,
    rx: mpsc::Receiver<Item>,
    /// Received deliveries not yet handed out, extended while they wait.
    buffered: Arc<Mutex<Buffered>>,
    stop: watch::Sender<bool>,
    /// Set by the first `next()`: pollers receive nothing before somebody asks, so a
    /// subscription opened and closed unused takes no message (and adds no receive count).
    demand: watch::Sender<bool>,
    /// `true` once closed; pollers hand deliveries to the buffer only under this lock while it
    /// is `false`, so nothing lands in the buffer of a closed subscription.
    gate: Arc<Mutex<bool>>,
    broker_closed: watch::Receiver<bool>,
    closed: bool,
}

impl fmt::Debug for SqsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsSource")
            .field("target", &self.target)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

/// Starts the pollers of `target`, buffering up to `prefetch` received deliveries.
pub(crate) fn start(inner: Shared, target: Target, prefetch: usize) -> SqsSource {
    let prefetch = prefetch.max(1);
    let (tx, rx) = mpsc::channel(prefetch);
    let (stop, _) = watch::channel(false);
    let (demand, _) = watch::channel(false);
    let gate = Arc::new(Mutex::new(false));
    let buffered = Arc::new(Mutex::new(Buffered::default()));
    let acks = spawn_acker(inner.clone(), target.url.clone());
    let per_call = prefetch.min(inner.config.batch_size as usize).max(1);
    // On FIFO queues one loop per subscription: SQS hands a message group to one receive at a
    // time anyway, and one loop fills the buffer in the order SQS returned the messages.
    let pollers = if inner.config.fifo {
        1
    } else {
        inner.config.pollers.max(1)
    };
    for _ in 0..pollers {
        let poller = Poller {
            inner: inner.clone(),
            target: target.clone(),
            tx: tx.clone(),
            stop: stop.subscribe(),
            demand: demand.subscribe(),
            gate: gate.clone(),
            buffered: buffered.clone(),
            broker_closed: inner.closed_signal(),
            acks: acks.clone(),
            per_call,
            receive_lock: inner.receive_lock(&target.url),
        };
        tokio::spawn(poller.run());
    }
    if inner.config.visibility() > 0 {
        tokio::spawn(extend_buffered(
            inner.clone(),
            target.url.clone(),
            Arc::downgrade(&buffered),
            stop.subscribe(),
            inner.closed_signal(),
        ));
    }
    SqsSource {
        broker_closed: inner.closed_signal(),
        inner,
        target,
        rx,
        buffered,
        stop,
        demand,
        gate,
        closed: false,
    }
}

struct Poller {
    inner: Shared,
    target: Target,
    tx: mpsc::Sender<Item>,
    stop: watch::Receiver<bool>,
    demand: watch::Receiver<bool>,
    gate: Arc<Mutex<bool>>,
    buffered: Arc<Mutex<Buffered>>,
    broker_closed: watch::Receiver<bool>,
    acks: mpsc::UnboundedSender<AckRequest>,
    per_call: usize,
    /// On FIFO queues, the connection's lock around every receive from this queue.
    receive_lock: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl Poller {
    fn stopped(&self) -> bool {
        *self.stop.borrow() || *self.broker_closed.borrow()
    }

    async fn run(mut self) {
        tokio::select! {
            asked = self.demand.wait_for(|asked| *asked) => if asked.is_err() { return },
            _ = self.stop.wait_for(|stop| *stop) => return,
            _ = self.broker_closed.wait_for(|closed| *closed) => return,
        }
        let mut backoff = Duration::from_millis(100);
        while !self.stopped() {
            // Receive only what the buffer has room for, so that nothing received waits
            // unseen while its visibility timeout runs.
            let permits = tokio::select! {
                permits = self.tx.reserve_many(self.per_call) => match permits {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = self.stop.changed() => continue,
                _ = self.broker_closed.changed() => continue,
            };
            let _one_at_a_time = match &self.receive_lock {
                Some(lock) => Some(lock.lock().await),
                None => None,
            };
            let received = self
                .inner
                .sqs
                .receive_message()
                .queue_url(&self.target.url)
                .max_number_of_messages(i32::try_from(self.per_call).unwrap_or(10))
                .wait_time_seconds(i32::try_from(self.inner.config.wait_time_secs).unwrap_or(20))
                .visibility_timeout(self.inner.config.visibility())
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
                .send()
                .await;
            match received {
                Ok(out) => {
                    backoff = Duration::from_millis(100);
                    if out.messages().is_empty() && self.inner.config.wait_time_secs == 0 {
                        // Short polling: do not spin on an empty queue.
                        tokio::select! {
                            () = tokio::time::sleep(SHORT_POLL_PAUSE) => {}
                            _ = self.stop.changed() => {}
                            _ = self.broker_closed.changed() => {}
                        }
                        continue;
                    }
                    let now = std::time::SystemTime::now();
                    let mut deliveries = Vec::with_capacity(out.messages().len());
                    for message in out.messages() {
                        // A delayed message not yet due goes back to the queue, unseen.
                        match delay::early(message, now).filter(|_| !self.inner.config.fifo) {
                            Some(due) => {
                                tokio::spawn(delay::redelay(
                                    self.inner.clone(),
                                    self.target.url.clone(),
                                    message.clone(),
                                    due,
                                ));
                            }
                            None => deliveries.push(self.delivery(message)),
                        }
                    }
                    let gate = self.gate.lock().expect("subscription gate");
                    if *gate {
                        drop(gate);
                        // Closed meanwhile: dropping them hands each back to SQS at once.
                        drop(deliveries);
                        return;
                    }
                    let mut buffered = self.buffered.lock().expect("buffered deliveries");
                    for ((delivery, waiting), permit) in deliveries.into_iter().zip(permits) {
                        let number = buffered.next;
                        buffered.next += 1;
                        buffered.waiting.insert(number, waiting);
                        permit.send(Ok((number, delivery)));
                    }
                }
                Err(e) => {
                    let error = map(e, &format!("receiving from `{}`", self.target.queue_name));
                    if self.stopped() {
                        return;
                    }
                    let gone = error.kind() == ErrorKind::NotFound;
                    if gone {
                        self.inner.forget_queue(&self.target.queue_name);
                    }
                    if let Some(permit) = permits.into_iter().next() {
                        permit.send(Err(error));
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = self.stop.changed() => {}
                        _ = self.broker_closed.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The delivery of `message`: always one, marked undecodable when it cannot be read (the
    /// consumer dead-letters it), so that no message stays in the queue unread. With it, its
    /// entry in the buffer's extension list.
    fn delivery(&self, message: &Message) -> (Delivery, Waiting) {
        let receipt = message.receipt_handle().unwrap_or_default().to_owned();
        let received = Instant::now();
        let turn = Turn::default();
        let attempt = message
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(1);
        let decoded = wire::decode(wire::Received::from_message(message));
        let mut envelope = decoded.envelope;
        if let Some(reply_to) = decoded.reply_to {
            // Only requests carry it; the responder side takes it out again.
            envelope.headers.insert(wire::REPLY_TO.into(), reply_to);
        }
        if let Some(reason) = &decoded.undecodable {
            tracing::warn!(
                queue = %self.target.queue_name,
                id = %envelope.id,
                %reason,
                "received a message that does not decode"
            );
        }
        let settle = SqsSettle {
            inner: self.inner.clone(),
            url: self.target.url.clone(),
            receipt,
            message_id: message.message_id().map(str::to_owned),
            envelope: envelope.clone(),
            source: self.target.source.clone(),
            group: self.target.group.clone(),
            attempt,
            received,
            turn: turn.clone(),
            acks: self.acks.clone(),
        };
        let waiting = Waiting {
            receipt: settle.receipt.clone(),
            received,
            extended: received,
            turn,
        };
        let delivery = Delivery::with_shared_names(
            envelope,
            attempt,
            self.target.source.clone(),
            self.target.group.clone(),
            Box::new(settle),
        );
        let delivery = match decoded.undecodable {
            Some(reason) => delivery.with_undecodable(reason),
            None => delivery,
        };
        (delivery, waiting)
    }
}

/// Keeps the deliveries waiting in a subscription's buffer invisible: at a third of the
/// visibility timeout, every one whose visibility was set more than a sixth of it ago gets the
/// whole timeout again (`ChangeMessageVisibilityBatch`, 10 per call), up to SQS's 12 hours
/// from its receive. Without it a slow consumer's buffered messages would come back to the
/// queue while they wait, and arrive twice with inflated attempts. Ends with the subscription.
async fn extend_buffered(
    inner: Shared,
    url: String,
    buffered: Weak<Mutex<Buffered>>,
    mut stop: watch::Receiver<bool>,
    mut broker_closed: watch::Receiver<bool>,
) {
    let timeout = inner
        .config
        .visibility_timeout_secs
        .min(SQS_MAX_VISIBILITY_SECS);
    let every = Duration::from_secs(timeout.into()) / 3;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|stop| *stop) => return,
            _ = broker_closed.wait_for(|closed| *closed) => return,
        }
        let Some(buffered) = buffered.upgrade() else {
            return;
        };
        // Each delivery's turn is taken while it is still in the buffer: once `next()` has
        // handed it out, its holder settles or extends it, never this task.
        let due: Vec<(u64, String, u32, tokio::sync::OwnedMutexGuard<()>)> = {
            let buffered = buffered.lock().expect("buffered deliveries");
            buffered
                .waiting
                .iter()
                .filter(|(_, w)| w.extended.elapsed() >= every / 2)
                .filter_map(|(number, w)| {
                    let seconds = timeout.min(visibility_left(w.received));
                    let turn = w.turn.clone().try_lock_owned().ok()?;
                    (seconds > 0).then(|| (*number, w.receipt.clone(), seconds, turn))
                })
                .collect()
        };
        for chunk in due.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, (_, receipt, seconds, _))| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(receipt)
                        .visibility_timeout(i32::try_from(*seconds).unwrap_or(0))
                        .build()
                        .ok()
                })
                .collect();
            let started = Instant::now();
            match inner
                .sqs
                .change_message_visibility_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(out) => {
                    for failed in out.failed() {
                        tracing::warn!(
                            queue = %url,
                            code = failed.code(),
                            message = failed.message().unwrap_or_default(),
                            "extending the visibility of a buffered message failed"
                        );
                    }
                    let mut buffered = buffered.lock().expect("buffered deliveries");
                    for (i, (number, ..)) in chunk.iter().enumerate() {
                        let id = i.to_string();
                        if out.failed().iter().all(|f| f.id() != id) {
                            if let Some(w) = buffered.waiting.get_mut(number) {
                                w.extended = started;
                            }
                        }
                    }
                }
                Err(e) => {
                    let error = map(e, "extending the visibility of buffered messages");
                    tracing::warn!(queue = %url, %error, "extending buffered messages failed");
                }
            }
        }
    }
}

/// Seconds of visibility SQS still accepts for a message received at `received` (12 hours
/// from the receive, less a second of margin).
fn visibility_left(received: Instant) -> u32 {
    let elapsed = u32::try_from(received.elapsed().as_secs()).unwrap_or(u32::MAX);
    SQS_MAX_VISIBILITY_SECS.saturating_sub(elapsed.saturating_add(1))
}

/// `DeleteMessageBatch` calls in flight at once per subscription.
const ACK_CALLS_IN_FLIGHT: usize = 4;

/// Collects acknowledgements into `DeleteMessageBatch` calls: whatever is waiting when a call
/// can start, up to the batch size, goes in it; up to [`ACK_CALLS_IN_FLIGHT`] calls at once.
/// Ends when every settle handle is gone.
fn spawn_acker(inner: Shared, url: String) -> mpsc::UnboundedSender<AckRequest> {
    let (tx, mut rx) = mpsc::unbounded_channel::<AckRequest>();
    tokio::spawn(async move {
        let limit = inner.config.batch_size.clamp(1, 10) as usize;
        let calls = Arc::new(tokio::sync::Semaphore::new(ACK_CALLS_IN_FLIGHT));
        while let Some(first) = rx.recv().await {
            let Ok(call) = calls.clone().acquire_owned().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < limit {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let (inner, url) = (inner.clone(), url.clone());
            tokio::spawn(async move {
                delete_batch(&inner, &url, batch).await;
                drop(call);
            });
        }
    });
    tx
}

async fn delete_batch(inner: &Shared, url: &str, batch: Vec<AckRequest>) {
    let entries: Vec<DeleteMessageBatchRequestEntry> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, (receipt, _))| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(receipt)
                .build()
                .ok()
        })
        .collect();
    let result = inner
        .sqs
        .delete_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await;
    match result {
        Ok(out) => {
            let mut failed: HashMap<String, Error> = out
                .failed()
                .iter()
                .map(|f| {
                    (
                        f.id().to_owned(),
                        batch_entry(f.code(), f.message(), "acknowledging (delete)"),
                    )
                })
                .collect();
            for (i, (_, reply)) in batch.into_iter().enumerate() {
                let _ = reply.send(failed.remove(&i.to_string()).map_or(Ok(()), Err));
            }
        }
        Err(e) => {
            let kind = crate::error::kind_of(&e);
            let text = format!("acknowledging (delete): {e}");
            let mut source = Some(e);
            for (_, reply) in batch {
                let error = match source.take() {
                    Some(e) => map(e, "acknowledging (delete)"),
                    None => Error::new(kind, text.clone()),
                };
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// The SQS side of one delivery.
struct SqsSettle {
    inner: Shared,
    url: String,
    receipt: String,
    /// SQS's id of the received message.
    message_id: Option<String>,
    envelope: bus_core::Envelope,
    source: Arc<str>,
    group: Option<Arc<str>>,
    attempt: u32,
    /// When it was received: SQS refuses a visibility reaching beyond 12 hours from then.
    received: Instant,
    /// Taken before any call that changes the message's visibility or deletes it.
    turn: Turn,
    acks: mpsc::UnboundedSender<AckRequest>,
}

impl fmt::Debug for SqsSettle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsSettle")
            .field("source", &self.source)
            .field("message_id", &self.envelope.id)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl SqsSettle {
    async fn set_visibility(&self, seconds: u32, doing: &str) -> Result<()> {
        // SQS counts the 12 hours from the receive, and refuses a visibility beyond them.
        let seconds = seconds.min(visibility_left(self.received));
        self.inner
            .sqs
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(&self.receipt)
            .visibility_timeout(i32::try_from(seconds.min(SQS_MAX_VISIBILITY_SECS)).unwrap_or(0))
            .send()
            .await
            .map_err(|e| map(e, doing))?;
        Ok(())
    }

    async fn delete(&self) -> Result<()> {
        let (reply, done) = oneshot::channel();
        self.acks
            .send((self.receipt.clone(), reply))
            .map_err(|_| Error::closed("the acknowledgement batcher stopped"))?;
        done.await
            .map_err(|_| Error::closed("the acknowledgement batcher stopped"))?
    }
}

/// Whole seconds of `delay`, rounded up (SQS counts visibility in seconds) and clamped to
/// SQS's 12-hour limit.
pub(crate) fn delay_secs(delay: Duration) -> u32 {
    let secs = delay
        .as_secs()
        .saturating_add(u64::from(delay.subsec_nanos() > 0));
    u32::try_from(secs)
        .unwrap_or(SQS_MAX_VISIBILITY_SECS)
        .min(SQS_MAX_VISIBILITY_SECS)
}

#[async_trait]
impl Settle for SqsSettle {
    async fn settle(&self, settlement: Settlement) -> Result<()> {
        let _turn = self.turn.lock().await;
        match settlement {
            Settlement::Ack => self.delete().await,
            Settlement::Nack(Redeliver::After(delay)) => {
                self.set_visibility(delay_secs(delay), "nack with delay (change visibility)")
                    .await
            }
            Settlement::Nack(_) => self.set_visibility(0, "nack (change visibility)").await,
            Settlement::Reject { reason, attempts } => {
                let mut dead = mark(
                    self.envelope.clone(),
                    &DeadLetterInfo {
                        reason: &reason,
                        source: &self.source,
                        group: self.group.as_deref(),
                        attempts: attempts.max(self.attempt),
                        first_failure: None,
                    },
                );
                if self.inner.config.fifo {
                    // Its own deduplication id: one per received message, so a reject sent
                    // again (the delete failed) is dropped, but not another dead letter of
                    // the same envelope (another group, or after a redrive).
                    let id = self
                        .message_id
                        .clone()
                        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
                    dead.headers.insert(wire::DEAD_LETTER_ID.into(), id);
                }
                let dlq = headers::dead_letter_queue(&self.source);
                let name = self.inner.names.queue(&dlq);
                let url = self.inner.queue_url(&name, QueueRole::Plain, None).await?;
                // Cut to fit if it must: a message that cannot be dead-lettered would loop.
                let (dead, wire) = wire::encode_dead_letter(
                    dead,
                    &self.inner.config.source,
                    self.inner.config.max_message_bytes,
                );
                send_wire(
                    &self.inner,
                    &url,
                    &dead,
                    wire,
                    &format!("dead-letter queue `{dlq}`"),
                )
                .await?;
                self.delete().await
            }
            _ => Err(Error::unsupported(
                "this settlement is not known to the SQS adapter",
            )),
        }
    }

    async fn in_progress(&self) -> Result<()> {
        let _turn = self.turn.lock().await;
        self.set_visibility(
            self.inner.config.visibility_timeout_secs,
            "extending visibility (in progress)",
        )
        .await
    }

    fn abandon(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to call SQS from: the message comes back after its visibility timeout.
            return;
        };
        let sqs = self.inner.sqs.clone();
        let url = self.url.clone();
        let receipt = self.receipt.clone();
        let turn = self.turn.clone();
        runtime.spawn(async move {
            let _turn = turn.lock().await;
            let _ = sqs
                .change_message_visibility()
                .queue_url(url)
                .receipt_handle(receipt)
                .visibility_timeout(0)
                .send()
                .await;
        });
    }
}

impl SqsSource {
    fn stop_receiving(&mut self) {
        self.closed = true;
        *self.gate.lock().expect("subscription gate") = true;
        self.stop.send_replace(true);
        self.rx.close();
        // Dropping what is buffered hands each message back to SQS at once (abandon).
        while self.rx.try_recv().is_ok() {}
        self.buffered
            .lock()
            .expect("buffered deliveries")
            .waiting
            .clear();
    }
}

async fn remove_private(inner: &Shared, target: &Target, subscription_arn: &str) -> Result<()> {
    if !subscription_arn.is_empty() {
        inner
            .sns
            .unsubscribe()
            .subscription_arn(subscription_arn)
            .send()
            .await
            .map_err(|e| map(e, "removing a private subscription"))?;
    }
    inner.forget_queue(&target.queue_name);
    inner
        .sqs
        .delete_queue()
        .queue_url(&target.url)
        .send()
        .await
        .map_err(|e| map(e, "deleting a private subscription's queue"))?;
    Ok(())
}

impl SqsSource {
    /// A buffered delivery leaves the buffer: from here its holder extends its visibility
    /// (the `Consumer` does).
    fn hand_out(&self, item: Result<(u64, Delivery)>) -> Result<Delivery> {
        item.map(|(number, delivery)| {
            self.buffered
                .lock()
                .expect("buffered deliveries")
                .waiting
                .remove(&number);
            delivery
        })
    }
}

#[async_trait]
impl DeliverySource for SqsSource {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.closed || *self.broker_closed.borrow() {
            return None;
        }
        if !*self.demand.borrow() {
            self.demand.send_replace(true);
        }
        // Both branches are cancel safe: a received message stays in the buffer until
        // `recv` returns it.
        let item = tokio::select! {
            biased;
            _ = self.broker_closed.wait_for(|closed| *closed) => None,
            item = self.rx.recv() => item,
        }?;
        Some(self.hand_out(item))
    }

    /// What the receive loop has buffered already, without waiting.
    fn try_next(&mut self) -> Option<Result<Delivery>> {
        if self.closed || *self.broker_closed.borrow() {
            return None;
        }
        let item = self.rx.try_recv().ok()?;
        Some(self.hand_out(item))
    }

    /// The visibility timeout each receive sets: the consumer extends it
    /// ([`Delivery::in_progress`] sets it again from now) while it holds a delivery.
    fn lease(&self) -> Option<Duration> {
        Some(Duration::from_secs(
            self.inner.config.visibility().unsigned_abs().into(),
        ))
    }

    async fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.stop_receiving();
        if let Some(arn) = self.target.private.take() {
            remove_private(&self.inner, &self.target, &arn).await?;
        }
        Ok(())
    }

    /// A FIFO queue hands out a message group's messages in order, and none of a group while
    /// one of its messages is in flight; a standard queue keeps no order.
    fn keeps_key_order(&self) -> bool {
        self.inner.config.fifo
    }
}

impl Drop for SqsSource {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        self.stop_receiving();
        if let Some(arn) = self.target.private.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let (inner, target) = (self.inner.clone(), self.target.clone());
                runtime.spawn(async move {
                    let _ = remove_private(&inner, &target, &arn).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_and_clamp() {
        assert_eq!(delay_secs(Duration::from_millis(1)), 1);
        assert_eq!(delay_secs(Duration::from_secs(1)), 1);
        assert_eq!(delay_secs(Duration::from_millis(1500)), 2);
        assert_eq!(delay_secs(Duration::from_secs(100_000)), 43_200);
        // Before: `as_secs() + 1` overflowed (a panic in debug builds).
        assert_eq!(delay_secs(Duration::MAX), 43_200);
    }
}
