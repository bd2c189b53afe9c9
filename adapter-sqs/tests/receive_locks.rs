//! FIFO receive locks (one per queue a connection reads, so that receives from one FIFO queue
//! go one at a time) are dropped when the last subscription reading the queue ends, so a
//! process that reads many FIFO queues over time does not keep one for each for ever
//! (`BUS_TEST_SQS_URL`).

use std::time::Duration;

use adapter_sqs::{SqsBroker, SqsConfig};
use bus_core::conformance::broker_url;
use bus_core::{ConsumeOptions, Queue};
use tokio::time::Instant;

#[tokio::test]
async fn fifo_receive_locks_end_with_their_subscriptions() {
    const QUEUES: usize = 5;
    let Some(url) = broker_url("BUS_TEST_SQS_URL") else {
        return;
    };
    let config = SqsConfig::from_url(&url)
        .expect("BUS_TEST_SQS_URL is an sqs:// URL")
        .with_wait_time(Duration::ZERO)
        .with_fifo(true);
    let broker = SqsBroker::connect_with(config).await.expect("connect");
    let mut open = Vec::new();
    for i in 0..QUEUES {
        let queue = format!("locks.{i}.{}", uuid::Uuid::now_v7());
        let subscription = broker
            .consume(&queue, ConsumeOptions::default())
            .await
            .expect("consume");
        open.push((queue, subscription));
    }
    assert_eq!(
        broker.fifo_receive_locks(),
        QUEUES,
        "one lock per queue read"
    );
    for (_, subscription) in &mut open {
        subscription.close().await.expect("close");
    }
    // The receive loops end on their own once closed; wait for them, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.fifo_receive_locks() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = broker.fifo_receive_locks();
    // Another queue read later finds the map pruned, not grown.
    let later = format!("locks.later.{}", uuid::Uuid::now_v7());
    let mut subscription = broker
        .consume(&later, ConsumeOptions::default())
        .await
        .expect("consume");
    let with_one = broker.fifo_receive_locks();
    subscription.close().await.expect("close");
    for (queue, _) in open.iter().chain([(later, subscription)].iter()) {
        let sqs = broker.sqs_client();
        if let Ok(out) = sqs
            .get_queue_url()
            .queue_name(broker.queue_name(queue))
            .send()
            .await
        {
            let _ = sqs
                .delete_queue()
                .queue_url(out.queue_url().unwrap_or_default())
                .send()
                .await;
        }
    }
    assert_eq!(
        left, 0,
        "receive locks left after every subscription closed"
    );
    assert_eq!(with_one, 1, "receive locks while one queue is read");
}
