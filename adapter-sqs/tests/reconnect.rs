//! Connections reset mid-stream at scale, after Watermill's `TestReconnect`: publishers run at
//! once while a consumer group receives, and a [`FaultProxy`] between the adapter and the
//! server (`BUS_TEST_SQS_URL`) resets every connection twice, at about a third and at half of
//! the stream. Every publish that returned `Ok` must arrive (`confirmed ⊆ received`); a
//! publish that failed may or may not have been delivered; duplicates are counted and
//! reported, not failed. It prints one line:
//! `sqs reconnect: published=… confirmed=… received=… lost=0 duplicates=…`.
//!
//! moto keeps everything in memory, so a server restart would lose what it had confirmed and
//! prove nothing; connection resets are the fault SQS clients meet (SQS itself is AWS's).
//!
//! Size: 300 messages from 10 publishers by default (about 30 s on moto, which answers slowly),
//! which keeps the project's test command fast; `BUS_RESTART_MESSAGES` sets the number of
//! messages (one publisher per 100, from 10 to 100), as for the other adapters' restart tests:
//! the Watermill size is
//! `BUS_RESTART_MESSAGES=10000 cargo test -p adapter-sqs --all-features --test reconnect -- --nocapture`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use adapter_sqs::{SqsBroker, SqsConfig};
use bus_core::conformance::{broker_url, report, FaultProxy};
use bus_core::{Broker, Envelope, MessageId, SubscribeOptions};
use tokio::sync::{mpsc, watch};
use url::Url;

/// Messages of the default run.
const DEFAULT_MESSAGES: usize = 300;
/// How long the consumer may go without a new message before the test gives up on the rest.
const STALLED: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_twice_lose_no_confirmed_message() {
    let Some(url) = broker_url("BUS_TEST_SQS_URL") else {
        return;
    };
    let total = std::env::var("BUS_RESTART_MESSAGES").map_or(DEFAULT_MESSAGES, |v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("BUS_RESTART_MESSAGES={v} is not a number"))
    });
    let publishers = (total / 100).clamp(10, 100);
    assert!(
        total >= publishers,
        "BUS_RESTART_MESSAGES={total}: at least {publishers}"
    );

    let proxy = FaultProxy::start().await.expect("the fault proxy listens");
    let mut proxied = Url::parse(&url).expect("BUS_TEST_SQS_URL is a URL");
    proxy.forward_to(proxied.socket_addrs(|| None).expect("the server's address")[0]);
    proxied.set_ip_host(proxy.addr().ip()).expect("an IP host");
    proxied.set_port(Some(proxy.addr().port())).expect("a port");
    let config = SqsConfig::from_url(proxied.as_str())
        .expect("an sqs:// URL")
        .with_wait_time(Duration::from_secs(1));
    let broker: Arc<dyn Broker> = Arc::new(SqsBroker::connect_with(config).await.expect("connect"));

    let topic = format!("reconnect.{}", MessageId::new());
    let mut sub = broker
        .subscribe(
            &topic,
            SubscribeOptions::group("reconnect").with_prefetch(100),
        )
        .await
        .expect("subscribe");
    let (ids, mut received) = mpsc::unbounded_channel::<MessageId>();
    let (stop, mut stopped) = watch::channel(false);
    let consumer = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                item = sub.next() => match item {
                    Some(Ok(delivery)) => {
                        let _ = ids.send(delivery.envelope().id.clone());
                        // A failed ack means a redelivery: a duplicate, counted below.
                        let _ = delivery.ack().await;
                    }
                    Some(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                    None => break,
                },
            }
        }
        let _ = sub.close().await;
    });

    let began = tokio::time::Instant::now();
    let started = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..publishers)
        .map(|p| {
            let (broker, topic, proxy, started) = (
                broker.clone(),
                topic.clone(),
                proxy.clone(),
                started.clone(),
            );
            tokio::spawn(async move {
                let mut confirmed = Vec::new();
                let mut failed = 0usize;
                for i in (p..total).step_by(publishers) {
                    let n = started.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == total / 3 || n == total / 2 {
                        proxy.reset();
                    }
                    let envelope = Envelope::new("reconnect.item", format!("{p}.{i}"));
                    let id = envelope.id.clone();
                    match broker.publish(&topic, envelope).await {
                        Ok(()) => confirmed.push(id),
                        Err(_) => failed += 1,
                    }
                }
                (confirmed, failed)
            })
        })
        .collect();
    let mut confirmed = HashSet::new();
    let mut failed = 0;
    for task in tasks {
        let (ok, err) = task.await.expect("a publisher task");
        confirmed.extend(ok);
        failed += err;
    }

    let mut counts: HashMap<MessageId, usize> = HashMap::new();
    while !confirmed.iter().all(|id| counts.contains_key(id)) {
        match tokio::time::timeout(STALLED, received.recv()).await {
            Ok(Some(id)) => *counts.entry(id).or_default() += 1,
            _ => break,
        }
    }
    let _ = stop.send(true);
    let _ = consumer.await;
    let _ = tokio::time::timeout(Duration::from_secs(5), broker.close()).await;

    let lost: Vec<&MessageId> = confirmed
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    report(&format!(
        "sqs reconnect: published={total} confirmed={} failed={failed} received={} lost={} \
         duplicates={duplicates} publishers={publishers} resets_cut={} connections={} \
         took={:.1?}",
        confirmed.len(),
        counts.len(),
        lost.len(),
        proxy.aborted(),
        proxy.accepted(),
        began.elapsed(),
    ));
    assert!(
        proxy.aborted() > 0,
        "the resets cut no connection: the adapter does not connect through the proxy"
    );
    assert!(
        lost.is_empty(),
        "{} of {} confirmed messages never arrived (nothing new for {STALLED:?}); first: {:?}",
        lost.len(),
        confirmed.len(),
        &lost[..lost.len().min(5)]
    );
}
