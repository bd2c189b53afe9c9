//! Tests of the consumer against the test broker (`BUS_TEST_KAFKA_URL`) that need the crate's
//! insides: the group a private subscription uses, the retry copies held in memory, and the
//! one failure seam ([`Faults`](crate::broker::Faults)) that makes offset fetches time out
//! as a slow broker's would. Skipped when `BUS_TEST_KAFKA_URL` is not set.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::conformance::broker_url;
use bus_core::{
    Broker, ConsumeOptions, Envelope, MessageId, Publisher, Queue, Redeliver, Requester, Responder,
    ServeOptions, SubscribeOptions, Subscriber, Subscription,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use tokio::sync::watch;

use super::{commit, lock, open, Ctx, KafkaSource, PartState, SharedState, Start};
use crate::offsets::OffsetTracker;
use crate::{KafkaBroker, KafkaConfig};

async fn connect(configure: impl FnOnce(KafkaConfig) -> KafkaConfig) -> Option<KafkaBroker> {
    let url = broker_url("BUS_TEST_KAFKA_URL")?;
    let config = KafkaConfig::from_url(&url)
        .expect("BUS_TEST_KAFKA_URL is a kafka:// URL")
        .with_client_id("bus-unit-test")
        .with_partitions(1);
    Some(
        KafkaBroker::connect(configure(config))
            .await
            .expect("connect to the test broker"),
    )
}

fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", uuid::Uuid::now_v7().simple())
}

fn items(n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| Envelope::new("unit.item", format!("{i}")))
        .collect()
}

/// Receives `n` deliveries and acks them; their ids.
async fn take(sub: &mut Subscription, n: usize) -> Vec<MessageId> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages arrived", ids.len()))
            .expect("subscription open")
            .expect("a delivery");
        ids.push(d.envelope().id.clone());
        d.ack().await.expect("ack");
    }
    ids
}

/// Before the fix a failed fetch of the committed offsets read as "never committed": the
/// topic group jumped to the end of the partition and committed it, skipping for good what
/// was published while it had no member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_offset_fetch_never_moves_a_topic_group_to_the_end() {
    let Some(broker) = connect(|c| c).await else {
        return;
    };
    let topic = unique("unit.fetch.topic");
    let group = format!("{topic}.g");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    broker.publish_batch(&topic, items(3)).await.unwrap();
    take(&mut sub, 3).await;
    sub.close().await.unwrap();

    let missed = items(2);
    broker.publish_batch(&topic, missed.clone()).await.unwrap();
    broker
        .shared
        .faults
        .offset_fetch_timeouts
        .store(3, Ordering::SeqCst);
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .unwrap();
    let got = take(&mut sub, 2).await;
    let want: Vec<MessageId> = missed.iter().map(|e| e.id.clone()).collect();
    assert_eq!(got, want);
    assert_eq!(
        broker
            .shared
            .faults
            .offset_fetch_timeouts
            .load(Ordering::SeqCst),
        0,
        "the three failing fetches were made"
    );
    sub.close().await.unwrap();
    broker.close().await.unwrap();
}

/// Before the fix a failed fetch of the committed offsets sent a queue group back to the
/// beginning: every message acked before came again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_offset_fetch_never_moves_a_queue_group_to_the_beginning() {
    let Some(broker) = connect(|c| c).await else {
        return;
    };
    let queue = unique("unit.fetch.queue");
    broker.publish_batch(&queue, items(3)).await.unwrap();
    let mut jobs = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .unwrap();
    take(&mut jobs, 3).await;
    jobs.close().await.unwrap();

    let later = items(2);
    broker.publish_batch(&queue, later.clone()).await.unwrap();
    broker
        .shared
        .faults
        .offset_fetch_timeouts
        .store(3, Ordering::SeqCst);
    let mut jobs = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .unwrap();
    let got = take(&mut jobs, 2).await;
    let want: Vec<MessageId> = later.iter().map(|e| e.id.clone()).collect();
    assert_eq!(got, want, "messages acked before came again");
    jobs.close().await.unwrap();
    broker.close().await.unwrap();
}

/// Before the fix every retry copy waiting for its time was held in memory, however many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_retry_copies_are_bounded_and_all_come_back() {
    const BOUND: usize = 8;
    const COUNT: usize = 40;
    let Some(broker) = connect(|c| c.with_max_delayed(BOUND)).await else {
        return;
    };
    let topic = unique("unit.delayed");
    let spec = broker.subscribe_spec(&topic, SubscribeOptions::group(format!("{topic}.g")));
    let mut source: KafkaSource = open(&broker.shared, spec).await.unwrap();
    let sent = items(COUNT);
    broker.publish_batch(&topic, sent.clone()).await.unwrap();
    for _ in 0..COUNT {
        let (d, _) = tokio::time::timeout(Duration::from_secs(30), source.next_item())
            .await
            .expect("first deliveries in time")
            .expect("open");
        d.nack(Redeliver::After(Duration::from_secs(2)))
            .await
            .expect("nack");
    }
    let mut again = HashSet::new();
    while again.len() < COUNT {
        let (d, _) = tokio::time::timeout(Duration::from_secs(60), source.next_item())
            .await
            .unwrap_or_else(|_| panic!("only {} of {COUNT} retries came back", again.len()))
            .expect("open");
        assert_eq!(d.attempt(), 2);
        again.insert(d.envelope().id.clone());
        d.ack().await.unwrap();
    }
    let peak = lock(&source.state).peak_delayed;
    assert!(
        peak <= BOUND,
        "{peak} delayed retry copies were held at once; the bound is {BOUND}"
    );
    source.shut_down().await;
    broker.close().await.unwrap();
}

/// The offset `group` committed on partition 0 of `topic`, as another client reads it.
fn committed(bootstrap: &str, group: &str, topic: &str) -> Option<i64> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let answer = client
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    match answer.find_partition(topic, 0)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// The names of the topics the broker knows.
fn topics(bootstrap: &str) -> HashSet<String> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    client
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata")
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .collect()
}

/// Before the fix a subscription without a group left its `bus.private.*` group and its
/// committed offsets on the broker (until `offsets.retention.minutes`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_group_is_deleted_when_its_subscription_closes() {
    let Some(broker) = connect(|c| c).await else {
        return;
    };
    let bootstrap = broker.shared.config.bootstrap_servers.clone();
    let topic = unique("unit.private");
    let spec = broker.subscribe_spec(&topic, SubscribeOptions::default());
    let group = spec.group.clone();
    assert!(group.starts_with("bus.private."), "{group}");
    let mut source = open(&broker.shared, spec).await.unwrap();
    let read = {
        let (bootstrap, group, topic) = (bootstrap.clone(), group.clone(), topic.clone());
        move || committed(&bootstrap, &group, &topic)
    };
    let offset = tokio::task::spawn_blocking(read.clone()).await.unwrap();
    assert_eq!(offset, Some(0), "{group} committed its start while open");
    source.shut_down().await;
    let offset = tokio::task::spawn_blocking(read).await.unwrap();
    assert_eq!(
        offset, None,
        "{group} (its offsets) is still there after close"
    );
    broker.close().await.unwrap();
}

/// Before the fix a connection's reply topic `bus.replies.*` stayed on the broker after the
/// connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_topic_is_deleted_when_its_connection_closes() {
    let (Some(requester), Some(responder)) = (connect(|c| c).await, connect(|c| c).await) else {
        return;
    };
    let bootstrap = requester.shared.config.bootstrap_servers.clone();
    let topic = unique("unit.reply");
    let mut requests = responder
        .serve(&topic, ServeOptions::default())
        .await
        .unwrap();
    let serving = tokio::spawn(async move {
        if let Some(Ok(request)) = requests.next().await {
            let answer = Envelope::new("unit.answer", "pong");
            request.reply(answer).await.unwrap();
        }
        requests.close().await.unwrap();
    });
    let reply = requester
        .request(
            &topic,
            Envelope::new("unit.question", "ping"),
            Duration::from_secs(30),
        )
        .await
        .expect("a reply");
    assert_eq!(&reply.payload[..], b"pong");
    serving.await.unwrap();
    let reply_topic = requester.inbox.topic_name().unwrap().to_owned();
    let listed = {
        let bootstrap = bootstrap.clone();
        tokio::task::spawn_blocking(move || topics(&bootstrap))
            .await
            .unwrap()
    };
    assert!(listed.contains(&reply_topic), "{reply_topic} while open");
    requester.close().await.unwrap();
    let listed = tokio::task::spawn_blocking(move || topics(&bootstrap))
        .await
        .unwrap();
    assert!(
        !listed.contains(&reply_topic),
        "{reply_topic} is still there after close"
    );
    responder.close().await.unwrap();
}

/// Before the fix the consumer's periodic commit was asynchronous and counted as committed as
/// soon as it was sent: one the broker refused (here: for a topic it does not know yet,
/// `UNKNOWN_TOPIC_OR_PARTITION`; on Kafka also a commit lost in a rebalance) was never sent
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_counts_only_once_the_broker_confirmed_it() {
    let Some(broker) = connect(|c| c).await else {
        return;
    };
    let topic = unique("unit.commit");
    let group = format!("{topic}.g");
    let state: SharedState = Arc::default();
    {
        let mut state = lock(&state);
        let mut tracker = OffsetTracker::starting_at(Some(0));
        tracker.track(0);
        tracker.settle(0);
        state.parts.entry(topic.clone()).or_default().insert(
            0,
            PartState {
                epoch: 1,
                tracker,
                floor: 0,
            },
        );
    }
    let ctx = Ctx {
        state: state.clone(),
        start: Start::Latest,
        rewind: 0,
        assigned: watch::channel(0).0,
        shared: broker.shared.clone(),
        stop: Arc::default(),
        auth: crate::oauth::Auth::default(),
    };
    let consumer: BaseConsumer<Ctx> = broker
        .shared
        .config
        .consumer_config(&group)
        .unwrap()
        .create_with_context(ctx)
        .unwrap();
    let consumer = Arc::new(consumer);
    let commit_now = |consumer: Arc<BaseConsumer<Ctx>>, state: SharedState| {
        tokio::task::spawn_blocking(move || {
            commit(&consumer, &state);
            lock(&state).to_commit().count()
        })
    };

    // The topic does not exist yet: the broker refuses the commit.
    let left = commit_now(consumer.clone(), state.clone()).await.unwrap();
    assert_eq!(
        left, 1,
        "a commit the broker refused counted as committed (and would never be sent again)"
    );

    // Once the topic exists the same commit goes through, and then counts.
    broker.shared.ensure_topics(&[&topic], None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while commit_now(consumer.clone(), state.clone()).await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "the commit never went through");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bootstrap = broker.shared.config.bootstrap_servers.clone();
    let offset = tokio::task::spawn_blocking(move || committed(&bootstrap, &group, &topic))
        .await
        .unwrap();
    assert_eq!(offset, Some(1));
    broker.close().await.unwrap();
}
