//!
//! Brokers deliver at least once: a lost ack, a rebalance or a crash brings a message back
//! after it was processed. [`IdempotencyLayer`] wraps a handler so that it skips, and
//! acknowledges, a message it has already processed. It keeps what it knows
//! in an [`IdempotencyStore`]: [`MemoryStore`] (one process), `RedisStore` (feature `redis`)
//! or `PostgresStore` (feature `postgres`), shared by every consumer of a group.
//!
//! ```
//! use std::time::Duration;
//! use bus_core::{Envelope, runtime::{handler_fn, DeliveryInfo, HandlerBuilder}};
//! use bus_core::middleware::idempotency::{IdempotencyLayer, MemoryStore};
//!
//! let idempotency = IdempotencyLayer::new(MemoryStore::new())
//!     .with_lease(Duration::from_secs(60))      // longer than one attempt may take
//!     .with_ttl(Duration::from_secs(24 * 3600)); // longer than the broker may redeliver
//! let stats = idempotency.stats();
//! let handler = HandlerBuilder::new()
//!     .layer(idempotency)
//!     .handler(handler_fn(|_: Envelope, _: DeliveryInfo| async {}));
//! # let _ = (handler, stats);
//! ```
//!
//! # How one delivery goes
//!
//! The key is `{group or source}/{envelope id}` unless [`IdempotencyLayer::with_key`] says
//! otherwise, so two consumer groups each process the same message once. The wrapped handler
//! first [claims](crate::middleware::idempotency::IdempotencyStore::claim) the key for a lease:
//!
//! | claim | what the handler does |
//! |---|---|
//! | [`Claim::Completed`] | returns [`Outcome::Ack`] without running the inner handler (a duplicate) |
//! | [`Claim::InFlight`] | returns [`Outcome::Retry`] with `after` = what is left of the other consumer's lease (an [`ErrorKind::Backpressure`] error whose source is [`IdempotencyError::InFlight`]) |
//! | [`Claim::Acquired`] | runs the inner handler, then [completes](crate::middleware::idempotency::IdempotencyStore::complete) the key on `Ack` (remembered for the TTL) or [releases](crate::middleware::idempotency::IdempotencyStore::release) it on `Retry`/`Reject` so the next attempt may claim it |
//! | store error | returns [`Outcome::Retry`] with the store's error: the handler is never skipped silently |
//!
//! An attempt that is dropped before it finishes (a timeout outside this layer, a shutdown) or
//! whose handler panics releases its claim in the background, so the redelivery need not wait
//! for the lease.
//!
//! A consumer that crashes between claim and complete leaves a claim that nobody releases; once
//! its lease has expired the key can be claimed again, so the message is processed by the next
//! delivery. The lease must therefore be longer than an attempt may take (put a
//! [`TimeoutLayer`](crate::middleware::TimeoutLayer) shorter than the lease inside this layer):
//! an attempt that outlives its lease may run alongside a second one.
//!
//! # When completing fails
//!
//! If the inner handler acknowledged but the store could not record the completion (the store
//! is unreachable, or the lease ran out and another consumer claimed the key), the wrapped
//! handler still returns [`Outcome::Ack`], logs a warning and counts it in
//! [`IdempotencyStats::complete_failures`]. The work is done; the only thing lost is the record
//! that prevents a *future* duplicate. Returning `Retry` instead would bring the message back on
//! purpose, and once the claim's lease expired that redelivery would run the handler a second
//! time: a certain duplicate, to avoid a possible one. With `Ack`, a duplicate happens only if the
//! broker also redelivers the message later (and not while the unexpired claim still answers
//! [`Claim::InFlight`]).
//!
//! If releasing fails, the inner outcome is returned all the same; the claim then expires with
//! its lease, and a retry meanwhile is answered [`Claim::InFlight`] and retried after it.
//!
// Links in full: with an outer doc comment on `pub mod idempotency`, rustdoc resolves these
// docs from the parent module.
//! [`Claim::Acquired`]: crate::middleware::idempotency::Claim::Acquired
//! [`Claim::Completed`]: crate::middleware::idempotency::Claim::Completed
//! [`Claim::InFlight`]: crate::middleware::idempotency::Claim::InFlight
//! [`IdempotencyLayer::with_key`]: crate::middleware::idempotency::IdempotencyLayer::with_key
//! [`IdempotencyLayer`]: crate::middleware::idempotency::IdempotencyLayer
//! [`IdempotencyStats::complete_failures`]: crate::middleware::idempotency::IdempotencyStats::complete_failures
//! [`IdempotencyStore`]: crate::middleware::idempotency::IdempotencyStore
//! [`MemoryStore`]: crate::middleware::idempotency::MemoryStore
//! [`IdempotencyError::InFlight`]: crate::middleware::idempotency::IdempotencyError::InFlight
//! [`ErrorKind::Backpressure`]: crate::ErrorKind::Backpressure
//! [`Outcome::Ack`]: crate::runtime::Outcome::Ack
//! [`Outcome::Retry`]: crate::runtime::Outcome::Retry

mod layer;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod store;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::{PostgresStore, PostgresStoreBuilder, DEFAULT_TABLE};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisStore, DEFAULT_PREFIX};
pub use layer::{
    default_key, IdempotencyLayer, IdempotencyStats, Idempotent, KeyFn, DEFAULT_LEASE, DEFAULT_TTL,
};
pub use memory::{MemoryStore, DEFAULT_MAX_KEYS};
pub use store::{Claim, ClaimToken, IdempotencyError, IdempotencyStore};
