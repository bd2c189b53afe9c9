//! What a message carries: every field, payloads, headers, ids, typed messages, topic names.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::conformance::support::{
    ack, assert_all_intact, assert_nothing_else, assert_payload, assert_quiet, assert_same,
    consume, first_arrivals, ids, publish, receive_all, recv, send, skip, subscribe, unique, SEQ,
};
use crate::conformance::Harness;
use crate::{headers, ConsumeOptions, Envelope, Message, ServeOptions, SubscribeOptions};

/// A W3C `traceparent` as a tracing layer would write it.
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// A W3C `tracestate` with two vendors.
const TRACESTATE: &str = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";

/// About 100 messages published one by one arrive in a group with every field intact: id,
/// kind, key, content type, headers, payload, correlation id and timestamp; each first as
/// attempt 1, from the topic, in the group.
pub async fn round_trip_many(h: Harness) {
    const CASE: &str = "round_trip_many";
    let topic = unique("rt");
    let group = format!("{topic}.g1");
    let mut sub = subscribe(&h, &topic, SubscribeOptions::group(&group), CASE).await;
    let sent: Vec<Envelope> = (0..100)
        .map(|i| {
            Envelope::new("conf.round_trip", format!("payload {i}: ünïcödé ✓"))
                .with_key(format!("key-{}", i % 7))
                .with_content_type("text/plain; charset=utf-8")
                .with_header("x-conf-index", i.to_string())
                .with_header("x-conf-case", CASE)
        })
        .collect();
    for envelope in &sent {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }
    let arrivals = receive_all(&mut sub, &ids(&sent), h.receive_timeout, CASE).await;
    assert_all_intact(&sent, &arrivals, CASE);
    for r in &arrivals {
        assert_eq!(r.source, topic, "{CASE}: Delivery::source");
        assert_eq!(
            r.group.as_deref(),
            Some(group.as_str()),
            "{CASE}: Delivery::group"
        );
    }
}

/// `publish_batch` delivers every message of the batch intact (in order for one key where the
/// adapter keeps per-key order), and an empty batch is a no-op.
pub async fn publish_batch_round_trip(h: Harness) {
    const CASE: &str = "publish_batch_round_trip";
    let topic = unique("batch");
    let mut sub = subscribe(
        &h,
        &topic,
        SubscribeOptions::group(format!("{topic}.g1")),
        CASE,
    )
    .await;
    h.broker
        .publish_batch(&topic, Vec::new())
        .await
        .unwrap_or_else(|e| panic!("{CASE}: an empty batch should be a no-op: {e}"));
    let sent: Vec<Envelope> = (0..50)
        .map(|i| {
            Envelope::new("conf.batch", format!("batch item {i}"))
                .with_key("batch-key")
                .with_header(SEQ, i.to_string())
        })
        .collect();
    h.broker
        .publish_batch(&topic, sent.clone())
        .await
        .unwrap_or_else(|e| panic!("{CASE}: publish_batch of 50 failed: {e}"));
    let arrivals = receive_all(&mut sub, &ids(&sent), h.receive_timeout, CASE).await;
    assert_all_intact(&sent, &arrivals, CASE);
    if h.capabilities().per_key_order {
        let order: Vec<_> = first_arrivals(&arrivals)
            .iter()
            .map(|r| r.envelope.id.clone())
            .collect();
        let sent_order: Vec<_> = sent.iter().map(|e| e.id.clone()).collect();
        assert_eq!(
            order, sent_order,
            "{CASE}: one key's messages out of batch order"
        );
    }
}

/// A payload that is not UTF-8 (every byte value, invalid sequences, NULs) arrives byte for
/// byte, on a topic and through a queue.
pub async fn binary_payload(h: Harness) {
    const CASE: &str = "binary_payload";
    let payload: Vec<u8> = (0..=255u8)
        .chain([
            0xff, 0xfe, 0xc3, 0x28, 0xa0, 0xa1, 0xe2, 0x28, 0xa1, 0xf0, 0x28, 0x8c, 0x00, 0x00,
        ])
        .chain((0..=255u8).rev())
        .collect();
    assert!(std::str::from_utf8(&payload).is_err());
    let envelope =
        Envelope::new("conf.binary", payload).with_content_type("application/octet-stream");
    round_trip_topic_and_queue(&h, "bin", envelope, CASE).await;
}

/// An empty payload arrives empty (not missing, not a placeholder), on a topic and through a
/// queue.
pub async fn empty_payload(h: Harness) {
    const CASE: &str = "empty_payload";
    let envelope = Envelope::new("conf.empty", Bytes::new());
    round_trip_topic_and_queue(&h, "empty", envelope, CASE).await;
}

/// 25 headers (more than SQS's 10 message attributes) with varied names and values, including
/// a long one and non-ASCII text, arrive intact.
pub async fn many_headers(h: Harness) {
    const CASE: &str = "many_headers";
    const COUNT: usize = 25;
    let caps = h.capabilities();
    if let Some(max) = caps.max_headers {
        if max < COUNT {
            skip(
                CASE,
                format!("{} declares at most {max} headers (Capabilities::max_headers), fewer than {COUNT}", caps.name),
            );
            return;
        }
    }
    let mut envelope = Envelope::new("conf.headers", "many headers");
    for i in 0..COUNT - 4 {
        envelope = envelope.with_header(format!("x-conf-h{i:02}"), format!("value {i}"));
    }
    envelope = envelope
        .with_header("x-conf-unicode", "ünïcödé ✓ 漢字")
        .with_header("x-conf-punctuation", "a=b, c; d:e \"quoted\" /path?q=1&r=2")
        .with_header("x-conf-long", "L".repeat(1024))
        .with_header("x_conf.mixed-name_01", "names with dots and underscores");
    assert_eq!(envelope.headers.len(), COUNT);
    round_trip_topic_and_queue(&h, "hdrs", envelope, CASE).await;
}

/// Where the adapter declares a header limit `n`: `n` headers arrive intact, and `n + 1` fail
/// with `ErrorKind::HeadersTooLarge` on publish and on send.
pub async fn too_many_headers_rejected(h: Harness) {
    const CASE: &str = "too_many_headers_rejected";
    let caps = h.capabilities();
    let Some(max) = caps.max_headers else {
        skip(
            CASE,
            format!(
                "{} declares no header limit (Capabilities::max_headers is None)",
                caps.name
            ),
        );
        return;
    };
    let with_headers = |count: usize| {
        (0..count).fold(Envelope::new("conf.headers", "counted"), |e, i| {
            e.with_header(format!("x-conf-h{i:02}"), format!("value {i}"))
        })
    };
    let too_many = with_headers(max + 1);
    let expect_too_large = |result: crate::Result<()>, how: &str| match result {
        Ok(()) => panic!(
            "{CASE}: {how} with {} headers (limit {max}) succeeded",
            max + 1
        ),
        Err(e) => assert_eq!(
            e.kind(),
            crate::ErrorKind::HeadersTooLarge,
            "{CASE}: {how}: error kind ({e})"
        ),
    };
    let topic = unique("hdrmax");
    expect_too_large(h.broker.publish(&topic, too_many.clone()).await, "publish");
    expect_too_large(h.broker.send(&unique("hdrmaxq"), too_many).await, "send");
    if max > 0 {
        round_trip_topic_and_queue(&h, "hdrmax", with_headers(max), CASE).await;
    }
}

/// Correlation and causation ids survive the broker, for a chain of messages
/// (`Envelope::child`), an explicit external correlation id, and a message id that is not a
/// UUID (as another system may send).
pub async fn correlation_and_causation_survive(h: Harness) {
    const CASE: &str = "correlation_and_causation_survive";
    let topic = unique("corr");
    let mut sub = subscribe(
        &h,
        &topic,
        SubscribeOptions::group(format!("{topic}.g1")),
        CASE,
    )
    .await;
    let external = format!("order-42:{}", uuid::Uuid::now_v7().simple());
    let root = Envelope::new("conf.order_placed", "root")
        .with_id(external.as_str())
        .with_correlation_id(external.as_str());
    let child = root.child("conf.payment_requested", "child");
    let grandchild = child.child("conf.payment_captured", "grandchild");
    let other = Envelope::new("conf.other", "other").with_correlation_id(format!(
        "external-conversation-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let sent = vec![root, child, grandchild.clone(), other];
    for envelope in &sent {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }
    let arrivals = receive_all(&mut sub, &ids(&sent), h.receive_timeout, CASE).await;
    assert_all_intact(&sent, &arrivals, CASE);
    let got = arrivals
        .iter()
        .find(|r| r.envelope.id == grandchild.id)
        .expect("received");
    assert_eq!(
        got.envelope.correlation_id.as_str(),
        external,
        "{CASE}: chain correlation id"
    );
    assert_eq!(
        got.envelope.causation_id,
        Some(sent[1].id.clone()),
        "{CASE}: causation id"
    );

    let queue = unique("corrq");
    send(&h, &queue, grandchild.clone(), CASE).await;
    let mut consumer = consume(&h, &queue, ConsumeOptions::default(), CASE).await;
    let delivery = recv(&mut consumer, h.receive_timeout, CASE).await;
    assert_same(&grandchild, delivery.envelope(), &format!("{CASE} (queue)"));
    ack(delivery, CASE).await;
}

/// W3C `traceparent` and `tracestate` headers survive a topic, a queue and (where the adapter
/// has request-reply) a request, so a consumer's span can continue the producer's trace.
pub async fn trace_context_survives(h: Harness) {
    const CASE: &str = "trace_context_survives";
    let envelope = Envelope::new("conf.traced", "traced")
        .with_header(headers::TRACEPARENT, TRACEPARENT)
        .with_header(headers::TRACESTATE, TRACESTATE);
    round_trip_topic_and_queue(&h, "trace", envelope.clone(), CASE).await;

    if h.capabilities().request_reply.is_available() {
        let topic = unique("tracereq");
        let mut requests = h
            .broker
            .serve(&topic, ServeOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{CASE}: serve failed: {e}"));
        let responder = tokio::spawn(async move {
            let request = loop {
                match requests.next().await {
                    Some(Ok(request)) => break request,
                    Some(Err(e)) => println!("note: {CASE}: responder receive error: {e}"),
                    None => panic!("{CASE}: the responder's stream ended"),
                }
            };
            let seen = request.envelope().clone();
            request
                .reply(Envelope::new("conf.traced_reply", ""))
                .await
                .unwrap_or_else(|e| panic!("{CASE}: reply failed: {e}"));
            let _ = requests.close().await;
            seen
        });
        let request = Envelope::new("conf.traced_request", "traced")
            .with_header(headers::TRACEPARENT, TRACEPARENT)
            .with_header(headers::TRACESTATE, TRACESTATE);
        h.broker
            .request(&topic, request.clone(), h.receive_timeout)
            .await
            .unwrap_or_else(|e| panic!("{CASE}: request failed: {e}"));
        let seen = responder.await.expect("responder task");
        assert_same(&request, &seen, &format!("{CASE} (request)"));
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ConformanceOrderPlaced {
    order_id: u64,
    customer: String,
    items: Vec<String>,
    note: Option<String>,
    total_cents: i64,
}

impl Message for ConformanceOrderPlaced {
    const KIND: &'static str = "conformance.order_placed";
    const SCHEMA_VERSION: u32 = 3;
}

/// A typed message goes `Envelope::encode` → publish → receive → `decode` and comes out equal,
/// with its kind, JSON content type and schema version header.
pub async fn typed_message_round_trip(h: Harness) {
    const CASE: &str = "typed_message_round_trip";
    let topic = unique("typed");
    let mut sub = subscribe(
        &h,
        &topic,
        SubscribeOptions::group(format!("{topic}.g1")),
        CASE,
    )
    .await;
    let order = ConformanceOrderPlaced {
        order_id: 42,
        customer: "Zoë \"quotes\" O'Brien".into(),
        items: vec!["book".into(), "pen ✓".into()],
        note: None,
        total_cents: -1_999,
    };
    let envelope = Envelope::encode(&order)
        .unwrap_or_else(|e| panic!("{CASE}: encode failed: {e}"))
        .with_key("order-42");
    publish(&h, &topic, envelope.clone(), CASE).await;
    let delivery = recv(&mut sub, h.receive_timeout, CASE).await;
    let got = delivery.envelope();
    assert_same(&envelope, got, CASE);
    assert_eq!(got.kind, ConformanceOrderPlaced::KIND, "{CASE}: kind");
    assert_eq!(
        got.content_type.as_deref(),
        Some("application/json"),
        "{CASE}: content type"
    );
    assert_eq!(
        got.header(headers::SCHEMA_VERSION),
        Some("3"),
        "{CASE}: schema version"
    );
    let decoded: ConformanceOrderPlaced = got
        .decode()
        .unwrap_or_else(|e| panic!("{CASE}: decode failed: {e}"));
    assert_eq!(decoded, order, "{CASE}: decoded message");
    ack(delivery, CASE).await;
}

/// Topics whose names differ only in punctuation (`.`, `-`, `_`) or by a suffix are distinct:
/// each subscriber gets its own topic's message and nothing else. Names with wildcard
/// characters (`*`, `>`, `#`) are taken literally or refused, never as patterns.
pub async fn topics_do_not_cross(h: Harness) {
    const CASE: &str = "topics_do_not_cross";
    let base = unique("tx");
    let topics = [
        base.clone(),
        format!("{base}.a"),
        format!("{base}-a"),
        format!("{base}_a"),
        format!("{base}.a.b"),
        format!("{base}.ab"),
    ];
    let mut subs = Vec::new();
    for (i, topic) in topics.iter().enumerate() {
        let options = SubscribeOptions::group(format!("{base}.g{i}"));
        subs.push(subscribe(&h, topic, options, CASE).await);
    }
    let mut wildcards = Vec::new();
    for pattern in [
        format!("{base}.*"),
        format!("{base}.>"),
        format!("{base}.#"),
    ] {
        match h
            .broker
            .subscribe(&pattern, SubscribeOptions::default())
            .await
        {
            Ok(sub) => wildcards.push((pattern, sub)),
            // Refusing a name the broker cannot hold literally is safe too.
            Err(e) => println!("note: {CASE}: subscribe to `{pattern}` refused: {e}"),
        }
    }
    let sent: Vec<Envelope> = topics
        .iter()
        .map(|t| Envelope::new("conf.cross", t.clone()).with_header("x-conf-topic", t.clone()))
        .collect();
    for (topic, envelope) in topics.iter().zip(&sent) {
        publish(&h, topic, envelope.clone(), CASE).await;
    }
    let checks = subs
        .iter_mut()
        .zip(topics.iter().zip(&sent))
        .map(|(sub, (topic, envelope))| {
            let h = &h;
            async move {
                let what = format!("{CASE}: subscriber of `{topic}`");
                let delivery = recv(sub, h.receive_timeout, &what).await;
                assert_eq!(
                    delivery.envelope().header("x-conf-topic"),
                    Some(topic.as_str()),
                    "{what}: got another topic's message"
                );
                assert_same(envelope, delivery.envelope(), &what);
                ack(delivery, &what).await;
                let own = std::iter::once(envelope.id.clone()).collect();
                assert_nothing_else(sub, h.quiet_period, &own, &what).await;
            }
        });
    let wildcard_checks = wildcards.iter_mut().map(|(pattern, sub)| {
        let quiet = h.quiet_period;
        async move {
            let what = format!("{CASE}: subscriber of the literal name `{pattern}`");
            assert_quiet(sub, quiet, &what).await;
        }
    });
    futures::future::join(
        futures::future::join_all(checks),
        futures::future::join_all(wildcard_checks),
    )
    .await;
}

/// Sends `envelope` through a topic (published after subscribing) and through a queue, and
/// checks it arrives intact both ways.
async fn round_trip_topic_and_queue(h: &Harness, tag: &str, envelope: Envelope, case: &str) {
    let topic = unique(tag);
    let mut sub = subscribe(
        h,
        &topic,
        SubscribeOptions::group(format!("{topic}.g1")),
        case,
    )
    .await;
    publish(h, &topic, envelope.clone(), case).await;
    let delivery = recv(&mut sub, h.receive_timeout, case).await;
    assert_same(&envelope, delivery.envelope(), &format!("{case} (topic)"));
    assert_payload(&envelope.payload, &delivery.envelope().payload, case);
    ack(delivery, case).await;

    let queue = unique(&format!("{tag}q"));
    let again = envelope.with_id(crate::MessageId::new());
    send(h, &queue, again.clone(), case).await;
    let mut consumer = consume(h, &queue, ConsumeOptions::default(), case).await;
    let delivery = recv(&mut consumer, h.receive_timeout, case).await;
    assert_same(&again, delivery.envelope(), &format!("{case} (queue)"));
    assert_eq!(delivery.source(), queue, "{case} (queue): Delivery::source");
    ack(delivery, case).await;
}
