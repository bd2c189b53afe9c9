//! The shared conformance suite against a server speaking the SQS and SNS APIs
//! (`BUS_TEST_SQS_URL`, e.g. `sqs://127.0.0.1:4566?region=us-east-1` for moto started by
//! `scripts/brokers.sh start sqs`).
//!
//! No restart hook: moto keeps its state in memory, so restarting it loses every queue and
//! message, which proves nothing about SQS, whose durability is AWS's. The restart case is
//! skipped for that reason (see docs/adapters/sqs.md).

use std::sync::Arc;
use std::time::Duration;

use adapter_sqs::{SqsBroker, SqsConfig};
use bus_core::conformance::{broker_url, Harness};

async fn harness() -> Option<Harness> {
    let url = broker_url("BUS_TEST_SQS_URL")?;
    let config = SqsConfig::from_url(&url)
        .expect("BUS_TEST_SQS_URL is a valid sqs:// URL")
        // Short polls keep closing quick; moto answers at once when messages wait.
        .with_wait_time(Duration::from_secs(1));
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
