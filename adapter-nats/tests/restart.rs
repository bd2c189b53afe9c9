//! nats-server restarts mid-stream (`scripts/brokers.sh restart nats`, JetStream data on
//! disk) while bus publishes and consumes: every publish confirmed by a PubAck is received;
//! duplicates are allowed, losses are not. Needs `BUS_TEST_NATS_URL`; restarts the shared
//! test server, so it runs alone in this test binary.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use adapter_nats::NatsBroker;
use bus_core::conformance::broker_url;
use bus_core::{Broker, Envelope, MessageId, Publisher, SubscribeOptions, Subscriber};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

const MESSAGES: usize = 3_000;
const RESTART_AFTER: usize = 1_000;

async fn restart_nats() {
    let status = tokio::process::Command::new("bash")
        .arg("scripts/brokers.sh")
        .args(["restart", "nats"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .expect("run scripts/brokers.sh");
    assert!(
        status.success(),
        "scripts/brokers.sh restart nats: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_stream_loses_no_confirmed_message() {
    let Some(url) = broker_url("BUS_TEST_NATS_URL") else {
        return;
    };
    let bus = Arc::new(NatsBroker::connect(&url).await.expect("connect"));
    let topic = format!("restart.{}", MessageId::new());
    let mut sub = bus
        .subscribe(&topic, SubscribeOptions::group("counted").with_prefetch(64))
        .await
        .expect("subscribe");

    let (received_tx, mut received) = mpsc::unbounded_channel::<MessageId>();
    let (stop, mut stopped) = watch::channel(false);
    let consumer = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                item = sub.next() => match item {
                    Some(Ok(d)) => {
                        let _ = received_tx.send(d.envelope().id.clone());
                        // An ack lost in the restart means a redelivery: allowed.
                        let _ = d.ack().await;
                    }
                    Some(Err(e)) => {
                        println!("receive error: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    None => panic!("the subscription ended during the restart"),
                },
            }
        }
        let _ = sub.close().await;
    });

    let mut confirmed = HashSet::new();
    let mut failed = 0usize;
    let mut restart = None;
    let started = Instant::now();
    for i in 0..MESSAGES {
        if i == RESTART_AFTER {
            restart = Some(tokio::spawn(restart_nats()));
        }
        let envelope = Envelope::new("restart.test", format!("message {i}"));
        let id = envelope.id.clone();
        // Retry with backoff until the server confirms; each failure is a publish that may or
        // may not have been stored, so it is not counted as confirmed.
        let mut backoff = Duration::from_millis(20);
        loop {
            match bus.publish(&topic, envelope.clone()).await {
                Ok(()) => {
                    confirmed.insert(id.clone());
                    break;
                }
                Err(e) => {
                    failed += 1;
                    assert!(
                        started.elapsed() < Duration::from_secs(120),
                        "publishing did not recover: {e}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
    restart.expect("restarted").await.expect("the restart task");

    let mut seen = HashSet::new();
    let mut deliveries = 0usize;
    while !confirmed.is_subset(&seen) {
        match tokio::time::timeout(Duration::from_secs(60), received.recv()).await {
            Ok(Some(id)) => {
                deliveries += 1;
                seen.insert(id);
            }
            _ => panic!(
                "{} of {} confirmed messages never arrived",
                confirmed.difference(&seen).count(),
                confirmed.len()
            ),
        }
    }
    let _ = stop.send(true);
    consumer.await.expect("consumer task");
    let _ = bus
        .jetstream()
        .delete_stream(bus.topic_stream(&topic))
        .await;
    let _ = bus.close().await;
    println!(
        "restart: {} confirmed, {} received ({} deliveries, {} duplicates), {failed} failed \
         publish attempts retried, 0 lost",
        confirmed.len(),
        seen.len(),
        deliveries,
        deliveries - seen.len()
    );
}
