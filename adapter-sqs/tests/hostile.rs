//! Hostile input on SQS (`BUS_TEST_SQS_URL`): what other services send with the plain SQS
//! client, read by a `bus` consumer with the retry and dead-letter flow a real service has.
//! Every message must be handled or dead-lettered with a reason, none redelivered more often
//! than the policy allows, and the consumer must keep going.
//!
//! What SQS itself refuses cannot arrive and is not in the corpus: empty bodies (moto takes
//! them, so one is sent anyway), more than 10
//! attributes (so "thousands of headers" arrive packed in `bus-packed`), attribute names with
//! other characters than `[A-Za-z0-9_.-]` (so no non-UTF-8 names; non-UTF-8 values arrive in
//! `Binary` attributes), and characters outside XML 1.0 in bodies and string values (control
//! characters arrive only escaped in `bus-packed` JSON).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use adapter_sqs::aws_sdk_sqs::primitives::Blob;
use adapter_sqs::aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName};
use adapter_sqs::{attributes, SqsBroker, SqsConfig};
use bus_core::conformance::broker_url;
use bus_core::middleware::{RetryLayer, RetryPolicy};
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo, HandlerBuilder};
use bus_core::{
    headers, Broker, ConsumeOptions, Envelope, Error, ErrorKind, Queue, Redeliver, Requester,
    Responder, ServeOptions, Support,
};
use tokio::sync::mpsc;

const MAX_DELIVERIES: u32 = 3;
const DEADLINE: Duration = Duration::from_secs(50);

async fn broker() -> Option<SqsBroker> {
    let url = broker_url("BUS_TEST_SQS_URL")?;
    let config = SqsConfig::from_url(&url)
        .expect("BUS_TEST_SQS_URL is an sqs:// URL")
        .with_wait_time(Duration::from_secs(1));
    Some(SqsBroker::connect_with(config).await.expect("connect"))
}

fn text(data_type: &str, value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type(data_type)
        .string_value(value)
        .build()
        .expect("a string attribute")
}

fn binary(data_type: &str, value: &[u8]) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type(data_type)
        .binary_value(Blob::new(value))
        .build()
        .expect("a binary attribute")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Handled,
    DeadLettered,
}

/// A check of the envelope a case was handled or dead-lettered with.
type Check = dyn Fn(&Envelope) -> Result<(), String> + Send + Sync;

/// One corpus message: how it is sent, what must become of it, and what to check on the
/// envelope the handler (or the dead-letter queue) got.
struct Case {
    name: &'static str,
    body: String,
    attributes: Vec<(String, MessageAttributeValue)>,
    /// The id it must be read with; `None`: SQS's message id.
    id: Option<String>,
    expect: Expect,
    check: Box<Check>,
}

fn case(name: &'static str, body: &str, expect: Expect) -> Case {
    Case {
        name,
        body: body.to_owned(),
        attributes: Vec::new(),
        id: None,
        expect,
        check: Box::new(|_| Ok(())),
    }
}

impl Case {
    /// With a `ce-id` (the id it must be read with) and `ce-specversion: 1.0`.
    fn cloudevent(mut self, id: &str) -> Self {
        self.attributes
            .push((attributes::CE_ID.into(), text("String", id)));
        self.attributes
            .push((attributes::CE_SPECVERSION.into(), text("String", "1.0")));
        self.id = Some(id.to_owned());
        self
    }

    /// The id it must be read with, set by its attributes.
    fn read_as(mut self, id: &str) -> Self {
        self.id = Some(id.to_owned());
        self
    }

    fn attribute(mut self, name: &str, value: MessageAttributeValue) -> Self {
        self.attributes.push((name.to_owned(), value));
        self
    }

    fn check(
        mut self,
        check: impl Fn(&Envelope) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.check = Box::new(check);
        self
    }
}

fn expect_eq<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn corpus(tag: &str) -> Vec<Case> {
    use Expect::{DeadLettered, Handled};
    let id = |n: &str| format!("{tag}-{n}");
    let packed_headers: serde_json::Map<String, serde_json::Value> = (0..2_000)
        .map(|i| (format!("h{i:04}"), serde_json::Value::from(format!("v{i}"))))
        .collect();
    let long = "x".repeat(50_000);
    let raw_time = |time: &'static str| {
        move |e: &Envelope| expect_eq("raw time header", e.header(headers::RAW_TIME), Some(time))
    };
    vec![
        case(
            "bare body, no attributes",
            "plain text from another service",
            Handled,
        )
        .check(|e| {
            expect_eq(
                "payload",
                e.payload.as_ref(),
                &b"plain text from another service"[..],
            )?;
            expect_eq("kind", e.kind.as_str(), "")?;
            expect_eq("correlation id", &e.correlation_id, &e.id)?;
            expect_eq("headers", e.headers.len(), 0)
        }),
        case(
            "bare body, fails once: same id on redelivery",
            "fail-once: bare",
            Handled,
        ),
        case("JSON body, no attributes", r#"{"order": 1}"#, Handled),
        case("body `null`", "null", Handled),
        case("body of one space", " ", Handled),
        // Real SQS refuses an empty body; moto takes it.
        case("empty body, no attributes", "", Handled)
            .check(|e| expect_eq("payload", e.payload.len(), 0)),
        case(
            "empty payload (`bus-body-encoding: empty`)",
            "(empty)",
            Handled,
        )
        .attribute(attributes::BODY_ENCODING, text("String", "empty"))
        .check(|e| expect_eq("payload", e.payload.len(), 0)),
        case("Number attribute", "n", Handled)
            .cloudevent(&id("number"))
            .attribute("priority", text("Number", "5"))
            .check(|e| expect_eq("priority", e.header("priority"), Some("5"))),
        case("custom types Number.int and String.foo", "n", Handled)
            .cloudevent(&id("custom"))
            .attribute("count", text("Number.int", "42"))
            .attribute("note", text("String.foo", "bar"))
            .check(|e| {
                expect_eq("count", e.header("count"), Some("42"))?;
                expect_eq("note", e.header("note"), Some("bar"))
            }),
        case("Binary attribute, UTF-8", "b", Handled)
            .cloudevent(&id("bin-utf8"))
            .attribute("blob", binary("Binary", b"text"))
            .check(|e| expect_eq("blob", e.header("blob"), Some("text"))),
        case("Binary.gif attribute, not UTF-8", "b", Handled)
            .cloudevent(&id("bin-raw"))
            .attribute("blob", binary("Binary.gif", &[0xff, 0x00, 0x80]))
            .check(|e| {
                expect_eq("blob", e.header("blob"), Some("/wCA"))?;
                expect_eq(
                    "binary list",
                    e.header(headers::BINARY_HEADERS),
                    Some("blob"),
                )
            }),
        case("ce-id and ce-type as Binary", "b", Handled)
            .attribute(attributes::CE_ID, binary("Binary", id("bin-id").as_bytes()))
            .attribute(
                attributes::CE_TYPE,
                binary("Binary", b"hostile.binary-type"),
            )
            .read_as(&id("bin-id"))
            .check(|e| expect_eq("kind", e.kind.as_str(), "hostile.binary-type")),
        case("bus-packed not JSON", "packed-1", DeadLettered)
            .cloudevent(&id("packed-text"))
            .attribute(attributes::PACKED, text("String", "not json"))
            .check(|e| expect_eq("kept", e.header(attributes::PACKED), Some("not json"))),
        case("bus-packed a JSON array", "packed-2", DeadLettered)
            .cloudevent(&id("packed-array"))
            .attribute(attributes::PACKED, text("String", "[1,2]")),
        case(
            "bus-packed with non-string values",
            "packed-3",
            DeadLettered,
        )
        .cloudevent(&id("packed-values"))
        .attribute(attributes::PACKED, text("String", r#"{"a":1,"b":null}"#)),
        case("bus-body-encoding unknown (gzip)", "H4sIAAAA", DeadLettered)
            .cloudevent(&id("enc-gzip"))
            .attribute(attributes::BODY_ENCODING, text("String", "gzip"))
            .check(|e| expect_eq("raw body", e.payload.as_ref(), &b"H4sIAAAA"[..])),
        case(
            "bus-body-encoding base64, body not base64",
            "%% not base64 %%",
            DeadLettered,
        )
        .cloudevent(&id("enc-bad"))
        .attribute(attributes::BODY_ENCODING, text("String", "base64"))
        .check(|e| expect_eq("raw body", e.payload.as_ref(), &b"%% not base64 %%"[..])),
        case("ce-specversion 9.9", "from the future", DeadLettered)
            .attribute(attributes::CE_ID, text("String", &id("spec-9.9")))
            .attribute(attributes::CE_SPECVERSION, text("String", "9.9"))
            .read_as(&id("spec-9.9"))
            .check(|e| {
                let reason = e.header(headers::DLQ_REASON).unwrap_or_default();
                expect_eq("reason names 9.9", reason.contains("9.9"), true)
            }),
        case("ce-specversion 0.3", "old", Handled)
            .attribute(attributes::CE_ID, text("String", &id("spec-0.3")))
            .attribute(attributes::CE_SPECVERSION, text("String", "0.3"))
            .read_as(&id("spec-0.3")),
        case("ce-time at the epoch", "t", Handled)
            .cloudevent(&id("time-0"))
            .attribute(attributes::CE_TIME, text("String", "1970-01-01T00:00:00Z"))
            .check(|e| expect_eq("time", e.timestamp, UNIX_EPOCH)),
        case("ce-time before 1970", "t", Handled)
            .cloudevent(&id("time-1969"))
            .attribute(attributes::CE_TIME, text("String", "1969-07-20T20:17:40Z"))
            .check(raw_time("1969-07-20T20:17:40Z")),
        case(
            "ce-time at the maximum (9999-12-31T23:59:59.999Z)",
            "t",
            Handled,
        )
        .cloudevent(&id("time-max"))
        .attribute(
            attributes::CE_TIME,
            text("String", "9999-12-31T23:59:59.999Z"),
        )
        .check(|e| expect_eq("time", e.timestamp, headers::max_time())),
        case("ce-time past year 9999", "t", Handled)
            .cloudevent(&id("time-10000"))
            .attribute(
                attributes::CE_TIME,
                text("String", "+10000-01-01T00:00:00Z"),
            )
            .check(raw_time("+10000-01-01T00:00:00Z")),
        case("ce-time not a time", "t", Handled)
            .cloudevent(&id("time-junk"))
            .attribute(attributes::CE_TIME, text("String", "yesterday"))
            .check(raw_time("yesterday")),
        case("50 KB id, type and correlation id", "long", Handled)
            .cloudevent(&format!("{}{long}", id("long")))
            .attribute(attributes::CE_TYPE, text("String", &long))
            .attribute(attributes::CORRELATION_ID, text("String", &long))
            .check(|e| expect_eq("kind length", e.kind.len(), 50_000)),
        case(
            "empty id, type and correlation id (in bus-packed)",
            "empty ids",
            Handled,
        )
        .attribute(
            attributes::PACKED,
            text("String", r#"{"ce-id":"","ce-type":"","ce-correlationid":""}"#),
        )
        .check(|e| {
            expect_eq("kind", e.kind.as_str(), "")?;
            expect_eq("correlation id", &e.correlation_id, &e.id)
        }),
        case(
            "2,000 headers (in bus-packed) with control characters",
            "many",
            Handled,
        )
        .cloudevent(&id("many-headers"))
        .attribute(
            attributes::PACKED,
            text("String", &{
                let mut all = packed_headers.clone();
                all.insert("ctl".into(), "\u{0}\u{1}\u{fffe}".into());
                serde_json::Value::Object(all).to_string()
            }),
        )
        .check(|e| {
            expect_eq("header count", e.headers.len(), 2_001)?;
            expect_eq("ctl", e.header("ctl"), Some("\u{0}\u{1}\u{fffe}"))
        }),
        case("attribute names at SQS's limits", "names", Handled)
            .cloudevent(&id("names"))
            .attribute(&"n".repeat(256), text("String", "long name"))
            .attribute("a.b_c-D", text("String", "dots"))
            .check(|e| expect_eq("long name", e.header(&"n".repeat(256)), Some("long name"))),
        case(
            "poison: the handler fails every time",
            "fail-always: poison",
            DeadLettered,
        )
        .cloudevent(&id("poison"))
        .check(|e| expect_eq("attempts", e.header(headers::DLQ_ATTEMPTS), Some("3"))),
        case(
            "poison with a 200 KiB non-UTF-8 Binary attribute (267 KiB as a header, shortened in its dead letter)",
            "fail-always: big",
            DeadLettered,
        )
        .cloudevent(&id("big-binary"))
        .attribute("blob", binary("Binary", &vec![0xfe; 200 * 1024]))
        .check(|e| {
            // Shortened to 1 KiB of whole base64 groups, still listed as binary.
            expect_eq("blob shortened", e.header("blob").map(str::len), Some(1024))?;
            expect_eq(
                "binary list kept",
                e.header(headers::BINARY_HEADERS),
                Some("blob"),
            )?;
            expect_eq(
                "truncation note",
                e.header(headers::TRUNCATED),
                Some("value:blob"),
            )
        }),
    ]
}

/// What the handler and the dead-letter reader saw, by envelope id.
#[derive(Default)]
struct Seen {
    attempts: HashMap<String, Vec<u32>>,
    handled: HashMap<String, Envelope>,
    dead: HashMap<String, Envelope>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_handled_or_dead_lettered() {
    let Some(broker) = broker().await else {
        return;
    };
    let queue = format!("hostile.{}", uuid::Uuid::now_v7());
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (progress_tx, mut progress) = mpsc::unbounded_channel::<()>();

    let handler = handler_fn({
        let (seen, progress) = (seen.clone(), progress_tx.clone());
        move |envelope: Envelope, info: DeliveryInfo| {
            let id = envelope.id.to_string();
            let fails = envelope.payload.starts_with(b"fail-always")
                || (envelope.payload.starts_with(b"fail-once") && info.attempt() == 1);
            let mut seen = seen.lock().unwrap();
            seen.attempts
                .entry(id.clone())
                .or_default()
                .push(info.attempt());
            if !fails {
                seen.handled.insert(id, envelope);
            }
            drop(seen);
            let _ = progress.send(());
            async move {
                if fails {
                    Err(Error::new(
                        ErrorKind::Handler,
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
    let subscription = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .unwrap();
    let consumer = Consumer::new(subscription, handler)
        .with_concurrency(4)
        .spawn();

    let mut dead_letters = broker
        .consume(
            &headers::dead_letter_queue(&queue),
            ConsumeOptions::default(),
        )
        .await
        .unwrap();
    let reader = tokio::spawn({
        let (seen, progress) = (seen.clone(), progress_tx.clone());
        async move {
            while let Some(delivery) = dead_letters.next().await {
                let Ok(delivery) = delivery else { continue };
                let envelope = delivery.envelope().clone();
                delivery.ack().await.unwrap();
                seen.lock()
                    .unwrap()
                    .dead
                    .insert(envelope.id.to_string(), envelope);
                let _ = progress.send(());
            }
        }
    });

    // The corpus, sent with the plain client; SQS's message id stands in for missing ids.
    let url = broker
        .sqs_client()
        .get_queue_url()
        .queue_name(broker.queue_name(&queue))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    let mut corpus = corpus(&tag);
    for case in &mut corpus {
        let mut send = broker
            .sqs_client()
            .send_message()
            .queue_url(&url)
            .message_body(&case.body);
        for (name, value) in &case.attributes {
            send = send.message_attributes(name, value.clone());
        }
        let sent = send
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: SQS refused it: {e:?}", case.name));
        if case.id.is_none() {
            case.id = sent.message_id().map(str::to_owned);
        }
    }
    let good = Envelope::new("hostile.good", "after the corpus");
    broker.send(&queue, good.clone()).await.unwrap();

    let done = |seen: &Seen| {
        seen.handled.contains_key(good.id.as_str())
            && corpus.iter().all(|case| {
                let id = case.id.as_deref().unwrap_or_default();
                match case.expect {
                    Expect::Handled => seen.handled.contains_key(id),
                    Expect::DeadLettered => seen.dead.contains_key(id),
                }
            })
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !done(&seen.lock().unwrap()) {
        if tokio::time::timeout_at(deadline, progress.recv())
            .await
            .is_err()
        {
            break;
        }
    }
    let report = consumer.stop().await.expect("the consumer was running");
    reader.abort();

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let mut failures = Vec::new();
    for case in &corpus {
        let id = case.id.clone().unwrap_or_default();
        let attempts = seen.attempts.get(&id).cloned().unwrap_or_default();
        let line = match (seen.handled.get(&id), seen.dead.get(&id)) {
            (Some(e), _) => {
                format!(
                    "handled id={} kind={}",
                    headers::shorten(&id, 60),
                    headers::shorten(&e.kind, 40)
                )
            }
            (None, Some(e)) => format!(
                "dead-lettered reason={}",
                e.header(headers::DLQ_REASON).unwrap_or("(none)")
            ),
            (None, None) => "neither handled nor dead-lettered".to_owned(),
        };
        println!("hostile adapter-sqs: {}: {line}", case.name);
        let outcome = match (seen.handled.get(&id), seen.dead.get(&id)) {
            (Some(e), None) => Some((Expect::Handled, e)),
            (None, Some(e)) => Some((Expect::DeadLettered, e)),
            _ => None,
        };
        match outcome {
            Some((got, envelope)) if got == case.expect => {
                if let Err(problem) = (case.check)(envelope) {
                    failures.push(format!("{}: {problem}", case.name));
                }
            }
            other => failures.push(format!(
                "{}: expected {:?}, got {:?}",
                case.name,
                case.expect,
                other.map(|(got, _)| got)
            )),
        }
        if attempts.iter().any(|a| *a > MAX_DELIVERIES) {
            failures.push(format!(
                "{}: attempts {attempts:?} beyond the policy",
                case.name
            ));
        }
        if case.expect == Expect::DeadLettered && !case.body.starts_with("fail-always") {
            // Undecodable: dead-lettered without running the handler.
            if !attempts.is_empty() {
                failures.push(format!("{}: the handler saw it ({attempts:?})", case.name));
            }
        }
        if case.body.starts_with("fail-always") && attempts != [1, 2, 3] {
            failures.push(format!(
                "{}: attempts {attempts:?}, want [1, 2, 3]",
                case.name
            ));
        }
        if case.body.starts_with("fail-once") && attempts != [1, 2] {
            failures.push(format!(
                "{}: attempts {attempts:?} under one id, want [1, 2]",
                case.name
            ));
        }
    }
    assert!(
        seen.handled.contains_key(good.id.as_str()),
        "the good message was not handled"
    );
    let expected: Vec<&str> = corpus.iter().filter_map(|c| c.id.as_deref()).collect();
    for (id, envelope) in seen.handled.iter().chain(&seen.dead) {
        if !expected.contains(&id.as_str()) && id != good.id.as_str() {
            failures.push(format!(
                "an unexpected message: id={} kind={}",
                headers::shorten(id, 60),
                envelope.kind
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(report.receive_errors, 0, "{report:?}");
    assert_eq!(report.panicked, 0, "{report:?}");
    let undecodable = corpus
        .iter()
        .filter(|c| c.expect == Expect::DeadLettered && !c.body.starts_with("fail-always"))
        .count();
    assert_eq!(report.undecodable, undecodable as u64, "{report:?}");
    broker.close().await.unwrap();
}

/// A message whose handler kills the process (here: its delivery is leaked, so nothing settles
/// it and SQS hands it out again after the visibility timeout) counts up across those crashes,
/// under the same id, so the retry policy dead-letters it without running the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_count_across_crashes_under_one_id() {
    let Some(url) = broker_url("BUS_TEST_SQS_URL") else {
        return;
    };
    let connect = || async {
        let config = SqsConfig::from_url(&url)
            .unwrap()
            .with_wait_time(Duration::from_secs(1))
            .with_visibility_timeout(Duration::from_secs(1))
            .with_pollers(1)
            .with_prefetch(1);
        SqsBroker::connect_with(config).await.expect("connect")
    };
    let first = connect().await;
    assert_eq!(first.capabilities().delivery_count, Support::Native);
    let queue = format!("hostile.crash.{}", uuid::Uuid::now_v7());
    let mut ids = Vec::new();
    let mut sub = first
        .consume(&queue, ConsumeOptions::default())
        .await
        .unwrap();
    let url_of_queue = first
        .sqs_client()
        .get_queue_url()
        .queue_name(first.queue_name(&queue))
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    first
        .sqs_client()
        .send_message()
        .queue_url(&url_of_queue)
        .message_body("no id, kills its handler")
        .send()
        .await
        .unwrap();
    for crash in 1..=MAX_DELIVERIES {
        let delivery = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("redelivered after the visibility timeout")
            .unwrap()
            .unwrap();
        assert_eq!(delivery.attempt(), crash);
        ids.push(delivery.envelope().id.clone());
        // The process dies with the message in hand: nothing settles it.
        std::mem::forget(delivery);
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    sub.close().await.unwrap();

    // A restarted service: the next delivery is past the policy's maximum.
    let restarted = connect().await;
    let (tx, mut handled) = mpsc::unbounded_channel();
    let handler = HandlerBuilder::new()
        .layer(RetryLayer::new(
            RetryPolicy::new().with_max_deliveries(MAX_DELIVERIES),
        ))
        .handler(handler_fn(move |_: Envelope, info: DeliveryInfo| {
            let _ = tx.send(info.attempt());
            async { Err::<(), _>(Error::new(ErrorKind::Handler, "still failing")) }
        }));
    let consumer = Consumer::new(
        restarted
            .consume(&queue, ConsumeOptions::default())
            .await
            .unwrap(),
        handler,
    )
    .spawn();
    let mut dlq = restarted
        .consume(
            &headers::dead_letter_queue(&queue),
            ConsumeOptions::default(),
        )
        .await
        .unwrap();
    let dead = tokio::time::timeout(Duration::from_secs(20), dlq.next())
        .await
        .expect("dead-lettered")
        .unwrap()
        .unwrap();
    assert_eq!(dead.envelope().id, ids[0]);
    // Past the maximum: one more receive than the crashes, or two when the first
    // subscription's long poll, still running as it closed, took the message once more when
    // it came back (SQS counts that receive; the closing subscription hands it back at once).
    let attempts: u32 = dead
        .envelope()
        .header(headers::DLQ_ATTEMPTS)
        .and_then(|a| a.parse().ok())
        .expect("a dead letter names its attempts");
    assert!(
        (MAX_DELIVERIES + 1..=MAX_DELIVERIES + 2).contains(&attempts),
        "dead-lettered at attempt {attempts}"
    );
    let reason = dead.envelope().header(headers::DLQ_REASON).unwrap();
    assert!(reason.contains("gave up after"), "{reason}");
    // Dead-lettered unrun: the handler was not called for the delivery past the maximum.
    assert_eq!(handled.try_recv(), Err(mpsc::error::TryRecvError::Empty));
    dead.ack().await.unwrap();
    let report = consumer.stop().await.unwrap();
    assert_eq!(report.rejected, 1, "{report:?}");
    dlq.close().await.unwrap();
    restarted.close().await.unwrap();
    first.close().await.unwrap();
}

/// Huge delays and timeouts saturate instead of panicking. Before: `nack(After(Duration::MAX))`
/// overflowed rounding up to whole seconds, and a request with `Duration::MAX` overflowed its
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_durations_saturate() {
    let Some(broker) = broker().await else {
        return;
    };
    let queue = format!("hostile.durations.{}", uuid::Uuid::now_v7());
    broker.send(&queue, Envelope::new("k", "v")).await.unwrap();
    let mut sub = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("in time")
        .unwrap()
        .unwrap();
    delivery
        .nack(Redeliver::After(Duration::MAX))
        .await
        .expect("a 12-hour visibility");
    sub.close().await.unwrap();

    let topic = format!("hostile.request.{}", uuid::Uuid::now_v7());
    let mut requests = broker.serve(&topic, ServeOptions::default()).await.unwrap();
    let responder = tokio::spawn(async move {
        let request = requests.next().await.unwrap().unwrap();
        let reply = Envelope::new("pong", "pong").caused_by(request.envelope());
        request.reply(reply).await.unwrap();
        requests.close().await.unwrap();
    });
    let reply = broker
        .request(&topic, Envelope::new("ping", "ping"), Duration::MAX)
        .await
        .unwrap();
    assert_eq!(reply.payload.as_ref(), b"pong");
    responder.await.unwrap();
    broker.close().await.unwrap();
}

/// An undecodable request is deleted and skipped (requests have no dead-letter queue; its
/// requester times out). Before: it was handed to the responder as if it were fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_skipped() {
    let Some(broker) = broker().await else {
        return;
    };
    // Letters and digits only, so the request queue's name starts with the topic.
    let topic = format!("hostilerequests{}", uuid::Uuid::now_v7().simple());
    let mut requests = broker.serve(&topic, ServeOptions::default()).await.unwrap();
    let listed = broker
        .sqs_client()
        .list_queues()
        .queue_name_prefix(&topic)
        .send()
        .await
        .unwrap();
    let [url] = listed.queue_urls() else {
        panic!("one request queue: {listed:?}");
    };
    broker
        .sqs_client()
        .send_message()
        .queue_url(url)
        .message_body("a request from another service")
        .message_attributes(attributes::PACKED, text("String", "not json"))
        .message_attributes(attributes::REPLY_TO, text("String", url))
        .send()
        .await
        .unwrap();
    let requester = tokio::spawn({
        let broker = broker.clone();
        let topic = topic.clone();
        async move {
            broker
                .request(
                    &topic,
                    Envelope::new("good", "ping"),
                    Duration::from_secs(30),
                )
                .await
        }
    });
    let request = tokio::time::timeout(Duration::from_secs(20), requests.next())
        .await
        .expect("a request in time")
        .unwrap()
        .unwrap();
    assert_eq!(request.envelope().kind, "good");
    let reply = Envelope::new("pong", "pong").caused_by(request.envelope());
    request.reply(reply).await.unwrap();
    assert_eq!(requester.await.unwrap().unwrap().payload.as_ref(), b"pong");
    // Both were deleted as they were taken.
    let left = broker
        .sqs_client()
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap();
    let counts = left.attributes().cloned().unwrap_or_default();
    assert!(
        counts.len() == 2 && counts.values().all(|n| n == "0"),
        "{counts:?}"
    );
    requests.close().await.unwrap();
    broker.close().await.unwrap();
}
