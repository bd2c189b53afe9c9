//! Leases of deliveries waiting in a subscription's pull buffer (issue 11): the runtime keeps
//! every delivery's ack wait alive from its receipt until it is settled, so a slow consumer's
//! buffered messages are not redelivered while they wait, which would deliver them twice with
//! inflated attempts (`BUS_TEST_NATS_URL`).

use std::collections::HashMap;
use std::time::Duration;

use adapter_nats::{NatsBroker, NatsConfig};
use bus_core::conformance::broker_url;
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo};
use bus_core::{ConsumeOptions, Envelope, MessageId, Queue};
use tokio::sync::mpsc;

/// The ack wait: the lease every delivery holds.
const LEASE: Duration = Duration::from_secs(2);
const MESSAGES: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_deliveries_of_a_slow_consumer_are_not_redelivered() {
    let Some(url) = broker_url("BUS_TEST_NATS_URL") else {
        return;
    };
    let config = NatsConfig::from_url(&url)
        .expect("BUS_TEST_NATS_URL is a nats:// URL")
        .with_ack_wait(LEASE);
    let broker = NatsBroker::connect_with(config).await.expect("connect");
    let queue = format!("leases.{}", MessageId::new());
    let sent: Vec<MessageId> = {
        let mut ids = Vec::new();
        for i in 0..MESSAGES {
            let envelope = Envelope::new("leases", format!("message {i}"));
            ids.push(envelope.id.clone());
            broker.send(&queue, envelope).await.expect("send");
        }
        ids
    };
    // A buffer of four, so that deliveries wait in it while one handler runs and one waits in
    // the consumer.
    let subscription = broker
        .consume(&queue, ConsumeOptions::default().with_prefetch(4))
        .await
        .expect("consume");

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
    let report = consumer.stop().await.expect("the consumer stops");
    while let Ok((id, attempt)) = handled_rx.try_recv() {
        attempts.entry(id).or_default().push(attempt);
    }
    // The server's own count: every delivery it made, redeliveries included (a redelivered
    // copy still waiting in a buffer when the consumer stopped is counted too).
    let stream = broker.queue_stream(&queue);
    let mut workers: async_nats::jetstream::consumer::PullConsumer = broker
        .jetstream()
        .get_stream(&stream)
        .await
        .expect("the queue's stream")
        .get_consumer("workers")
        .await
        .expect("the queue's consumer");
    let info = workers.info().await.expect("consumer info");
    let deliveries = info.delivered.consumer_sequence;
    let left = info.num_pending + info.num_ack_pending as u64;
    let _ = broker.jetstream().delete_stream(&stream).await;
    let twice: Vec<_> = attempts.iter().filter(|(_, a)| a.len() > 1).collect();
    let later: Vec<_> = attempts
        .iter()
        .filter(|(_, a)| a.iter().any(|&n| n != 1))
        .collect();
    println!(
        "nats leases: messages={MESSAGES} server deliveries={deliveries} handled={} twice={} \
         attempts>1={} left={left} acked={}",
        attempts.values().map(Vec::len).sum::<usize>(),
        twice.len(),
        later.len(),
        report.acked,
    );
    assert!(sent.iter().all(|id| attempts.contains_key(id)));
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    assert!(later.is_empty(), "attempts above 1: {later:?}");
    assert_eq!(
        deliveries, MESSAGES as u64,
        "the server delivered {deliveries} times for {MESSAGES} messages"
    );
    assert_eq!(left, 0, "messages left unacknowledged");
}
