//! A service's health follows its broker connection on the real brokers: ready while the
//! broker answers, degraded while it cannot be reached (the adapter retrying), ready again
//! once a message arrives after it came back. The "broker" stops and comes back through a
//! `FaultProxy` between the adapter and the real server: every connection is reset and new
//! ones are refused (forwarded to a closed port) until the proxy forwards to the broker again.
//!
//! Kafka is not among them: its broker hands clients the addresses to connect to, so a proxy
//! in front of it takes a broker started for the proxy (as the Kafka adapter's fault cases
//! do), which this file does not do.
//!
//! Each broker runs when its `BUS_TEST_<BROKER>_URL` is set (scripts/test.sh sets them); with
//! `BUS_REQUIRE_BROKERS=1` a missing URL fails the test.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use bus::service::{Context, Health, ServiceHealth};
use bus::{Error, Message, Service};
use bus_core::conformance::{broker_url, FaultProxy};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
struct Ping {
    n: u32,
}

impl Message for Ping {
    const KIND: &'static str = "health.ping";
}

/// The broker's address in `url`, and `url` pointing at `proxy` instead.
fn through(url: &str, proxy: SocketAddr) -> (SocketAddr, String) {
    let mut parsed = url::Url::parse(url).expect("a broker URL");
    let host = parsed
        .host_str()
        .expect("a broker URL with a host")
        .to_owned();
    let port = parsed
        .port_or_known_default()
        .expect("a broker URL with a port");
    let broker = (host.as_str(), port)
        .to_socket_addrs()
        .expect("the broker's address resolves")
        .next()
        .expect("the broker has an address");
    parsed.set_ip_host(proxy.ip()).expect("an IP host");
    parsed.set_port(Some(proxy.port())).expect("a port");
    (broker, parsed.to_string())
}

/// A loopback port nobody listens on.
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
    listener.local_addr().expect("its address")
}

fn status_of(health: &ServiceHealth, topic: &str) -> Health {
    health
        .subscription(topic)
        .unwrap_or_else(|| panic!("no health for `{topic}`: {health}"))
        .status
}

async fn health_follows_the_broker(var: &str) {
    let Some(url) = broker_url(var) else {
        return;
    };
    let proxy = FaultProxy::start().await.expect("the proxy listens");
    let (broker, proxied) = through(&url, proxy.addr());
    proxy.forward_to(broker);
    let direct = bus::connect(&url).await.expect("connect to the broker");
    let bus = bus::connect(&proxied)
        .await
        .expect("connect through the proxy");

    let topic = format!("health.{}", bus::MessageId::new());
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let handle = Service::new(format!("{topic}.svc"), bus)
        .on(&topic, move |ping: Ping, _ctx: Context| {
            let seen_tx = seen_tx.clone();
            async move {
                let _ = seen_tx.send(ping.n);
                Ok::<(), Error>(())
            }
        })
        .start()
        .await
        .expect("the service starts");
    let mut watch = handle.health_watch();

    direct
        .publish_message(&topic, &Ping { n: 1 })
        .await
        .expect("publish");
    let first = tokio::time::timeout(DEADLINE, seen.recv()).await;
    assert_eq!(first.ok().flatten(), Some(1), "{var}: the first message");
    assert_eq!(status_of(&handle.health(), &topic), Health::Ready);

    // The broker goes away: open connections are reset, new ones refused.
    proxy.forward_to(closed_port());
    proxy.reset();
    let degraded = tokio::time::timeout(
        DEADLINE,
        watch.wait_for(|h| status_of(h, &topic) != Health::Ready),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{var}: still ready {DEADLINE:?} after the broker went away: {}",
            handle.health()
        )
    });
    assert_eq!(
        status_of(&degraded, &topic),
        Health::Degraded,
        "{var}: {degraded}"
    );
    assert_eq!(degraded.status, Health::Degraded, "{var}: {degraded}");

    // It comes back: the adapter reconnects, the next message arrives, the service is ready.
    proxy.forward_to(broker);
    direct
        .publish_message(&topic, &Ping { n: 2 })
        .await
        .expect("publish");
    let second = tokio::time::timeout(DEADLINE, async {
        loop {
            match seen.recv().await {
                Some(2) => return,
                Some(_) => continue,
                None => panic!("the handler's channel closed"),
            }
        }
    })
    .await;
    assert!(
        second.is_ok(),
        "{var}: no message {DEADLINE:?} after the broker came back: {}",
        handle.health()
    );
    let ready = tokio::time::timeout(
        DEADLINE,
        watch.wait_for(|h| status_of(h, &topic) == Health::Ready),
    )
    .await
    .unwrap_or_else(|_| panic!("{var}: not ready again: {}", handle.health()));
    assert_eq!(ready.status, Health::Ready, "{var}: {ready}");
    let report = handle.stop().await;
    assert!(report.is_clean(), "{var}: {report:?}");
    let _ = direct.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_broker_on_rabbitmq() {
    health_follows_the_broker("BUS_TEST_RABBITMQ_URL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_broker_on_nats() {
    health_follows_the_broker("BUS_TEST_NATS_URL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_broker_on_sqs() {
    health_follows_the_broker("BUS_TEST_SQS_URL").await;
}
