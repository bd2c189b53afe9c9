//! The store contract: claim a key for a lease, then complete or release it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Error, ErrorKind, Result};

/// Where [`IdempotencyLayer`](super::IdempotencyLayer) remembers which messages are being
/// processed and which are done. Shared by every consumer of a group (or one process, for
/// [`MemoryStore`](super::MemoryStore)); object safe, so it can be held as
/// `Arc<dyn IdempotencyStore>`.
///
/// A key is in one of three states, each with an expiry:
/// - free (never seen, or its claim or completion expired, or it was released);
/// - claimed by one consumer, identified by a [`ClaimToken`], until its lease expires;
/// - completed, until its TTL expires.
///
/// Implementations must make [`claim`](Self::claim) atomic: of any number of concurrent claims
/// of a free key, exactly one is [`Claim::Acquired`]. A claim whose lease expired (its consumer
/// crashed between claim and complete) is free again. [`complete`](Self::complete) and
/// [`release`](Self::release) compare the token atomically, so a consumer whose lease ran out
/// never overwrites or drops the claim of the consumer that took the key over.
///
/// The same contract test runs against every store in `bus-core/tests/idempotency.rs`.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + fmt::Debug {
    /// Tries to claim `key` for `lease`.
    ///
    /// # Errors
    /// When the store cannot be reached or fails ([`ErrorKind::Connection`](crate::ErrorKind)
    /// for a lost connection). The caller must not assume any state then.
    ///
    /// # Cancel safety
    /// If the future is dropped, the claim may or may not have been taken; if it was, it
    /// expires with its lease.
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim>;

    /// Records `key` as completed for `ttl`, if the claim `token` names is still the key's: it
    /// holds `token`, or its lease expired and nobody claimed the key since. Completing a key
    /// that is already completed succeeds and changes nothing.
    ///
    /// # Errors
    /// [`ErrorKind::Rejected`](crate::ErrorKind::Rejected) with an
    /// [`IdempotencyError::LeaseLost`] source when another consumer claimed the key after our
    /// lease expired; store failures as for [`claim`](Self::claim).
    ///
    /// # Cancel safety
    /// If the future is dropped, the key may or may not have been completed.
    async fn complete(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<()>;

    /// Drops the claim on `key` if it still holds `token`, so the next attempt can claim the key
    /// at once. Otherwise (the claim expired, another consumer holds the key, or it is
    /// completed) nothing changes, and that is not an error.
    ///
    /// # Errors
    /// Store failures as for [`claim`](Self::claim); the claim then expires with its lease.
    ///
    /// # Cancel safety
    /// If the future is dropped, the claim may or may not have been released; if not, it
    /// expires with its lease.
    async fn release(&self, key: &str, token: &ClaimToken) -> Result<()>;
}

#[async_trait]
impl<S: IdempotencyStore + ?Sized> IdempotencyStore for Arc<S> {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim> {
        (**self).claim(key, lease).await
    }

    async fn complete(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<()> {
        (**self).complete(key, token, ttl).await
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<()> {
        (**self).release(key, token).await
    }
}

#[async_trait]
impl<S: IdempotencyStore + ?Sized> IdempotencyStore for Box<S> {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim> {
        (**self).claim(key, lease).await
    }

    async fn complete(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<()> {
        (**self).complete(key, token, ttl).await
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<()> {
        (**self).release(key, token).await
    }
}

/// What [`IdempotencyStore::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// The key was free and is now ours until the lease expires: process the message, then
    /// [`complete`](IdempotencyStore::complete) or [`release`](IdempotencyStore::release) it
    /// with this token.
    Acquired(ClaimToken),
    /// Another consumer holds an unexpired claim: the message is being processed elsewhere.
    InFlight {
        /// What is left of that consumer's lease: try again no sooner.
        retry_after: Duration,
    },
    /// The message was already processed (within the TTL): it is a duplicate.
    Completed,
}

impl Claim {
    /// Whether this is [`Claim::Acquired`].
    #[must_use]
    pub fn is_acquired(&self) -> bool {
        matches!(self, Claim::Acquired(_))
    }

    /// Whether this is [`Claim::InFlight`].
    #[must_use]
    pub fn is_in_flight(&self) -> bool {
        matches!(self, Claim::InFlight { .. })
    }

    /// Whether this is [`Claim::Completed`].
    #[must_use]
    pub fn is_completed(&self) -> bool {
        matches!(self, Claim::Completed)
    }

    /// The token of an [`Acquired`](Claim::Acquired) claim.
    #[must_use]
    pub fn token(&self) -> Option<&ClaimToken> {
        match self {
            Claim::Acquired(token) => Some(token),
            Claim::InFlight { .. } | Claim::Completed => None,
        }
    }
}

/// Identifies one claim, so that only its holder completes or releases it. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClaimToken(Arc<str>);

impl ClaimToken {
    /// A new, unique token (a random UUID).
    #[must_use]
    pub fn new() -> Self {
        let mut text = [0; uuid::fmt::Simple::LENGTH];
        Self(Arc::from(
            &*uuid::Uuid::now_v7().simple().encode_lower(&mut text),
        ))
    }

    /// The token as text, as a store keeps it.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ClaimToken {
    fn default() -> Self {
        Self::new()
    }
}

impl From<String> for ClaimToken {
    /// A token read back from a store.
    fn from(value: String) -> Self {
        Self(Arc::from(value))
    }
}

impl fmt::Debug for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why the idempotency middleware or a store declined: kept as the typed source of an
/// [`Error`](crate::Error), so a caller can downcast to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdempotencyError {
    /// Another consumer holds an unexpired claim on the key.
    #[error("message `{key}` is being processed by another consumer; retry in {}", humantime::format_duration(*retry_after))]
    InFlight {
        /// The idempotency key.
        key: String,
        /// What is left of the other consumer's lease.
        retry_after: Duration,
    },
    /// Our lease expired and another consumer claimed the key before we completed it.
    #[error("the claim on `{key}` expired and another consumer has claimed it")]
    LeaseLost {
        /// The idempotency key.
        key: String,
    },
}

/// The error of [`IdempotencyStore::complete`] when another consumer took the claim over.
pub(super) fn lease_lost(key: &str) -> Error {
    Error::with_source(
        ErrorKind::Rejected,
        format!("completing `{key}`: the claim was lost"),
        IdempotencyError::LeaseLost {
            key: key.to_owned(),
        },
    )
}
