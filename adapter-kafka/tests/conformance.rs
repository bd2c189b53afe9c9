//! The shared conformance suite against a Kafka-API broker named by `BUS_TEST_KAFKA_URL`
//! (e.g. `kafka://127.0.0.1:9092`, tansu as `scripts/brokers.sh` starts it).
//!
//! No restart hook here: the test broker keeps its data in memory, so a restart would lose
//! what it had confirmed, which proves nothing about the adapter. tests/restart.rs restarts a
//! tansu of its own on SQLite storage instead. The raw-publish hook sends with a plain rdkafka
//! producer, as a service that does not use `bus` would. The fault cases start a tansu of
//! their own that advertises the fault proxy's address (see `through_proxy`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use adapter_kafka::rdkafka::message::{Header, OwnedHeaders};
use adapter_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use adapter_kafka::rdkafka::ClientConfig;
use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::conformance::{broker_url, FaultProxy, Harness, RawMessage};
use bus_core::Broker;
use tokio::process::Command;

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

/// A broker connection through `proxy` to a tansu of its own (memory storage) that advertises
/// the proxy's address: Kafka clients connect to the advertised address after bootstrapping,
/// so a proxy in front of the shared broker would be bypassed. The tansu lives as long as the
/// proxy.
async fn through_proxy(proxy: FaultProxy) -> Arc<dyn Broker> {
    let tansu = tansu_binary().expect("tansu is installed (scripts/brokers.sh install kafka)");
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let log = std::env::temp_dir().join(format!("bus-kafka-faults-{port}.log"));
    let log = std::fs::File::create(&log).expect("the tansu log file");
    let child = Command::new(tansu)
        .arg("broker")
        .arg("--listener-url")
        .arg(format!("tcp://127.0.0.1:{port}"))
        .arg("--advertised-listener-url")
        .arg(format!("tcp://{}", proxy.addr()))
        .arg("--storage-engine")
        .arg("memory://tansu/")
        .stdout(Stdio::from(log.try_clone().expect("the tansu log file")))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("start tansu");
    proxy.keep(child);
    let upstream = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(upstream).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tansu did not listen on {upstream} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.forward_to(upstream);
    let config = KafkaConfig::new(proxy.addr().to_string()).with_client_id("bus-conformance");
    let broker = KafkaBroker::connect(config)
        .await
        .expect("connect to tansu through the fault proxy");
    Arc::new(broker)
}

fn tansu_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("tansu"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = PathBuf::from(home).join(".cargo/bin/tansu");
        p.is_file().then_some(p)
    })
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
