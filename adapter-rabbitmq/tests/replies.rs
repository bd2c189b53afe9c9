//! A responder replies only into bus's reply namespace (direct reply-to,
//! `amq.rabbitmq.reply-to.…`, which the broker routes to the requester's channel alone): a
//! request whose `reply_to` names an ordinary queue, sent here with plain lapin as any client
//! of the vhost could, is refused with `ErrorKind::Rejected`, kept in `<topic>.dlq` with the
//! reason, and nothing is published to the queue it named. Before, the responder published
//! its reply there.
//!
//! The waiting requests read the replies themselves, one at a time, handing each other's over:
//! replies that come back in any order, and a reading request that gives up, still leave
//! every other request with its own reply.
//!
//! Needs `BUS_TEST_RABBITMQ_URL`.

use std::sync::Arc;
use std::time::Duration;

use adapter_rabbitmq::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use adapter_rabbitmq::lapin::types::{AMQPValue, FieldTable};
use adapter_rabbitmq::lapin::{BasicProperties, Connection, ConnectionProperties};
use adapter_rabbitmq::{RabbitMqBroker, RabbitMqConfig, CLOUDEVENTS_PREFIX};
use bus_core::conformance::broker_url;
use bus_core::{
    headers, Broker, ConsumeOptions, Envelope, ErrorKind, Queue, Requester, Responder, ServeOptions,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_a_foreign_reply_queue_is_refused_and_dead_lettered() {
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let config = RabbitMqConfig::new(&url).with_queue_expires(Duration::from_secs(600));
    let request_exchange = config.request_exchange.clone();
    let broker = RabbitMqBroker::with_config(config).await.expect("connect");
    let run = bus_core::MessageId::new();
    let service = format!("replies.{run}");
    let victim = format!("replies.victim.{run}");

    // The victim queue exists and is watched: a reply published there would arrive.
    let mut watcher = broker
        .consume(&victim, ConsumeOptions::default())
        .await
        .expect("consume the victim queue");
    let mut requests = broker
        .serve(&service, ServeOptions::default())
        .await
        .expect("serve");

    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let raw = Connection::connect(&url, props).await.expect("raw connect");
    let channel = raw.create_channel().await.expect("raw channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let mut table = FieldTable::default();
    for (name, value) in [
        ("specversion", "1.0"),
        ("id", "forged-1"),
        ("type", "replies.forged"),
        ("source", "/elsewhere"),
    ] {
        table.insert(
            format!("{CLOUDEVENTS_PREFIX}{name}").into(),
            AMQPValue::LongString(value.into()),
        );
    }
    channel
        .basic_publish(
            &request_exchange,
            &service,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            b"reply wherever I say",
            BasicProperties::default()
                .with_headers(table)
                .with_reply_to(victim.as_str().into()),
        )
        .await
        .expect("raw publish")
        .await
        .expect("raw publish confirmed");
    let _ = raw.close(200, "done").await;

    let item = tokio::time::timeout(Duration::from_secs(20), requests.next())
        .await
        .expect("the responder saw the request")
        .expect("the request stream is open");
    let error = match item {
        Ok(request) => {
            // What the responder did before: reply where the request said.
            let _ = request.reply(Envelope::new("replies.answer", "hi")).await;
            panic!("a request naming `{victim}` as its reply queue was handed to the responder")
        }
        Err(error) => error,
    };
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(error.to_string().contains("reply namespace"), "{error}");

    // Kept for whoever looks into it, with the reason.
    let mut dlq = broker
        .consume(
            &headers::dead_letter_queue(&service),
            ConsumeOptions::default(),
        )
        .await
        .expect("consume the dead-letter queue");
    let dead = tokio::time::timeout(Duration::from_secs(20), dlq.next())
        .await
        .expect("the refused request is in the dead-letter queue")
        .expect("open")
        .expect("a delivery");
    assert_eq!(dead.envelope().id.as_str(), "forged-1");
    let reason = dead
        .envelope()
        .header(headers::DLQ_REASON)
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("reply namespace"), "{reason}");
    dead.ack().await.expect("ack the dead letter");

    // The responder goes on: a real request is answered.
    let answering = tokio::spawn(async move {
        while let Some(item) = requests.next().await {
            if let Ok(request) = item {
                let _ = request.reply(Envelope::new("replies.answer", "ok")).await;
                break;
            }
        }
    });
    let answer = broker
        .request(
            &service,
            Envelope::new("replies.ask", "?"),
            Duration::from_secs(20),
        )
        .await
        .expect("a real request is answered after the refusal");
    assert_eq!(answer.kind, "replies.answer");
    answering.await.expect("the responder task");

    // Nothing reached the victim queue but the marker sent now.
    broker
        .send(&victim, Envelope::new("replies.marker", "end"))
        .await
        .expect("send a marker");
    let first = tokio::time::timeout(Duration::from_secs(20), watcher.next())
        .await
        .expect("the marker arrives")
        .expect("open")
        .expect("a delivery");
    assert_eq!(
        first.envelope().kind,
        "replies.marker",
        "something other than the marker reached `{victim}`"
    );
    let _ = broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_each_get_their_reply_when_one_gives_up() {
    const REQUESTS: u64 = 20;
    let Some(url) = broker_url("BUS_TEST_RABBITMQ_URL") else {
        return;
    };
    let requester = Arc::new(RabbitMqBroker::connect(&url).await.expect("connect"));
    let responder = RabbitMqBroker::connect(&url).await.expect("connect");
    let service = format!("replies.turns.{}", bus_core::MessageId::new());
    let mut requests = responder
        .serve(&service, ServeOptions::default())
        .await
        .expect("serve");
    // Request `i` is answered after (REQUESTS - i) × 20 ms: replies come back in reverse order
    // of the requests, and request 0's only after it gave up.
    let serving = tokio::spawn(async move {
        while let Some(Ok(request)) = requests.next().await {
            tokio::spawn(async move {
                let i: u64 = String::from_utf8_lossy(&request.envelope().payload)
                    .parse()
                    .expect("an index");
                tokio::time::sleep(Duration::from_millis((REQUESTS - i) * 20)).await;
                let answer = format!("answer {i}");
                let _ = request.reply(Envelope::new("replies.answer", answer)).await;
            });
        }
    });
    let ask = |i: u64, timeout: Duration| {
        let requester = requester.clone();
        let service = service.clone();
        tokio::spawn(async move {
            requester
                .request(
                    &service,
                    Envelope::new("replies.ask", i.to_string()),
                    timeout,
                )
                .await
        })
    };
    // Request 0 goes first, so it is likely the one reading when it gives up.
    let first = ask(0, Duration::from_millis(150));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let others: Vec<_> = (1..REQUESTS)
        .map(|i| (i, ask(i, Duration::from_secs(20))))
        .collect();
    let gave_up = first
        .await
        .expect("request task")
        .expect_err("no reply in 150 ms");
    assert!(gave_up.is_timeout(), "{gave_up}");
    for (i, request) in others {
        let reply = request
            .await
            .expect("request task")
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(
            reply.payload,
            format!("answer {i}").as_bytes(),
            "request {i}"
        );
    }
    // Request 0's late reply is read and dropped by the next request, which gets its own.
    let next = ask(REQUESTS, Duration::from_secs(20))
        .await
        .expect("request task")
        .expect("a request after the others");
    assert_eq!(next.payload, format!("answer {REQUESTS}").as_bytes());
    let _ = requester.close().await;
    let _ = responder.close().await;
    serving.await.expect("responder task");
}
