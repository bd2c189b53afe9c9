//! What is specific to the memory broker's backlog counts and delayed publish: exact counts
//! split into waiting, in flight and delayed; a delayed message holding no later message of
//! its key back; private groups getting delayed messages. The contract itself is in the
//! conformance cases `backlog_counts_what_waits` and `delayed_publish_arrives_after_delay`.

use std::time::Duration;

use adapter_memory::MemoryBroker;
use bus_core::{
    BacklogOf, Broker, Delay, Envelope, ErrorKind, Publisher, Queue, Redeliver, SubscribeOptions,
    Subscriber, Subscription, Support,
};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(5);

async fn next(sub: &mut Subscription) -> bus_core::Delivery {
    tokio::time::timeout(WAIT * 100, sub.next())
        .await
        .expect("a delivery in time")
        .expect("the subscription is open")
        .expect("a delivery, not an error")
}

#[tokio::test(start_paused = true)]
async fn backlog_splits_waiting_in_flight_and_delayed_exactly() {
    let broker = MemoryBroker::new();
    let caps = broker.capabilities();
    assert_eq!(caps.backlog, Support::Native);
    assert_eq!(caps.delayed_publish, Support::Native);
    assert_eq!(caps.max_delay, None);

    let of = BacklogOf::group("t", "g");
    let err = broker.backlog(&of).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let err = broker
        .backlog(&BacklogOf::queue("nothing"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    let mut sub = broker
        .subscribe("t", SubscribeOptions::group("g"))
        .await
        .unwrap();
    for i in 0..3 {
        broker
            .publish("t", Envelope::new("n", format!("{i}")))
            .await
            .unwrap();
    }
    broker
        .publish_delayed(
            "t",
            Envelope::new("n", "later"),
            Delay::For(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    let backlog = broker.backlog(&of).await.unwrap();
    assert_eq!(
        (backlog.waiting, backlog.in_flight, backlog.delayed),
        (3, Some(0), Some(1))
    );
    assert!(!backlog.approximate);
    assert!(backlog.partitions.is_empty());
    assert_eq!(backlog.oldest_age, Some(Duration::from_secs(2)));

    // One delivered and unsettled, one nacked with a delay.
    let held = next(&mut sub).await;
    let nacked = next(&mut sub).await;
    nacked
        .nack(Redeliver::After(Duration::from_secs(30)))
        .await
        .unwrap();
    let backlog = broker.backlog(&of).await.unwrap();
    assert_eq!(
        (backlog.waiting, backlog.in_flight, backlog.delayed),
        (1, Some(1), Some(2))
    );
    assert_eq!(backlog.total(), 4);
    held.ack().await.unwrap();

    // Everything comes once due; then nothing is left.
    for _ in 0..3 {
        next(&mut sub).await.ack().await.unwrap();
    }
    let backlog = broker.backlog(&of).await.unwrap();
    assert_eq!(backlog.total(), 0, "{backlog:?}");
    assert_eq!(backlog.oldest_age, None);
}

#[tokio::test(start_paused = true)]
async fn a_delayed_message_holds_no_later_message_of_its_key_back() {
    let broker = MemoryBroker::new();
    let mut sub = broker
        .subscribe("t", SubscribeOptions::group("g"))
        .await
        .unwrap();
    let started = Instant::now();
    let delayed = Envelope::new("n", "later").with_key("k");
    broker
        .publish_delayed("t", delayed.clone(), Delay::For(Duration::from_secs(60)))
        .await
        .unwrap();
    let plain = Envelope::new("n", "now").with_key("k");
    broker.publish("t", plain.clone()).await.unwrap();

    let first = next(&mut sub).await;
    assert_eq!(first.envelope().id, plain.id);
    assert!(started.elapsed() < Duration::from_secs(60));
    first.ack().await.unwrap();
    let second = next(&mut sub).await;
    assert_eq!(second.envelope().id, delayed.id);
    assert_eq!(second.attempt(), 1);
    assert!(started.elapsed() >= Duration::from_secs(60));
    second.ack().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn private_groups_and_queues_get_delayed_messages_when_due() {
    let broker = MemoryBroker::new();
    let mut private = broker
        .subscribe("t", SubscribeOptions::default())
        .await
        .unwrap();
    let mut group = broker
        .subscribe("t", SubscribeOptions::group("g"))
        .await
        .unwrap();
    let started = Instant::now();
    let delayed = Envelope::new("n", "later");
    broker
        .publish_delayed("t", delayed.clone(), Delay::For(Duration::from_secs(10)))
        .await
        .unwrap();
    for sub in [&mut private, &mut group] {
        let d = next(sub).await;
        assert_eq!(d.envelope().id, delayed.id);
        assert!(started.elapsed() >= Duration::from_secs(10));
        d.ack().await.unwrap();
    }

    // A moment already passed is due at once.
    let mut consumer = broker.consume("q", Default::default()).await.unwrap();
    let past = std::time::SystemTime::now() - Duration::from_secs(5);
    let envelope = Envelope::new("n", "overdue");
    broker
        .send_delayed("q", envelope.clone(), Delay::Until(past))
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    assert_eq!(d.envelope().id, envelope.id);
    d.ack().await.unwrap();
    assert_eq!(
        broker
            .backlog(&BacklogOf::queue("q"))
            .await
            .unwrap()
            .total(),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn the_longest_delays_are_held_not_refused_and_never_panic() {
    let broker = MemoryBroker::new();
    let mut consumer = broker.consume("q", Default::default()).await.unwrap();
    broker
        .send_delayed("q", Envelope::new("n", "never"), Delay::For(Duration::MAX))
        .await
        .unwrap();
    let far = std::time::SystemTime::now() + Duration::from_secs(200 * 365 * 86_400);
    broker
        .send_delayed("q", Envelope::new("n", "much later"), Delay::Until(far))
        .await
        .unwrap();
    let now = Envelope::new("n", "now");
    broker.send("q", now.clone()).await.unwrap();
    let d = next(&mut consumer).await;
    assert_eq!(d.envelope().id, now.id);
    d.ack().await.unwrap();
    let backlog = broker.backlog(&BacklogOf::queue("q")).await.unwrap();
    assert_eq!((backlog.waiting, backlog.delayed), (0, Some(2)));
    // A year on, both still wait.
    assert!(
        tokio::time::timeout(Duration::from_secs(365 * 86_400), consumer.next())
            .await
            .is_err()
    );
}
