//! The consumer: runs a handler over a subscription and settles every delivery.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::task::{Id, JoinError, JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::Instrument;

use crate::middleware::Panicked;
use crate::runtime::{Handler, Outcome};
use crate::{Delivery, Error, ErrorKind, Result, SettleError, Settlement, Subscription};

/// How many handlers a [`Consumer`] runs at once unless told otherwise.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// How long a [`Consumer`] lets in-flight handlers finish after shutdown unless told otherwise.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times a [`Consumer`] tries to settle a delivery unless told otherwise.
pub const DEFAULT_SETTLE_ATTEMPTS: u32 = 4;

/// How many deliveries parked keys may hold at once unless told otherwise (see
/// [`Consumer::with_max_parked`]).
pub const DEFAULT_MAX_PARKED: usize = 1024;

/// The pause before a retry in place when the outcome asked for none
/// ([`Outcome::Retry`] with `after: None`), so that a handler failing at once does not spin.
const MIN_RETRY_IN_PLACE: Duration = Duration::from_millis(100);

const SETTLE_BACKOFF: Duration = Duration::from_millis(100);
/// The shortest interval between two lease extensions of one delivery.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// How many lease extensions of waiting deliveries are in flight at once.
const KEEP_ALIVE_CONCURRENCY: usize = 16;
const RECEIVE_BACKOFF_MIN: Duration = Duration::from_millis(50);
const RECEIVE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What a [`Consumer`] does with a delivery whose handler failed and should be tried again
/// ([`Outcome::Retry`]).
///
/// The default is [`Ordered`](KeyOrder::Ordered) where the subscription keeps per-key order
/// ([`Subscription::keeps_key_order`]: memory, Kafka, NATS JetStream, RabbitMQ, SQS FIFO) and
/// [`Unordered`](KeyOrder::Unordered) elsewhere (SQS standard queues, which have no order to
/// keep); [`Consumer::with_key_order`] sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyOrder {
    /// A failing message parks its key. The consumer keeps the delivery (its lease extended
    /// where the broker has one) and runs it again in place after the outcome's delay, as the
    /// next [`attempt`](Delivery::attempt); the key's later messages wait behind it, every
    /// other key keeps flowing, and the parked delivery holds no concurrency slot while it
    /// waits. When the retry policy gives up ([`Outcome::Reject`]), the message is
    /// dead-lettered with every attempt counted, and the key moves on. So the messages of one
    /// key take effect in publish order, failures included. Messages without a key have no
    /// order to keep and are retried as with `Unordered`. How much parked keys may hold is
    /// bounded by [`Consumer::with_max_parked`].
    Ordered,
    /// A failing message goes back to the broker ([`Delivery::nack`], with the outcome's
    /// delay: a JetStream nak, a RabbitMQ TTL queue, a Kafka retry topic, an SQS visibility
    /// change) and the key moves on at once: later messages of the key may take effect before
    /// the retried one. Nothing is held in the consumer's memory while the message waits.
    Unordered,
}

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
/// - **Order across retries.** With [`KeyOrder::Ordered`] (the default where the subscription
///   keeps per-key order) a failing message is retried in place and its key waits behind it;
///   with [`KeyOrder::Unordered`] it goes back to the broker and the key moves on (see
///   [`KeyOrder`]). Deliveries held by parked keys (the parked ones and those waiting behind
///   them) count against [`with_max_parked`](Consumer::with_max_parked), not against
///   `max_pending`: at that bound the consumer stops receiving until a parked key moves on,
///   while every delivery already received keeps flowing.
/// - **Settlement.** [`Outcome::Ack`] acks, [`Outcome::Retry`] nacks (now or after its delay;
///   ordered: retries in place), [`Outcome::Reject`] rejects with the error's text as reason
///   and the attempts counted. A failed settlement is logged
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
///   until settlement: while the handler runs, while the delivery waits for a slot or for
///   its key, and while it is parked for a retry in place. A slow handler is never run twice at once because of a timer.
/// - **Undecodable messages.** A delivery the adapter marked
///   [undecodable](Delivery::undecodable) is rejected to the dead-letter queue with the reason,
///   without running the handler.
/// - **Receive errors.** An error from the subscription is logged and receiving resumes after a
///   short, growing backoff. The end of the subscription ends the run once the deliveries
///   already received are handled.
/// - **Shutdown.** When the shutdown signal fires, the consumer stops receiving, drops the
///   deliveries received but not started and the parked ones (the broker redelivers them,
///   counting from its own attempts), lets the running
///   handlers finish and settles them, for at most
///   [`with_shutdown_timeout`](Consumer::with_shutdown_timeout), then aborts the rest (whose
///   deliveries are redelivered too) and closes the subscription.
///
/// Every delivery is either settled or dropped unsettled: nothing is lost. The
/// [`ConsumerReport`] counts which.
///
/// **Where handlers run.** By default the consumer polls its handlers itself, inside its own
/// task: they run concurrently (up to the concurrency), interleaved at their `.await`s, on
/// whichever worker thread runs the consumer. That spares a task per delivery (its
/// allocation, scheduling and join: about a quarter of the cost of dispatching a message), but
/// handlers that compute for long between two `.await`s hold up the consumer and one another.
/// For such handlers, [`with_task_per_delivery`](Consumer::with_task_per_delivery) runs each
/// delivery as its own tokio task, so that on a multi-threaded runtime they run in parallel on
/// its workers (or move the heavy part to `tokio::task::spawn_blocking`).
pub struct Consumer<H> {
    subscription: Subscription,
    handler: Arc<H>,
    concurrency: usize,
    max_pending: Option<usize>,
    shutdown_timeout: Duration,
    settle_attempts: u32,
    heartbeat: Option<Duration>,
    key_order: Option<KeyOrder>,
    max_parked: usize,
    task_per_delivery: bool,
    gauges: ConsumerGauges,
}

/// What a [`Consumer`] holds right now, readable from any task while it runs: for a health
/// endpoint, a log line, or OpenTelemetry gauges
/// ([`BusMetrics::observe_consumer`](crate::middleware::metrics::BusMetrics::observe_consumer),
/// feature `opentelemetry`). Cloning is cheap; every clone reads the same consumer.
#[derive(Debug, Clone, Default)]
pub struct ConsumerGauges(Arc<GaugeValues>);

#[derive(Debug, Default)]
pub(crate) struct GaugeValues {
    running: AtomicU64,
    pending: AtomicU64,
    parked_keys: AtomicU64,
    parked_deliveries: AtomicU64,
}

impl ConsumerGauges {
    /// Handlers running.
    #[must_use]
    pub fn running(&self) -> u64 {
        self.0.running.load(Ordering::Relaxed)
    }

    /// Deliveries received and waiting for a handler slot or for their key.
    #[must_use]
    pub fn pending(&self) -> u64 {
        self.0.pending.load(Ordering::Relaxed)
    }

    /// Keys parked by a failed delivery waiting for its retry in place ([`KeyOrder::Ordered`]).
    #[must_use]
    pub fn parked_keys(&self) -> u64 {
        self.0.parked_keys.load(Ordering::Relaxed)
    }

    /// Deliveries held by parked keys: the parked ones and those waiting behind them.
    #[must_use]
    pub fn parked_deliveries(&self) -> u64 {
        self.0.parked_deliveries.load(Ordering::Relaxed)
    }

    #[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
    pub(crate) fn values(&self) -> std::sync::Weak<GaugeValues> {
        Arc::downgrade(&self.0)
    }

    #[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
    pub(crate) fn from_values(values: Arc<GaugeValues>) -> Self {
        Self(values)
    }

    fn set(&self, running: usize, waiting: &KeyQueue) {
        let values = &self.0;
        values.running.store(running as u64, Ordering::Relaxed);
        values
            .pending
            .store(waiting.pending() as u64, Ordering::Relaxed);
        values
            .parked_keys
            .store(waiting.parked_keys() as u64, Ordering::Relaxed);
        values
            .parked_deliveries
            .store(waiting.held() as u64, Ordering::Relaxed);
    }
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
            key_order: None,
            max_parked: DEFAULT_MAX_PARKED,
            task_per_delivery: false,
            gauges: ConsumerGauges::default(),
        }
    }

    /// Runs each delivery's handler as its own tokio task (`true`), so that on a
    /// multi-threaded runtime handlers run in parallel on its worker threads, instead of
    /// polling them inside the consumer's task (`false`, the default; see "Where handlers
    /// run" on [`Consumer`]). Worth it for handlers that compute for long between two
    /// `.await`s; it costs a task per delivery. Every other guarantee is the same either way.
    #[must_use]
    pub fn with_task_per_delivery(mut self, task_per_delivery: bool) -> Self {
        self.task_per_delivery = task_per_delivery;
        self
    }

    /// What this consumer holds while it runs (see [`ConsumerGauges`]); all zero before
    /// [`run`](Consumer::run) and after it returned.
    #[must_use]
    pub fn gauges(&self) -> ConsumerGauges {
        self.gauges.clone()
    }

    /// Sets what a failed delivery does to its key's order (default: [`KeyOrder::Ordered`]
    /// where the subscription [keeps per-key order](Subscription::keeps_key_order), else
    /// [`KeyOrder::Unordered`]).
    #[must_use]
    pub fn with_key_order(mut self, order: KeyOrder) -> Self {
        self.key_order = Some(order);
        self
    }

    /// Holds at most `max_parked` deliveries in parked keys: those waiting for a retry in
    /// place and the later ones of their keys (at least 1; default [`DEFAULT_MAX_PARKED`]).
    /// At the bound the consumer stops receiving until a parked key moves on; the deliveries
    /// it holds keep flowing. A key that parks takes the deliveries already waiting behind it
    /// along, so the count can pass the bound by up to
    /// [`with_max_pending`](Consumer::with_max_pending). The broker's own window (prefetch, max ack pending) is the other
    /// bound: a parked key holds its messages unsettled, and a broker that has handed out as
    /// many unsettled messages as the window allows sends no more.
    #[must_use]
    pub fn with_max_parked(mut self, max_parked: usize) -> Self {
        self.max_parked = max_parked.max(1);
        self
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
    /// When polled outside a tokio runtime (it uses tokio's timers, and with
    /// [`with_task_per_delivery`](Consumer::with_task_per_delivery) spawns tasks).
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
            key_order,
            max_parked,
            task_per_delivery,
            gauges,
        } = self;
        let key_order = key_order.unwrap_or(if subscription.keeps_key_order() {
            KeyOrder::Ordered
        } else {
            KeyOrder::Unordered
        });
        let max_pending = max_pending.unwrap_or(concurrency);
        let heartbeat = heartbeat.or_else(|| {
            subscription
                .lease()
                .map(|lease| (lease / 3).max(MIN_HEARTBEAT))
        });
        let mut next_heartbeat = heartbeat.map(|every| Instant::now() + every);
        let mut shutdown = pin!(shutdown);

        let mut report = ConsumerReport::default();
        let run = Run {
            handler,
            settle_attempts,
            heartbeat,
            key_order,
        };
        let mut waiting = KeyQueue::default();
        // Declared after `run`, whose handler its inline futures borrow.
        let mut running = Running::new();
        let mut receiving = true;
        let mut receive_backoff = RECEIVE_BACKOFF_MIN;
        let mut resume_at: Option<Instant> = None;
        let mut at_parked_bound = false;
        // Whether another delivery may be received: fewer pending than allowed, and the
        // parked keys below their bound.
        let has_room =
            |waiting: &KeyQueue| waiting.pending() < max_pending && waiting.held() < max_parked;

        let shutting_down = loop {
            while running.len() < concurrency {
                let Some((delivery, key)) = waiting.pop_ready() else {
                    break;
                };
                if task_per_delivery {
                    running.spawn(delivery, key, &run);
                } else {
                    running.push(inline(delivery, key, &run));
                }
            }
            gauges.set(running.len(), &waiting);
            if !receiving && running.is_empty() && waiting.is_empty() {
                break false;
            }
            if (waiting.held() >= max_parked) != at_parked_bound {
                at_parked_bound = !at_parked_bound;
                if at_parked_bound {
                    report.paused_at_parked_bound += 1;
                    tracing::warn!(
                        held = waiting.held(),
                        parked_keys = waiting.parked_keys(),
                        "parked keys hold as many deliveries as allowed: receiving pauses until one moves on"
                    );
                }
            }
            let can_receive = receiving && resume_at.is_none() && has_room(&waiting);

            tokio::select! {
                biased;
                () = &mut shutdown => break true,
                Some(joined) = running.join_next(), if !running.is_empty() => {
                    finish(&mut report, &mut waiting, joined);
                }
                () = sleep_until(waiting.next_due()), if waiting.next_due().is_some() => {
                    waiting.release_due(Instant::now());
                }
                () = sleep_until(resume_at), if resume_at.is_some() => resume_at = None,
                () = sleep_until(next_heartbeat), if next_heartbeat.is_some() => {
                    if let Some(every) = heartbeat {
                        // Handlers polled in this task go on while the broker is told; what
                        // they finish meanwhile is recorded once the waiting deliveries (which
                        // the heartbeat borrows) may change again. Bounded, so that a broker
                        // call that hangs cannot stall the consumer.
                        let mut finished = Vec::new();
                        let timed_out = {
                            let keep_alive = tokio::time::timeout(every, waiting.keep_alive());
                            tokio::pin!(keep_alive);
                            loop {
                                tokio::select! {
                                    biased;
                                    extended = &mut keep_alive => break extended.is_err(),
                                    Some(joined) = running.join_next(), if !running.is_empty() => {
                                        finished.push(joined);
                                    }
                                }
                            }
                        };
                        if timed_out {
                            tracing::warn!(
                                timeout = ?every,
                                "extending the lease of waiting deliveries timed out"
                            );
                        }
                        for joined in finished {
                            finish(&mut report, &mut waiting, joined);
                        }
                    }
                    next_heartbeat = heartbeat.map(|every| Instant::now() + every);
                }
                item = subscription.next(), if can_receive => match item {
                    Some(Ok(delivery)) => {
                        report.received += 1;
                        receive_backoff = RECEIVE_BACKOFF_MIN;
                        waiting.push(delivery);
                        report.note_parked(&waiting);
                        // What the source holds ready comes without a future each, within
                        // the same bounds.
                        while has_room(&waiting) {
                            match subscription.try_next() {
                                Some(Ok(delivery)) => {
                                    report.received += 1;
                                    waiting.push(delivery);
                                    report.note_parked(&waiting);
                                }
                                Some(Err(error)) => {
                                    receive_failed(
                                        &error,
                                        &mut report,
                                        &mut resume_at,
                                        &mut receive_backoff,
                                    );
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                    Some(Err(error)) => {
                        receive_failed(&error, &mut report, &mut resume_at, &mut receive_backoff);
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
                        Some(joined) => report.record_at_shutdown(joined),
                        None => break,
                    },
                    () = &mut deadline => {
                        tracing::warn!(
                            aborted = running.len(),
                            timeout = ?shutdown_timeout,
                            "shutdown timeout: aborting handlers; their messages will be redelivered"
                        );
                        report.abandoned += running.abort_all();
                        while let Some(joined) = running.join_next().await {
                            report.record_at_shutdown(joined);
                        }
                        break;
                    }
                }
            }
        }

        gauges.set(0, &KeyQueue::default());
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
        let gauges = self.gauges();
        let (signal, mut watcher) = watch::channel(false);
        let shutdown = async move {
            if watcher.wait_for(|stop| *stop).await.is_err() {
                // The handle was dropped: nobody can ask for shutdown any more.
                std::future::pending::<()>().await;
            }
        };
        ConsumerHandle {
            signal,
            gauges,
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
            .field("key_order", &self.key_order)
            .field("max_parked", &self.max_parked)
            .field("task_per_delivery", &self.task_per_delivery)
            .finish()
    }
}

/// A consumer running on its own task, made by [`Consumer::spawn`].
#[derive(Debug)]
pub struct ConsumerHandle {
    signal: watch::Sender<bool>,
    gauges: ConsumerGauges,
    task: JoinHandle<Result<ConsumerReport>>,
}

impl ConsumerHandle {
    /// What the consumer holds right now (see [`ConsumerGauges`]).
    #[must_use]
    pub fn gauges(&self) -> ConsumerGauges {
        self.gauges.clone()
    }

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
    /// Failed attempts retried in place ([`KeyOrder::Ordered`]): the delivery was kept and its
    /// key parked until the retry. Not a settlement: the delivery is counted once more when it
    /// is finally acked, rejected or dropped.
    pub retried_in_place: u64,
    /// The most keys parked at once.
    pub peak_parked_keys: u64,
    /// The most deliveries held by parked keys at once (parked, and waiting behind them).
    pub peak_parked_deliveries: u64,
    /// How many times receiving paused because parked keys held
    /// [`with_max_parked`](Consumer::with_max_parked) deliveries.
    pub paused_at_parked_bound: u64,
}

/// How a handler task ended, for the consumer loop.
enum Finished {
    /// The delivery was settled or dropped: its key (if any) is free again.
    Released(Option<Arc<str>>),
    /// The delivery failed and is to be retried in place after this delay; its key stays
    /// parked.
    Parked(Box<Delivery>, Duration),
}

/// Receiving failed: counted, logged, and paused for `backoff`, which doubles up to its bound
/// for the next failure.
fn receive_failed(
    error: &Error,
    report: &mut ConsumerReport,
    resume_at: &mut Option<Instant>,
    backoff: &mut Duration,
) {
    report.receive_errors += 1;
    tracing::warn!(
        %error,
        retry_in = ?*backoff,
        "receiving from the subscription failed"
    );
    *resume_at = Some(Instant::now() + *backoff);
    *backoff = (*backoff * 2).min(RECEIVE_BACKOFF_MAX);
}

/// Records a finished handler in `report` and frees its key in `waiting`, or parks its
/// delivery there for a retry in place.
fn finish(report: &mut ConsumerReport, waiting: &mut KeyQueue, joined: Joined) {
    match report.record(joined) {
        Finished::Released(key) => waiting.finished(key.as_deref()),
        Finished::Parked(delivery, after) => {
            waiting.park(*delivery, Instant::now() + after);
            report.note_parked(waiting);
        }
    }
}

impl ConsumerReport {
    /// Counts one finished task: whether its key is free again, or parked.
    fn record(&mut self, joined: Joined) -> Finished {
        match joined.result {
            Ok(processed) => {
                self.panicked += u64::from(processed.panicked);
                self.undecodable += u64::from(processed.undecodable);
                if let Some(parked) = processed.parked {
                    self.retried_in_place += 1;
                    let (delivery, after) = *parked;
                    return Finished::Parked(Box::new(delivery), after);
                }
                match processed.settled {
                    Some(Settled::Acked) => self.acked += 1,
                    Some(Settled::Retried) => self.retried += 1,
                    Some(Settled::Rejected) => self.rejected += 1,
                    None => self.unsettled += 1,
                }
            }
            Err(Failed::Aborted) => self.abandoned += 1,
            Err(Failed::Crashed(error)) => {
                // Panics of the handler and of settling are caught in `process`; this is
                // whatever is left. Unwinding dropped the delivery, so it is redelivered.
                tracing::error!(%error, "a handler failed");
                self.unsettled += 1;
            }
        }
        Finished::Released(joined.key)
    }

    /// Counts a task that finished after shutdown began: a delivery it would have parked is
    /// dropped unsettled instead, for the broker to redeliver.
    fn record_at_shutdown(&mut self, joined: Joined) {
        if let Finished::Parked(delivery, _) = self.record(joined) {
            drop(delivery);
            self.abandoned += 1;
        }
    }

    fn note_parked(&mut self, waiting: &KeyQueue) {
        self.peak_parked_keys = self.peak_parked_keys.max(waiting.parked_keys() as u64);
        self.peak_parked_deliveries = self.peak_parked_deliveries.max(waiting.held() as u64);
    }
}

/// Deliveries received but not started: the ready ones in arrival order; for each key with a
/// delivery running, ready or parked, the later ones of that key; and the parked deliveries,
/// waiting for their retry in place.
///
/// Two counts bound what is held: `pending` (ready, and waiting behind a key that is running
/// or ready) against the consumer's `max_pending`, and `held` (parked, and waiting behind a
/// parked key) against its `max_parked`, so a parked key never stops the other keys' flow
/// before its own bound.
#[derive(Default)]
struct KeyQueue {
    ready: VecDeque<Delivery>,
    /// Present for a key while one of its deliveries is running, ready or parked. Shared with
    /// the running handler of the key, which hands it back when it finishes.
    blocked: HashMap<Arc<str>, Later>,
    /// Parked deliveries by the time their retry is due (and a sequence number, for ties).
    parked: BTreeMap<(Instant, u64), Delivery>,
    seq: u64,
    pending: usize,
    held: usize,
    parked_keys: usize,
}

/// The later deliveries of one key, and whether the key is parked.
#[derive(Default)]
struct Later {
    deliveries: VecDeque<Delivery>,
    parked: bool,
}

impl KeyQueue {
    fn push(&mut self, delivery: Delivery) {
        let Some(key) = &delivery.envelope().key else {
            self.pending += 1;
            self.ready.push_back(delivery);
            return;
        };
        if let Some(later) = self.blocked.get_mut(key.as_str()) {
            if later.parked {
                self.held += 1;
            } else {
                self.pending += 1;
            }
            later.deliveries.push_back(delivery);
        } else {
            self.blocked
                .insert(Arc::from(key.as_str()), Later::default());
            self.pending += 1;
            self.ready.push_back(delivery);
        }
    }

    /// The next delivery to run, with its key (shared, not copied) if it has one.
    fn pop_ready(&mut self) -> Option<(Delivery, Option<Arc<str>>)> {
        let delivery = self.ready.pop_front()?;
        self.pending -= 1;
        let key = delivery.envelope().key.as_deref().map(|key| {
            match self.blocked.get_key_value(key) {
                Some((key, _)) => key.clone(),
                // A ready keyed delivery always has its key blocked; should that change, the
                // key is copied and releasing it finds nothing to release.
                None => Arc::from(key),
            }
        });
        Some((delivery, key))
    }

    /// The delivery of `key` that was running has been settled: the next of that key is ready.
    fn finished(&mut self, key: Option<&str>) {
        let Some(key) = key else { return };
        let Some(later) = self.blocked.get_mut(key) else {
            return;
        };
        match later.deliveries.pop_front() {
            Some(next) => self.ready.push_back(next),
            None => {
                self.blocked.remove(key);
            }
        }
    }

    /// The running delivery of its key failed: it waits here until `due`, and so do the later
    /// ones of its key.
    fn park(&mut self, delivery: Delivery, due: Instant) {
        match delivery
            .envelope()
            .key
            .as_ref()
            .and_then(|key| self.blocked.get_mut(key.as_str()))
        {
            Some(later) => {
                later.parked = true;
                self.pending -= later.deliveries.len();
                self.held += later.deliveries.len() + 1;
                self.parked_keys += 1;
            }
            // Only keyed deliveries are parked, and a running key is always blocked; should
            // that change, the delivery still runs again.
            None => self.held += 1,
        }
        self.seq += 1;
        self.parked.insert((due, self.seq), delivery);
    }

    /// When the next parked delivery is due.
    fn next_due(&self) -> Option<Instant> {
        self.parked.first_key_value().map(|((due, _), _)| *due)
    }

    /// Makes every parked delivery due by `now` ready, as its next attempt; its key's later
    /// deliveries count as pending again.
    fn release_due(&mut self, now: Instant) {
        while let Some(entry) = self.parked.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let mut delivery = entry.remove();
            delivery.retry_in_place();
            match delivery
                .envelope()
                .key
                .as_ref()
                .and_then(|key| self.blocked.get_mut(key.as_str()))
            {
                Some(later) => {
                    later.parked = false;
                    self.held -= later.deliveries.len() + 1;
                    self.pending += later.deliveries.len() + 1;
                    self.parked_keys -= 1;
                }
                None => {
                    self.held -= 1;
                    self.pending += 1;
                }
            }
            self.ready.push_front(delivery);
        }
    }

    /// Deliveries ready or waiting behind a key that is running or ready.
    fn pending(&self) -> usize {
        self.pending
    }

    /// Deliveries parked or waiting behind a parked key.
    fn held(&self) -> usize {
        self.held
    }

    fn parked_keys(&self) -> usize {
        self.parked_keys
    }

    fn is_empty(&self) -> bool {
        self.pending == 0 && self.held == 0
    }

    /// Extends the lease of every waiting delivery, so that none is redelivered elsewhere while
    /// it waits here for a slot, for its key, or for its retry in place.
    async fn keep_alive(&self) {
        let waiting: Vec<&Delivery> = self
            .ready
            .iter()
            .chain(self.blocked.values().flat_map(|later| &later.deliveries))
            .chain(self.parked.values())
            .collect();
        for some in waiting.chunks(KEEP_ALIVE_CONCURRENCY) {
            let extended = futures::future::join_all(some.iter().map(|d| d.in_progress())).await;
            if let Some(error) = extended.into_iter().find_map(Result::err) {
                tracing::warn!(%error, "extending the lease of waiting deliveries failed");
            }
        }
    }

    /// Drops every waiting and parked delivery (abandoning them); returns how many. A key's
    /// earlier deliveries go first (the parked ones, then the ready ones, then those waiting
    /// behind them, in order), so a broker that requeues in the order it is told gets each
    /// key back in its order.
    fn clear(&mut self) -> u64 {
        let dropped = (self.pending + self.held) as u64;
        while self.parked.pop_first().is_some() {}
        while self.ready.pop_front().is_some() {}
        for (_, mut later) in self.blocked.drain() {
            while later.deliveries.pop_front().is_some() {}
        }
        self.pending = 0;
        self.held = 0;
        self.parked_keys = 0;
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
    /// `None` when the delivery was dropped unsettled or parked.
    settled: Option<Settled>,
    /// The delivery to retry in place after the delay ([`KeyOrder::Ordered`]). Boxed: the
    /// task's output is moved several times, and most carry none.
    parked: Option<Box<(Delivery, Duration)>>,
}

/// What every handler task of one run shares.
struct Run<H> {
    handler: Arc<H>,
    settle_attempts: u32,
    heartbeat: Option<Duration>,
    key_order: KeyOrder,
}

/// A finished handler (task or inline future): the key it held, and what it did.
struct Joined {
    key: Option<Arc<str>>,
    result: Result<Processed, Failed>,
}

/// How a handler ended without a [`Processed`]; its delivery was dropped unsettled.
enum Failed {
    /// Aborted at the end of the shutdown timeout.
    Aborted,
    /// What `process` does not catch failed (the span around it, or the task itself).
    Crashed(String),
}

/// The running handlers, and the key each one holds. Handlers are either futures polled here,
/// inside the consumer's task (`inline`, the default), or tokio tasks (`tasks`, with
/// [`Consumer::with_task_per_delivery`]; those with a key are in `keys`); a run uses one kind.
struct Running<F> {
    inline: FuturesUnordered<F>,
    tasks: JoinSet<Processed>,
    keys: HashMap<Id, Arc<str>>,
}

/// The handler of `delivery` as a future for [`Running::push`]: it carries its key, and a
/// panic that `process` did not catch ends it as [`Failed::Crashed`] instead of unwinding
/// through the consumer.
fn inline<'a, H: Handler>(
    delivery: Delivery,
    key: Option<Arc<str>>,
    run: &'a Run<H>,
) -> impl Future<Output = Joined> + Send + 'a {
    let span = delivery_span(&delivery);
    AssertUnwindSafe(process(run, delivery).instrument(span))
        .catch_unwind()
        .map(move |result| Joined {
            key,
            result: result.map_err(|payload| {
                Failed::Crashed(
                    Panicked::from_payload(payload.as_ref())
                        .message()
                        .to_owned(),
                )
            }),
        })
}

/// Trace level and not named like the OpenTelemetry `process {topic}` span: log context for
/// the handler's own events, not a second span per message in exported traces.
fn delivery_span(delivery: &Delivery) -> tracing::Span {
    tracing::trace_span!(
        "bus.delivery",
        message_id = %delivery.envelope().id,
        kind = %delivery.envelope().kind,
        attempt = delivery.attempt(),
        source = delivery.source(),
    )
}

impl<F: Future<Output = Joined>> Running<F> {
    fn new() -> Self {
        Self {
            inline: FuturesUnordered::new(),
            tasks: JoinSet::new(),
            keys: HashMap::new(),
        }
    }

    /// Runs a handler ([`inline`]) inside the consumer's task.
    fn push(&mut self, handling: F) {
        self.inline.push(handling);
    }

    /// Runs the handler of `delivery` as a tokio task.
    fn spawn<H: Handler>(&mut self, delivery: Delivery, key: Option<Arc<str>>, run: &Run<H>) {
        let span = delivery_span(&delivery);
        // Boxed: tokio copies a task's future each time it moves it into place, and this one
        // carries the whole settling state.
        let task = Box::pin(process_owned(
            run.handler.clone(),
            delivery,
            run.settle_attempts,
            run.heartbeat,
            run.key_order,
        ))
        .instrument(span);
        let id = self.tasks.spawn(task).id();
        if let Some(key) = key {
            self.keys.insert(id, key);
        }
    }

    /// The next finished handler, with the key it held: also for one that failed, so that its
    /// key is never left blocked.
    async fn join_next(&mut self) -> Option<Joined> {
        if self.tasks.is_empty() {
            return self.inline.next().await;
        }
        let joined = self.tasks.join_next_with_id().await?;
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(error) => error.id(),
        };
        let key = if self.keys.is_empty() {
            None
        } else {
            self.keys.remove(&id)
        };
        Some(Joined {
            key,
            result: joined
                .map(|(_, processed)| processed)
                .map_err(|error: JoinError| {
                    if error.is_cancelled() {
                        Failed::Aborted
                    } else {
                        Failed::Crashed(error.to_string())
                    }
                }),
        })
    }

    /// Stops every running handler: the inline ones are dropped here (their deliveries
    /// abandoned) and counted in the result; the tasks are aborted and
    /// [`join_next`](Self::join_next) then returns each as [`Failed::Aborted`].
    fn abort_all(&mut self) -> u64 {
        let dropped = self.inline.len() as u64;
        self.inline.clear();
        self.tasks.abort_all();
        dropped
    }

    fn len(&self) -> usize {
        self.inline.len() + self.tasks.len()
    }

    fn is_empty(&self) -> bool {
        self.inline.is_empty() && self.tasks.is_empty()
    }
}

/// [`process`] with what it needs owned, for a task of its own.
async fn process_owned<H: Handler>(
    handler: Arc<H>,
    delivery: Delivery,
    settle_attempts: u32,
    heartbeat: Option<Duration>,
    key_order: KeyOrder,
) -> Processed {
    let run = Run {
        handler,
        settle_attempts,
        heartbeat,
        key_order,
    };
    process(&run, delivery).await
}

/// Handles one delivery and settles it from the outcome, or hands it back to be retried in
/// place ([`KeyOrder::Ordered`], keyed deliveries). A delivery the adapter could not decode is
/// dead-lettered without running the handler. Panics of the handler (and of the
/// middleware around it) are failed attempts; a panic while settling leaves the delivery
/// unsettled. Either way the task ends normally, so the key it holds is released.
// Not an `async fn`, which would keep the delivery twice in its state (argument and local).
#[allow(clippy::manual_async_fn)]
fn process<H: Handler>(
    run: &Run<H>,
    delivery: Delivery,
) -> impl Future<Output = Processed> + Send + '_ {
    async move {
        let Run {
            handler,
            settle_attempts,
            heartbeat,
            key_order,
        } = run;
        let (settle_attempts, heartbeat, key_order) = (*settle_attempts, *heartbeat, *key_order);
        if let Some(reason) = delivery.undecodable() {
            let reason = format!("undecodable: {reason}");
            tracing::warn!(%reason, "dead-lettering a message that could not be decoded");
            let settlement = Settlement::Reject {
                reason,
                attempts: delivery.attempt(),
            };
            let settled = settle(delivery, settlement, settle_attempts)
                .await
                .then_some(Settled::Rejected);
            return Processed {
                panicked: false,
                undecodable: true,
                settled,
                parked: None,
            };
        }
        // Calling `handle` inside the future also catches a panic before its first await.
        let handled = AssertUnwindSafe(async { handler.handle(&delivery).await }).catch_unwind();
        let handled = async {
            let Some(every) = heartbeat else {
                return handled.await;
            };
            // The lease is extended beside the handler, for as long as it runs. Boxed, so that
            // the handler tasks of a subscription without a lease do not carry its timers.
            let keep_alive = Box::pin(async {
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
            });
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
        if let Outcome::Retry { after, error } = &outcome {
            if key_order == KeyOrder::Ordered && delivery.envelope().key.is_some() {
                let after = after.unwrap_or(MIN_RETRY_IN_PLACE);
                tracing::warn!(%error, ?after, "handler failed; will be retried in place, its key waits");
                return Processed {
                    panicked,
                    undecodable: false,
                    settled: None,
                    parked: Some(Box::new((delivery, after))),
                };
            }
        }
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
        let settlement = outcome.to_settlement(delivery.attempt());
        let settled = settle(delivery, settlement, settle_attempts)
            .await
            .then_some(settled);
        Processed {
            panicked,
            undecodable: false,
            settled,
            parked: None,
        }
    }
}

/// Settles `delivery`, trying again with backoff while the error is retryable; returns whether
/// it was settled. When not, the delivery is dropped unsettled and so redelivered.
// Not an `async fn`, which would keep the delivery twice in its state: once as its argument,
// once inside the settle future.
fn settle(
    delivery: Delivery,
    settlement: Settlement,
    attempts: u32,
) -> impl Future<Output = bool> + Send {
    use futures::future::Either;
    AssertUnwindSafe(delivery.settle(settlement.clone()))
        .catch_unwind()
        .then(move |first| match first {
            Ok(Ok(())) => Either::Left(std::future::ready(true)),
            // Boxed: every handler future would otherwise carry the retries' state (the
            // backoff timer, the delivery handed back) and be copied whole each time it moves.
            first => Either::Right(Box::pin(settle_again(first, settlement, attempts))),
        })
}

/// What [`settle`] does after its first try: gives up, or tries again with backoff.
async fn settle_again(
    mut settled: std::thread::Result<std::result::Result<(), SettleError>>,
    settlement: Settlement,
    attempts: u32,
) -> bool {
    let mut backoff = SETTLE_BACKOFF;
    let mut attempt = 1;
    loop {
        match settled {
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
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
                settled = AssertUnwindSafe(returned.settle(settlement.clone()))
                    .catch_unwind()
                    .await;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}
