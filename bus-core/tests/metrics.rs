//! Messaging metrics on the in-process broker, read back through an in-memory exporter.

use std::sync::Arc;
use std::time::Duration;

use adapter_memory::MemoryBroker;
use bus_core::middleware::metrics::{BusMetrics, MeteredBroker, MetricsLayer};
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo, HandlerBuilder, Outcome};
use bus_core::{
    Broker, Envelope, Error, ErrorKind, Publisher, Queue, SubscribeOptions, Subscriber,
};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

fn meter() -> (SdkMeterProvider, InMemoryMetricExporter) {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter.clone()).build())
        .build();
    (provider, exporter)
}

/// One data point: its attributes (sorted) and its value (a sum, or a histogram's count).
#[derive(Debug)]
struct Point {
    attributes: Vec<(String, String)>,
    value: u64,
}

impl Point {
    fn get(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn attributes<'a>(kvs: impl Iterator<Item = &'a KeyValue>) -> Vec<(String, String)> {
    let mut attributes: Vec<_> = kvs
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect();
    attributes.sort();
    attributes
}

/// The data points of `name` in the latest (cumulative) export.
fn points(
    provider: &SdkMeterProvider,
    exporter: &InMemoryMetricExporter,
    name: &str,
) -> Vec<Point> {
    provider.force_flush().expect("flush");
    let exported: Vec<ResourceMetrics> = exporter.get_finished_metrics().expect("metrics");
    let latest = exported.last().expect("an export");
    let mut found = Vec::new();
    for scope in latest.scope_metrics() {
        assert_eq!(scope.scope().name(), "bus");
        for metric in scope.metrics().filter(|m| m.name() == name) {
            match metric.data() {
                AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                    found.extend(sum.data_points().map(|p| Point {
                        attributes: attributes(p.attributes()),
                        value: p.value(),
                    }));
                }
                AggregatedMetrics::F64(MetricData::Histogram(histogram)) => {
                    assert_eq!(metric.unit(), "s");
                    found.extend(histogram.data_points().map(|p| Point {
                        attributes: attributes(p.attributes()),
                        value: p.count(),
                    }));
                }
                other => panic!("{name}: unexpected data {other:?}"),
            }
        }
    }
    found
}

fn total(points: &[Point], key: &str, value: &str) -> u64 {
    points
        .iter()
        .filter(|p| p.get(key) == Some(value))
        .map(|p| p.value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_outcomes_are_counted_and_timed() {
    let (provider, exporter) = meter();
    let metrics = BusMetrics::new(&provider);
    let memory = Arc::new(MemoryBroker::new());
    let broker = MeteredBroker::new(memory.clone(), metrics.clone());
    let subscription = broker
        .subscribe("orders", SubscribeOptions::group("billing"))
        .await
        .unwrap();

    // "ok" is processed; "flaky" fails its first attempt and is processed on the second;
    // "bad" can never be processed and goes to the dead-letter queue.
    let (handled, mut handled_rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = HandlerBuilder::new()
        .layer(MetricsLayer::new(metrics.clone(), "memory"))
        .handler(handler_fn(move |order: Envelope, info: DeliveryInfo| {
            let handled = handled.clone();
            async move {
                let outcome = match (&order.payload[..], info.attempt()) {
                    (b"flaky", 1) => Outcome::retry(Error::timeout("database")),
                    (b"bad", _) => {
                        Outcome::reject(Error::new(ErrorKind::Serialization, "not an order"))
                    }
                    _ => Outcome::Ack,
                };
                handled.send(()).unwrap();
                outcome
            }
        }));
    let consumer = Consumer::new(subscription, handler).spawn();

    for payload in ["ok", "ok", "ok", "flaky", "bad"] {
        broker
            .publish("orders", Envelope::new("order.placed", payload))
            .await
            .unwrap();
    }
    // 5 messages, one of them handled twice.
    for _ in 0..6 {
        tokio::time::timeout(Duration::from_secs(5), handled_rx.recv())
            .await
            .expect("handled within 5 s")
            .unwrap();
    }
    let report = consumer.stop().await.unwrap();
    assert_eq!(
        (report.acked, report.retried, report.rejected),
        (4, 1, 1),
        "{report:?}"
    );

    let outcomes = points(&provider, &exporter, "bus.consumer.outcomes");
    assert_eq!(total(&outcomes, "bus.outcome", "ack"), 4);
    assert_eq!(total(&outcomes, "bus.outcome", "retry"), 1);
    assert_eq!(total(&outcomes, "bus.outcome", "reject"), 1);
    let retry = outcomes
        .iter()
        .find(|p| p.get("bus.outcome") == Some("retry"))
        .unwrap();
    assert_eq!(retry.get("error.type"), Some("timeout"));
    let reject = outcomes
        .iter()
        .find(|p| p.get("bus.outcome") == Some("reject"))
        .unwrap();
    assert_eq!(reject.get("error.type"), Some("serialization"));
    let ack = outcomes
        .iter()
        .find(|p| p.get("bus.outcome") == Some("ack"))
        .unwrap();
    assert_eq!(ack.get("error.type"), None);
    assert_eq!(ack.get("messaging.system"), Some("memory"));
    assert_eq!(ack.get("messaging.destination.name"), Some("orders"));
    assert_eq!(ack.get("messaging.consumer.group.name"), Some("billing"));
    assert_eq!(ack.get("messaging.operation.name"), Some("process"));

    // The duration histogram saw the same runs.
    let durations = points(&provider, &exporter, "messaging.process.duration");
    assert_eq!(total(&durations, "bus.outcome", "ack"), 4);
    assert_eq!(total(&durations, "bus.outcome", "retry"), 1);
    assert_eq!(total(&durations, "bus.outcome", "reject"), 1);

    // Every delivery, the redelivery included, was consumed once.
    let consumed = points(&provider, &exporter, "messaging.client.consumed.messages");
    assert_eq!(consumed.len(), 1, "{consumed:?}");
    assert_eq!(consumed[0].value, 6);
    assert_eq!(
        consumed[0].get("messaging.consumer.group.name"),
        Some("billing")
    );

    // And the producer side counted the five publishes.
    let sent = points(&provider, &exporter, "messaging.client.sent.messages");
    assert_eq!(total(&sent, "messaging.destination.name", "orders"), 5);
}

#[tokio::test]
async fn sent_messages_are_counted_per_destination_and_error() {
    let (provider, exporter) = meter();
    let metrics = BusMetrics::new(&provider);
    let memory = Arc::new(MemoryBroker::new());
    let broker = MeteredBroker::new(memory.clone(), metrics);

    broker
        .publish("orders", Envelope::new("order.placed", "1"))
        .await
        .unwrap();
    broker
        .publish_batch(
            "orders",
            vec![
                Envelope::new("order.placed", "2"),
                Envelope::new("order.placed", "3"),
            ],
        )
        .await
        .unwrap();
    broker
        .send("jobs", Envelope::new("job", "1"))
        .await
        .unwrap();
    memory.close().await.unwrap();
    let error = broker
        .publish("orders", Envelope::new("order.placed", "4"))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Closed);

    let sent = points(&provider, &exporter, "messaging.client.sent.messages");
    let ok_orders: u64 = sent
        .iter()
        .filter(|p| p.get("messaging.destination.name") == Some("orders"))
        .filter(|p| p.get("error.type").is_none())
        .map(|p| p.value)
        .sum();
    assert_eq!(ok_orders, 3);
    assert_eq!(total(&sent, "messaging.destination.name", "jobs"), 1);
    assert_eq!(total(&sent, "error.type", "closed"), 1);
    for point in &sent {
        assert_eq!(point.get("messaging.system"), Some("memory"));
        assert_eq!(point.get("messaging.operation.name"), Some("publish"));
    }

    // One duration per operation: two publishes to orders that succeeded (one a batch), one
    // send, one failed publish.
    let durations = points(&provider, &exporter, "messaging.client.operation.duration");
    assert_eq!(durations.iter().map(|p| p.value).sum::<u64>(), 4);
}

#[tokio::test]
async fn the_broker_wrapper_passes_everything_else_through() {
    let (provider, _exporter) = meter();
    let memory: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let broker = MeteredBroker::new(memory.clone(), BusMetrics::new(&provider));
    assert_eq!(broker.capabilities(), memory.capabilities());
    let mut sub = broker
        .subscribe("t", SubscribeOptions::group("g"))
        .await
        .unwrap();
    broker.publish("t", Envelope::new("k", "p")).await.unwrap();
    let delivery = sub.next().await.unwrap().unwrap();
    assert_eq!(delivery.envelope().kind, "k");
    delivery.ack().await.unwrap();
    broker.close().await.unwrap();
    assert!(memory
        .publish("t", Envelope::new("k", "p"))
        .await
        .unwrap_err()
        .is_closed());
}

/// The latest value of gauge `name` for the consumer of `destination`.
fn gauge(
    provider: &SdkMeterProvider,
    exporter: &InMemoryMetricExporter,
    name: &str,
    destination: &str,
) -> Option<u64> {
    provider.force_flush().expect("flush");
    let exported: Vec<ResourceMetrics> = exporter.get_finished_metrics().expect("metrics");
    let latest = exported.last()?;
    for scope in latest.scope_metrics() {
        for metric in scope.metrics().filter(|m| m.name() == name) {
            let AggregatedMetrics::U64(MetricData::Gauge(gauge)) = metric.data() else {
                panic!("{name}: not a u64 gauge: {:?}", metric.data());
            };
            for point in gauge.data_points() {
                let attributes = attributes(point.attributes());
                if attributes.contains(&(
                    "messaging.destination.name".to_owned(),
                    destination.to_owned(),
                )) {
                    return Some(point.value());
                }
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_keys_and_messages_are_gauges() {
    let (provider, exporter) = meter();
    let metrics = BusMetrics::new(&provider);
    let memory = Arc::new(MemoryBroker::new());
    let subscription = memory
        .subscribe("payments", SubscribeOptions::group("ledger"))
        .await
        .unwrap();
    // "a1" fails its first attempt and is retried in place a minute later: key A is parked.
    let (ran, mut ran_rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = handler_fn(move |envelope: Envelope, info: DeliveryInfo| {
        let ran = ran.clone();
        async move {
            ran.send(()).unwrap();
            if &envelope.payload[..] == b"a1" && info.attempt() == 1 {
                Outcome::retry_after(Duration::from_secs(60), Error::timeout("ledger"))
            } else {
                Outcome::Ack
            }
        }
    });
    let consumer = Consumer::new(subscription, handler);
    metrics.observe_consumer(&consumer.gauges(), "memory", "payments", Some("ledger"));
    let consumer = consumer.spawn();
    for payload in ["a1", "a2", "a3"] {
        memory
            .publish("payments", Envelope::new("paid", payload).with_key("A"))
            .await
            .unwrap();
    }
    ran_rx.recv().await.unwrap();
    // The memory broker hands out a key's next message only once the previous one is settled,
    // so key A holds just the parked delivery here.
    let parked = |name| gauge(&provider, &exporter, name, "payments");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while parked("bus.consumer.parked_keys") != Some(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no parked key reported"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(parked("bus.consumer.parked_messages"), Some(1));
    assert_eq!(parked("bus.consumer.running"), Some(0));
    let gauges = consumer.gauges();
    assert_eq!((gauges.parked_keys(), gauges.parked_deliveries()), (1, 1));

    let report = consumer.stop().await.unwrap();
    assert_eq!((report.retried_in_place, report.abandoned), (1, 1));
    assert_eq!(parked("bus.consumer.parked_keys"), Some(0));
}

/// One layer serving consumers of two destinations and three groups counts each apart, with
/// the totals kept across collections (cumulative sums, not reset by an export).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_layer_counts_each_destination_and_group_apart() {
    let (provider, exporter) = meter();
    let metrics = BusMetrics::new(&provider);
    let broker = Arc::new(MemoryBroker::new());
    let (handled, mut handled_rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = HandlerBuilder::new()
        .layer(MetricsLayer::new(metrics.clone(), "memory"))
        .handler(handler_fn(move |order: Envelope, _: DeliveryInfo| {
            let handled = handled.clone();
            async move {
                handled.send(()).unwrap();
                if &order.payload[..] == b"late" {
                    Outcome::reject(Error::timeout("too late"))
                } else {
                    Outcome::Ack
                }
            }
        }));
    let mut consumers = Vec::new();
    for (topic, options) in [
        ("orders", SubscribeOptions::group("billing")),
        ("orders", SubscribeOptions::group("shipping")),
        ("refunds", SubscribeOptions::default()),
    ] {
        let subscription = broker.subscribe(topic, options).await.unwrap();
        consumers.push(Consumer::new(subscription, handler.clone()).spawn());
    }
    // orders: 3 messages, each to both groups; refunds: 2, one of them rejected.
    for (topic, payload) in [
        ("orders", "1"),
        ("orders", "2"),
        ("orders", "3"),
        ("refunds", "1"),
        ("refunds", "late"),
    ] {
        broker
            .publish(topic, Envelope::new("order.changed", payload))
            .await
            .unwrap();
    }
    for _ in 0..8 {
        tokio::time::timeout(Duration::from_secs(5), handled_rx.recv())
            .await
            .expect("handled within 5 s")
            .unwrap();
    }
    for consumer in consumers {
        consumer.stop().await.unwrap();
    }

    for _ in 0..2 {
        let consumed = points(&provider, &exporter, "messaging.client.consumed.messages");
        let of = |destination: &str, group: Option<&str>| -> Vec<u64> {
            consumed
                .iter()
                .filter(|p| {
                    p.get("messaging.destination.name") == Some(destination)
                        && p.get("messaging.consumer.group.name") == group
                })
                .map(|p| p.value)
                .collect()
        };
        assert_eq!(consumed.len(), 3, "{consumed:?}");
        assert_eq!(of("orders", Some("billing")), [3]);
        assert_eq!(of("orders", Some("shipping")), [3]);
        assert_eq!(of("refunds", None), [2]);
    }
    let outcomes = points(&provider, &exporter, "bus.consumer.outcomes");
    assert_eq!(total(&outcomes, "bus.outcome", "ack"), 7, "{outcomes:?}");
    let rejected: Vec<_> = outcomes
        .iter()
        .filter(|p| p.get("bus.outcome") == Some("reject"))
        .collect();
    assert_eq!(rejected.len(), 1, "{outcomes:?}");
    assert_eq!(rejected[0].value, 1);
    assert_eq!(
        rejected[0].get("messaging.destination.name"),
        Some("refunds")
    );
    assert_eq!(rejected[0].get("error.type"), Some("timeout"));
}
