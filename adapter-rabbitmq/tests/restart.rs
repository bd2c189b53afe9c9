//! Broker restarts in the middle of a stream, after Watermill's TestReconnect: 100 concurrent
//! publishers publish 10,000 messages (paced at about 1,000 a second in all) to one topic,
//! each retrying a message until its publish is confirmed, while a consumer group of two
//! members on a connection of its own receives and acks them. RabbitMQ is restarted twice
//! (`scripts/brokers.sh restart rabbitmq`), once a third and once half of the messages are
//! confirmed. Every confirmed message must arrive (duplicates are allowed, losses are not),
//! both connections must have been re-made by the adapter, and a responder served across the
//! restarts must answer again.
//!
//! Prints one line:
//! `rabbitmq restart: published=… confirmed=… received=… lost=0 duplicates=…`, where
//! `published` counts publish calls (a failed one, retried, counts again: a failed publish may
//! or may not have stored its message), `confirmed` the messages whose publish returned `Ok`,
//! `received` the distinct messages received and `duplicates` the deliveries beyond one per
//! message.
//!
//! `BUS_RESTART_MESSAGES` sets the number of messages (10,000 by default; at least 300, so
//! that both restarts fall inside the stream). About 25 s here, most of it the two restarts.
//!
//! Needs `BUS_TEST_RABBITMQ_URL` and permission to restart the local server (root, as on the
//! test machines). Leaves the server running.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapter_rabbitmq::lapin::options::QueueDeleteOptions;
use adapter_rabbitmq::{RabbitMqBroker, RabbitMqConfig};
use bus_core::conformance::{broker_url, report};
use bus_core::{
    Broker, Envelope, MessageId, Publisher, Requester, Responder, ServeOptions, SubscribeOptions,
    Subscriber,
};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

const DEFAULT_MESSAGES: usize = 10_000;
const PUBLISHERS: usize = 100;
/// Each publisher's pace: 100 publishers at one message per 100 ms make about 1,000 a second.
const PACE: Duration = Duration::from_millis(100);

fn messages() -> usize {
    match std::env::var("BUS_RESTART_MESSAGES") {
        Ok(v) if !v.trim().is_empty() => {
            let n: usize = v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("BUS_RESTART_MESSAGES={v} is not a number"));
            assert!(n >= 300, "BUS_RESTART_MESSAGES={n}: at least 300");
            n
        }
        _ => DEFAULT_MESSAGES,
    }
}

async fn restart_rabbitmq() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = tokio::process::Command::new("bash")
        .arg("scripts/brokers.sh")
        .args(["restart", "rabbitmq"])
        .current_dir(root)
        .output()
        .await
        .expect("run scripts/brokers.sh");
    assert!(
        out.status.success(),
        "scripts/brokers.sh restart rabbitmq failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Default)]
struct Published {
    calls: usize,
    confirmed: HashSet<MessageId>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_mid_stream_lose_no_confirmed_message() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let total = messages();
    let connect = |name: &str| {
        RabbitMqBroker::with_config(
            RabbitMqConfig::new(&url)
                .with_connection_name(name)
                .with_reconnect_timeout(Duration::from_secs(30)),
        )
    };
    let publisher = connect("bus-restart-publisher").await.expect("connect");
    let consumer = connect("bus-restart-consumer").await.expect("connect");
    let topic = format!("restart.{}", MessageId::new());
    let group = "restart";

    // Two members of one group: both re-attach, and between them every message arrives.
    let (received_tx, mut received) = mpsc::unbounded_channel::<MessageId>();
    let (stop, stopped) = watch::channel(false);
    let mut members = Vec::new();
    for _ in 0..2 {
        let mut sub = consumer
            .subscribe(&topic, SubscribeOptions::group(group).with_prefetch(200))
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
                            // An ack refused because its channel died: the broker requeued the
                            // message and delivers it again (a duplicate, allowed).
                            let _ = d.ack().await;
                        }
                        // The lost channel is reported once; the next call re-attaches.
                        Some(Err(_)) => {}
                        None => panic!("the subscription ended during a restart"),
                    },
                }
            }
            let _ = sub.close().await;
        }));
    }

    // A responder served across the restarts: it must re-attach, and the requester's direct
    // reply-to channel must be made again.
    let rpc_topic = format!("{topic}.rpc");
    let mut requests = consumer
        .serve(&rpc_topic, ServeOptions::default())
        .await
        .expect("serve");
    let responder = tokio::spawn(async move {
        while let Some(item) = requests.next().await {
            if let Ok(request) = item {
                let _ = request.reply(Envelope::new("restart.pong", "pong")).await;
            }
        }
    });

    // The restarts follow the count of confirmed messages. The second waits, besides, for the
    // consumer's connection to be back from the first, so that it is cut twice too.
    let (progress, mut confirmed_so_far) = watch::channel(0usize);
    let consumer_link = consumer.clone();
    let restarts = tokio::spawn(async move {
        for (restart, at) in [(1, total / 3), (2, total / 2)] {
            let reached = confirmed_so_far.wait_for(|n| *n >= at).await.is_ok();
            assert!(reached, "publishing ended before {at} confirmed");
            let back = Instant::now() + Duration::from_secs(60);
            while consumer_link.connection_generation() < restart {
                assert!(
                    Instant::now() < back,
                    "the consumer did not reconnect within 60 s of restart {}",
                    restart - 1
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            restart_rabbitmq().await;
        }
    });

    let published = Arc::new(Mutex::new(Published::default()));
    let progress = Arc::new(progress);
    let next_index = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut publishers = Vec::new();
    for _ in 0..PUBLISHERS {
        let (broker, topic) = (publisher.clone(), topic.clone());
        let (published, progress, next_index) =
            (published.clone(), progress.clone(), next_index.clone());
        publishers.push(tokio::spawn(async move {
            let mut pace = tokio::time::interval(PACE);
            pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                let i = next_index.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                pace.tick().await;
                let envelope = Envelope::new("restart.test", format!("message {i}"));
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    let result = broker.publish(&topic, envelope.clone()).await;
                    published.lock().unwrap().calls += 1;
                    match result {
                        Ok(()) => break,
                        Err(e) => {
                            assert!(
                                Instant::now() < deadline,
                                "publishing did not recover within 120 s: {e}"
                            );
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                published.lock().unwrap().confirmed.insert(envelope.id);
                progress.send_modify(|n| *n += 1);
            }
        }));
    }
    for task in publishers {
        task.await.expect("publisher task");
    }
    restarts.await.expect("both restarts ran");
    let published_in = started.elapsed();
    let Published { calls, confirmed } = std::mem::take(&mut *published.lock().unwrap());

    let asked = Instant::now();
    let reply = loop {
        match publisher
            .request(
                &rpc_topic,
                Envelope::new("restart.ping", "ping"),
                Duration::from_secs(2),
            )
            .await
        {
            Ok(reply) => break reply,
            Err(e) => {
                assert!(
                    asked.elapsed() < Duration::from_secs(60),
                    "request-reply did not recover within 60 s of the restarts: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(reply.kind, "restart.pong");

    let mut counts: HashMap<MessageId, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !confirmed.iter().all(|id| counts.contains_key(id)) {
        match tokio::time::timeout_at(deadline, received.recv()).await {
            Ok(Some(id)) => *counts.entry(id).or_default() += 1,
            _ => break,
        }
    }
    let _ = stop.send(true);
    for member in members {
        member.await.expect("consumer task");
    }
    while let Ok(id) = received.try_recv() {
        *counts.entry(id).or_default() += 1;
    }
    let lost = confirmed
        .iter()
        .filter(|id| !counts.contains_key(id))
        .count();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    report(&format!(
        "rabbitmq restart: published={calls} confirmed={} received={} lost={lost} \
         duplicates={duplicates}",
        confirmed.len(),
        counts.len(),
    ));

    let queue = format!("{topic}@{group}");
    if let Ok(connection) = adapter_rabbitmq::lapin::Connection::connect(
        &url,
        adapter_rabbitmq::lapin::ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio),
    )
    .await
    {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(&queue, QueueDeleteOptions::default())
                .await;
        }
        let _ = connection.close(200, "done").await;
    }
    let generations = (
        publisher.connection_generation(),
        consumer.connection_generation(),
    );
    publisher.close().await.expect("close");
    consumer.close().await.expect("close");
    let _ = responder.await;

    assert!(
        generations.0 >= 3 && generations.1 >= 3,
        "connections made (publisher, consumer): {generations:?}, not one more per restart"
    );
    assert_eq!(
        confirmed.len(),
        total,
        "every message is confirmed in the end"
    );
    assert!(
        counts.keys().all(|id| confirmed.contains(id)),
        "received a message that was never published here"
    );
    assert_eq!(
        lost, 0,
        "confirmed messages were lost in the restarts (published in {published_in:?})"
    );
}
