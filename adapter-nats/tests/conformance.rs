//! The shared conformance suite against the real nats-server with JetStream
//! (`BUS_TEST_NATS_URL`, e.g. `nats://127.0.0.1:4222`). The restart case restarts the server
//! through `scripts/brokers.sh restart nats`.

use std::sync::Arc;
use std::time::Duration;

use adapter_nats::{NatsBroker, NatsConfig};
use bus_core::conformance::{broker_url, Harness};

async fn harness() -> Option<Harness> {
    let url = broker_url("BUS_TEST_NATS_URL")?;
    let config = NatsConfig::from_url(&url)
        .expect("BUS_TEST_NATS_URL is a valid NATS URL")
        // Test topics keep their messages an hour, not for ever.
        .with_max_age(Duration::from_secs(3600));
    let broker = NatsBroker::connect_with(config)
        .await
        .expect("connect to the test NATS server");
    Some(
        Harness::new(Arc::new(broker))
            .with_receive_timeout(Duration::from_secs(20))
            .with_restart(restart_nats),
    )
}

/// Stops and starts nats-server (JetStream data stays on disk) and waits until it is up.
async fn restart_nats() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let status = tokio::process::Command::new("bash")
        .arg("scripts/brokers.sh")
        .args(["restart", "nats"])
        .current_dir(root)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .expect("run scripts/brokers.sh");
    assert!(
        status.success(),
        "scripts/brokers.sh restart nats failed: {status}"
    );
}

bus_core::conformance_suite!(harness);
