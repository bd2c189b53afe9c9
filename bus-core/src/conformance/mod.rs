//! The shared adapter conformance suite: the contract every broker adapter meets.
//!
//! Not semver-stable: cases are added as guarantees are added.
//!
//! # Using it from an adapter
//!
//! An adapter runs the whole suite with one macro call in its `tests/conformance.rs`, with
//! `bus-core` as a dev-dependency with the `conformance` feature. It gives the macro an async
//! function that connects to the broker under test and wraps the connection in a [`Harness`],
//! or returns `None` when no broker is configured:
//!
//! ```no_run
//! // adapter-foo/tests/conformance.rs
//! use std::time::Duration;
//! use bus_core::conformance::{broker_url, Harness};
//! # mod adapter_foo {
//! #     pub async fn connect(_url: &str) -> bus_core::Result<std::sync::Arc<dyn bus_core::Broker>> {
//! #         unimplemented!()
//! #     }
//! # }
//!
//! async fn harness() -> Option<Harness> {
//!     // `None` (printing how to run it) unless BUS_TEST_FOO_URL is set; a panic instead
//!     // when BUS_REQUIRE_BROKERS=1.
//!     let url = broker_url("BUS_TEST_FOO_URL")?;
//!     let broker = adapter_foo::connect(&url).await.expect("connect to the test broker");
//!     Some(
//!         Harness::new(broker)
//!             .with_receive_timeout(Duration::from_secs(20))
//!             .with_restart(|| async {
//!                 // stop and start the real broker, e.g. through scripts/brokers.sh
//!             })
//!             .with_raw_publish(|message| async move {
//!                 // send `message` with the broker's own client, as another service would
//!                 # let _ = message;
//!             }),
//!     )
//! }
//!
//! bus_core::conformance_suite!(harness);
//! # fn main() {}
//! ```
//!
//! The macro expands to one `#[test]` per case (named after the functions in [`cases`]), so
//! `cargo test` counts, filters and reports every case on its own. Each case runs on its own
//! multi-threaded tokio runtime (two workers) and calls the factory once, so every case gets
//! its own broker connection: closing it in one case cannot affect another.
//!
//! # What the cases assume
//!
//! - Every case uses topic, queue and group names of its own (`conf.<tag>.<uuid v7>`, plus
//!   suffixes such as `.g1`), so runs and parallel cases do not see each other. An adapter must
//!   accept names made of letters, digits, `.`, `-` and `_`, mapping them onto its broker's
//!   naming rules without making two names collide.
//! - A case subscribes before it publishes: a group receives what is published after it first
//!   subscribed ([`Subscriber::subscribe`](crate::Subscriber::subscribe)).
//! - A case waits for messages up to [`Harness::receive_timeout`] each, and asserts that
//!   nothing (more) arrives by watching for [`Harness::quiet_period`]. Raise both for slow
//!   brokers.
//! - Delivery is at least once: losses always fail a case; duplicates are allowed where they
//!   are not the point (up to 10% where members compete, copies where only contents or
//!   routing are checked). Cases about settlement are strict: a nacked message comes back as
//!   the next attempt, and an acked one never again.
//! - A case that needs something [`Capabilities`] says the adapter cannot
//!   do prints `skipped: <case>: <reason>` and passes. Run `cargo test -- --nocapture` to see
//!   the reasons.
//! - The restart case (only with [`Harness::with_restart`]) runs alone: the other cases of the
//!   same test binary wait while it restarts the broker, and it waits for them.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::{Broker, Capabilities};

pub mod arbitrary;
pub mod bench;
pub mod cases;
mod faults;
mod support;

pub use faults::FaultProxy;

#[doc(hidden)]
pub use tokio;

/// The environment variable that turns a missing broker from a skip into a failure.
pub const REQUIRE_BROKERS_VAR: &str = "BUS_REQUIRE_BROKERS";

/// The broker URL for an adapter's tests, read from the environment variable `var`.
///
/// Returns `None` after printing `skipped: set {var} to run against a real broker` when the
/// variable is unset or empty, so that `cargo test` passes on a machine without brokers.
///
/// # Panics
/// When the variable is missing and `BUS_REQUIRE_BROKERS=1` is set (as `scripts/test.sh` and CI
/// do): there a missing broker is a failure, never a silent pass.
#[must_use]
pub fn broker_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            let required =
                std::env::var(REQUIRE_BROKERS_VAR).is_ok_and(|v| matches!(v.trim(), "1" | "true"));
            assert!(
                !required,
                "{var} is not set, but {REQUIRE_BROKERS_VAR}=1 requires a real broker: start it \
                 (scripts/brokers.sh) and set {var} to its URL"
            );
            println!("skipped: set {var} to run against a real broker");
            None
        }
    }
}

/// The environment variable naming a file that [`report`] appends its lines to.
pub const REPORT_VAR: &str = "BUS_TEST_REPORT";

/// Prints one line of figures a test measured (`published=… confirmed=… lost=0 …`), and
/// appends it to the file named by `BUS_TEST_REPORT` when that is set, so that
/// `scripts/test.sh` can list every such line after the run without running anything twice.
///
/// Writing the file is best effort: a test never fails because its report could not be kept.
pub fn report(line: &str) {
    use std::io::Write as _;
    println!("{line}");
    let Some(path) = std::env::var_os(REPORT_VAR).filter(|p| !p.is_empty()) else {
        return;
    };
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        // One write per line, so that lines of tests running at once do not interleave.
        let _ = file.write_all(format!("{line}\n").as_bytes());
    }
}

type RestartHook = dyn Fn() -> BoxFuture<'static, ()> + Send + Sync;
type RawPublishHook = dyn Fn(RawMessage) -> BoxFuture<'static, ()> + Send + Sync;
type FaultProxyHook = dyn Fn(FaultProxy) -> BoxFuture<'static, Arc<dyn Broker>> + Send + Sync;

/// A message sent with the broker's own client, not through `bus`: what a service in another
/// language would send. Given to the hook of [`Harness::with_raw_publish`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RawMessage {
    /// The queue, by the name a case gives [`Queue::send`](crate::Queue::send): the hook sends
    /// to the broker resource the adapter maps that name onto (the case has consumed from it
    /// already, so it exists).
    pub queue: String,
    /// CloudEvents attributes by their bare names (`specversion`, `id`, `type`, …), which the
    /// hook writes as its broker's CloudEvents binding names them (`ce_id`, `cloudEvents:id`,
    /// `ce-id`, …).
    pub cloudevents: Vec<(String, String)>,
    /// The body, as it is.
    pub payload: Bytes,
}

/// What an adapter gives the suite: the broker connection under test, how to restart the real
/// broker, and how long to wait.
///
/// Made fresh for every case by the factory passed to
/// [`conformance_suite!`](crate::conformance_suite). Cheap to clone.
#[derive(Clone)]
pub struct Harness {
    broker: Arc<dyn Broker>,
    restart: Option<Arc<RestartHook>>,
    raw_publish: Option<Arc<RawPublishHook>>,
    fault_proxy: Option<Arc<FaultProxyHook>>,
    receive_timeout: Duration,
    quiet_period: Duration,
    case_timeout: Duration,
}

impl Harness {
    /// How long a case waits for each expected message by default.
    pub const DEFAULT_RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long a case watches by default to assert that nothing (more) arrives.
    pub const DEFAULT_QUIET_PERIOD: Duration = Duration::from_millis(500);
    /// How long a whole case may take by default before it fails.
    pub const DEFAULT_CASE_TIMEOUT: Duration = Duration::from_secs(120);

    /// A harness for `broker`, with the default timings and no restart hook.
    #[must_use]
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Self {
            broker,
            restart: None,
            raw_publish: None,
            fault_proxy: None,
            receive_timeout: Self::DEFAULT_RECEIVE_TIMEOUT,
            quiet_period: Self::DEFAULT_QUIET_PERIOD,
            case_timeout: Self::DEFAULT_CASE_TIMEOUT,
        }
    }

    /// Sets the hook that stops and starts the real broker, enabling the restart case. The
    /// future it returns completes once the broker accepts connections again; it panics if the
    /// restart failed. The adapter under test is expected to reconnect by itself.
    #[must_use]
    pub fn with_restart<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.restart = Some(Arc::new(move || -> BoxFuture<'static, ()> {
            Box::pin(hook())
        }));
        self
    }

    /// Sets the hook that sends a [`RawMessage`] with the broker's own client, enabling the
    /// cases about foreign and malformed input. The future it returns completes once the broker
    /// has the message; it panics if sending failed.
    #[must_use]
    pub fn with_raw_publish<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(RawMessage) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.raw_publish = Some(Arc::new(move |message| -> BoxFuture<'static, ()> {
            Box::pin(hook(message))
        }));
        self
    }

    /// Sets the hook that connects the adapter to the broker through a [`FaultProxy`],
    /// enabling the cases about network faults (`connection_reset_mid_stream_loses_nothing`,
    /// `stall_then_recover`, `reconnect_does_not_duplicate_acked`).
    ///
    /// The hook gets a proxy that is listening but not yet forwarding: it calls
    /// [`FaultProxy::forward_to`] with the broker's address and connects a new broker
    /// connection, configured as the harness's own, to [`FaultProxy::addr`]. Where the broker
    /// hands out addresses of its own (Kafka's advertised listeners), the hook starts a broker
    /// that advertises the proxy's address, and keeps it with [`FaultProxy::keep`]. It panics
    /// if connecting fails.
    #[must_use]
    pub fn with_fault_proxy<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(FaultProxy) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Arc<dyn Broker>> + Send + 'static,
    {
        self.fault_proxy = Some(Arc::new(
            move |proxy| -> BoxFuture<'static, Arc<dyn Broker>> { Box::pin(hook(proxy)) },
        ));
        self
    }

    /// Sets how long a case waits for each expected message
    /// (default [`DEFAULT_RECEIVE_TIMEOUT`](Harness::DEFAULT_RECEIVE_TIMEOUT)).
    #[must_use]
    pub fn with_receive_timeout(mut self, timeout: Duration) -> Self {
        self.receive_timeout = timeout;
        self
    }

    /// Sets how long a case watches to assert that nothing (more) arrives
    /// (default [`DEFAULT_QUIET_PERIOD`](Harness::DEFAULT_QUIET_PERIOD)).
    #[must_use]
    pub fn with_quiet_period(mut self, period: Duration) -> Self {
        self.quiet_period = period;
        self
    }

    /// Sets how long a whole case may take before it fails
    /// (default [`DEFAULT_CASE_TIMEOUT`](Harness::DEFAULT_CASE_TIMEOUT)).
    #[must_use]
    pub fn with_case_timeout(mut self, timeout: Duration) -> Self {
        self.case_timeout = timeout;
        self
    }

    /// The broker connection under test.
    #[must_use]
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// The capabilities the adapter declares.
    #[must_use]
    pub fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }

    /// How long a case waits for each expected message.
    #[must_use]
    pub fn receive_timeout(&self) -> Duration {
        self.receive_timeout
    }

    /// How long a case watches to assert that nothing (more) arrives.
    #[must_use]
    pub fn quiet_period(&self) -> Duration {
        self.quiet_period
    }

    /// How long a whole case may take.
    #[must_use]
    pub fn case_timeout(&self) -> Duration {
        self.case_timeout
    }

    /// Whether a restart hook was given.
    #[must_use]
    pub fn can_restart(&self) -> bool {
        self.restart.is_some()
    }

    /// Whether a raw-publish hook was given.
    #[must_use]
    pub fn can_raw_publish(&self) -> bool {
        self.raw_publish.is_some()
    }

    /// Whether a fault-proxy hook was given.
    #[must_use]
    pub fn can_inject_faults(&self) -> bool {
        self.fault_proxy.is_some()
    }

    /// A new broker connection through a new [`FaultProxy`], made by the hook of
    /// [`with_fault_proxy`](Self::with_fault_proxy); `None` without one.
    ///
    /// # Panics
    /// When the proxy cannot listen on loopback.
    pub async fn connect_through_proxy(&self) -> Option<(FaultProxy, Arc<dyn Broker>)> {
        let hook = self.fault_proxy.as_ref()?;
        let proxy = FaultProxy::start()
            .await
            .expect("the fault proxy listens on 127.0.0.1");
        let broker = hook(proxy.clone()).await;
        Some((proxy, broker))
    }

    /// Sends `message` with the broker's own client through the hook; returns `false` (doing
    /// nothing) without one.
    pub async fn raw_publish(&self, message: RawMessage) -> bool {
        match &self.raw_publish {
            Some(hook) => {
                hook(message).await;
                true
            }
            None => false,
        }
    }

    /// Restarts the real broker through the hook; returns `false` (doing nothing) without one.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping the future may leave the broker stopped.
    pub async fn restart(&self) -> bool {
        match &self.restart {
            Some(hook) => {
                hook().await;
                true
            }
            None => false,
        }
    }
}

impl fmt::Debug for Harness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("broker", &self.broker)
            .field("restart", &self.restart.is_some())
            .field("raw_publish", &self.raw_publish.is_some())
            .field("fault_proxy", &self.fault_proxy.is_some())
            .field("receive_timeout", &self.receive_timeout)
            .field("quiet_period", &self.quiet_period)
            .field("case_timeout", &self.case_timeout)
            .finish()
    }
}

const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Harness>();
};

/// Cases that restart the broker, and so must not overlap with any other case of the process
/// when the harness can restart it.
const EXCLUSIVE_CASES: &[&str] = &["broker_restart_loses_no_confirmed_message"];

/// Held shared by every case, and exclusively by an [`EXCLUSIVE_CASES`] case that restarts.
static CASE_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Runs one case: what each test made by [`conformance_suite!`](crate::conformance_suite)
/// calls. Builds a multi-threaded runtime, makes a harness with `factory` (skipping the case
/// when it returns `None`), runs `case` with it under the harness's case timeout, then closes
/// the broker connection.
///
/// # Panics
/// When the case fails, or does not finish within [`Harness::case_timeout`].
#[doc(hidden)]
pub fn run<F, Fut, C, CFut>(name: &'static str, factory: F, case: C)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<Harness>>,
    C: FnOnce(Harness) -> CFut,
    CFut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("bus-conformance")
        .build()
        .expect("building the tokio runtime of a conformance case");
    runtime.block_on(async move {
        let shared = CASE_LOCK.read().await;
        let Some(harness) = factory().await else {
            println!("skipped: {name}: no broker configured (the harness factory returned None)");
            return;
        };
        if EXCLUSIVE_CASES.contains(&name) && harness.can_restart() {
            // Connect again once alone, so that no other case's connection sees the restart.
            close_quietly(&harness).await;
            drop((harness, shared));
            let _alone = CASE_LOCK.write().await;
            let harness = factory().await.unwrap_or_else(|| {
                panic!("{name}: the harness factory returned None on its second call")
            });
            run_with_timeout(name, harness, case).await;
        } else {
            run_with_timeout(name, harness, case).await;
            drop(shared);
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
}

async fn run_with_timeout<C, CFut>(name: &'static str, harness: Harness, case: C)
where
    C: FnOnce(Harness) -> CFut,
    CFut: Future<Output = ()>,
{
    let limit = harness.case_timeout;
    if tokio::time::timeout(limit, case(harness.clone()))
        .await
        .is_err()
    {
        panic!("{name}: did not finish within {limit:?} (slow broker? raise Harness::with_case_timeout)");
    }
    close_quietly(&harness).await;
}

/// Closes the harness's broker connection, best effort: how it closes after a case is not
/// what the case tests.
async fn close_quietly(harness: &Harness) {
    let _ = tokio::time::timeout(Duration::from_secs(5), harness.broker.close()).await;
}

/// Expands to the whole conformance suite: one `#[test]` per case in [`cases`], each run on its
/// own multi-threaded tokio runtime with a fresh [`Harness`] from the factory.
///
/// The argument is an async function (or any expression callable with no arguments that
/// returns a future) producing `Option<Harness>`; `None` skips every case, printing why. See
/// the [module docs](crate::conformance) for a whole `tests/conformance.rs`.
///
/// To run the suite twice (say with two configurations), call the macro inside two modules:
/// `mod limited { bus_core::conformance_suite!(super::limited_harness); }`.
#[macro_export]
macro_rules! conformance_suite {
    ($factory:expr) => {
        $crate::__conformance_tests! {
            $factory;
            round_trip_many,
            publish_batch_round_trip,
            binary_payload,
            empty_payload,
            many_headers,
            too_many_headers_rejected,
            correlation_and_causation_survive,
            trace_context_survives,
            typed_message_round_trip,
            topics_do_not_cross,
            private_subscriptions_each_get_all,
            fan_out_two_groups,
            group_members_share_work,
            queue_competing_consumers,
            queue_keeps_messages_until_consumed,
            per_key_order_single_subscriber,
            per_key_order_across_members,
            resubscribe_in_same_group_loses_nothing,
            acked_messages_not_redelivered_after_resubscribe,
            concurrent_subscribe_close,
            nack_now_redelivers,
            nack_after_delay_waits,
            reject_dead_letters_from_topic,
            reject_dead_letters_from_queue,
            dropped_delivery_is_redelivered,
            request_reply_round_trip,
            request_timeout,
            request_no_responders,
            oversize_payload_rejected,
            publish_after_close_fails_closed,
            subscription_close_ends_stream,
            broker_restart_loses_no_confirmed_message,
            retry_then_dead_letter_exact_counts,
            idempotency_under_injected_duplicates,
            per_key_order_under_concurrency_16,
            per_key_order_kept_across_retries,
            parked_key_dead_letters_and_moves_on,
            graceful_shutdown_loses_nothing,
            trace_id_continuity_publish_to_process,
            undecodable_message_is_dead_lettered,
            long_handler_is_not_redelivered,
            connection_reset_mid_stream_loses_nothing,
            stall_then_recover,
            reconnect_does_not_duplicate_acked,
            backlog_counts_what_waits,
            delayed_publish_arrives_after_delay,
        }
    };
}

/// Expands to one test per listed case; used by [`conformance_suite!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::conformance::run(
                    ::core::stringify!($case),
                    $factory,
                    $crate::conformance::cases::$case,
                );
            }
        )*
    };
}
