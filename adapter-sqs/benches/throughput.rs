//! Throughput of the SQS adapter against the plain AWS SDK, on the same server in one run.
//!
//! Both sides run the same workload: a topic (SNS) fanned out to one group queue (SQS, raw
//! delivery); `BUS_BENCH_MESSAGES` messages of 256 bytes, with the same six CloudEvents
//! attributes (`ce-id`, `ce-type`, …), published with `PublishBatch` (10 per call, 8
//! publishing tasks), then received with 2 long-polling loops of 10 per call and deleted with
//! `DeleteMessageBatch`.
//!
//! For larger counts use ministack (`pip install ministack`; `BIND_HOST=127.0.0.1
//! GATEWAY_PORT=4567 SERVICES=sqs,sns ministack`), e.g. `BUS_BENCH_MESSAGES=10000
//! BUS_TEST_SQS_URL='sqs://127.0.0.1:4567?region=us-east-1'`.
//!
//! ```text
//! BUS_TEST_SQS_URL='sqs://127.0.0.1:4566?region=us-east-1' \
//!     cargo bench -p adapter-sqs --bench throughput
//! ```
//!
//! The default is 500 messages, not the contract's 100,000: moto scans a whole queue on every
//! send and slows sharply as a queue fills (docs/adapters/sqs.md). The count is printed.
//! `BUS_BENCH_ROUNDS` rounds (default 3) alternate which client goes first; the table shows the
//! median and the range of each figure, and the last line is `ratio publish=<bus/raw>
//! consume=<bus/raw>` (medians of the per-round ratios).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use adapter_sqs::aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use adapter_sqs::aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, QueueAttributeName};
use adapter_sqs::{SqsBroker, SqsConfig};
use bus_core::conformance::bench::{env_number, print_ratios, ratios, spread};
use bus_core::{Broker, Envelope, Publisher, SubscribeOptions, Subscriber};
use tokio::sync::Mutex;

const PAYLOAD: usize = 256;
const PUBLISHERS: usize = 8;
const BATCH: usize = 10;

struct Run {
    publish: Duration,
    consume: Duration,
}

fn rate(count: usize, took: Duration) -> (f64, f64) {
    let secs = took.as_secs_f64().max(1e-9);
    let msgs = count as f64 / secs;
    (msgs, msgs * PAYLOAD as f64 / 1_000_000.0)
}

async fn through_bus(config: SqsConfig, count: usize) -> Run {
    let broker = SqsBroker::connect_with(config).await.expect("connect");
    let topic = format!("bench.bus.{}", uuid::Uuid::now_v7());
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::group("bench").with_prefetch(100))
        .await
        .expect("subscribe");
    let payload = vec![b'x'; PAYLOAD];
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let (broker, topic, payload) = (broker.clone(), topic.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mine: Vec<usize> = (p..count).step_by(PUBLISHERS).collect();
            for chunk in mine.chunks(BATCH) {
                let batch = chunk
                    .iter()
                    .map(|_| Envelope::new("bench", payload.clone()))
                    .collect();
                broker.publish_batch(&topic, batch).await.expect("publish");
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    let publish = start.elapsed();
    let start = Instant::now();
    let mut seen = HashSet::new();
    while seen.len() < count {
        let d = tokio::time::timeout(Duration::from_secs(60), sub.next())
            .await
            .expect("messages keep coming")
            .expect("open")
            .expect("delivery");
        seen.insert(d.envelope().id.clone());
        // Acks go out in DeleteMessageBatch calls; do not wait for each one.
        tokio::spawn(async move {
            let _ = d.ack().await;
        });
    }
    let consume = start.elapsed();
    sub.close().await.ok();
    broker.close().await.ok();
    Run { publish, consume }
}

async fn through_sdk(broker: &SqsBroker, count: usize) -> Run {
    let (sqs, sns) = (broker.sqs_client().clone(), broker.sns_client().clone());
    let name = format!("bench-raw-{}", uuid::Uuid::now_v7().simple());
    let topic_arn = sns
        .create_topic()
        .name(&name)
        .send()
        .await
        .expect("topic")
        .topic_arn()
        .unwrap()
        .to_owned();
    let url = sqs
        .create_queue()
        .queue_name(&name)
        .send()
        .await
        .expect("queue")
        .queue_url()
        .unwrap()
        .to_owned();
    let arn = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("arn")
        .attributes()
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    sns.subscribe()
        .topic_arn(&topic_arn)
        .protocol("sqs")
        .endpoint(&arn)
        .attributes("RawMessageDelivery", "true")
        .send()
        .await
        .expect("subscribe");
    let body = "x".repeat(PAYLOAD);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let (sns, topic_arn, body) = (sns.clone(), topic_arn.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mine: Vec<usize> = (p..count).step_by(PUBLISHERS).collect();
            for chunk in mine.chunks(BATCH) {
                let entries = chunk
                    .iter()
                    .map(|i| {
                        // The same information bus sends: CloudEvents attributes.
                        let id = uuid::Uuid::now_v7().to_string();
                        let time = bus_core::headers::format_time(std::time::SystemTime::now());
                        let mut entry = PublishBatchRequestEntry::builder()
                            .id(i.to_string())
                            .message(&body);
                        for (name, value) in [
                            ("ce-specversion", "1.0"),
                            ("ce-id", id.as_str()),
                            ("ce-source", "bench"),
                            ("ce-type", "bench"),
                            ("ce-time", time.as_str()),
                            ("correlationid", id.as_str()),
                        ] {
                            entry = entry.message_attributes(
                                name,
                                MessageAttributeValue::builder()
                                    .data_type("String")
                                    .string_value(value)
                                    .build()
                                    .unwrap(),
                            );
                        }
                        entry.build().unwrap()
                    })
                    .collect();
                sns.publish_batch()
                    .topic_arn(&topic_arn)
                    .set_publish_batch_request_entries(Some(entries))
                    .send()
                    .await
                    .expect("publish");
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    let publish = start.elapsed();
    let start = Instant::now();
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let mut pollers = Vec::new();
    for _ in 0..2 {
        let (sqs, url, seen) = (sqs.clone(), url.clone(), seen.clone());
        pollers.push(tokio::spawn(async move {
            while seen.lock().await.len() < count {
                let out = sqs
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .message_attribute_names("All")
                    .send()
                    .await
                    .expect("receive");
                let mut entries = Vec::new();
                for (i, m) in out.messages().iter().enumerate() {
                    seen.lock()
                        .await
                        .insert(m.message_id().unwrap_or_default().to_owned());
                    entries.push(
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(m.receipt_handle().unwrap())
                            .build()
                            .unwrap(),
                    );
                }
                if !entries.is_empty() {
                    sqs.delete_message_batch()
                        .queue_url(&url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .expect("delete");
                }
            }
        }));
    }
    for p in pollers {
        p.await.expect("poller");
    }
    let consume = start.elapsed();
    let _ = sqs.delete_queue().queue_url(&url).send().await;
    let _ = sns.delete_topic().topic_arn(&topic_arn).send().await;
    Run { publish, consume }
}

fn main() {
    let Ok(url) = std::env::var("BUS_TEST_SQS_URL") else {
        println!("skipped: set BUS_TEST_SQS_URL (e.g. sqs://127.0.0.1:4566?region=us-east-1)");
        return;
    };
    let count = env_number("BUS_BENCH_MESSAGES", 500);
    let rounds = env_number("BUS_BENCH_ROUNDS", 3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let config = SqsConfig::from_url(&url)
            .expect("sqs:// URL")
            .with_wait_time(Duration::from_secs(1))
            .with_pollers(2)
            .with_batch_size(10);
        let raw_broker = SqsBroker::connect_with(config.clone())
            .await
            .expect("connect");
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        println!(
            "SQS throughput: {count} messages of {PAYLOAD} B (BUS_BENCH_MESSAGES; not 100,000: \
             the local server slows sharply on deep queues) on {url}, {cores} cores (shared box)"
        );
        println!(
            "publish: SNS PublishBatch, {BATCH} per call, {PUBLISHERS} tasks; consume: 2 \
             pollers, 10 per receive, DeleteMessageBatch"
        );
        let (mut bus_runs, mut raw_runs) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            if round % 2 == 0 {
                raw_runs.push(through_sdk(&raw_broker, count).await);
                bus_runs.push(through_bus(config.clone(), count).await);
            } else {
                bus_runs.push(through_bus(config.clone(), count).await);
                raw_runs.push(through_sdk(&raw_broker, count).await);
            }
            eprintln!("round {} of {rounds} done", round + 1);
        }
        println!("{rounds} rounds, median [min–max]");
        println!(
            "| {:<8} | {:>22} | {:>22} |",
            "side", "publish msg/s", "consume msg/s"
        );
        println!("|{:-<10}|{:->24}|{:->24}|", "", "", "");
        for (side, runs) in [("bus", &bus_runs), ("raw sdk", &raw_runs)] {
            println!(
                "| {side:<8} | {:>22} | {:>22} |",
                spread(runs.iter().map(|r| rate(count, r.publish).0).collect(), 0),
                spread(runs.iter().map(|r| rate(count, r.consume).0).collect(), 0),
            );
        }
        raw_broker.close().await.ok();
        let ratio = |pick: fn(&Run) -> Duration| ratios(&bus_runs, &raw_runs, pick);
        print_ratios(&ratio(|r| r.publish), &ratio(|r| r.consume), &[]);
    });
}
