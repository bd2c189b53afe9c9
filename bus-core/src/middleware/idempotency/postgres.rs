//! A store in a PostgreSQL table, shared by every consumer that reaches the same database.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Socket, Statement};

use super::store::lease_lost;
use super::{Claim, ClaimToken, IdempotencyStore};
use crate::{Error, ErrorKind, Result};

/// The table of a [`PostgresStore`] unless [`PostgresStoreBuilder::with_table`] says otherwise.
pub const DEFAULT_TABLE: &str = "bus_idempotency";

/// How long one store operation may take unless [`PostgresStoreBuilder::with_timeout`] says
/// otherwise: 5 seconds.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest lease or TTL sent to the database, in milliseconds (a century).
const MAX_MILLIS: i64 = 100 * 365 * 24 * 3600 * 1000;

/// How often a claim tries again when the row it lost to vanished before it could read it.
const CLAIM_ROUNDS: usize = 3;

type ConnectFuture = Pin<Box<dyn Future<Output = Result<Client, tokio_postgres::Error>> + Send>>;
type ConnectFn = Arc<dyn Fn() -> ConnectFuture + Send + Sync>;

/// An [`IdempotencyStore`] in a PostgreSQL table.
///
/// One row per key: `key text primary key, token text, completed boolean, expires_at
/// timestamptz`. The table (and an index on `expires_at`) is created if missing. Every time is
/// the database's clock, so consumers with skewed clocks agree on when a lease expires.
///
/// - A claim is one statement: `INSERT … ON CONFLICT (key) DO UPDATE … WHERE expires_at <=
///   now() RETURNING token`, so of concurrent claims exactly one takes a free or expired key.
/// - Completing and releasing match the token in their `WHERE` clause.
/// - Expired rows stay until a claim reuses them or [`purge_expired`](Self::purge_expired)
///   deletes them: call it now and then (a daily job, or a timer in one consumer).
///
/// The store keeps one connection (statements pipeline over it) and opens a new one on the
/// next call after it broke; a call that fails because the database is unreachable returns
/// [`ErrorKind::Connection`]. Cloning shares the connection.
///
/// ```no_run
/// use bus_core::middleware::idempotency::{IdempotencyLayer, PostgresStore};
/// # async fn example() -> bus_core::Result<()> {
/// let store = PostgresStore::builder("postgres://bus@127.0.0.1/orders")?
///     .with_table("billing_processed")
///     .connect()
///     .await?;
/// let layer = IdempotencyLayer::new(store);
/// # let _ = layer; Ok(()) }
/// ```
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    table: Table,
    timeout: Duration,
    connect: ConnectFn,
    connection: Mutex<Option<Arc<Connection>>>,
}

/// A live connection and the statements prepared on it.
struct Connection {
    client: Client,
    claim: Statement,
    state: Statement,
    complete: Statement,
    is_completed: Statement,
    release: Statement,
    purge: Statement,
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user[:password]@host[:port]/database`,
    /// or a key-value string) without TLS, using the table [`DEFAULT_TABLE`].
    ///
    /// # Errors
    /// As [`PostgresStore::builder`] and [`PostgresStoreBuilder::connect`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder(url)?.connect().await
    }

    /// A builder connecting to the database at `url`, for a table name, TLS or a timeout.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when `url` is not a valid connection string.
    pub fn builder(url: &str) -> Result<PostgresStoreBuilder> {
        let config = url.parse::<tokio_postgres::Config>().map_err(|e| {
            Error::with_source(ErrorKind::Config, "invalid PostgreSQL connection string", e)
        })?;
        Ok(Self::builder_with_config(config))
    }

    /// A builder connecting with `config`: the escape hatch to `tokio-postgres`' own settings.
    pub fn builder_with_config(config: tokio_postgres::Config) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            config,
            tls: NoTls,
            table: DEFAULT_TABLE.to_owned(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The table, as written in SQL (quoted).
    #[must_use]
    pub fn table(&self) -> &str {
        &self.inner.table.quoted
    }

    /// Deletes the rows whose claim or completion has expired, and says how many.
    ///
    /// # Errors
    /// As [`IdempotencyStore::claim`].
    pub async fn purge_expired(&self) -> Result<u64> {
        self.run("purging", |c| async move {
            c.client.execute(&c.purge, &[]).await
        })
        .await
    }

    /// The current connection, or a new one if there is none or it broke.
    async fn connection(&self) -> Result<Arc<Connection>> {
        let mut slot = self.inner.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            if !connection.client.is_closed() {
                return Ok(connection.clone());
            }
        }
        *slot = None;
        let connection = Arc::new(self.open().await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    async fn open(&self) -> Result<Connection> {
        let table = &self.inner.table;
        let client = (self.inner.connect)()
            .await
            .map_err(|e| pg_error("connecting", e))?;
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                 key        text PRIMARY KEY,
                 token      text,
                 completed  boolean NOT NULL DEFAULT false,
                 expires_at timestamptz NOT NULL
             );
             CREATE INDEX IF NOT EXISTS {i} ON {t} (expires_at);",
            t = table.quoted,
            i = table.index,
        );
        if let Err(error) = client.batch_execute(&create).await {
            // Two consumers creating the table at the same moment: one loses the race on the
            // catalog's unique index, and the table exists all the same.
            let raced = error.code().is_some_and(|code| {
                *code == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                    || *code == tokio_postgres::error::SqlState::DUPLICATE_TABLE
            });
            if !raced {
                return Err(pg_error("creating the table", error));
            }
        }
        let t = &table.quoted;
        let expiry = "now() + ($3::bigint * interval '1 millisecond')";
        let prepare = |sql: String| {
            let client = &client;
            async move {
                client
                    .prepare(&sql)
                    .await
                    .map_err(|e| pg_error("preparing statements", e))
            }
        };
        Ok(Connection {
            claim: prepare(format!(
                "INSERT INTO {t} AS t (key, token, completed, expires_at)
                 VALUES ($1, $2, false, {expiry})
                 ON CONFLICT (key) DO UPDATE
                     SET token = excluded.token, completed = false, expires_at = excluded.expires_at
                     WHERE t.expires_at <= now()
                 RETURNING t.token"
            ))
            .await?,
            state: prepare(format!(
                "SELECT completed,
                        GREATEST(1, CEIL(EXTRACT(EPOCH FROM (expires_at - now())) * 1000))::bigint
                 FROM {t} WHERE key = $1 AND expires_at > now()"
            ))
            .await?,
            complete: prepare(format!(
                "INSERT INTO {t} AS t (key, token, completed, expires_at)
                 VALUES ($1, $2, true, {expiry})
                 ON CONFLICT (key) DO UPDATE
                     SET token = excluded.token, completed = true, expires_at = excluded.expires_at
                     WHERE (t.token = excluded.token AND NOT t.completed) OR t.expires_at <= now()
                 RETURNING t.completed"
            ))
            .await?,
            is_completed: prepare(format!(
                "SELECT completed FROM {t} WHERE key = $1 AND expires_at > now()"
            ))
            .await?,
            release: prepare(format!(
                "DELETE FROM {t} WHERE key = $1 AND token = $2 AND NOT completed"
            ))
            .await?,
            purge: prepare(format!("DELETE FROM {t} WHERE expires_at <= now()")).await?,
            client,
        })
    }

    /// Runs `op` on the connection within the timeout; forgets the connection if it broke or
    /// hung, so that the next call opens a new one.
    async fn run<T, F, Fut>(&self, doing: &'static str, op: F) -> Result<T>
    where
        F: FnOnce(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let connection = tokio::time::timeout(self.inner.timeout, self.connection())
            .await
            .map_err(|_| timed_out("connecting", self.inner.timeout))??;
        match tokio::time::timeout(self.inner.timeout, op(connection.clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                let error = pg_error(doing, error);
                if connection.client.is_closed() {
                    self.forget(&connection).await;
                }
                Err(error)
            }
            Err(_elapsed) => {
                self.forget(&connection).await;
                Err(timed_out(doing, self.inner.timeout))
            }
        }
    }

    async fn forget(&self, broken: &Arc<Connection>) {
        let mut slot = self.inner.connection.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, broken)) {
            *slot = None;
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.table.quoted)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim> {
        let lease = millis(lease);
        for _ in 0..CLAIM_ROUNDS {
            let token = ClaimToken::new();
            let params: [&(dyn ToSql + Sync); 3] = [&key, &token.as_str(), &lease];
            let claimed = self
                .run("claiming", |c| async move {
                    c.client.query_opt(&c.claim, &params).await
                })
                .await?;
            if claimed.is_some() {
                return Ok(Claim::Acquired(token));
            }
            // Lost to a live row. Its state is read by a second statement, which (unlike the
            // INSERT's snapshot) sees a row committed by a concurrent claim.
            let state: Option<Row> = self
                .run("claiming", |c| async move {
                    c.client.query_opt(&c.state, &[&key]).await
                })
                .await?;
            if let Some(row) = state {
                let completed: bool = row.try_get(0).map_err(|e| pg_error("claiming", e))?;
                let left: i64 = row.try_get(1).map_err(|e| pg_error("claiming", e))?;
                return Ok(if completed {
                    Claim::Completed
                } else {
                    Claim::InFlight {
                        retry_after: Duration::from_millis(u64::try_from(left).unwrap_or(1)),
                    }
                });
            }
            // The row expired or was released in between: the key is free, claim again.
        }
        Ok(Claim::InFlight {
            retry_after: Duration::from_millis(100),
        })
    }

    async fn complete(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<()> {
        let ttl = millis(ttl);
        let params: [&(dyn ToSql + Sync); 3] = [&key, &token.as_str(), &ttl];
        let updated = self
            .run("completing", |c| async move {
                c.client.query_opt(&c.complete, &params).await
            })
            .await?;
        if updated.is_some() {
            return Ok(());
        }
        let completed: Option<Row> = self
            .run("completing", |c| async move {
                c.client.query_opt(&c.is_completed, &[&key]).await
            })
            .await?;
        match completed.map(|row| row.try_get::<_, bool>(0)).transpose() {
            Ok(Some(true)) => Ok(()),
            Ok(Some(false) | None) => Err(lease_lost(key)),
            Err(e) => Err(pg_error("completing", e)),
        }
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<()> {
        let params: [&(dyn ToSql + Sync); 2] = [&key, &token.as_str()];
        self.run("releasing", |c| async move {
            c.client.execute(&c.release, &params).await
        })
        .await?;
        Ok(())
    }
}

/// Configures and connects a [`PostgresStore`]; made by [`PostgresStore::builder`].
#[must_use = "a builder does nothing until `connect` is called"]
pub struct PostgresStoreBuilder<T = NoTls> {
    config: tokio_postgres::Config,
    tls: T,
    table: String,
    timeout: Duration,
}

impl<T> PostgresStoreBuilder<T> {
    /// Keeps the keys in `table` instead of [`DEFAULT_TABLE`]: an identifier (letters, digits,
    /// `_`, not starting with a digit, at most 63 bytes), optionally qualified by a schema
    /// (`schema.table`). It is created if missing.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// Fails an operation (connecting included) that takes longer than `timeout` with
    /// [`ErrorKind::Timeout`] (default: 5 seconds).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connects through `tls` (a `MakeTlsConnect` from `tokio-postgres-rustls` or
    /// `postgres-native-tls`) instead of without TLS.
    pub fn with_tls<U>(self, tls: U) -> PostgresStoreBuilder<U> {
        PostgresStoreBuilder {
            config: self.config,
            tls,
            table: self.table,
            timeout: self.timeout,
        }
    }
}

impl<T> PostgresStoreBuilder<T>
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    /// Validates the table name, connects, creates the table if missing and prepares the
    /// statements.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for an invalid table name; [`ErrorKind::Connection`] when the
    /// database cannot be reached; [`ErrorKind::Timeout`] when it does not answer in time;
    /// another kind when the database refuses (no right to create the table, …).
    pub async fn connect(self) -> Result<PostgresStore> {
        let table = Table::new(&self.table)?;
        let mut config = self.config;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.timeout);
        }
        let config = Arc::new(config);
        let tls = self.tls;
        let connect: ConnectFn = Arc::new(move || {
            let (config, tls) = (config.clone(), tls.clone());
            Box::pin(async move {
                let (client, connection) = config.connect(tls).await?;
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::warn!(%error, "PostgreSQL idempotency store: connection lost");
                    }
                });
                Ok(client)
            })
        });
        let store = PostgresStore {
            inner: Arc::new(Inner {
                table,
                timeout: self.timeout,
                connect,
                connection: Mutex::new(None),
            }),
        };
        tokio::time::timeout(store.inner.timeout, store.connection())
            .await
            .map_err(|_| timed_out("connecting", store.inner.timeout))??;
        Ok(store)
    }
}

impl<T> fmt::Debug for PostgresStoreBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The config's own Debug redacts the password.
        f.debug_struct("PostgresStoreBuilder")
            .field("config", &self.config)
            .field("table", &self.table)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A validated table name, quoted for SQL, and the name of its index.
struct Table {
    quoted: String,
    index: String,
}

impl Table {
    fn new(name: &str) -> Result<Self> {
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|part| is_identifier(part)) {
            return Err(Error::config(format!(
                "invalid idempotency table name {name:?}: expected `table` or `schema.table`, \
                 each a letter or `_` followed by letters, digits or `_`, at most 63 bytes"
            )));
        }
        let quoted = parts
            .iter()
            .map(|part| format!("\"{part}\""))
            .collect::<Vec<_>>()
            .join(".");
        let table = parts[parts.len() - 1];
        // The index lives in the table's schema; its name is cut to PostgreSQL's 63 bytes.
        let index = format!("\"{table:.48}_expires_at_idx\"");
        Ok(Self { quoted, index })
    }
}

fn is_identifier(part: &str) -> bool {
    let mut chars = part.chars();
    part.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A duration in whole milliseconds, at most a century, at least 1 so that a zero lease still
/// expires after the claim.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .clamp(1, MAX_MILLIS)
}

fn timed_out(doing: &'static str, after: Duration) -> Error {
    Error::timeout(format!(
        "PostgreSQL idempotency store: {doing} took longer than {}",
        humantime::format_duration(after)
    ))
}

fn pg_error(doing: &'static str, error: tokio_postgres::Error) -> Error {
    use tokio_postgres::error::SqlState;
    let kind = match error.code() {
        _ if error.is_closed() => ErrorKind::Connection,
        // Connection exception (08), operator intervention such as a shutdown (57P0x).
        Some(code) if code.code().starts_with("08") || code.code().starts_with("57P") => {
            ErrorKind::Connection
        }
        Some(code) if *code == SqlState::QUERY_CANCELED => ErrorKind::Timeout,
        // Insufficient resources (53), serialization failure or deadlock (40).
        Some(code) if code.code().starts_with("53") || code.code().starts_with("40") => {
            ErrorKind::Backpressure
        }
        Some(_) => ErrorKind::Other,
        // No SQL state: the socket failed (connecting, reading, writing).
        None if std::error::Error::source(&error).is_some_and(|s| s.is::<std::io::Error>()) => {
            ErrorKind::Connection
        }
        None => ErrorKind::Other,
    };
    Error::with_source(
        kind,
        format!("PostgreSQL idempotency store: {doing} failed"),
        error,
    )
}
