//! The shared conformance suite against the memory broker: once as it comes, and once
//! imitating SQS's limits (256 KiB payloads, 10 headers), which exercises the payload-limit
//! case and the header-limit skip.

use std::sync::Arc;

use adapter_memory::{MemoryBroker, MemoryConfig};
use bus_core::conformance::Harness;

async fn harness() -> Option<Harness> {
    Some(Harness::new(Arc::new(MemoryBroker::new())))
}

async fn sqs_limited_harness() -> Option<Harness> {
    let config = MemoryConfig::default()
        .with_max_payload(256 * 1024)
        .with_max_headers(10);
    Some(Harness::new(Arc::new(MemoryBroker::with_config(config))))
}

bus_core::conformance_suite!(harness);

mod sqs_limits {
    bus_core::conformance_suite!(super::sqs_limited_harness);
}
