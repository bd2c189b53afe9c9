//! The envelope on the wire, checked with a plain rdkafka client both ways: what bus publishes
//! carries the CloudEvents Kafka binding headers and the key; what a plain producer sends with
//! those headers (or none) comes out of bus as an envelope.

use std::collections::HashMap;
use std::time::Duration;

use adapter_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use adapter_kafka::rdkafka::message::{Header, Headers, OwnedHeaders};
use adapter_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use adapter_kafka::rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::conformance::broker_url;
use bus_core::{Broker, Envelope, Publisher, SubscribeOptions, Subscriber};

async fn broker() -> Option<(KafkaBroker, String)> {
    let url = broker_url("BUS_TEST_KAFKA_URL")?;
    let config = KafkaConfig::from_url(&url).expect("a kafka:// URL");
    let servers = config.bootstrap_servers.clone();
    let broker = KafkaBroker::connect(config).await.expect("connect");
    Some((broker, servers))
}

fn unique(tag: &str) -> String {
    format!("wire.{tag}.{}", uuid::Uuid::now_v7().simple())
}

/// Reads `count` records of every partition of `topic` from the beginning, with no group.
fn read_raw(
    servers: &str,
    topic: &str,
    count: usize,
) -> Vec<adapter_kafka::rdkafka::message::OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", "unused")
        .set("enable.auto.commit", "false")
        .create()
        .expect("raw consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while got.len() < count && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            got.push(m.detach());
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_publishes_cloudevents_kafka_binding() {
    let Some((broker, servers)) = broker().await else {
        return;
    };
    let topic = unique("out");
    let parent = Envelope::new("order.placed", "{}");
    let sent = Envelope::new("payment.captured", r#"{"amount":42}"#)
        .caused_by(&parent)
        .with_key("order-42")
        .with_content_type("application/json")
        .with_header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .with_header("tracestate", "congo=t61rcWkgMzE")
        .with_header("tenant", "acme");
    broker.publish(&topic, sent.clone()).await.expect("publish");
    let servers2 = servers.clone();
    let topic2 = topic.clone();
    let got = tokio::task::spawn_blocking(move || read_raw(&servers2, &topic2, 1))
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "the raw consumer read the record");
    let record = &got[0];
    assert_eq!(
        record.key(),
        Some(&b"order-42"[..]),
        "record key = envelope key"
    );
    assert_eq!(record.payload(), Some(sent.payload.as_ref()));
    let headers: HashMap<String, String> = record
        .headers()
        .expect("headers")
        .iter()
        .map(|h| {
            (
                h.key.to_owned(),
                String::from_utf8(h.value.unwrap_or_default().to_vec()).unwrap(),
            )
        })
        .collect();
    let h = |name: &str| headers.get(name).map(String::as_str);
    assert_eq!(h("ce_specversion"), Some("1.0"));
    assert_eq!(h("ce_id"), Some(sent.id.as_str()));
    assert_eq!(h("ce_type"), Some("payment.captured"));
    assert!(h("ce_source").is_some_and(|s| !s.is_empty()), "ce_source");
    assert_eq!(
        h("ce_time"),
        Some(bus_core::headers::format_time(sent.timestamp).as_str())
    );
    assert_eq!(h("content-type"), Some("application/json"));
    assert_eq!(h("ce_correlationid"), Some(parent.id.as_str()));
    assert_eq!(h("ce_causationid"), Some(parent.id.as_str()));
    assert_eq!(
        h("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(h("tracestate"), Some("congo=t61rcWkgMzE"));
    assert_eq!(h("tenant"), Some("acme"));
    broker.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_producer_records_arrive_as_envelopes() {
    let Some((broker, servers)) = broker().await else {
        return;
    };
    let topic = unique("in");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(format!("{topic}.g")))
        .await
        .expect("subscribe (creates the topic)");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .create()
        .expect("raw producer");
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "ce_specversion",
            value: Some("1.0"),
        })
        .insert(Header {
            key: "ce_id",
            value: Some("evt-1"),
        })
        .insert(Header {
            key: "ce_type",
            value: Some("com.example.thing"),
        })
        .insert(Header {
            key: "ce_source",
            value: Some("/other/service"),
        })
        .insert(Header {
            key: "ce_time",
            value: Some("2026-11-24T08:00:00.123Z"),
        })
        .insert(Header {
            key: "ce_correlationid",
            value: Some("conv-7"),
        })
        .insert(Header {
            key: "ce_causationid",
            value: Some("evt-0"),
        })
        .insert(Header {
            key: "content-type",
            value: Some("text/plain"),
        })
        .insert(Header {
            key: "traceparent",
            value: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        })
        .insert(Header {
            key: "x-custom",
            value: Some("yes"),
        });
    producer
        .send(
            FutureRecord::to(&topic)
                .key("k-1")
                .payload("hello from rdkafka")
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .expect("raw produce");
    producer
        .send(
            FutureRecord::<str, str>::to(&topic).payload("bare"),
            Duration::from_secs(10),
        )
        .await
        .expect("raw produce without headers");

    let mut seen = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .expect("a delivery in time")
            .expect("open")
            .expect("no error");
        seen.push(d.envelope().clone());
        d.ack().await.unwrap();
    }
    let full = seen
        .iter()
        .find(|e| e.id.as_str() == "evt-1")
        .expect("the CloudEvents record");
    assert_eq!(full.kind, "com.example.thing");
    assert_eq!(full.key.as_deref(), Some("k-1"));
    assert_eq!(full.correlation_id.as_str(), "conv-7");
    assert_eq!(
        full.causation_id.as_ref().map(|c| c.as_str()),
        Some("evt-0")
    );
    assert_eq!(full.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        full.timestamp,
        bus_core::headers::parse_time("2026-11-24T08:00:00.123Z").unwrap()
    );
    assert_eq!(full.header("x-custom"), Some("yes"));
    assert!(full.header("traceparent").is_some());
    assert_eq!(&full.payload[..], b"hello from rdkafka");

    let bare = seen
        .iter()
        .find(|e| &e.payload[..] == b"bare")
        .expect("the bare record");
    let derived = uuid::Uuid::parse_str(bare.id.as_str()).expect("a derived id is a UUID");
    assert_eq!(
        derived.get_version_num(),
        5,
        "a bare record's id is derived from topic, partition and offset: {}",
        bare.id
    );
    assert_eq!(bare.correlation_id, bare.id);
    assert!(bare.key.is_none());
    sub.close().await.unwrap();
    broker.close().await.unwrap();
}

/// Arbitrary envelopes published through `bus` to the real broker and received back: each is
/// either refused by `publish` with a typed error or received unchanged (the unit properties
/// in `src/wire.rs` cover encode and decode alone; this one covers librdkafka and the broker
/// in between: empty keys, empty payloads, odd header names and values).
#[test]
fn property_envelope_round_trip_through_the_broker() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let Some((broker, _)) = runtime.block_on(broker()) else {
        return;
    };
    let topic = unique("property");
    let sub = runtime
        .block_on(broker.subscribe(&topic, SubscribeOptions::group(format!("{topic}.g"))))
        .expect("subscribe");
    // `check` takes an `Fn`: the subscription is borrowed mutably through a lock.
    let sub = tokio::sync::Mutex::new(sub);
    bus_core::conformance::arbitrary::check(
        "kafka envelope round trip through the broker",
        32,
        bus_core::conformance::arbitrary::envelope(),
        |envelope| {
            runtime.block_on(async {
                if let Err(e) = broker.publish(&topic, envelope.clone()).await {
                    proptest::prop_assert_eq!(
                        e.kind(),
                        bus_core::ErrorKind::Serialization,
                        "refused with {}",
                        e
                    );
                    return Ok(());
                }
                let mut sub = sub.lock().await;
                let delivery = tokio::time::timeout(Duration::from_secs(30), sub.next())
                    .await
                    .expect("the envelope back in time")
                    .expect("open")
                    .expect("no error");
                let got = delivery.envelope().clone();
                delivery.ack().await.expect("ack");
                proptest::prop_assert_eq!(got, envelope);
                Ok(())
            })
        },
    );
    runtime.block_on(async {
        sub.into_inner().close().await.expect("close");
        broker.close().await.expect("close");
    });
}
