//! One consumer group's (or one queue's) messages: the reference delivery semantics.
//!
//! Messages wait in publish order. A member takes the first message that is due and whose key
//! is not in flight, so a key is only ever at one member at a time and comes in publish order
//! (like an SQS FIFO message group). A nacked or abandoned message goes back in its original
//! place, so it stays ahead of the later messages of its key.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bus_core::{Backlog, Envelope, Error, ErrorKind, Result};
use tokio::sync::Notify;
use tokio::time::Instant;

/// A message held by a buffer.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Position in publish order, kept across redeliveries.
    pub(crate) seq: u64,
    pub(crate) envelope: Envelope,
    /// The attempt the next delivery of this entry will be (1 on the first).
    pub(crate) attempt: u32,
    /// Not deliverable before this instant (nack with delay, delayed publish).
    pub(crate) not_before: Option<Instant>,
    /// Published with a delay and not delivered yet: unlike a nacked message it was not
    /// published yet as far as its key is concerned, so it holds none of its key back.
    pub(crate) scheduled: bool,
    /// When it was pushed, for [`Backlog::oldest_age`].
    pub(crate) pushed: Instant,
    /// When the first attempt failed, for the dead-letter headers.
    pub(crate) first_failure: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    /// Waiting messages, sorted by `seq`.
    ready: VecDeque<Entry>,
    in_flight: usize,
    keys_in_flight: HashSet<String>,
    members: usize,
    /// Waiting messages without a key.
    ready_unkeyed: usize,
    /// Waiting messages per key.
    ready_keys: HashMap<String, usize>,
    /// How many keys of `ready_keys` are not in flight: when none is and no waiting message
    /// is without a key, nothing can be taken, which `take` then knows without looking at any
    /// message or key.
    ready_keys_free: usize,
    /// Members waiting for `readable`, publishers waiting for `writable`: nobody to notify
    /// otherwise.
    readers_waiting: usize,
    writers_waiting: usize,
}

impl State {
    fn count_ready(&mut self, key: Option<&String>) {
        match key {
            None => self.ready_unkeyed += 1,
            Some(key) => match self.ready_keys.get_mut(key) {
                Some(count) => *count += 1,
                None => {
                    self.ready_keys.insert(key.clone(), 1);
                    if !self.keys_in_flight.contains(key) {
                        self.ready_keys_free += 1;
                    }
                }
            },
        }
    }

    fn uncount_ready(&mut self, key: Option<&String>) {
        match key {
            None => self.ready_unkeyed -= 1,
            Some(key) => {
                if let Some(count) = self.ready_keys.get_mut(key) {
                    *count -= 1;
                    if *count == 0 {
                        self.ready_keys.remove(key);
                        if !self.keys_in_flight.contains(key) {
                            self.ready_keys_free -= 1;
                        }
                    }
                }
            }
        }
    }

    /// Whether no waiting message can be taken whatever its time: every one has a key that
    /// is in flight.
    fn all_keys_in_flight(&self) -> bool {
        debug_assert_eq!(
            self.ready_keys_free,
            self.ready_keys
                .keys()
                .filter(|key| !self.keys_in_flight.contains(*key))
                .count(),
            "the count of waiting keys not in flight is off"
        );
        self.ready_unkeyed == 0 && self.ready_keys_free == 0
    }

    /// `key` is in flight from now on (it was not).
    fn key_taken(&mut self, key: &str) {
        if self.ready_keys.contains_key(key) {
            self.ready_keys_free -= 1;
        }
        self.keys_in_flight.insert(key.to_owned());
    }

    /// `key` is no longer in flight.
    fn key_released(&mut self, key: &str) {
        if self.keys_in_flight.remove(key) && self.ready_keys.contains_key(key) {
            self.ready_keys_free += 1;
        }
    }
}

/// Faults to inject into one push (see [`Chaos`](crate::Chaos)).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Faults {
    pub(crate) copies: usize,
    pub(crate) delay: Option<std::time::Duration>,
}

impl Faults {
    pub(crate) const NONE: Faults = Faults {
        copies: 1,
        delay: None,
    };
}

/// What a member found when it looked for a message.
// Returned by value and matched at once, never stored: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Take {
    Taken(Entry),
    /// Nothing deliverable now; something becomes due at this instant, if anything.
    Wait(Option<Instant>),
}

/// A group's or queue's buffer.
#[derive(Debug)]
pub(crate) struct Buffer {
    /// The topic or queue this buffer belongs to.
    /// Shared with every delivery made from this buffer.
    pub(crate) source: Arc<str>,
    /// The consumer group, for topics (`None` for queues and private subscriptions).
    pub(crate) group: Option<Arc<str>>,
    capacity: usize,
    state: Mutex<State>,
    /// Signalled when a message may have become deliverable.
    readable: Notify,
    /// Signalled when room was freed.
    writable: Notify,
}

impl Buffer {
    pub(crate) fn new(source: &str, group: Option<&str>, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            source: Arc::from(source),
            group: group.map(Arc::from),
            capacity,
            state: Mutex::new(State::default()),
            readable: Notify::new(),
            writable: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-updated in a way that
        // loses messages (every update is a few infallible steps), so recover from poisoning.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `envelope` (as `faults` say: possibly twice, possibly held back), waiting until
    /// `deadline` for room. With `due`, the message is a delayed publish: not deliverable
    /// before that instant, and holding no later message of its key back meanwhile.
    pub(crate) async fn push(
        &self,
        envelope: Envelope,
        faults: Faults,
        due: Option<Instant>,
        deadline: Instant,
        closed: &crate::broker::Closed,
    ) -> Result<()> {
        let mut envelope = Some(envelope);
        // Most pushes find room: only a full buffer registers for `writable`.
        if self.try_push(&mut envelope, faults, due, false) {
            return Ok(());
        }
        loop {
            let writable = self.writable.notified();
            tokio::pin!(writable);
            writable.as_mut().enable();
            if self.try_push(&mut envelope, faults, due, true) {
                return Ok(());
            }
            let outcome = tokio::select! {
                () = &mut writable => Ok(()),
                () = closed.wait() => Err(Error::closed("the memory broker was closed")),
                () = tokio::time::sleep_until(deadline) => {
                    Err(Error::new(
                        ErrorKind::Backpressure,
                        format!(
                            "`{}`{} is full ({} messages): no room freed in time",
                            self.source,
                            self.group.as_deref().map(|g| format!(" group `{g}`")).unwrap_or_default(),
                            self.capacity
                        ),
                    ))
                }
            };
            self.state().writers_waiting -= 1;
            outcome?;
        }
    }

    /// Appends the envelope if there is room (taking it out of `envelope`); otherwise, when
    /// `waiting`, counts the caller among the publishers waiting for room.
    fn try_push(
        &self,
        envelope: &mut Option<Envelope>,
        faults: Faults,
        due: Option<Instant>,
        waiting: bool,
    ) -> bool {
        let copies = faults.copies.max(1);
        let mut state = self.state();
        if state.ready.len() + state.in_flight + copies > self.capacity {
            if waiting {
                state.writers_waiting += 1;
            }
            return false;
        }
        let pushed = Instant::now();
        let chaos = faults.delay.map(|d| pushed + d);
        let not_before = match (due, chaos) {
            (Some(due), Some(chaos)) => Some(due.max(chaos)),
            (due, chaos) => due.or(chaos),
        };
        for copy in 0..copies {
            let envelope = if copy + 1 == copies {
                envelope.take().expect("pushed once")
            } else {
                envelope.clone().expect("pushed once")
            };
            let seq = state.next_seq;
            state.next_seq += 1;
            state.count_ready(envelope.key.as_ref());
            state.ready.push_back(Entry {
                seq,
                envelope,
                attempt: 1,
                not_before,
                scheduled: due.is_some(),
                pushed,
                first_failure: None,
            });
        }
        let wake = state.readers_waiting > 0;
        drop(state);
        if wake {
            self.readable.notify_waiters();
        }
        true
    }

    /// Takes the first deliverable message, marking it (and its key) in flight. With
    /// `waiting`, a caller that finds none is counted among the members waiting for
    /// [`readable`](Buffer::readable) until it calls [`stop_waiting`](Buffer::stop_waiting).
    pub(crate) fn take(&self, waiting: bool) -> Take {
        let mut state = self.state();
        let found = if state.all_keys_in_flight() {
            Err(None)
        } else {
            Self::find(&state)
        };
        let index = match found {
            Ok(index) => index,
            Err(earliest) => {
                if waiting {
                    state.readers_waiting += 1;
                }
                return Take::Wait(earliest);
            }
        };
        let entry = state.ready.remove(index).expect("index found above");
        state.uncount_ready(entry.envelope.key.as_ref());
        state.in_flight += 1;
        if let Some(key) = &entry.envelope.key {
            state.key_taken(key);
        }
        Take::Taken(entry)
    }

    /// The index of the first deliverable message, or when the next may become due.
    fn find(state: &State) -> std::result::Result<usize, Option<Instant>> {
        // Read the clock only for a message held back (nack with delay): most have no delay.
        let mut now = None;
        let mut earliest: Option<Instant> = None;
        // Keys whose first waiting message is not due yet: their later ones wait behind it.
        let mut blocked: HashSet<&str> = HashSet::new();
        for (index, entry) in state.ready.iter().enumerate() {
            let key = entry.envelope.key.as_deref();
            if let Some(key) = key {
                // Only the first waiting message of a key may go, and only if no earlier one
                // of that key is in flight.
                if state.keys_in_flight.contains(key) || blocked.contains(key) {
                    continue;
                }
            }
            match entry.not_before {
                Some(due) if due > *now.get_or_insert_with(Instant::now) => {
                    earliest = Some(earliest.map_or(due, |e| e.min(due)));
                    // A delayed publish is not in its key's order until it is due.
                    if let (Some(key), false) = (key, entry.scheduled) {
                        blocked.insert(key);
                    }
                }
                _ => return Ok(index),
            }
        }
        Err(earliest)
    }

    /// Counts out a member that [`take`](Buffer::take) counted as waiting.
    pub(crate) fn stop_waiting(&self) {
        self.state().readers_waiting -= 1;
    }

    /// Waits until a message may have become deliverable or `until` passed.
    pub(crate) fn readable(&self) -> &Notify {
        &self.readable
    }

    /// Forgets an in-flight entry (ack, or reject after the dead letter was stored).
    pub(crate) fn settle(&self, entry: &Entry) {
        let mut state = self.state();
        Self::release(&mut state, entry);
        // Room was freed; and a message of the entry's key may go now.
        let wake_writers = state.writers_waiting > 0;
        let wake_readers = state.readers_waiting > 0 && entry.envelope.key.is_some();
        drop(state);
        if wake_readers {
            self.readable.notify_waiters();
        }
        if wake_writers {
            self.writable.notify_waiters();
        }
    }

    /// Puts an in-flight entry back in its place for another attempt.
    pub(crate) fn requeue(&self, mut entry: Entry, not_before: Option<Instant>) {
        let mut state = self.state();
        Self::release(&mut state, &entry);
        entry.attempt += 1;
        entry.not_before = not_before;
        // Delivered once, so it now has its place in its key's order.
        entry.scheduled = false;
        state.count_ready(entry.envelope.key.as_ref());
        let at = state.ready.partition_point(|e| e.seq < entry.seq);
        state.ready.insert(at, entry);
        let wake = state.readers_waiting > 0;
        drop(state);
        if wake {
            self.readable.notify_waiters();
        }
    }

    fn release(state: &mut State, entry: &Entry) {
        state.in_flight -= 1;
        if let Some(key) = &entry.envelope.key {
            state.key_released(key);
        }
    }

    /// Counts a member in; returns the new count.
    pub(crate) fn join(&self) -> usize {
        let mut state = self.state();
        state.members += 1;
        state.members
    }

    /// Counts a member out; returns how many remain.
    pub(crate) fn leave(&self) -> usize {
        let mut state = self.state();
        state.members = state.members.saturating_sub(1);
        state.members
    }

    /// What this buffer holds, exactly: due messages as `waiting`, those held back (delayed
    /// publish, nack with a delay, a chaos delay) as `delayed`, unsettled ones as `in_flight`.
    pub(crate) fn backlog(&self) -> Backlog {
        let state = self.state();
        let now = Instant::now();
        let mut backlog = Backlog::default();
        let mut delayed = 0;
        let mut oldest: Option<Instant> = None;
        for entry in &state.ready {
            match entry.not_before {
                Some(due) if due > now => delayed += 1,
                due => {
                    backlog.waiting += 1;
                    // A held-back message has waited since it became due.
                    let since = due.map_or(entry.pushed, |due| due.max(entry.pushed));
                    oldest = Some(oldest.map_or(since, |o| o.min(since)));
                }
            }
        }
        backlog.in_flight = Some(state.in_flight as u64);
        backlog.delayed = Some(delayed);
        backlog.oldest_age = oldest.map(|since| now.saturating_duration_since(since));
        backlog
    }

    /// Messages waiting plus in flight.
    pub(crate) fn len(&self) -> usize {
        let state = self.state();
        state.ready.len() + state.in_flight
    }
}
