//! The CI gate's figures for the Kafka wire format (issue 14): allocations and instructions per
//! message of `kafka.encode` and `kafka.decode`, see `bus_core::cost` and `scripts/cost.sh`.
//!
//! ```text
//! cargo bench -p adapter-kafka --bench cost      # bench profile
//! scripts/cost.sh                                 # the gate (test profile)
//! ```

use std::process::ExitCode;

/// Allocations on this thread, by the counting `#[global_allocator]` that
/// `allocation-counter` installs (per-thread counters).
fn count(f: &mut dyn FnMut()) -> u64 {
    allocation_counter::measure(f).count_total
}

fn main() -> ExitCode {
    bus_core::cost::main(count, adapter_kafka::cost::items())
}
