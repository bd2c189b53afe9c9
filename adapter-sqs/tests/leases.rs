//! Leases of deliveries waiting in a subscription's prefetch buffer (issue 11): the runtime
//! keeps every delivery's visibility alive from its receive until it is settled, so a slow
//! consumer's buffered messages do not come back to the queue while they wait and arrive
//! twice with inflated attempts (`BUS_TEST_SQS_URL`).

use std::collections::HashMap;
use std::time::Duration;

use adapter_sqs::aws_sdk_sqs::types::QueueAttributeName;
use adapter_sqs::{SqsBroker, SqsConfig};
use bus_core::conformance::broker_url;
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo};
use bus_core::{ConsumeOptions, Envelope, MessageId, Queue};
use tokio::sync::mpsc;

/// The visibility timeout: the lease every delivery holds.
const LEASE: Duration = Duration::from_secs(2);
const MESSAGES: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_deliveries_of_a_slow_consumer_are_not_redelivered() {
    let Some(url) = broker_url("BUS_TEST_SQS_URL") else {
        return;
    };
    let config = SqsConfig::from_url(&url)
        .expect("BUS_TEST_SQS_URL is an sqs:// URL")
        .with_wait_time(Duration::from_secs(1))
        .with_visibility_timeout(LEASE);
    let broker = SqsBroker::connect_with(config).await.expect("connect");
    let queue = format!("leases.{}", uuid::Uuid::now_v7());
    // Created (by consume) before the sends; a buffer of four, so that three deliveries wait
    // in it while one handler runs and one waits in the consumer.
    let subscription = broker
        .consume(&queue, ConsumeOptions::default().with_prefetch(4))
        .await
        .expect("consume");
    let sent: Vec<MessageId> = {
        let mut ids = Vec::new();
        for i in 0..MESSAGES {
            let envelope = Envelope::new("leases", format!("message {i}"));
            ids.push(envelope.id.clone());
            broker.send(&queue, envelope).await.expect("send");
        }
        ids
    };

    // One at a time, each handled for about a lease.
    let (handled, mut handled_rx) = mpsc::unbounded_channel::<(MessageId, u32)>();
    let handler = handler_fn(move |envelope: Envelope, info: DeliveryInfo| {
        let handled = handled.clone();
        async move {
            tokio::time::sleep(LEASE + Duration::from_millis(200)).await;
            let _ = handled.send((envelope.id, info.attempt()));
        }
    });
    let consumer = Consumer::new(subscription, handler)
        .with_concurrency(1)
        .with_max_pending(1)
        .spawn();

    let mut attempts: HashMap<MessageId, Vec<u32>> = HashMap::new();
    let all_handled = async {
        while attempts.len() < MESSAGES {
            let (id, attempt) = handled_rx.recv().await.expect("the handler runs");
            attempts.entry(id).or_default().push(attempt);
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all_handled)
        .await
        .expect("every message handled within 120 s");
    // A redelivered copy would still be on its way: the queue must be empty, nothing in flight.
    let report = consumer.stop().await.expect("the consumer stops");
    while let Ok((id, attempt)) = handled_rx.try_recv() {
        attempts.entry(id).or_default().push(attempt);
    }
    let left = in_queue(&broker, &queue).await;

    let twice: Vec<_> = attempts.iter().filter(|(_, a)| a.len() > 1).collect();
    let later: Vec<_> = attempts
        .iter()
        .filter(|(_, a)| a.iter().any(|&n| n != 1))
        .collect();
    println!(
        "sqs leases: messages={MESSAGES} handled={} twice={} attempts>1={} left={left} acked={}",
        attempts.values().map(Vec::len).sum::<usize>(),
        twice.len(),
        later.len(),
        report.acked,
    );
    assert!(sent.iter().all(|id| attempts.contains_key(id)));
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    assert!(later.is_empty(), "attempts above 1: {later:?}");
    assert_eq!(left, 0, "messages left in the queue (visible or in flight)");
}

/// Visible and in-flight messages of `queue`, as SQS counts them.
async fn in_queue(broker: &SqsBroker, queue: &str) -> u64 {
    let sqs = broker.sqs_client();
    let url = sqs
        .get_queue_url()
        .queue_name(broker.queue_name(queue))
        .send()
        .await
        .expect("the queue exists")
        .queue_url()
        .expect("a URL")
        .to_owned();
    let out = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("queue attributes");
    let count = |name| {
        out.attributes()
            .and_then(|a| a.get(&name))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let total = count(QueueAttributeName::ApproximateNumberOfMessages)
        + count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible);
    let _ = sqs.delete_queue().queue_url(url).send().await;
    total
}
