//! A store in Redis, shared by every consumer that reaches the same server.

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{RedisError, RetryMethod, Script};
use async_trait::async_trait;

use super::store::lease_lost;
use super::{Claim, ClaimToken, IdempotencyStore};
use crate::{Error, ErrorKind, Result};

/// The key prefix of a [`RedisStore`] unless [`RedisStore::with_prefix`] says otherwise.
pub const DEFAULT_PREFIX: &str = "bus:idempotency:";

/// The value of a completed key. Tokens are hexadecimal, so no token equals it.
const COMPLETED: &str = "completed";

/// Longest lease or TTL sent to Redis, in milliseconds (a century); longer ones are cut to it.
const MAX_MILLIS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// `SET NX PX` takes a free key; otherwise the value tells a completion from another claim.
/// One script, so the answer describes the same state the `SET` saw.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
            return {1, 0}
        end
        if redis.call('GET', KEYS[1]) == ARGV[3] then
            return {2, 0}
        end
        return {3, redis.call('PTTL', KEYS[1])}
        ",
    )
});

/// Completes when the key holds our token or is free; a live claim of another token is a lost
/// lease (0); an existing completion is kept as it is.
static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local value = redis.call('GET', KEYS[1])
        if value == ARGV[3] then
            return 1
        end
        if value == false or value == ARGV[1] then
            redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
            return 1
        end
        return 0
        ",
    )
});

/// Deletes the key only while it holds our token.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then
            return redis.call('DEL', KEYS[1])
        end
        return 0
        ",
    )
});

/// An [`IdempotencyStore`] in Redis (or a server speaking its protocol, such as Valkey).
///
/// Each key is one Redis string under a prefix ([`DEFAULT_PREFIX`] unless
/// [`with_prefix`](Self::with_prefix) says otherwise): a claim holds its token and expires with
/// the lease (`SET NX PX`), a completion holds a marker and expires with the TTL. Completing
/// and releasing compare the token inside a Lua script, so they are atomic.
///
/// The connection is a [`ConnectionManager`], which reconnects after the server restarts or the
/// connection drops; calls made while it is down fail with [`ErrorKind::Connection`]. Cloning
/// shares the connection.
///
/// ```no_run
/// use bus_core::middleware::idempotency::{IdempotencyLayer, RedisStore};
/// # async fn example() -> bus_core::Result<()> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?.with_prefix("billing:seen:");
/// let layer = IdempotencyLayer::new(store);
/// # let _ = layer; Ok(()) }
/// ```
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: Arc<str>,
}

impl RedisStore {
    /// Connects to the Redis server at `url` (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://` where the `redis` crate is built with TLS), with connection and response
    /// timeouts of 5 seconds.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for an invalid URL; [`ErrorKind::Connection`] when the server
    /// cannot be reached (after the connection manager's retries).
    pub async fn connect(url: &str) -> Result<Self> {
        let client = ::redis::Client::open(url)
            .map_err(|e| Error::with_source(ErrorKind::Config, "invalid Redis URL", e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(Duration::from_secs(5));
        Self::connect_with(client, config).await
    }

    /// Connects with `client` and the connection manager's `config` (retries, backoff,
    /// timeouts): the escape hatch to the `redis` crate's own settings.
    ///
    /// # Errors
    /// [`ErrorKind::Connection`] when the server cannot be reached.
    pub async fn connect_with(
        client: ::redis::Client,
        config: ConnectionManagerConfig,
    ) -> Result<Self> {
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| redis_error("connecting", e))?;
        Ok(Self::from_connection(connection))
    }

    /// Uses an established connection manager.
    #[must_use]
    pub fn from_connection(connection: ConnectionManager) -> Self {
        Self {
            connection,
            prefix: Arc::from(DEFAULT_PREFIX),
        }
    }

    /// Puts every key under `prefix` instead of [`DEFAULT_PREFIX`]: one prefix per
    /// application or environment sharing a server.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self
    }

    /// The key prefix.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The connection, for commands of your own.
    #[must_use]
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim> {
        let token = ClaimToken::new();
        let (state, pttl): (u8, i64) = CLAIM
            .key(self.key(key))
            .arg(token.as_str())
            .arg(millis(lease))
            .arg(COMPLETED)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|e| redis_error("claiming", e))?;
        Ok(match state {
            1 => Claim::Acquired(token),
            2 => Claim::Completed,
            // PTTL is -1 for a key without expiry (not one of ours) and -2 for a key that is
            // gone: come back soon either way.
            _ => Claim::InFlight {
                retry_after: Duration::from_millis(u64::try_from(pttl).unwrap_or(0).max(1)),
            },
        })
    }

    async fn complete(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<()> {
        let done: u8 = COMPLETE
            .key(self.key(key))
            .arg(token.as_str())
            .arg(millis(ttl))
            .arg(COMPLETED)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|e| redis_error("completing", e))?;
        if done == 1 {
            Ok(())
        } else {
            Err(lease_lost(key))
        }
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<()> {
        let _deleted: u8 = RELEASE
            .key(self.key(key))
            .arg(token.as_str())
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|e| redis_error("releasing", e))?;
        Ok(())
    }
}

/// A duration as Redis expiry milliseconds: at least 1 (0 is an error to `PX`), at most a
/// century.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_MILLIS)
}

fn redis_error(doing: &'static str, error: RedisError) -> Error {
    let kind = if error.is_timeout() {
        ErrorKind::Timeout
    } else if error.is_io_error() || error.is_unrecoverable_error() {
        ErrorKind::Connection
    } else if matches!(
        error.retry_method(),
        RetryMethod::WaitAndRetry | RetryMethod::RetryImmediately
    ) {
        // LOADING, BUSY, TRYAGAIN, …: the server is up but not ready.
        ErrorKind::Backpressure
    } else {
        ErrorKind::Other
    };
    Error::with_source(
        kind,
        format!("Redis idempotency store: {doing} failed"),
        error,
    )
}
