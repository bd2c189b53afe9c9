//! Poison-proofing against the real broker (`BUS_TEST_RABBITMQ_URL`): a corpus of messages
//! other services could send with a plain AMQP client (plain lapin here) goes into a queue a
//! `bus` consumer reads with retry and dead-lettering, as a real service would. Every message
//! is either handled or dead-lettered with a reason, none is run more often than the retry
//! policy allows, and the consumer still handles a good message afterwards. Each case prints
//! one line: `hostile adapter-rabbitmq: <case>: handled id=… kind=…` or
//! `… dead-lettered reason=…`.
//!
//! A second test crashes a consumer (a plain lapin one that requeues) and checks that the
//! attempt `bus` reports counts those deliveries from `x-delivery-count` on a quorum queue, and
//! that a classic queue, which does not count them, still dead-letters after the policy's
//! runs.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use adapter_rabbitmq::lapin::options::{
    BasicGetOptions, BasicPublishOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use adapter_rabbitmq::lapin::publisher_confirm::Confirmation;
use adapter_rabbitmq::lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable};
use adapter_rabbitmq::lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use adapter_rabbitmq::{RabbitMqBroker, RabbitMqConfig};
use bus_core::conformance::broker_url;
use bus_core::middleware::{RetryLayer, RetryPolicy};
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo, HandlerBuilder};
use bus_core::{
    headers, Broker, ConsumeOptions, Envelope, Error, ErrorKind, MessageId, Queue, Support,
};
use tokio::sync::mpsc;

const MAX_DELIVERIES: u32 = 3;
/// Messages of this type, or with this header, fail in the handler every time.
const FAILS: &str = "hostile.fails";

fn unique(tag: &str) -> String {
    format!("hostile.{tag}.{}", MessageId::new())
}

async fn raw(url: &str) -> (Connection, Channel) {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let connection = Connection::connect(url, props).await.expect("raw connect");
    let channel = connection.create_channel().await.expect("raw channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    (connection, channel)
}

async fn publish(channel: &Channel, queue: &str, props: BasicProperties, body: &[u8]) {
    let confirmation = channel
        .basic_publish(
            "",
            queue,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            props,
        )
        .await
        .expect("raw publish")
        .await
        .expect("raw publish confirm");
    assert!(
        matches!(confirmation, Confirmation::Ack(None)),
        "not stored in `{queue}`: {confirmation:?}"
    );
}

fn long(value: impl Into<Vec<u8>>) -> AMQPValue {
    AMQPValue::LongString(value.into().into())
}

fn table(entries: Vec<(String, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in entries {
        table.insert(name.into(), value);
    }
    table
}

fn headers_only(entries: Vec<(&str, AMQPValue)>) -> BasicProperties {
    BasicProperties::default().with_headers(table(
        entries
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v))
            .collect(),
    ))
}

/// The corpus: (case, properties, body). What is expected of each is decided by `expect`.
fn corpus() -> Vec<(&'static str, BasicProperties, Vec<u8>)> {
    let mut nested = FieldTable::default();
    nested.insert("level".into(), AMQPValue::LongInt(2));
    let mut deeper = FieldTable::default();
    deeper.insert(
        "bytes".into(),
        AMQPValue::ByteArray(vec![0xff, 0x00].into()),
    );
    nested.insert("deeper".into(), AMQPValue::FieldTable(deeper));
    let mut array = FieldArray::default();
    array.push(AMQPValue::Boolean(false));
    array.push(AMQPValue::Void);
    array.push(AMQPValue::Timestamp(u64::MAX));
    array.push(AMQPValue::FieldArray(FieldArray::default()));
    let odd_values = headers_only(vec![
        ("nested", AMQPValue::FieldTable(nested)),
        ("array", AMQPValue::FieldArray(array)),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: u32::MAX,
            }),
        ),
        ("bytes", AMQPValue::ByteArray(vec![0, 0xff, 0x80].into())),
        ("void", AMQPValue::Void),
        ("sent-at", AMQPValue::Timestamp(u64::MAX)),
        ("epoch", AMQPValue::Timestamp(0)),
        // Finite: RabbitMQ closes the channel on a NaN or infinite double (its parser's
        // float match fails), so no such message reaches a queue.
        ("double", AMQPValue::Double(-1.5e300)),
        // Not AMQPValue::ShortString: lapin writes it as `s`, which RabbitMQ reads as a
        // 16-bit integer.
    ]);
    let thousands = BasicProperties::default().with_headers(table(
        (0..4000)
            .map(|i| (format!("h-{i:04}"), long(format!("{i}"))))
            .collect(),
    ));
    let near_frame = BasicProperties::default()
        .with_type(FAILS.into())
        .with_headers(table(
            (0..4)
                .map(|i| {
                    let bytes: Vec<u8> = (0..28_000u32).map(|b| (b % 251) as u8 | 0x80).collect();
                    (format!("binary-{i}"), long(bytes))
                })
                .collect(),
        ));
    vec![
        (
            "bare-body",
            BasicProperties::default(),
            b"just bytes".to_vec(),
        ),
        ("empty-payload", BasicProperties::default(), Vec::new()),
        ("nul-payload", BasicProperties::default(), vec![0; 16]),
        (
            "json-null-payload",
            BasicProperties::default(),
            b"null".to_vec(),
        ),
        (
            "non-utf8-header-values",
            headers_only(vec![
                ("latin1", long(b"caf\xe9".to_vec())),
                ("random", long(vec![0xff, 0xfe, 0x00, 0xc3])),
                ("cloudEvents:type", long(b"type\xff".to_vec())),
            ]),
            b"x".to_vec(),
        ),
        ("odd-value-types", odd_values, b"x".to_vec()),
        (
            "timestamp-zero",
            BasicProperties::default().with_timestamp(0),
            b"x".to_vec(),
        ),
        (
            "timestamp-u64-max",
            BasicProperties::default().with_timestamp(u64::MAX),
            b"x".to_vec(),
        ),
        (
            "timestamp-year-10000",
            BasicProperties::default().with_timestamp(253_402_300_800),
            b"x".to_vec(),
        ),
        (
            "ce-time-before-1970",
            headers_only(vec![("cloudEvents:time", long("1969-07-20T20:17:40Z"))]),
            b"x".to_vec(),
        ),
        (
            "ce-time-past-9999",
            headers_only(vec![("cloudEvents:time", long("+10000-01-01T00:00:00Z"))]),
            b"x".to_vec(),
        ),
        (
            "ce-time-garbage",
            headers_only(vec![("cloudEvents:time", long("yesterday at noon"))]),
            b"x".to_vec(),
        ),
        (
            "empty-ids-and-type",
            BasicProperties::default()
                .with_message_id("".into())
                .with_type("".into())
                .with_correlation_id("".into())
                .with_headers(table(vec![
                    ("cloudEvents:id".into(), long("")),
                    ("cloudEvents:type".into(), long("")),
                    ("cloudEvents:correlationid".into(), long("")),
                ])),
            b"x".to_vec(),
        ),
        (
            "long-ids-and-type",
            BasicProperties::default()
                .with_message_id("m".repeat(255).into())
                .with_correlation_id("c".repeat(255).into())
                .with_headers(table(vec![
                    ("cloudEvents:id".into(), long("i".repeat(40_000))),
                    ("cloudEvents:type".into(), long("t".repeat(30_000))),
                    ("cloudEvents:correlationid".into(), long("c".repeat(20_000))),
                ])),
            b"x".to_vec(),
        ),
        ("thousands-of-headers", thousands, b"x".to_vec()),
        (
            "hostile-attempt-header",
            headers_only(vec![
                ("bus-attempt", long("99999999999999999999999")),
                ("x-delivery-count", long("-3")),
            ]),
            b"x".to_vec(),
        ),
        (
            "unknown-specversion",
            headers_only(vec![
                ("cloudEvents:specversion", long("2.0")),
                ("cloudEvents:id", long("hostile-spec-2")),
                ("cloudEvents:type", long("future.event")),
            ]),
            b"{\"v\":2}".to_vec(),
        ),
        (
            "always-fails-without-id",
            BasicProperties::default().with_type(FAILS.into()),
            b"fails every time".to_vec(),
        ),
        (
            "near-frame-binary-headers-fail",
            near_frame,
            b"fails with headers that grow when dead-lettered".to_vec(),
        ),
        (
            "70kb-id-without-correlation-fails",
            headers_only(vec![
                ("cloudEvents:id", long("i".repeat(70_000))),
                (FAILS, long("yes")),
            ]),
            b"its copies once carried the id twice".to_vec(),
        ),
        (
            "50kb-of-0xff-type-fails",
            headers_only(vec![
                ("cloudEvents:type", long(vec![0xff; 50_000])),
                (FAILS, long("yes")),
            ]),
            b"its type triples when read".to_vec(),
        ),
    ]
}

#[derive(Debug)]
enum Event {
    Handled(Envelope, u32),
    Failed(MessageId, u32),
    DeadLettered(Envelope),
}

#[tokio::test]
async fn hostile_corpus_neither_kills_nor_wedges_the_consumer() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let config = RabbitMqConfig::new(&url).with_queue_expires(Duration::from_secs(600));
    let broker = RabbitMqBroker::with_config(config).await.expect("connect");
    let queue = unique("corpus");
    let dlq = headers::dead_letter_queue(&queue);
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();

    let policy = RetryPolicy::new()
        .with_immediate_retries(0, Duration::from_millis(1))
        .with_max_deliveries(MAX_DELIVERIES)
        .with_backoff(Duration::from_millis(10), 2.0, Duration::from_millis(50));
    let handler = {
        let events_tx = events_tx.clone();
        handler_fn(move |envelope: Envelope, info: DeliveryInfo| {
            let events_tx = events_tx.clone();
            async move {
                if envelope.kind == FAILS || envelope.header(FAILS).is_some() {
                    let _ = events_tx.send(Event::Failed(envelope.id.clone(), info.attempt()));
                    return Err(Error::new(ErrorKind::Handler, "this message always fails"));
                }
                let _ = events_tx.send(Event::Handled(envelope, info.attempt()));
                Ok(())
            }
        })
    };
    let handler = HandlerBuilder::new()
        .layer(RetryLayer::new(policy))
        .handler(handler);
    let subscription = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let consumer = Consumer::new(subscription, handler)
        .with_concurrency(4)
        .spawn();
    let mut dead_letters = broker
        .consume(&dlq, ConsumeOptions::default())
        .await
        .expect("consume the DLQ");
    let dlq_task = tokio::spawn(async move {
        while let Some(delivery) = dead_letters.next().await {
            let delivery = delivery.expect("dead letter");
            let _ = events_tx.send(Event::DeadLettered(delivery.envelope().clone()));
            delivery.ack().await.expect("ack the dead letter");
        }
    });

    let (connection, channel) = raw(&url).await;
    let mut runs: HashMap<MessageId, u32> = HashMap::new();
    for (case, props, body) in corpus() {
        publish(&channel, &queue, props, &body).await;
        let mut failed_ids = Vec::new();
        let outcome = loop {
            let event = tokio::time::timeout(Duration::from_secs(15), events.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{case}: neither handled nor dead-lettered within 15 s (consumer \
                         finished: {})",
                        consumer.is_finished()
                    )
                })
                .expect("events");
            match event {
                Event::Failed(id, attempt) => {
                    *runs.entry(id.clone()).or_default() += 1;
                    assert!(
                        attempt <= MAX_DELIVERIES,
                        "{case}: run at attempt {attempt}"
                    );
                    failed_ids.push(id);
                }
                other => break other,
            }
        };
        let short = |text: &str| headers::shorten(text, 100).into_owned();
        match &outcome {
            Event::Handled(envelope, attempt) => {
                *runs.entry(envelope.id.clone()).or_default() += 1;
                println!(
                    "hostile adapter-rabbitmq: {case}: handled id={} kind={:?} attempt={attempt}",
                    short(envelope.id.as_str()),
                    short(&envelope.kind)
                );
                assert!(!envelope.id.as_str().is_empty(), "{case}: empty id");
                assert!(
                    envelope.timestamp <= headers::max_time(),
                    "{case}: timestamp"
                );
                assert_eq!(&envelope.payload[..], &body[..], "{case}: body");
            }
            Event::DeadLettered(envelope) => {
                let reason = envelope.header(headers::DLQ_REASON).unwrap_or_default();
                println!(
                    "hostile adapter-rabbitmq: {case}: dead-lettered reason={:?} id={} \
                     attempts={}",
                    short(reason),
                    short(envelope.id.as_str()),
                    envelope.header(headers::DLQ_ATTEMPTS).unwrap_or("?"),
                );
                assert!(!reason.is_empty(), "{case}: dead letter without a reason");
                assert_eq!(&envelope.payload[..], &body[..], "{case}: raw body kept");
                assert_eq!(
                    envelope.header(headers::DLQ_ORIGINAL_TOPIC),
                    Some(queue.as_str())
                );
                // A message without id keeps one id through every redelivery and its dead letter.
                if !failed_ids.is_empty() {
                    assert!(
                        failed_ids.iter().all(|id| *id == envelope.id),
                        "{case}: ids changed across redeliveries: {failed_ids:?} then {}",
                        envelope.id
                    );
                }
            }
            Event::Failed(..) => unreachable!(),
        }
        expect(case, &outcome, failed_ids.len());
    }
    for (id, count) in &runs {
        assert!(
            *count <= MAX_DELIVERIES,
            "{id} was run {count} times, more than the policy's {MAX_DELIVERIES}"
        );
    }

    let good = Envelope::new("hostile.good", "after the corpus");
    broker.send(&queue, good.clone()).await.expect("send good");
    let event = tokio::time::timeout(Duration::from_secs(15), events.recv())
        .await
        .expect("the good message after the corpus was not handled within 15 s")
        .expect("events");
    assert!(
        matches!(&event, Event::Handled(e, 1) if e.id == good.id),
        "expected the good message, got {event:?}"
    );
    assert!(!consumer.is_finished(), "the consumer stopped");
    let report = consumer.stop().await.expect("stop the consumer");
    println!("hostile adapter-rabbitmq: consumer report {report:?}");
    assert_eq!(report.undecodable, 1, "{report:?}");
    assert_eq!(report.panicked, 0, "{report:?}");

    dlq_task.abort();
    for q in [queue, dlq] {
        let _ = channel
            .queue_delete(&q, QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "done").await;
    broker.close().await.expect("close");
}

/// What each case must come to.
fn expect(case: &str, outcome: &Event, failed_runs: usize) {
    match (case, outcome) {
        ("unknown-specversion", Event::DeadLettered(e)) => {
            let reason = e.header(headers::DLQ_REASON).unwrap_or_default();
            assert!(
                reason.starts_with("undecodable:") && reason.contains("`2.0`"),
                "{case}: {reason}"
            );
            assert_eq!(e.id.as_str(), "hostile-spec-2");
            assert_eq!(failed_runs, 0, "{case}: the handler saw it");
        }
        ("hostile-attempt-header", Event::DeadLettered(e)) => {
            // A foreign attempt past the policy: dead-lettered without running the handler.
            let reason = e.header(headers::DLQ_REASON).unwrap_or_default();
            assert!(reason.contains("gave up after 3"), "{case}: {reason}");
            assert_eq!(failed_runs, 0, "{case}: the handler saw it");
        }
        (
            "always-fails-without-id"
            | "near-frame-binary-headers-fail"
            | "70kb-id-without-correlation-fails"
            | "50kb-of-0xff-type-fails",
            Event::DeadLettered(e),
        ) => {
            let reason = e.header(headers::DLQ_REASON).unwrap_or_default();
            assert!(
                reason.contains("gave up after 3 deliveries"),
                "{case}: {reason}"
            );
            assert_eq!(failed_runs, 3, "{case}: handler runs");
            if case == "near-frame-binary-headers-fail" {
                // Base64 made the headers outgrow a frame: the copies were fitted, and say so.
                let note = e.header(headers::TRUNCATED).unwrap_or_default();
                assert!(note.contains("value:binary-"), "{case}: {note:?}");
            }
            if case == "70kb-id-without-correlation-fails" {
                assert_eq!(e.id.as_str().len(), 70_000, "{case}: the id is kept");
            }
            if case == "50kb-of-0xff-type-fails" {
                let note = e.header(headers::TRUNCATED).unwrap_or_default();
                assert!(note.split(',').any(|i| i == "kind"), "{case}: {note:?}");
                assert!(
                    e.kind.len() <= 1027,
                    "{case}: kind of {} bytes",
                    e.kind.len()
                );
            }
        }
        (
            "unknown-specversion"
            | "hostile-attempt-header"
            | "always-fails-without-id"
            | "near-frame-binary-headers-fail"
            | "70kb-id-without-correlation-fails"
            | "50kb-of-0xff-type-fails",
            _,
        ) => {
            panic!("{case}: expected a dead letter, got {outcome:?}")
        }
        (_, Event::Handled(e, _)) => match case {
            "timestamp-u64-max" | "timestamp-year-10000" | "ce-time-garbage" => {
                assert!(
                    e.header(headers::RAW_TIME).is_some(),
                    "{case}: raw time kept"
                );
                assert!(e.timestamp > SystemTime::now() - Duration::from_secs(600));
            }
            "timestamp-zero" => assert_eq!(e.timestamp, std::time::UNIX_EPOCH),
            "non-utf8-header-values" => {
                assert_eq!(e.header(headers::BINARY_HEADERS), Some("latin1,random"));
                assert_eq!(e.header("latin1"), Some("Y2Fm6Q=="));
                assert_eq!(e.kind, "type\u{fffd}");
            }
            "odd-value-types" => {
                assert_eq!(e.header("decimal"), Some("42949672.95"));
                assert_eq!(
                    e.header("nested"),
                    Some(r#"{"deeper":{"bytes":{"base64":"/wA="}},"level":2}"#)
                );
            }
            "thousands-of-headers" => assert_eq!(e.headers.len(), 4000),
            "long-ids-and-type" => assert_eq!(e.id.as_str().len(), 40_000),
            _ => {}
        },
        (_, other) => panic!("{case}: expected it handled, got {other:?}"),
    }
}

/// A consumer that dies before settling makes the broker deliver again: the attempt `bus`
/// reports counts that, so a message that crashes every consumer still reaches the DLQ.
#[tokio::test]
async fn crashed_deliveries_count_as_attempts() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let (connection, channel) = raw(&url).await;
    for quorum in [true, false] {
        let config = RabbitMqConfig::new(&url).with_quorum_queues(quorum);
        let broker = RabbitMqBroker::with_config(config).await.expect("connect");
        let expected = if quorum {
            Support::Native
        } else {
            Support::Emulated
        };
        assert_eq!(broker.capabilities().delivery_count, expected);
        let queue = unique(if quorum { "quorum" } else { "classic" });
        let mut args = FieldTable::default();
        if quorum {
            args.insert("x-queue-type".into(), long("quorum"));
        }
        // The dead-letter queue is declared now too: RabbitMQ 3.10 can refuse a consume that
        // follows a quorum queue's declaration at once (`noproc` while it starts).
        let dlq = headers::dead_letter_queue(&queue);
        for q in [&queue, &dlq] {
            channel
                .queue_declare(
                    q,
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args.clone(),
                )
                .await
                .expect("declare");
        }
        publish(
            &channel,
            &queue,
            BasicProperties::default().with_type(FAILS.into()),
            b"crashes every consumer",
        )
        .await;

        // Two consumers crash on it: each takes it and gives it back unsettled, as a broken
        // connection does (basic.get, so that nothing else is delivered meanwhile).
        let crashes = 2u32;
        for _ in 0..crashes {
            let delivery = loop {
                let got = channel
                    .basic_get(&queue, BasicGetOptions { no_ack: false })
                    .await
                    .expect("basic.get");
                if let Some(message) = got {
                    break message.delivery;
                }
                tokio::task::yield_now().await;
            };
            delivery
                .reject(BasicRejectOptions { requeue: true })
                .await
                .expect("requeue");
        }

        let (runs_tx, mut runs) = mpsc::unbounded_channel::<u32>();
        let policy = RetryPolicy::new()
            .with_immediate_retries(0, Duration::from_millis(1))
            .with_max_deliveries(MAX_DELIVERIES)
            .with_backoff(Duration::from_millis(10), 2.0, Duration::from_millis(50));
        let handler = HandlerBuilder::new()
            .layer(RetryLayer::new(policy))
            .handler(handler_fn(move |_: Envelope, info: DeliveryInfo| {
                let _ = runs_tx.send(info.attempt());
                async { Err::<(), _>(Error::new(ErrorKind::Handler, "crash again")) }
            }));
        let subscription = broker
            .consume(&queue, ConsumeOptions::default())
            .await
            .expect("consume");
        let consumer = Consumer::new(subscription, handler).spawn();
        let mut dead_letters = broker
            .consume(&dlq, ConsumeOptions::default())
            .await
            .expect("consume the DLQ");
        let dead = tokio::time::timeout(Duration::from_secs(15), dead_letters.next())
            .await
            .expect("dead-lettered within 15 s")
            .expect("open")
            .expect("dead letter");
        let reason = dead
            .envelope()
            .header(headers::DLQ_REASON)
            .unwrap_or_default()
            .to_owned();
        dead.ack().await.expect("ack");
        let report = consumer.stop().await.expect("stop");
        let mut attempts = Vec::new();
        while let Ok(attempt) = runs.try_recv() {
            attempts.push(attempt);
        }
        let case = if quorum {
            "x-delivery-count-on-quorum-queue"
        } else {
            "crashes-on-classic-queue"
        };
        println!(
            "hostile adapter-rabbitmq: {case}: dead-lettered reason={reason:?} handler runs at \
             attempts {attempts:?} after {crashes} crashed deliveries"
        );
        if quorum {
            // x-delivery-count says 2 earlier deliveries: the handler's run is the third.
            assert_eq!(attempts, vec![3], "{case}");
        } else {
            // Classic queues do not count deliveries and the `redelivered` flag is not
            // counted (closing subscriptions set it too): crashes do not count here.
            assert_eq!(attempts, vec![1, 2, 3], "{case}");
        }
        assert!(
            reason.contains("gave up after 3 deliveries"),
            "{case}: {reason}"
        );
        assert_eq!(report.rejected, 1, "{case}: {report:?}");
        dead_letters.close().await.expect("close");
        // The retry queues (jittered delays) expire by themselves.
        let channel = connection.create_channel().await.expect("channel");
        for q in [queue.clone(), dlq] {
            let _ = channel
                .queue_delete(&q, QueueDeleteOptions::default())
                .await;
        }
        broker.close().await.expect("close");
    }
    let _ = connection.close(200, "done").await;
}
