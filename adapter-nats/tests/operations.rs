//! What is specific to NATS in backlog counts and delayed publish: the JetStream emulation of
//! delays (a delayed message outliving the connection that published it, foreign messages on
//! the delayed stream without a readable due time, private subscriptions), and which backlogs
//! cannot be counted. The contract is in the conformance cases `backlog_counts_what_waits`
//! and `delayed_publish_arrives_after_delay`. Needs `BUS_TEST_NATS_URL`.

use std::time::{Duration, SystemTime};

use adapter_nats::header_names::DUE;
use adapter_nats::{NatsBroker, NatsConfig};
use bus_core::conformance::broker_url;
use bus_core::{
    BacklogOf, Broker, Delay, Delivery, Envelope, ErrorKind, MessageId, Publisher, Queue,
    SubscribeOptions, Subscriber, Subscription, Support,
};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(20);

/// The tests' configuration; `None` without a broker.
fn config(durable: bool) -> Option<NatsConfig> {
    let url = broker_url("BUS_TEST_NATS_URL")?;
    Some(
        NatsConfig::from_url(&url)
            .expect("a NATS URL")
            .with_max_age(Duration::from_secs(3600))
            .with_ack_wait(Duration::from_secs(10))
            .with_durable(durable),
    )
}

async fn connect(durable: bool) -> Option<NatsBroker> {
    let config = config(durable)?;
    Some(NatsBroker::connect_with(config).await.expect("connect"))
}

fn unique(what: &str) -> String {
    format!("ops.{what}.{}", MessageId::new())
}

async fn next(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a delivery in time")
        .expect("the subscription is open")
        .expect("a delivery, not an error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_groups_and_queues_are_not_found_and_core_groups_cannot_be_counted() {
    let Some(broker) = connect(true).await else {
        return;
    };
    let caps = broker.capabilities();
    assert_eq!(caps.backlog, Support::Native);
    assert_eq!(caps.delayed_publish, Support::Emulated);
    assert_eq!(caps.max_delay, None);
    for of in [
        BacklogOf::group(unique("none"), "g"),
        BacklogOf::queue(unique("none")),
    ] {
        let err = broker.backlog(&of).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{of}: {err}");
    }
    // A topic whose stream exists, but not the group.
    let topic = unique("nogroup");
    broker
        .publish(&topic, Envelope::new("n", "x"))
        .await
        .unwrap();
    let err = broker
        .backlog(&BacklogOf::group(&topic, "never"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    broker.close().await.unwrap();

    let Some(core) = connect(false).await else {
        return;
    };
    let caps = core.capabilities();
    assert!(caps.backlog.unsupported_reason().is_some());
    assert!(caps.delayed_publish.unsupported_reason().is_some());
    let err = core
        .backlog(&BacklogOf::group(&topic, "g"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let err = core
        .publish_delayed(&topic, Envelope::new("n", "x"), Delay::For(WAIT))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    core.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_outlives_its_publisher_and_is_counted_as_delayed() {
    let Some(publisher) = connect(true).await else {
        return;
    };
    let topic = unique("restart");
    let group = format!("{topic}.g");
    // The group exists, and nobody of it is connected while the message waits.
    publisher
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let delay = Duration::from_secs(3);
    let published = Instant::now();
    let delayed = Envelope::new("ops.delayed", "later").with_header("x-ops", "kept");
    publisher
        .publish_delayed(&topic, delayed.clone(), Delay::For(delay))
        .await
        .unwrap();
    let of = BacklogOf::group(&topic, &group);
    let backlog = publisher.backlog(&of).await.unwrap();
    assert_eq!(
        (backlog.waiting, backlog.in_flight, backlog.delayed),
        (0, Some(0), Some(1)),
        "{backlog:?}"
    );
    // The publisher goes away: the message waits in the server, not in this process.
    publisher.close().await.unwrap();
    drop(publisher);

    let consumer = connect(true).await.expect("connected before");
    let mut private = consumer
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .unwrap();
    let mut sub = consumer
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    for sub in [&mut sub, &mut private] {
        let d = next(sub).await;
        assert!(published.elapsed() >= delay, "{:?}", published.elapsed());
        assert_eq!(d.envelope().id, delayed.id);
        assert_eq!(d.envelope().header("x-ops"), Some("kept"));
        assert_eq!(
            d.envelope().header(DUE),
            None,
            "the due time is not handed on"
        );
        assert_eq!(d.attempt(), 1);
        d.ack().await.unwrap();
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let backlog = consumer.backlog(&of).await.unwrap();
        if backlog.total() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still {backlog:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sub.close().await.unwrap();
    private.close().await.unwrap();
    consumer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_on_the_delayed_stream_go_to_their_queue_at_once() {
    let Some(config) = config(true) else {
        return;
    };
    // A delayed stream and movers of its own: a mover of another test's connection that
    // closed may still have a pull request open on the shared `movers` consumer, and what the
    // server hands it waits out the ack wait (10 s here, as long as `later` below) before it
    // is moved (docs/adapters/nats.md).
    let prefix = format!("opsf{}", &MessageId::new().as_str().replace('-', "")[..12]);
    let broker = NatsBroker::connect_with(config.with_prefix(&prefix))
        .await
        .expect("connect");
    let queue = unique("foreign");
    let mut consumer = broker.consume(&queue, Default::default()).await.unwrap();
    // Makes sure of the delayed stream; and a time already past is due at once.
    let overdue = Envelope::new("ops.overdue", "past");
    broker
        .send_delayed(
            &queue,
            overdue.clone(),
            Delay::Until(SystemTime::now() - Duration::from_secs(1)),
        )
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    assert_eq!(d.envelope().id, overdue.id);
    d.ack().await.unwrap();
    // Due well after the foreign messages below, which must not wait behind it.
    let later = Envelope::new("ops.later", "much later");
    broker
        .send_delayed(&queue, later.clone(), Delay::For(Duration::from_secs(10)))
        .await
        .unwrap();

    let raw = async_nats::jetstream::new(broker.client().clone());
    let subject = broker.queue_subject(&queue).replacen(".q.", ".d.q.", 1);
    for (body, due) in [
        ("none", None),
        ("garbage", Some("soon")),
        ("negative", Some("-1")),
    ] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "ce-id",
            format!("foreign-{body}-{}", MessageId::new()).as_str(),
        );
        headers.insert("ce-type", "foreign");
        if let Some(due) = due {
            headers.insert(DUE, due);
        }
        raw.publish_with_headers(subject.clone(), headers, body.into())
            .await
            .expect("raw publish")
            .await
            .expect("stored on the delayed stream");
    }
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let d = next(&mut consumer).await;
        assert_eq!(
            d.envelope().kind,
            "foreign",
            "a foreign message without a due time waited behind a delayed one"
        );
        assert_eq!(d.attempt(), 1);
        bodies.push(String::from_utf8(d.envelope().payload.to_vec()).unwrap());
        d.ack().await.unwrap();
    }
    bodies.sort();
    assert_eq!(bodies, ["garbage", "negative", "none"]);
    let d = next(&mut consumer).await;
    assert_eq!(d.envelope().id, later.id);
    d.ack().await.unwrap();
    consumer.close().await.unwrap();
    let _ = raw.delete_stream(broker.queue_stream(&queue)).await;
    broker.close().await.unwrap();
    let _ = raw.delete_stream(format!("{prefix}-delayed")).await;
}
