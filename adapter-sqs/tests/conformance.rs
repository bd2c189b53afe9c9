//! The shared conformance suite against a server speaking the SQS and SNS APIs
//! (`BUS_TEST_SQS_URL`, e.g. `sqs://127.0.0.1:4566?region=us-east-1` for moto started by
//! `scripts/brokers.sh start sqs`).
//!
//! The suite runs twice: on standard queues, and on FIFO queues and topics (`fifo::*`).
//!
//! No restart hook: moto keeps its state in memory, so restarting it loses every queue and
//! message, which proves nothing about SQS, whose durability is AWS's. The restart case is
//! skipped for that reason (see docs/adapters/sqs.md).

use std::sync::Arc;
use std::time::Duration;

use adapter_sqs::{SqsBroker, SqsConfig};
use bus_core::conformance::{broker_url, Harness};

async fn harness() -> Option<Harness> {
    connect(false).await
}

/// FIFO topics and queues: per-key order, also across the members of a group.
async fn fifo_harness() -> Option<Harness> {
    connect(true).await
}

async fn connect(fifo: bool) -> Option<Harness> {
    let url = broker_url("BUS_TEST_SQS_URL")?;
    let config = SqsConfig::from_url(&url)
        .expect("BUS_TEST_SQS_URL is a valid sqs:// URL")
        // Short waits keep closing quick; moto answers at once when messages wait. On FIFO no
        // long polling at all: moto 5.2 checks a receive's message groups against the ones in
        // flight when the call starts, so a long poll can take a group another member holds
        // (real SQS does not).
        .with_wait_time(Duration::from_secs(if fifo { 0 } else { 1 }))
        .with_fifo(fifo)
        // The suite publishes the same envelope again on purpose and expects every copy
        // delivered (idempotency_under_injected_duplicates); deduplication by envelope id, the
        // default, would drop them: tests/wire.rs covers it.
        .with_fifo_dedup_by_id(false);
    let broker = SqsBroker::connect_with(config)
        .await
        .expect("connect to the test SQS server");
    Some(
        Harness::new(Arc::new(broker))
            .with_receive_timeout(Duration::from_secs(30))
            .with_quiet_period(Duration::from_secs(2))
            .with_case_timeout(Duration::from_secs(300)),
    )
}

bus_core::conformance_suite!(harness);

mod fifo {
    bus_core::conformance_suite!(super::fifo_harness);
}
