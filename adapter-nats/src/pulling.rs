//! Pulling from a JetStream consumer for one subscription.
//!
//! `next()` reads the messages of the subscription's pull requests straight from their inbox,
//! with no task in between (as async-nats' own pull stream does): a task per message hop was
//! what kept the consumer below the raw client. A task per subscription does what is not per
//! message: it sends the pull requests (each for what the prefetch buffer has room for, the
//! next one once half of it is free, so that messages keep coming while the first half is
//! read), starts over with a new inbox (the consumer looked up again) after an error status, a
//! lost request or a reconnect, sweeps for messages the client cannot read (module `poison`),
//! and, when the subscription closes, reads until its open requests have ended and hands back
//! what was pulled and not handed out. A second task keeps the messages waiting in the buffer
//! from being redelivered (`extend`).
//!
//! Unlike async-nats' pull stream, this tells the server's status messages (no reply subject)
//! from stored messages (with one), so that a stored message whose header block carries a
//! status line (`NATS/1.0 408 …`) is delivered (and found undecodable) rather than taken for
//! the end of a request and redelivered for ever.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self};
use async_nats::StatusCode;
use futures::StreamExt;
use tokio::sync::{watch, Notify};

use crate::broker::{lock, Inner};
use crate::poison;

/// How long one pull (batch) request stays open on the server. Short, because a pull request
/// cannot be cancelled: closing a subscription waits for its open requests to end before
/// handing messages back, since the server may still send messages (redeliveries too) to them.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// How much longer than `PULL_EXPIRES` to wait for the end of a pull request.
const PULL_GRACE: Duration = Duration::from_secs(2);
/// How long the pull task waits before starting over after an error, at first and at most.
const BACKOFF: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long the pull task waits before sweeping again after a sweep failed, at first and at
/// most.
const SWEEP_RETRY: Duration = Duration::from_secs(1);
const SWEEP_RETRY_MAX: Duration = Duration::from_secs(60);
/// The shortest interval between two extensions of the buffered deliveries.
const MIN_EXTEND_EVERY: Duration = Duration::from_millis(100);
/// The header of a request's end status: how many messages it did not bring.
const PENDING_MESSAGES: &str = "Nats-Pending-Messages";

/// A delivery's turn at its acknowledgement subject: the buffer's extender holds it while it
/// sends `+WPI` for the delivery, settlement and `in_progress` take it first, so a `+WPI` is
/// never sent after (and never undoes the delay of) a `-NAK`.
pub(crate) type Turn = Arc<tokio::sync::Mutex<()>>;

/// What a pull subscription reads from, and how to make its consumer again.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) stream: String,
    pub(crate) config: pull::Config,
    /// The topic or queue name, as the user gave it.
    /// Shared with every delivery and its settlement (`Delivery::with_shared_names`).
    pub(crate) source: Arc<str>,
    pub(crate) group: Option<Arc<str>>,
    /// A private subscription: its consumer is deleted when it closes.
    pub(crate) private: bool,
}

impl Spec {
    fn sweep_target(&self) -> poison::Target {
        poison::Target {
            stream: self.stream.clone(),
            consumer: self.config.durable_name.clone().unwrap_or_default(),
            source: self.source.to_string(),
            group: self.group.as_deref().map(str::to_owned),
        }
    }
}

/// A stored message pulled for the subscription, and its turn if the extender may have seen
/// it (a message `next()` read from the inbox itself was never extended by anyone else).
#[derive(Debug)]
pub(crate) struct Pulled {
    pub(crate) message: async_nats::Message,
    pub(crate) turn: Option<Turn>,
}

/// The pulled messages of one subscription, shared by `next()`, its pull task and its
/// extender.
pub(crate) struct Buffer {
    state: Mutex<State>,
    /// Wakes the pull task: the buffer has room for another request, or a request failed.
    wake: Notify,
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer").finish_non_exhaustive()
    }
}

struct State {
    /// The prefetch: at most this many messages asked for and not handed out.
    batch: usize,
    /// The inbox of the current pull requests (none between two).
    inbox: Option<async_nats::Subscriber>,
    /// Messages taken out of the inbox before `next()` asked for them (by the extender, or at
    /// the end of an inbox), in arrival order: handed out before the inbox's.
    waiting: VecDeque<Waiting>,
    /// Messages the open requests asked for and that have not arrived (nor been given up by
    /// the end status of their request).
    owed: usize,
    /// Whether the pull task was woken and has not looked at the buffer since.
    asked: bool,
    /// Why the current requests failed (an error status, the inbox closed).
    failed: Option<String>,
    /// Stored messages received so far, so the pull task sees progress.
    received: u64,
    /// Set when the subscription stops: `next()` returns `None`.
    ended: bool,
    /// The task waiting in `next()`, woken when the inbox changes or messages are taken out.
    waker: Option<Waker>,
    /// When messages were last taken out of the inbox: those there now arrived since.
    drained: Instant,
    numbered: u64,
}

/// One message taken out of the inbox and waiting to be handed out.
struct Waiting {
    number: u64,
    message: async_nats::Message,
    /// When it arrived (at the latest) or was last extended.
    extended: Instant,
    turn: Turn,
}

impl Buffer {
    pub(crate) fn new(batch: usize) -> Self {
        Self {
            state: Mutex::new(State {
                batch: batch.max(1),
                inbox: None,
                waiting: VecDeque::new(),
                owed: 0,
                asked: false,
                failed: None,
                received: 0,
                ended: false,
                waker: None,
                drained: Instant::now(),
                numbered: 0,
            }),
            wake: Notify::new(),
        }
    }

    /// The next stored message, `None` once the subscription stopped. Cancel safe: nothing is
    /// held outside the buffer between two polls.
    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Pulled>> {
        let mut state = lock(&self.state);
        let next = state.poll_next(cx);
        let tell = state.tell();
        drop(state);
        if tell {
            self.wake.notify_one();
        }
        next
    }

    /// Takes what the inbox holds into the waiting list (for the extender and the pull task).
    async fn drain(&self) {
        // Unconstrained: tokio's budget would otherwise end the drain after 128 messages.
        let tell = tokio::task::unconstrained(async {
            let mut state = lock(&self.state);
            state.drain();
            state.tell()
        })
        .await;
        if tell {
            self.wake.notify_one();
        }
    }

    /// How many messages a request should ask for now, counted as owed, if any.
    fn to_request(&self) -> Option<usize> {
        let mut state = lock(&self.state);
        state.asked = false;
        if state.ended || state.inbox.is_none() || state.failed.is_some() {
            return None;
        }
        let buffered = state.owed + state.waiting.len();
        if buffered > state.batch / 2 {
            return None;
        }
        let wanted = state.batch - buffered;
        state.owed += wanted;
        Some(wanted)
    }

    /// Starts reading `inbox`, where the next requests send their messages.
    fn install(&self, inbox: async_nats::Subscriber) {
        let mut state = lock(&self.state);
        state.inbox = Some(inbox);
        state.owed = 0;
        state.failed = None;
        state.wake();
    }

    /// Stops reading the current inbox, keeping what it holds, and returns it (its requests are
    /// given up: dropping it unsubscribes, and what the server still sends there is
    /// redelivered after the ack wait).
    fn uninstall(&self) -> Option<async_nats::Subscriber> {
        let mut state = lock(&self.state);
        state.drain();
        state.owed = 0;
        state.failed = None;
        state.wake();
        state.inbox.take()
    }

    /// Ends the subscription for `next()` and takes the inbox out, for the pull task to read
    /// until its requests have ended.
    fn end(&self) -> Option<async_nats::Subscriber> {
        let mut state = lock(&self.state);
        state.ended = true;
        state.wake();
        state.inbox.take()
    }

    /// Keeps a message read from the inbox after the end, to hand it back; returns how many
    /// messages are still owed.
    fn keep(&self, message: async_nats::Message) -> usize {
        let mut state = lock(&self.state);
        state.take_in(message);
        if state.failed.is_some() {
            0
        } else {
            state.owed
        }
    }

    /// `(owed, failed, received)`.
    fn status(&self) -> (usize, Option<String>, u64) {
        let state = lock(&self.state);
        (state.owed, state.failed.clone(), state.received)
    }
}

impl State {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Pulled>> {
        loop {
            if self.ended {
                return Poll::Ready(None);
            }
            if let Some(waiting) = self.waiting.pop_front() {
                return Poll::Ready(Some(Pulled {
                    message: waiting.message,
                    turn: Some(waiting.turn),
                }));
            }
            let Some(inbox) = self.inbox.as_mut() else {
                break;
            };
            match inbox.poll_next_unpin(cx) {
                Poll::Ready(Some(message)) => {
                    if let Some(message) = self.receive(message) {
                        return Poll::Ready(Some(Pulled {
                            message,
                            turn: None,
                        }));
                    }
                }
                Poll::Ready(None) => {
                    self.closed_inbox();
                    break;
                }
                Poll::Pending => break,
            }
        }
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Accounts for a message from the inbox: a stored message is returned, a status ends a
    /// request (or all of them, with an error).
    fn receive(&mut self, message: async_nats::Message) -> Option<async_nats::Message> {
        // The server's status messages never carry a reply subject.
        if message.reply.is_some() {
            self.owed = self.owed.saturating_sub(1);
            self.received += 1;
            return Some(message);
        }
        match message.status {
            Some(StatusCode::IDLE_HEARTBEAT) | None => {}
            Some(StatusCode::TIMEOUT | StatusCode::NOT_FOUND) => {
                // One request ended (expired): what it did not bring is no longer owed.
                let unfilled = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(PENDING_MESSAGES))
                    .and_then(|v| v.as_str().trim().parse().ok())
                    .unwrap_or(self.owed);
                self.owed = self.owed.saturating_sub(unfilled);
            }
            Some(status) => {
                self.failed.get_or_insert_with(|| {
                    format!(
                        "the pull request ended with status {status} ({})",
                        message.description.as_deref().unwrap_or_default()
                    )
                });
            }
        }
        None
    }

    /// Like `receive`, keeping a stored message in the waiting list.
    fn take_in(&mut self, message: async_nats::Message) {
        if let Some(message) = self.receive(message) {
            self.numbered += 1;
            self.waiting.push_back(Waiting {
                number: self.numbered,
                message,
                extended: self.drained,
                turn: Turn::default(),
            });
        }
    }

    /// Takes whatever the inbox holds now into the waiting list, keeping the registration of
    /// the task waiting in `next()`.
    fn drain(&mut self) {
        let Some(mut inbox) = self.inbox.take() else {
            return;
        };
        let waker = self.waker.clone().unwrap_or_else(futures::task::noop_waker);
        let mut cx = Context::from_waker(&waker);
        let before = self.waiting.len();
        // What is in the inbox arrived after the last drain took everything.
        let now = Instant::now();
        let open = loop {
            match inbox.poll_next_unpin(&mut cx) {
                Poll::Ready(Some(message)) => self.take_in(message),
                Poll::Ready(None) => break false,
                Poll::Pending => break true,
            }
        };
        self.drained = now;
        if open {
            self.inbox = Some(inbox);
        } else {
            self.closed_inbox();
        }
        if self.waiting.len() > before {
            self.wake();
        }
    }

    fn closed_inbox(&mut self) {
        self.inbox = None;
        self.failed
            .get_or_insert_with(|| "the client closed the pull requests' inbox".to_owned());
    }

    /// Whether to wake the pull task: the buffer is half empty or the requests failed (once,
    /// until the task looks).
    fn tell(&mut self) -> bool {
        let room = self.inbox.is_some() && self.owed + self.waiting.len() <= self.batch / 2;
        if self.asked || !(room || self.failed.is_some()) {
            return false;
        }
        self.asked = true;
        true
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// One inbox and the requests sent to it.
struct Session {
    inbox: async_nats::Subject,
    /// The client's connection count when it started.
    connects: u64,
    /// When the last request must have ended, if one was sent.
    deadline: Option<tokio::time::Instant>,
}

/// How a session ended.
enum Ended {
    Stop,
    /// A request ended without the server's word, or the connection was re-established.
    Lost,
    Failed(String),
}

impl Session {
    async fn start(inner: &Inner, buffer: &Buffer) -> Result<Self, String> {
        let connects = connects(inner);
        let inbox = inner.client.new_inbox();
        let subscriber = inner
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| e.to_string())?;
        buffer.install(subscriber);
        Ok(Self {
            inbox: inbox.into(),
            connects,
            deadline: None,
        })
    }

    fn reconnected(&self, inner: &Inner) -> bool {
        connects(inner) != self.connects
    }

    /// Sends requests as the buffer makes room, until the session ends.
    async fn serve(
        &mut self,
        inner: &Inner,
        consumer: &PullConsumer,
        buffer: &Buffer,
        backoff: &mut Duration,
        stop: &mut watch::Receiver<bool>,
        closed: &mut watch::Receiver<bool>,
    ) -> Ended {
        let mut received = buffer.status().2;
        loop {
            if let Some(wanted) = buffer.to_request() {
                let request = pull::BatchConfig {
                    batch: wanted,
                    expires: Some(PULL_EXPIRES),
                    ..pull::BatchConfig::default()
                };
                if let Err(e) = consumer.request_batch(request, self.inbox.clone()).await {
                    return Ended::Failed(format!("sending a pull request failed: {e}"));
                }
                // The server ends the request at expiry (408); this bounds the wait when that
                // status is lost with the connection.
                self.deadline = Some(tokio::time::Instant::now() + PULL_EXPIRES + PULL_GRACE);
            }
            let sleep = async {
                match self.deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = buffer.wake.notified() => {}
                () = sleep => {}
                () = stopped(stop) => return Ended::Stop,
                () = stopped(closed) => return Ended::Stop,
            }
            let (owed, failed, now_received) = buffer.status();
            if now_received != received {
                received = now_received;
                *backoff = BACKOFF;
            }
            if let Some(reason) = failed {
                return Ended::Failed(reason);
            }
            if self.reconnected(inner) {
                return Ended::Lost;
            }
            if owed == 0 {
                self.deadline = None;
            } else if self
                .deadline
                .is_some_and(|d| tokio::time::Instant::now() >= d)
            {
                // The end status may be waiting in the inbox, unread.
                buffer.drain().await;
                if buffer.status().0 > 0 {
                    return Ended::Lost;
                }
                self.deadline = None;
            }
        }
    }

    /// Reads the inbox until every open request has ended (filled, or expired after at most
    /// `PULL_EXPIRES`), keeping what arrives to hand it back: a nak while a request is still
    /// open would have the server redeliver the message to that same request, which is about
    /// to go away, and the message would then wait out the whole ack wait.
    async fn finish(&self, inner: &Inner, buffer: &Buffer) {
        let Some(mut inbox) = buffer.end() else {
            return;
        };
        let mut owed = buffer.status().0;
        if let Some(deadline) = self.deadline {
            while owed > 0 && !self.reconnected(inner) {
                match tokio::time::timeout_at(deadline, inbox.next()).await {
                    Ok(Some(message)) => owed = buffer.keep(message),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        while let Some(Some(message)) = futures::FutureExt::now_or_never(inbox.next()) {
            buffer.keep(message);
        }
    }
}

fn connects(inner: &Inner) -> u64 {
    inner.client.statistics().connects.load(Ordering::Relaxed)
}

/// The pull task of a subscription (module docs): pulls from `consumer` until told to stop,
/// starting over (with the consumer looked up or made again) after errors such as a server
/// restart; then hands back what was pulled and not handed out.
pub(crate) async fn run(
    inner: Arc<Inner>,
    spec: Arc<Spec>,
    consumer: PullConsumer,
    buffer: Arc<Buffer>,
    mut stop: watch::Receiver<bool>,
) {
    let mut closed = inner.closed_signal();
    let mut consumer = Some(consumer);
    let mut backoff = BACKOFF;
    let mut sweeper = poison::Sweeper::new(spec.sweep_target());
    // When to sweep for messages the client cannot read (module `poison`), if it is due.
    let mut sweep_at: Option<tokio::time::Instant> = None;
    let mut sweep_retry = SWEEP_RETRY;
    loop {
        if *stop.borrow() || inner.is_closed() {
            break;
        }
        let current = match consumer.take() {
            Some(c) => Ok(c),
            None => tokio::select! {
                c = inner.consumer(&spec.stream, &spec.config) => c,
                () = stopped(&mut stop) => break,
                () = stopped(&mut closed) => break,
            },
        };
        if let (Ok(c), Some(at)) = (&current, sweep_at) {
            if tokio::time::Instant::now() >= at {
                let swept = tokio::select! {
                    swept = sweeper.run(&inner, c) => swept,
                    () = stopped(&mut stop) => break,
                    () = stopped(&mut closed) => break,
                };
                match swept {
                    Ok(()) => {
                        sweep_at = None;
                        sweep_retry = SWEEP_RETRY;
                    }
                    Err(e) => {
                        tracing::warn!(
                            stream = %spec.stream,
                            error = %e,
                            "looking for messages the client cannot read failed; trying again \
                             in {sweep_retry:?}"
                        );
                        sweep_at = Some(tokio::time::Instant::now() + sweep_retry);
                        sweep_retry = (sweep_retry * 2).min(SWEEP_RETRY_MAX);
                    }
                }
            }
        }
        let started = match current {
            Ok(c) => Session::start(&inner, &buffer).await.map(|s| (c, s)),
            Err(e) => Err(e.to_string()),
        };
        let failure = match started {
            Ok((c, mut session)) => {
                let ended = session
                    .serve(&inner, &c, &buffer, &mut backoff, &mut stop, &mut closed)
                    .await;
                if matches!(ended, Ended::Stop) {
                    session.finish(&inner, &buffer).await;
                    break;
                }
                drop(buffer.uninstall());
                if session.reconnected(inner.as_ref()) || matches!(ended, Ended::Lost) {
                    // Perhaps cut by a message the client cannot read, which would be
                    // redelivered (and cut the connection) for ever.
                    sweep_at.get_or_insert_with(tokio::time::Instant::now);
                }
                match ended {
                    Ended::Failed(e) => {
                        tracing::warn!(
                            stream = %spec.stream,
                            error = %e,
                            "pulling from JetStream failed; pulling again in {backoff:?}"
                        );
                        true
                    }
                    _ => {
                        consumer = Some(c);
                        false
                    }
                }
            }
            Err(e) => {
                tracing::warn!(
                    stream = %spec.stream,
                    error = %e,
                    "starting a JetStream pull failed; retrying in {backoff:?}"
                );
                true
            }
        };
        if failure {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stopped(&mut stop) => break,
                () = stopped(&mut closed) => break,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
    hand_back(&inner, &buffer).await;
}

/// Naks what was pulled and not handed out, once the requests have ended.
async fn hand_back(inner: &Inner, buffer: &Buffer) {
    let (inbox, waiting) = {
        let mut state = lock(&buffer.state);
        state.ended = true;
        state.wake();
        (state.inbox.take(), std::mem::take(&mut state.waiting))
    };
    drop(inbox);
    for waiting in waiting {
        let _turn = waiting.turn.lock().await;
        let message = jetstream::Message {
            message: waiting.message,
            context: inner.jetstream.clone(),
        };
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
}

/// Keeps the messages waiting in a subscription's buffer from being redelivered: at a third of
/// the ack wait, takes what the inbox holds into the buffer and sends `+WPI` for every message
/// there that arrived or was extended more than a sixth of it ago. Without it a slow
/// consumer's buffered messages were redelivered while they waited, and arrived twice with
/// inflated attempts. Ends with the subscription.
pub(crate) async fn extend(
    inner: Arc<Inner>,
    buffer: Weak<Buffer>,
    mut stop: watch::Receiver<bool>,
) {
    let mut closed = inner.closed_signal();
    let every = (inner.config.ack_wait() / 3).max(MIN_EXTEND_EVERY);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stopped(&mut stop) => return,
            () = stopped(&mut closed) => return,
        }
        let Some(buffer) = buffer.upgrade() else {
            return;
        };
        buffer.drain().await;
        // Each message's turn is taken while it is still in the buffer: once `next()` has
        // handed it out, its holder settles or extends it, never this task.
        let due: Vec<(u64, async_nats::Subject, tokio::sync::OwnedMutexGuard<()>)> = {
            let state = lock(&buffer.state);
            state
                .waiting
                .iter()
                .filter(|w| w.extended.elapsed() >= every / 2)
                .filter_map(|w| {
                    let reply = w.message.reply.clone()?;
                    let turn = w.turn.clone().try_lock_owned().ok()?;
                    Some((w.number, reply, turn))
                })
                .collect()
        };
        for (number, reply, _turn) in due {
            let sent = Instant::now();
            match inner
                .client
                .publish(reply, bytes::Bytes::from_static(b"+WPI"))
                .await
            {
                Ok(()) => {
                    let mut state = lock(&buffer.state);
                    if let Some(w) = state.waiting.iter_mut().find(|w| w.number == number) {
                        w.extended = sent;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "extending a buffered message failed"),
            }
        }
    }
}

/// Completes once the flag is set (or its sender is gone).
pub(crate) async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}
