//! Dead letters on SQS: `reject` to `<queue>.dlq` and back through bus-core's `Redrive`, and
//! the native redrive policy (`max_receive_count`) moving a message there by itself
//! (`BUS_TEST_SQS_URL`).

use std::time::Duration;

use adapter_sqs::{SqsBroker, SqsConfig};
use bus_core::conformance::broker_url;
use bus_core::middleware::dead_letter::Redrive;
use bus_core::{
    headers, Broker, ConsumeOptions, Delivery, Envelope, Queue, Redeliver, Subscription,
};

async fn broker(max_receive_count: Option<u32>) -> Option<SqsBroker> {
    let url = broker_url("BUS_TEST_SQS_URL")?;
    let mut config = SqsConfig::from_url(&url)
        .expect("BUS_TEST_SQS_URL is an sqs:// URL")
        .with_wait_time(Duration::from_secs(1));
    if let Some(count) = max_receive_count {
        config = config.with_max_receive_count(count);
    }
    Some(SqsBroker::connect_with(config).await.expect("connect"))
}

async fn next(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("a delivery in time")
        .expect("open")
        .expect("delivery")
}

#[tokio::test]
async fn rejected_messages_come_back_through_redrive() {
    let Some(broker) = broker(None).await else {
        return;
    };
    let queue = format!("dlq.redrive.{}", uuid::Uuid::now_v7());
    let poison = Envelope::new("poison", "fix me").with_header("x", "kept");
    broker.send(&queue, poison.clone()).await.unwrap();
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .unwrap();
    next(&mut consumer).await.reject("bad input").await.unwrap();

    let report = Redrive::queue(&queue).run(&broker).await.unwrap();
    assert_eq!(report.moved, 1);
    let back = next(&mut consumer).await;
    assert_eq!(back.envelope().id, poison.id);
    assert_eq!(back.envelope().header("x"), Some("kept"));
    assert_eq!(back.envelope().header(headers::DLQ_REASON), None);
    back.ack().await.unwrap();
    consumer.close().await.unwrap();
    broker.close().await.unwrap();
}

#[tokio::test]
async fn native_redrive_policy_moves_after_max_receives() {
    let Some(broker) = broker(Some(2)).await else {
        return;
    };
    assert_eq!(broker.capabilities().dead_letter, bus_core::Support::Native);
    let queue = format!("dlq.native.{}", uuid::Uuid::now_v7());
    let poison = Envelope::new("poison", "never works");
    broker.send(&queue, poison.clone()).await.unwrap();
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .unwrap();
    for attempt in 1..=2 {
        let d = next(&mut consumer).await;
        assert_eq!(d.attempt(), attempt);
        d.nack(Redeliver::Now).await.unwrap();
    }
    // The third receive finds the count exceeded: SQS moves the message instead.
    let mut dead = broker
        .consume(
            &headers::dead_letter_queue(&queue),
            ConsumeOptions::default(),
        )
        .await
        .unwrap();
    let d = next(&mut dead).await;
    assert_eq!(d.envelope().id, poison.id);
    d.ack().await.unwrap();
    dead.close().await.unwrap();
    consumer.close().await.unwrap();
    broker.close().await.unwrap();
}
