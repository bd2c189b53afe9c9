//! The consumer: runs a handler over a subscription and settles every delivery.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::watch;
use tokio::task::{Id, JoinError, JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::Instrument;

use crate::middleware::Panicked;
use crate::runtime::{Handler, Outcome};
use crate::{Delivery, Error, ErrorKind, Result, Settlement, Subscription};

/// How many handlers a [`Consumer`] runs at once unless told otherwise.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// How long a [`Consumer`] lets in-flight handlers finish after shutdown unless told otherwise.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times a [`Consumer`] tries to settle a delivery unless told otherwise.
pub const DEFAULT_SETTLE_ATTEMPTS: u32 = 4;

const SETTLE_BACKOFF: Duration = Duration::from_millis(100);
/// The shortest interval between two lease extensions of one delivery.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// How many lease extensions of waiting deliveries are in flight at once.
const KEEP_ALIVE_CONCURRENCY: usize = 16;
const RECEIVE_BACKOFF_MIN: Duration = Duration::from_millis(50);
const RECEIVE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs a [`Handler`] over a [`Subscription`]: bounded concurrency, order per key, settlement
/// from each [`Outcome`], and graceful shutdown.
///
/// - **Concurrency.** At most [`with_concurrency`](Consumer::with_concurrency) handlers run at
///   once, and at most [`with_max_pending`](Consumer::with_max_pending) received deliveries wait
///   for a slot; when that many are waiting the consumer stops receiving, leaving messages with
///   the broker.
/// - **Order per key.** Deliveries with the same [`Envelope::key`](crate::Envelope::key) are
///   handled one after another in the order received: the next starts only after the previous
///   was settled. Different keys, and messages without a key, are handled in parallel, so a slow
///   or failing key holds up only itself (until the waiting room is full of its messages).
/// - **Settlement.** [`Outcome::Ack`] acks, [`Outcome::Retry`] nacks (now or after its delay),
///   [`Outcome::Reject`] rejects with the error's text as reason. A failed settlement is logged
///   and tried again with backoff ([`with_settle_attempts`](Consumer::with_settle_attempts)
///   times in all, while the error [is retryable](Error::is_retryable)); after that the
///   delivery is dropped unsettled, which makes the broker redeliver it.
/// - **Panics.** A panicking handler (or middleware) is a failed attempt, settled as
///   [`Outcome::Retry`]; a panic while settling leaves the delivery unsettled, so the broker
///   redelivers it. Either way the key is released and the consumer carries on.
/// - **Leases.** Where the broker redelivers a message its consumer holds for too long
///   ([`Subscription::lease`]: NATS ack wait, SQS visibility timeout), the consumer tells the
///   broker every delivery is still in progress ([`Delivery::in_progress`]) at a third of that
///   lease (or every [`with_lease_heartbeat`](Consumer::with_lease_heartbeat)), from receipt
///   until settlement: while the handler runs and while the delivery waits for a slot or for
///   its key. A slow handler is never run twice at once because of a timer.
/// - **Undecodable messages.** A delivery the adapter marked
///   [undecodable](Delivery::undecodable) is rejected to the dead-letter queue with the reason,
///   without running the handler.
/// - **Receive errors.** An error from the subscription is logged and receiving resumes after a
///   short, growing backoff. The end of the subscription ends the run once the deliveries
///   already received are handled.
/// - **Shutdown.** When the shutdown signal fires, the consumer stops receiving, drops the
///   deliveries received but not started (the broker redelivers them), lets the running
///   handlers finish and settles them, for at most
///   [`with_shutdown_timeout`](Consumer::with_shutdown_timeout), then aborts the rest (whose
///   deliveries are redelivered too) and closes the subscription.
///
/// Every delivery is either settled or dropped unsettled: nothing is lost. The
/// [`ConsumerReport`] counts which.
///
/// Handlers run as tokio tasks, in parallel on a multi-threaded runtime.
pub struct Consumer<H> {
    subscription: Subscription,
    handler: Arc<H>,
    concurrency: usize,
    max_pending: Option<usize>,
    shutdown_timeout: Duration,
    settle_attempts: u32,
    heartbeat: Option<Duration>,
}

impl<H: Handler> Consumer<H> {
    /// A consumer that runs `handler` over the deliveries of `subscription`.
    #[must_use]
    pub fn new(subscription: Subscription, handler: H) -> Self {
        Self {
            subscription,
            handler: Arc::new(handler),
            concurrency: DEFAULT_CONCURRENCY,
            max_pending: None,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            settle_attempts: DEFAULT_SETTLE_ATTEMPTS,
            heartbeat: None,
        }
    }

    /// Extends the lease of every delivery held (running or waiting) every `interval` (at
    /// least 100 ms), instead of at a third of the subscription's
    /// [lease](Subscription::lease). Also turns heartbeats on for a subscription that declares
    /// no lease.
    #[must_use]
    pub fn with_lease_heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = Some(interval.max(MIN_HEARTBEAT));
        self
    }

    /// Runs at most `concurrency` handlers at once (at least 1; default
    /// [`DEFAULT_CONCURRENCY`]).
    #[must_use]
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Holds at most `max_pending` received deliveries that wait for a handler slot or for the
    /// previous message of their key (at least 1; default: the concurrency). When that many
    /// wait, the consumer stops receiving until one starts.
    #[must_use]
    pub fn with_max_pending(mut self, max_pending: usize) -> Self {
        self.max_pending = Some(max_pending.max(1));
        self
    }

    /// Lets running handlers finish for at most `timeout` after shutdown (default
    /// [`DEFAULT_SHUTDOWN_TIMEOUT`]).
    #[must_use]
    pub fn with_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Tries to settle a delivery at most `attempts` times (at least 1; default
    /// [`DEFAULT_SETTLE_ATTEMPTS`]) before dropping it unsettled.
    #[must_use]
    pub fn with_settle_attempts(mut self, attempts: u32) -> Self {
        self.settle_attempts = attempts.max(1);
        self
    }

    /// Runs until the subscription ends or `shutdown` completes, then shuts down gracefully
    /// (see [`Consumer`]) and reports what was done.
    ///
    /// ```no_run
    /// # async fn example(subscription: bus_core::Subscription) -> bus_core::Result<()> {
    /// use bus_core::{Envelope, runtime::{handler_fn, Consumer, DeliveryInfo}};
    ///
    /// let handler = handler_fn(|envelope: Envelope, _: DeliveryInfo| async move {
    ///     println!("{}", envelope.kind);
    /// });
    /// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    /// # drop(stop);
    /// let report = Consumer::new(subscription, handler)
    ///     .with_concurrency(32)
    ///     .run(async { stopped.await.ok(); })
    ///     .await?;
    /// println!("acked {}", report.acked);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// When the subscription could not be closed cleanly at the end. Every delivery has been
    /// settled or abandoned by then.
    ///
    /// # Panics
    /// When polled outside a tokio runtime (handlers run as tokio tasks).
    ///
    /// # Cancel safety
    /// If the future is dropped, running handlers are aborted and every delivery not yet
    /// settled is dropped unsettled, so the broker redelivers it; the subscription is dropped,
    /// which closes it. Nothing is lost, but prefer the shutdown signal, which lets handlers
    /// finish.
    pub async fn run<F>(self, shutdown: F) -> Result<ConsumerReport>
    where
        F: Future<Output = ()>,
    {
        let Consumer {
            mut subscription,
            handler,
            concurrency,
            max_pending,
            shutdown_timeout,
            settle_attempts,
            heartbeat,
        } = self;
        let max_pending = max_pending.unwrap_or(concurrency);
        let heartbeat = heartbeat.or_else(|| {
            subscription
                .lease()
                .map(|lease| (lease / 3).max(MIN_HEARTBEAT))
        });
        let mut next_heartbeat = heartbeat.map(|every| Instant::now() + every);
        let mut shutdown = pin!(shutdown);

        let mut report = ConsumerReport::default();
        let mut waiting = KeyQueue::default();
        let mut running = Running::default();
        let mut receiving = true;
        let mut receive_backoff = RECEIVE_BACKOFF_MIN;
        let mut resume_at: Option<Instant> = None;

        let shutting_down = loop {
            while running.len() < concurrency {
                let Some(delivery) = waiting.pop_ready() else {
                    break;
                };
                running.spawn(delivery, handler.clone(), settle_attempts, heartbeat);
            }
            if !receiving && running.is_empty() && waiting.is_empty() {
                break false;
            }
            let can_receive = receiving && resume_at.is_none() && waiting.len() < max_pending;

            tokio::select! {
                biased;
                () = &mut shutdown => break true,
                Some(joined) = running.join_next(), if !running.is_empty() => {
                    let key = report.record(joined);
                    waiting.finished(key.as_deref());
                }
                () = sleep_until(resume_at), if resume_at.is_some() => resume_at = None,
                () = sleep_until(next_heartbeat), if next_heartbeat.is_some() => {
                    if let Some(every) = heartbeat {
                        // Bounded, so that a broker call that hangs cannot stall the consumer.
                        if tokio::time::timeout(every, waiting.keep_alive()).await.is_err() {
                            tracing::warn!(
                                timeout = ?every,
                                "extending the lease of waiting deliveries timed out"
                            );
                        }
                    }
                    next_heartbeat = heartbeat.map(|every| Instant::now() + every);
                }
                item = subscription.next(), if can_receive => match item {
                    Some(Ok(delivery)) => {
                        report.received += 1;
                        receive_backoff = RECEIVE_BACKOFF_MIN;
                        waiting.push(delivery);
                    }
                    Some(Err(error)) => {
                        report.receive_errors += 1;
                        tracing::warn!(
                            %error,
                            retry_in = ?receive_backoff,
                            "receiving from the subscription failed"
                        );
                        resume_at = Some(Instant::now() + receive_backoff);
                        receive_backoff = (receive_backoff * 2).min(RECEIVE_BACKOFF_MAX);
                    }
                    None => {
                        tracing::debug!("subscription ended");
                        receiving = false;
                    }
                },
            }
        };

        if shutting_down {
            let abandoned = waiting.clear();
            report.abandoned += abandoned;
            tracing::info!(
                in_flight = running.len(),
                abandoned,
                "consumer shutting down: finishing in-flight handlers"
            );
            let mut deadline = pin!(tokio::time::sleep(shutdown_timeout));
            loop {
                tokio::select! {
                    biased;
                    joined = running.join_next() => match joined {
                        Some(joined) => {
                            report.record(joined);
                        }
                        None => break,
                    },
                    () = &mut deadline => {
                        tracing::warn!(
                            aborted = running.len(),
                            timeout = ?shutdown_timeout,
                            "shutdown timeout: aborting handlers; their messages will be redelivered"
                        );
                        running.abort_all();
                        while let Some(joined) = running.join_next().await {
                            report.record(joined);
                        }
                        break;
                    }
                }
            }
        }

        let closed = subscription.close().await;
        tracing::info!(?report, "consumer stopped");
        closed.map(|()| report)
    }

    /// Runs the consumer on a new tokio task until the subscription ends or
    /// [`ConsumerHandle::shutdown`] is called.
    ///
    /// Dropping the handle does not stop the consumer (as with [`tokio::spawn`]).
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    #[must_use = "without the handle the consumer cannot be shut down"]
    pub fn spawn(self) -> ConsumerHandle {
        let (signal, mut watcher) = watch::channel(false);
        let shutdown = async move {
            if watcher.wait_for(|stop| *stop).await.is_err() {
                // The handle was dropped: nobody can ask for shutdown any more.
                std::future::pending::<()>().await;
            }
        };
        ConsumerHandle {
            signal,
            task: tokio::spawn(self.run(shutdown)),
        }
    }
}

impl<H> fmt::Debug for Consumer<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("subscription", &self.subscription)
            .field("handler", &std::any::type_name::<H>())
            .field("concurrency", &self.concurrency)
            .field("max_pending", &self.max_pending.unwrap_or(self.concurrency))
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("settle_attempts", &self.settle_attempts)
            .field("heartbeat", &self.heartbeat)
            .finish()
    }
}

/// A consumer running on its own task, made by [`Consumer::spawn`].
#[derive(Debug)]
pub struct ConsumerHandle {
    signal: watch::Sender<bool>,
    task: JoinHandle<Result<ConsumerReport>>,
}

impl ConsumerHandle {
    /// Asks the consumer to shut down gracefully; [`join`](ConsumerHandle::join) waits for it.
    /// Calling it again does nothing.
    pub fn shutdown(&self) {
        self.signal.send_replace(true);
    }

    /// Whether the consumer has stopped.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the consumer to stop (after [`shutdown`](ConsumerHandle::shutdown), or when
    /// the subscription ends) and returns its report.
    ///
    /// # Errors
    /// As [`Consumer::run`], and [`ErrorKind::Other`] when the consumer's task failed (its
    /// runtime shut down).
    ///
    /// # Cancel safety
    /// If the future is dropped, the consumer keeps running, detached, until the subscription
    /// ends.
    pub async fn join(self) -> Result<ConsumerReport> {
        match self.task.await {
            Ok(result) => result,
            Err(error) => Err(Error::with_source(
                ErrorKind::Other,
                "consumer task failed",
                error,
            )),
        }
    }

    /// Shuts down gracefully and waits: [`shutdown`](ConsumerHandle::shutdown), then
    /// [`join`](ConsumerHandle::join).
    ///
    /// # Errors
    /// As [`join`](ConsumerHandle::join).
    ///
    /// # Cancel safety
    /// As [`join`](ConsumerHandle::join); the shutdown has been asked for regardless.
    pub async fn stop(self) -> Result<ConsumerReport> {
        self.shutdown();
        self.join().await
    }
}

/// What a [`Consumer`] did, returned when it stops.
///
/// Every received delivery is counted once in `acked`, `retried`, `rejected`, `abandoned` or
/// `unsettled`:
/// `received == acked + retried + rejected + abandoned + unsettled`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerReport {
    /// Deliveries received from the subscription.
    pub received: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries negatively acknowledged for redelivery ([`Outcome::Retry`], panics included).
    pub retried: u64,
    /// Deliveries rejected to the dead-letter queue.
    pub rejected: u64,
    /// Attempts whose handler panicked (settled as retries, so also counted in `retried` or,
    /// if that settlement failed, in `unsettled`).
    pub panicked: u64,
    /// Deliveries dropped unsettled at shutdown, for the broker to redeliver: received but not
    /// started, or still running when the shutdown timeout ran out.
    pub abandoned: u64,
    /// Deliveries dropped unsettled because settling them kept failing; the broker redelivers
    /// them.
    pub unsettled: u64,
    /// Deliveries the adapter marked undecodable ([`Delivery::undecodable`]): dead-lettered
    /// with the reason without running the handler (so also counted in `rejected`, or in
    /// `unsettled` if that failed).
    pub undecodable: u64,
    /// Errors received from the subscription (not deliveries).
    pub receive_errors: u64,
}

impl ConsumerReport {
    /// Counts one finished task; returns the key it held, which is free again.
    fn record(&mut self, joined: Joined) -> Option<String> {
        match joined.result {
            Ok(processed) => {
                self.panicked += u64::from(processed.panicked);
                self.undecodable += u64::from(processed.undecodable);
                match processed.settled {
                    Some(Settled::Acked) => self.acked += 1,
                    Some(Settled::Retried) => self.retried += 1,
                    Some(Settled::Rejected) => self.rejected += 1,
                    None => self.unsettled += 1,
                }
            }
            Err(error) if error.is_cancelled() => self.abandoned += 1,
            Err(error) => {
                // Panics of the handler and of settling are caught in `process`; this is
                // whatever is left. Unwinding dropped the delivery, so it is redelivered.
                tracing::error!(%error, "a handler task failed");
                self.unsettled += 1;
            }
        }
        joined.key
    }
}

/// Deliveries received but not started: the ready ones in arrival order, and for each key
/// with a delivery running or ready, the later ones of that key.
#[derive(Default)]
struct KeyQueue {
    ready: VecDeque<Delivery>,
    /// Present for a key while one of its deliveries is running or ready; holds the rest.
    blocked: HashMap<String, VecDeque<Delivery>>,
    len: usize,
}

impl KeyQueue {
    fn push(&mut self, delivery: Delivery) {
        self.len += 1;
        let Some(key) = &delivery.envelope().key else {
            self.ready.push_back(delivery);
            return;
        };
        if let Some(later) = self.blocked.get_mut(key) {
            later.push_back(delivery);
        } else {
            self.blocked.insert(key.clone(), VecDeque::new());
            self.ready.push_back(delivery);
        }
    }

    fn pop_ready(&mut self) -> Option<Delivery> {
        let delivery = self.ready.pop_front()?;
        self.len -= 1;
        Some(delivery)
    }

    /// The delivery of `key` that was running has been settled: the next of that key is ready.
    fn finished(&mut self, key: Option<&str>) {
        let Some(key) = key else { return };
        let Some(later) = self.blocked.get_mut(key) else {
            return;
        };
        match later.pop_front() {
            Some(next) => self.ready.push_back(next),
            None => {
                self.blocked.remove(key);
            }
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Extends the lease of every waiting delivery, so that none is redelivered elsewhere while
    /// it waits here for a slot or for its key.
    async fn keep_alive(&self) {
        let waiting: Vec<&Delivery> = self
            .ready
            .iter()
            .chain(self.blocked.values().flatten())
            .collect();
        for some in waiting.chunks(KEEP_ALIVE_CONCURRENCY) {
            let extended = futures::future::join_all(some.iter().map(|d| d.in_progress())).await;
            if let Some(error) = extended.into_iter().find_map(Result::err) {
                tracing::warn!(%error, "extending the lease of waiting deliveries failed");
            }
        }
    }

    /// Drops every waiting delivery (abandoning them); returns how many.
    fn clear(&mut self) -> u64 {
        let dropped = self.len as u64;
        self.ready.clear();
        self.blocked.clear();
        self.len = 0;
        dropped
    }
}

#[derive(Debug, Clone, Copy)]
enum Settled {
    Acked,
    Retried,
    Rejected,
}

struct Processed {
    panicked: bool,
    undecodable: bool,
    /// `None` when the delivery was dropped unsettled.
    settled: Option<Settled>,
}

/// A finished handler task: the key it held, and what it did.
struct Joined {
    key: Option<String>,
    result: Result<Processed, JoinError>,
}

/// The handler tasks, and the key each one holds.
#[derive(Default)]
struct Running {
    tasks: JoinSet<Processed>,
    keys: HashMap<Id, Option<String>>,
}

impl Running {
    fn spawn<H: Handler>(
        &mut self,
        delivery: Delivery,
        handler: Arc<H>,
        settle_attempts: u32,
        heartbeat: Option<Duration>,
    ) {
        let key = delivery.envelope().key.clone();
        // Trace level and not named like the OpenTelemetry `process {topic}` span: log context
        // for the handler's own events, not a second span per message in exported traces.
        let span = tracing::trace_span!(
            "bus.delivery",
            message_id = %delivery.envelope().id,
            kind = %delivery.envelope().kind,
            attempt = delivery.attempt(),
            source = delivery.source(),
        );
        let task = process(handler, delivery, settle_attempts, heartbeat).instrument(span);
        let id = self.tasks.spawn(task).id();
        self.keys.insert(id, key);
    }

    /// The next finished task, with the key it held: also for a task that failed, so that its
    /// key is never left blocked.
    async fn join_next(&mut self) -> Option<Joined> {
        let joined = self.tasks.join_next_with_id().await?;
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(error) => error.id(),
        };
        let key = self.keys.remove(&id).flatten();
        Some(Joined {
            key,
            result: joined.map(|(_, processed)| processed),
        })
    }

    fn abort_all(&mut self) {
        self.tasks.abort_all();
    }

    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

/// Handles one delivery and settles it from the outcome. A delivery the adapter could not
/// decode is dead-lettered without running the handler. Panics of the handler (and of the
/// middleware around it) are failed attempts; a panic while settling leaves the delivery
/// unsettled. Either way the task ends normally, so the key it holds is released.
async fn process<H: Handler>(
    handler: Arc<H>,
    delivery: Delivery,
    settle_attempts: u32,
    heartbeat: Option<Duration>,
) -> Processed {
    if let Some(reason) = delivery.undecodable() {
        let reason = format!("undecodable: {reason}");
        tracing::warn!(%reason, "dead-lettering a message that could not be decoded");
        let settled = settle(delivery, Settlement::Reject { reason }, settle_attempts)
            .await
            .then_some(Settled::Rejected);
        return Processed {
            panicked: false,
            undecodable: true,
            settled,
        };
    }
    // Calling `handle` inside the future also catches a panic before its first await.
    let handled = AssertUnwindSafe(async { handler.handle(&delivery).await }).catch_unwind();
    let handled = async {
        let Some(every) = heartbeat else {
            return handled.await;
        };
        // The lease is extended beside the handler, for as long as it runs.
        let keep_alive = async {
            loop {
                tokio::time::sleep(every).await;
                match tokio::time::timeout(every, delivery.in_progress()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "extending the lease of a running delivery failed");
                    }
                    Err(_) => tracing::warn!(
                        timeout = ?every,
                        "extending the lease of a running delivery timed out"
                    ),
                }
            }
        };
        tokio::select! {
            result = handled => result,
            never = keep_alive => never,
        }
    };
    let (outcome, panicked) = match handled.await {
        Ok(outcome) => (outcome, false),
        Err(payload) => {
            let panic = Panicked::from_payload(payload.as_ref());
            tracing::error!(
                panic = panic.message(),
                "handler panicked; will be redelivered"
            );
            (Outcome::retry(panic.into_error()), true)
        }
    };
    match &outcome {
        Outcome::Ack => tracing::debug!("handled"),
        Outcome::Retry { after, error } => {
            tracing::warn!(%error, ?after, "handler failed; will be redelivered");
        }
        Outcome::Reject { error } => tracing::warn!(%error, "handler rejected the message"),
    }
    let settled = match outcome {
        Outcome::Ack => Settled::Acked,
        Outcome::Retry { .. } => Settled::Retried,
        Outcome::Reject { .. } => Settled::Rejected,
    };
    let settlement = outcome.to_settlement();
    let settled = settle(delivery, settlement, settle_attempts)
        .await
        .then_some(settled);
    Processed {
        panicked,
        undecodable: false,
        settled,
    }
}

/// Settles `delivery`, trying again with backoff while the error is retryable; returns whether
/// it was settled. When not, the delivery is dropped unsettled and so redelivered.
async fn settle(mut delivery: Delivery, settlement: Settlement, attempts: u32) -> bool {
    let mut backoff = SETTLE_BACKOFF;
    let mut attempt = 1;
    loop {
        let settling = AssertUnwindSafe(delivery.settle(settlement.clone())).catch_unwind();
        match settling.await {
            Ok(Ok(())) => return true,
            Err(payload) => {
                // The adapter's settlement panicked (a bug there); the unwinding dropped the
                // delivery unsettled, which hands it back to the broker.
                let panic = Panicked::from_payload(payload.as_ref());
                tracing::error!(
                    panic = panic.message(),
                    ?settlement,
                    "settling panicked; the broker will redeliver the message"
                );
                return false;
            }
            Ok(Err(failed)) => {
                let (error, returned) = failed.into_parts();
                if attempt >= attempts || !error.is_retryable() {
                    tracing::error!(
                        %error,
                        ?settlement,
                        attempt,
                        "settling failed; giving up, the broker will redeliver the message"
                    );
                    return false;
                }
                tracing::warn!(%error, ?settlement, attempt, retry_in = ?backoff, "settling failed");
                delivery = returned;
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}
