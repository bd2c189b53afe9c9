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
//! | `messaging.client.consumed.messages` | counter (observable), `{message}` | [`MetricsLayer`]: each delivery handed to the handler | system, destination, consumer group, operation name `process` |
//! | `messaging.process.duration` | histogram, `s` | [`MetricsLayer`]: each handler run | as above, `bus.outcome`, `error.type` on retry or reject |
//! | `bus.consumer.outcomes` | counter (observable), `{message}` | [`MetricsLayer`]: each handler run, by outcome | as above |
//! | `bus.consumer.parked_keys` | gauge, `{key}` | [`BusMetrics::observe_consumer`]: keys a failed message holds back for its retry in place ([`KeyOrder::Ordered`](crate::runtime::KeyOrder)) | system, destination, consumer group |
//! | `bus.consumer.parked_messages` | gauge, `{message}` | [`BusMetrics::observe_consumer`]: deliveries those keys hold (parked, and waiting behind them) | as above |
//! | `bus.consumer.running` / `bus.consumer.pending` | gauge, `{message}` | [`BusMetrics::observe_consumer`]: handlers running; deliveries waiting for a slot or their key | as above |
//! | `bus.backlog` | gauge, `{message}` | [`BusMetrics::observe_backlog`]: [`Broker::backlog`](crate::Broker::backlog) of a group or queue, read on an interval, one point per part the broker reports | system, destination, consumer group (for a group), [`BUS_BACKLOG_STATE`] `waiting` / `in_flight` / `delayed` |
//! | `bus.backlog.oldest_age` | gauge, `s` | [`BusMetrics::observe_backlog`]: how long the oldest waiting message has waited, where the broker can tell | system, destination, consumer group |
//!
//! `bus.outcome` is `ack` (processed), `retry` (failed, will be redelivered) or `reject`
//! (dead-lettered); `error.type` is the [`ErrorKind`](crate::ErrorKind) name; the attribute
//! names are in [`semconv`]. Histograms use the
//! conventions' bucket boundaries, 5 ms to 10 s.
//!
//! The instruments are created once, in a [`BusMetrics`], and shared (cheaply cloned) by every
//! layer and broker wrapper made from it. The two consumer counters are observable: a
//! [`MetricsLayer`] adds to totals of its own, per destination, group, outcome and error type,
//! and the SDK reads them when it collects, instead of looking up an attribute set for every
//! message (the exported sums are the same).
//!
//! **Consumer lag** (how far a group is behind the head of its topic) is only known to the
//! broker: Kafka's committed offsets against the high watermark, SQS's
//! `ApproximateNumberOfMessages`, a JetStream consumer's pending count. The adapters report it
//! through [`Broker::backlog`](crate::Broker::backlog) where their broker can tell, and
//! [`BusMetrics::observe_backlog`] exports it: a task reads the chosen groups and queues on
//! an interval and the gauges' callbacks report the last readings, so a collection never waits
//! on the broker. This module does not estimate lag where the broker cannot count it.
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

mod backlog;
mod broker;
mod counts;
mod layer;

use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use opentelemetry::global;
use opentelemetry::metrics::{
    Counter, Histogram, Meter, MeterProvider, ObservableCounter, ObservableGauge,
};
use opentelemetry::KeyValue;

use crate::middleware::tracing::semconv;
use crate::runtime::consumer::GaugeValues;
use crate::runtime::ConsumerGauges;

pub use backlog::{BacklogGauge, BUS_BACKLOG_STATE};
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
    process_duration: Histogram<f64>,
    /// What [`MetricsLayer`]s counted, reported by `_counters`.
    totals: counts::Registry,
    _counters: Vec<ObservableCounter<u64>>,
    /// The consumers [`BusMetrics::observe_consumer`] was given, read by the gauges' callbacks;
    /// an entry goes when its consumer's gauges are dropped.
    consumers: Consumers,
    /// The groups and queues [`BusMetrics::observe_backlog`] was given.
    backlogs: backlog::Observations,
    /// Kept so that the callbacks stay registered as long as the instruments live.
    _gauges: Vec<ObservableGauge<u64>>,
    _age_gauge: ObservableGauge<f64>,
}

type Consumers = Arc<Mutex<Vec<(Vec<KeyValue>, Weak<GaugeValues>)>>>;

/// Registers the gauge `name`, reporting `read` of every observed consumer.
fn consumer_gauge(
    meter: &Meter,
    consumers: &Consumers,
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    read: fn(&ConsumerGauges) -> u64,
) -> ObservableGauge<u64> {
    let consumers = consumers.clone();
    meter
        .u64_observable_gauge(name)
        .with_unit(unit)
        .with_description(description)
        .with_callback(move |observer| {
            let mut consumers = consumers.lock().unwrap_or_else(|e| e.into_inner());
            consumers.retain(|(_, values)| values.strong_count() > 0);
            for (attributes, values) in consumers.iter() {
                if let Some(values) = values.upgrade() {
                    observer.observe(read(&ConsumerGauges::from_values(values)), attributes);
                }
            }
        })
        .build()
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
        let consumers = Consumers::default();
        let backlogs = backlog::Observations::default();
        let mut gauges = vec![
            consumer_gauge(
                meter,
                &consumers,
                "bus.consumer.parked_keys",
                "{key}",
                "Keys held back by a failed message waiting for its retry in place.",
                ConsumerGauges::parked_keys,
            ),
            consumer_gauge(
                meter,
                &consumers,
                "bus.consumer.parked_messages",
                "{message}",
                "Deliveries held by parked keys: the failed ones and those waiting behind them.",
                ConsumerGauges::parked_deliveries,
            ),
            consumer_gauge(
                meter,
                &consumers,
                "bus.consumer.running",
                "{message}",
                "Handlers running.",
                ConsumerGauges::running,
            ),
            consumer_gauge(
                meter,
                &consumers,
                "bus.consumer.pending",
                "{message}",
                "Deliveries received and waiting for a handler slot or for their key.",
                ConsumerGauges::pending,
            ),
        ];
        gauges.extend(backlog::gauges(meter, &backlogs));
        let age_gauge = backlog::age_gauge(meter, &backlogs);
        let totals = counts::Registry::default();
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
            process_duration: meter
                .f64_histogram("messaging.process.duration")
                .with_unit("s")
                .with_description("Duration of processing a message in a handler.")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            _counters: counts::counters(meter, &totals),
            totals,
            consumers,
            backlogs,
            _gauges: gauges,
            _age_gauge: age_gauge,
        };
        Self {
            instruments: Arc::new(instruments),
        }
    }

    /// Reports what the consumer behind `gauges` holds (parked keys and messages, running
    /// handlers, pending deliveries) as gauges, each time the meter provider collects, for as
    /// long as the consumer or a clone of its gauges exists. `system` is the adapter's name,
    /// `destination` the topic or queue, `group` the consumer group.
    ///
    /// ```
    /// # async fn example(sub: bus_core::Subscription) {
    /// use bus_core::middleware::metrics::BusMetrics;
    /// use bus_core::runtime::{handler_fn, Consumer, DeliveryInfo};
    ///
    /// let consumer = Consumer::new(sub, handler_fn(|_: bus_core::Envelope, _: DeliveryInfo| async {}));
    /// BusMetrics::global().observe_consumer(&consumer.gauges(), "kafka", "orders", Some("billing"));
    /// let handle = consumer.spawn();
    /// # drop(handle); }
    /// ```
    pub fn observe_consumer(
        &self,
        gauges: &ConsumerGauges,
        system: &str,
        destination: &str,
        group: Option<&str>,
    ) {
        let mut attributes = vec![
            KeyValue::new(semconv::MESSAGING_SYSTEM, system.to_owned()),
            KeyValue::new(semconv::MESSAGING_DESTINATION_NAME, destination.to_owned()),
        ];
        if let Some(group) = group {
            attributes.push(KeyValue::new(
                semconv::MESSAGING_CONSUMER_GROUP_NAME,
                group.to_owned(),
            ));
        }
        self.instruments
            .consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((attributes, gauges.values()));
    }
}

impl fmt::Debug for BusMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusMetrics").finish_non_exhaustive()
    }
}
