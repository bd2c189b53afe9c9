//! The CI gate's figures for the NATS wire format (issue 14): allocations and instructions per
//! message of `nats.encode` and `nats.decode`, see `bus_core::cost` and `scripts/cost.sh`.
//!
//! ```text
//! cargo bench -p adapter-nats --bench cost       # bench profile
//! scripts/cost.sh                                 # the gate (test profile)
//! ```

use std::process::ExitCode;

/// Allocations on this thread, by the counting `#[global_allocator]` that
/// `allocation-counter` installs (per-thread counters).
fn count(f: &mut dyn FnMut()) -> u64 {
    allocation_counter::measure(f).count_total
}

fn main() -> ExitCode {
    bus_core::cost::main(count, adapter_nats::cost::items())
}
