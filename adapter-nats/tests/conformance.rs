//! The shared conformance suite against the real nats-server with JetStream
//! (`BUS_TEST_NATS_URL`, e.g. `nats://127.0.0.1:4222`). The restart case restarts the server
//! through `scripts/brokers.sh restart nats`; the fault cases connect through a fault proxy
//! in front of the same server.

use std::sync::Arc;
use std::time::Duration;

use adapter_nats::{NatsBroker, NatsConfig};
use bus_core::conformance::{broker_url, FaultProxy, Harness, RawMessage};
use bus_core::Broker;
use url::Url;

async fn harness() -> Option<Harness> {
    let url = broker_url("BUS_TEST_NATS_URL")?;
    let broker = NatsBroker::connect_with(config(&url))
        .await
        .expect("connect to the test NATS server");
    let raw = async_nats::jetstream::new(
        async_nats::connect(url.as_str())
            .await
            .expect("raw connect to the test NATS server"),
    );
    let names = broker.clone();
    Some(
        Harness::new(Arc::new(broker))
            .with_receive_timeout(Duration::from_secs(20))
            .with_restart(restart_nats)
            .with_raw_publish(move |message: RawMessage| {
                let raw = raw.clone();
                let subject = names.queue_subject(&message.queue);
                async move { raw_publish(&raw, subject, message).await }
            })
            .with_fault_proxy(move |proxy| through_proxy(url.clone(), proxy)),
    )
}

/// The adapter's configuration for the cases, connecting to `url`.
fn config(url: &str) -> NatsConfig {
    NatsConfig::from_url(url)
        .expect("BUS_TEST_NATS_URL is a valid NATS URL")
        // Test topics keep their messages an hour, not for ever.
        .with_max_age(Duration::from_secs(3600))
        // An ack wait short enough for long_handler_is_not_redelivered (a handler three leases
        // long) to run, long enough that messages waiting in the adapter's prefetch buffer
        // (where no consumer extends them yet) are not redelivered under load.
        .with_ack_wait(Duration::from_secs(10))
}

/// The same configuration, connected through `proxy` to the server of `url`.
async fn through_proxy(url: String, proxy: FaultProxy) -> Arc<dyn Broker> {
    let mut proxied = Url::parse(&url).expect("BUS_TEST_NATS_URL is a URL");
    let server = proxied
        .socket_addrs(|| None)
        .expect("the NATS server's address")[0];
    proxy.forward_to(server);
    proxied.set_ip_host(proxy.addr().ip()).expect("an IP host");
    proxied.set_port(Some(proxy.addr().port())).expect("a port");
    let broker = NatsBroker::connect_with(config(proxied.as_str()))
        .await
        .expect("connect to the test NATS server through the fault proxy");
    Arc::new(broker)
}

/// Sends `message` as a plain JetStream client would, its CloudEvents attributes as `ce-*`
/// headers (the CloudEvents NATS binding), onto the subject of the queue's stream.
async fn raw_publish(raw: &async_nats::jetstream::Context, subject: String, message: RawMessage) {
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in &message.cloudevents {
        headers.insert(format!("ce-{name}").as_str(), value.as_str());
    }
    raw.publish_with_headers(subject, headers, message.payload)
        .await
        .expect("raw publish")
        .await
        .expect("raw publish stored");
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
