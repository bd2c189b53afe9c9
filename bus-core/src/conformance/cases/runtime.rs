//! The consumer runtime and its middleware over a real adapter: retries into the dead-letter
//! queue, idempotency under duplicates, per-key order under concurrency, graceful shutdown, and
//! trace context from publish to process.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry::trace::{
    FutureExt as _, SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry::Context;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::conformance::support::{
    ack, assert_per_key_order, assert_quiet, consume, no_dead_letter, no_groups, no_per_key_order,
    publish, recv, skip, subscribe, unique, SEQ,
};
use crate::conformance::Harness;
use crate::middleware::idempotency::{IdempotencyLayer, MemoryStore};
use crate::middleware::tracing::{TracedBroker, TracingLayer};
use crate::middleware::{RetryLayer, RetryPolicy};
use crate::runtime::{handler_fn, Consumer, ConsumerReport, DeliveryInfo, Handler, HandlerBuilder};
use crate::runtime::{ConsumerHandle, KeyOrder, Outcome};
use crate::{
    headers, Capabilities, ConsumeOptions, Delivery, Envelope, Error, ErrorKind, MessageId,
    Publisher, SubscribeOptions,
};

/// A group of the case's own where the adapter has groups, else a private subscription.
fn group_or_private(caps: &Capabilities, topic: &str) -> SubscribeOptions {
    if caps.consumer_groups {
        SubscribeOptions::group(format!("{topic}.g1"))
    } else {
        SubscribeOptions::default()
    }
}

/// The next report a handler sent within `wait`; fails the case on timeout.
async fn next_report<T>(
    reports: &mut mpsc::UnboundedReceiver<T>,
    wait: Duration,
    progress: impl Fn() -> String,
    what: &str,
) -> T {
    match tokio::time::timeout(wait, reports.recv()).await {
        Ok(Some(report)) => report,
        Ok(None) => panic!("{what}: the handler is gone ({})", progress()),
        Err(_) => panic!("{what}: {}, then nothing within {wait:?}", progress()),
    }
}

/// Reports arriving within `quiet`.
async fn drain_reports<T>(reports: &mut mpsc::UnboundedReceiver<T>, quiet: Duration) -> Vec<T> {
    let deadline = Instant::now() + quiet;
    let mut late = Vec::new();
    while let Ok(Some(report)) = tokio::time::timeout_at(deadline, reports.recv()).await {
        late.push(report);
    }
    late
}

async fn stop(consumer: ConsumerHandle, what: &str) -> ConsumerReport {
    consumer
        .stop()
        .await
        .unwrap_or_else(|e| panic!("{what}: stopping the consumer failed: {e}"))
}

/// Every received delivery is counted once: settled one way, abandoned, or unsettled.
fn assert_report_adds_up(report: &ConsumerReport, what: &str) {
    assert_eq!(
        report.received,
        report.acked + report.retried + report.rejected + report.abandoned + report.unsettled,
        "{what}: received != acked + retried + rejected + abandoned + unsettled in {report:?}"
    );
}

/// A handler that always fails with a retryable error, wrapped in [`RetryLayer`] (1 immediate
/// retry, 3 deliveries, 10 ms → 40 ms backoff), in a consumer that retries through the broker
/// ([`KeyOrder::Unordered`]), runs exactly 3 × 2 times per message; each
/// message then lands once in `headers::dead_letter_queue(topic)` with 3 attempts, its
/// original topic and group and the error's text as reason, and the consumer reports 2 retries
/// and 1 rejection per message.
pub async fn retry_then_dead_letter_exact_counts(h: Harness) {
    const CASE: &str = "retry_then_dead_letter_exact_counts";
    const MESSAGES: usize = 5;
    const IMMEDIATE_RETRIES: u32 = 1;
    const MAX_DELIVERIES: u32 = 3;
    const FAILURE: &str = "conformance: downstream unavailable";
    let caps = h.capabilities();
    if let Some(reason) = caps.delayed_redelivery.unsupported_reason() {
        skip(
            CASE,
            format!("{}: delayed redelivery unsupported: {reason}", caps.name),
        );
        return;
    }
    if no_dead_letter(CASE, &caps) {
        return;
    }
    let topic = unique("retrydlq");
    let options = group_or_private(&caps, &topic);
    let group = options.group.clone();
    let sub = subscribe(&h, &topic, options, CASE).await;

    let (runs_tx, mut runs) = mpsc::unbounded_channel::<(MessageId, u32)>();
    let policy = RetryPolicy::new()
        .with_immediate_retries(IMMEDIATE_RETRIES, Duration::from_millis(5))
        .with_max_deliveries(MAX_DELIVERIES)
        .with_backoff(Duration::from_millis(10), 2.0, Duration::from_millis(40));
    let handler = HandlerBuilder::new()
        .layer(RetryLayer::new(policy))
        .handler(handler_fn(move |envelope: Envelope, info: DeliveryInfo| {
            let _ = runs_tx.send((envelope.id, info.attempt()));
            async { Err::<(), _>(Error::new(ErrorKind::Connection, FAILURE)) }
        }));
    // Through the broker: what this case checks is its redelivery and dead-lettering.
    // `per_key_order_kept_across_retries` covers the retries in place.
    let consumer = Consumer::new(sub, handler)
        .with_key_order(KeyOrder::Unordered)
        .with_concurrency(MESSAGES)
        .with_shutdown_timeout(h.receive_timeout)
        .spawn();

    let sent: Vec<Envelope> = (0..MESSAGES)
        .map(|i| {
            Envelope::new("conf.failing", format!("always fails {i}"))
                .with_key(format!("key-{i}"))
                .with_header("x-conf", "kept")
        })
        .collect();
    for envelope in &sent {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }
    let by_id: HashMap<&MessageId, &Envelope> = sent.iter().map(|e| (&e.id, e)).collect();

    let dlq = headers::dead_letter_queue(&topic);
    let what = format!("{CASE}: dead-letter queue `{dlq}`");
    let mut dead_letters = consume(&h, &dlq, ConsumeOptions::default(), &what).await;
    let mut dead = HashSet::new();
    while dead.len() < MESSAGES {
        let d = recv(&mut dead_letters, h.receive_timeout, &what).await;
        let got = d.envelope();
        let Some(original) = by_id.get(&got.id) else {
            panic!("{what}: received {}, which was not sent here", got.id);
        };
        assert!(
            dead.insert(got.id.clone()),
            "{what}: {} was dead-lettered twice",
            got.id
        );
        assert_eq!(got.kind, original.kind, "{what}: kind of {}", got.id);
        assert_eq!(got.key, original.key, "{what}: key of {}", got.id);
        assert_eq!(
            got.payload, original.payload,
            "{what}: payload of {}",
            got.id
        );
        assert_eq!(got.header("x-conf"), Some("kept"), "{what}: own header");
        assert_eq!(
            got.header(headers::DLQ_ATTEMPTS),
            Some(MAX_DELIVERIES.to_string().as_str()),
            "{what}: attempts of {}",
            got.id
        );
        assert_eq!(
            got.header(headers::DLQ_ORIGINAL_TOPIC),
            Some(topic.as_str()),
            "{what}: original topic of {}",
            got.id
        );
        // As in the reject cases: a native dead-letter queue may not know the group.
        if let (Some(group), Some(recorded)) = (&group, got.header(headers::DLQ_GROUP)) {
            assert_eq!(recorded, group, "{what}: group of {}", got.id);
        }
        let reason = got.header(headers::DLQ_REASON).unwrap_or_default();
        assert!(
            reason.contains(FAILURE),
            "{what}: header `{}` of {} is {reason:?}, without the handler's error",
            headers::DLQ_REASON,
            got.id
        );
        ack(d, &what).await;
    }
    // Nothing more: no second dead letter, and (checked below) no run after the last.
    assert_quiet(&mut dead_letters, h.quiet_period, &what).await;

    let report = stop(consumer, CASE).await;
    let mut attempts: HashMap<MessageId, Vec<u32>> = HashMap::new();
    while let Ok((id, attempt)) = runs.try_recv() {
        attempts.entry(id).or_default().push(attempt);
    }
    let per_delivery = 1 + IMMEDIATE_RETRIES as usize;
    let expected: Vec<u32> = (1..=MAX_DELIVERIES)
        .flat_map(|a| std::iter::repeat_n(a, per_delivery))
        .collect();
    assert_eq!(
        attempts.len(),
        MESSAGES,
        "{CASE}: the handler ran for {} messages",
        attempts.len()
    );
    for envelope in &sent {
        let mut seen = attempts.remove(&envelope.id).unwrap_or_default();
        seen.sort_unstable();
        assert_eq!(
            seen, expected,
            "{CASE}: attempts the handler saw for {} ({MAX_DELIVERIES} deliveries × \
             (1 + {IMMEDIATE_RETRIES} immediate retry) expected)",
            envelope.id
        );
    }
    let n = MESSAGES as u64;
    let deliveries = u64::from(MAX_DELIVERIES);
    assert_report_adds_up(&report, CASE);
    assert_eq!(
        (
            report.received,
            report.retried,
            report.rejected,
            report.acked
        ),
        (n * deliveries, n * (deliveries - 1), n, 0),
        "{CASE}: (received, retried, rejected, acked) in {report:?}"
    );
}

/// Runs the inner handler and reports the delivery's id once it returned: every delivery the
/// consumer handles, duplicates included.
struct Observed<H> {
    inner: H,
    deliveries: mpsc::UnboundedSender<MessageId>,
}

#[async_trait]
impl<H: Handler> Handler for Observed<H> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let outcome = self.inner.handle(delivery).await;
        let _ = self.deliveries.send(delivery.envelope().id.clone());
        outcome
    }
}

/// The same envelope (same id) published two or three times among 30 messages is applied once
/// by a handler behind [`IdempotencyLayer`] over a [`MemoryStore`]; its stats count the copies
/// as duplicates, acked without running the handler. Copies the broker adds by redelivering
/// are allowed; a second application never is.
pub async fn idempotency_under_injected_duplicates(h: Harness) {
    const CASE: &str = "idempotency_under_injected_duplicates";
    const MESSAGES: usize = 30;
    let caps = h.capabilities();
    let topic = unique("idem");
    let sub = subscribe(&h, &topic, group_or_private(&caps, &topic), CASE).await;

    let applied: Arc<Mutex<HashMap<MessageId, u32>>> = Arc::default();
    let idempotency = IdempotencyLayer::new(MemoryStore::new())
        .with_lease(h.receive_timeout)
        .with_ttl(Duration::from_secs(600));
    let stats = idempotency.stats();
    let effect = {
        let applied = applied.clone();
        handler_fn(move |envelope: Envelope, _: DeliveryInfo| {
            *applied.lock().unwrap().entry(envelope.id).or_default() += 1;
            async {}
        })
    };
    let (deliveries_tx, mut deliveries) = mpsc::unbounded_channel();
    let handler = Observed {
        inner: HandlerBuilder::new().layer(idempotency).handler(effect),
        deliveries: deliveries_tx,
    };
    let consumer = Consumer::new(sub, handler)
        .with_shutdown_timeout(h.receive_timeout)
        .spawn();

    // Each message has a key of its own, so copies of one message, keyed alike, are handled
    // one after another (not answered "in flight" and delayed by the lease).
    let sent: Vec<Envelope> = (0..MESSAGES)
        .map(|i| Envelope::new("conf.effect", format!("effect {i}")).with_key(format!("key-{i}")))
        .collect();
    // Copies: one straight after its original, one much later, one twice at the end.
    let mut published = Vec::new();
    for (i, envelope) in sent.iter().enumerate() {
        published.push(envelope.clone());
        match i {
            5 => published.push(sent[5].clone()),
            20 => published.push(sent[12].clone()),
            _ => {}
        }
    }
    published.extend([sent[25].clone(), sent[25].clone()]);
    let injected = published.len() - MESSAGES;
    for envelope in &published {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }

    let expected: HashSet<MessageId> = sent.iter().map(|e| e.id.clone()).collect();
    let mut handled: Vec<MessageId> = Vec::new();
    while handled.len() < published.len() {
        let progress = || {
            format!(
                "{} deliveries handled of {} published (the same envelope published again must \
                 be delivered again)",
                handled.len(),
                published.len()
            )
        };
        let id = next_report(&mut deliveries, h.receive_timeout, progress, CASE).await;
        assert!(
            expected.contains(&id),
            "{CASE}: handled {id}, which was not sent here"
        );
        handled.push(id);
    }
    // Redeliveries by the broker, if any, must be skipped too.
    handled.extend(drain_reports(&mut deliveries, h.quiet_period).await);
    let report = stop(consumer, CASE).await;
    handled.extend(drain_reports(&mut deliveries, Duration::ZERO).await);

    let applied = applied.lock().unwrap().clone();
    for envelope in &sent {
        assert_eq!(
            applied.get(&envelope.id).copied().unwrap_or(0),
            1,
            "{CASE}: times the effect of {} was applied",
            envelope.id
        );
    }
    assert_eq!(applied.len(), MESSAGES, "{CASE}: messages applied");
    let handled = handled.len() as u64;
    assert_eq!(stats.acquired(), MESSAGES as u64, "{CASE}: {stats:?}");
    assert!(
        stats.duplicates() >= injected as u64,
        "{CASE}: {injected} copies published, but {stats:?}"
    );
    assert_eq!(
        stats.acquired() + stats.duplicates() + stats.in_flight() + stats.store_errors(),
        handled,
        "{CASE}: {handled} deliveries handled, but {stats:?}"
    );
    assert_report_adds_up(&report, CASE);
    assert_eq!(
        report.acked,
        stats.acquired() + stats.duplicates(),
        "{CASE}: acked in {report:?}, with {stats:?}"
    );
}

/// A consumer with concurrency 16 over 8 keys × 12 messages, published interleaved, with
/// handlers taking a few random milliseconds: each key's messages are handled one at a time in
/// publish order, while handlers of different keys overlap.
pub async fn per_key_order_under_concurrency_16(h: Harness) {
    const CASE: &str = "per_key_order_under_concurrency_16";
    const KEYS: usize = 8;
    const PER_KEY: u32 = 12;
    const CONCURRENCY: usize = 16;
    let caps = h.capabilities();
    if no_per_key_order(CASE, &caps) {
        return;
    }
    let topic = unique("rtorder");
    let options = group_or_private(&caps, &topic).with_prefetch(2 * CONCURRENCY);
    let sub = subscribe(&h, &topic, options, CASE).await;
    let mut sent = Vec::new();
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            sent.push(
                Envelope::new("conf.ordered", format!("key {key} seq {seq}"))
                    .with_key(format!("key-{key}"))
                    .with_header(SEQ, seq.to_string()),
            );
        }
    }
    // Published before the consumer starts, so that it has many keys to run at once.
    for envelope in &sent {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }

    let keys_running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let same_key_overlaps: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let running = Arc::new(AtomicUsize::new(0));
    let most_running = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done) = mpsc::unbounded_channel::<(MessageId, String, u32)>();
    let handler = {
        let (keys_running, same_key_overlaps) = (keys_running.clone(), same_key_overlaps.clone());
        let (running, most_running) = (running.clone(), most_running.clone());
        handler_fn(move |envelope: Envelope, _: DeliveryInfo| {
            let (keys_running, same_key_overlaps) =
                (keys_running.clone(), same_key_overlaps.clone());
            let (running, most_running) = (running.clone(), most_running.clone());
            let done_tx = done_tx.clone();
            async move {
                let key = envelope.key.clone().unwrap_or_default();
                let seq: u32 = envelope
                    .header(SEQ)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u32::MAX);
                if !keys_running.lock().unwrap().insert(key.clone()) {
                    same_key_overlaps.lock().unwrap().push((key.clone(), seq));
                }
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most_running.fetch_max(now, Ordering::SeqCst);
                // The work: long enough that handlers of other keys start meanwhile.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=5))).await;
                running.fetch_sub(1, Ordering::SeqCst);
                keys_running.lock().unwrap().remove(&key);
                // Recorded when the work is done: its effect, as a user would see it.
                let _ = done_tx.send((envelope.id, key, seq));
            }
        })
    };
    let consumer = Consumer::new(sub, handler)
        .with_concurrency(CONCURRENCY)
        .with_shutdown_timeout(h.receive_timeout)
        .spawn();

    let expected: HashSet<MessageId> = sent.iter().map(|e| e.id.clone()).collect();
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    while seen.len() < expected.len() {
        let progress = || format!("{} of {} messages handled", seen.len(), expected.len());
        let (id, key, seq) = next_report(&mut done, h.receive_timeout, progress, CASE).await;
        assert!(
            expected.contains(&id),
            "{CASE}: handled {id}, which was not sent here"
        );
        seen.insert(id);
        order.push((key, seq));
    }
    let report = stop(consumer, CASE).await;
    assert_report_adds_up(&report, CASE);
    let overlaps = same_key_overlaps.lock().unwrap().clone();
    assert!(
        overlaps.is_empty(),
        "{CASE}: a message started while another of its key was running: (key, seq) {overlaps:?}"
    );
    assert_per_key_order(order, KEYS, PER_KEY, CASE);
    let most = most_running.load(Ordering::SeqCst);
    assert!(
        most > 1,
        "{CASE}: at most {most} handler(s) ran at once with concurrency {CONCURRENCY} over \
         {KEYS} keys: different keys were not handled in parallel"
    );
}

/// A consumer (concurrency 4) stopped after about half of 60 messages finishes what it runs
/// and settles it; a new consumer in the same group then gets the rest: every message is
/// handled at least once (duplicates allowed), and the first consumer's report accounts for
/// every delivery it received. What the stopping consumer drops unsettled (received but not
/// started), and what the adapter had pulled but not handed out, must come back within
/// [`Harness::receive_timeout`], not after a broker's ack timeout.
pub async fn graceful_shutdown_loses_nothing(h: Harness) {
    const CASE: &str = "graceful_shutdown_loses_nothing";
    const MESSAGES: usize = 60;
    const CONCURRENCY: usize = 4;
    let caps = h.capabilities();
    if no_groups(CASE, &caps) {
        return;
    }
    if !caps.prompt_redelivery_of_dropped {
        skip(
            CASE,
            format!(
                "{} redelivers what a stopping consumer drops only after a broker timeout \
                 (Capabilities::prompt_redelivery_of_dropped is false)",
                caps.name
            ),
        );
        return;
    }
    let topic = unique("shutdown");
    let options = SubscribeOptions::group(format!("{topic}.g1")).with_prefetch(2 * CONCURRENCY);
    let first = subscribe(&h, &topic, options.clone(), CASE).await;
    let sent: Vec<Envelope> = (0..MESSAGES)
        .map(|i| Envelope::new("conf.work", format!("work item {i}")).with_key(format!("key-{i}")))
        .collect();
    for envelope in &sent {
        publish(&h, &topic, envelope.clone(), CASE).await;
    }
    let expected: HashSet<MessageId> = sent.iter().map(|e| e.id.clone()).collect();

    let (done_tx, mut done) = mpsc::unbounded_channel::<MessageId>();
    let worker = || {
        let done_tx = done_tx.clone();
        handler_fn(move |envelope: Envelope, _: DeliveryInfo| {
            let done_tx = done_tx.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let _ = done_tx.send(envelope.id);
            }
        })
    };
    let consumer = Consumer::new(first, worker())
        .with_concurrency(CONCURRENCY)
        .with_shutdown_timeout(h.receive_timeout)
        .spawn();

    let mut handled = Vec::new();
    while handled.len() < MESSAGES / 2 {
        let progress = || format!("{} of {MESSAGES} messages handled", handled.len());
        handled.push(next_report(&mut done, h.receive_timeout, progress, CASE).await);
    }
    let first_report = stop(consumer, CASE).await;
    // Every handler of the first consumer has finished: what it did is in the channel.
    handled.extend(drain_reports(&mut done, Duration::ZERO).await);
    let by_first = handled.len() as u64;
    assert_report_adds_up(&first_report, &format!("{CASE}: first consumer"));
    assert_eq!(
        (first_report.retried, first_report.rejected),
        (0, 0),
        "{CASE}: first consumer: {first_report:?}"
    );
    assert_eq!(
        first_report.acked + first_report.unsettled,
        by_first,
        "{CASE}: first consumer: {by_first} handlers finished, but {first_report:?}"
    );
    assert!(
        first_report.acked < MESSAGES as u64,
        "{CASE}: the first consumer acked all {MESSAGES} before it was stopped; the case did \
         not test a shutdown mid-stream: {first_report:?}"
    );

    let second = subscribe(&h, &topic, options, CASE).await;
    let consumer = Consumer::new(second, worker())
        .with_concurrency(CONCURRENCY)
        .with_shutdown_timeout(h.receive_timeout)
        .spawn();
    let mut seen: HashSet<MessageId> = handled.iter().cloned().collect();
    while seen.len() < MESSAGES {
        let progress = || {
            format!(
                "with the second consumer, {} of {MESSAGES} messages handled ({} by the first)",
                seen.len(),
                by_first
            )
        };
        let id = next_report(&mut done, h.receive_timeout, progress, CASE).await;
        assert!(
            expected.contains(&id),
            "{CASE}: handled {id}, which was not sent here"
        );
        handled.push(id.clone());
        seen.insert(id);
    }
    let second_report = stop(consumer, CASE).await;
    assert_report_adds_up(&second_report, &format!("{CASE}: second consumer"));
    let duplicates =
        handled.len() + drain_reports(&mut done, Duration::ZERO).await.len() - MESSAGES;
    if duplicates > 0 {
        println!("note: {CASE}: {duplicates} message(s) handled twice (at least once allows it)");
    }
}

/// A message published through a [`TracedBroker`] inside a trace carries that trace in its
/// `traceparent` header (as the producer span's context), and the handler behind
/// [`TracingLayer`] runs in a consumer span of the same trace. Spans go to a tracer provider
/// of the case's own (the OpenTelemetry SDK's, without an exporter), so nothing global is
/// touched.
pub async fn trace_id_continuity_publish_to_process(h: Harness) {
    const CASE: &str = "trace_id_continuity_publish_to_process";
    const MESSAGES: usize = 3;
    let caps = h.capabilities();
    let provider = SdkTracerProvider::builder().build();
    let producer = TracedBroker::new(h.broker().clone()).with_tracer_provider(&provider);
    let topic = unique("trace");
    let sub = subscribe(&h, &topic, group_or_private(&caps, &topic), CASE).await;

    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(MessageId, Option<String>, SpanContext)>();
    let handler = HandlerBuilder::new()
        .layer(TracingLayer::new(caps.name).with_tracer_provider(&provider))
        .handler(handler_fn(move |envelope: Envelope, _: DeliveryInfo| {
            let seen_tx = seen_tx.clone();
            async move {
                let current = Context::current().span().span_context().clone();
                let traceparent = envelope.header(headers::TRACEPARENT).map(str::to_owned);
                let _ = seen_tx.send((envelope.id, traceparent, current));
            }
        }));
    let consumer = Consumer::new(sub, handler)
        .with_shutdown_timeout(h.receive_timeout)
        .spawn();

    // Each message in a trace of its own, as if started by a request that came in elsewhere.
    let mut started: HashMap<MessageId, SpanContext> = HashMap::new();
    for i in 0..MESSAGES {
        let remote = SpanContext::new(
            TraceId::from_bytes(fastrand::u128(1..).to_be_bytes()),
            SpanId::from_bytes(fastrand::u64(1..).to_be_bytes()),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(remote.clone());
        let envelope = Envelope::new("conf.traced", format!("traced {i}"));
        started.insert(envelope.id.clone(), remote);
        let id = envelope.id.clone();
        producer
            .publish(&topic, envelope)
            .with_context(cx)
            .await
            .unwrap_or_else(|e| panic!("{CASE}: traced publish of {id} to `{topic}` failed: {e}"));
    }

    let mut checked = HashSet::new();
    while checked.len() < MESSAGES {
        let progress = || format!("{} of {MESSAGES} messages handled", checked.len());
        let (id, traceparent, consumer_span) =
            next_report(&mut seen, h.receive_timeout, progress, CASE).await;
        let Some(remote) = started.get(&id) else {
            panic!("{CASE}: handled {id}, which was not sent here");
        };
        let trace_id = remote.trace_id().to_string();
        let Some(traceparent) = traceparent else {
            panic!("{CASE}: {id} arrived without a `traceparent` header");
        };
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert!(
            parts.len() == 4 && parts[1].len() == 32 && parts[2].len() == 16,
            "{CASE}: `traceparent` of {id} is {traceparent:?}, not W3C trace context"
        );
        assert_eq!(
            parts[1], trace_id,
            "{CASE}: trace id on the wire for {id} (traceparent {traceparent:?})"
        );
        assert_ne!(
            parts[2],
            remote.span_id().to_string(),
            "{CASE}: the `traceparent` of {id} names the caller's span, not a producer span"
        );
        assert!(
            consumer_span.is_valid(),
            "{CASE}: the handler of {id} ran outside any span"
        );
        assert_eq!(
            consumer_span.trace_id().to_string(),
            trace_id,
            "{CASE}: trace id the handler of {id} ran in"
        );
        assert_ne!(
            consumer_span.span_id().to_string(),
            parts[2],
            "{CASE}: the handler of {id} ran in the producer's span, not a consumer span"
        );
        // A copy (at least once) is checked like the first, and counted once.
        checked.insert(id);
    }
    let report = stop(consumer, CASE).await;
    assert_report_adds_up(&report, CASE);
    let _ = provider.shutdown();
}
