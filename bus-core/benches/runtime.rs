//! What the consumer runtime costs per message (issue 14).
//!
//! The same messages, waiting in a memory-broker group, are consumed in several ways, in
//! interleaved rounds on one thread (a current-thread tokio runtime, so the figure is the CPU
//! time of one message, without cross-thread wake-ups):
//!
//! - `raw`: a plain [`Subscription`] loop: `next()`, `ack()`;
//! - `consumer`: a [`Consumer`] with a handler that does nothing;
//! - `consumer, tasks`: the same with a task per delivery
//!   ([`Consumer::with_task_per_delivery`]) instead of the handlers inside the consumer's task;
//! - `+ retry`, `+ idempotency`, `+ tracing`, `+ metrics`: the same with one layer of the
//!   standard stack, to see what each costs;
//! - `consumer + stack`: the standard stack, outermost first: tracing (an SDK tracer
//!   provider that records every span and exports none), metrics (an SDK meter provider
//!   whose reader exports hourly, to memory), retry (default policy), idempotency (the memory
//!   store).
//!
//! ```text
//! cargo bench -p bus-core --features conformance --bench runtime
//! BUS_BENCH_MESSAGES=50000 BUS_BENCH_ROUNDS=9 cargo bench -p bus-core --features conformance --bench runtime
//! cargo bench -p bus-core --features conformance --bench runtime -- --instructions
//! ```
//!
//! Prints a table and the line `runtime ns_per_msg=<consumer + stack> overhead_ns=<consumer +
//! stack − raw>`. With `--instructions` (valgrind installed) it also runs each way under
//! callgrind, with N and 2N messages, and prints the instructions per message (the difference
//! over N, so start-up cancels; only the consuming is counted, not the filling of the broker).
//! Times are printed, never asserted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapter_memory::{MemoryBroker, MemoryConfig};
use bus_core::conformance::bench::{env_number, median};
use bus_core::middleware::idempotency::{IdempotencyLayer, MemoryStore};
use bus_core::middleware::metrics::{BusMetrics, MetricsLayer};
use bus_core::middleware::tracing::TracingLayer;
use bus_core::middleware::{RetryLayer, RetryPolicy};
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo, Handler, HandlerBuilder};
use bus_core::{Bytes, Envelope, Publisher, SubscribeOptions, Subscriber, Subscription};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::runtime::Runtime;
use tower_layer::Layer;

const TOPIC: &str = "bench";
const GROUP: &str = "bench";
const PAYLOAD: usize = 256;

/// The ways of consuming, in the order of the table: the last is the standard stack, the
/// ones before it each layer of it alone.
const WAYS: [&str; 8] = [
    "raw",
    "consumer",
    "consumer, tasks",
    "+ retry",
    "+ idempotency",
    "+ tracing",
    "+ metrics",
    "consumer + stack",
];

/// A broker whose group holds `count` messages, and a subscription to that group.
async fn filled(count: usize) -> (MemoryBroker, Subscription) {
    let broker = MemoryBroker::with_config(MemoryConfig::default().with_capacity(count.max(1)));
    let subscription = broker
        .subscribe(TOPIC, SubscribeOptions::group(GROUP))
        .await
        .expect("subscribe");
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    for _ in 0..count {
        broker
            .publish(TOPIC, Envelope::new("bench.event", payload.clone()))
            .await
            .expect("publish");
    }
    (broker, subscription)
}

/// A handler that does nothing.
fn noop() -> impl Handler {
    handler_fn(|_: Envelope, _: DeliveryInfo| async {})
}

/// The standard stack around a handler that does nothing.
fn stack(tracer: &SdkTracerProvider, meter: &SdkMeterProvider) -> impl Handler {
    HandlerBuilder::new()
        .layer(TracingLayer::new("memory").with_tracer_provider(tracer))
        .layer(MetricsLayer::new(BusMetrics::new(meter), "memory"))
        .layer(RetryLayer::new(RetryPolicy::new()))
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .handler(noop())
}

/// Runs `handler` in a [`Consumer`] until `count` deliveries were handled and settled.
async fn consume<H: Handler>(subscription: Subscription, handler: H, count: u64) {
    consume_with(subscription, handler, count, false).await;
}

/// As [`consume`], with a task per delivery or not.
async fn consume_with<H: Handler>(
    subscription: Subscription,
    handler: H,
    count: u64,
    task_per_delivery: bool,
) {
    let handled = Arc::new(AtomicU64::new(0));
    let all = Arc::new(tokio::sync::Notify::new());
    let counting = {
        let handled = handled.clone();
        let all = all.clone();
        CountingHandler {
            inner: handler,
            handled,
            all,
            count,
        }
    };
    let report = Consumer::new(subscription, counting)
        .with_task_per_delivery(task_per_delivery)
        .run(async { all.notified().await })
        .await
        .expect("consumer");
    assert_eq!(report.acked, count, "{report:?}");
    assert_eq!(handled.load(Ordering::Relaxed), count);
}

/// Counts handled deliveries around the handler under test, and says when all are.
struct CountingHandler<H> {
    inner: H,
    handled: Arc<AtomicU64>,
    all: Arc<tokio::sync::Notify>,
    count: u64,
}

#[bus_core::async_trait]
impl<H: Handler> Handler for CountingHandler<H> {
    async fn handle(&self, delivery: &bus_core::Delivery) -> bus_core::runtime::Outcome {
        let outcome = self.inner.handle(delivery).await;
        if self.handled.fetch_add(1, Ordering::Relaxed) + 1 == self.count {
            // A permit is stored if the consumer is not waiting yet.
            self.all.notify_one();
        }
        outcome
    }
}

/// Consumes `count` waiting messages the `way` says; the time it took. Only the consuming is
/// inside [`bus_core::cost::measured`], which is what callgrind counts.
fn round(runtime: &Runtime, way: &str, count: usize, providers: &Providers) -> Duration {
    let (_broker, mut subscription) = runtime.block_on(filled(count));
    let started = Instant::now();
    bus_core::cost::measured(|| {
        runtime.block_on(async {
            match way {
                "raw" => {
                    for _ in 0..count {
                        let delivery = subscription.next().await.expect("open").expect("ok");
                        delivery.ack().await.expect("ack");
                    }
                }
                "consumer" => consume(subscription, noop(), count as u64).await,
                "consumer, tasks" => {
                    consume_with(subscription, noop(), count as u64, true).await;
                }
                "+ retry" => {
                    let handler = RetryLayer::new(RetryPolicy::new()).layer(noop());
                    consume(subscription, handler, count as u64).await;
                }
                "+ idempotency" => {
                    let handler = IdempotencyLayer::new(MemoryStore::new()).layer(noop());
                    consume(subscription, handler, count as u64).await;
                }
                "+ tracing" => {
                    let handler = TracingLayer::new("memory")
                        .with_tracer_provider(&providers.tracer)
                        .layer(noop());
                    consume(subscription, handler, count as u64).await;
                }
                "+ metrics" => {
                    let metrics = BusMetrics::new(&providers.meter);
                    let handler = MetricsLayer::new(metrics, "memory").layer(noop());
                    consume(subscription, handler, count as u64).await;
                }
                _ => {
                    let handler = stack(&providers.tracer, &providers.meter);
                    consume(subscription, handler, count as u64).await;
                }
            }
        });
    });
    started.elapsed()
}

struct Providers {
    tracer: SdkTracerProvider,
    meter: SdkMeterProvider,
}

/// Instructions per message of `way` under callgrind: this binary run with N and 2N
/// messages, the difference over N.
fn instructions(way: &str, count: u64) -> Result<f64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let args = |n: u64| vec!["--once".to_owned(), way.to_owned(), n.to_string()];
    bus_core::cost::instructions_per_op(&exe, &args(count), &args(2 * count), count)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let providers = Providers {
        tracer: SdkTracerProvider::builder().build(),
        meter: SdkMeterProvider::builder()
            .with_reader(
                PeriodicReader::builder(InMemoryMetricExporter::default())
                    .with_interval(std::time::Duration::from_secs(3600))
                    .build(),
            )
            .build(),
    };
    // `--once <way> <n>`: one round, for callgrind.
    if let Some(at) = args.iter().position(|a| a == "--once") {
        let way = args.get(at + 1).expect("--once <way> <n>");
        let n = args
            .get(at + 2)
            .and_then(|n| n.parse().ok())
            .expect("--once <way> <n>");
        round(&runtime, way, n, &providers);
        return;
    }
    let messages = env_number("BUS_BENCH_MESSAGES", 20_000);
    let rounds = env_number("BUS_BENCH_ROUNDS", 7).max(1);
    println!(
        "consumer runtime on the memory broker: {messages} waiting messages of {PAYLOAD} B, \
         {rounds} interleaved rounds, one thread"
    );
    for way in WAYS {
        round(&runtime, way, messages / 10, &providers);
    }
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); WAYS.len()];
    for _ in 0..rounds {
        for (i, way) in WAYS.iter().enumerate() {
            let elapsed = round(&runtime, way, messages, &providers);
            ns[i].push(elapsed.as_nanos() as f64 / messages as f64);
        }
    }
    let with_instructions = args.iter().any(|a| a == "--instructions");
    println!(
        "{:<18} {:>14} {:>16} {:>16}",
        "way",
        "median ns/msg",
        "min–max ns/msg",
        if with_instructions {
            "instructions/msg"
        } else {
            ""
        }
    );
    let mut medians = Vec::new();
    for (i, way) in WAYS.iter().enumerate() {
        let min = ns[i].iter().copied().fold(f64::INFINITY, f64::min);
        let max = ns[i].iter().copied().fold(0.0, f64::max);
        let med = median(&mut ns[i]);
        medians.push(med);
        let instr = if with_instructions {
            match instructions(way, 2_000) {
                Ok(n) => format!("{n:.0}"),
                Err(error) => format!("({error})"),
            }
        } else {
            String::new()
        };
        println!(
            "{:<18} {:>14.0} {:>16} {:>16}",
            way,
            med,
            format!("{min:.0}–{max:.0}"),
            instr
        );
    }
    println!(
        "runtime ns_per_msg={:.0} overhead_ns={:.0}",
        medians[WAYS.len() - 1],
        medians[WAYS.len() - 1] - medians[0]
    );
}
