//! Watermill's TestReconnect on NATS: 100 concurrent publishers send 10,000 messages to a
//! topic while two members of a group consume it, and nats-server is restarted twice
//! (`scripts/brokers.sh restart nats`, JetStream data on disk), once about a third of the way
//! through the stream and once about half way. Every publish the server confirmed (PubAck) must
//! be received: 0 lost; duplicates are allowed and reported. Prints one line:
//! `nats restart: published=… confirmed=… received=… lost=0 duplicates=…`.
//!
//! A publish that returned an error may or may not have been stored; the publisher sends it
//! again (same envelope id) until one attempt is confirmed, so a duplicate here is such a
//! retry whose first attempt was stored after all, or a message whose ack was lost in the
//! restart.
//!
//! `BUS_RESTART_MESSAGES` sets the number of messages (default 10,000; still 100
//! publishers and 2 restarts). Needs `BUS_TEST_NATS_URL`; restarts the shared test server, so
//! it runs alone in this test binary.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use adapter_nats::NatsBroker;
use bus_core::conformance::{broker_url, report};
use bus_core::{Broker, Envelope, MessageId, Publisher, SubscribeOptions, Subscriber};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

const DEFAULT_MESSAGES: usize = 10_000;
const PUBLISHERS: usize = 100;
const MEMBERS: usize = 2;
/// How long publishing may take to recover from a restart before the test fails.
const RECOVERY: Duration = Duration::from_secs(120);

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

fn messages() -> usize {
    std::env::var("BUS_RESTART_MESSAGES")
        .ok()
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .expect("BUS_RESTART_MESSAGES is a number")
        })
        .unwrap_or(DEFAULT_MESSAGES)
        .max(PUBLISHERS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_restarts_under_100_publishers_lose_no_confirmed_message() {
    let Some(url) = broker_url("BUS_TEST_NATS_URL") else {
        return;
    };
    let total = messages();
    let bus = Arc::new(NatsBroker::connect(&url).await.expect("connect"));
    let topic = format!("restart.{}", MessageId::new());

    // The group's members: each forwards what it receives and acks it.
    let (received_tx, mut received) = mpsc::unbounded_channel::<MessageId>();
    let (stop, stopped) = watch::channel(false);
    let mut members = Vec::new();
    for _ in 0..MEMBERS {
        let mut sub = bus
            .subscribe(&topic, SubscribeOptions::group("counted").with_prefetch(64))
            .await
            .expect("subscribe");
        let received_tx = received_tx.clone();
        let mut stopped = stopped.clone();
        members.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    item = sub.next() => match item {
                        Some(Ok(d)) => {
                            let _ = received_tx.send(d.envelope().id.clone());
                            // An ack lost in the restart means a redelivery: allowed.
                            let _ = d.ack().await;
                        }
                        // The pull loop starts over by itself; the subscription stays usable.
                        Some(Err(e)) => println!("receive error: {e}"),
                        None => panic!("the subscription ended during a restart"),
                    },
                }
            }
            let _ = sub.close().await;
        }));
    }
    drop(received_tx);

    // Restarts at about 1/3 and 1/2 of the confirmed publishes.
    let (progress, mut confirmed_so_far) = watch::channel(0usize);
    let restarts = tokio::spawn(async move {
        for at in [total / 3, total / 2] {
            let _ = confirmed_so_far.wait_for(|n| *n >= at).await;
            let began = Instant::now();
            restart_nats().await;
            println!("restarted nats at {at} confirmed, in {:?}", began.elapsed());
        }
    });

    let started = Instant::now();
    let progress = Arc::new(progress);
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let (bus, topic, progress) = (bus.clone(), topic.clone(), progress.clone());
        let count = total / PUBLISHERS + usize::from(p < total % PUBLISHERS);
        publishers.push(tokio::spawn(async move {
            let mut confirmed = Vec::with_capacity(count);
            let mut failed = 0usize;
            for i in 0..count {
                let envelope = Envelope::new("restart.test", format!("publisher {p} message {i}"));
                // Each failure may or may not have been stored: sent again until confirmed.
                let mut backoff = Duration::from_millis(20);
                loop {
                    match bus.publish(&topic, envelope.clone()).await {
                        Ok(()) => break,
                        Err(e) => {
                            failed += 1;
                            assert!(
                                started.elapsed() < RECOVERY,
                                "publishing did not recover: {e}"
                            );
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                    }
                }
                confirmed.push(envelope.id);
                progress.send_modify(|n| *n += 1);
            }
            (confirmed, failed)
        }));
    }
    let mut confirmed = HashSet::new();
    let mut failed = 0usize;
    for publisher in publishers {
        let (ids, failures) = publisher.await.expect("a publisher");
        confirmed.extend(ids);
        failed += failures;
    }
    restarts.await.expect("both restarts");
    let published_in = started.elapsed();
    // The restarts cut this connection: the first connect and one after each restart.
    let connects = bus
        .client()
        .statistics()
        .connects
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        connects >= 3,
        "connected {connects} times: a restart was not seen"
    );

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
    for member in members {
        member.await.expect("a group member");
    }
    let _ = bus
        .jetstream()
        .delete_stream(bus.topic_stream(&topic))
        .await;
    let _ = bus.close().await;
    let lost = confirmed.difference(&seen).count();
    println!(
        "(published in {published_in:?}, all received after {:?}; {failed} failed publish \
         attempts sent again)",
        started.elapsed()
    );
    report(&format!(
        "nats restart: published={total} confirmed={} received={} lost={lost} duplicates={}",
        confirmed.len(),
        seen.len(),
        deliveries - seen.len()
    ));
    assert_eq!(lost, 0, "confirmed messages never arrived");
}
