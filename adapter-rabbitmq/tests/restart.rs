//! A broker restart in the middle of a stream: RabbitMQ is stopped and started
//! (`scripts/brokers.sh restart rabbitmq`) while a publisher keeps publishing, retrying each
//! message until it is confirmed, and a consumer group keeps receiving. Every confirmed
//! message must arrive (duplicates are allowed, losses are not), and the adapter must have
//! reconnected by itself.
//!
//! Needs `BUS_TEST_RABBITMQ_URL` and permission to restart the local server (root, as on the
//! test machines). Leaves the server running.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use adapter_rabbitmq::lapin::options::QueueDeleteOptions;
use adapter_rabbitmq::{RabbitMqBroker, RabbitMqConfig};
use bus_core::conformance::broker_url;
use bus_core::{
    Broker, Envelope, MessageId, Publisher, Requester, Responder, ServeOptions, SubscribeOptions,
    Subscriber,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

const TOTAL: usize = 3_000;
const RESTART_AT: usize = 500;

async fn restart_rabbitmq() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let status = tokio::process::Command::new("bash")
        .arg("scripts/brokers.sh")
        .args(["restart", "rabbitmq"])
        .current_dir(root)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .expect("run scripts/brokers.sh");
    assert!(
        status.success(),
        "scripts/brokers.sh restart rabbitmq failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_stream_loses_no_confirmed_message() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let config = RabbitMqConfig::new(&url)
        .with_connection_name("bus-restart-test")
        .with_reconnect_timeout(Duration::from_secs(90));
    let broker = RabbitMqBroker::with_config(config).await.expect("connect");
    let topic = format!("restart.{}", MessageId::new());
    let group = "restart";
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(group).with_prefetch(200))
        .await
        .expect("subscribe");

    // A responder served across the restart: it must re-attach, and the requester's direct
    // reply-to channel must be made again.
    let rpc_topic = format!("{topic}.rpc");
    let mut requests = broker
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

    let (received_tx, mut received) = mpsc::unbounded_channel::<MessageId>();
    let (stop, mut stopped) = watch::channel(false);
    let consumer = tokio::spawn(async move {
        let mut errors = 0usize;
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                item = sub.next() => match item {
                    Some(Ok(d)) => {
                        let _ = received_tx.send(d.envelope().id.clone());
                        // An ack lost in the restart means a redelivery: allowed.
                        let _ = d.ack().await;
                    }
                    Some(Err(_)) => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    None => panic!("the subscription ended during the restart"),
                },
            }
        }
        let _ = sub.close().await;
        errors
    });

    let mut confirmed: HashSet<MessageId> = HashSet::new();
    let mut failed_attempts = 0usize;
    let mut restart = None;
    let started = Instant::now();
    for i in 0..TOTAL {
        if i == RESTART_AT {
            restart = Some(tokio::spawn(restart_rabbitmq()));
        }
        let envelope = Envelope::new("restart.test", format!("message {i}"));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match broker.publish(&topic, envelope.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    failed_attempts += 1;
                    assert!(
                        Instant::now() < deadline,
                        "publishing did not recover within 120 s: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        confirmed.insert(envelope.id);
    }
    restart
        .expect("restart started")
        .await
        .expect("restart task");
    let published_in = started.elapsed();

    let asked = Instant::now();
    let reply = loop {
        match broker
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
                    "request-reply did not recover within 60 s of the restart: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(reply.kind, "restart.pong");
    println!(
        "restart: request-reply answered {:?} after the restart",
        asked.elapsed()
    );

    let mut counts: HashMap<MessageId, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !confirmed.iter().all(|id| counts.contains_key(id)) {
        match tokio::time::timeout_at(deadline, received.recv()).await {
            Ok(Some(id)) => *counts.entry(id).or_default() += 1,
            _ => break,
        }
    }
    let _ = stop.send(true);
    let receive_errors = consumer.await.expect("consumer task");
    let lost = confirmed
        .iter()
        .filter(|id| !counts.contains_key(id))
        .count();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    println!(
        "restart: {} confirmed, {failed_attempts} failed publish attempts retried, {} received \
         ({duplicates} duplicates), {lost} lost, {receive_errors} receive errors, connection \
         made {} times, published in {published_in:?}",
        confirmed.len(),
        counts.len(),
        broker.connection_generation()
    );

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
    broker.close().await.expect("close");
    let _ = responder.await;

    assert!(
        broker.connection_generation() >= 2,
        "the connection was never re-made: did the restart happen?"
    );
    assert_eq!(lost, 0, "confirmed messages were lost in the restart");
}
