//! Deterministic cost figures for the CI gate (issue 14): allocations and instructions per
//! operation. Not a stable API: it serves the `cost` benches and `scripts/cost.sh`.
//!
//! A crate's `benches/cost.rs` lists [`Item`]s, each an operation run `n` times with what is
//! counted wrapped in [`measured`], and hands them to [`main`] with its counting allocator.
//! Two figures per item, both `(cost of 2N operations − cost of N operations) / N`, so that
//! what a run does once (start-up, a runtime, caches filled at first use) cancels:
//!
//! - **allocations**: counted in process on the calling thread (the bench's
//!   `#[global_allocator]`), inside [`measured`] only, after one unmeasured warm-up run;
//! - **instructions**: the bench binary run twice under `valgrind --tool=callgrind`, collecting
//!   only inside [`measured`] (`--toggle-collect`), with N and then 2N operations.
//!
//! The command line of a cost bench ([`main`]):
//!
//! ```text
//! cost [FILTER...]           every item whose name contains a FILTER (all without one):
//!                            `cost <item> allocations=<a> instructions=<i>`
//! cost --no-instructions     the same without callgrind (`instructions=-`)
//! cost --list                the item names
//! cost --run ITEM N          runs ITEM once with N operations, counting nothing (what
//!                            callgrind runs)
//! ```
//!
//! `BUS_VALGRIND` names the valgrind binary (default `valgrind` on the `PATH`).

use std::cell::Cell;
use std::collections::VecDeque;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;

use crate::runtime::{Consumer, Handler};
use crate::{Delivery, DeliverySource, Envelope, Result, Settle, Settlement, Subscription};

/// How many operations an item runs by default for the figures (and twice as many).
pub const DEFAULT_ITERATIONS: u64 = 500;

/// The callgrind option that collects inside [`measured`] only.
const TOGGLE: &str = "--toggle-collect=bus_core::cost::measured*";

/// Counts the heap allocations the closure makes on the calling thread: what a cost bench's
/// counting `#[global_allocator]` provides.
pub type AllocationCounter = fn(&mut dyn FnMut()) -> u64;

static COUNTER: OnceLock<AllocationCounter> = OnceLock::new();

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNTED: Cell<u64> = const { Cell::new(0) };
}

/// One measured operation of the gate.
pub struct Item {
    name: String,
    iterations: u64,
    run: Box<dyn Fn(u64)>,
}

impl Item {
    /// An item named `name` whose `run(n)` performs the operation `n` times, each wrapped (or
    /// all of them, together) in [`measured`].
    pub fn new(name: impl Into<String>, run: impl Fn(u64) + 'static) -> Self {
        Self {
            name: name.into(),
            iterations: DEFAULT_ITERATIONS,
            run: Box::new(run),
        }
    }

    /// Runs `iterations` (and twice as many) operations for the figures instead of
    /// [`DEFAULT_ITERATIONS`].
    #[must_use]
    pub fn with_iterations(mut self, iterations: u64) -> Self {
        self.iterations = iterations.max(1);
        self
    }

    /// The name, as in the baseline file.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Allocations per operation, counted in process.
    fn allocations(&self) -> f64 {
        (self.run)(self.iterations);
        let once = counted(|| (self.run)(self.iterations));
        let twice = counted(|| (self.run)(2 * self.iterations));
        (twice as f64 - once as f64) / self.iterations as f64
    }
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Item")
            .field("name", &self.name)
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// Runs `f`: the part of an operation whose allocations and instructions the gate counts.
/// Never inlined, so that callgrind can collect inside it by name.
#[inline(never)]
pub fn measured<R>(f: impl FnOnce() -> R) -> R {
    let counter = COUNTER.get().filter(|_| COUNTING.with(Cell::get));
    let Some(counter) = counter else {
        return std::hint::black_box(f());
    };
    let mut f = Some(f);
    let mut result = None;
    // Not counting while counting: a nested `measured` adds nothing twice.
    COUNTING.with(|c| c.set(false));
    let allocations = counter(&mut || result = f.take().map(|f| f()));
    COUNTING.with(|c| c.set(true));
    COUNTED.with(|c| c.set(c.get() + allocations));
    std::hint::black_box(result.expect("measured closure ran"))
}

/// The allocations made inside [`measured`] while `f` runs.
fn counted(f: impl FnOnce()) -> u64 {
    COUNTED.with(|c| c.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    COUNTED.with(Cell::get)
}

/// The valgrind binary: `BUS_VALGRIND`, or `valgrind` on the `PATH`.
fn valgrind() -> String {
    std::env::var("BUS_VALGRIND").unwrap_or_else(|_| "valgrind".to_owned())
}

/// Instructions callgrind collects inside [`measured`] while `exe` runs with `args`.
///
/// # Errors
/// When valgrind cannot be started, the run fails, or its output has no total.
pub fn instructions(exe: &Path, args: &[String]) -> std::result::Result<u64, String> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let out = std::env::temp_dir().join(format!(
        "bus-cost-{}-{}.callgrind",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let output = Command::new(valgrind())
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(TOGGLE)
        .arg(exe)
        .args(args)
        .output()
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => format!(
                "valgrind not found (`{}`): install it (Debian: apt-get install valgrind) \
                 or set BUS_VALGRIND",
                valgrind()
            ),
            _ => format!("could not start valgrind: {error}"),
        })?;
    let written = std::fs::read_to_string(&out);
    let _ = std::fs::remove_file(&out);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Err(format!(
            "callgrind run of {} {} failed ({}):\n{}",
            exe.display(),
            args.join(" "),
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    let written = written.map_err(|e| format!("callgrind wrote no output: {e}"))?;
    // `totals:` (or `summary:` in older files): the events collected, instructions first.
    written
        .lines()
        .find_map(|line| {
            line.strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| "callgrind output has no instruction total".to_owned())
}

/// Instructions per operation: `exe` under callgrind with `once` (N operations) and `twice`
/// (2N) arguments, the difference over `n`.
///
/// # Errors
/// As [`instructions`].
pub fn instructions_per_op(
    exe: &Path,
    once: &[String],
    twice: &[String],
    n: u64,
) -> std::result::Result<f64, String> {
    let a = instructions(exe, once)?;
    let b = instructions(exe, twice)?;
    Ok((b as f64 - a as f64) / n as f64)
}

/// The whole command line of a cost bench (see the [module docs](self)): counts with
/// `counter`, runs `items`.
pub fn main(counter: AllocationCounter, items: Vec<Item>) -> ExitCode {
    let _ = COUNTER.set(counter);
    let args: Vec<String> = std::env::args()
        .skip(1)
        // `cargo bench` passes `--bench` to benches without the libtest harness.
        .filter(|a| a != "--bench")
        .collect();
    if args.iter().any(|a| a == "--list") {
        for item in &items {
            println!("{}", item.name);
        }
        return ExitCode::SUCCESS;
    }
    if let Some(at) = args.iter().position(|a| a == "--run") {
        let (Some(name), Some(n)) = (
            args.get(at + 1),
            args.get(at + 2).and_then(|n| n.parse().ok()),
        ) else {
            eprintln!("usage: --run ITEM N");
            return ExitCode::from(2);
        };
        let Some(item) = items.iter().find(|i| &i.name == name) else {
            eprintln!("no item named {name}");
            return ExitCode::from(2);
        };
        (item.run)(n);
        return ExitCode::SUCCESS;
    }
    let with_instructions = !args.iter().any(|a| a == "--no-instructions");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let exe = std::env::current_exe().expect("the bench's own path");
    let mut failed = false;
    for item in &items {
        if !filters.is_empty() && !filters.iter().any(|f| item.name.contains(f.as_str())) {
            continue;
        }
        let allocations = item.allocations();
        let instructions = if with_instructions {
            let args = |n: u64| vec!["--run".to_owned(), item.name.clone(), n.to_string()];
            match instructions_per_op(
                &exe,
                &args(item.iterations),
                &args(2 * item.iterations),
                item.iterations,
            ) {
                Ok(n) => format!("{n:.0}"),
                Err(error) => {
                    eprintln!("cost: {}: {error}", item.name);
                    failed = true;
                    "-".to_owned()
                }
            }
        } else {
            "-".to_owned()
        };
        println!(
            "cost {} allocations={allocations:.2} instructions={instructions}",
            item.name
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The message every adapter's wire items (`<adapter>.encode`, `<adapter>.decode`) carry, the
/// same for all so their figures compare: a 256-byte JSON payload, a key, a causation id, a
/// content type, trace context and two application headers.
#[must_use]
pub fn wire_envelope() -> Envelope {
    let parent = Envelope::new("order.created", "{}");
    let payload = format!(r#"{{"order":42,"note":"{}"}}"#, "x".repeat(233));
    Envelope::new("order.placed", payload)
        .caused_by(&parent)
        .with_key("order-42")
        .with_content_type("application/json")
        .with_header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with_header("tenant", "acme")
}

/// `count` envelopes of a `payload`-byte body, each with its own id; with `keys`, keyed
/// round robin over that many keys.
#[must_use]
pub fn envelopes(count: u64, payload: usize, keys: Option<u64>) -> Vec<Envelope> {
    let body = bytes::Bytes::from(vec![b'x'; payload]);
    (0..count)
        .map(|i| {
            let envelope = Envelope::new("order.placed", body.clone());
            match keys {
                Some(keys) => envelope.with_key(format!("order-{}", i % keys.max(1))),
                None => envelope,
            }
        })
        .collect()
}

/// The runtime's dispatch of `envelopes`: a [`Consumer`] (default settings) runs `handler`
/// over a subscription that hands them out as deliveries whose settlement does nothing, on a
/// current-thread tokio runtime, until all are settled. Only the consumer's run is
/// [`measured`]: what it counts per message is the consumer's work plus what an adapter does
/// to hand a delivery over (the `Delivery`, sharing its source and group names as the memory
/// broker does; an adapter that copies them into each delivery pays two allocations more).
///
/// # Panics
/// When the runtime cannot be built or the consumer fails.
pub fn dispatch<H: Handler>(handler: H, envelopes: Vec<Envelope>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    let count = envelopes.len() as u64;
    let subscription = Subscription::new(Box::new(Prepared {
        envelopes: envelopes.into(),
        source: Arc::from("orders"),
        group: Arc::from("billing"),
    }));
    let consumer = Consumer::new(subscription, handler);
    let report = measured(|| runtime.block_on(consumer.run(std::future::pending())))
        .expect("the consumer ran");
    assert_eq!(report.acked, count, "every delivery acked: {report:?}");
}

/// Hands out prepared envelopes, then ends; as the memory broker, it hands out what it holds
/// without waiting ([`DeliverySource::try_next`]) and its deliveries share its source and
/// group names ([`Delivery::with_shared_names`]).
#[derive(Debug)]
struct Prepared {
    envelopes: VecDeque<Envelope>,
    source: Arc<str>,
    group: Arc<str>,
}

#[async_trait]
impl DeliverySource for Prepared {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.try_next()
    }

    fn try_next(&mut self) -> Option<Result<Delivery>> {
        let envelope = self.envelopes.pop_front()?;
        Some(Ok(Delivery::with_shared_names(
            envelope,
            1,
            self.source.clone(),
            Some(self.group.clone()),
            Box::new(Settled),
        )))
    }

    async fn close(&mut self) -> Result<()> {
        Ok(())
    }

    fn keeps_key_order(&self) -> bool {
        true
    }
}

/// A settlement that the broker records at once, without a future ([`Settle::try_settle`]),
/// as the memory broker's acks.
#[derive(Debug)]
struct Settled;

#[async_trait]
impl Settle for Settled {
    fn try_settle(&self, _settlement: &Settlement) -> Option<Result<()>> {
        Some(Ok(()))
    }

    async fn settle(&self, _settlement: Settlement) -> Result<()> {
        Ok(())
    }

    fn abandon(&self) {}
}

/// The runtime's items: the dispatch of one message without a key and with one (16 keys
/// round robin), to a handler that does nothing.
#[must_use]
pub fn items() -> Vec<Item> {
    use crate::runtime::{handler_fn, DeliveryInfo};
    let noop = || handler_fn(|_: Envelope, _: DeliveryInfo| async {});
    vec![
        Item::new("runtime.dispatch", move |n| {
            dispatch(noop(), envelopes(n, 256, None));
        })
        .with_iterations(300),
        Item::new("runtime.dispatch_keyed", move |n| {
            dispatch(noop(), envelopes(n, 256, Some(16)));
        })
        .with_iterations(300),
    ]
}
