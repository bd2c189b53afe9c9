//! The shared conformance suite against a Kafka-API broker named by `BUS_TEST_KAFKA_URL`
//! (e.g. `kafka://127.0.0.1:9092`, tansu as `scripts/brokers.sh` starts it).
//!
//! No restart hook here: the test broker keeps its data in memory, so a restart would lose
//! what it had confirmed, which proves nothing about the adapter. tests/restart.rs restarts a
//! tansu of its own on SQLite storage instead. The raw-publish hook sends with a plain rdkafka
//! producer, as a service that does not use `bus` would. The fault cases start a tansu of
//! their own (`support::Tansu`) that advertises the fault proxy's port (see `through_proxy`).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use adapter_kafka::rdkafka::message::{Header, OwnedHeaders};
use adapter_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use adapter_kafka::rdkafka::ClientConfig;
use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::conformance::{broker_url, FaultProxy, Harness, RawMessage};
use bus_core::Broker;

async fn harness() -> Option<Harness> {
    let url = broker_url("BUS_TEST_KAFKA_URL")?;
    let config = KafkaConfig::from_url(&url)
        .expect("BUS_TEST_KAFKA_URL is a valid kafka:// URL")
        .with_client_id("bus-conformance");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap_servers)
        .create()
        .expect("a plain rdkafka producer");
    let broker = KafkaBroker::connect(config)
        .await
        .expect("connect to the test Kafka broker");
    Some(
        Harness::new(Arc::new(broker))
            .with_receive_timeout(Duration::from_secs(30))
            .with_quiet_period(Duration::from_secs(1))
            .with_case_timeout(Duration::from_secs(240))
            .with_raw_publish(move |message| raw_publish(producer.clone(), message))
            .with_fault_proxy(through_proxy),
    )
}

/// A broker connection through `proxy` to a tansu of its own (`support::Tansu`) that
/// advertises the proxy's port: Kafka clients connect to the advertised address after
/// bootstrapping, so a proxy in front of the shared broker would be bypassed. The tansu lives
/// as long as the proxy.
async fn through_proxy(proxy: FaultProxy) -> Arc<dyn Broker> {
    let binary = support::binary().expect("tansu is installed (scripts/brokers.sh install kafka)");
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let tansu = support::Tansu::start_advertising(binary, port, proxy.addr().port()).await;
    proxy.keep(tansu);
    proxy.forward_to(SocketAddr::from(([127, 0, 0, 1], port)));
    let config = KafkaConfig::new(proxy.addr().to_string()).with_client_id("bus-conformance");
    let broker = KafkaBroker::connect(config)
        .await
        .expect("connect to tansu through the fault proxy");
    Arc::new(broker)
}

/// Produces `message` to the topic the adapter maps the queue onto (the same name), its
/// CloudEvents attributes as the Kafka binding names them (`ce_<attribute>`).
async fn raw_publish(producer: FutureProducer, message: RawMessage) {
    let mut headers = OwnedHeaders::new();
    for (name, value) in &message.cloudevents {
        headers = headers.insert(Header {
            key: &format!("ce_{name}"),
            value: Some(value.as_bytes()),
        });
    }
    producer
        .send(
            FutureRecord::<(), [u8]>::to(&message.queue)
                .payload(&message.payload[..])
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("raw produce to the test Kafka broker");
}

bus_core::conformance_suite!(harness);
