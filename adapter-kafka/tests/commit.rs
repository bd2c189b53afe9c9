//! Commits count only once the broker confirmed them: an ack whose commit was lost with the
//! broker is committed once the broker is back.
//!
//! Runs on a tansu of its own (port 19093, SQLite storage, see `support`), which it kills and
//! starts again, when `BUS_TEST_KAFKA_URL` is set and `tansu` is installed.

mod support;

use std::time::Duration;

use adapter_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use adapter_kafka::rdkafka::{ClientConfig, Offset, TopicPartitionList};
use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::{Broker, Envelope, Publisher, SubscribeOptions, Subscriber};

const PORT: u16 = 19093;
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The offset `group` has committed on partition 0 of `topic`, as another client reads it.
fn committed(bootstrap: &str, group: &str, topic: &str) -> Option<i64> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .ok()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let answer = reader.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
    match answer.find_partition(topic, 0)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// The commit of an ack made while the broker hangs reaches the broker once it is back, and
/// the message is not read again. (On tansu this passes with asynchronous commits too:
/// librdkafka holds a commit while the coordinator is away, and tansu never refuses one for a
/// stale generation. `subscriber::broker_tests::a_commit_counts_only_once_the_broker_confirmed_it`
/// shows a refused commit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_lost_with_the_broker_is_sent_again_when_it_is_back() {
    let Some(binary) = support::required_binary() else {
        return;
    };
    let mut tansu = support::Tansu::start(binary, PORT).await;
    let bootstrap = tansu.bootstrap();
    let config = KafkaConfig::new(bootstrap.clone())
        .with_client_id("bus-commit-test")
        .with_partitions(1)
        .with_session_timeout_ms(SESSION_TIMEOUT.as_millis() as u64);
    let broker = KafkaBroker::connect(config).await.expect("connect");
    let topic = format!("commit.{}", uuid::Uuid::now_v7().simple());
    let group = format!("{topic}.g");
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group(&group))
        .await
        .expect("subscribe");
    let first = Envelope::new("commit.item", "first");
    broker
        .publish(&topic, first.clone())
        .await
        .expect("publish");
    let delivery = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("the message arrives")
        .expect("subscription open")
        .expect("a delivery");
    assert_eq!(delivery.envelope().id, first.id);

    // The broker hangs with the commit of the ack in flight, then dies: librdkafka fails that
    // commit (after its own retries) with a transport error. The outage stays well within the
    // session timeout, so the partition stays assigned.
    tansu.freeze();
    delivery.ack().await.expect("ack");
    tokio::time::sleep(Duration::from_secs(1)).await;
    tansu.kill().await;
    tansu.up().await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let offset = tokio::task::spawn_blocking({
            let (bootstrap, group, topic) = (bootstrap.clone(), group.clone(), topic.clone());
            move || committed(&bootstrap, &group, &topic)
        })
        .await
        .unwrap();
        if offset == Some(1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the acked message's offset was never committed: the group's offset is {offset:?}, \
             60 s after the broker came back"
        );
        // Meanwhile the acked message must not come again.
        if let Ok(Some(Ok(again))) =
            tokio::time::timeout(Duration::from_millis(500), sub.next()).await
        {
            panic!(
                "the message acked before the outage came again (attempt {})",
                again.attempt()
            );
        }
    }
    sub.close().await.expect("close");
    broker.close().await.expect("close");
}
