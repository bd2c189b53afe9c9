//! The layer and the handler it wraps.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tower_layer::Layer;

use super::{Claim, ClaimToken, IdempotencyError, IdempotencyStore};
use crate::runtime::{Handler, Outcome};
use crate::{Delivery, Error, ErrorKind};

/// How long a claim holds by default: 30 seconds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// How long a completion is remembered by default: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Makes the idempotency key of a delivery; see [`IdempotencyLayer::with_key`].
pub type KeyFn = Arc<dyn Fn(&Delivery) -> String + Send + Sync>;

/// The default idempotency key: `{group}/{envelope id}`, or `{source}/{envelope id}` for a
/// delivery outside a consumer group. Each group processes a message once.
#[must_use]
pub fn default_key(delivery: &Delivery) -> String {
    let scope = delivery.group().unwrap_or(delivery.source());
    let id = delivery.envelope().id.as_str();
    let mut key = String::with_capacity(scope.len() + 1 + id.len());
    key.push_str(scope);
    key.push('/');
    key.push_str(id);
    key
}

/// A [`Layer`] that makes a handler skip messages it has already processed; see the
/// [module documentation](super) for the whole flow.
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a handler"]
pub struct IdempotencyLayer {
    store: Arc<dyn IdempotencyStore>,
    lease: Duration,
    ttl: Duration,
    key: KeyFn,
    stats: IdempotencyStats,
}

/// What every handler wrapped by one layer shares.
struct Shared {
    store: Arc<dyn IdempotencyStore>,
    lease: Duration,
    ttl: Duration,
    key: KeyFn,
    stats: IdempotencyStats,
}

impl IdempotencyLayer {
    /// Deduplicates through `store`, with a lease of [`DEFAULT_LEASE`], a TTL of
    /// [`DEFAULT_TTL`] and the [`default_key`].
    pub fn new(store: impl IdempotencyStore + 'static) -> Self {
        Self {
            store: Arc::new(store),
            lease: DEFAULT_LEASE,
            ttl: DEFAULT_TTL,
            key: Arc::new(default_key),
            stats: IdempotencyStats::default(),
        }
    }

    /// How long a claim holds before another consumer may take the message over. Make it
    /// longer than an attempt may take.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long a processed message is remembered. Make it longer than the broker may take to
    /// redeliver a message (its retention, or the longest retry delay).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Makes the idempotency key from the delivery, instead of [`default_key`]: for example
    /// from a business id in a header, when the same operation may arrive under different
    /// message ids. Keep the group in the key if several groups share the store.
    pub fn with_key<F>(mut self, key: F) -> Self
    where
        F: Fn(&Delivery) -> String + Send + Sync + 'static,
    {
        self.key = Arc::new(key);
        self
    }

    /// The lease.
    #[must_use]
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The TTL.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The counters of every handler this layer wraps (they share one set).
    #[must_use]
    pub fn stats(&self) -> IdempotencyStats {
        self.stats.clone()
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.store)
            .field("lease", &self.lease)
            .field("ttl", &self.ttl)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<H> Layer<H> for IdempotencyLayer {
    type Service = Idempotent<H>;

    fn layer(&self, inner: H) -> Idempotent<H> {
        Idempotent {
            inner,
            shared: Arc::new(Shared {
                store: self.store.clone(),
                lease: self.lease,
                ttl: self.ttl,
                key: self.key.clone(),
                stats: self.stats.clone(),
            }),
        }
    }
}

/// A handler that runs its inner handler at most once per idempotency key (within the TTL),
/// made by [`IdempotencyLayer`].
#[derive(Clone)]
pub struct Idempotent<H> {
    inner: H,
    shared: Arc<Shared>,
}

impl<H> Idempotent<H> {
    /// The counters (shared with the layer that made this handler).
    #[must_use]
    pub fn stats(&self) -> IdempotencyStats {
        self.shared.stats.clone()
    }

    /// The wrapped handler.
    pub fn get_ref(&self) -> &H {
        &self.inner
    }

    /// Unwraps the inner handler.
    pub fn into_inner(self) -> H {
        self.inner
    }
}

impl<H: fmt::Debug> fmt::Debug for Idempotent<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotent")
            .field("inner", &self.inner)
            .field("store", &self.shared.store)
            .field("lease", &self.shared.lease)
            .field("ttl", &self.shared.ttl)
            .field("stats", &self.shared.stats)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<H: Handler> Handler for Idempotent<H> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let shared = &*self.shared;
        let stats = &shared.stats.0;
        let key = (shared.key)(delivery);
        let message_id = delivery.envelope().id.as_str();

        let token = match shared.store.claim(&key, shared.lease).await {
            Ok(Claim::Acquired(token)) => token,
            Ok(Claim::Completed) => {
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%key, message_id, "duplicate message acknowledged without running the handler");
                return Outcome::Ack;
            }
            Ok(Claim::InFlight { retry_after }) => {
                stats.in_flight.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%key, message_id, ?retry_after, "message is being processed by another consumer");
                let error = Error::with_source(
                    ErrorKind::Backpressure,
                    format!("message {message_id} is being processed by another consumer"),
                    IdempotencyError::InFlight { key, retry_after },
                );
                return Outcome::retry_after(retry_after, error);
            }
            Err(error) => {
                stats.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%key, message_id, %error, "idempotency store failed to claim; retrying the message");
                return Outcome::retry(error);
            }
        };
        stats.acquired.fetch_add(1, Ordering::Relaxed);

        // If this future is dropped mid-way (a timeout outside, a shutdown), hand the key back
        // at once rather than leaving it to the lease.
        let mut guard = ReleaseOnDrop {
            store: Some(shared.store.clone()),
            key: &key,
            token: &token,
        };
        let outcome = self.inner.handle(delivery).await;
        guard.disarm();

        match outcome {
            Outcome::Ack => {
                if let Err(error) = shared.store.complete(&key, &token, shared.ttl).await {
                    // Still an ack: see "When completing fails" in the module docs.
                    stats.complete_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%key, message_id, %error, "processed, but the idempotency store failed to record it; a later duplicate may run again");
                }
                Outcome::Ack
            }
            failed => {
                if let Err(error) = shared.store.release(&key, &token).await {
                    stats.release_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%key, message_id, %error, "idempotency store failed to release the claim; it expires with its lease");
                }
                failed
            }
        }
    }
}

/// Releases a claim in the background when the attempt holding it is dropped.
struct ReleaseOnDrop<'a> {
    store: Option<Arc<dyn IdempotencyStore>>,
    key: &'a str,
    token: &'a ClaimToken,
}

impl ReleaseOnDrop<'_> {
    fn disarm(&mut self) {
        self.store = None;
    }
}

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // No runtime to release on: the claim expires with its lease.
        };
        let (key, token) = (self.key.to_owned(), self.token.clone());
        runtime.spawn(async move {
            if let Err(error) = store.release(&key, &token).await {
                tracing::debug!(%key, %error, "releasing the claim of a dropped attempt failed; it expires with its lease");
            }
        });
    }
}

/// Counters of an [`IdempotencyLayer`] and the handlers it wraps: cheap to clone, read at any
/// time (for tests, metrics, or a health page).
#[derive(Clone, Default)]
pub struct IdempotencyStats(Arc<Counters>);

#[derive(Default)]
struct Counters {
    acquired: AtomicU64,
    duplicates: AtomicU64,
    in_flight: AtomicU64,
    store_errors: AtomicU64,
    complete_failures: AtomicU64,
    release_failures: AtomicU64,
}

impl IdempotencyStats {
    /// Deliveries whose key was claimed, so the inner handler ran.
    #[must_use]
    pub fn acquired(&self) -> u64 {
        self.0.acquired.load(Ordering::Relaxed)
    }

    /// Duplicates: deliveries of an already processed message, acknowledged without running
    /// the inner handler.
    #[must_use]
    pub fn duplicates(&self) -> u64 {
        self.0.duplicates.load(Ordering::Relaxed)
    }

    /// Deliveries retried because another consumer held the claim.
    #[must_use]
    pub fn in_flight(&self) -> u64 {
        self.0.in_flight.load(Ordering::Relaxed)
    }

    /// Deliveries retried because the store failed to claim.
    #[must_use]
    pub fn store_errors(&self) -> u64 {
        self.0.store_errors.load(Ordering::Relaxed)
    }

    /// Processed deliveries whose completion the store failed to record (acknowledged all the
    /// same).
    #[must_use]
    pub fn complete_failures(&self) -> u64 {
        self.0.complete_failures.load(Ordering::Relaxed)
    }

    /// Failed attempts whose claim the store failed to release (it expires with its lease).
    #[must_use]
    pub fn release_failures(&self) -> u64 {
        self.0.release_failures.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for IdempotencyStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyStats")
            .field("acquired", &self.acquired())
            .field("duplicates", &self.duplicates())
            .field("in_flight", &self.in_flight())
            .field("store_errors", &self.store_errors())
            .field("complete_failures", &self.complete_failures())
            .field("release_failures", &self.release_failures())
            .finish()
    }
}
