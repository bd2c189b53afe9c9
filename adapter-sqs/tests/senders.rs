//! Send batchers (one task per destination queue) stop after `sender_idle_ms` without a
//! message, so a process that sends to many queues over time does not keep a task for each
//! for ever (issue 11); sends after a batcher stopped start a new one and arrive
//! (`BUS_TEST_SQS_URL`).

use std::collections::HashSet;
use std::time::Duration;

use adapter_sqs::{SqsBroker, SqsConfig};
use bus_core::conformance::broker_url;
use bus_core::{Broker, ConsumeOptions, Envelope, Queue};
use tokio::time::Instant;

async fn broker(idle: Duration) -> Option<SqsBroker> {
    let url = broker_url("BUS_TEST_SQS_URL")?;
    let config = SqsConfig::from_url(&url)
        .expect("BUS_TEST_SQS_URL is an sqs:// URL")
        .with_wait_time(Duration::from_secs(1))
        .with_sender_idle(idle);
    Some(SqsBroker::connect_with(config).await.expect("connect"))
}

/// Waits (bounded) until `broker` runs `want` batchers; the count is the tasks', not a guess.
async fn batchers_become(broker: &SqsBroker, want: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let now = broker.send_batchers();
        if now == want || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn idle_send_batchers_stop_and_start_again_on_the_next_send() {
    const QUEUES: usize = 5;
    let idle = Duration::from_secs(2);
    let Some(broker) = broker(idle).await else {
        return;
    };
    let queues: Vec<String> = (0..QUEUES)
        .map(|i| format!("senders.{i}.{}", uuid::Uuid::now_v7()))
        .collect();
    assert_eq!(broker.send_batchers(), 0);
    // At once, so that none has been idle for long when they are counted (creating a queue on
    // moto under load can take a second).
    let sends: Vec<_> = queues
        .iter()
        .map(|queue| {
            let (broker, queue) = (broker.clone(), queue.clone());
            tokio::spawn(async move { broker.send(&queue, Envelope::new("t", "first")).await })
        })
        .collect();
    for send in sends {
        send.await.expect("a sender").expect("send");
    }
    assert_eq!(
        broker.send_batchers(),
        QUEUES,
        "one batcher per destination while they are in use"
    );
    let left = batchers_become(&broker, 0, idle * 10).await;
    assert_eq!(
        left,
        0,
        "{left} of {QUEUES} batchers still running after {:?}",
        idle * 10
    );

    // The next send to a queue starts a new batcher, and everything arrives.
    broker
        .send(&queues[0], Envelope::new("t", "second"))
        .await
        .expect("send after the batcher stopped");
    assert_eq!(broker.send_batchers(), 1);
    let mut consumer = broker
        .consume(&queues[0], ConsumeOptions::default())
        .await
        .expect("consume");
    let mut payloads = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .expect("a message in time")
            .expect("open")
            .expect("delivery");
        payloads.push(String::from_utf8_lossy(&d.envelope().payload).into_owned());
        d.ack().await.expect("ack");
    }
    payloads.sort();
    assert_eq!(payloads, ["first", "second"]);
    consumer.close().await.expect("close");
    for queue in &queues {
        let url = broker
            .sqs_client()
            .get_queue_url()
            .queue_name(broker.queue_name(queue))
            .send()
            .await
            .expect("queue url");
        let _ = broker
            .sqs_client()
            .delete_queue()
            .queue_url(url.queue_url().unwrap_or_default())
            .send()
            .await;
    }
    broker.close().await.expect("close");
}

/// With an idle time of 1 ms the batcher stops between almost every pair of sends and each
/// send starts a new one: every send must still arrive. (A send that meets a batcher in the
/// instant it stops is sent again through a new one; that window is too narrow for this test
/// to hit reliably.)
#[tokio::test]
async fn sends_to_a_queue_whose_batcher_keeps_stopping_all_arrive() {
    const SENDS: usize = 60;
    let Some(broker) = broker(Duration::from_millis(1)).await else {
        return;
    };
    let queue = format!("senders.race.{}", uuid::Uuid::now_v7());
    let mut tasks = Vec::new();
    for i in 0..SENDS {
        let (broker, queue) = (broker.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            // Spread out a little, so that batchers stop in between.
            tokio::time::sleep(Duration::from_millis((i % 10) as u64 * 3)).await;
            broker
                .send(&queue, Envelope::new("t", format!("{i}")))
                .await
                .expect("send");
        }));
    }
    for task in tasks {
        task.await.expect("a sender");
    }
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let mut seen = HashSet::new();
    while seen.len() < SENDS {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {SENDS} sends arrived", seen.len()))
            .expect("open")
            .expect("delivery");
        seen.insert(String::from_utf8_lossy(&d.envelope().payload).into_owned());
        d.ack().await.expect("ack");
    }
    consumer.close().await.expect("close");
    assert_eq!(batchers_become(&broker, 0, Duration::from_secs(5)).await, 0);
    broker.close().await.expect("close");
}
