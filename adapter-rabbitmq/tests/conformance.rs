//! The shared conformance suite against the real RabbitMQ named by `BUS_TEST_RABBITMQ_URL`
//! (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`), with a restart hook that stops and starts
//! the server through `scripts/brokers.sh restart rabbitmq`, and a raw-publish hook that sends
//! with plain lapin to the work queue, writing CloudEvents attributes as the AMQP binding names
//! them (`cloudEvents:<attribute>` application properties).
//!
//! The payload limit is set to 1 MiB here (the broker's own default is 128 MiB, too large to
//! allocate in a test), so the oversize case checks the adapter's refusal. The fault cases
//! connect through a fault proxy in front of the same server. Queues the cases
//! declare expire ten minutes after their last use.

use std::sync::Arc;
use std::time::Duration;

use adapter_rabbitmq::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use adapter_rabbitmq::lapin::publisher_confirm::Confirmation;
use adapter_rabbitmq::lapin::types::{AMQPValue, FieldTable};
use adapter_rabbitmq::lapin::{BasicProperties, Connection, ConnectionProperties};
use adapter_rabbitmq::{RabbitMqBroker, RabbitMqConfig, CLOUDEVENTS_PREFIX};
use bus_core::conformance::{broker_url, FaultProxy, Harness, RawMessage};
use bus_core::Broker;
use url::Url;

async fn harness() -> Option<Harness> {
    let url = broker_url("BUS_TEST_RABBITMQ_URL")?;
    let broker = RabbitMqBroker::with_config(config(&url))
        .await
        .expect("connect to the test RabbitMQ");
    let proxied = url.clone();
    Some(
        Harness::new(Arc::new(broker))
            .with_receive_timeout(Duration::from_secs(20))
            .with_restart(restart_rabbitmq)
            .with_raw_publish(move |message| raw_publish(url.clone(), message))
            .with_fault_proxy(move |proxy| through_proxy(proxied.clone(), proxy)),
    )
}

/// The adapter's configuration for the cases, connecting to `url`.
fn config(url: &str) -> RabbitMqConfig {
    RabbitMqConfig::new(url)
        .with_connection_name("bus-conformance")
        .with_max_payload(1024 * 1024)
        .with_queue_expires(Duration::from_secs(600))
        .with_reconnect_timeout(Duration::from_secs(60))
}

/// The same configuration, connected through `proxy` to the server of `url`.
async fn through_proxy(url: String, proxy: FaultProxy) -> Arc<dyn Broker> {
    let mut proxied = Url::parse(&url).expect("BUS_TEST_RABBITMQ_URL is a URL");
    let server = proxied
        .socket_addrs(|| Some(5672))
        .expect("the RabbitMQ server's address")[0];
    proxy.forward_to(server);
    proxied.set_ip_host(proxy.addr().ip()).expect("an IP host");
    proxied.set_port(Some(proxy.addr().port())).expect("a port");
    let broker = RabbitMqBroker::with_config(config(proxied.as_str()))
        .await
        .expect("connect to the test RabbitMQ through the fault proxy");
    Arc::new(broker)
}

/// Sends `message` with plain lapin, as another service would: to the work queue of that name
/// through the default exchange, the CloudEvents attributes as `cloudEvents:*` headers.
async fn raw_publish(url: String, message: RawMessage) {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let connection = Connection::connect(&url, props).await.expect("raw connect");
    let channel = connection.create_channel().await.expect("raw channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let mut table = FieldTable::default();
    for (name, value) in &message.cloudevents {
        table.insert(
            format!("{CLOUDEVENTS_PREFIX}{name}").into(),
            AMQPValue::LongString(value.as_str().into()),
        );
    }
    let confirmation = channel
        .basic_publish(
            "",
            &message.queue,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &message.payload,
            BasicProperties::default().with_headers(table),
        )
        .await
        .expect("raw publish")
        .await
        .expect("raw publish confirm");
    assert!(
        matches!(confirmation, Confirmation::Ack(None)),
        "the raw message was not stored in `{}`: {confirmation:?}",
        message.queue
    );
    let _ = connection.close(200, "done").await;
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
