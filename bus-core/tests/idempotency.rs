//! The idempotency middleware: one store contract run against every store (memory always;
//! Redis and PostgreSQL with their features, on the servers named by `BUS_TEST_REDIS_URL` and
//! `BUS_TEST_POSTGRES_URL`), and the layer's behaviour over fake deliveries.
//!
//! Without a server's variable its tests print why they are skipped and pass, unless
//! `BUS_REQUIRE_BROKERS=1`, where a missing server fails them.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::middleware::idempotency::{
    Claim, ClaimToken, IdempotencyError, IdempotencyLayer, IdempotencyStore, MemoryStore,
};
use bus_core::runtime::{Handler, Outcome};
use bus_core::{async_trait, Delivery, Envelope, Error, ErrorKind, Result, Settle, Settlement};
use futures::FutureExt;
use tower_layer::Layer;

/// Short enough to wait for, long enough that a loaded machine does not see it lapse between
/// two calls of one test step.
const LEASE: Duration = Duration::from_millis(200);
/// Waiting this long past a 200 ms expiry leaves a wide margin for timer and clock slack.
const PAST_EXPIRY: Duration = Duration::from_millis(600);
const LONG: Duration = Duration::from_secs(60);

/// A store under test, more connections to the same store (each its own client, so that the
/// server sees truly concurrent claims), and how to remove what the test left in it.
struct Fixture {
    store: Arc<dyn IdempotencyStore>,
    peers: Vec<Arc<dyn IdempotencyStore>>,
    cleanup: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
}

/// What a contract case gets: the store, and peers sharing its state.
#[derive(Clone)]
struct Stores {
    store: Arc<dyn IdempotencyStore>,
    peers: Vec<Arc<dyn IdempotencyStore>>,
}

/// Runs `case` on the fixture, then cleans up whether or not the case panicked.
async fn run<F, Fut>(fixture: Option<Fixture>, case: F)
where
    F: FnOnce(Stores) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(fixture) = fixture else { return };
    let stores = Stores {
        store: fixture.store,
        peers: fixture.peers,
    };
    let result = AssertUnwindSafe(case(stores)).catch_unwind().await;
    if let Some(cleanup) = fixture.cleanup {
        cleanup.await;
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// How many separate connections the concurrency case spreads its claims over.
const PEERS: usize = 4;

/// The server URL in `var`, or `None` after saying the test is skipped; a failure instead when
/// `BUS_REQUIRE_BROKERS=1`.
#[allow(dead_code)] // unused when neither the redis nor the postgres feature is on
fn server_url(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("BUS_REQUIRE_BROKERS").as_deref() != Ok("1"),
                "BUS_REQUIRE_BROKERS=1 but {var} is not set: these tests need {what}"
            );
            println!("skipped: set {var} to the URL of {what} to run this test");
            None
        }
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

async fn memory() -> Option<Fixture> {
    let store = MemoryStore::new();
    Some(Fixture {
        store: Arc::new(store.clone()),
        peers: (0..PEERS)
            .map(|_| Arc::new(store.clone()) as Arc<dyn IdempotencyStore>)
            .collect(),
        cleanup: None,
    })
}

#[cfg(feature = "redis")]
async fn redis() -> Option<Fixture> {
    use bus_core::middleware::idempotency::RedisStore;
    let url = server_url(
        "BUS_TEST_REDIS_URL",
        "a Redis server, e.g. redis://127.0.0.1:6379",
    )?;
    let prefix = unique("bus-test:idempotency:") + ":";
    let connect = || async {
        RedisStore::connect(&url)
            .await
            .expect("connect to Redis")
            .with_prefix(prefix.clone())
    };
    let store = connect().await;
    let mut peers: Vec<Arc<dyn IdempotencyStore>> = Vec::new();
    for _ in 0..PEERS {
        peers.push(Arc::new(connect().await));
    }
    let mut connection = store.connection();
    let cleanup = async move {
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut connection)
            .await
            .expect("list test keys");
        if !keys.is_empty() {
            let () = ::redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut connection)
                .await
                .expect("delete test keys");
        }
    };
    Some(Fixture {
        store: Arc::new(store),
        peers,
        cleanup: Some(Box::pin(cleanup)),
    })
}

#[cfg(feature = "postgres")]
async fn postgres() -> Option<Fixture> {
    use bus_core::middleware::idempotency::PostgresStore;
    let url = server_url(
        "BUS_TEST_POSTGRES_URL",
        "a PostgreSQL database, e.g. postgres://postgres@127.0.0.1:5432/test",
    )?;
    let table = unique("bus_idempotency_test_");
    let connect = || async {
        PostgresStore::builder(&url)
            .expect("valid URL")
            .with_table(&table)
            .connect()
            .await
            .expect("connect to PostgreSQL")
    };
    let store = connect().await;
    let mut peers: Vec<Arc<dyn IdempotencyStore>> = Vec::new();
    for _ in 0..PEERS {
        peers.push(Arc::new(connect().await));
    }
    let cleanup = async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL for cleanup");
        let connection = tokio::spawn(connection);
        client
            .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
            .await
            .expect("drop the test table");
        drop(client);
        let _ = connection.await;
    };
    Some(Fixture {
        store: Arc::new(store),
        peers,
        cleanup: Some(Box::pin(cleanup)),
    })
}

fn acquired(claim: Claim) -> ClaimToken {
    match claim {
        Claim::Acquired(token) => token,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

fn in_flight(claim: &Claim) -> Duration {
    match claim {
        Claim::InFlight { retry_after } => *retry_after,
        other => panic!("expected InFlight, got {other:?}"),
    }
}

// ---- the store contract ----

async fn claim_complete_then_duplicate_is_completed(Stores { store, .. }: Stores) {
    let key = unique("k-");
    let token = acquired(store.claim(&key, LONG).await.unwrap());
    let retry_after = in_flight(&store.claim(&key, LONG).await.unwrap());
    assert!(
        retry_after > Duration::from_secs(50) && retry_after <= LONG,
        "retry_after {retry_after:?} should be what is left of a 60 s lease"
    );
    store.complete(&key, &token, LONG).await.unwrap();
    assert_eq!(store.claim(&key, LONG).await.unwrap(), Claim::Completed);
    assert_eq!(store.claim(&key, LONG).await.unwrap(), Claim::Completed);
    // Completing again, or releasing after completion, changes nothing.
    store.complete(&key, &token, LONG).await.unwrap();
    store.release(&key, &token).await.unwrap();
    assert_eq!(store.claim(&key, LONG).await.unwrap(), Claim::Completed);
    // Other keys are untouched.
    assert!(store
        .claim(&unique("k-"), LONG)
        .await
        .unwrap()
        .is_acquired());
}

async fn concurrent_claims_acquire_exactly_once(Stores { peers, .. }: Stores) {
    for _round in 0..5 {
        let key = unique("k-");
        let claims = (0..16).map(|i| {
            let (store, key) = (peers[i % peers.len()].clone(), key.clone());
            tokio::spawn(async move { store.claim(&key, LONG).await.unwrap() })
        });
        let claims: Vec<Claim> = futures::future::join_all(claims)
            .await
            .into_iter()
            .map(|joined| joined.unwrap())
            .collect();
        let winners = claims.iter().filter(|c| c.is_acquired()).count();
        assert_eq!(winners, 1, "exactly one of 16 claims wins: {claims:?}");
        assert_eq!(claims.iter().filter(|c| c.is_in_flight()).count(), 15);
    }
}

async fn release_makes_the_key_claimable(Stores { store, .. }: Stores) {
    let key = unique("k-");
    let token = acquired(store.claim(&key, LONG).await.unwrap());
    // A stranger's token releases nothing.
    store.release(&key, &ClaimToken::new()).await.unwrap();
    assert!(store.claim(&key, LONG).await.unwrap().is_in_flight());
    store.release(&key, &token).await.unwrap();
    let second = acquired(store.claim(&key, LONG).await.unwrap());
    assert_ne!(second, token);
    // The first holder's token no longer releases the second claim.
    store.release(&key, &token).await.unwrap();
    assert!(store.claim(&key, LONG).await.unwrap().is_in_flight());
    // Releasing a key that was never claimed is fine.
    store
        .release(&unique("k-"), &ClaimToken::new())
        .await
        .unwrap();
}

async fn expired_lease_can_be_claimed_again(Stores { store, .. }: Stores) {
    let key = unique("k-");
    let crashed = acquired(store.claim(&key, LEASE).await.unwrap());
    let retry_after = in_flight(&store.claim(&key, LEASE).await.unwrap());
    assert!(retry_after <= LEASE, "retry_after {retry_after:?} > lease");
    tokio::time::sleep(PAST_EXPIRY).await; // the lease timer running out, not a sync point
    let taken_over = acquired(store.claim(&key, LONG).await.unwrap());
    // The crashed consumer, come back, can neither complete nor release the new claim.
    let error = store.complete(&key, &crashed, LONG).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected);
    let cause = error
        .source_ref()
        .unwrap()
        .downcast_ref::<IdempotencyError>();
    assert!(
        matches!(cause, Some(IdempotencyError::LeaseLost { .. })),
        "{error:?}"
    );
    store.release(&key, &crashed).await.unwrap();
    assert!(store.claim(&key, LONG).await.unwrap().is_in_flight());
    store.complete(&key, &taken_over, LONG).await.unwrap();
    assert_eq!(store.claim(&key, LONG).await.unwrap(), Claim::Completed);
}

async fn lapsed_claim_nobody_took_still_completes(Stores { store, .. }: Stores) {
    let key = unique("k-");
    let slow = acquired(store.claim(&key, LEASE).await.unwrap());
    tokio::time::sleep(PAST_EXPIRY).await; // the lease timer running out
    store.complete(&key, &slow, LONG).await.unwrap();
    assert_eq!(store.claim(&key, LONG).await.unwrap(), Claim::Completed);
}

async fn completion_expires_after_ttl(Stores { store, .. }: Stores) {
    let key = unique("k-");
    let token = acquired(store.claim(&key, LONG).await.unwrap());
    store.complete(&key, &token, LEASE).await.unwrap();
    assert_eq!(store.claim(&key, LONG).await.unwrap(), Claim::Completed);
    tokio::time::sleep(PAST_EXPIRY).await; // the TTL timer running out
    assert!(store.claim(&key, LONG).await.unwrap().is_acquired());
}

async fn layer_runs_the_handler_once_per_message(Stores { store, .. }: Stores) {
    let layer = IdempotencyLayer::new(store).with_lease(LONG);
    let stats = layer.stats();
    let handler = layer.layer(Counting::acking());
    let envelope = Envelope::new("order.placed", "{}");
    assert!(handler
        .handle(&delivery(&envelope, Some("billing")))
        .await
        .is_ack());
    assert!(handler
        .handle(&delivery(&envelope, Some("billing")))
        .await
        .is_ack());
    assert_eq!(handler.get_ref().runs(), 1);
    assert_eq!((stats.acquired(), stats.duplicates()), (1, 1));
}

macro_rules! store_contract {
    ($($store:ident),* $(,)?) => {$(
        mod $store {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn claim_complete_then_duplicate_is_completed() {
                run(super::$store().await, super::claim_complete_then_duplicate_is_completed).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_claims_acquire_exactly_once() {
                run(super::$store().await, super::concurrent_claims_acquire_exactly_once).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn release_makes_the_key_claimable() {
                run(super::$store().await, super::release_makes_the_key_claimable).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn expired_lease_can_be_claimed_again() {
                run(super::$store().await, super::expired_lease_can_be_claimed_again).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn lapsed_claim_nobody_took_still_completes() {
                run(super::$store().await, super::lapsed_claim_nobody_took_still_completes).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn completion_expires_after_ttl() {
                run(super::$store().await, super::completion_expires_after_ttl).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn layer_runs_the_handler_once_per_message() {
                run(super::$store().await, super::layer_runs_the_handler_once_per_message).await;
            }
        }
    )*};
}

store_contract!(memory);
#[cfg(feature = "redis")]
store_contract!(redis);
#[cfg(feature = "postgres")]
store_contract!(postgres);

// ---- the layer, over fake deliveries ----

#[derive(Debug)]
struct NoSettle;

#[async_trait]
impl Settle for NoSettle {
    async fn settle(&self, _: Settlement) -> Result<()> {
        Ok(())
    }
    fn abandon(&self) {}
}

fn delivery(envelope: &Envelope, group: Option<&str>) -> Delivery {
    Delivery::new(
        envelope.clone(),
        1,
        "orders",
        group.map(str::to_owned),
        Box::new(NoSettle),
    )
}

/// A handler that counts its runs and answers from a script (then acks).
#[derive(Debug, Default)]
struct Counting {
    runs: AtomicUsize,
    script: Mutex<Vec<fn() -> Outcome>>,
}

impl Counting {
    fn acking() -> Self {
        Self::default()
    }

    /// Answers `outcomes` in order, then acks.
    fn answering(outcomes: Vec<fn() -> Outcome>) -> Self {
        Self {
            runs: AtomicUsize::new(0),
            script: Mutex::new(outcomes.into_iter().rev().collect()),
        }
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Handler for Counting {
    async fn handle(&self, _: &Delivery) -> Outcome {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let next = self.script.lock().unwrap().pop();
        next.map_or(Outcome::Ack, |outcome| outcome())
    }
}

fn flaky() -> Outcome {
    Outcome::retry(Error::new(ErrorKind::Handler, "database busy"))
}

fn poison() -> Outcome {
    Outcome::reject(Error::new(ErrorKind::Serialization, "not JSON"))
}

#[tokio::test]
async fn the_same_message_twice_runs_the_handler_once() {
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let stats = layer.stats();
    let handler = layer.layer(Counting::acking());
    let first = Envelope::new("order.placed", "{}");
    let second = Envelope::new("order.placed", "{}");

    assert!(handler
        .handle(&delivery(&first, Some("billing")))
        .await
        .is_ack());
    assert!(handler
        .handle(&delivery(&first, Some("billing")))
        .await
        .is_ack());
    assert!(handler
        .handle(&delivery(&second, Some("billing")))
        .await
        .is_ack());
    assert!(handler
        .handle(&delivery(&first, Some("billing")))
        .await
        .is_ack());

    assert_eq!(handler.get_ref().runs(), 2, "once per message id");
    assert_eq!(stats.acquired(), 2);
    assert_eq!(stats.duplicates(), 2);
    assert_eq!(stats.in_flight() + stats.store_errors(), 0);
}

#[tokio::test]
async fn a_failed_attempt_releases_so_the_retry_runs_the_handler() {
    let handler =
        IdempotencyLayer::new(MemoryStore::new()).layer(Counting::answering(vec![flaky, poison]));
    let envelope = Envelope::new("order.placed", "{}");

    let outcome = handler.handle(&delivery(&envelope, Some("billing"))).await;
    assert!(
        matches!(outcome, Outcome::Retry { after: None, .. }),
        "{outcome:?}"
    );
    let outcome = handler.handle(&delivery(&envelope, Some("billing"))).await;
    assert!(
        outcome.is_reject(),
        "the inner outcome is returned: {outcome:?}"
    );
    assert!(handler
        .handle(&delivery(&envelope, Some("billing")))
        .await
        .is_ack());
    assert!(handler
        .handle(&delivery(&envelope, Some("billing")))
        .await
        .is_ack());

    assert_eq!(
        handler.get_ref().runs(),
        3,
        "two failures, one success, then a duplicate"
    );
    assert_eq!(handler.stats().duplicates(), 1);
}

#[tokio::test]
async fn two_groups_process_the_same_message_independently() {
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let billing = layer.layer(Counting::acking());
    let shipping = layer.layer(Counting::acking());
    let envelope = Envelope::new("order.placed", "{}");

    for _ in 0..3 {
        assert!(billing
            .handle(&delivery(&envelope, Some("billing")))
            .await
            .is_ack());
        assert!(shipping
            .handle(&delivery(&envelope, Some("shipping")))
            .await
            .is_ack());
    }
    assert_eq!(billing.get_ref().runs(), 1);
    assert_eq!(shipping.get_ref().runs(), 1);
    assert_eq!(
        layer.stats().duplicates(),
        4,
        "the layer's handlers share one set of counters"
    );
}

#[tokio::test]
async fn without_a_group_the_source_scopes_the_key() {
    let handler = IdempotencyLayer::new(MemoryStore::new()).layer(Counting::acking());
    let envelope = Envelope::new("order.placed", "{}");
    let from = |source: &str| Delivery::new(envelope.clone(), 1, source, None, Box::new(NoSettle));
    for _ in 0..2 {
        assert!(handler.handle(&from("orders")).await.is_ack());
        assert!(handler.handle(&from("orders-replay")).await.is_ack());
    }
    assert_eq!(handler.get_ref().runs(), 2);
}

#[tokio::test]
async fn a_custom_key_deduplicates_across_message_ids() {
    let handler = IdempotencyLayer::new(MemoryStore::new())
        .with_key(|d: &Delivery| {
            d.envelope()
                .header("order-id")
                .unwrap_or_default()
                .to_owned()
        })
        .layer(Counting::acking());
    let once = Envelope::new("order.placed", "{}").with_header("order-id", "42");
    let again = Envelope::new("order.placed", "{}").with_header("order-id", "42");
    assert!(handler.handle(&delivery(&once, None)).await.is_ack());
    assert!(handler.handle(&delivery(&again, None)).await.is_ack());
    assert_eq!(handler.get_ref().runs(), 1);
}

/// A handler that waits until told to finish, to hold a claim.
#[derive(Debug, Default)]
struct Blocking {
    started: tokio::sync::Notify,
    finish: tokio::sync::Notify,
    runs: AtomicUsize,
}

#[async_trait]
impl Handler for Blocking {
    async fn handle(&self, _: &Delivery) -> Outcome {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.started.notify_one();
        self.finish.notified().await;
        Outcome::Ack
    }
}

#[tokio::test]
async fn a_message_in_flight_elsewhere_is_retried_after_the_lease() {
    let blocking = Arc::new(Blocking::default());
    let layer = IdempotencyLayer::new(MemoryStore::new()).with_lease(LONG);
    let handler = Arc::new(layer.layer(blocking.clone()));
    let envelope = Envelope::new("order.placed", "{}");

    let first = tokio::spawn({
        let (handler, envelope) = (handler.clone(), envelope.clone());
        async move { handler.handle(&delivery(&envelope, Some("billing"))).await }
    });
    blocking.started.notified().await;

    match handler.handle(&delivery(&envelope, Some("billing"))).await {
        Outcome::Retry {
            after: Some(after),
            error,
        } => {
            assert!(
                after > Duration::from_secs(50) && after <= LONG,
                "{after:?}"
            );
            assert!(error.is_retryable());
            let cause = error
                .source_ref()
                .unwrap()
                .downcast_ref::<IdempotencyError>();
            assert!(
                matches!(cause, Some(IdempotencyError::InFlight { .. })),
                "{error:?}"
            );
        }
        other => panic!("expected a retry after the lease, got {other:?}"),
    }
    blocking.finish.notify_one();
    assert!(first.await.unwrap().is_ack());
    assert!(handler
        .handle(&delivery(&envelope, Some("billing")))
        .await
        .is_ack());
    assert_eq!(blocking.runs.load(Ordering::SeqCst), 1);
    assert_eq!(layer.stats().in_flight(), 1);
    assert_eq!(layer.stats().duplicates(), 1);
}

/// A store that fails the operations it is told to, and reports releases.
#[derive(Debug)]
struct Faulty {
    inner: MemoryStore,
    fail_claim: bool,
    fail_complete: bool,
    released: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Faulty {
    fn new() -> (Self, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let (released, rx) = tokio::sync::mpsc::unbounded_channel();
        let store = Self {
            inner: MemoryStore::new(),
            fail_claim: false,
            fail_complete: false,
            released,
        };
        (store, rx)
    }
}

fn unreachable_store() -> Error {
    Error::new(ErrorKind::Connection, "store unreachable")
}

#[async_trait]
impl IdempotencyStore for Faulty {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim> {
        if self.fail_claim {
            return Err(unreachable_store());
        }
        self.inner.claim(key, lease).await
    }

    async fn complete(&self, key: &str, token: &ClaimToken, ttl: Duration) -> Result<()> {
        if self.fail_complete {
            return Err(unreachable_store());
        }
        self.inner.complete(key, token, ttl).await
    }

    async fn release(&self, key: &str, token: &ClaimToken) -> Result<()> {
        let result = self.inner.release(key, token).await;
        let _ = self.released.send(key.to_owned());
        result
    }
}

#[tokio::test]
async fn a_store_failure_retries_without_running_the_handler() {
    let (mut store, _released) = Faulty::new();
    store.fail_claim = true;
    let layer = IdempotencyLayer::new(store);
    let handler = layer.layer(Counting::acking());
    let outcome = handler
        .handle(&delivery(&Envelope::new("k", "p"), Some("g")))
        .await;
    match outcome {
        Outcome::Retry { error, .. } => assert_eq!(error.kind(), ErrorKind::Connection),
        other => panic!("expected a retry, got {other:?}"),
    }
    assert_eq!(handler.get_ref().runs(), 0);
    assert_eq!(layer.stats().store_errors(), 1);
}

#[tokio::test]
async fn a_failed_completion_still_acks() {
    let (mut store, _released) = Faulty::new();
    store.fail_complete = true;
    let store = Arc::new(store);
    let layer = IdempotencyLayer::new(store.clone()).with_lease(LONG);
    let handler = layer.layer(Counting::acking());
    let envelope = Envelope::new("k", "p");
    assert!(handler
        .handle(&delivery(&envelope, Some("g")))
        .await
        .is_ack());
    assert_eq!(handler.get_ref().runs(), 1);
    assert_eq!(layer.stats().complete_failures(), 1);
    // The unexpired claim still keeps a redelivery from running the handler meanwhile.
    let outcome = handler.handle(&delivery(&envelope, Some("g"))).await;
    assert!(
        matches!(outcome, Outcome::Retry { after: Some(_), .. }),
        "{outcome:?}"
    );
    assert_eq!(handler.get_ref().runs(), 1);
}

#[tokio::test]
async fn a_dropped_attempt_releases_its_claim() {
    let (store, mut released) = Faulty::new();
    let store = Arc::new(store);
    let blocking = Arc::new(Blocking::default());
    let handler = IdempotencyLayer::new(store.clone())
        .with_lease(LONG)
        .layer(blocking.clone());
    let envelope = Envelope::new("k", "p");
    let d = delivery(&envelope, Some("g"));

    let attempt = handler.handle(&d);
    let timed_out = tokio::time::timeout(Duration::from_millis(50), attempt).await;
    assert!(timed_out.is_err(), "the blocked attempt times out");
    let key = tokio::time::timeout(Duration::from_secs(10), released.recv())
        .await
        .expect("the claim is released in the background")
        .unwrap();
    assert_eq!(key, format!("g/{}", envelope.id));
    assert!(store.claim(&key, LONG).await.unwrap().is_acquired());
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<IdempotencyLayer>();
    send_sync::<MemoryStore>();
    send_sync::<Claim>();
    send_sync::<ClaimToken>();
    send_sync::<bus_core::middleware::idempotency::Idempotent<Counting>>();
    send_sync::<bus_core::middleware::idempotency::IdempotencyStats>();
    #[cfg(feature = "redis")]
    send_sync::<bus_core::middleware::idempotency::RedisStore>();
    #[cfg(feature = "postgres")]
    send_sync::<bus_core::middleware::idempotency::PostgresStore>();
}

// ---- store specifics: reconnection, configuration ----

/// Claims until one succeeds after the store's connection was killed: every failure on the way
/// must be a retryable error, never a panic.
#[allow(dead_code)] // unused when neither the redis nor the postgres feature is on
async fn claims_again_after_the_connection_is_killed(store: &dyn IdempotencyStore) {
    for _ in 0..20 {
        match store.claim(&unique("k-"), LONG).await {
            Ok(claim) => {
                assert!(claim.is_acquired(), "{claim:?}");
                return;
            }
            Err(error) => {
                assert!(error.is_retryable(), "{error:?}");
                // Bounded back-off while the client reconnects.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("the store did not reconnect within 20 attempts");
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_store_reconnects_after_the_connection_is_killed() {
    use bus_core::middleware::idempotency::RedisStore;
    let Some(url) = server_url(
        "BUS_TEST_REDIS_URL",
        "a Redis server, e.g. redis://127.0.0.1:6379",
    ) else {
        return;
    };
    let prefix = unique("bus-test:idempotency:") + ":";
    let store = RedisStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let mut own = store.connection();
    let id: i64 = ::redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut own)
        .await
        .unwrap();
    let mut admin = RedisStore::connect(&url).await.unwrap().connection();
    let killed: i64 = ::redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    claims_again_after_the_connection_is_killed(&store).await;
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut admin)
        .await
        .unwrap();
    let () = ::redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut admin)
        .await
        .unwrap();
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_store_reconnects_after_the_connection_is_killed() {
    use bus_core::middleware::idempotency::PostgresStore;
    let Some(url) = server_url(
        "BUS_TEST_POSTGRES_URL",
        "a PostgreSQL database, e.g. postgres://postgres@127.0.0.1:5432/test",
    ) else {
        return;
    };
    let table = unique("bus_idempotency_test_");
    let application = unique("bus-idempotency-test-");
    let mut config: tokio_postgres::Config = url.parse().unwrap();
    config.application_name(&application);
    let store = PostgresStore::builder_with_config(config)
        .with_table(&table)
        .connect()
        .await
        .unwrap();

    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let killed = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&application],
        )
        .await
        .unwrap();
    assert_eq!(killed.get::<_, i64>(0), 1);

    let result = AssertUnwindSafe(claims_again_after_the_connection_is_killed(&store))
        .catch_unwind()
        .await;
    admin
        .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
        .await
        .unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_store_refuses_a_table_name_that_is_not_an_identifier() {
    use bus_core::middleware::idempotency::PostgresStore;
    for table in [
        "",
        "orders; DROP TABLE x",
        "1st",
        "a.b.c",
        "quo\"te",
        "sp ace",
    ] {
        // Validation comes before connecting: no server is needed.
        let error = PostgresStore::builder("postgres://nobody@127.0.0.1:1/none")
            .unwrap()
            .with_table(table)
            .connect()
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config, "{table:?}: {error:?}");
    }
    let error = PostgresStore::builder("postgres://nobody@127.0.0.1:1/none")
        .unwrap()
        .with_table("billing.processed_messages")
        .with_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_err();
    assert!(error.is_retryable(), "nothing listens there: {error:?}");
}

#[derive(Debug)]
struct Panicking;

#[async_trait]
impl Handler for Panicking {
    async fn handle(&self, _: &Delivery) -> Outcome {
        panic!("handler bug");
    }
}

#[tokio::test]
async fn a_panicking_handler_releases_its_claim() {
    let (store, mut released) = Faulty::new();
    let store = Arc::new(store);
    let handler = IdempotencyLayer::new(store.clone())
        .with_lease(LONG)
        .layer(Panicking);
    let envelope = Envelope::new("k", "p");
    let panicked = AssertUnwindSafe(handler.handle(&delivery(&envelope, Some("g"))))
        .catch_unwind()
        .await;
    assert!(panicked.is_err());
    let key = tokio::time::timeout(Duration::from_secs(10), released.recv())
        .await
        .expect("the claim is released in the background")
        .unwrap();
    assert!(store.claim(&key, LONG).await.unwrap().is_acquired());
}
