//! Hostile input on Kafka: records that other producers send (other languages, old versions,
//! bugs), produced onto a queue that a `bus` consumer with the retry middleware is consuming,
//! as a real service would. Every record is either handled or dead-lettered with a reason,
//! none is redelivered more often than the policy allows, and the consumer keeps going: a good
//! message sent after the corpus is handled.
//!
//! Most records are produced with a plain rdkafka producer. What rdkafka cannot produce (a
//! header name that is not UTF-8, record timestamps of -1, 0, before 1970 and i64::MAX,
//! LogAppendTime) is written as a Produce request by hand ([`frame`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use adapter_kafka::rdkafka::message::{Header, OwnedHeaders};
use adapter_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use adapter_kafka::rdkafka::ClientConfig;
use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::conformance::broker_url;
use bus_core::middleware::{RetryLayer, RetryPolicy};
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo, HandlerBuilder};
use bus_core::{
    headers, Broker, ConsumeOptions, Envelope, Error, ErrorKind, MessageId, Queue, Redeliver,
};
use tokio::sync::Notify;

const MAX_DELIVERIES: u32 = 3;
const WAIT: Duration = Duration::from_secs(40);

async fn broker() -> Option<(KafkaBroker, String)> {
    let url = broker_url("BUS_TEST_KAFKA_URL")?;
    let config = KafkaConfig::from_url(&url).expect("a kafka:// URL");
    let servers = config.bootstrap_servers.clone();
    let broker = KafkaBroker::connect(config).await.expect("connect");
    Some((broker, servers))
}

fn unique(tag: &str) -> String {
    format!("hostile.{tag}.{}", uuid::Uuid::now_v7().simple())
}

/// One record as another producer sends it.
#[derive(Debug, Clone, Default)]
struct Raw {
    /// Written to the retry topic instead of the queue's topic.
    to_retry_topic: bool,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Sent by hand (see [`frame`]) with this timestamp, else by rdkafka.
    frame_timestamp: Option<i64>,
    log_append_time: bool,
}

impl Raw {
    fn value(value: &[u8]) -> Self {
        Self {
            value: Some(value.to_vec()),
            ..Self::default()
        }
    }

    fn header(mut self, name: &[u8], value: Option<&[u8]>) -> Self {
        self.headers
            .push((name.to_vec(), value.map(<[u8]>::to_vec)));
        self
    }

    /// A CloudEvent as a Kafka binding producer writes it.
    fn cloudevent(id: &str, kind: &str) -> Self {
        Self::value(b"{\"from\":\"elsewhere\"}")
            .header(b"ce_specversion", Some(b"1.0"))
            .header(b"ce_id", Some(id.as_bytes()))
            .header(b"ce_type", Some(kind.as_bytes()))
            .header(b"ce_source", Some(b"/other/service"))
    }

    fn framed(mut self, timestamp: i64) -> Self {
        self.frame_timestamp = Some(timestamp);
        self
    }
}

/// What a case must come to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Handled: the first run fails (so the message also goes through the retry topic, where
    /// the adapter encodes it again), the second succeeds.
    Handled,
    /// Dead-lettered, the reason containing this text.
    DeadLettered(&'static str),
}

/// A property of the envelope the handler was given.
type Check = fn(&Envelope) -> bool;

struct Case {
    name: &'static str,
    raw: Raw,
    expect: Expect,
    /// What the handler must have been given, checked on the envelope.
    check: Option<(&'static str, Check)>,
    /// The dead letter must have been cut to fit (see [`headers::TRUNCATED`]).
    cut: bool,
    /// The id the message must have; filled in once it is produced (from its partition and
    /// offset when it carries no `ce_id`).
    id: Option<MessageId>,
}

impl Case {
    fn holds(mut self, what: &'static str, check: Check) -> Self {
        self.check = Some((what, check));
        self
    }

    fn cut_to_fit(mut self) -> Self {
        self.cut = true;
        self
    }
}

fn case(name: &'static str, raw: Raw, expect: Expect) -> Case {
    Case {
        name,
        raw,
        expect,
        check: None,
        cut: false,
        id: None,
    }
}

fn corpus(queue: &str) -> Vec<Case> {
    let long = "x".repeat(100 * 1024);
    let mut many = Raw::cloudevent("hostile-many-headers", "hostile.many-headers");
    for i in 0..5_000 {
        let value = "v".repeat(i % 20);
        many = many.header(format!("h-{i}").as_bytes(), Some(value.as_bytes()));
    }
    // Over what the adapter's producer sends (1,000,000 + 64 KiB): neither a retry copy nor
    // the dead letter as it is fits, so the dead letter is cut to fit (bus-truncated).
    let mut oversized = Raw::cloudevent("hostile-oversized-poison", "hostile.poison");
    oversized.value = Some(vec![b'p'; 1_000_000]);
    for i in 0..3_000 {
        oversized = oversized.header(format!("pad-{i}").as_bytes(), Some(&[b'q'; 30]));
    }
    let group = format!("bus.queue.{queue}");
    vec![
        case(
            "bare body without metadata",
            Raw::value(b"just bytes"),
            Expect::Handled,
        ),
        case(
            "tombstone (null payload) with null key",
            Raw::default(),
            Expect::Handled,
        )
        .holds("empty payload, no key", |e| {
            e.payload.is_empty() && e.key.is_none()
        }),
        case("empty payload", Raw::value(b""), Expect::Handled),
        case(
            "non-UTF-8 record key",
            Raw {
                key: Some(vec![0, 0, 0, 0, 0, 0, 0, 42, 0xff]),
                ..Raw::value(b"binary key")
            },
            Expect::Handled,
        )
        .holds("the key bytes kept", |e| {
            e.header("bus-binary-key") == Some("AAAAAAAAACr/")
        }),
        case(
            "header with a null value",
            Raw::cloudevent("hostile-null-header", "hostile.null-header")
                .header(b"x-null", None)
                .header(b"ce_causationid", None),
            Expect::Handled,
        )
        .holds("null reads as empty", |e| e.header("x-null") == Some("")),
        case(
            "non-UTF-8 header value",
            Raw::cloudevent("hostile-binary-header", "hostile.binary-header")
                .header(b"x-bin", Some(&[0xff, 0xfe, 0x00])),
            Expect::Handled,
        )
        .holds("value kept base64", |e| {
            e.header("x-bin") == Some("//4A") && e.header(headers::BINARY_HEADERS) == Some("x-bin")
        }),
        case(
            "non-UTF-8 CloudEvents attribute (ce_type)",
            Raw::value(b"bad type")
                .header(b"ce_id", Some(b"hostile-binary-type"))
                .header(b"ce_type", Some(&[0xc3, 0x28])),
            Expect::DeadLettered("ce_type"),
        ),
        case(
            "non-UTF-8 header name",
            Raw::cloudevent("hostile-binary-name", "hostile.binary-name")
                .header(&[0xff, 0xfe, b'k'], Some(b"v"))
                .framed(1_764_000_000_000),
            Expect::DeadLettered("not UTF-8"),
        ),
        case(
            "unknown CloudEvents specversion 9.9",
            Raw::value(b"from the future")
                .header(b"ce_specversion", Some(b"9.9"))
                .header(b"ce_id", Some(b"hostile-specversion"))
                .header(b"ce_type", Some(b"hostile.specversion")),
            Expect::DeadLettered("9.9"),
        ),
        case(
            "empty ce_id, ce_type and ce_correlationid",
            Raw::value(b"empties")
                .header(b"ce_specversion", Some(b"1.0"))
                .header(b"ce_id", Some(b""))
                .header(b"ce_type", Some(b""))
                .header(b"ce_correlationid", Some(b"")),
            Expect::Handled,
        )
        .holds("the empty correlation id read as the id", |e| {
            e.correlation_id == e.id
        }),
        case(
            "a header and its escaped name (bus-esc-) from another producer",
            Raw::cloudevent("hostile-escaped-names", "hostile.escaped-names")
                .header(b"bus-esc-ce_ext", Some(b"escaped"))
                .header(b"ce_ext", Some(b"raw"))
                .header(b"bus-esc-tenant", Some(b"not an escape"))
                .header(b"tenant", Some(b"acme")),
            Expect::Handled,
        )
        .holds("escaped wins, other bus-esc- names read as they are", |e| {
            e.header("ce_ext") == Some("escaped")
                && e.header("tenant") == Some("acme")
                && e.header("bus-esc-tenant") == Some("not an escape")
        }),
        case(
            "100 KiB ce_id, ce_type and ce_correlationid",
            Raw::value(b"long")
                .header(b"ce_id", Some(format!("id-{long}").as_bytes()))
                .header(b"ce_type", Some(long.as_bytes()))
                .header(b"ce_correlationid", Some(long.as_bytes())),
            Expect::Handled,
        ),
        case(
            "unparseable ce_time",
            Raw::cloudevent("hostile-bad-time", "hostile.bad-time")
                .header(b"ce_time", Some(b"yesterday at noon")),
            Expect::Handled,
        )
        .holds("raw time kept", |e| {
            e.header(headers::RAW_TIME) == Some("yesterday at noon")
        }),
        case(
            "ce_time past year 9999",
            Raw::cloudevent("hostile-time-10000", "hostile.time-10000")
                .header(b"ce_time", Some(b"+10000-01-01T00:00:00Z")),
            Expect::Handled,
        )
        .holds("raw time kept", |e| {
            e.header(headers::RAW_TIME) == Some("+10000-01-01T00:00:00Z")
        }),
        case(
            "record timestamp -1",
            Raw::value(b"ts -1").framed(-1),
            Expect::Handled,
        )
        .holds("no time: the receive time", |e| {
            e.header(headers::RAW_TIME).is_none() && e.timestamp > UNIX_EPOCH
        }),
        case(
            "record timestamp 0",
            Raw::value(b"ts 0").framed(0),
            Expect::Handled,
        )
        .holds("the epoch", |e| e.timestamp == UNIX_EPOCH),
        case(
            "record timestamp before 1970",
            Raw::value(b"ts 1940").framed(-946_771_200_000),
            Expect::Handled,
        )
        .holds("raw time kept", |e| {
            e.header(headers::RAW_TIME) == Some("-946771200000")
        }),
        case(
            "record timestamp i64::MAX",
            Raw::value(b"ts max").framed(i64::MAX),
            Expect::Handled,
        )
        .holds("raw time kept", |e| {
            e.header(headers::RAW_TIME) == Some("9223372036854775807")
        }),
        case(
            "LogAppendTime record",
            Raw {
                log_append_time: true,
                ..Raw::value(b"log append time").framed(1_764_000_000_000)
            },
            Expect::Handled,
        ),
        case("5,000 headers", many, Expect::Handled)
            .holds("every header", |e| e.headers.len() >= 5_000),
        case(
            "forged retry record with bus-attempt 4294967295",
            Raw {
                to_retry_topic: true,
                ..Raw::cloudevent("hostile-forged-attempt", "hostile.forged-attempt")
                    .header(b"bus-attempt", Some(b"4294967295"))
                    .header(b"bus-retry-group", Some(group.as_bytes()))
            },
            // Past the policy's last attempt: the retry middleware dead-letters it without
            // running the handler (the earlier deliveries, as far as it can tell, never ended).
            Expect::DeadLettered("came after the earlier ones ended unsettled"),
        ),
        case(
            "poison (the handler fails every time)",
            Raw::cloudevent("hostile-poison", "hostile.poison"),
            Expect::DeadLettered("this attempt fails"),
        ),
        case(
            "poison too large to copy (1 MB body, 3,000 headers)",
            oversized,
            Expect::DeadLettered("this attempt fails"),
        )
        .cut_to_fit(),
    ]
}

/// Produces `raw` to `topic`; returns its partition and offset.
async fn produce(producer: &FutureProducer, servers: &str, topic: &str, raw: &Raw) -> (i32, i64) {
    if let Some(timestamp) = raw.frame_timestamp {
        let (servers, topic, raw) = (servers.to_owned(), topic.to_owned(), raw.clone());
        let offset = tokio::task::spawn_blocking(move || {
            frame::produce(&servers, &topic, 0, &raw, timestamp)
        })
        .await
        .expect("the framing task")
        .expect("a hand-written Produce request");
        return (0, offset);
    }
    let mut hs = OwnedHeaders::new();
    for (name, value) in &raw.headers {
        hs = hs.insert(Header {
            key: std::str::from_utf8(name).expect("rdkafka takes UTF-8 header names"),
            value: value.as_deref(),
        });
    }
    let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(hs);
    if let Some(key) = &raw.key {
        record = record.key(key);
    }
    if let Some(value) = &raw.value {
        record = record.payload(value);
    }
    let delivered = producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("a plain rdkafka produce");
    (delivered.partition, delivered.offset)
}

#[derive(Default)]
struct Seen {
    /// Attempts the handler saw, per message id.
    attempts: HashMap<MessageId, Vec<u32>>,
    /// The envelopes the handler was given, per message id.
    envelopes: HashMap<MessageId, Vec<Envelope>>,
    good: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_are_handled_or_dead_lettered() {
    let Some((broker, servers)) = broker().await else {
        return;
    };
    let queue = unique("corpus");
    let subscription = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume (creates the topic and its retry topic)");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let progress = Arc::new(Notify::new());
    let handler = handler_fn({
        let seen = seen.clone();
        let progress = progress.clone();
        move |envelope: Envelope, info: DeliveryInfo| {
            let mut s = seen.lock().unwrap();
            if envelope.kind == "good" {
                s.good = true;
            } else {
                s.attempts
                    .entry(envelope.id.clone())
                    .or_default()
                    .push(info.attempt());
                s.envelopes
                    .entry(envelope.id.clone())
                    .or_default()
                    .push(envelope.clone());
            }
            drop(s);
            progress.notify_waiters();
            let fails = envelope.kind == "hostile.poison" || info.attempt() == 1;
            async move {
                if fails {
                    Err(Error::new(
                        ErrorKind::Timeout,
                        "hostile test: this attempt fails",
                    ))
                } else {
                    Ok(())
                }
            }
        }
    });
    let policy = RetryPolicy::new()
        .with_immediate_retries(0, Duration::ZERO)
        .with_max_deliveries(MAX_DELIVERIES)
        .with_backoff(Duration::from_millis(10), 2.0, Duration::from_millis(50));
    let handler = HandlerBuilder::new()
        .layer(RetryLayer::new(policy))
        .handler(handler);
    let consumer = Consumer::new(subscription, handler)
        .with_concurrency(4)
        .spawn();

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .set("message.max.bytes", "4000000")
        .create()
        .expect("a plain rdkafka producer");
    let retry_topic = format!("{queue}.retry");
    let mut corpus = corpus(&queue);
    for case in &mut corpus {
        let topic = if case.raw.to_retry_topic {
            &retry_topic
        } else {
            &queue
        };
        let (partition, offset) = produce(&producer, &servers, topic, &case.raw).await;
        let ce_id = case
            .raw
            .headers
            .iter()
            .rev()
            .find(|(name, _)| name == b"ce_id")
            .and_then(|(_, value)| value.clone())
            .filter(|id| !id.is_empty());
        case.id = Some(match ce_id {
            Some(id) => String::from_utf8(id)
                .expect("UTF-8 ids in the corpus")
                .into(),
            // The adapter's derivation for records without an id, the same on every delivery.
            None => MessageId::derived(&[
                b"kafka",
                topic.as_bytes(),
                &partition.to_be_bytes(),
                &offset.to_be_bytes(),
            ]),
        });
    }
    let good = Envelope::new("good", "sent after the corpus");
    broker.send(&queue, good).await.expect("send the good one");

    let wanted = |case: &Case| match case.expect {
        Expect::Handled => 2,
        Expect::DeadLettered("this attempt fails") => MAX_DELIVERIES as usize,
        Expect::DeadLettered(_) => 0,
    };
    let done = |seen: &Seen| {
        seen.good
            && corpus.iter().all(|case| {
                let id = case.id.as_ref().expect("produced");
                seen.attempts.get(id).map_or(0, Vec::len) >= wanted(case)
            })
    };
    let waited = tokio::time::timeout(WAIT, async {
        loop {
            let notified = progress.notified();
            if done(&seen.lock().unwrap()) {
                break;
            }
            notified.await;
        }
    })
    .await;
    {
        let seen = seen.lock().unwrap();
        let missing: Vec<_> = corpus
            .iter()
            .filter(|case| {
                let id = case.id.as_ref().expect("produced");
                seen.attempts.get(id).map_or(0, Vec::len) < wanted(case)
            })
            .map(|case| {
                let id = case.id.as_ref().expect("produced");
                format!("{} ({:?})", case.name, seen.attempts.get(id))
            })
            .collect();
        assert!(
            waited.is_ok(),
            "within {WAIT:?}: good message handled: {}; cases not handled as often as \
             expected: {missing:?} (consumer finished: {})",
            seen.good,
            consumer.is_finished()
        );
    }
    assert!(!consumer.is_finished(), "the consumer stopped");

    // The dead letters: exactly the cases that must end there, each once, with its reason.
    let expected_dead = corpus
        .iter()
        .filter(|c| matches!(c.expect, Expect::DeadLettered(_)))
        .count();
    let mut dead_letters = broker
        .consume(
            &headers::dead_letter_queue(&queue),
            ConsumeOptions::default(),
        )
        .await
        .expect("consume the dead-letter queue");
    let mut dead: HashMap<MessageId, Envelope> = HashMap::new();
    while dead.len() < expected_dead {
        let delivery = tokio::time::timeout(WAIT, dead_letters.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} of {expected_dead} dead letters within {WAIT:?}: {:?}",
                    dead.len(),
                    dead.keys().collect::<Vec<_>>()
                )
            })
            .expect("the dead-letter subscription is open")
            .expect("no error from the dead-letter subscription");
        let envelope = delivery.envelope().clone();
        delivery.ack().await.expect("ack the dead letter");
        let id = envelope.id.clone();
        assert!(
            dead.insert(id.clone(), envelope).is_none(),
            "dead-lettered twice: {id}"
        );
    }
    let more = tokio::time::timeout(Duration::from_secs(2), dead_letters.next()).await;
    assert!(
        more.is_err(),
        "an unexpected dead letter: {:?}",
        more.ok().flatten().map(|d| d.map(|d| d.envelope().clone()))
    );
    dead_letters
        .close()
        .await
        .expect("close the dead-letter queue");

    let report = consumer.stop().await.expect("stop the consumer");
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    for case in &corpus {
        let id = case.id.as_ref().expect("produced");
        let attempts = seen.attempts.get(id).cloned().unwrap_or_default();
        match case.expect {
            Expect::Handled => {
                assert_eq!(attempts, [1, 2], "{}: attempts of {id}", case.name);
                assert!(!dead.contains_key(id), "{}: also dead-lettered", case.name);
                let envelopes = &seen.envelopes[id];
                // The second delivery came through the retry topic, encoded by the adapter:
                // it must read back exactly as the first.
                assert!(
                    envelopes.windows(2).all(|w| w[0] == w[1]),
                    "{}: the retry copy differs from the first delivery",
                    case.name
                );
                if let Some((what, holds)) = case.check {
                    assert!(
                        holds(&envelopes[0]),
                        "{}: {what}: {:?}",
                        case.name,
                        envelopes[0]
                    );
                }
                let kind = &envelopes[0].kind;
                println!(
                    "hostile adapter-kafka: {}: handled id={} kind={}",
                    case.name,
                    headers::shorten(id.as_str(), 40),
                    headers::shorten(kind, 40),
                );
            }
            Expect::DeadLettered(reason_part) => {
                let letter = dead
                    .get(id)
                    .unwrap_or_else(|| panic!("{}: no dead letter with id {id}", case.name));
                let reason = letter.header(headers::DLQ_REASON).unwrap_or_default();
                assert!(
                    reason.contains(reason_part),
                    "{}: reason {reason:?} does not say {reason_part:?}",
                    case.name
                );
                assert_eq!(
                    letter.header(headers::DLQ_ORIGINAL_TOPIC),
                    Some(queue.as_str()),
                    "{}",
                    case.name
                );
                assert_eq!(attempts.len(), wanted(case), "{}: handler runs", case.name);
                assert!(
                    attempts.iter().all(|a| *a <= MAX_DELIVERIES),
                    "{}: {attempts:?}",
                    case.name
                );
                let note = letter.header(headers::TRUNCATED);
                assert_eq!(note.is_some(), case.cut, "{}: {note:?}", case.name);
                if let Some(note) = note {
                    // The largest headers went; the payload and the reason stayed.
                    assert!(note.contains(",header:+"), "{note}");
                    assert!(note.contains(&format!(",original:{queue}/")), "{note}");
                    assert_eq!(
                        letter.payload.as_ref(),
                        case.raw.value.as_deref().unwrap_or_default(),
                        "{}: the raw body",
                        case.name
                    );
                    println!(
                        "hostile adapter-kafka: {}: dead-lettered reason={} (cut to fit: {})",
                        case.name,
                        headers::shorten(reason, 120),
                        headers::shorten(note, 160)
                    );
                } else {
                    assert_eq!(
                        letter.payload.as_ref(),
                        case.raw.value.as_deref().unwrap_or_default(),
                        "{}: the raw body",
                        case.name
                    );
                    println!(
                        "hostile adapter-kafka: {}: dead-lettered reason={}",
                        case.name,
                        headers::shorten(reason, 120)
                    );
                }
            }
        }
    }
    assert_eq!(report.panicked, 0, "{report:?}");
    broker.close().await.expect("close");
}

/// A nack with the largest delay there is parks the message (neither lost nor redelivered
/// soon) and panics nowhere; the subscription goes on. Before the fix, `SystemTime::now() +
/// Duration::MAX` panicked inside the settlement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_the_largest_delay_parks_the_message() {
    let Some((broker, _)) = broker().await else {
        return;
    };
    let queue = unique("parked");
    let mut sub = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    broker
        .send(&queue, Envelope::new("parked", "x"))
        .await
        .expect("send");
    let delivery = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a delivery in time")
        .expect("open")
        .expect("no error");
    delivery
        .nack(Redeliver::After(Duration::MAX))
        .await
        .map_err(|e| e.to_string())
        .expect("nack with Duration::MAX");
    broker
        .send(&queue, Envelope::new("next", "y"))
        .await
        .expect("send");
    let next = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("the next message in time")
        .expect("open")
        .expect("no error");
    assert_eq!(next.envelope().kind, "next");
    next.ack().await.expect("ack");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .is_err(),
        "the parked message came back at once"
    );
    sub.close().await.expect("close");
    broker.close().await.expect("close");
}

/// A Produce request (v3, one record batch of magic 2 holding one record) written by hand, for
/// what rdkafka's producer cannot send: header names that are not UTF-8, any record
/// timestamp, LogAppendTime.
mod frame {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use super::Raw;

    fn varint(out: &mut Vec<u8>, value: i64) {
        let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
        while zigzag >= 0x80 {
            out.push((zigzag as u8) | 0x80);
            zigzag >>= 7;
        }
        out.push(zigzag as u8);
    }

    fn bytes(out: &mut Vec<u8>, value: Option<&[u8]>) {
        match value {
            None => varint(out, -1),
            Some(v) => {
                varint(out, v.len() as i64);
                out.extend_from_slice(v);
            }
        }
    }

    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn record_batch(raw: &Raw, timestamp: i64) -> Vec<u8> {
        let mut body = vec![0u8]; // record attributes
        varint(&mut body, 0); // timestamp delta
        varint(&mut body, 0); // offset delta
        bytes(&mut body, raw.key.as_deref());
        bytes(&mut body, raw.value.as_deref());
        varint(&mut body, raw.headers.len() as i64);
        for (name, value) in &raw.headers {
            bytes(&mut body, Some(name));
            bytes(&mut body, value.as_deref());
        }
        let mut record = Vec::new();
        varint(&mut record, body.len() as i64);
        record.extend_from_slice(&body);

        let attributes: i16 = if raw.log_append_time { 0b1000 } else { 0 };
        let mut checked = Vec::new();
        checked.extend_from_slice(&attributes.to_be_bytes());
        checked.extend_from_slice(&0i32.to_be_bytes()); // last offset delta
        checked.extend_from_slice(&timestamp.to_be_bytes()); // base timestamp
        checked.extend_from_slice(&timestamp.to_be_bytes()); // max timestamp
        checked.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
        checked.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
        checked.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
        checked.extend_from_slice(&1i32.to_be_bytes()); // records
        checked.extend_from_slice(&record);

        let mut tail = Vec::new();
        tail.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
        tail.push(2); // magic
        tail.extend_from_slice(&crc32c(&checked).to_be_bytes());
        tail.extend_from_slice(&checked);
        let mut batch = Vec::new();
        batch.extend_from_slice(&0i64.to_be_bytes()); // base offset
        batch.extend_from_slice(&(tail.len() as i32).to_be_bytes());
        batch.extend_from_slice(&tail);
        batch
    }

    fn string(out: &mut Vec<u8>, text: &str) {
        out.extend_from_slice(&(text.len() as i16).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }

    /// Produces `raw` with `timestamp` to `topic`/`partition` on the first of `servers`;
    /// returns the record's offset.
    pub(super) fn produce(
        servers: &str,
        topic: &str,
        partition: i32,
        raw: &Raw,
        timestamp: i64,
    ) -> std::io::Result<i64> {
        let batch = record_batch(raw, timestamp);
        let mut request = Vec::new();
        request.extend_from_slice(&0i16.to_be_bytes()); // Produce
        request.extend_from_slice(&3i16.to_be_bytes()); // v3
        request.extend_from_slice(&7i32.to_be_bytes()); // correlation id
        string(&mut request, "bus-hostile-test");
        request.extend_from_slice(&(-1i16).to_be_bytes()); // no transactional id
        request.extend_from_slice(&(-1i16).to_be_bytes()); // acks = all
        request.extend_from_slice(&10_000i32.to_be_bytes());
        request.extend_from_slice(&1i32.to_be_bytes());
        string(&mut request, topic);
        request.extend_from_slice(&1i32.to_be_bytes());
        request.extend_from_slice(&partition.to_be_bytes());
        request.extend_from_slice(&(batch.len() as i32).to_be_bytes());
        request.extend_from_slice(&batch);

        let server = servers.split(',').next().unwrap_or(servers);
        let mut stream = TcpStream::connect(server)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(&(request.len() as i32).to_be_bytes())?;
        stream.write_all(&request)?;
        let mut size = [0u8; 4];
        stream.read_exact(&mut size)?;
        let mut response = vec![0u8; i32::from_be_bytes(size) as usize];
        stream.read_exact(&mut response)?;
        // correlation id, topics (1), topic name, partitions (1), partition, error, offset
        let mut at = 4 + 4;
        let name_len = i16::from_be_bytes([response[at], response[at + 1]]) as usize;
        at += 2 + name_len + 4 + 4;
        let error = i16::from_be_bytes([response[at], response[at + 1]]);
        at += 2;
        let offset = i64::from_be_bytes(response[at..at + 8].try_into().expect("8 bytes"));
        if error != 0 {
            return Err(std::io::Error::other(format!(
                "the broker refused the hand-written record: error code {error}"
            )));
        }
        Ok(offset)
    }
}
