//! One trace across two services: order service → broker → payment service → broker → order
//! service.
//!
//! Both services share the in-process memory broker, each through its own
//! [`TracedBroker`], and run their handlers in the consumer runtime behind a
//! [`TracingLayer`]:
//! - the order service, inside a `tracing` span `place order`, publishes `order.placed`;
//! - the payment service handles it (span `process order.placed`, a child of the producer's
//!   `publish order.placed`), does its work in a `tracing` span `capture payment`, and
//!   publishes `payment.captured`, caused by the order;
//! - the order service handles `payment.captured`.
//!
//! Spans are exported to OpenTelemetry's in-memory exporter (in a real service: an OTLP
//! exporter) through the global tracer provider, and the application's own `tracing` spans
//! reach it through `tracing-opentelemetry`. The program prints the trace id each handler saw
//! and the exported spans as a tree, and exits non-zero if the two services saw different
//! traces, if any expected span is missing, or if a span has the wrong parent.
//!
//! Run it with `cargo run -p examples --example tracing_two_services` (no broker needed).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use adapter_memory::MemoryBroker;
use bus_core::middleware::tracing::{TracedBroker, TracingLayer};
use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo, HandlerBuilder};
use bus_core::{Broker, Envelope, Error, Publisher, SubscribeOptions, Subscriber};
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Layer as _, SubscriberExt};

/// What a handler saw: which service, which message kind, in which trace.
#[derive(Debug)]
struct Seen {
    service: &'static str,
    kind: String,
    trace_id: TraceId,
}

fn current_trace_id() -> TraceId {
    Context::current().span().span_context().trace_id()
}

#[tokio::main]
async fn main() -> Result<ExitCode, Error> {
    // Telemetry, as an application sets it up once at start: a tracer provider (here with an
    // in-memory exporter, to check the result), installed globally, and `tracing` bridged to it.
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    // Info and above: the consumer runtime's own debug-level `process` span (one per delivery,
    // outside any trace) stays out of the export.
    let subscriber = tracing_subscriber::registry().with(
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("tracing_two_services"))
            .with_filter(LevelFilter::INFO),
    );
    tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");

    let shared: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    let system = shared.capabilities().name;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();

    // Payment service: handles `order.placed`, captures the payment, announces it.
    let payments = Arc::new(TracedBroker::new(shared.clone()));
    let payment_consumer = {
        let publisher = payments.clone();
        let seen = seen_tx.clone();
        let handler = HandlerBuilder::new()
            .layer(TracingLayer::new(system))
            .handler(handler_fn(move |order: Envelope, _: DeliveryInfo| {
                let publisher = publisher.clone();
                let seen = seen.clone();
                async move {
                    seen.send(Seen {
                        service: "payment-service",
                        kind: order.kind.clone(),
                        trace_id: current_trace_id(),
                    })
                    .ok();
                    let captured = async {
                        tracing::info!(order = %String::from_utf8_lossy(&order.payload), "charging card");
                        order.child("payment.captured", r#"{"amount":4200}"#)
                    }
                    .instrument(tracing::info_span!("capture payment"))
                    .await;
                    publisher.publish("payment.captured", captured).await
                }
            }));
        let subscription = payments
            .subscribe("order.placed", SubscribeOptions::group("payment-service"))
            .await?;
        Consumer::new(subscription, handler).spawn()
    };

    // Order service: places the order, and handles `payment.captured`.
    let orders = Arc::new(TracedBroker::new(shared.clone()));
    let order_consumer = {
        let seen = seen_tx.clone();
        let handler = HandlerBuilder::new()
            .layer(TracingLayer::new(system))
            .handler(handler_fn(move |payment: Envelope, _: DeliveryInfo| {
                let seen = seen.clone();
                async move {
                    seen.send(Seen {
                        service: "order-service",
                        kind: payment.kind.clone(),
                        trace_id: current_trace_id(),
                    })
                    .ok();
                }
            }));
        let subscription = orders
            .subscribe("payment.captured", SubscribeOptions::group("order-service"))
            .await?;
        Consumer::new(subscription, handler).spawn()
    };
    drop(seen_tx);

    let placed = Envelope::new("order.placed", r#"{"order":42}"#).with_key("order-42");
    orders
        .publish("order.placed", placed)
        .instrument(tracing::info_span!("place order"))
        .await?;

    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await {
            Ok(Some(s)) => seen.push(s),
            Ok(None) | Err(_) => break,
        }
    }
    payment_consumer.stop().await?;
    order_consumer.stop().await?;
    provider.force_flush().expect("flush the span exporter");
    let spans = exporter.get_finished_spans().expect("finished spans");

    for s in &seen {
        println!(
            "{:<16} handled {:<17} in trace {}",
            s.service, s.kind, s.trace_id
        );
    }
    println!();
    print_tree(&spans);
    println!();

    let problems = check(&seen, &spans);
    if problems.is_empty() {
        println!("ok: both services saw one trace, with every span in its place");
        Ok(ExitCode::SUCCESS)
    } else {
        for problem in &problems {
            eprintln!("error: {problem}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// Prints the spans as a tree, children under their parents.
fn print_tree(spans: &[SpanData]) {
    fn print(spans: &[SpanData], parent: SpanId, depth: usize) {
        let mut children: Vec<&SpanData> = spans
            .iter()
            .filter(|s| s.parent_span_id == parent)
            .collect();
        children.sort_by_key(|s| s.start_time);
        for span in children {
            println!(
                "{:indent$}{} [{:?}] trace={} span={}",
                "",
                span.name,
                span.span_kind,
                span.span_context.trace_id(),
                span.span_context.span_id(),
                indent = depth * 2
            );
            print(spans, span.span_context.span_id(), depth + 1);
        }
    }
    print(spans, SpanId::INVALID, 0);
}

/// Everything that must hold; each failure as one line.
fn check(seen: &[Seen], spans: &[SpanData]) -> Vec<String> {
    let mut problems = Vec::new();
    let payment = seen.iter().find(|s| s.service == "payment-service");
    let order = seen.iter().find(|s| s.service == "order-service");
    match (payment, order) {
        (Some(p), Some(o)) if p.trace_id != o.trace_id => problems.push(format!(
            "the services saw different traces: payment-service {}, order-service {}",
            p.trace_id, o.trace_id
        )),
        (Some(p), Some(_)) if p.trace_id == TraceId::INVALID => {
            problems.push("the handlers saw no trace at all".into());
        }
        (Some(_), Some(_)) => {}
        _ => problems.push(format!("not both services handled a message: {seen:?}")),
    }

    // (span, its expected parent)
    let expected = [
        ("place order", None),
        ("publish order.placed", Some("place order")),
        ("process order.placed", Some("publish order.placed")),
        ("capture payment", Some("process order.placed")),
        ("publish payment.captured", Some("process order.placed")),
        ("process payment.captured", Some("publish payment.captured")),
    ];
    let find = |name: &str| spans.iter().find(|s| s.name == name);
    let root_trace = find("place order").map(|s| s.span_context.trace_id());
    for (name, parent) in expected {
        let Some(span) = find(name) else {
            problems.push(format!("span `{name}` is missing"));
            continue;
        };
        if Some(span.span_context.trace_id()) != root_trace {
            problems.push(format!("span `{name}` is in another trace"));
        }
        let parent_id = parent
            .and_then(&find)
            .map_or(SpanId::INVALID, |p| p.span_context.span_id());
        if span.parent_span_id != parent_id {
            problems.push(format!(
                "span `{name}` should be a child of {}",
                parent.unwrap_or("nothing")
            ));
        }
    }
    for span in spans {
        if !expected.iter().any(|(name, _)| span.name == *name) {
            problems.push(format!("unexpected span `{}`", span.name));
        }
    }
    if let (Some(trace), Some(p)) = (root_trace, payment) {
        if p.trace_id != trace {
            problems.push("the handlers' trace is not the exported one".into());
        }
    }
    problems
}
