//! Hostile input on the memory broker. It carries envelopes, not bytes, so nothing it delivers
//! can be undecodable (the conformance case for that is skipped here); what it can be given is
//! envelopes with extreme values. Each goes through a failed first attempt (broker
//! redelivery, as the retry middleware does) and then succeeds, except the poison one, which
//! fails every time and must end in the dead-letter queue after the policy's attempts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use adapter_memory::MemoryBroker;
use bus_core::middleware::{RetryLayer, RetryPolicy};
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo, HandlerBuilder};
use bus_core::{
    headers, ConsumeOptions, Envelope, Error, ErrorKind, Publisher, Queue, Redeliver,
    SubscribeOptions, Subscriber,
};
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(10);
const MAX_DELIVERIES: u32 = 3;

/// The corpus: a name for each case and the envelope sent.
fn corpus() -> Vec<(&'static str, Envelope)> {
    let plain = |kind: &str| Envelope::new(kind, "payload");
    let far_future = UNIX_EPOCH
        .checked_add(Duration::from_secs(i64::MAX as u64 / 2))
        .expect("a far future SystemTime");
    let mut many_headers = plain("hostile.many-headers");
    for i in 0..5_000 {
        many_headers
            .headers
            .insert(format!("h-{i}"), "v".repeat(i % 50));
    }
    let long = "x".repeat(100_000);
    vec![
        (
            "timestamp at the epoch",
            plain("hostile.epoch").with_timestamp(UNIX_EPOCH),
        ),
        (
            "timestamp before 1970",
            plain("hostile.before-1970")
                .with_timestamp(UNIX_EPOCH - Duration::from_secs(86_400 * 365 * 30)),
        ),
        (
            "timestamp past year 9999",
            plain("hostile.past-9999")
                .with_timestamp(UNIX_EPOCH + Duration::from_secs(300_000_000_000)),
        ),
        (
            "timestamp at the far end of SystemTime",
            plain("hostile.far-future").with_timestamp(far_future),
        ),
        ("empty id", plain("hostile.empty-id").with_id("")),
        ("empty kind", plain("")),
        (
            "empty correlation id",
            plain("hostile.empty-correlation").with_correlation_id(""),
        ),
        (
            "100 KB id, kind and correlation id",
            Envelope::new(long.clone(), "payload")
                .with_id(long.clone())
                .with_correlation_id(long),
        ),
        ("5,000 headers", many_headers),
        ("empty payload", Envelope::new("hostile.empty-payload", "")),
        (
            "non-UTF-8 payload",
            Envelope::new("hostile.binary", vec![0xff, 0xfe, 0x00, 0x80]),
        ),
        ("poison (fails every time)", plain("hostile.poison")),
    ]
}

#[derive(Default)]
struct Seen {
    /// Attempts handled per case (by kind, which is unique per case but for "empty id").
    attempts: HashMap<String, Vec<u32>>,
    good: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_envelopes_are_handled_or_dead_lettered() {
    let broker = MemoryBroker::new();
    let topic = "hostile";
    let subscription = broker
        .subscribe(topic, SubscribeOptions::group("svc"))
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let progress = Arc::new(Notify::new());
    let handler = handler_fn({
        let seen = seen.clone();
        let progress = progress.clone();
        move |envelope: Envelope, info: DeliveryInfo| {
            let mut seen = seen.lock().unwrap();
            if envelope.kind == "good" {
                seen.good = true;
            } else {
                seen.attempts
                    .entry(envelope.kind.clone())
                    .or_default()
                    .push(info.attempt());
            }
            drop(seen);
            progress.notify_waiters();
            // The first attempt fails, so that every message also goes through redelivery
            // (where adapters re-encode it); the poison one fails every time.
            let fails = envelope.kind == "hostile.poison" || info.attempt() == 1;
            let failed = fails && envelope.kind != "good";
            async move {
                if failed {
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

    let corpus = corpus();
    for (_, envelope) in &corpus {
        broker.publish(topic, envelope.clone()).await.unwrap();
    }
    broker
        .publish(topic, Envelope::new("good", "after the corpus"))
        .await
        .unwrap();

    let expected = |seen: &Seen| {
        seen.good
            && corpus.iter().all(|(_, e)| {
                let attempts = seen.attempts.get(&e.kind).map_or(0, Vec::len);
                let wanted = if e.kind == "hostile.poison" {
                    MAX_DELIVERIES as usize
                } else {
                    2
                };
                attempts >= wanted
            })
    };
    tokio::time::timeout(WAIT, async {
        loop {
            let notified = progress.notified();
            if expected(&seen.lock().unwrap()) {
                break;
            }
            notified.await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        let seen = seen.lock().unwrap();
        panic!(
            "not every corpus message and the good one were handled: good={} attempts={:?}",
            seen.good,
            seen.attempts
                .iter()
                .map(|(k, v)| (headers::shorten(k, 20).into_owned(), v.clone()))
                .collect::<Vec<_>>()
        )
    });
    assert!(!consumer.is_finished(), "the consumer stopped");

    let mut dead_letters = broker
        .consume(
            &headers::dead_letter_queue(topic),
            ConsumeOptions::default(),
        )
        .await
        .unwrap();
    let dead = tokio::time::timeout(WAIT, dead_letters.next())
        .await
        .expect("the poison message in the dead-letter queue")
        .unwrap()
        .unwrap();
    assert_eq!(dead.envelope().kind, "hostile.poison");
    let reason = dead
        .envelope()
        .header(headers::DLQ_REASON)
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("this attempt fails"), "{reason}");
    assert_eq!(
        dead.envelope().header(headers::DLQ_ATTEMPTS),
        Some(MAX_DELIVERIES.to_string().as_str())
    );
    dead.ack().await.unwrap();

    let report = consumer.stop().await.unwrap();
    let seen = seen.lock().unwrap();
    for (case, envelope) in &corpus {
        let attempts = &seen.attempts[&envelope.kind];
        if envelope.kind == "hostile.poison" {
            assert_eq!(
                attempts,
                &(1..=MAX_DELIVERIES).collect::<Vec<_>>(),
                "{case}"
            );
            println!(
                "hostile memory: {case}: dead-lettered after {} attempts reason={reason}",
                attempts.len()
            );
        } else {
            assert_eq!(attempts, &[1, 2], "{case}: attempts");
            println!(
                "hostile memory: {case}: handled on attempt 2 (after a failed first) id={} kind={}",
                headers::shorten(envelope.id.as_str(), 40),
                headers::shorten(&envelope.kind, 40)
            );
        }
    }
    assert_eq!(report.panicked, 0, "{report:?}");
    assert_eq!(report.rejected, 1, "{report:?}");
}

/// A nack with the largest delay there is parks the message (it is neither lost nor
/// redelivered soon) and panics nowhere; the broker goes on.
#[tokio::test]
async fn nack_with_the_largest_delay_parks_the_message() {
    let broker = MemoryBroker::new();
    let mut queue = broker
        .consume("parked", ConsumeOptions::default())
        .await
        .unwrap();
    broker
        .send("parked", Envelope::new("parked", "x"))
        .await
        .unwrap();
    let delivery = queue.next().await.unwrap().unwrap();
    delivery
        .nack(Redeliver::After(Duration::MAX))
        .await
        .unwrap();
    broker
        .send("parked", Envelope::new("next", "y"))
        .await
        .unwrap();
    let next = tokio::time::timeout(WAIT, queue.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.envelope().kind, "next");
    next.ack().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), queue.next())
            .await
            .is_err(),
        "the parked message came back at once"
    );
    assert_eq!(
        headers::saturating_add(SystemTime::now(), Duration::MAX),
        headers::max_time()
    );
}

/// Whatever envelope is published comes out unchanged.
#[test]
fn property_memory_round_trip() {
    use bus_core::conformance::arbitrary;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let broker = MemoryBroker::new();
    let queue = tokio::sync::Mutex::new(
        runtime
            .block_on(broker.consume("round-trip", ConsumeOptions::default()))
            .unwrap(),
    );
    arbitrary::check(
        "memory: envelope round trip",
        128,
        arbitrary::envelope(),
        |envelope| {
            let got = runtime.block_on(async {
                broker.send("round-trip", envelope.clone()).await.unwrap();
                let delivery = queue.lock().await.next().await.unwrap().unwrap();
                let got = delivery.envelope().clone();
                delivery.ack().await.unwrap();
                got
            });
            proptest::prop_assert_eq!(got, envelope);
            Ok(())
        },
    );
}
