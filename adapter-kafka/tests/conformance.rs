//! The shared conformance suite against a Kafka-API broker named by `BUS_TEST_KAFKA_URL`
//! (e.g. `kafka://127.0.0.1:9092`, tansu as `scripts/brokers.sh` starts it).
//!
//! No restart hook here: the test broker keeps its data in memory, so a restart would lose
//! what it had confirmed, which proves nothing about the adapter. tests/restart.rs restarts a
//! tansu of its own on SQLite storage instead.

use std::sync::Arc;
use std::time::Duration;

use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::conformance::{broker_url, Harness};

async fn harness() -> Option<Harness> {
    let url = broker_url("BUS_TEST_KAFKA_URL")?;
    let config = KafkaConfig::from_url(&url)
        .expect("BUS_TEST_KAFKA_URL is a valid kafka:// URL")
        .with_client_id("bus-conformance");
    let broker = KafkaBroker::connect(config)
        .await
        .expect("connect to the test Kafka broker");
    Some(
        Harness::new(Arc::new(broker))
            .with_receive_timeout(Duration::from_secs(30))
            .with_quiet_period(Duration::from_secs(1))
            .with_case_timeout(Duration::from_secs(240)),
    )
}

bus_core::conformance_suite!(harness);
