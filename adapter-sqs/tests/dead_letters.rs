//! Dead letters on SQS: `reject` to `<queue>.dlq` and back through bus-core's `Redrive`, and
//! the native redrive policy (`max_receive_count`) moving a message there by itself
//! (`BUS_TEST_SQS_URL`). On FIFO queues, dead letters and redriven messages get
//! deduplication ids of their own, so SQS does not drop them as copies of the original.

use std::time::Duration;

use adapter_sqs::{SqsBroker, SqsConfig};
use bus_core::conformance::broker_url;
use bus_core::middleware::dead_letter::Redrive;
use bus_core::{
    headers, Broker, ConsumeOptions, Delivery, Envelope, Publisher, Queue, Redeliver,
    SubscribeOptions, Subscriber, Subscription,
};

async fn broker(max_receive_count: Option<u32>) -> Option<SqsBroker> {
    connect(max_receive_count, false).await
}

/// FIFO queues and topics with the default deduplication by envelope id. No long polling:
/// moto can hand one message group to two receives that overlap (see docs/adapters/sqs.md).
async fn fifo_broker() -> Option<SqsBroker> {
    connect(None, true).await
}

async fn connect(max_receive_count: Option<u32>, fifo: bool) -> Option<SqsBroker> {
    let url = broker_url("BUS_TEST_SQS_URL")?;
    let mut config = SqsConfig::from_url(&url)
        .expect("BUS_TEST_SQS_URL is an sqs:// URL")
        .with_wait_time(Duration::from_secs(if fifo { 0 } else { 1 }))
        .with_fifo(fifo);
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

    // moto under load can take over a second to answer the first receive.
    let report = Redrive::queue(&queue)
        .with_idle_timeout(Duration::from_secs(5))
        .run(&broker)
        .await
        .unwrap();
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

/// Issue 11: a second dead letter of one message within SQS's 5-minute deduplication window
/// was dropped, because its deduplication id was the envelope id, and the original deleted:
/// here two groups of one FIFO topic both reject the same message, and both dead letters must
/// be in `<topic>.dlq` (moto drops a copy while the first is still in the queue, as SQS does
/// for 5 minutes).
#[tokio::test]
async fn fifo_dead_letters_of_one_message_from_two_groups_are_both_kept() {
    let Some(broker) = fifo_broker().await else {
        return;
    };
    let topic = format!("dlq.fifo.groups.{}", uuid::Uuid::now_v7());
    let mut a = broker
        .subscribe(&topic, SubscribeOptions::group("a"))
        .await
        .unwrap();
    let mut b = broker
        .subscribe(&topic, SubscribeOptions::group("b"))
        .await
        .unwrap();
    let poison = Envelope::new("poison", "fails everywhere").with_key("k");
    broker.publish(&topic, poison.clone()).await.unwrap();
    next(&mut a).await.reject("a cannot").await.unwrap();
    next(&mut b).await.reject("b cannot").await.unwrap();

    let mut dead = broker
        .consume(
            &headers::dead_letter_queue(&topic),
            ConsumeOptions::default(),
        )
        .await
        .unwrap();
    let mut groups = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(10), dead.next())
            .await
            .unwrap_or_else(|_| {
                panic!("dead letters in `{topic}.dlq`: only those of {groups:?}, one was dropped")
            })
            .expect("open")
            .expect("delivery");
        assert_eq!(d.envelope().id, poison.id);
        groups.push(d.envelope().header(headers::DLQ_GROUP).unwrap().to_owned());
        d.ack().await.unwrap();
    }
    groups.sort();
    assert_eq!(groups, ["a", "b"]);
    for mut s in [a, b, dead] {
        s.close().await.unwrap();
    }
    broker.close().await.unwrap();
}

/// Issue 11: a redrive within 5 minutes of the original send went out with the original's
/// deduplication id (the envelope id), and SQS, which remembers the ids of deleted messages for
/// 5 minutes, dropped it: the message was in neither queue. moto only compares with messages
/// still in the queue, so the test makes the comparison visible: while the redriven copy is in
/// the queue, a plain client sends a probe with the original's deduplication id, which moto
/// keeps only if the redriven copy carries another one.
#[tokio::test]
async fn fifo_redrive_does_not_reuse_the_original_deduplication_id() {
    let Some(broker) = fifo_broker().await else {
        return;
    };
    let queue = format!("dlq.fifo.redrive.{}", uuid::Uuid::now_v7());
    let poison = Envelope::new("poison", "fix me").with_key("k");
    broker.send(&queue, poison.clone()).await.unwrap();
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .unwrap();
    next(&mut consumer).await.reject("bad input").await.unwrap();
    // moto under load can take over a second to answer the first receive.
    let report = Redrive::queue(&queue)
        .with_idle_timeout(Duration::from_secs(5))
        .run(&broker)
        .await
        .unwrap();
    assert_eq!(report.moved, 1);
    let back = next(&mut consumer).await;
    assert_eq!(back.envelope().id, poison.id);
    assert_eq!(back.envelope().header(headers::DLQ_REASON), None);

    // The redriven copy is in flight; the original is deleted.
    let url = broker
        .sqs_client()
        .get_queue_url()
        .queue_name(broker.queue_name(&queue))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    broker
        .sqs_client()
        .send_message()
        .queue_url(&url)
        .message_body("probe")
        .message_group_id("probe")
        .message_deduplication_id(poison.id.as_str())
        .send()
        .await
        .unwrap();
    back.ack().await.unwrap();
    let probe = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect(
            "the probe with the original's deduplication id was dropped: the redriven copy \
             carried that id, which SQS would have dropped within 5 minutes",
        )
        .expect("open")
        .expect("delivery");
    assert_eq!(probe.envelope().payload.as_ref(), b"probe");
    probe.ack().await.unwrap();

    consumer.close().await.unwrap();
    broker.close().await.unwrap();
}
