//! Trace context across producer → broker → consumer → follow-up publish, on the in-process
//! broker, with spans collected by an in-memory exporter.

use std::sync::Arc;
use std::time::Duration;

use adapter_memory::MemoryBroker;
use bus_core::middleware::tracing::{traced, TracedBroker, TracingLayer};
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo, Handler, Outcome};
use bus_core::{
    Broker, Delivery, Envelope, Error, ErrorKind, Publisher, SubscribeOptions, Subscriber,
    Subscription,
};
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceId};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tower_layer::Layer;

fn tracer() -> (SdkTracerProvider, InMemorySpanExporter) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    (provider, exporter)
}

fn finished(provider: &SdkTracerProvider, exporter: &InMemorySpanExporter) -> Vec<SpanData> {
    provider.force_flush().expect("flush");
    exporter.get_finished_spans().expect("spans")
}

fn span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one span `{name}`, got {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    found[0]
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn attr_str(span: &SpanData, key: &str) -> String {
    match attr(span, key) {
        Some(value) => value.as_str().into_owned(),
        None => panic!(
            "span `{}` has no attribute {key}: {:?}",
            span.name, span.attributes
        ),
    }
}

async fn next(subscription: &mut Subscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .expect("a delivery within 5 s")
        .expect("subscription open")
        .expect("delivery")
}

fn traceparent_ids(envelope: &Envelope) -> (String, String) {
    let header = envelope.header("traceparent").expect("traceparent header");
    let parts: Vec<&str> = header.split('-').collect();
    assert_eq!(parts.len(), 4, "{header}");
    (parts[1].to_owned(), parts[2].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_consumer_and_follow_up_share_one_trace() {
    let (provider, exporter) = tracer();
    let broker =
        Arc::new(TracedBroker::new(Arc::new(MemoryBroker::new())).with_tracer_provider(&provider));
    let orders = broker
        .subscribe("orders", SubscribeOptions::group("payment-service"))
        .await
        .unwrap();
    let mut payments = broker
        .subscribe("payments", SubscribeOptions::group("order-service"))
        .await
        .unwrap();

    let publisher = broker.clone();
    let handler = TracingLayer::new("memory")
        .with_tracer_provider(&provider)
        .layer(handler_fn(move |order: Envelope, _: DeliveryInfo| {
            let publisher = publisher.clone();
            async move {
                let captured = order.child("payment.captured", "{}");
                publisher.publish("payments", captured).await
            }
        }));
    let consumer = Consumer::new(orders, handler).spawn();

    let placed = Envelope::new("order.placed", r#"{"order":42}"#);
    broker.publish("orders", placed.clone()).await.unwrap();

    let captured = next(&mut payments).await;
    let captured_envelope = captured.envelope().clone();
    captured.ack().await.unwrap();
    let report = consumer.stop().await.unwrap();
    assert_eq!(report.acked, 1);

    let spans = finished(&provider, &exporter);
    let publish = span(&spans, "publish orders");
    let process = span(&spans, "process orders");
    let follow_up = span(&spans, "publish payments");

    // One trace, with the process span a child of the publish span, and the follow-up
    // publish a child of the process span.
    let trace_id = publish.span_context.trace_id();
    assert_ne!(trace_id, TraceId::INVALID);
    assert_eq!(
        publish.parent_span_id,
        SpanId::INVALID,
        "publish is the root"
    );
    assert_eq!(process.span_context.trace_id(), trace_id);
    assert_eq!(process.parent_span_id, publish.span_context.span_id());
    assert!(process.parent_span_is_remote);
    assert_eq!(follow_up.span_context.trace_id(), trace_id);
    assert_eq!(follow_up.parent_span_id, process.span_context.span_id());

    // The process span also links to the producer's context, as the conventions ask.
    let links: Vec<_> = process.links.iter().collect();
    assert_eq!(links.len(), 1);
    assert_eq!(
        links[0].span_context.span_id(),
        publish.span_context.span_id()
    );

    // Kinds and attributes follow the messaging conventions.
    assert_eq!(publish.span_kind, SpanKind::Producer);
    assert_eq!(process.span_kind, SpanKind::Consumer);
    assert_eq!(follow_up.span_kind, SpanKind::Producer);
    assert_eq!(attr_str(publish, "messaging.system"), "memory");
    assert_eq!(attr_str(publish, "messaging.destination.name"), "orders");
    assert_eq!(attr_str(publish, "messaging.operation.type"), "publish");
    assert_eq!(attr_str(publish, "messaging.operation.name"), "publish");
    assert_eq!(
        attr_str(publish, "messaging.message.id"),
        placed.id.as_str()
    );
    assert_eq!(
        attr_str(publish, "messaging.message.conversation_id"),
        placed.correlation_id.as_str()
    );
    assert_eq!(attr_str(process, "messaging.system"), "memory");
    assert_eq!(attr_str(process, "messaging.destination.name"), "orders");
    assert_eq!(attr_str(process, "messaging.operation.type"), "process");
    assert_eq!(attr_str(process, "messaging.operation.name"), "process");
    assert_eq!(
        attr_str(process, "messaging.message.id"),
        placed.id.as_str()
    );
    assert_eq!(
        attr_str(process, "messaging.consumer.group.name"),
        "payment-service"
    );
    assert_eq!(attr(process, "bus.delivery.attempt"), Some(&Value::I64(1)));
    assert_eq!(attr_str(process, "bus.outcome"), "ack");
    assert!(attr(process, "error.type").is_none());
    assert_eq!(process.status, Status::Unset);
    // The follow-up is in the same conversation: the correlation id of the first message.
    assert_eq!(
        attr_str(follow_up, "messaging.message.conversation_id"),
        placed.correlation_id.as_str()
    );

    // What travelled on the broker: the follow-up's traceparent names the follow-up span.
    let (header_trace, header_span) = traceparent_ids(&captured_envelope);
    assert_eq!(header_trace, trace_id.to_string());
    assert_eq!(header_span, follow_up.span_context.span_id().to_string());
    assert!(
        !captured_envelope.headers.contains_key("tracestate"),
        "no empty tracestate header"
    );
}

#[tokio::test]
async fn a_traceparent_set_by_the_caller_is_kept_and_linked() {
    let (provider, exporter) = tracer();
    let broker = TracedBroker::new(Arc::new(MemoryBroker::new())).with_tracer_provider(&provider);
    let mut sub = broker
        .subscribe("orders", SubscribeOptions::group("g"))
        .await
        .unwrap();
    let theirs = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    broker
        .publish(
            "orders",
            Envelope::new("order.placed", "{}")
                .with_header("traceparent", theirs)
                .with_header("tracestate", "vendor=1"),
        )
        .await
        .unwrap();
    let delivery = next(&mut sub).await;
    assert_eq!(delivery.envelope().header("traceparent"), Some(theirs));
    assert_eq!(delivery.envelope().header("tracestate"), Some("vendor=1"));
    delivery.ack().await.unwrap();

    let spans = finished(&provider, &exporter);
    let publish = span(&spans, "publish orders");
    let links: Vec<_> = publish.links.iter().collect();
    assert_eq!(
        links.len(),
        1,
        "the publish span links to the caller's context"
    );
    assert_eq!(
        links[0].span_context.trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(
        links[0].span_context.span_id().to_string(),
        "00f067aa0ba902b7"
    );
}

#[tokio::test]
async fn batch_publish_opens_one_span_and_marks_every_message() {
    let (provider, exporter) = tracer();
    let broker = TracedBroker::new(Arc::new(MemoryBroker::new())).with_tracer_provider(&provider);
    let mut sub = broker
        .subscribe("orders", SubscribeOptions::group("g"))
        .await
        .unwrap();
    let batch = (0..3)
        .map(|i| Envelope::new("order.placed", format!("{i}")))
        .collect();
    broker.publish_batch("orders", batch).await.unwrap();

    let spans = finished(&provider, &exporter);
    let publish = span(&spans, "publish orders");
    assert_eq!(
        attr(publish, "messaging.batch.message_count"),
        Some(&Value::I64(3))
    );
    assert!(attr(publish, "messaging.message.id").is_none());
    for _ in 0..3 {
        let delivery = next(&mut sub).await;
        let (trace, span_id) = traceparent_ids(delivery.envelope());
        assert_eq!(trace, publish.span_context.trace_id().to_string());
        assert_eq!(span_id, publish.span_context.span_id().to_string());
        delivery.ack().await.unwrap();
    }
}

#[tokio::test]
async fn retry_and_reject_are_recorded_on_the_consumer_span() {
    let (provider, exporter) = tracer();
    let broker = TracedBroker::new(Arc::new(MemoryBroker::new())).with_tracer_provider(&provider);
    let mut sub = broker
        .subscribe("jobs", SubscribeOptions::group("workers"))
        .await
        .unwrap();
    let handler = TracingLayer::new("memory")
        .with_tracer_provider(&provider)
        .layer(handler_fn(|job: Envelope, _: DeliveryInfo| async move {
            match &job.payload[..] {
                b"flaky" => Outcome::retry(Error::timeout("database")),
                _ => Outcome::reject(Error::new(ErrorKind::Serialization, "not JSON")),
            }
        }));
    broker
        .publish("jobs", Envelope::new("job", "flaky"))
        .await
        .unwrap();
    broker
        .publish("jobs", Envelope::new("job", "bad"))
        .await
        .unwrap();
    for _ in 0..2 {
        let delivery = next(&mut sub).await;
        let outcome = handler.handle(&delivery).await;
        assert!(!outcome.is_ack());
        delivery.ack().await.unwrap();
    }

    let spans = finished(&provider, &exporter);
    let processed: Vec<&SpanData> = spans.iter().filter(|s| s.name == "process jobs").collect();
    assert_eq!(processed.len(), 2);
    let retried = processed
        .iter()
        .find(|s| attr_str(s, "bus.outcome") == "retry")
        .expect("a retried span");
    assert_eq!(attr_str(retried, "error.type"), "timeout");
    assert!(matches!(retried.status, Status::Error { .. }));
    let rejected = processed
        .iter()
        .find(|s| attr_str(s, "bus.outcome") == "reject")
        .expect("a rejected span");
    assert_eq!(attr_str(rejected, "error.type"), "serialization");
    assert!(matches!(rejected.status, Status::Error { .. }));
    // Each consumer span continues the trace of its own publish.
    for process in processed {
        let parent = spans
            .iter()
            .find(|s| s.span_context.span_id() == process.parent_span_id)
            .expect("the parent span was exported");
        assert_eq!(parent.name, "publish jobs");
        assert_eq!(
            parent.span_context.trace_id(),
            process.span_context.trace_id()
        );
    }
}

#[tokio::test]
async fn a_failed_publish_is_recorded_on_the_producer_span() {
    let (provider, exporter) = tracer();
    let memory = Arc::new(MemoryBroker::new());
    let broker = TracedBroker::new(memory.clone()).with_tracer_provider(&provider);
    memory.close().await.unwrap();
    let error = broker
        .publish("orders", Envelope::new("order.placed", "{}"))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Closed);

    let spans = finished(&provider, &exporter);
    let publish = span(&spans, "publish orders");
    assert_eq!(attr_str(publish, "error.type"), "closed");
    assert!(matches!(publish.status, Status::Error { .. }));
}

#[tokio::test]
async fn a_message_without_trace_context_starts_a_new_trace() {
    let (provider, exporter) = tracer();
    let memory = Arc::new(MemoryBroker::new());
    let mut sub = memory
        .subscribe("orders", SubscribeOptions::group("g"))
        .await
        .unwrap();
    // Published without tracing: no traceparent.
    memory
        .publish("orders", Envelope::new("order.placed", "{}"))
        .await
        .unwrap();
    let handler = TracingLayer::new("memory")
        .with_tracer_provider(&provider)
        .layer(handler_fn(|_: Envelope, _: DeliveryInfo| async {}));
    let delivery = next(&mut sub).await;
    assert!(delivery.envelope().header("traceparent").is_none());
    assert!(handler.handle(&delivery).await.is_ack());
    delivery.ack().await.unwrap();

    let spans = finished(&provider, &exporter);
    let process = span(&spans, "process orders");
    assert_eq!(process.parent_span_id, SpanId::INVALID);
    assert_eq!(process.links.iter().count(), 0);
    assert_ne!(process.span_context.trace_id(), TraceId::INVALID);
}

#[tokio::test]
async fn traced_passes_everything_else_through() {
    let memory: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let broker = traced(memory.clone());
    assert_eq!(broker.capabilities(), memory.capabilities());
    let mut sub = broker
        .subscribe("t", SubscribeOptions::group("g"))
        .await
        .unwrap();
    broker.publish("t", Envelope::new("k", "p")).await.unwrap();
    let delivery = next(&mut sub).await;
    assert_eq!(delivery.envelope().kind, "k");
    delivery.ack().await.unwrap();
    broker.close().await.unwrap();
    assert_eq!(
        memory
            .publish("t", Envelope::new("k", "p"))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Closed
    );
}

/// `tracing` spans exported through `tracing-opentelemetry` nest with ours both ways: a span
/// opened inside the handler is a child of the `process` span, and a publish made inside a
/// `tracing` span is its child.
#[tokio::test]
async fn tracing_opentelemetry_spans_join_the_trace() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    let (provider, exporter) = tracer();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("app")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let broker =
        Arc::new(TracedBroker::new(Arc::new(MemoryBroker::new())).with_tracer_provider(&provider));
    let mut sub = broker
        .subscribe("orders", SubscribeOptions::group("g"))
        .await
        .unwrap();
    {
        let checkout = tracing::info_span!("checkout");
        let publish = async {
            broker
                .publish("orders", Envelope::new("order.placed", "{}"))
                .await
                .unwrap();
        };
        tracing::Instrument::instrument(publish, checkout).await;
    }
    let handler = TracingLayer::new("memory")
        .with_tracer_provider(&provider)
        .layer(handler_fn(|_: Envelope, _: DeliveryInfo| async {
            let charge = tracing::info_span!("charge card");
            charge.in_scope(|| tracing::info!("charged"));
        }));
    let delivery = next(&mut sub).await;
    assert!(handler.handle(&delivery).await.is_ack());
    delivery.ack().await.unwrap();

    let spans = finished(&provider, &exporter);
    let checkout = span(&spans, "checkout");
    let publish = span(&spans, "publish orders");
    let process = span(&spans, "process orders");
    let charge = span(&spans, "charge card");
    assert_eq!(publish.parent_span_id, checkout.span_context.span_id());
    assert_eq!(process.parent_span_id, publish.span_context.span_id());
    assert_eq!(charge.parent_span_id, process.span_context.span_id());
    for s in [publish, process, charge] {
        assert_eq!(s.span_context.trace_id(), checkout.span_context.trace_id());
    }
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    type Noop = bus_core::runtime::HandlerFn<fn(Envelope, DeliveryInfo) -> std::future::Ready<()>>;
    send_sync::<TracedBroker>();
    send_sync::<TracedBroker<MemoryBroker>>();
    send_sync::<TracingLayer>();
    send_sync::<bus_core::middleware::tracing::Tracing<Noop>>();
    send_sync::<bus_core::middleware::metrics::BusMetrics>();
    send_sync::<bus_core::middleware::metrics::MetricsLayer>();
    send_sync::<bus_core::middleware::metrics::Metered<Noop>>();
    send_sync::<bus_core::middleware::metrics::MeteredBroker>();
}
