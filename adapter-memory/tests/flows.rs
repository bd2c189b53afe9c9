//! The failure flow of a message, end to end on the memory broker: retries, dead letter,
//! redrive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapter_memory::MemoryBroker;
use bus_core::middleware::{DeadLetterLayer, Redrive, RetryLayer, RetryPolicy};
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo, HandlerBuilder, Outcome};
use bus_core::{
    headers, Broker, ConsumeOptions, Envelope, Error, ErrorKind, Publisher, Queue,
    SubscribeOptions, Subscriber,
};

const WAIT: Duration = Duration::from_secs(10);

async fn drain(broker: &MemoryBroker, queue: &str) -> Vec<Envelope> {
    let mut sub = broker
        .consume(queue, ConsumeOptions::default())
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        let d = d.unwrap();
        out.push(d.envelope().clone());
        d.ack().await.unwrap();
    }
    out
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("condition reached in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exhaust_into_the_dlq_with_exact_counts_then_redrive_brings_them_back() {
    let broker = MemoryBroker::new();
    let healthy = Arc::new(AtomicBool::new(false));
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let succeeded = Arc::new(AtomicU32::new(0));
    let handler = {
        let (healthy, runs, succeeded) = (healthy.clone(), runs.clone(), succeeded.clone());
        handler_fn(move |envelope: Envelope, _: DeliveryInfo| {
            let (healthy, runs, succeeded) = (healthy.clone(), runs.clone(), succeeded.clone());
            async move {
                *runs
                    .lock()
                    .unwrap()
                    .entry(envelope.id.to_string())
                    .or_default() += 1;
                if healthy.load(Ordering::SeqCst) {
                    succeeded.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                } else {
                    Err(Error::new(ErrorKind::Connection, "downstream unavailable"))
                }
            }
        })
    };
    let policy = RetryPolicy::new()
        .with_immediate_retries(1, Duration::from_millis(1))
        .with_max_deliveries(3)
        .with_backoff(Duration::from_millis(5), 2.0, Duration::from_millis(20));
    let handler = HandlerBuilder::new()
        .layer(RetryLayer::new(policy))
        .handler(handler);
    let sub = broker
        .subscribe("orders", SubscribeOptions::group("billing"))
        .await
        .unwrap();
    let consumer = Consumer::new(sub, handler).spawn();

    for i in 0..5 {
        broker
            .publish("orders", Envelope::new("order.placed", format!("{i}")))
            .await
            .unwrap();
    }
    // 5 messages × 3 deliveries × (1 run + 1 immediate retry).
    wait_for(|| runs.lock().unwrap().values().sum::<u32>() == 30).await;
    wait_for(|| broker.queue_len("orders.dlq") == 5).await;
    assert!(runs.lock().unwrap().values().all(|r| *r == 6));

    let dead = drain(&broker, &headers::dead_letter_queue("orders")).await;
    assert_eq!(dead.len(), 5);
    for envelope in &dead {
        assert_eq!(envelope.header(headers::DLQ_ATTEMPTS), Some("3"));
        assert_eq!(envelope.header(headers::DLQ_ORIGINAL_TOPIC), Some("orders"));
        assert_eq!(envelope.header(headers::DLQ_GROUP), Some("billing"));
        let reason = envelope.header(headers::DLQ_REASON).unwrap();
        assert!(
            reason.contains("gave up after 3 deliveries") && reason.contains("downstream"),
            "{reason}"
        );
        assert!(envelope.header(headers::DLQ_FIRST_FAILURE).is_some());
    }

    // Put them back in the DLQ, fix the cause, and redrive.
    for envelope in dead {
        broker.send("orders.dlq", envelope).await.unwrap();
    }
    healthy.store(true, Ordering::SeqCst);
    let report = Redrive::topic("orders")
        .with_idle_timeout(Duration::from_millis(200))
        .run(&broker)
        .await
        .unwrap();
    assert_eq!(report.moved, 5);
    wait_for(|| succeeded.load(Ordering::SeqCst) == 5).await;
    assert_eq!(broker.queue_len("orders.dlq"), 0);
    let report = consumer.stop().await.unwrap();
    assert_eq!(report.rejected, 5);
    assert_eq!(report.acked, 5);
    assert_eq!(report.retried, 10, "two redeliveries for each of the 5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_layer_sends_rejects_itself_and_acks_the_original() {
    let broker = MemoryBroker::new();
    let queue: Arc<dyn Queue> = Arc::new(broker.clone());
    let handler = HandlerBuilder::new()
        .layer(DeadLetterLayer::new(queue))
        .handler(handler_fn(|_: Envelope, _: DeliveryInfo| async {
            Outcome::reject(Error::new(ErrorKind::Serialization, "not an order"))
        }));
    let sub = broker
        .consume("work", ConsumeOptions::default())
        .await
        .unwrap();
    let consumer = Consumer::new(sub, handler).spawn();
    let sent = Envelope::new("job", "x").with_key("k");
    broker.send("work", sent.clone()).await.unwrap();
    wait_for(|| broker.queue_len("work.dlq") == 1).await;
    let report = consumer.stop().await.unwrap();
    assert_eq!((report.acked, report.rejected), (1, 0));
    assert_eq!(broker.queue_len("work"), 0);
    let dead = drain(&broker, "work.dlq").await;
    assert_eq!(dead[0].id, sent.id);
    assert_eq!(dead[0].key.as_deref(), Some("k"));
    assert_eq!(
        dead[0].header(headers::DLQ_REASON),
        Some("serialization: not an order")
    );
    assert_eq!(dead[0].header(headers::DLQ_ATTEMPTS), Some("1"));
    broker.close().await.unwrap();
}
