//! A responder replies only into bus's reply namespace (a requester's reply queue, beside the
//! request queue on the same endpoint): a request whose `bus-reply-to` names any other queue
//! URL, sent here with the plain SQS client as any holder of the queue's permissions could, is
//! refused with `ErrorKind::Rejected`, kept in the dead-letter queue with the reason, and
//! nothing is sent to the queue it named. Before, the responder sent its reply there.
//!
//! Needs `BUS_TEST_SQS_URL`.

use std::time::Duration;

use adapter_sqs::aws_sdk_sqs::types::MessageAttributeValue;
use adapter_sqs::{SqsBroker, SqsConfig};
use bus_core::conformance::broker_url;
use bus_core::{
    headers, ConsumeOptions, Envelope, ErrorKind, Queue, Requester, Responder, ServeOptions,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_a_foreign_reply_queue_is_refused_and_dead_lettered() {
    let Some(url) = broker_url("BUS_TEST_SQS_URL") else {
        return;
    };
    let config = SqsConfig::from_url(&url)
        .expect("an sqs:// URL")
        .with_wait_time(Duration::from_secs(1));
    let broker = SqsBroker::connect_with(config).await.expect("connect");
    let run = uuid::Uuid::now_v7().simple();
    let service = format!("replies.{run}");
    let victim = format!("replies-victim-{run}");

    // The victim queue exists and is watched: a reply sent there would arrive.
    let mut watcher = broker
        .consume(&victim, ConsumeOptions::default())
        .await
        .expect("consume the victim queue");
    let sqs = broker.sqs_client();
    let victim_url = sqs
        .get_queue_url()
        .queue_name(broker.queue_name(&victim))
        .send()
        .await
        .expect("the victim queue exists")
        .queue_url()
        .expect("a URL")
        .to_owned();
    let mut requests = broker
        .serve(&service, ServeOptions::default())
        .await
        .expect("serve");
    let request_url = sqs
        .get_queue_url()
        .queue_name(broker.request_queue_name(&service))
        .send()
        .await
        .expect("the request queue exists once served")
        .queue_url()
        .expect("a URL")
        .to_owned();

    let text = |value: &str| {
        MessageAttributeValue::builder()
            .data_type("String")
            .string_value(value)
            .build()
            .expect("a string attribute")
    };
    sqs.send_message()
        .queue_url(&request_url)
        .message_attributes("ce-specversion", text("1.0"))
        .message_attributes("ce-id", text("forged-1"))
        .message_attributes("ce-type", text("replies.forged"))
        .message_attributes("ce-source", text("/elsewhere"))
        .message_attributes("bus-reply-to", text(&victim_url))
        .message_body("reply wherever I say")
        .send()
        .await
        .expect("the plain client sends the request");

    let item = tokio::time::timeout(Duration::from_secs(30), requests.next())
        .await
        .expect("the responder saw the request")
        .expect("the request stream is open");
    let error = match item {
        Ok(request) => {
            // What the responder did before: reply where the request said.
            let _ = request.reply(Envelope::new("replies.answer", "hi")).await;
            panic!("a request naming `{victim_url}` as its reply queue was handed to the responder")
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
    let dead = tokio::time::timeout(Duration::from_secs(30), dlq.next())
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
            Duration::from_secs(30),
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
    let first = tokio::time::timeout(Duration::from_secs(30), watcher.next())
        .await
        .expect("the marker arrives")
        .expect("open")
        .expect("a delivery");
    assert_eq!(
        first.envelope().kind,
        "replies.marker",
        "something other than the marker reached `{victim}`"
    );
    let _ = bus_core::Broker::close(&broker).await;
}
