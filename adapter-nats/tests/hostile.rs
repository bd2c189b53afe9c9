//! A hostile corpus: what other services, other clients and hand-written protocol can put on a
//! queue that a `bus` consumer reads (`BUS_TEST_NATS_URL`). Sent with plain `async-nats`, or
//! with the NATS protocol written by hand over TCP where the client refuses to build the
//! message (header blocks that are not UTF-8, lines without a colon, status lines), onto the
//! queue's JetStream subject, while a `Consumer` with the retry middleware consumes it as a
//! real service would. Then one good message.
//!
//! Every corpus message must be handled or dead-lettered with a reason, as the case expects,
//! none delivered more often than the retry policy allows; the consumer must still run and the
//! good message must be handled. One line per case is printed:
//! `hostile adapter-nats: <case>: handled id=<id> kind=<kind>` or
//! `hostile adapter-nats: <case>: dead-lettered reason=<reason>`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use adapter_nats::NatsBroker;
use async_nats::jetstream::consumer::PullConsumer;
use bus_core::conformance::broker_url;
use bus_core::middleware::{RetryLayer, RetryPolicy};
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo, HandlerBuilder};
use bus_core::{headers, ConsumeOptions, Envelope, Error, ErrorKind, Queue, SubscribeOptions};
use bus_core::{Broker, Subscriber};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The durable consumer every consumer of a queue shares (docs/adapters/nats.md).
const QUEUE_CONSUMER: &str = "workers";

/// Deliveries the retry policy allows.
const MAX_DELIVERIES: u32 = 3;

fn unique(tag: &str) -> String {
    format!("hostile.{tag}.{}", bus_core::MessageId::new())
}

/// What a case must come to.
#[derive(Debug, Clone)]
enum Expect {
    /// Handled (acked by the handler), checked by the function.
    Handled(fn(&Envelope) -> bool),
    /// Dead-lettered, the reason containing this text.
    DeadLettered(&'static str),
}

/// One corpus message as sent: its case, the id it must arrive with, what it must come to.
struct Sent {
    case: &'static str,
    id: String,
    expect: Expect,
}

/// A NATS client written by hand: publishes any header block, and reads the PubAck.
struct RawNats {
    socket: TcpStream,
    buffer: Vec<u8>,
    /// Where its PubAcks come: its own, as tests run side by side.
    inbox: String,
}

impl RawNats {
    async fn connect(url: &str) -> Self {
        let address = url
            .trim_start_matches("nats://")
            .split(['/', '?'])
            .next()
            .expect("host:port");
        let socket = TcpStream::connect(address).await.expect("raw TCP connect");
        let mut raw = Self {
            socket,
            buffer: Vec::new(),
            inbox: format!("_INBOX.hostile.{}", bus_core::MessageId::new()),
        };
        let info = raw.line().await;
        assert!(info.starts_with(b"INFO "), "the server greets with INFO");
        raw.socket
            .write_all(
                format!(
                    "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\
                     \"protocol\":1}}\r\nSUB {} 1\r\n",
                    raw.inbox
                )
                .as_bytes(),
            )
            .await
            .expect("raw CONNECT");
        raw
    }

    async fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(at) = self.buffer.windows(2).position(|w| w == b"\r\n") {
                let line = self.buffer[..at].to_vec();
                self.buffer.drain(..at + 2);
                return line;
            }
            self.fill().await;
        }
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), self.socket.read(&mut chunk))
            .await
            .expect("the server answers in time")
            .expect("raw read");
        assert!(n > 0, "the server closed the raw connection");
        self.buffer.extend_from_slice(&chunk[..n]);
    }

    /// Publishes `block` (the whole header block) and `payload` to `subject` on JetStream;
    /// returns the stream sequence from the PubAck.
    async fn publish(&mut self, subject: &str, block: &[u8], payload: &[u8]) -> u64 {
        let mut frame = format!(
            "HPUB {subject} {} {} {}\r\n",
            self.inbox,
            block.len(),
            block.len() + payload.len()
        )
        .into_bytes();
        frame.extend_from_slice(block);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.socket.write_all(&frame).await.expect("raw HPUB");
        loop {
            let line = self.line().await;
            if line == b"PING" {
                self.socket.write_all(b"PONG\r\n").await.expect("PONG");
                continue;
            }
            assert!(
                !line.starts_with(b"-ERR"),
                "the server refused: {}",
                String::from_utf8_lossy(&line)
            );
            if !line.starts_with(b"MSG ") {
                continue;
            }
            let size: usize = String::from_utf8_lossy(&line)
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("MSG size");
            while self.buffer.len() < size + 2 {
                self.fill().await;
            }
            let body: Vec<u8> = self.buffer.drain(..size + 2).take(size).collect();
            let ack: serde_json::Value = serde_json::from_slice(&body).expect("PubAck JSON");
            return ack["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("the server did not store it: {ack}"));
        }
    }
}

fn block(lines: &[&[u8]]) -> Vec<u8> {
    let mut block = b"NATS/1.0\r\n".to_vec();
    for line in lines {
        block.extend_from_slice(line);
        block.extend_from_slice(b"\r\n");
    }
    block.extend_from_slice(b"\r\n");
    block
}

fn has_raw_time(e: &Envelope) -> bool {
    e.header(headers::RAW_TIME).is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_corpus_on_a_jetstream_queue() {
    let Some(url) = broker_url("BUS_TEST_NATS_URL") else {
        return;
    };
    let separator = if url.contains('?') { '&' } else { '?' };
    // A short ack wait: messages lost with a dropped connection come back within the test.
    let bus = NatsBroker::connect(&format!("{url}{separator}ack_wait_ms=4000"))
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.expect("raw"));
    let mut raw = RawNats::connect(&url).await;
    let queue = unique("queue");
    let subject = bus.queue_subject(&queue);
    let stream = bus.queue_stream(&queue);
    let max_payload = bus.capabilities().max_payload_bytes.expect("max_payload");

    let (handled_tx, mut handled) = mpsc::unbounded_channel::<(Envelope, u32)>();
    let handler = handler_fn(move |envelope: Envelope, info: DeliveryInfo| {
        let fails = envelope.payload.starts_with(b"fail");
        let _ = handled_tx.send((envelope, info.attempt()));
        async move {
            if fails {
                Err(Error::new(
                    ErrorKind::Timeout,
                    "downstream keeps timing out",
                ))
            } else {
                Ok(())
            }
        }
    });
    let policy = RetryPolicy::new()
        .with_immediate_retries(0, Duration::ZERO)
        .with_max_deliveries(MAX_DELIVERIES)
        .with_backoff(Duration::from_millis(20), 2.0, Duration::from_millis(100));
    let handler = HandlerBuilder::new()
        .layer(RetryLayer::new(policy))
        .handler(handler);
    let subscription = bus
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let consumer = Consumer::new(subscription, handler)
        .with_concurrency(4)
        .spawn();

    let mut sent: Vec<Sent> = Vec::new();
    let seq_id = |seq: u64| format!("{stream}:{seq}");

    // Through async-nats: what another service's client can send.
    let publish = |headers: async_nats::HeaderMap, payload: Bytes| {
        let js = js.clone();
        let subject = subject.clone();
        async move {
            js.publish_with_headers(subject, headers, payload)
                .await
                .expect("publish")
                .await
                .expect("stored")
                .sequence
        }
    };
    let h = |pairs: &[(&str, &str)]| {
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, *value);
        }
        map
    };

    let seq = publish(h(&[]), Bytes::from_static(b"bare body")).await;
    sent.push(Sent {
        case: "bare body, no headers",
        id: seq_id(seq),
        expect: Expect::Handled(|e| e.kind.starts_with("hostile.queue.")),
    });
    let seq = publish(h(&[]), Bytes::new()).await;
    sent.push(Sent {
        case: "empty payload, no headers",
        id: seq_id(seq),
        expect: Expect::Handled(|e| e.payload.is_empty()),
    });
    let seq = publish(h(&[("x-only", "headers")]), Bytes::new()).await;
    sent.push(Sent {
        case: "only headers, empty body",
        id: seq_id(seq),
        expect: Expect::Handled(|e| e.header("x-only") == Some("headers")),
    });
    let seq = publish(h(&[]), Bytes::from_static(b"\xff\xfe\x00 not UTF-8")).await;
    sent.push(Sent {
        case: "non-UTF-8 payload",
        id: seq_id(seq),
        expect: Expect::Handled(|e| e.payload.starts_with(b"\xff\xfe")),
    });
    for (case, time, expect) in [
        (
            "ce-time at 0 (1970-01-01)",
            "1970-01-01T00:00:00Z",
            Expect::Handled(|e| e.timestamp == SystemTime::UNIX_EPOCH),
        ),
        (
            "ce-time before 1970",
            "1969-07-20T20:17:40Z",
            Expect::Handled(|e| has_raw_time(e) || e.timestamp < SystemTime::UNIX_EPOCH),
        ),
        (
            "ce-time at the maximum (9999-12-31)",
            "9999-12-31T23:59:59.999Z",
            Expect::Handled(|e| e.timestamp == headers::max_time()),
        ),
        (
            "ce-time past year 9999",
            "10000-01-01T00:00:00Z",
            Expect::Handled(has_raw_time),
        ),
        (
            "ce-time i64::MAX seconds",
            "9223372036854775807",
            Expect::Handled(has_raw_time),
        ),
        (
            "ce-time unparseable",
            "yesterday at noon",
            Expect::Handled(has_raw_time),
        ),
    ] {
        let id = format!("time-{}", bus_core::MessageId::new());
        publish(h(&[("ce-id", &id), ("ce-time", time)]), Bytes::new()).await;
        sent.push(Sent { case, id, expect });
    }
    let seq = publish(h(&[("ce-id", ""), ("ce-type", "")]), Bytes::new()).await;
    sent.push(Sent {
        case: "empty ce-id and ce-type",
        id: seq_id(seq),
        expect: Expect::Handled(|e| e.kind.is_empty()),
    });
    // JetStream stores at most 64 KiB of headers with a message.
    let long_id = "i".repeat(20_000);
    let long = "t".repeat(20_000);
    publish(
        h(&[
            ("ce-id", &long_id),
            ("ce-type", &long),
            ("ce-correlationid", &long),
        ]),
        Bytes::new(),
    )
    .await;
    sent.push(Sent {
        case: "20 kB id, type and correlation id",
        id: long_id,
        expect: Expect::Handled(|e| {
            e.kind.len() == 20_000 && e.correlation_id.as_str().len() == 20_000
        }),
    });
    let huge_id = "j".repeat(60_000);
    publish(
        h(&[("ce-id", &huge_id)]),
        Bytes::from_static(b"fail with a 60 kB id"),
    )
    .await;
    sent.push(Sent {
        case: "60 kB id, handler fails every time",
        id: headers::shorten(&huge_id, 1024).into_owned(),
        expect: Expect::DeadLettered("gave up after 3 deliveries"),
    });
    let mut many = async_nats::HeaderMap::new();
    for i in 0..4000 {
        many.insert(format!("x-h-{i}").as_str(), "v");
    }
    let seq = publish(many, Bytes::from_static(b"many")).await;
    sent.push(Sent {
        case: "4000 headers",
        id: seq_id(seq),
        expect: Expect::Handled(|e| e.headers.len() >= 4000),
    });
    let id = format!("msgid-{}", bus_core::MessageId::new());
    publish(h(&[("Nats-Msg-Id", &id)]), Bytes::new()).await;
    sent.push(Sent {
        case: "Nats-Msg-Id without ce-id",
        id,
        expect: Expect::Handled(|_| true),
    });
    let id = format!("spec-{}", bus_core::MessageId::new());
    publish(
        h(&[("ce-specversion", "9.9"), ("ce-id", &id), ("ce-type", "x")]),
        Bytes::from_static(b"from the future"),
    )
    .await;
    sent.push(Sent {
        case: "unknown CloudEvents specversion 9.9",
        id,
        expect: Expect::DeadLettered("9.9"),
    });
    let seq = publish(h(&[]), Bytes::from_static(b"fail every time")).await;
    sent.push(Sent {
        case: "handler fails every time (id-less)",
        id: seq_id(seq),
        expect: Expect::DeadLettered("gave up after 3 deliveries"),
    });
    let mut big = b"fail".to_vec();
    big.resize(max_payload - 16, b'.');
    let seq = publish(h(&[]), Bytes::from(big)).await;
    sent.push(Sent {
        case: "payload at max_payload, handler fails every time",
        id: seq_id(seq),
        expect: Expect::DeadLettered("gave up after 3 deliveries"),
    });
    let mut full = async_nats::HeaderMap::new();
    // Stored as sent; its dead letter, with the CloudEvents and dead-letter headers added,
    // is not.
    let mut room = 65_535 - 128;
    let mut i = 0;
    while room > 64 {
        let name = format!("x-fill-{i}");
        room -= name.len() + 4 + 10;
        full.insert(name.as_str(), "0123456789");
        i += 1;
    }
    let seq = publish(full, Bytes::from_static(b"fail with 64 KiB of headers")).await;
    sent.push(Sent {
        case: "headers filling JetStream's 64 KiB, handler fails every time",
        id: seq_id(seq),
        expect: Expect::DeadLettered("gave up after 3 deliveries"),
    });

    // Written by hand: header blocks async-nats will not build, some of which it cannot read.
    for (case, block, expect) in [
        (
            "status line 408 Request Timeout in a stored message",
            b"NATS/1.0 408 Request Timeout\r\nx: y\r\n\r\n".to_vec(),
            Expect::DeadLettered("408"),
        ),
        (
            "status line 100 Idle Heartbeat in a stored message",
            b"NATS/1.0 100 Idle Heartbeat\r\n\r\n".to_vec(),
            Expect::DeadLettered("100"),
        ),
        (
            "status line 503 in a stored message",
            b"NATS/1.0 503\r\n\r\n".to_vec(),
            Expect::DeadLettered("503"),
        ),
        (
            "non-UTF-8 header value",
            block(&[b"x-bin: \xff\xfe\x80"]),
            Expect::DeadLettered("UTF-8"),
        ),
        (
            "non-UTF-8 header name",
            block(&[b"x-\xff: v"]),
            Expect::DeadLettered("UTF-8"),
        ),
        (
            "header line without a colon",
            block(&[b"x-ok: 1", b"no colon here"]),
            Expect::DeadLettered("colon"),
        ),
        (
            "header name with a space (as a Go service may write)",
            block(&[b"Tenant Name: acme"]),
            Expect::DeadLettered("header name"),
        ),
        (
            "non-numeric status",
            b"NATS/1.0 abc\r\n\r\n".to_vec(),
            Expect::DeadLettered("status"),
        ),
        (
            "version line not NATS/1.0",
            b"HTTP/1.1 200 OK\r\nx: y\r\n\r\n".to_vec(),
            Expect::DeadLettered("NATS/1.0"),
        ),
    ] {
        let seq = raw.publish(&subject, &block, b"raw body").await;
        sent.push(Sent {
            case,
            id: seq_id(seq),
            expect,
        });
    }

    let good = Envelope::new("hostile.good", "sent after the corpus");
    // The corpus may be cutting the connection right now: send again on retryable errors, as
    // a service would (a second copy, should the first have been stored, is fine).
    let mut tries = 0;
    while let Err(error) = bus.send(&queue, good.clone()).await {
        tries += 1;
        assert!(
            error.is_retryable() && tries < 5,
            "send the good message: {error:?}"
        );
    }

    // Dead letters, read as they come.
    let (dead_tx, mut dead) = mpsc::unbounded_channel::<Envelope>();
    let mut dlq = consume_retrying(&bus, &headers::dead_letter_queue(&queue)).await;
    let reader = tokio::spawn(async move {
        while let Some(Ok(delivery)) = dlq.next().await {
            let _ = dead_tx.send(delivery.envelope().clone());
            let _ = delivery.ack().await;
        }
    });

    let expected_dead = sent
        .iter()
        .filter(|s| matches!(s.expect, Expect::DeadLettered(_)))
        .count();
    let mut runs: HashMap<String, Vec<(Envelope, u32)>> = HashMap::new();
    let mut dead_letters: HashMap<String, Envelope> = HashMap::new();
    let mut good_handled = false;
    let done = |runs: &HashMap<String, Vec<(Envelope, u32)>>, dead: &HashMap<String, Envelope>| {
        dead.len() >= expected_dead
            && sent.iter().all(|s| match s.expect {
                Expect::Handled(_) => runs.contains_key(&s.id),
                Expect::DeadLettered(_) => dead.contains_key(&s.id),
            })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    while !(good_handled && done(&runs, &dead_letters)) {
        tokio::select! {
            Some((envelope, attempt)) = handled.recv() => {
                if envelope.id == good.id {
                    good_handled = true;
                }
                runs.entry(envelope.id.to_string()).or_default().push((envelope, attempt));
            }
            Some(envelope) = dead.recv() => {
                dead_letters.insert(envelope.id.to_string(), envelope);
            }
            () = tokio::time::sleep_until(deadline) => {
                let missing: Vec<_> = sent
                    .iter()
                    .filter(|s| match s.expect {
                        Expect::Handled(_) => !runs.contains_key(&s.id),
                        Expect::DeadLettered(_) => !dead_letters.contains_key(&s.id),
                    })
                    .map(|s| s.case)
                    .collect();
                let dead_ids: Vec<_> =
                    dead_letters.keys().map(|id| headers::shorten(id, 40)).collect();
                panic!(
                    "not everything came to what it should in time: good handled: \
                     {good_handled}; cases not yet as expected: {missing:?}; dead letters: \
                     {dead_ids:?}; consumer finished: {}",
                    consumer.is_finished()
                );
            }
        }
    }
    assert!(
        !consumer.is_finished(),
        "the consumer stopped during the corpus"
    );

    let mut failures = Vec::new();
    for s in &sent {
        let short = headers::shorten(&s.id, 96);
        match (&s.expect, runs.get(&s.id), dead_letters.get(&s.id)) {
            (Expect::Handled(check), Some(seen), None) => {
                let (envelope, _) = &seen[0];
                println!(
                    "hostile adapter-nats: {}: handled id={short} kind={}",
                    s.case,
                    headers::shorten(&envelope.kind, 48)
                );
                if seen.len() != 1 || !check(envelope) {
                    failures.push(format!(
                        "{}: handled {} times, check {}",
                        s.case,
                        seen.len(),
                        check(envelope)
                    ));
                }
            }
            (Expect::DeadLettered(needle), seen, Some(envelope)) => {
                let reason = envelope.header(headers::DLQ_REASON).unwrap_or_default();
                println!(
                    "hostile adapter-nats: {}: dead-lettered reason={}",
                    s.case,
                    headers::shorten(reason, 200)
                );
                if !reason.contains(needle) {
                    failures.push(format!("{}: reason {reason:?} lacks {needle:?}", s.case));
                }
                let runs = seen.map_or(0, Vec::len);
                let attempts: Vec<u32> = seen
                    .map(|v| v.iter().map(|r| r.1).collect())
                    .unwrap_or_default();
                if runs > MAX_DELIVERIES as usize || attempts.iter().any(|a| *a > MAX_DELIVERIES) {
                    failures.push(format!(
                        "{}: handler ran {runs} times, attempts {attempts:?}",
                        s.case
                    ));
                }
                // A delivery can be lost with a connection the corpus cuts (JetStream counts it
                // and sends the message again after the ack wait): attempts may skip one.
                if s.case.starts_with("handler fails")
                    && (attempts.first() != Some(&1) || !attempts.windows(2).all(|w| w[0] < w[1]))
                {
                    failures.push(format!(
                        "{}: the id-less message was not seen with one id on rising attempts from 1: {attempts:?}",
                        s.case
                    ));
                }
                let dead_attempts: u32 = envelope
                    .header(headers::DLQ_ATTEMPTS)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_default();
                if needle.starts_with("gave up") && dead_attempts < MAX_DELIVERIES {
                    failures.push(format!(
                        "{}: dead letter attempts {:?}",
                        s.case,
                        envelope.header(headers::DLQ_ATTEMPTS)
                    ));
                }
                let note = envelope.header(headers::TRUNCATED).unwrap_or_default();
                let noted = |prefix: &str| note.split(',').any(|item| item.starts_with(prefix));
                if s.case.starts_with("payload at max_payload") && !noted("payload:") {
                    failures.push(format!("{}: no payload in the note {note:?}", s.case));
                }
                if s.case.starts_with("headers filling") && !noted("header:x-fill-") {
                    failures.push(format!(
                        "{}: no dropped header in the note {note:?}",
                        s.case
                    ));
                }
                if s.case.starts_with("60 kB id") && !note.split(',').any(|item| item == "id") {
                    failures.push(format!("{}: no id in the note {note:?}", s.case));
                }
                if s.case.starts_with("non-UTF-8 header value")
                    && envelope.header(headers::BINARY_HEADERS) != Some("x-bin")
                {
                    failures.push(format!("{}: the binary header was not kept", s.case));
                }
                if matches!(
                    s.case,
                    "header line without a colon"
                        | "header name with a space (as a Go service may write)"
                        | "version line not NATS/1.0"
                        | "non-numeric status"
                        | "non-UTF-8 header value"
                        | "non-UTF-8 header name"
                ) && envelope.payload.as_ref() != b"raw body"
                {
                    failures.push(format!("{}: raw body not kept", s.case));
                }
            }
            (expect, seen, dead) => failures.push(format!(
                "{}: expected {expect:?}, handled {} times, dead-lettered: {}",
                s.case,
                seen.map_or(0, Vec::len),
                dead.is_some()
            )),
        }
    }
    // Nothing loops: JetStream holds nothing unacknowledged (the messages the client cannot
    // read were terminated by the sweep), and for longer than the ack wait nothing is
    // redelivered and the connection is not cut again.
    let queue_consumer: PullConsumer = js
        .get_stream(&stream)
        .await
        .expect("the queue's stream")
        .get_consumer(QUEUE_CONSUMER)
        .await
        .expect("the queue's consumer");
    let settled = consumer_settled(&queue_consumer, Duration::from_secs(20)).await;
    let connects = bus.client().statistics().connects.load(Ordering::Relaxed);
    let watch_until = tokio::time::Instant::now() + Duration::from_millis(4000 + 1500);
    while tokio::time::Instant::now() < watch_until {
        let info = queue_consumer.get_info().await.expect("consumer info");
        if info.num_ack_pending != 0 || info.num_redelivered != settled.num_redelivered {
            failures.push(format!(
                "delivered again after everything was settled: {} pending, {} redelivered \
                 (was {})",
                info.num_ack_pending, info.num_redelivered, settled.num_redelivered
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let reconnects = bus.client().statistics().connects.load(Ordering::Relaxed) - connects;
    if reconnects != 0 {
        failures.push(format!(
            "the connection was cut {reconnects} times after everything was settled"
        ));
    }
    while let Ok((envelope, attempt)) = handled.try_recv() {
        if let Some(s) = sent.iter().find(|s| s.id == envelope.id.as_str()) {
            if !s.case.starts_with("handler fails") || attempt > MAX_DELIVERIES {
                failures.push(format!("{}: delivered again (attempt {attempt})", s.case));
            }
        }
    }
    let report = consumer.stop().await.expect("stop the consumer");
    println!("hostile adapter-nats: consumer report {report:?}");
    assert!(
        failures.is_empty(),
        "hostile corpus failures:\n{}",
        failures.join("\n")
    );
    assert_eq!(report.panicked, 0);
    reader.abort();
    let _ = js.delete_stream(&stream).await;
    let _ = js
        .delete_stream(bus.queue_stream(&headers::dead_letter_queue(&queue)))
        .await;
    let _ = bus.close().await;
}

/// Waits until `consumer` has nothing unacknowledged; its state then.
async fn consumer_settled(
    consumer: &PullConsumer,
    within: Duration,
) -> async_nats::jetstream::consumer::Info {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let info = consumer.get_info().await.expect("consumer info");
        if info.num_ack_pending == 0 {
            return info;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still unacknowledged after {within:?}: {} (ack floor {}, delivered {})",
            info.num_ack_pending,
            info.ack_floor.stream_sequence,
            info.delivered.stream_sequence
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Consumes `queue`, trying again on retryable errors: a message the client cannot read may
/// just have cut the connection, and a request in flight then times out.
async fn consume_retrying(bus: &NatsBroker, queue: &str) -> bus_core::Subscription {
    let mut tries = 0;
    loop {
        match bus.consume(queue, ConsumeOptions::default()).await {
            Ok(subscription) => return subscription,
            Err(error) => {
                tries += 1;
                assert!(
                    error.is_retryable() && tries < 5,
                    "consume `{queue}`: {error:?}"
                );
            }
        }
    }
}

/// The state of `stream` once `done` holds of it, within `within`.
async fn stream_state(
    js: &async_nats::jetstream::Context,
    stream: &str,
    within: Duration,
    done: impl Fn(&async_nats::jetstream::stream::State) -> bool,
) -> async_nats::jetstream::stream::State {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let state = js
            .get_stream(stream)
            .await
            .expect("the stream")
            .get_info()
            .await
            .expect("stream info")
            .state;
        if done(&state) || tokio::time::Instant::now() >= deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A message stored without headers, held by its handler while a message the client cannot
/// read cuts the connection, is not taken for one by the sweep: it stays with its handler,
/// is acknowledged once, and only the unreadable message is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_less_message_in_flight_is_not_swept() {
    let Some(url) = broker_url("BUS_TEST_NATS_URL") else {
        return;
    };
    let bus = NatsBroker::connect(&url).await.expect("connect");
    let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.expect("raw"));
    let mut raw = RawNats::connect(&url).await;
    let queue = unique("headerless");
    let subject = bus.queue_subject(&queue);
    let stream = bus.queue_stream(&queue);
    let mut subscription = bus
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    js.publish(subject.clone(), Bytes::from_static(b"plain"))
        .await
        .expect("publish")
        .await
        .expect("stored");
    let held = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("the plain message in time")
        .expect("open")
        .expect("no error");
    assert_eq!(held.envelope().payload.as_ref(), b"plain");
    let before = bus.client().statistics().connects.load(Ordering::Relaxed);
    let poison = raw
        .publish(&subject, &block(&[b"x-bin: \xff"]), b"poison")
        .await;

    let mut dlq = consume_retrying(&bus, &headers::dead_letter_queue(&queue)).await;
    let dead = tokio::time::timeout(Duration::from_secs(20), dlq.next())
        .await
        .expect("a dead letter in time")
        .expect("open")
        .expect("no error");
    // The sweep reads in stream order: a dead letter of the plain message would come first.
    assert_eq!(dead.envelope().id.as_str(), format!("{stream}:{poison}"));
    dead.ack().await.expect("ack the dead letter");
    assert!(
        bus.client().statistics().connects.load(Ordering::Relaxed) > before,
        "the unreadable message cut the connection"
    );
    // `ack` sends `+ACK` without waiting for the server: the work queue drops the dead letter
    // a moment later. `last_sequence` counts every dead letter ever stored.
    let dlq_stream = bus.queue_stream(&headers::dead_letter_queue(&queue));
    let state = stream_state(&js, &dlq_stream, Duration::from_secs(5), |s| {
        s.messages == 0
    })
    .await;
    assert_eq!(
        (state.last_sequence, state.messages),
        (1, 0),
        "one dead letter only, acknowledged"
    );

    held.ack().await.expect("ack the held message");
    let consumer: PullConsumer = js
        .get_stream(&stream)
        .await
        .expect("the queue's stream")
        .get_consumer(QUEUE_CONSUMER)
        .await
        .expect("the queue's consumer");
    let info = consumer_settled(&consumer, Duration::from_secs(10)).await;
    assert_eq!(
        info.num_redelivered, 0,
        "the plain message was handled once"
    );
    let state = stream_state(&js, &dlq_stream, Duration::ZERO, |_| true).await;
    assert_eq!(
        state.last_sequence, 1,
        "the plain message was not dead-lettered later"
    );
    println!("hostile adapter-nats: message without headers in flight during a sweep: handled once, not dead-lettered");
    let _ = subscription.close().await;
    let _ = dlq.close().await;
    let _ = js.delete_stream(&stream).await;
    let _ = js
        .delete_stream(bus.queue_stream(&headers::dead_letter_queue(&queue)))
        .await;
    let _ = bus.close().await;
}

/// Core NATS (`durable=false`): no redelivery, no broker identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_corpus_on_core_nats() {
    let Some(url) = broker_url("BUS_TEST_NATS_URL") else {
        return;
    };
    let separator = if url.contains('?') { '&' } else { '?' };
    let bus = NatsBroker::connect(&format!("{url}{separator}durable=false"))
        .await
        .expect("connect");
    let client = async_nats::connect(url.as_str()).await.expect("raw");
    let mut raw = RawNats::connect(&url).await;
    let topic = unique("core");
    let subject = bus.topic_subject(&topic);
    let subscription = bus
        .subscribe(&topic, SubscribeOptions::group("hostile"))
        .await
        .expect("subscribe");
    let (handled_tx, mut handled) = mpsc::unbounded_channel::<Envelope>();
    let handler = handler_fn(move |envelope: Envelope, _: DeliveryInfo| {
        let _ = handled_tx.send(envelope);
        async {}
    });
    let consumer = Consumer::new(subscription, handler).spawn();

    // Twice the same bare message: one id, derived from its content.
    for _ in 0..2 {
        client
            .publish(subject.clone(), Bytes::from_static(b"bare"))
            .await
            .expect("publish");
    }
    let mut odd = async_nats::HeaderMap::new();
    odd.insert("ce-time", "not a time");
    odd.insert("ce-id", "");
    client
        .publish_with_headers(subject.clone(), odd, Bytes::from_static(b"odd"))
        .await
        .expect("publish");
    let mut future = async_nats::HeaderMap::new();
    future.insert("ce-specversion", "9.9");
    future.insert("ce-id", "core-spec");
    client
        .publish_with_headers(subject.clone(), future, Bytes::from_static(b"future"))
        .await
        .expect("publish");
    client.flush().await.expect("flush");
    let mut got: Vec<Envelope> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.iter().filter(|e| e.payload.as_ref() == b"bare").count() < 2
        || !got.iter().any(|e| e.payload.as_ref() == b"odd")
    {
        let envelope = tokio::time::timeout_at(deadline, handled.recv())
            .await
            .unwrap_or_else(|_| panic!("the corpus was not handled on core NATS: {got:?}"))
            .expect("open");
        got.push(envelope);
    }
    // The client cannot read this one: it drops the connection (losing whatever else was in
    // flight on it) and reconnects; core NATS has nothing to redeliver, so it is lost, and the
    // consumer carries on.
    raw_core_publish(&mut raw, &subject, &block(&[b"x-bin: \xff"]), b"poison").await;
    let good = Envelope::new("hostile.good", "after the corpus");
    // The reconnect may still be under way: publish the good message until it is handled.
    loop {
        let _ = bus_core::Publisher::publish(&bus, &topic, good.clone()).await;
        let round = tokio::time::Instant::now() + Duration::from_millis(500);
        if let Ok(Some(envelope)) = tokio::time::timeout_at(round, handled.recv()).await {
            let is_good = envelope.id == good.id;
            got.push(envelope);
            if is_good {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the good message was not handled on core NATS: {got:?}"
        );
    }
    let bare: Vec<_> = got
        .iter()
        .filter(|e| e.payload.as_ref() == b"bare")
        .collect();
    assert_eq!(bare.len(), 2, "both bare messages handled");
    assert_eq!(bare[0].id, bare[1].id, "the same content gets the same id");
    println!(
        "hostile adapter-nats: core: bare body twice: handled id={} kind={} (both)",
        bare[0].id, bare[0].kind
    );
    let odd = got
        .iter()
        .find(|e| e.payload.as_ref() == b"odd")
        .expect("the odd message handled");
    assert_eq!(odd.header(headers::RAW_TIME), Some("not a time"));
    println!(
        "hostile adapter-nats: core: empty ce-id, unparseable ce-time: handled id={} kind={}",
        odd.id, odd.kind
    );
    assert!(
        got.iter().all(|e| e.id.as_str() != "core-spec"),
        "the handler got the unknown specversion"
    );
    println!("hostile adapter-nats: core: non-UTF-8 header value: lost with the connection the client dropped (core NATS has nothing to redeliver)");
    assert!(!consumer.is_finished(), "the consumer stopped");
    let report = consumer.stop().await.expect("stop");
    assert_eq!(report.undecodable, 1, "{report:?}");
    let mut dlq = bus
        .consume(
            &headers::dead_letter_queue(&topic),
            ConsumeOptions::default(),
        )
        .await
        .expect("consume the DLQ");
    let dead = tokio::time::timeout(Duration::from_secs(10), dlq.next())
        .await
        .expect("a dead letter in time")
        .expect("open")
        .expect("no error");
    let reason = dead
        .envelope()
        .header(headers::DLQ_REASON)
        .unwrap_or_default()
        .to_owned();
    assert_eq!(dead.envelope().id.as_str(), "core-spec");
    assert!(reason.contains("9.9"), "{reason}");
    println!("hostile adapter-nats: core: unknown CloudEvents specversion 9.9: dead-lettered reason={reason}");
    dead.ack().await.expect("ack");
    let _ = bus.close().await;
}

async fn raw_core_publish(raw: &mut RawNats, subject: &str, block: &[u8], payload: &[u8]) {
    let mut frame = format!(
        "HPUB {subject} {} {}\r\n",
        block.len(),
        block.len() + payload.len()
    )
    .into_bytes();
    frame.extend_from_slice(block);
    frame.extend_from_slice(payload);
    frame.extend_from_slice(b"\r\nPING\r\n");
    raw.socket.write_all(&frame).await.expect("raw HPUB");
    loop {
        if raw.line().await == b"PONG" {
            return;
        }
    }
}
