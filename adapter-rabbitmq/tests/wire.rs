//! The envelope on the wire, checked with raw lapin on the real broker
//! (`BUS_TEST_RABBITMQ_URL`): what `bus` publishes carries the AMQP properties and the
//! CloudEvents AMQP binding's application properties; what a plain AMQP client publishes is
//! read by `bus` with sensible defaults. Plus the quorum-queue option and the payload limit.

use std::time::Duration;

use adapter_rabbitmq::lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use adapter_rabbitmq::lapin::types::{AMQPValue, FieldTable, ShortString};
use adapter_rabbitmq::lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use adapter_rabbitmq::{RabbitMqBroker, RabbitMqConfig};
use bus_core::conformance::broker_url;
use bus_core::{
    Broker, ConsumeOptions, Envelope, ErrorKind, MessageId, Publisher, Queue, Redeliver,
    SubscribeOptions, Subscriber,
};

fn unique(tag: &str) -> String {
    format!("wire.{tag}.{}", MessageId::new())
}

async fn raw(url: &str) -> (Connection, Channel) {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let connection = Connection::connect(url, props).await.expect("raw connect");
    let channel = connection.create_channel().await.expect("raw channel");
    (connection, channel)
}

fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(name)
}

fn text(value: Option<&AMQPValue>) -> Option<String> {
    match value? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

async fn get_one(channel: &Channel, queue: &str) -> adapter_rabbitmq::lapin::message::Delivery {
    for _ in 0..100 {
        if let Some(message) = channel
            .basic_get(queue, BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            return message.delivery;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing arrived in `{queue}`");
}

#[tokio::test]
async fn bus_publishes_amqp_properties_and_cloudevents_attributes() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let broker = RabbitMqBroker::connect(&url).await.expect("connect");
    let queue = unique("out");
    let parent = Envelope::new("order.placed", "{}");
    let sent = Envelope::new("payment.captured", r#"{"cents":42}"#)
        .caused_by(&parent)
        .with_key("order-42")
        .with_content_type("application/json")
        .with_header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with_header("tracestate", "congo=t61rcWkgMzE")
        .with_header("tenant", "acme");
    broker.send(&queue, sent.clone()).await.expect("send");

    let (connection, channel) = raw(&url).await;
    let got = get_one(&channel, &queue).await;
    let props = &got.properties;
    assert_eq!(got.data, sent.payload.to_vec());
    assert_eq!(
        props.message_id().as_ref().map(ShortString::as_str),
        Some(sent.id.as_str())
    );
    assert_eq!(
        props.correlation_id().as_ref().map(ShortString::as_str),
        Some(parent.id.as_str())
    );
    assert_eq!(
        props.kind().as_ref().map(ShortString::as_str),
        Some("payment.captured")
    );
    assert_eq!(
        props.content_type().as_ref().map(ShortString::as_str),
        Some("application/json")
    );
    assert_eq!(props.delivery_mode(), &Some(2), "persistent");
    let seconds = sent
        .timestamp
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(props.timestamp(), &Some(seconds));
    let ce = |name: &str| text(header(props, &format!("cloudEvents:{name}")));
    assert_eq!(ce("specversion").as_deref(), Some("1.0"));
    assert_eq!(ce("id").as_deref(), Some(sent.id.as_str()));
    assert_eq!(ce("type").as_deref(), Some("payment.captured"));
    // The configured source, `bus` by default, as on every adapter.
    assert_eq!(ce("source").as_deref(), Some("bus"));
    assert_eq!(
        ce("time"),
        Some(bus_core::headers::format_time(sent.timestamp))
    );
    assert_eq!(ce("correlationid").as_deref(), Some(parent.id.as_str()));
    assert_eq!(ce("causationid").as_deref(), Some(parent.id.as_str()));
    assert_eq!(ce("partitionkey").as_deref(), Some("order-42"));
    assert_eq!(
        text(header(props, "traceparent")).as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(
        text(header(props, "tracestate")).as_deref(),
        Some("congo=t61rcWkgMzE")
    );
    assert_eq!(text(header(props, "tenant")).as_deref(), Some("acme"));

    let _ = channel
        .queue_delete(&queue, QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done").await;
    broker.close().await.expect("close");
}

#[tokio::test]
async fn bus_reads_what_a_plain_amqp_client_publishes() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let broker = RabbitMqBroker::connect(&url).await.expect("connect");
    let queue = unique("in");
    let topic = unique("topic");
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let mut subscriber = broker
        .subscribe(&topic, SubscribeOptions::group("raw-readers"))
        .await
        .expect("subscribe");
    let (connection, channel) = raw(&url).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    // 1. A CloudEvent in AMQP binary mode, `cloudEvents_` prefix (the JMS-friendly form),
    // and a non-string header value.
    let mut table = FieldTable::default();
    for (name, value) in [
        ("cloudEvents_specversion", "1.0"),
        ("cloudEvents_id", "ext-1"),
        ("cloudEvents_type", "com.example.thing.made"),
        ("cloudEvents_source", "/other/service"),
        ("cloudEvents_time", "2026-11-24T06:00:00.250Z"),
        ("cloudEvents_correlationid", "conversation-7"),
        ("cloudEvents_partitionkey", "thing-9"),
        ("cloudEvents_myextension", "kept"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ] {
        table.insert(name.into(), AMQPValue::LongString(value.into()));
    }
    table.insert("retries".into(), AMQPValue::LongInt(3));
    let props = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_headers(table);
    channel
        .basic_publish("", &queue, BasicPublishOptions::default(), b"made", props)
        .await
        .unwrap()
        .await
        .unwrap();
    let d = consumer.next().await.expect("open").expect("delivery");
    let e = d.envelope();
    assert_eq!(e.id.as_str(), "ext-1");
    assert_eq!(e.kind, "com.example.thing.made");
    assert_eq!(e.correlation_id.as_str(), "conversation-7");
    assert_eq!(e.causation_id, None);
    assert_eq!(e.key.as_deref(), Some("thing-9"));
    assert_eq!(e.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        e.timestamp,
        bus_core::headers::parse_time("2026-11-24T06:00:00.250Z").unwrap()
    );
    assert_eq!(e.header("cloudEvents:myextension"), Some("kept"));
    assert_eq!(e.header("retries"), Some("3"));
    assert!(e.header("traceparent").is_some());
    assert_eq!(&e.payload[..], b"made");
    assert_eq!(d.attempt(), 1);
    d.ack().await.expect("ack");

    // 2. Native AMQP properties only.
    let props = BasicProperties::default()
        .with_message_id("native-1".into())
        .with_correlation_id("native-conversation".into())
        .with_type("legacy.event".into())
        .with_timestamp(1_764_000_000);
    channel
        .basic_publish("", &queue, BasicPublishOptions::default(), b"x", props)
        .await
        .unwrap()
        .await
        .unwrap();
    let d = consumer.next().await.expect("open").expect("delivery");
    let e = d.envelope();
    assert_eq!(e.id.as_str(), "native-1");
    assert_eq!(e.kind, "legacy.event");
    assert_eq!(e.correlation_id.as_str(), "native-conversation");
    assert_eq!(
        e.timestamp,
        std::time::UNIX_EPOCH + Duration::from_secs(1_764_000_000)
    );
    d.ack().await.expect("ack");

    // 3. Nothing at all, to a topic through the topic exchange: defaults, never a panic.
    channel
        .basic_publish(
            "bus.topics",
            &topic,
            BasicPublishOptions::default(),
            &[0xff, 0x00],
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let d = subscriber.next().await.expect("open").expect("delivery");
    let e = d.envelope();
    assert!(!e.id.as_str().is_empty());
    assert_eq!(e.correlation_id, e.id);
    assert_eq!(e.kind, "");
    assert_eq!(&e.payload[..], &[0xff, 0x00]);
    assert_eq!(d.source(), topic);
    assert_eq!(d.group(), Some("raw-readers"));
    d.ack().await.expect("ack");

    consumer.close().await.unwrap();
    subscriber.close().await.unwrap();
    for q in [queue, format!("{topic}@raw-readers")] {
        let _ = channel
            .queue_delete(&q, QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "done").await;
    broker.close().await.expect("close");
}

#[tokio::test]
async fn quorum_queues_count_attempts_and_delay() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let config = RabbitMqConfig::new(&url).with_quorum_queues(true);
    let broker = RabbitMqBroker::with_config(config).await.expect("connect");
    let queue = unique("quorum");
    broker
        .send(&queue, Envelope::new("q.test", "again"))
        .await
        .expect("send");
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let d = consumer.next().await.expect("open").expect("delivery");
    assert_eq!(d.attempt(), 1);
    d.nack(Redeliver::Now).await.expect("nack");
    let d = consumer.next().await.expect("open").expect("delivery");
    assert_eq!(d.attempt(), 2);
    let started = std::time::Instant::now();
    d.nack(Redeliver::After(Duration::from_millis(300)))
        .await
        .expect("nack after");
    let d = consumer.next().await.expect("open").expect("delivery");
    assert_eq!(d.attempt(), 3);
    assert!(started.elapsed() >= Duration::from_millis(300));
    d.ack().await.expect("ack");
    consumer.close().await.unwrap();

    let (connection, channel) = raw(&url).await;
    let declared = channel
        .queue_declare(
            &queue,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the queue exists");
    assert_eq!(declared.message_count(), 0);
    // It is a quorum queue: redeclaring it as a classic one is refused.
    let mut classic = FieldTable::default();
    classic.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let refused = channel.queue_declare(&queue, durable, classic).await;
    assert!(refused.is_err(), "{queue} is not a quorum queue");
    let channel = connection.create_channel().await.expect("channel");
    for q in [queue.clone(), format!("bus.retry.300ms.{queue}")] {
        let _ = channel
            .queue_delete(&q, QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "done").await;
    broker.close().await.expect("close");
}

#[tokio::test]
async fn payload_over_the_limit_is_refused_before_sending() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let config = RabbitMqConfig::new(&url).with_max_payload(1000);
    let broker = RabbitMqBroker::with_config(config).await.expect("connect");
    assert_eq!(broker.capabilities().max_payload_bytes, Some(1000));
    let err = broker
        .publish(&unique("big"), Envelope::new("big", vec![0u8; 1001]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    broker.close().await.expect("close");
}

/// With the adapter's own check lifted, the broker's refusal of a message over its
/// `max_message_size` (128 MiB by default) comes back as `PayloadTooLarge`, and the connection
/// keeps working.
#[tokio::test]
async fn broker_refusal_of_an_oversize_message_is_payload_too_large() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let config = RabbitMqConfig::new(&url).with_max_payload(usize::MAX);
    let broker = RabbitMqBroker::with_config(config).await.expect("connect");
    let queue = unique("huge");
    let huge = Envelope::new("huge", vec![b'x'; 128 * 1024 * 1024 + 1]);
    let err = broker.send(&queue, huge).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
    assert!(err
        .source_ref()
        .and_then(|s| s.downcast_ref::<adapter_rabbitmq::lapin::Error>())
        .is_some());
    let small = Envelope::new("small", "still works");
    broker
        .send(&queue, small.clone())
        .await
        .expect("send after the refusal");
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let d = consumer.next().await.expect("open").expect("delivery");
    assert_eq!(d.envelope().id, small.id);
    d.ack().await.expect("ack");
    consumer.close().await.unwrap();
    let (connection, channel) = raw(&url).await;
    let _ = channel
        .queue_delete(&queue, QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done").await;
    broker.close().await.expect("close");
}

/// A private subscription's queue is exclusive and named by the server (`amq.gen-…`): nack,
/// delayed nack, drop and reject work there too.
#[tokio::test]
async fn private_subscription_settles_every_way() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let broker = RabbitMqBroker::connect(&url).await.expect("connect");
    let topic = unique("private");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .expect("subscribe");
    let sent = Envelope::new("p.test", "settle me");
    broker.publish(&topic, sent.clone()).await.expect("publish");
    let d = sub.next().await.expect("open").expect("delivery");
    assert_eq!((d.envelope().id.clone(), d.attempt()), (sent.id.clone(), 1));
    d.nack(Redeliver::Now).await.expect("nack now");
    let d = sub.next().await.expect("open").expect("delivery");
    assert_eq!(d.attempt(), 2);
    d.nack(Redeliver::After(Duration::from_millis(200)))
        .await
        .expect("nack after");
    let d = sub.next().await.expect("open").expect("delivery");
    assert_eq!(d.attempt(), 3);
    drop(d);
    let d = sub.next().await.expect("open").expect("delivery");
    assert_eq!(d.attempt(), 4);
    d.reject("private poison").await.expect("reject");
    let dlq = bus_core::headers::dead_letter_queue(&topic);
    let mut dead = broker
        .consume(&dlq, ConsumeOptions::default())
        .await
        .expect("consume the DLQ");
    let d = dead.next().await.expect("open").expect("dead letter");
    assert_eq!(d.envelope().id, sent.id);
    assert_eq!(
        d.envelope().header(bus_core::headers::DLQ_REASON),
        Some("private poison")
    );
    assert_eq!(
        d.envelope().header(bus_core::headers::DLQ_ATTEMPTS),
        Some("4")
    );
    d.ack().await.expect("ack");
    dead.close().await.unwrap();
    sub.close().await.unwrap();
    let (connection, channel) = raw(&url).await;
    let _ = channel
        .queue_delete(&dlq, QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done").await;
    broker.close().await.expect("close");
}

/// Headers must fit in one AMQP frame (`frame_max`, 128 KiB by default): larger ones fail with
/// `HeadersTooLarge` before anything is sent, and the connection keeps working.
#[tokio::test]
async fn headers_larger_than_a_frame_are_refused() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let broker = RabbitMqBroker::connect(&url).await.expect("connect");
    let queue = unique("bighdr");
    let big = Envelope::new("big", "x").with_header("x-big", "h".repeat(200 * 1024));
    let err = broker.send(&queue, big).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::HeadersTooLarge, "{err}");
    let err = broker
        .publish(
            &queue,
            Envelope::new("big", "x").with_header("x-big", "h".repeat(200 * 1024)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::HeadersTooLarge, "{err}");
    let small = Envelope::new("small", "x").with_header("x-ok", "h".repeat(1024));
    broker
        .send(&queue, small.clone())
        .await
        .expect("send after the refusal");
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let d = consumer.next().await.expect("open").expect("delivery");
    assert_eq!(d.envelope().id, small.id);
    d.ack().await.expect("ack");
    consumer.close().await.unwrap();
    let (connection, channel) = raw(&url).await;
    let _ = channel
        .queue_delete(&queue, QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done").await;
    broker.close().await.expect("close");
}

/// The number of messages in `queue`, from a passive declaration.
async fn depth(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare")
        .message_count()
}

#[tokio::test]
async fn nack_with_the_longest_delay_parks_the_message() {
    // Before: x-message-ttl of i64::MAX ms, refused by RabbitMQ (PRECONDITION_FAILED): the nack
    // failed and the message came back at once.
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let broker = RabbitMqBroker::connect(&url).await.expect("connect");
    let queue = unique("forever");
    let mut sub = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let parked = Envelope::new("wire.parked", "later");
    broker.send(&queue, parked.clone()).await.expect("send");
    let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("delivered")
        .expect("open")
        .expect("delivery");
    delivery
        .nack(Redeliver::After(Duration::MAX))
        .await
        .map_err(|e| e.to_string())
        .expect("nack with Duration::MAX");
    // RabbitMQ's longest TTL, less the ten minutes the retry queue outlives it.
    let retry = format!("bus.retry.{}ms.{queue}", 4_294_967_295u64 - 600_000);
    let (connection, channel) = raw(&url).await;
    assert_eq!(depth(&channel, &retry).await, 1, "parked in `{retry}`");
    assert_eq!(depth(&channel, &queue).await, 0, "not back in the queue");
    // The consumer's channel is still usable.
    let next = Envelope::new("wire.after", "next");
    broker.send(&queue, next.clone()).await.expect("send");
    let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("delivered")
        .expect("open")
        .expect("delivery");
    assert_eq!(delivery.envelope().id, next.id);
    delivery
        .ack()
        .await
        .map_err(|e| e.to_string())
        .expect("ack");
    sub.close().await.expect("close");
    for q in [&retry, &queue] {
        let _ = channel.queue_delete(q, QueueDeleteOptions::default()).await;
    }
    let _ = connection.close(200, "done").await;
    broker.close().await.expect("close");
}

#[tokio::test]
async fn a_source_whose_dead_letter_queue_cannot_be_named_is_refused() {
    // Before: consuming worked, and every dead letter failed (`<name>.dlq` over 255 bytes).
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let broker = RabbitMqBroker::connect(&url).await.expect("connect");
    let name = format!("{}.{}", unique("n"), "x".repeat(250));
    let name = &name[..252];
    let err = broker
        .consume(name, ConsumeOptions::default())
        .await
        .expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let err = broker
        .subscribe(name, SubscribeOptions::group("g"))
        .await
        .expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    broker.close().await.expect("close");
}

/// Properties another client could send that `bus` cannot read (an unknown CloudEvents
/// version), answering or asking `causation`.
fn undecodable(causation: Option<&MessageId>) -> BasicProperties {
    let mut table = FieldTable::default();
    table.insert(
        "cloudEvents:specversion".into(),
        AMQPValue::LongString("9.9".into()),
    );
    if let Some(causation) = causation {
        table.insert(
            "cloudEvents:causationid".into(),
            AMQPValue::LongString(causation.as_str().into()),
        );
    }
    BasicProperties::default().with_headers(table)
}

#[tokio::test]
async fn undecodable_requests_and_replies_are_not_served() {
    use adapter_rabbitmq::lapin::options::{
        BasicAckOptions, BasicConsumeOptions, QueueBindOptions,
    };
    use bus_core::{Requester, Responder, ServeOptions};
    use futures::StreamExt;
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let broker = RabbitMqBroker::connect(&url).await.expect("connect");
    let (connection, channel) = raw(&url).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");

    // Requests: an undecodable one is skipped, the good one after it is served.
    let topic = unique("rpc");
    let mut requests = broker
        .serve(&topic, ServeOptions::default())
        .await
        .expect("serve");
    channel
        .basic_publish(
            "bus.requests",
            &topic,
            BasicPublishOptions::default(),
            b"bad",
            undecodable(None).with_reply_to("nowhere".into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let requester = broker.clone();
    let good = Envelope::new("wire.ask", "good");
    let asking = {
        let (topic, good) = (topic.clone(), good.clone());
        tokio::spawn(async move {
            requester
                .request(&topic, good, Duration::from_secs(10))
                .await
        })
    };
    let request = tokio::time::timeout(Duration::from_secs(10), requests.next())
        .await
        .expect("a request")
        .expect("open")
        .expect("request");
    // Before: the undecodable request was handed out first.
    assert_eq!(request.envelope().id, good.id);
    request
        .reply(Envelope::new("wire.answer", "ok"))
        .await
        .expect("reply");
    asking.await.expect("task").expect("the reply");
    requests.close().await.expect("close");

    // Replies: an undecodable one is dropped; the good one after it is the reply.
    let topic = unique("rpc-raw");
    let responder_queue = unique("raw-responder");
    channel
        .queue_declare(
            &responder_queue,
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    channel
        .queue_bind(
            &responder_queue,
            "bus.requests",
            &topic,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let mut raw_requests = channel
        .basic_consume(
            &responder_queue,
            "raw-responder",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let requester = broker.clone();
    let asked = Envelope::new("wire.ask", "raw");
    let asking = {
        let (topic, asked) = (topic.clone(), asked.clone());
        tokio::spawn(async move {
            requester
                .request(&topic, asked, Duration::from_secs(10))
                .await
        })
    };
    let raw_request = raw_requests
        .next()
        .await
        .expect("a raw request")
        .expect("delivery");
    raw_request
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    let reply_to = raw_request
        .properties
        .reply_to()
        .clone()
        .expect("reply-to")
        .as_str()
        .to_owned();
    let good_reply = {
        let mut table = FieldTable::default();
        table.insert(
            "cloudEvents:causationid".into(),
            AMQPValue::LongString(asked.id.as_str().into()),
        );
        BasicProperties::default()
            .with_message_id("good-reply".into())
            .with_headers(table)
    };
    for (props, body) in [
        (undecodable(Some(&asked.id)), &b"bad"[..]),
        (good_reply, &b"good"[..]),
    ] {
        channel
            .basic_publish("", &reply_to, BasicPublishOptions::default(), body, props)
            .await
            .expect("publish the reply")
            .await
            .expect("confirm");
    }
    let reply = asking.await.expect("task").expect("a reply");
    // Before: the undecodable reply was taken as the answer.
    assert_eq!(reply.id.as_str(), "good-reply");
    assert_eq!(&reply.payload[..], b"good");
    let _ = channel
        .queue_delete(&responder_queue, QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done").await;
    broker.close().await.expect("close");
}
