//! A responder replies only into bus's reply namespace (`bus.replies.<uuid>`, the topics
//! requesters make): a request whose `bus-reply-to` names any other topic, sent here with a
//! plain rdkafka producer as any client of the cluster could, is refused with
//! `ErrorKind::Rejected`, kept in `<topic>.dlq` with the reason, and nothing is produced to
//! the topic it named. Before, the responder produced its reply into that topic.
//!
//! Needs `BUS_TEST_KAFKA_URL`.

use std::sync::Arc;
use std::time::Duration;

use adapter_kafka::rdkafka::message::{Header, OwnedHeaders};
use adapter_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use adapter_kafka::rdkafka::ClientConfig;
use adapter_kafka::{KafkaBroker, KafkaConfig};
use bus_core::conformance::broker_url;
use bus_core::{
    Broker, ConsumeOptions, Envelope, ErrorKind, Publisher, Queue, Requester, Responder,
    ServeOptions, SubscribeOptions, Subscriber,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_a_foreign_reply_topic_is_refused_and_dead_lettered() {
    let Some(url) = broker_url("BUS_TEST_KAFKA_URL") else {
        return;
    };
    let config = KafkaConfig::from_url(&url).expect("a kafka:// URL");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap_servers)
        .create()
        .expect("a plain producer");
    let broker = Arc::new(KafkaBroker::connect(config).await.expect("connect"));
    let run = uuid::Uuid::now_v7().simple();
    let service = format!("replies.{run}");
    let victim = format!("replies.victim.{run}");

    // Someone reads the victim topic: a reply produced there would arrive.
    let mut watcher = broker
        .subscribe(&victim, SubscribeOptions::group(format!("{victim}.g")))
        .await
        .expect("subscribe to the victim topic");
    let mut requests = broker
        .serve(&service, ServeOptions::default())
        .await
        .expect("serve");

    let headers = [
        ("ce_specversion", "1.0"),
        ("ce_id", "forged-1"),
        ("ce_type", "replies.forged"),
        ("ce_source", "/elsewhere"),
        ("bus-reply-to", victim.as_str()),
    ]
    .into_iter()
    .fold(OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        })
    });
    producer
        .send(
            FutureRecord::<(), [u8]>::to(&service)
                .payload(&b"reply wherever I say"[..])
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("raw produce");

    let item = tokio::time::timeout(Duration::from_secs(30), requests.next())
        .await
        .expect("the responder saw the request")
        .expect("the request stream is open");
    let error = match item {
        Ok(request) => {
            // What the responder did before: reply where the request said.
            let _ = request.reply(Envelope::new("replies.answer", "hi")).await;
            panic!("a request naming `{victim}` as its reply topic was handed to the responder")
        }
        Err(error) => error,
    };
    assert_eq!(error.kind(), ErrorKind::Rejected, "{error}");
    assert!(error.to_string().contains("reply namespace"), "{error}");

    // Kept for whoever looks into it, with the reason.
    let mut dlq = broker
        .consume(&dead_letter_topic(&service), ConsumeOptions::default())
        .await
        .expect("consume the dead-letter topic");
    let dead = tokio::time::timeout(Duration::from_secs(30), dlq.next())
        .await
        .expect("the refused request is in the dead-letter topic")
        .expect("open")
        .expect("a delivery");
    assert_eq!(dead.envelope().id.as_str(), "forged-1");
    let reason = dead
        .envelope()
        .header(bus_core::headers::DLQ_REASON)
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

    // Nothing reached the victim topic.
    let nothing = tokio::time::timeout(Duration::from_secs(2), watcher.next()).await;
    assert!(
        nothing.is_err(),
        "something was produced to `{victim}`: {nothing:?}"
    );
    broker
        .publish(&victim, Envelope::new("replies.marker", "end"))
        .await
        .expect("publish a marker");
    let marker = tokio::time::timeout(Duration::from_secs(30), watcher.next())
        .await
        .expect("the marker arrives")
        .expect("open")
        .expect("a delivery");
    assert_eq!(
        marker.envelope().kind,
        "replies.marker",
        "something other than the marker reached `{victim}`"
    );
    let _ = broker.close().await;
}

fn dead_letter_topic(topic: &str) -> String {
    bus_core::headers::dead_letter_queue(topic)
}
