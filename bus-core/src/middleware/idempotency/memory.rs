//! An in-process store on a `moka` cache with per-entry expiry.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::ops::compute::Op;
use moka::sync::Cache;
use moka::Expiry;

use super::store::lease_lost;
use super::{Claim, ClaimToken, IdempotencyStore};
use crate::{Error, ErrorKind, Result};

/// How many keys a [`MemoryStore::new`] keeps at most.
pub const DEFAULT_MAX_KEYS: u64 = 1_000_000;

/// How long a claim's entry is kept past its lease, so that a completion within the lease
/// with a TTL up to this long changes the entry in place (a longer TTL makes a new entry): the
/// layer's default TTL. An entry whose claim expired unreleased is free all the same, only
/// kept (and counted against the bound on keys) until then.
const COMPLETION_ROOM: Duration = super::DEFAULT_TTL;

/// Longest lease or TTL the cache is given; longer ones are cut to it (the cache refuses
/// expiries beyond a few centuries).
const MAX_EXPIRY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// An [`IdempotencyStore`] in this process's memory: for a single consumer process, tests, and
/// the in-process broker. Consumers in other processes do not see it; use a shared store
/// (Redis, PostgreSQL) for a group spread over several processes.
///
/// Entries expire on their own (a claim with its lease, a completion with its TTL). The store
/// keeps at most a fixed number of keys (see [`with_max_keys`](Self::with_max_keys)); past that
/// the cache evicts the least useful ones, and a message whose completion was evicted is
/// processed again if it comes back. Cloning shares the store.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<String, Slot>,
}

/// One key's entry. The cache's compute (one per key at a time) makes claims atomic; the
/// state behind the mutex lets a completion within its lease, the common case, change the
/// entry it finds with a plain `get` instead of a compute of its own (a compute costs several
/// times as much: the cache's per-key lock, its write log, its timer wheel).
#[derive(Clone)]
struct Slot(Arc<SlotInner>);

struct SlotInner {
    /// When the cache drops the entry: fixed when it is made, as late as the claim's lease
    /// plus the TTL, so that a completion within the lease fits without a new entry.
    expires: Instant,
    state: Mutex<State>,
}

#[derive(Debug, Clone)]
enum State {
    Claimed {
        token: ClaimToken,
        until: Instant,
    },
    Completed {
        until: Instant,
    },
    /// Released, or replaced in the cache by a newer entry: whoever holds this one looks
    /// again through a compute.
    Gone,
}

impl Slot {
    fn new(state: State, expires: Instant) -> Self {
        Self(Arc::new(SlotInner {
            expires,
            state: Mutex::new(state),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock is held leaves a whole state behind: every write is one
        // assignment.
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks this entry as replaced and hands out the state it had.
    fn retire(&self) -> State {
        std::mem::replace(&mut *self.state(), State::Gone)
    }
}

/// Each entry expires at the instant it was made with.
struct SlotExpiry;

impl Expiry<String, Slot> for SlotExpiry {
    fn expire_after_create(&self, _: &String, slot: &Slot, now: Instant) -> Option<Duration> {
        Some(slot.0.expires.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &String,
        slot: &Slot,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.0.expires.saturating_duration_since(now))
    }
}

fn deadline(now: Instant, after: Duration) -> Instant {
    let after = after.min(MAX_EXPIRY);
    now.checked_add(after).unwrap_or(now)
}

impl MemoryStore {
    /// An empty store holding at most [`DEFAULT_MAX_KEYS`] keys.
    #[must_use]
    pub fn new() -> Self {
        Self::with_max_keys(DEFAULT_MAX_KEYS)
    }

    /// An empty store holding at most `max_keys` keys.
    #[must_use]
    pub fn with_max_keys(max_keys: u64) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(max_keys)
                .expire_after(SlotExpiry)
                .build(),
        }
    }

    /// How many keys the store holds, roughly (expired entries may still be counted until the
    /// cache's housekeeping removes them).
    #[must_use]
    pub fn len(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Whether the store holds no keys (see [`len`](Self::len)).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("keys", &self.cache.entry_count())
            .field("max_keys", &self.cache.policy().max_capacity())
            .finish()
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim> {
        let mut claim = None;
        // The cache runs one compute per key at a time, so the check and the insert are atomic.
        self.cache.entry_by_ref(key).and_compute_with(|existing| {
            let now = Instant::now();
            if let Some(entry) = existing {
                let slot = entry.into_value();
                let mut state = slot.state();
                match &*state {
                    State::Completed { until } if *until > now => {
                        claim = Some(Claim::Completed);
                        return Op::Nop;
                    }
                    State::Claimed { until, .. } if *until > now => {
                        claim = Some(Claim::InFlight {
                            retry_after: *until - now,
                        });
                        return Op::Nop;
                    }
                    // Expired or released: replaced below by a new entry, which whoever still
                    // holds this one learns from here.
                    _ => *state = State::Gone,
                }
            }
            let token = ClaimToken::new();
            let until = deadline(now, lease);
            let slot = Slot::new(
                State::Claimed {
                    token: token.clone(),
                    until,
                },
                deadline(until, COMPLETION_ROOM),
            );
            claim = Some(Claim::Acquired(token));
            Op::Put(slot)
        });
        claim.ok_or_else(|| Error::new(ErrorKind::Other, "memory store: claim did not run"))
    }

    async fn complete(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<()> {
        // Within its lease, a claim's entry is kept long enough for the completion: change it
        // in place. Anything else takes the compute below.
        if ttl <= COMPLETION_ROOM {
            if let Some(slot) = self.cache.get(key) {
                let now = Instant::now();
                let mut state = slot.state();
                match &*state {
                    State::Claimed { token: held, until } if *until > now => {
                        if held != token {
                            return Err(lease_lost(key));
                        }
                        *state = State::Completed {
                            until: deadline(now, ttl),
                        };
                        return Ok(());
                    }
                    State::Completed { until } if *until > now => return Ok(()),
                    _ => {}
                }
            }
        }
        let mut lost = false;
        self.cache.entry_by_ref(key).and_compute_with(|existing| {
            let now = Instant::now();
            if let Some(entry) = existing {
                let slot = entry.into_value();
                let state = slot.state();
                match &*state {
                    State::Completed { until } if *until > now => return Op::Nop,
                    State::Claimed { token: held, until } if *until > now && held != token => {
                        lost = true;
                        return Op::Nop;
                    }
                    _ => {}
                }
                drop(state);
                slot.retire();
            }
            let until = deadline(now, ttl);
            Op::Put(Slot::new(State::Completed { until }, until))
        });
        if lost {
            return Err(lease_lost(key));
        }
        Ok(())
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<()> {
        self.cache.entry_by_ref(key).and_compute_with(|existing| {
            let Some(entry) = existing else {
                return Op::Nop;
            };
            let slot = entry.into_value();
            let mut state = slot.state();
            match &*state {
                State::Claimed { token: held, .. } if held == token => {
                    *state = State::Gone;
                    Op::Remove
                }
                _ => Op::Nop,
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    /// A TTL past the room a claim's entry keeps for its completion takes the compute, which
    /// makes a new entry: still completed, and the lost claim still refused.
    #[tokio::test]
    async fn a_ttl_longer_than_the_completion_room_completes_through_a_new_entry() {
        let store = MemoryStore::new();
        let long = COMPLETION_ROOM * 2;
        let token = store
            .claim("a", LEASE)
            .await
            .unwrap()
            .token()
            .cloned()
            .unwrap();
        store.complete("a", &token, long).await.unwrap();
        assert_eq!(store.claim("a", LEASE).await.unwrap(), Claim::Completed);
        store.complete("a", &token, long).await.unwrap();

        let held = store
            .claim("b", LEASE)
            .await
            .unwrap()
            .token()
            .cloned()
            .unwrap();
        let error = store
            .complete("b", &ClaimToken::new(), long)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Rejected);
        store
            .complete("b", &held, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(store.claim("b", LEASE).await.unwrap(), Claim::Completed);
    }

    /// A released claim's entry is gone: the key is claimable at once, and the old token can
    /// no longer complete it in place.
    #[tokio::test]
    async fn a_released_claim_is_not_completed_in_place() {
        let store = MemoryStore::new();
        let first = store
            .claim("k", LEASE)
            .await
            .unwrap()
            .token()
            .cloned()
            .unwrap();
        store.release("k", &first).await.unwrap();
        let second = store
            .claim("k", LEASE)
            .await
            .unwrap()
            .token()
            .cloned()
            .unwrap();
        let error = store.complete("k", &first, LEASE).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Rejected);
        store.complete("k", &second, LEASE).await.unwrap();
        assert_eq!(store.claim("k", LEASE).await.unwrap(), Claim::Completed);
    }
}
