//! Messaging metrics with OpenTelemetry: messages sent, consumed and processed (by outcome), and
//! how long processing took.
//!
//! What gets counted and timed, following the OpenTelemetry messaging semantic conventions
//! where they define an instrument:
//!
//! | instrument | kind, unit | recorded by | attributes |
//! |---|---|---|---|
//! | `messaging.client.sent.messages` | counter, `{message}` | [`MeteredBroker`]: publish, publish_batch (one per message), send, request | system, destination, operation name `publish`, `error.type` on failure |
//! | `messaging.client.operation.duration` | histogram, `s` | [`MeteredBroker`]: the same operations (a request includes the wait for the reply) | as above |
//! | `messaging.client.consumed.messages` | counter, `{message}` | [`MetricsLayer`]: each delivery handed to the handler | system, destination, consumer group, operation name `process` |
//! | `messaging.process.duration` | histogram, `s` | [`MetricsLayer`]: each handler run | as above, `bus.outcome`, `error.type` on retry or reject |
//! | `bus.consumer.outcomes` | counter, `{message}` | [`MetricsLayer`]: each handler run, by outcome | as above |
//!
//! `bus.outcome` is `ack` (processed), `retry` (failed, will be redelivered) or `reject`
//! (dead-lettered); `error.type` is the [`ErrorKind`](crate::ErrorKind) name; the attribute
//! names are in [`semconv`](crate::middleware::tracing::semconv). Histograms use the
//! conventions' bucket boundaries, 5 ms to 10 s.
//!
//! The instruments are created once, in a [`BusMetrics`], and shared (cheaply cloned) by every
//! layer and broker wrapper made from it.
//!
//! **Consumer lag** (how far a group is behind the head of its topic) is only known to the
//! broker: Kafka's committed offsets against the high watermark, SQS's
//! `ApproximateNumberOfMessages`, a JetStream consumer's pending count. It is left to the
//! adapters to report where their broker can tell; none does yet, and this module does not
//! estimate it.
//!
//! ```
//! use std::sync::Arc;
//! use bus_core::{Broker, Envelope};
//! use bus_core::middleware::metrics::{BusMetrics, MeteredBroker, MetricsLayer};
//! use bus_core::runtime::{handler_fn, DeliveryInfo, HandlerBuilder};
//!
//! # fn example(broker: Arc<dyn Broker>) {
//! // After the application has installed its meter provider:
//! let metrics = BusMetrics::global();
//! let system = broker.capabilities().name;
//! let broker = MeteredBroker::new(broker, metrics.clone());
//! let handler = HandlerBuilder::new()
//!     .layer(MetricsLayer::new(metrics, system))
//!     .handler(handler_fn(|_: Envelope, _: DeliveryInfo| async {}));
//! # let _ = (broker, handler); }
//! ```
//!
//! Requires the `opentelemetry` feature.

mod broker;
mod layer;

use std::fmt;
use std::sync::Arc;

use opentelemetry::global;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider};

pub use broker::MeteredBroker;
pub use layer::{Metered, MetricsLayer};

/// Bucket boundaries, in seconds, that the conventions recommend for messaging durations.
const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The set of messaging instruments, created once and shared by the [`MetricsLayer`]s and
/// [`MeteredBroker`]s made from it. Cloning is cheap.
#[derive(Clone)]
pub struct BusMetrics {
    instruments: Arc<Instruments>,
}

struct Instruments {
    sent: Counter<u64>,
    operation_duration: Histogram<f64>,
    consumed: Counter<u64>,
    process_duration: Histogram<f64>,
    outcomes: Counter<u64>,
}

impl BusMetrics {
    /// Instruments from `provider`, under the instrumentation scope `bus`.
    #[must_use]
    pub fn new<P: MeterProvider + ?Sized>(provider: &P) -> Self {
        Self::from_meter(&provider.meter_with_scope(crate::middleware::tracing::scope()))
    }

    /// Instruments from the global meter provider.
    ///
    /// Instruments stay bound to the provider installed when they are created: call this after
    /// `opentelemetry::global::set_meter_provider`.
    #[must_use]
    pub fn global() -> Self {
        Self::from_meter(&global::meter_with_scope(
            crate::middleware::tracing::scope(),
        ))
    }

    /// Instruments from `meter`.
    #[must_use]
    pub fn from_meter(meter: &Meter) -> Self {
        let instruments = Instruments {
            sent: meter
                .u64_counter("messaging.client.sent.messages")
                .with_unit("{message}")
                .with_description(
                    "Number of messages the producer attempted to send to the broker.",
                )
                .build(),
            operation_duration: meter
                .f64_histogram("messaging.client.operation.duration")
                .with_unit("s")
                .with_description("Duration of messaging operations initiated by a producer.")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            consumed: meter
                .u64_counter("messaging.client.consumed.messages")
                .with_unit("{message}")
                .with_description("Number of messages delivered to the application's handlers.")
                .build(),
            process_duration: meter
                .f64_histogram("messaging.process.duration")
                .with_unit("s")
                .with_description("Duration of processing a message in a handler.")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            outcomes: meter
                .u64_counter("bus.consumer.outcomes")
                .with_unit("{message}")
                .with_description(
                    "Messages handled, by outcome: ack (processed), retry (failed, \
                     redelivered), reject (dead-lettered).",
                )
                .build(),
        };
        Self {
            instruments: Arc::new(instruments),
        }
    }
}

impl fmt::Debug for BusMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusMetrics").finish_non_exhaustive()
    }
}
