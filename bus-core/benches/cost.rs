//! The CI gate's figures for the consumer runtime (issue 14): allocations and instructions
//! per message of the runtime's dispatch, see `bus_core::cost` and `scripts/cost.sh`.
//!
//! ```text
//! cargo bench -p bus-core --all-features --bench cost                 # bench profile
//! scripts/cost.sh                                                      # the gate (test profile)
//! ```
//!
//! Items: `runtime.dispatch` (no key) and `runtime.dispatch_keyed` (16 keys) to a handler
//! that does nothing, and, with the `opentelemetry` feature, `runtime.dispatch_stack`: the
//! standard stack (tracing with an SDK tracer provider that records and exports nothing,
//! metrics with an SDK meter provider whose reader exports hourly, retry, idempotency on the memory
//! store).

use std::process::ExitCode;

/// Allocations on this thread, by the counting `#[global_allocator]` that
/// `allocation-counter` installs (per-thread counters).
fn count(f: &mut dyn FnMut()) -> u64 {
    allocation_counter::measure(f).count_total
}

#[cfg(feature = "opentelemetry")]
fn stack() -> bus_core::cost::Item {
    use bus_core::middleware::idempotency::{IdempotencyLayer, MemoryStore};
    use bus_core::middleware::metrics::{BusMetrics, MetricsLayer};
    use bus_core::middleware::tracing::TracingLayer;
    use bus_core::middleware::{RetryLayer, RetryPolicy};
    use bus_core::runtime::{handler_fn, DeliveryInfo, HandlerBuilder};
    use bus_core::Envelope;
    use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    let tracer = SdkTracerProvider::builder().build();
    let meter = SdkMeterProvider::builder()
        .with_reader(
            PeriodicReader::builder(InMemoryMetricExporter::default())
                .with_interval(std::time::Duration::from_secs(3600))
                .build(),
        )
        .build();
    let metrics = BusMetrics::new(&meter);
    bus_core::cost::Item::new("runtime.dispatch_stack", move |n| {
        let handler = HandlerBuilder::new()
            .layer(TracingLayer::new("memory").with_tracer_provider(&tracer))
            .layer(MetricsLayer::new(metrics.clone(), "memory"))
            .layer(RetryLayer::new(RetryPolicy::new()))
            .layer(IdempotencyLayer::new(MemoryStore::new()))
            .handler(handler_fn(|_: Envelope, _: DeliveryInfo| async {}));
        bus_core::cost::dispatch(handler, bus_core::cost::envelopes(n, 256, None));
    })
    .with_iterations(300)
}

fn main() -> ExitCode {
    #[allow(unused_mut)]
    let mut items = bus_core::cost::items();
    #[cfg(feature = "opentelemetry")]
    items.push(stack());
    bus_core::cost::main(count, items)
}
