//! What is RabbitMQ's own in backlog counts and delayed publish, beyond the conformance cases:
//! a delayed message lives in the broker (it survives the publisher's connection and reaches
//! a group whose consumer comes back later, and a private subscription), a delay between two
//! buckets of the retry ladder is kept, messages parked in retry queues are not counted as
//! waiting, quorum queues are counted too, and an unknown queue is `NotFound`.
//!
//! Needs `BUS_TEST_RABBITMQ_URL`; skipped without it (failed with `BUS_REQUIRE_BROKERS=1`).

use std::time::Duration;

use adapter_rabbitmq::lapin::options::QueueDeleteOptions;
use adapter_rabbitmq::lapin::{Connection, ConnectionProperties};
use adapter_rabbitmq::{RabbitMqBroker, RabbitMqConfig};
use bus_core::conformance::broker_url;
use bus_core::{
    BacklogOf, Broker, ConsumeOptions, Delay, Delivery, Envelope, ErrorKind, MessageId, Publisher,
    Queue, Redeliver, SubscribeOptions, Subscriber, Subscription,
};
use tokio::time::{timeout, Instant};

const DELAY: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(20);

fn unique(what: &str) -> String {
    format!("test.ops.{what}.{}", MessageId::new())
}

async fn connect(url: &str, quorum: bool) -> RabbitMqBroker {
    RabbitMqBroker::with_config(
        RabbitMqConfig::new(url)
            .with_connection_name("bus-operations-test")
            .with_quorum_queues(quorum)
            .with_queue_expires(Duration::from_secs(600)),
    )
    .await
    .expect("connect to the test RabbitMQ")
}

/// Deletes `queues` with a plain client (what the tests leave behind).
async fn delete(url: &str, queues: &[String]) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("plain connection");
    for queue in queues {
        let channel = connection.create_channel().await.expect("channel");
        let _ = channel
            .queue_delete(queue, QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "done").await;
}

/// The next delivery of `sub`, within [`WAIT`]; `what` names it if none comes.
async fn next_delivery(sub: &mut Subscription, what: &str) -> Delivery {
    timeout(WAIT, sub.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
        .expect("open")
        .expect("a delivery")
}

#[tokio::test]
async fn a_delayed_message_waits_in_the_broker_not_in_the_publisher() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let topic = unique("delayed");
    let group = "g1";
    // The group exists, and nobody of it is connected while the message waits.
    let publisher = connect(&url, false).await;
    let mut first = publisher
        .subscribe(&topic, SubscribeOptions::group(group))
        .await
        .expect("subscribe");
    first.close().await.expect("close the group's first member");
    let sent = Envelope::new("ops.delayed", "later").with_header("x-test", "kept");
    let published_at = Instant::now();
    publisher
        .publish_delayed(&topic, sent.clone(), Delay::For(DELAY))
        .await
        .expect("publish_delayed");
    // The publisher's connection goes away before the message is due.
    publisher.close().await.expect("close the publisher");

    let consumer = connect(&url, false).await;
    let mut private = consumer
        .subscribe(&topic, SubscribeOptions::default())
        .await
        .expect("private subscription");
    let mut member = consumer
        .subscribe(&topic, SubscribeOptions::group(group))
        .await
        .expect("the group again");
    for (sub, what) in [
        (&mut member, "the group"),
        (&mut private, "a private subscription"),
    ] {
        let d = next_delivery(sub, what).await;
        assert!(
            published_at.elapsed() >= DELAY,
            "{what} got the message {:?} after it was published, before its delay",
            published_at.elapsed()
        );
        assert_eq!(d.envelope().id, sent.id, "{what}");
        assert_eq!(d.envelope().header("x-test"), Some("kept"), "{what}");
        assert_eq!(d.attempt(), 1, "{what}: the delay is no delivery attempt");
        d.ack().await.expect("ack");
    }
    member.close().await.expect("close");
    private.close().await.expect("close");
    consumer.close().await.expect("close");
    delete(&url, &[format!("{topic}@{group}")]).await;
}

#[tokio::test]
async fn parked_messages_are_not_waiting() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let broker = connect(&url, false).await;
    let queue = unique("parked");
    let of = BacklogOf::queue(&queue);
    // One nacked with a delay, one sent with a delay, one waiting.
    broker
        .send(&queue, Envelope::new("ops.nacked", "1"))
        .await
        .expect("send");
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let d = next_delivery(&mut consumer, "the message to nack").await;
    d.nack(Redeliver::After(Duration::from_secs(600)))
        .await
        .expect("nack");
    consumer.close().await.expect("close");
    broker
        .send_delayed(
            &queue,
            Envelope::new("ops.delayed", "2"),
            Delay::For(Duration::from_secs(3600)),
        )
        .await
        .expect("send_delayed");
    broker
        .send(&queue, Envelope::new("ops.waiting", "3"))
        .await
        .expect("send");
    let backlog = broker.backlog(&of).await.expect("backlog");
    // The two parked ones are not waiting, and not counted elsewhere.
    assert_eq!(backlog.waiting, 1, "{backlog:?}");
    assert_eq!(
        (backlog.in_flight, backlog.delayed, backlog.oldest_age),
        (None, None, None),
        "{backlog:?}"
    );
    assert!(
        !backlog.approximate && backlog.partitions.is_empty(),
        "{backlog:?}"
    );

    let unknown = broker
        .backlog(&BacklogOf::queue(unique("nobody")))
        .await
        .expect_err("a queue that does not exist");
    assert_eq!(unknown.kind(), ErrorKind::NotFound, "{unknown}");
    let unknown = broker
        .backlog(&BacklogOf::group(unique("nobody"), "g"))
        .await
        .expect_err("a group that never subscribed");
    assert_eq!(unknown.kind(), ErrorKind::NotFound, "{unknown}");
    broker.close().await.expect("close");
    delete(
        &url,
        &[
            queue.clone(),
            format!("bus.retry.600000ms.{queue}"),
            format!("bus.retry.3600000ms.{queue}"),
        ],
    )
    .await;
}

#[tokio::test]
async fn quorum_queues_are_counted_and_delay() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let broker = connect(&url, true).await;
    let queue = unique("quorum");
    for i in 0..3 {
        broker
            .send(&queue, Envelope::new("ops.quorum", format!("{i}")))
            .await
            .expect("send");
    }
    let backlog = broker
        .backlog(&BacklogOf::queue(&queue))
        .await
        .expect("backlog");
    assert_eq!(backlog.waiting, 3, "{backlog:?}");

    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let sent = Envelope::new("ops.quorum.delayed", "later");
    let sent_at = Instant::now();
    broker
        .send_delayed(&queue, sent.clone(), Delay::For(DELAY))
        .await
        .expect("send_delayed");
    let mut seen = 0;
    loop {
        let d = next_delivery(&mut consumer, "the quorum queue").await;
        if d.envelope().id == sent.id {
            assert!(sent_at.elapsed() >= DELAY, "{:?}", sent_at.elapsed());
            assert_eq!(
                seen, 3,
                "the delayed message came before those sent at once"
            );
            assert_eq!(d.attempt(), 1, "quorum queues count deliveries, not delays");
            d.ack().await.expect("ack");
            break;
        }
        seen += 1;
        d.ack().await.expect("ack");
    }
    consumer.close().await.expect("close");
    broker.close().await.expect("close");
    delete(&url, &[queue.clone(), format!("bus.retry.2000ms.{queue}")]).await;
}

#[tokio::test]
async fn a_delay_between_two_buckets_is_not_rounded_up() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    // 3.1 s lies between the buckets of 3 s and 5 s: parked in the 5 s one, it expires on
    // time by its own expiration.
    const BETWEEN: Duration = Duration::from_millis(3_100);
    const BUCKET: Duration = Duration::from_secs(5);
    let broker = connect(&url, false).await;
    let topic = unique("between");
    let queue = unique("between.q");
    let mut member = broker
        .subscribe(&topic, SubscribeOptions::group("g1"))
        .await
        .expect("subscribe");
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let started = Instant::now();
    broker
        .publish_delayed(&topic, Envelope::new("ops.t", "t"), Delay::For(BETWEEN))
        .await
        .expect("publish_delayed");
    broker
        .send_delayed(&queue, Envelope::new("ops.q", "q"), Delay::For(BETWEEN))
        .await
        .expect("send_delayed");
    for (sub, what) in [(&mut member, "topic"), (&mut consumer, "queue")] {
        let d = next_delivery(sub, what).await;
        let elapsed = started.elapsed();
        assert!(
            elapsed >= BETWEEN,
            "{what}: arrived after {elapsed:?}, before its delay"
        );
        assert!(
            elapsed < BUCKET,
            "{what}: arrived after {elapsed:?}, at the end of its bucket rather than when due"
        );
        assert_eq!(d.attempt(), 1);
        d.ack().await.expect("ack");
    }
    member.close().await.expect("close");
    consumer.close().await.expect("close");
    broker.close().await.expect("close");
    delete(
        &url,
        &[
            format!("{topic}@g1"),
            queue.clone(),
            format!("bus.retry.5000ms.{queue}"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_due_message_waits_in_a_group_nobody_reads() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    // Its expiration ends its wait in the delay queue only: RabbitMQ removes it when it
    // dead-letters the message, which then waits in the group's queue as long as it takes.
    let broker = connect(&url, false).await;
    let topic = unique("unread");
    let mut first = broker
        .subscribe(&topic, SubscribeOptions::group("g1"))
        .await
        .expect("subscribe");
    first.close().await.expect("close");
    let delay = Duration::from_millis(500);
    broker
        .publish_delayed(&topic, Envelope::new("ops.unread", "x"), Delay::For(delay))
        .await
        .expect("publish_delayed");
    let of = BacklogOf::group(&topic, "g1");
    let deadline = Instant::now() + WAIT;
    let due_at = loop {
        let backlog = broker.backlog(&of).await.expect("backlog");
        if backlog.waiting == 1 {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "never due: {backlog:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Twice its expiration later it is still there.
    tokio::time::sleep_until(due_at + 2 * delay).await;
    let backlog = broker.backlog(&of).await.expect("backlog");
    assert_eq!(backlog.waiting, 1, "{backlog:?}");
    broker.close().await.expect("close");
    delete(&url, &[format!("{topic}@g1")]).await;
}

/// `try_next` hands out what lapin has buffered (up to the prefetch) in queue order, without
/// waiting; each delivery settles as one from `next` does; nothing buffered, or a closed
/// broker, is `None`.
#[tokio::test]
async fn try_next_takes_what_lapin_has_buffered_in_order() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let broker = connect(&url, false).await;
    let topic = unique("try-next");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("g1").with_prefetch(8))
        .await
        .expect("subscribe");
    assert!(sub.try_next().is_none(), "nothing published yet");
    let sent: Vec<Envelope> = (0..6)
        .map(|i| Envelope::new("ops.try_next", format!("m{i}")).with_key("k"))
        .collect();
    for envelope in &sent {
        broker
            .publish(&topic, envelope.clone())
            .await
            .expect("publish");
    }
    // The first through `next`, which waits; the rest as lapin buffers them.
    let first = next_delivery(&mut sub, "the first message").await;
    let mut taken = vec![first];
    let deadline = Instant::now() + WAIT;
    while taken.len() < sent.len() {
        assert!(Instant::now() < deadline, "only {} buffered", taken.len());
        match sub.try_next() {
            Some(delivery) => taken.push(delivery.expect("a delivery, not an error")),
            // Not buffered yet: on their way from the broker.
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    let ids: Vec<_> = taken.iter().map(|d| d.envelope().id.clone()).collect();
    let want: Vec<_> = sent.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, want, "queue order");
    assert!(sub.try_next().is_none(), "nothing more was sent");
    for delivery in taken {
        delivery.ack().await.expect("ack");
    }
    // Closing the connection requeues whatever it had not acked: nothing may be left. The
    // subscription, still open, hands out nothing once its broker is closed.
    broker.close().await.expect("close the broker");
    assert!(sub.try_next().is_none(), "the broker is closed");
    sub.close().await.expect("close");
    let again = connect(&url, false).await;
    let backlog = again
        .backlog(&BacklogOf::group(&topic, "g1"))
        .await
        .expect("backlog");
    assert_eq!(backlog.waiting, 0, "every message acked: {backlog:?}");
    again.close().await.expect("close");
    delete(&url, &[format!("{topic}@g1")]).await;
}
