//! One trace across two services: order service → broker → payment service → broker → order
//! service, written with the service API (`bus::Service`).
//!
//! Both services share the in-process memory broker, each through its own [`TracedBroker`]
//! (which opens a producer span per publish and writes its context into the message), and
//! run their typed handlers behind a [`TracingLayer`] (`Service::with_layer`; a consumer span
//! per delivery, continuing the producer's trace):
//! - the order service, inside a `tracing` span `place order`, publishes `OrderPlaced`;
//! - the payment service handles it (span `process order.placed`, a child of the producer's
//!   `publish order.placed`), does its work in a `tracing` span `capture payment`, and
//!   publishes `PaymentCaptured`, caused by the order;
//! - the order service handles `PaymentCaptured`.
//!
//! Spans are exported to OpenTelemetry's in-memory exporter (in a real service: an OTLP
//! exporter) through the global tracer provider, and the application's own `tracing` spans
//! reach it through `tracing-opentelemetry`. The program prints the trace id each handler saw
//! and the exported spans as a tree, and exits non-zero if the two services saw different
//! traces, if any expected span is missing, or if a span has the wrong parent.
//!
//! Run it with `cargo run -p examples --example tracing_two_services` (no broker needed).
//!
//! With `--asyncapi <dir>` it writes the AsyncAPI 3.0 documents of both services (built by the
//! same functions) into `<dir>` and exits (`scripts/asyncapi.sh` validates them).
//!
//! The payment service publishes its follow-up with `ctx.publish`: caused by the order
//! (correlation and causation ids), and, as its handler runs inside the consumer span, with the
//! trace context of the producer span its `TracedBroker` opens (docs/ARCHITECTURE.md §14).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use adapter_memory::MemoryBroker;
use bus::service::Context;
use bus::{Bus, Envelope, Message, Service};
use bus_core::middleware::tracing::{TracedBroker, TracingLayer};
use bus_core::{Broker, Error};
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Layer as _, SubscriberExt};

const ORDERS: &str = "order.placed";
const PAYMENTS: &str = "payment.captured";

/// An event of the order service.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
struct OrderPlaced {
    order: u32,
}

impl Message for OrderPlaced {
    const KIND: &'static str = "order.placed";
}

/// An event of the payment service.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
struct PaymentCaptured {
    order: u32,
    amount: u64,
}

impl Message for PaymentCaptured {
    const KIND: &'static str = "payment.captured";
}

/// What a handler saw: which service, which message kind, in which trace.
#[derive(Debug)]
struct Seen {
    service: &'static str,
    kind: String,
    trace_id: TraceId,
}

type SeenTx = mpsc::UnboundedSender<Seen>;

fn current_trace_id() -> TraceId {
    opentelemetry::Context::current()
        .span()
        .span_context()
        .trace_id()
}

/// The payment service's handler: runs inside the consumer span of `TracingLayer`.
async fn capture_payment(order: OrderPlaced, ctx: Context, seen: SeenTx) -> bus::Result<()> {
    let _ = seen.send(Seen {
        service: "payment-service",
        kind: ctx.envelope().kind.clone(),
        trace_id: current_trace_id(),
    });
    let captured = async {
        tracing::info!(order = order.order, "charging card");
        PaymentCaptured {
            order: order.order,
            amount: 4_200,
        }
    }
    .instrument(tracing::info_span!("capture payment"))
    .await;
    // Caused by the order (correlation and causation ids); the trace context is the publish
    // span's, written by the TracedBroker.
    ctx.publish(PAYMENTS, &captured).await.map(|_| ())
}

/// The order service's handler of payments.
async fn payment_captured(_: PaymentCaptured, ctx: Context, seen: SeenTx) -> bus::Result<()> {
    let _ = seen.send(Seen {
        service: "order-service",
        kind: ctx.envelope().kind.clone(),
        trace_id: current_trace_id(),
    });
    Ok(())
}

/// The payment service: handles `OrderPlaced`, captures the payment, announces it.
fn payment_service(bus: Bus, system: &'static str, seen: SeenTx) -> Service {
    Service::new("payment-service", bus)
        .with_layer(TracingLayer::new(system))
        .on(ORDERS, move |order, ctx| {
            capture_payment(order, ctx, seen.clone())
        })
        .publishes::<PaymentCaptured>(PAYMENTS)
        .with_schema::<OrderPlaced>()
        .with_schema::<PaymentCaptured>()
}

/// The order service: places orders, and handles `PaymentCaptured`.
fn order_service(bus: Bus, system: &'static str, seen: SeenTx) -> Service {
    Service::new("order-service", bus)
        .with_layer(TracingLayer::new(system))
        .on(PAYMENTS, move |payment, ctx| {
            payment_captured(payment, ctx, seen.clone())
        })
        .publishes::<OrderPlaced>(ORDERS)
        .with_schema::<OrderPlaced>()
        .with_schema::<PaymentCaptured>()
}

/// `--asyncapi <dir>`: writes both services' documents instead of running them.
fn write_asyncapi(shared: &Arc<dyn Broker>) -> Option<ExitCode> {
    let written = examples::asyncapi_dir().and_then(|dir| {
        let Some(dir) = dir else { return Ok(false) };
        let system = shared.capabilities().name;
        let (seen, _) = mpsc::unbounded_channel();
        let bus = Bus::from_arc(shared.clone());
        for service in [
            payment_service(bus.clone(), system, seen.clone()),
            order_service(bus, system, seen),
        ] {
            examples::write_asyncapi(&dir, "tracing_two_services", &service, "memory://")?;
        }
        Ok(true)
    });
    match written {
        Ok(false) => None,
        Ok(true) => Some(ExitCode::SUCCESS),
        Err(error) => {
            eprintln!("error: {error}");
            Some(ExitCode::FAILURE)
        }
    }
}

#[tokio::main]
async fn main() -> Result<ExitCode, Error> {
    let shared: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
    if let Some(exit) = write_asyncapi(&shared) {
        return Ok(exit);
    }

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

    let system = shared.capabilities().name;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();

    // Each service on its own bus over a TracedBroker of the shared broker.
    let payment_service = payment_service(
        Bus::new(TracedBroker::new(shared.clone())),
        system,
        seen_tx.clone(),
    )
    .start()
    .await?;
    let orders = Bus::new(TracedBroker::new(shared.clone()));
    let order_service = order_service(orders.clone(), system, seen_tx)
        .start()
        .await?;

    let placed = Envelope::encode(&OrderPlaced { order: 42 })?.with_key("order-42");
    orders
        .publish(ORDERS, placed)
        .instrument(tracing::info_span!("place order"))
        .await?;

    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await {
            Ok(Some(s)) => seen.push(s),
            Ok(None) | Err(_) => break,
        }
    }
    let mut problems = Vec::new();
    for service in [payment_service, order_service] {
        let report = service.stop().await;
        if !report.is_clean() {
            problems.push(format!(
                "{} stopped with an error: {report:?}",
                report.service
            ));
        }
    }
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

    problems.extend(check(&seen, &spans));
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
