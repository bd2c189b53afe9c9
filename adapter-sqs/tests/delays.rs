//! Delayed publish and backlog on SQS (`BUS_TEST_SQS_URL`), what the conformance cases do not
//! reach: the re-delaying of a message received before it is due (what happens at every
//! 15-minute hop of a long delay, and to every delayed message through SNS), delays beyond
//! SQS's 15 minutes, `bus-not-before` values written by other clients, FIFO's refusal, and the
//! capabilities per configuration.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use adapter_sqs::aws_sdk_sqs::primitives::Blob;
use adapter_sqs::aws_sdk_sqs::types::MessageAttributeValue;
use adapter_sqs::{attributes, SqsBroker, SqsConfig};
use bus_core::conformance::broker_url;
use bus_core::{
    BacklogOf, Broker, ConsumeOptions, Delay, Envelope, ErrorKind, Publisher, Queue,
    SubscribeOptions, Subscriber, Subscription, Support,
};
use tokio::time::Instant;

async fn broker_with(adjust: impl FnOnce(SqsConfig) -> SqsConfig) -> Option<SqsBroker> {
    let url = broker_url("BUS_TEST_SQS_URL")?;
    let config = SqsConfig::from_url(&url)
        .expect("BUS_TEST_SQS_URL is an sqs:// URL")
        .with_wait_time(Duration::from_secs(1))
        .with_visibility_timeout(Duration::from_secs(15));
    Some(
        SqsBroker::connect_with(adjust(config))
            .await
            .expect("connect"),
    )
}

fn unique(what: &str) -> String {
    format!("delays-{what}-{}", uuid::Uuid::now_v7().simple())
}

fn text(data_type: &str, value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type(data_type)
        .string_value(value)
        .build()
        .expect("a string attribute")
}

fn millis(at: SystemTime) -> String {
    at.duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis()
        .to_string()
}

async fn queue_url(broker: &SqsBroker, queue: &str) -> String {
    broker
        .sqs_client()
        .get_queue_url()
        .queue_name(broker.queue_name(queue))
        .send()
        .await
        .expect("the queue exists")
        .queue_url()
        .expect("a queue URL")
        .to_owned()
}

/// Sends what another service would, with the plain SQS client: `ce-id` and, if given, a
/// `bus-not-before` attribute.
async fn send_raw(
    broker: &SqsBroker,
    url: &str,
    id: &str,
    not_before: Option<MessageAttributeValue>,
) {
    let mut send = broker
        .sqs_client()
        .send_message()
        .queue_url(url)
        .message_body(format!("body of {id}"))
        .message_attributes(attributes::CE_ID, text("String", id));
    if let Some(value) = not_before {
        send = send.message_attributes(attributes::NOT_BEFORE, value);
    }
    send.send().await.expect("the raw client sends");
}

async fn delete_queue(broker: &SqsBroker, queue: &str) {
    let url = queue_url(broker, queue).await;
    let _ = broker
        .sqs_client()
        .delete_queue()
        .queue_url(url)
        .send()
        .await;
}

/// The next delivery within `wait`, acked; `None` if nothing comes.
async fn next_acked(sub: &mut Subscription, wait: Duration) -> Option<(String, u32, Envelope)> {
    let deadline = Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(Ok(delivery))) => {
                let seen = (
                    delivery.envelope().id.to_string(),
                    delivery.attempt(),
                    delivery.envelope().clone(),
                );
                delivery.ack().await.expect("ack");
                return Some(seen);
            }
            Ok(Some(Err(e))) => {
                println!("note: receive error, waiting on: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(None) => panic!("the subscription ended"),
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn capabilities_say_how_each_configuration_delays_and_counts() {
    let Some(standard) = broker_with(|c| c).await else {
        return;
    };
    let caps = standard.capabilities();
    assert_eq!(caps.delayed_publish, Support::Emulated);
    assert_eq!(caps.max_delay, None);
    assert_eq!(caps.backlog, Support::Native);
    let redrive = broker_with(|c| c.with_max_receive_count(5)).await.unwrap();
    let caps = redrive.capabilities();
    assert_eq!(caps.delayed_publish, Support::Emulated);
    assert_eq!(caps.max_delay, None);
    assert_eq!(caps.backlog, Support::Native);
    let fifo = broker_with(|c| c.with_fifo(true)).await.unwrap();
    let caps = fifo.capabilities();
    assert!(caps.delayed_publish.unsupported_reason().is_some());
    assert_eq!(caps.max_delay, None);
    assert_eq!(caps.backlog, Support::Native);
}

#[tokio::test]
async fn fifo_refuses_delayed_publish_and_send() {
    let Some(fifo) = broker_with(|c| c.with_fifo(true)).await else {
        return;
    };
    let delay = Delay::For(Duration::from_secs(2));
    let e = fifo
        .publish_delayed(&unique("fifo-t"), Envelope::new("k", "p"), delay)
        .await
        .expect_err("no delayed publish on FIFO");
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let e = fifo
        .send_delayed(&unique("fifo-q"), Envelope::new("k", "p"), delay)
        .await
        .expect_err("no delayed send on FIFO");
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
}

#[tokio::test]
async fn the_backlog_of_an_unknown_queue_or_group_is_not_found() {
    let Some(broker) = broker_with(|c| c).await else {
        return;
    };
    for of in [
        BacklogOf::queue(unique("never")),
        BacklogOf::group(unique("never"), "g"),
    ] {
        let e = broker.backlog(&of).await.expect_err("unknown");
        assert_eq!(e.kind(), ErrorKind::NotFound, "{of}: {e}");
    }
}

/// 20 minutes, beyond SQS's 15 of `DelaySeconds`: accepted, held in SQS (counted as delayed,
/// not delivered).
#[tokio::test]
async fn a_delay_beyond_15_minutes_is_accepted_and_held() {
    let Some(broker) = broker_with(|c| c).await else {
        return;
    };
    let queue = unique("long");
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let delayed = Envelope::new("delays.long", "in 20 minutes");
    broker
        .send_delayed(&queue, delayed, Delay::For(Duration::from_secs(20 * 60)))
        .await
        .expect("a 20-minute delay is accepted");
    let of = BacklogOf::queue(&queue);
    let backlog = broker.backlog(&of).await.expect("backlog");
    assert_eq!(backlog.delayed, Some(1), "{backlog:?}");
    assert_eq!(backlog.total(), 1, "{backlog:?}");
    assert!(backlog.approximate);
    assert!(
        next_acked(&mut consumer, Duration::from_secs(3))
            .await
            .is_none(),
        "a message due in 20 minutes arrived"
    );
    consumer.close().await.expect("close");
    delete_queue(&broker, &queue).await;
}

/// A message received before its `bus-not-before` (what arrives at the end of every 15-minute
/// hop of a long delay with time still to go) goes back to the queue, counted as delayed,
/// and arrives once due, once, at attempt 1, without the wire-only attribute. With a redrive
/// policy of one receive, the early receive does not send it to the dead-letter queue.
#[tokio::test]
async fn an_early_message_is_re_delayed_and_arrives_once_at_attempt_1() {
    let Some(broker) = broker_with(|c| c.with_max_receive_count(1)).await else {
        return;
    };
    let queue = unique("early");
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let url = queue_url(&broker, &queue).await;
    let sent_at = Instant::now();
    let due = SystemTime::now() + Duration::from_secs(5);
    send_raw(&broker, &url, "early-1", Some(text("String", &millis(due)))).await;
    // The consumer's receive loop takes it at once and sends it back with DelaySeconds.
    let next = tokio::spawn(async move {
        let got = next_acked(&mut consumer, Duration::from_secs(30)).await;
        (got, consumer)
    });
    let of = BacklogOf::queue(&queue);
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let backlog = broker.backlog(&of).await.expect("backlog");
        if backlog.delayed == Some(1) && backlog.total() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the early message was not re-delayed: {backlog:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (got, mut consumer) = next.await.expect("the receiving task");
    let (id, attempt, envelope) = got.expect("the re-delayed message arrives");
    let elapsed = sent_at.elapsed();
    assert_eq!(id, "early-1");
    assert!(
        SystemTime::now() >= due,
        "arrived before it was due ({elapsed:?} after it was sent)"
    );
    assert_eq!(attempt, 1, "an early receive is not an attempt");
    assert_eq!(envelope.payload.as_ref(), b"body of early-1");
    assert_eq!(envelope.header(attributes::NOT_BEFORE), None);
    assert!(
        next_acked(&mut consumer, Duration::from_secs(2))
            .await
            .is_none(),
        "a copy arrived"
    );
    let dlq = format!("{queue}.dlq");
    let backlog = broker.backlog(&BacklogOf::queue(&dlq)).await.expect("dlq");
    assert_eq!(backlog.total(), 0, "dead-lettered by an early receive");
    consumer.close().await.expect("close");
    delete_queue(&broker, &queue).await;
    delete_queue(&broker, &dlq).await;
}

/// Every group subscribed when a delayed message is published gets it once due, once, at
/// attempt 1, while a message published after it is not held up.
#[tokio::test]
async fn a_delayed_publish_reaches_every_group_once_due() {
    let Some(broker) = broker_with(|c| c).await else {
        return;
    };
    let topic = unique("topic");
    let mut groups = Vec::new();
    for g in ["g1", "g2"] {
        groups.push(
            broker
                .subscribe(&topic, SubscribeOptions::group(format!("{topic}.{g}")))
                .await
                .expect("subscribe"),
        );
    }
    let delay = Duration::from_secs(3);
    let delayed = Envelope::new("delays.topic", "later").with_header("x-delayed", "yes");
    let at_once = Envelope::new("delays.topic", "now");
    let published = Instant::now();
    broker
        .publish_delayed(&topic, delayed.clone(), Delay::For(delay))
        .await
        .expect("publish_delayed");
    broker
        .publish(&topic, at_once.clone())
        .await
        .expect("publish");
    // Both groups at once: a group read only after the delay would get both due together, in
    // no particular order.
    let checks = groups.iter_mut().map(|sub| async {
        let (first, _, _) = next_acked(sub, Duration::from_secs(30))
            .await
            .expect("the message without delay");
        assert_eq!(first, at_once.id.to_string(), "held up by the delayed one");
        let (second, attempt, envelope) = next_acked(sub, Duration::from_secs(30))
            .await
            .expect("the delayed message");
        assert_eq!(second, delayed.id.to_string());
        assert!(published.elapsed() >= delay, "{:?}", published.elapsed());
        assert_eq!(attempt, 1);
        assert_eq!(envelope.header("x-delayed"), Some("yes"));
        assert_eq!(envelope.header(attributes::NOT_BEFORE), None);
        assert!(
            next_acked(sub, Duration::from_secs(2)).await.is_none(),
            "a copy arrived"
        );
    });
    futures::future::join_all(checks).await;
    for mut sub in groups {
        sub.close().await.expect("close");
    }
}

/// `bus-not-before` values `bus` does not write (other clients', of other types) never hold a
/// message back: it arrives at once, at attempt 1, the value kept as a header; one `bus`
/// reads that is already past is honoured (at once) and taken off.
#[tokio::test]
async fn foreign_or_malformed_not_before_values_do_not_hold_delivery() {
    let Some(broker) = broker_with(|c| c).await else {
        return;
    };
    let queue = unique("foreign");
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let url = queue_url(&broker, &queue).await;
    let past = millis(SystemTime::now() - Duration::from_secs(60));
    let binary = MessageAttributeValue::builder()
        .data_type("Binary")
        .binary_value(Blob::new(b"\x00\x01soon".to_vec()))
        .build()
        .expect("a binary attribute");
    let cases: Vec<(&str, Option<MessageAttributeValue>, Option<&str>)> = vec![
        ("none", None, None),
        ("word", Some(text("String", "soon")), Some("soon")),
        ("negative", Some(text("Number", "-5")), Some("-5")),
        ("fraction", Some(text("Number", "1.5")), Some("1.5")),
        (
            "date",
            Some(text("String", "2099-12-01T15:00:00Z")),
            Some("2099-12-01T15:00:00Z"),
        ),
        (
            "huge",
            Some(text("String", "99999999999999999999999")),
            Some("99999999999999999999999"),
        ),
        ("binary", Some(binary), None),
        ("past", Some(text("String", &past)), None),
    ];
    for (id, value, _) in &cases {
        send_raw(&broker, &url, id, value.clone()).await;
    }
    let started = Instant::now();
    let mut seen = Vec::new();
    while seen.len() < cases.len() {
        let (id, attempt, envelope) = next_acked(&mut consumer, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("only {seen:?} arrived"));
        let (_, _, kept) = cases
            .iter()
            .find(|(case, _, _)| *case == id)
            .unwrap_or_else(|| panic!("unexpected {id}"));
        assert_eq!(attempt, 1, "{id}");
        if let Some(kept) = kept {
            assert_eq!(envelope.header(attributes::NOT_BEFORE), Some(*kept), "{id}");
        }
        if id == "past" || id == "none" {
            assert_eq!(envelope.header(attributes::NOT_BEFORE), None, "{id}");
        }
        seen.push(id);
    }
    // At once: well under the 15-second visibility timeout a put-back would take.
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        next_acked(&mut consumer, Duration::from_secs(2))
            .await
            .is_none(),
        "a copy arrived"
    );
    consumer.close().await.expect("close");
    delete_queue(&broker, &queue).await;
}

/// A message of another client that names no `ce-id` (its id is SQS's message id) and is
/// re-delayed keeps that id: the copy is a new SQS message, with an id of its own.
#[tokio::test]
async fn a_re_delayed_foreign_message_keeps_its_id() {
    let Some(broker) = broker_with(|c| c).await else {
        return;
    };
    let queue = unique("foreign-id");
    let mut consumer = broker
        .consume(&queue, ConsumeOptions::default())
        .await
        .expect("consume");
    let url = queue_url(&broker, &queue).await;
    let due = SystemTime::now() + Duration::from_secs(2);
    let sent = broker
        .sqs_client()
        .send_message()
        .queue_url(&url)
        .message_body("no id of its own")
        .message_attributes(attributes::NOT_BEFORE, text("String", &millis(due)))
        .send()
        .await
        .expect("the raw client sends");
    let sqs_id = sent.message_id().expect("a message id").to_owned();
    let (id, attempt, _) = next_acked(&mut consumer, Duration::from_secs(30))
        .await
        .expect("the re-delayed message arrives");
    assert!(SystemTime::now() >= due);
    assert_eq!(id, sqs_id);
    assert_eq!(attempt, 1);
    consumer.close().await.expect("close");
    delete_queue(&broker, &queue).await;
}
