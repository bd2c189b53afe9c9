//! What `bus` puts on the wire, read with the plain `aws-sdk-sqs` client, and what a plain
//! client sends, read through `bus` (`BUS_TEST_SQS_URL`, e.g. moto on
//! `sqs://127.0.0.1:4566?region=us-east-1`).

use std::collections::HashMap;
use std::time::Duration;

use adapter_sqs::aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName};
use adapter_sqs::{attributes, SqsBroker, SqsConfig};
use bus_core::conformance::broker_url;
use bus_core::{
    Broker, ConsumeOptions, Envelope, ErrorKind, Publisher, Queue, SubscribeOptions, Subscriber,
};

async fn broker(fifo: bool) -> Option<SqsBroker> {
    let url = broker_url("BUS_TEST_SQS_URL")?;
    let config = SqsConfig::from_url(&url)
        .expect("BUS_TEST_SQS_URL is an sqs:// URL")
        .with_wait_time(Duration::from_secs(1))
        .with_fifo(fifo);
    Some(SqsBroker::connect_with(config).await.expect("connect"))
}

fn unique(tag: &str) -> String {
    format!("wire.{tag}.{}", uuid::Uuid::now_v7())
}

async fn queue_url(broker: &SqsBroker, name: &str) -> String {
    broker
        .sqs_client()
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .expect("queue exists")
        .queue_url()
        .expect("url")
        .to_owned()
}

async fn receive_raw(broker: &SqsBroker, url: &str) -> Message {
    for _ in 0..20 {
        let out = broker
            .sqs_client()
            .receive_message()
            .queue_url(url)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .expect("receive");
        if let Some(message) = out.messages().first() {
            return message.clone();
        }
    }
    panic!("nothing arrived in {url}");
}

fn string_attributes(message: &Message) -> HashMap<String, String> {
    message
        .message_attributes()
        .expect("attributes")
        .iter()
        .map(|(name, value)| {
            (
                name.clone(),
                value.string_value().expect("string attribute").to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn bus_send_reads_as_cloudevents_attributes() {
    let Some(broker) = broker(false).await else {
        return;
    };
    let queue = unique("out");
    let mut envelope = Envelope::new("order.placed", r#"{"order":42}"#)
        .with_key("order-42")
        .with_content_type("application/json")
        .with_header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with_header("tenant", "acme");
    envelope.causation_id = Some("cause-1".into());
    broker.send(&queue, envelope.clone()).await.expect("send");
    let url = queue_url(&broker, &broker.queue_name(&queue)).await;
    let message = receive_raw(&broker, &url).await;
    assert_eq!(message.body(), Some(r#"{"order":42}"#));
    let attrs = string_attributes(&message);
    assert_eq!(attrs[attributes::CE_SPECVERSION], "1.0");
    assert_eq!(attrs[attributes::CE_ID], envelope.id.as_str());
    assert_eq!(attrs[attributes::CE_TYPE], "order.placed");
    assert_eq!(attrs[attributes::CE_SOURCE], "bus");
    assert!(bus_core::headers::parse_time(&attrs[attributes::CE_TIME]).is_ok());
    assert_eq!(
        attrs[attributes::CORRELATION_ID],
        envelope.correlation_id.as_str()
    );
    assert_eq!(attrs[attributes::CAUSATION_ID], "cause-1");
    assert_eq!(attrs[attributes::PARTITION_KEY], "order-42");
    assert_eq!(
        attrs["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    // Six required attributes, then trace context, causation id and key fill SQS's ten with
    // the packed rest.
    assert_eq!(attrs.len(), 10, "{attrs:?}");
    let packed: HashMap<String, String> =
        serde_json::from_str(&attrs[attributes::PACKED]).expect("packed JSON");
    assert_eq!(packed[attributes::CONTENT_TYPE], "application/json");
    assert_eq!(packed["tenant"], "acme");
    broker.close().await.unwrap();
}

#[tokio::test]
async fn many_headers_and_binary_payloads_fit_in_ten_attributes() {
    let Some(broker) = broker(false).await else {
        return;
    };
    let queue = unique("packed");
    let mut envelope = Envelope::new("bin", vec![0u8, 0xff, 0x10, 0x80]);
    for i in 0..25 {
        envelope.headers.insert(format!("h{i:02}"), format!("v{i}"));
    }
    broker.send(&queue, envelope.clone()).await.expect("send");
    let url = queue_url(&broker, &broker.queue_name(&queue)).await;
    let message = receive_raw(&broker, &url).await;
    let attrs = string_attributes(&message);
    assert_eq!(attrs.len(), 10, "{attrs:?}");
    assert_eq!(attrs[attributes::BODY_ENCODING], "base64");
    assert_eq!(message.body(), Some("AP8QgA=="));
    let packed: HashMap<String, String> =
        serde_json::from_str(&attrs[attributes::PACKED]).expect("packed JSON");
    let individual = attrs.keys().filter(|k| k.starts_with('h')).count();
    assert_eq!(individual + packed.len(), 25);
    // And back through bus, intact.
    broker
        .sqs_client()
        .change_message_visibility()
        .queue_url(&url)
        .receipt_handle(message.receipt_handle().unwrap())
        .visibility_timeout(0)
        .send()
        .await
        .unwrap();
    let mut sub = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("delivery");
    assert_eq!(d.envelope().payload, envelope.payload);
    assert_eq!(d.envelope().headers, envelope.headers);
    d.ack().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test]
async fn plain_client_messages_read_through_bus() {
    let Some(broker) = broker(false).await else {
        return;
    };
    let queue = unique("in");
    let mut sub = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .unwrap();
    let url = queue_url(&broker, &broker.queue_name(&queue)).await;
    let attr = |v: &str| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .unwrap()
    };
    broker
        .sqs_client()
        .send_message()
        .queue_url(&url)
        .message_body("hello from elsewhere")
        .message_attributes("ce-specversion", attr("1.0"))
        .message_attributes("ce-id", attr("evt-1"))
        .message_attributes("ce-type", attr("com.example.greeting"))
        .message_attributes("ce-source", attr("/elsewhere"))
        .message_attributes("ce-time", attr("2026-11-24T10:00:00.000Z"))
        .message_attributes("partitionkey", attr("k1"))
        .message_attributes("region", attr("eu"))
        .send()
        .await
        .unwrap();
    broker
        .sqs_client()
        .send_message()
        .queue_url(&url)
        .message_body("bare")
        .send()
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("delivery");
        got.push(d.envelope().clone());
        d.ack().await.unwrap();
    }
    got.sort_by_key(|e| e.payload.len());
    let (bare, event) = (&got[0], &got[1]);
    assert_eq!(event.id.as_str(), "evt-1");
    assert_eq!(event.correlation_id.as_str(), "evt-1");
    assert_eq!(event.kind, "com.example.greeting");
    assert_eq!(event.key.as_deref(), Some("k1"));
    assert_eq!(event.header("region"), Some("eu"));
    assert_eq!(
        bus_core::headers::format_time(event.timestamp),
        "2026-11-24T10:00:00.000Z"
    );
    assert_eq!(event.payload.as_ref(), b"hello from elsewhere");
    assert_eq!(bare.payload.as_ref(), b"bare");
    assert!(!bare.id.as_str().is_empty(), "the SQS message id stands in");
    assert!(bare.headers.is_empty());
    broker.close().await.unwrap();
}

#[tokio::test]
async fn topic_groups_are_queues_with_raw_delivery() {
    let Some(broker) = broker(false).await else {
        return;
    };
    let topic = unique("topic");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("billing"))
        .await
        .unwrap();
    let envelope = Envelope::new("order.placed", "raw").with_header("tenant", "acme");
    broker.publish(&topic, envelope.clone()).await.unwrap();
    // Read the group's queue directly: SNS delivered the body and attributes as they are.
    let url = queue_url(&broker, &broker.group_queue_name(&topic, "billing")).await;
    let message = receive_raw(&broker, &url).await;
    assert_eq!(message.body(), Some("raw"));
    let attrs = string_attributes(&message);
    assert_eq!(attrs[attributes::CE_ID], envelope.id.as_str());
    assert_eq!(attrs["tenant"], "acme");
    broker
        .sqs_client()
        .delete_message()
        .queue_url(&url)
        .receipt_handle(message.receipt_handle().unwrap())
        .send()
        .await
        .unwrap();
    sub.close().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test]
async fn fifo_queues_group_by_key_and_deduplicate_by_id() {
    let Some(broker) = broker(true).await else {
        return;
    };
    let queue = unique("fifo");
    let envelope = Envelope::new("ordered", "first").with_key("customer-7");
    broker.send(&queue, envelope.clone()).await.unwrap();
    // The same envelope again (a retried send): SQS drops the duplicate.
    broker.send(&queue, envelope.clone()).await.unwrap();
    let name = broker.queue_name(&queue);
    assert!(name.ends_with(".fifo"), "{name}");
    let url = queue_url(&broker, &name).await;
    let message = receive_raw(&broker, &url).await;
    let system = message.attributes().expect("system attributes");
    assert_eq!(
        system[&MessageSystemAttributeName::MessageGroupId],
        "customer-7"
    );
    assert_eq!(
        system[&MessageSystemAttributeName::MessageDeduplicationId],
        envelope.id.as_str()
    );
    broker
        .sqs_client()
        .delete_message()
        .queue_url(&url)
        .receipt_handle(message.receipt_handle().unwrap())
        .send()
        .await
        .unwrap();
    let again = broker
        .sqs_client()
        .receive_message()
        .queue_url(&url)
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    assert!(again.messages().is_empty(), "the duplicate was delivered");
    assert!(broker.capabilities().per_key_order_across_members);
    broker.close().await.unwrap();
}

#[tokio::test]
async fn oversize_counts_attributes_and_keeps_the_sdk_error_typed() {
    let Some(broker) = broker(false).await else {
        return;
    };
    let queue = unique("big");
    // The body alone fits; with the attributes it does not.
    let err = broker
        .send(&queue, Envelope::new("big", vec![b'x'; 262_100]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    // A server-side refusal keeps the SDK's error as the source.
    let err = adapter_sqs::SqsBroker::connect_with(
        SqsConfig::default()
            .with_endpoint("http://127.0.0.1:1")
            .with_region("us-east-1")
            .with_credentials("test", "test"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.source_ref().is_some());
    broker.close().await.unwrap();
}

#[tokio::test]
async fn a_missing_queue_is_not_found_with_the_sdk_error_as_source() {
    use adapter_sqs::aws_sdk_sqs::config::http::HttpResponse;
    use adapter_sqs::aws_sdk_sqs::error::SdkError;
    use adapter_sqs::aws_sdk_sqs::operation::delete_message_batch::DeleteMessageBatchError;

    let Some(broker) = broker(false).await else {
        return;
    };
    let queue = unique("gone");
    broker.send(&queue, Envelope::new("k", "v")).await.unwrap();
    let mut sub = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("delivery");
    sub.close().await.unwrap();
    let url = queue_url(&broker, &broker.queue_name(&queue)).await;
    broker
        .sqs_client()
        .delete_queue()
        .queue_url(&url)
        .send()
        .await
        .unwrap();
    let err = d.ack().await.unwrap_err().into_parts().0;
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(
        err.source_ref()
            .unwrap()
            .is::<SdkError<DeleteMessageBatchError, HttpResponse>>(),
        "{err:?}"
    );
    broker.close().await.unwrap();
}
