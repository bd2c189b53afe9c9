//! The service layer with the tracing middleware: a follow-up published with `ctx.publish`
//! continues the trace from the producer span of its own publish, so the next service's
//! consumer span is a child of that producer span (not of the previous hop's).

#![cfg(feature = "opentelemetry")]

use std::sync::Arc;
use std::time::Duration;

use bus::middleware::tracing::{TracedBroker, TracingLayer};
use bus::{Broker, Bus, Context, Envelope, Message, Service};
use opentelemetry::trace::SpanId;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order: u32,
}
impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
}

#[derive(Debug, Serialize, Deserialize)]
struct PaymentCaptured {
    order: u32,
}
impl Message for PaymentCaptured {
    const KIND: &'static str = "payment.captured";
}

fn span<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span `{name}` among {:?}", names(spans)))
}

fn names(spans: &[SpanData]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_ref()).collect()
}

#[tokio::test]
async fn a_follow_up_continues_from_its_own_producer_span() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let shared: Arc<dyn Broker> = Arc::new(bus::MemoryBroker::new());
    let system = shared.capabilities().name;
    let traced = |broker: &Arc<dyn Broker>| {
        TracedBroker::new(broker.clone()).with_tracer_provider(&provider)
    };
    let layer = || TracingLayer::new(system).with_tracer_provider(&provider);

    let payments = Service::new("payments", Bus::new(traced(&shared)))
        .with_layer(layer())
        .on("orders", |order: OrderPlaced, ctx: Context| async move {
            ctx.publish("payments", &PaymentCaptured { order: order.order })
                .await
                .map(|_| ())
        })
        .start()
        .await
        .expect("payments starts");
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Envelope>();
    let orders_bus = Bus::new(traced(&shared));
    let orders = Service::new("orders", orders_bus.clone())
        .with_layer(layer())
        .on("payments", move |_: PaymentCaptured, ctx: Context| {
            let seen = seen_tx.clone();
            async move {
                let _ = seen.send(ctx.envelope().clone());
                Ok(())
            }
        })
        .start()
        .await
        .expect("orders starts");

    orders_bus
        .publish(
            "orders",
            Envelope::encode(&OrderPlaced { order: 7 }).expect("encodes"),
        )
        .await
        .expect("published");
    let captured = timeout(WAIT, seen_rx.recv())
        .await
        .expect("timed out waiting for the payment")
        .expect("the handler is alive");
    assert!(payments.stop().await.is_clean());
    assert!(orders.stop().await.is_clean());
    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");

    let publish_order = span(&spans, "publish orders");
    let process_order = span(&spans, "process orders");
    let publish_payment = span(&spans, "publish payments");
    let process_payment = span(&spans, "process payments");
    let trace = publish_order.span_context.trace_id();
    for s in [process_order, publish_payment, process_payment] {
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "`{}` in one trace",
            s.name
        );
    }
    assert_eq!(publish_order.parent_span_id, SpanId::INVALID);
    assert_eq!(
        process_order.parent_span_id,
        publish_order.span_context.span_id(),
        "the first consumer continues from the first producer"
    );
    assert_eq!(
        publish_payment.parent_span_id,
        process_order.span_context.span_id(),
        "the follow-up is published inside the consumer span"
    );
    assert_eq!(
        process_payment.parent_span_id,
        publish_payment.span_context.span_id(),
        "the second consumer continues from the follow-up's own producer span"
    );
    // What the follow-up carried: the producer span's context.
    let traceparent = captured
        .header(bus::headers::TRACEPARENT)
        .expect("a traceparent");
    assert!(
        traceparent.contains(&publish_payment.span_context.span_id().to_string()),
        "{traceparent} names the producer span"
    );
}
