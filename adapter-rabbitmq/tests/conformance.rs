//! The shared conformance suite against the real RabbitMQ named by `BUS_TEST_RABBITMQ_URL`
//! (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`), with a restart hook that stops and starts
//! the server through `scripts/brokers.sh restart rabbitmq`.
//!
//! The payload limit is set to 1 MiB here (the broker's own default is 128 MiB, too large to
//! allocate in a test), so the oversize case checks the adapter's refusal. Queues the cases
//! declare expire ten minutes after their last use.

use std::sync::Arc;
use std::time::Duration;

use adapter_rabbitmq::{RabbitMqBroker, RabbitMqConfig};
use bus_core::conformance::{broker_url, Harness};

async fn harness() -> Option<Harness> {
    let url = broker_url("BUS_TEST_RABBITMQ_URL")?;
    let config = RabbitMqConfig::new(url)
        .with_connection_name("bus-conformance")
        .with_max_payload(1024 * 1024)
        .with_queue_expires(Duration::from_secs(600))
        .with_reconnect_timeout(Duration::from_secs(60));
    let broker = RabbitMqBroker::with_config(config)
        .await
        .expect("connect to the test RabbitMQ");
    Some(
        Harness::new(Arc::new(broker))
            .with_receive_timeout(Duration::from_secs(20))
            .with_restart(restart_rabbitmq),
    )
}

/// Stops and starts the real server; returns once it accepts connections again.
async fn restart_rabbitmq() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let status = tokio::process::Command::new("bash")
        .arg("scripts/brokers.sh")
        .args(["restart", "rabbitmq"])
        .current_dir(root)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .expect("run scripts/brokers.sh");
    assert!(
        status.success(),
        "scripts/brokers.sh restart rabbitmq failed"
    );
}

bus_core::conformance_suite!(harness);
