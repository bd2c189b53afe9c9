//! An in-process store on a `moka` cache with per-entry expiry.

use std::fmt;
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

#[derive(Debug, Clone)]
enum Slot {
    Claimed { token: ClaimToken, until: Instant },
    Completed { until: Instant },
}

impl Slot {
    fn until(&self) -> Instant {
        match self {
            Slot::Claimed { until, .. } | Slot::Completed { until } => *until,
        }
    }
}

/// Each entry expires at the instant it carries.
struct SlotExpiry;

impl Expiry<String, Slot> for SlotExpiry {
    fn expire_after_create(&self, _: &String, slot: &Slot, now: Instant) -> Option<Duration> {
        Some(slot.until().saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &String,
        slot: &Slot,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.until().saturating_duration_since(now))
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
            let (found, op) = match existing.map(moka::Entry::into_value) {
                Some(Slot::Completed { until }) if until > now => (Claim::Completed, Op::Nop),
                Some(Slot::Claimed { until, .. }) if until > now => (
                    Claim::InFlight {
                        retry_after: until - now,
                    },
                    Op::Nop,
                ),
                _ => {
                    let token = ClaimToken::new();
                    let slot = Slot::Claimed {
                        token: token.clone(),
                        until: deadline(now, lease),
                    };
                    (Claim::Acquired(token), Op::Put(slot))
                }
            };
            claim = Some(found);
            op
        });
        claim.ok_or_else(|| Error::new(ErrorKind::Other, "memory store: claim did not run"))
    }

    async fn complete(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<()> {
        let mut lost = false;
        self.cache.entry_by_ref(key).and_compute_with(|existing| {
            let now = Instant::now();
            match existing.map(moka::Entry::into_value) {
                Some(Slot::Completed { until }) if until > now => Op::Nop,
                Some(Slot::Claimed { token: held, until }) if until > now && held != *token => {
                    lost = true;
                    Op::Nop
                }
                _ => Op::Put(Slot::Completed {
                    until: deadline(now, ttl),
                }),
            }
        });
        if lost {
            return Err(lease_lost(key));
        }
        Ok(())
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<()> {
        self.cache.entry_by_ref(key).and_compute_with(|existing| {
            match existing.map(moka::Entry::into_value) {
                Some(Slot::Claimed { token: held, .. }) if held == *token => Op::Remove,
                _ => Op::Nop,
            }
        });
        Ok(())
    }
}
