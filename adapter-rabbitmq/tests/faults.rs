//! Faults under deliveries in flight, against the real broker (`BUS_TEST_RABBITMQ_URL`):
//!
//! - the connection a subscription consumes on is closed by the broker (`rabbitmqctl
//!   close_connection`, found by the adapter's connection name) while deliveries are held
//!   unsettled. RabbitMQ requeues them at once and delivers them again to the re-attached
//!   consumer; settling the old deliveries afterwards must be refused with `Closed`, and must
//!   store no copy (no next attempt, no dead letter, nothing when dropped), or one message the
//!   handler acked runs up to three times;
//! - `nack(After(d))` with many distinct (jittered) delays shares a few retry queues (the
//!   documented ladder of delays), each redelivery still no sooner than asked;
//! - the requester's connection is closed while a request waits for its reply: the request
//!   fails with `Connection` at once, not at its timeout, and the next request is answered.
//!
//! Needs `rabbitmqctl` on the `PATH` with the right to run it (root, as on the test machines).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use adapter_rabbitmq::lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use adapter_rabbitmq::lapin::types::FieldTable;
use adapter_rabbitmq::lapin::{Connection, ConnectionProperties};
use adapter_rabbitmq::{RabbitMqBroker, RabbitMqConfig};
use bus_core::conformance::broker_url;
use bus_core::{
    headers, Broker, Delivery, Envelope, ErrorKind, MessageId, Publisher, Redeliver, Requester,
    Responder, ServeOptions, SubscribeOptions, Subscriber, Subscription,
};
use tokio::time::Instant;

fn unique(tag: &str) -> String {
    format!("faults.{tag}.{}", MessageId::new())
}

async fn rabbitmqctl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Closes, from the broker's side, every connection whose client named itself `name`.
async fn close_connections_named(name: &str) {
    let listing = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ])
    .await;
    let needle = format!("\"{name}\"");
    let pids: Vec<&str> = listing
        .lines()
        .filter(|line| line.contains(&needle))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert!(
        !pids.is_empty(),
        "no connection named {name} in:\n{listing}"
    );
    for pid in pids {
        rabbitmqctl(&["close_connection", pid, "bus faults test"]).await;
    }
}

/// The names of every queue on the broker.
async fn queue_names() -> Vec<String> {
    rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name"])
        .await
        .lines()
        .map(|l| l.trim().to_owned())
        .collect()
}

async fn raw_connection(url: &str) -> Connection {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    Connection::connect(url, props).await.expect("raw connect")
}

/// How many messages `queue` holds (0 when it does not exist).
async fn message_count(url: &str, queue: &str) -> u32 {
    let connection = raw_connection(url).await;
    let channel = connection.create_channel().await.expect("channel");
    let count = match channel
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(q) => q.message_count(),
        Err(_) => 0,
    };
    let _ = connection.close(200, "done").await;
    count
}

async fn delete_queues(url: &str, queues: &[String]) {
    let connection = raw_connection(url).await;
    for queue in queues {
        // A failed delete (queue already gone) closes the channel: one channel each.
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(queue, QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = connection.close(200, "done").await;
}

async fn next(sub: &mut Subscription, within: Duration) -> Delivery {
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(Ok(d))) => return d,
            // The consumer reports its lost channel once, then re-attaches.
            Ok(Some(Err(e))) if e.is_retryable() => continue,
            Ok(Some(Err(e))) => panic!("subscription failed: {e}"),
            Ok(None) => panic!("subscription ended"),
            Err(_) => panic!("nothing received within {within:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_on_a_dead_channel_is_refused_and_stores_no_copy() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let name = format!("bus-faults-{}", MessageId::new());
    let broker = RabbitMqBroker::with_config(
        RabbitMqConfig::new(&url)
            .with_connection_name(&name)
            .with_reconnect_timeout(Duration::from_secs(30)),
    )
    .await
    .expect("connect");
    // Published from a connection of its own, which the fault leaves alone.
    let publisher = RabbitMqBroker::connect(&url).await.expect("connect");
    let topic = unique("dead");
    let group = "g";
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(group).with_prefetch(10))
        .await
        .expect("subscribe");

    let roles = ["acked", "nacked", "rejected", "dropped"];
    let mut sent = HashMap::new();
    for role in roles {
        let envelope = Envelope::new("faults.dead", role);
        sent.insert(envelope.id.clone(), role);
        publisher.publish(&topic, envelope).await.expect("publish");
    }
    let mut first: HashMap<&str, Delivery> = HashMap::new();
    while first.len() < roles.len() {
        let d = next(&mut sub, Duration::from_secs(10)).await;
        let role = sent[&d.envelope().id];
        assert!(first.insert(role, d).is_none(), "{role} delivered twice");
    }

    close_connections_named(&name).await;

    // The broker requeued the four and hands them to the re-attached consumer.
    let mut again: HashMap<&str, Delivery> = HashMap::new();
    while again.len() < roles.len() {
        let d = next(&mut sub, Duration::from_secs(30)).await;
        let role = sent[&d.envelope().id];
        assert!(
            again.insert(role, d).is_none(),
            "{role} redelivered twice after one connection loss"
        );
    }
    assert!(
        broker.connection_generation() >= 2,
        "the connection was not re-made"
    );

    // Settling what came on the dead channel: refused, typed, and nothing stored.
    let outcomes = [
        ("acked", first.remove("acked").unwrap().ack().await),
        (
            "nacked",
            first.remove("nacked").unwrap().nack(Redeliver::Now).await,
        ),
        (
            "rejected",
            first.remove("rejected").unwrap().reject("poison").await,
        ),
    ];
    // Every problem is collected, so that one run shows them all.
    let mut problems = Vec::new();
    for (role, outcome) in outcomes {
        match outcome {
            Ok(()) => problems.push(format!("{role}: settled on the dead channel")),
            Err(err) => {
                let e = err.error();
                if e.kind() != ErrorKind::Closed || e.is_retryable() {
                    problems.push(format!("{role}: {} error `{e}`, not Closed", e.kind()));
                }
                // Dropped, as the consumer runtime does after a failed settlement: no copy
                // either.
                drop(err.into_delivery());
            }
        }
    }
    drop(first.remove("dropped").unwrap());

    for (role, d) in again {
        d.ack()
            .await
            .unwrap_or_else(|e| panic!("ack of the redelivered {role}: {e}"));
    }
    let dlq = headers::dead_letter_queue(&topic);
    let dead_letters = message_count(&url, &dlq).await;
    if dead_letters > 0 {
        problems.push(format!(
            "{dead_letters} dead letter(s) stored for the rejected delivery, which was \
             redelivered too"
        ));
    }

    // A dropped delivery is given back from a spawned task, which reports to nobody: a copy
    // it stored (it took milliseconds before the fix) would be in the queue within this bound,
    // ahead of the marker published after it. There is no signal for a copy never made.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let marker = Envelope::new("faults.marker", "end");
    publisher
        .publish(&topic, marker.clone())
        .await
        .expect("publish");
    loop {
        let d = next(&mut sub, Duration::from_secs(10)).await;
        let id = d.envelope().id.clone();
        d.ack().await.expect("ack");
        if id == marker.id {
            break;
        }
        let role = sent.get(&id).copied().unwrap_or("unknown");
        problems.push(format!(
            "{role}: a copy was stored, but the broker had requeued the original already"
        ));
    }
    let _ = sub.close().await;
    delete_queues(&url, &[wire_group_queue(&topic, group), dlq]).await;
    broker.close().await.expect("close");
    publisher.close().await.expect("close");
    assert!(
        problems.is_empty(),
        "settling deliveries of a dead channel:\n{}",
        problems.join("\n")
    );
}

fn wire_group_queue(topic: &str, group: &str) -> String {
    format!("{topic}@{group}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jittered_delays_share_a_few_retry_queues() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    const MESSAGES: u64 = 40;
    let broker = RabbitMqBroker::connect(&url).await.expect("connect");
    let topic = unique("buckets");
    let group = "g";
    let queue = wire_group_queue(&topic, group);
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(group).with_prefetch(100))
        .await
        .expect("subscribe");
    let mut ids = HashSet::new();
    for i in 0..MESSAGES {
        let envelope = Envelope::new("faults.delay", format!("{i}"));
        ids.insert(envelope.id.clone());
        broker.publish(&topic, envelope).await.expect("publish");
    }
    // Each its own delay, 1,000 to 1,351 ms, as a jittered backoff makes them.
    let mut asked = HashMap::new();
    for i in 0..MESSAGES {
        let d = next(&mut sub, Duration::from_secs(10)).await;
        assert_eq!(d.attempt(), 1);
        let delay = Duration::from_millis(1_000 + i * 9);
        asked.insert(d.envelope().id.clone(), (Instant::now(), delay));
        d.nack(Redeliver::After(delay)).await.expect("nack");
    }
    let suffix = format!(".{queue}");
    let retry_queues: Vec<String> = queue_names()
        .await
        .into_iter()
        .filter(|q| q.starts_with("bus.retry.") && q.ends_with(&suffix))
        .collect();
    let mut back = HashSet::new();
    while back.len() < ids.len() {
        let d = next(&mut sub, Duration::from_secs(15)).await;
        let id = d.envelope().id.clone();
        let (nacked_at, delay) = asked[&id];
        let waited = nacked_at.elapsed();
        assert!(
            waited >= delay,
            "back after {waited:?}, sooner than the {delay:?} asked"
        );
        assert_eq!(d.attempt(), 2);
        back.insert(id);
        d.ack().await.expect("ack");
    }
    let _ = sub.close().await;
    let mut cleanup = retry_queues.clone();
    cleanup.push(queue);
    delete_queues(&url, &cleanup).await;
    broker.close().await.expect("close");

    // 1,000 ms has a bucket of its own; 1,009 to 1,351 ms all round up to 1,500 ms.
    assert!(
        !retry_queues.is_empty() && retry_queues.len() <= 2,
        "{MESSAGES} distinct delays made {} retry queues: {retry_queues:?}",
        retry_queues.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_on_a_lost_connection_fails_at_once() {
    const TIMEOUT: Duration = Duration::from_secs(30);
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let name = format!("bus-faults-{}", MessageId::new());
    let requester = std::sync::Arc::new(
        RabbitMqBroker::with_config(
            RabbitMqConfig::new(&url)
                .with_connection_name(&name)
                .with_reconnect_timeout(Duration::from_secs(30)),
        )
        .await
        .expect("connect"),
    );
    let responder = RabbitMqBroker::connect(&url).await.expect("connect");
    let service = unique("lost");
    let mut requests = responder
        .serve(&service, ServeOptions::default())
        .await
        .expect("serve");
    // The first request is held unanswered; every later one is answered.
    let (held_tx, held) = tokio::sync::oneshot::channel();
    let serving = tokio::spawn(async move {
        let mut held_tx = Some(held_tx);
        while let Some(Ok(request)) = requests.next().await {
            match held_tx.take() {
                Some(tx) => {
                    let _ = tx.send(request);
                }
                None => {
                    let _ = request.reply(Envelope::new("faults.answer", "ok")).await;
                }
            }
        }
    });
    let waiting = {
        let requester = requester.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = requester
                .request(&service, Envelope::new("faults.ask", "held"), TIMEOUT)
                .await;
            (result, started.elapsed())
        })
    };
    let _held = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the responder got the first request")
        .expect("held");

    close_connections_named(&name).await;

    // Before: the request waited for its 30 s timeout on a reply channel that was gone.
    let (result, elapsed) = waiting.await.expect("request task");
    let error = result.expect_err("no reply can come on a closed channel");
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(
        elapsed < Duration::from_secs(10),
        "failed only after {elapsed:?}"
    );
    let answer = requester
        .request(&service, Envelope::new("faults.ask", "again"), TIMEOUT)
        .await
        .expect("a request after the reconnection is answered");
    assert_eq!(answer.kind, "faults.answer");
    let _ = requester.close().await;
    let _ = responder.close().await;
    serving.await.expect("responder task");
}
