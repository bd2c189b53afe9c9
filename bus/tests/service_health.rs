//! Health of a running service, per subscription and for the broker connection, through
//! its transitions on the in-process broker.
#![cfg(feature = "memory")]

use std::time::Duration;

use bus::service::testing::TestHarness;
use bus::service::{Channel, Health, ServiceHealth};
use bus::{Context, ErrorKind, Message, Service};
use serde::{Deserialize, Serialize};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
}
impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
}

fn billing(bus: bus::Bus) -> Service {
    Service::new("billing", bus)
        .on("orders", |_: OrderPlaced, _: Context| async { Ok(()) })
        .on_queue("invoices", |_: OrderPlaced, _: Context| async { Ok(()) })
}

fn statuses(health: &ServiceHealth) -> Vec<(Channel, &str, Health)> {
    health
        .subscriptions
        .iter()
        .map(|s| (s.channel, s.name.as_str(), s.status))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_service_is_ready_and_a_stopped_one_down() {
    let bus = bus::connect("memory://").await.unwrap();
    let service = billing(bus).start().await.unwrap();

    let health = service.health();
    assert_eq!(health.service, "billing");
    assert_eq!(health.status, Health::Ready, "{health}");
    assert_eq!(health.broker.status, Health::Ready);
    assert_eq!(
        statuses(&health),
        [
            (Channel::Topic, "orders", Health::Ready),
            (Channel::Queue, "invoices", Health::Ready)
        ]
    );
    assert_eq!(
        health.subscription("orders").unwrap().group.as_deref(),
        Some("billing")
    );
    assert_eq!(
        health.to_string(),
        "billing: ready; broker ready; topic orders ready; queue invoices ready"
    );

    let watch = service.health_watch();
    service.stop().await;
    let health = watch.current();
    assert_eq!(health.status, Health::Down, "{health}");
    for s in &health.subscriptions {
        assert_eq!(s.status, Health::Down, "{health}");
        assert_eq!(s.reason.as_deref(), Some("closed: the consumer stopped"));
    }
    // The service stopped; nothing says the broker is unwell.
    assert_eq!(health.broker.status, Health::Ready, "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_receives_degrade_the_service_until_messages_flow_again() {
    let harness = TestHarness::new();
    let service = billing(harness.bus()).start().await.unwrap();
    let mut watch = service.health_watch();

    harness.fail_receiving(ErrorKind::Connection);
    let health = timeout(
        WAIT,
        watch.wait_for(|h| h.subscriptions.iter().all(|s| s.status == Health::Degraded)),
    )
    .await
    .expect("degraded once receiving fails");
    assert_eq!(health.status, Health::Degraded, "{health}");
    assert_eq!(health.broker.status, Health::Degraded, "{health}");
    let reason = health
        .subscription("orders")
        .unwrap()
        .reason
        .clone()
        .unwrap();
    assert!(
        reason.starts_with("connection: receiving failed"),
        "{reason}"
    );
    assert_eq!(health.broker.reason.as_deref(), Some(reason.as_str()));

    // Published while the consumers cannot receive: handled once they can again.
    harness
        .publish(
            "orders",
            &OrderPlaced {
                order_id: "o-1".into(),
            },
        )
        .await
        .unwrap();
    harness
        .send(
            "invoices",
            &OrderPlaced {
                order_id: "o-1".into(),
            },
        )
        .await
        .unwrap();
    harness.heal();
    harness.acked::<OrderPlaced>().await;
    let health = timeout(WAIT, watch.wait_for(|h| h.status == Health::Ready))
        .await
        .expect("ready again once messages are received");
    assert_eq!(health.broker.status, Health::Ready);
    assert!(
        health.subscriptions.iter().all(|s| s.reason.is_none()),
        "{health}"
    );

    let report = service.stop().await;
    let receive_errors: u64 = report
        .subscriptions
        .iter()
        .map(|s| s.consumer.as_ref().unwrap().receive_errors)
        .sum();
    assert!(receive_errors >= 2, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_bus_takes_the_subscriptions_and_the_broker_down() {
    let bus = bus::connect("memory://").await.unwrap();
    let service = billing(bus.clone()).start().await.unwrap();
    let mut watch = service.health_watch();

    bus.close().await.unwrap();
    let health = timeout(WAIT, watch.wait_for(|h| h.broker.status == Health::Down))
        .await
        .expect("the broker is down once the bus is closed");
    assert_eq!(health.status, Health::Down);
    assert!(
        health
            .broker
            .reason
            .as_deref()
            .unwrap()
            .contains("every subscription ended"),
        "{health}"
    );
    for s in &health.subscriptions {
        assert_eq!(s.status, Health::Down, "{health}");
        assert_eq!(s.reason.as_deref(), Some("closed: the subscription ended"));
    }
    // The consumers end with their subscriptions: the service returns on its own.
    let report = timeout(WAIT, service.join())
        .await
        .expect("the service ended");
    assert_eq!(report.subscriptions.len(), 2);
    assert_eq!(watch.current().broker.status, Health::Down, "stays down");
}

#[tokio::test]
async fn health_types_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<ServiceHealth>();
    assert_send_sync::<bus::service::HealthWatch>();
    let mut watch = {
        let bus = bus::connect("memory://").await.unwrap();
        let service = billing(bus).start().await.unwrap();
        let watch = service.health_watch();
        service.stop().await;
        watch
    };
    fn assert_send<T: Send>(_: &T) {}
    let changed = watch.changed();
    assert_send(&changed);
}
