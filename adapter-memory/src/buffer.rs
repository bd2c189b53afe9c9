//! One consumer group's (or one queue's) messages: the reference delivery semantics.
//!
//! Messages wait in publish order. A member takes the first message that is due and whose key
//! is not in flight, so a key is only ever at one member at a time and comes in publish order
//! (like an SQS FIFO message group). A nacked or abandoned message goes back in its original
//! place, so it stays ahead of the later messages of its key.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bus_core::{Envelope, Error, ErrorKind, Result};
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
    /// Not deliverable before this instant (nack with delay).
    pub(crate) not_before: Option<Instant>,
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
    pub(crate) source: String,
    /// The consumer group, for topics (`None` for queues and private subscriptions).
    pub(crate) group: Option<String>,
    capacity: usize,
    state: Mutex<State>,
    /// Signalled when a message may have become deliverable.
    readable: Notify,
    /// Signalled when room was freed.
    writable: Notify,
}

impl Buffer {
    pub(crate) fn new(source: &str, group: Option<String>, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            source: source.to_owned(),
            group,
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
    /// `deadline` for room.
    pub(crate) async fn push(
        &self,
        envelope: Envelope,
        faults: Faults,
        deadline: Instant,
        closed: &crate::broker::Closed,
    ) -> Result<()> {
        let copies = faults.copies.max(1);
        loop {
            let writable = self.writable.notified();
            tokio::pin!(writable);
            writable.as_mut().enable();
            {
                let mut state = self.state();
                if state.ready.len() + state.in_flight + copies <= self.capacity {
                    let not_before = faults.delay.map(|d| Instant::now() + d);
                    for _ in 0..copies {
                        let seq = state.next_seq;
                        state.next_seq += 1;
                        state.ready.push_back(Entry {
                            seq,
                            envelope: envelope.clone(),
                            attempt: 1,
                            not_before,
                            first_failure: None,
                        });
                    }
                    drop(state);
                    self.readable.notify_waiters();
                    return Ok(());
                }
            }
            tokio::select! {
                () = &mut writable => {}
                () = closed.wait() => return Err(Error::closed("the memory broker was closed")),
                () = tokio::time::sleep_until(deadline) => {
                    return Err(Error::new(
                        ErrorKind::Backpressure,
                        format!(
                            "`{}`{} is full ({} messages): no room freed in time",
                            self.source,
                            self.group.as_deref().map(|g| format!(" group `{g}`")).unwrap_or_default(),
                            self.capacity
                        ),
                    ));
                }
            }
        }
    }

    /// Takes the first deliverable message, marking it (and its key) in flight.
    pub(crate) fn take(&self) -> Take {
        let mut state = self.state();
        let now = Instant::now();
        let mut earliest: Option<Instant> = None;
        let mut found = None;
        {
            let mut blocked: HashSet<&str> = HashSet::new();
            for (index, entry) in state.ready.iter().enumerate() {
                if let Some(key) = entry.envelope.key.as_deref() {
                    // Only the first waiting message of a key may go, and only if no earlier
                    // one of that key is in flight.
                    if state.keys_in_flight.contains(key) || !blocked.insert(key) {
                        continue;
                    }
                }
                match entry.not_before {
                    Some(due) if due > now => {
                        earliest = Some(earliest.map_or(due, |e| e.min(due)));
                    }
                    _ => {
                        found = Some(index);
                        break;
                    }
                }
            }
        }
        let Some(index) = found else {
            return Take::Wait(earliest);
        };
        let entry = state.ready.remove(index).expect("index found above");
        state.in_flight += 1;
        if let Some(key) = &entry.envelope.key {
            state.keys_in_flight.insert(key.clone());
        }
        Take::Taken(entry)
    }

    /// Waits until a message may have become deliverable or `until` passed.
    pub(crate) fn readable(&self) -> &Notify {
        &self.readable
    }

    /// Forgets an in-flight entry (ack, or reject after the dead letter was stored).
    pub(crate) fn settle(&self, entry: &Entry) {
        let mut state = self.state();
        Self::release(&mut state, entry);
        drop(state);
        self.readable.notify_waiters();
        self.writable.notify_waiters();
    }

    /// Puts an in-flight entry back in its place for another attempt.
    pub(crate) fn requeue(&self, mut entry: Entry, not_before: Option<Instant>) {
        let mut state = self.state();
        Self::release(&mut state, &entry);
        entry.attempt += 1;
        entry.not_before = not_before;
        let at = state.ready.partition_point(|e| e.seq < entry.seq);
        state.ready.insert(at, entry);
        drop(state);
        self.readable.notify_waiters();
    }

    fn release(state: &mut State, entry: &Entry) {
        state.in_flight -= 1;
        if let Some(key) = &entry.envelope.key {
            state.keys_in_flight.remove(key);
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

    /// Messages waiting plus in flight.
    pub(crate) fn len(&self) -> usize {
        let state = self.state();
        state.ready.len() + state.in_flight
    }
}
