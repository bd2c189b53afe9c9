//! The backlog gauges: what [`Broker::backlog`] reports for chosen groups and queues, read by a
//! background task on an interval and exported at each collection.

use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use opentelemetry::metrics::{Meter, ObservableGauge};
use opentelemetry::KeyValue;
use tokio::task::JoinHandle;

use super::BusMetrics;
use crate::middleware::tracing::semconv::{self, messaging_system};
use crate::{Backlog, BacklogOf, Broker};

/// The attribute telling the parts of `bus.backlog` apart: `waiting`, `in_flight`,
/// `delayed` (see [`Backlog`]). A part the broker does not report is not exported.
pub const BUS_BACKLOG_STATE: &str = "bus.backlog.state";

/// One observed group or queue: its attributes and its last reading (`None` before the
/// first, or after a reading failed: a stale count is worse than none).
#[derive(Debug)]
pub(super) struct Observed {
    attributes: Vec<KeyValue>,
    last: Mutex<Option<Backlog>>,
}

/// What the gauges' callbacks read; an entry goes when its [`BacklogGauge`] is dropped.
pub(super) type Observations = Arc<Mutex<Vec<Weak<Observed>>>>;

fn each_reading(observations: &Observations, mut f: impl FnMut(&Backlog, &[KeyValue])) {
    let mut observations = observations.lock().unwrap_or_else(|e| e.into_inner());
    observations.retain(|o| o.strong_count() > 0);
    for observed in observations.iter().filter_map(Weak::upgrade) {
        let last = observed.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(backlog) = last.as_ref() {
            f(backlog, &observed.attributes);
        }
    }
}

/// The gauges `bus.backlog` (by [`BUS_BACKLOG_STATE`]) and `bus.backlog.oldest_age`.
pub(super) fn gauges(meter: &Meter, observations: &Observations) -> Vec<ObservableGauge<u64>> {
    let counts = observations.clone();
    let count = meter
        .u64_observable_gauge("bus.backlog")
        .with_unit("{message}")
        .with_description(
            "Messages not yet settled by a consumer group or in a queue, as the broker counts \
             them: waiting, in flight (delivered, not settled) and delayed.",
        )
        .with_callback(move |observer| {
            each_reading(&counts, |backlog, attributes| {
                let parts = [
                    ("waiting", Some(backlog.waiting)),
                    ("in_flight", backlog.in_flight),
                    ("delayed", backlog.delayed),
                ];
                for (state, value) in parts {
                    if let Some(value) = value {
                        let mut attributes = attributes.to_vec();
                        attributes.push(KeyValue::new(BUS_BACKLOG_STATE, state));
                        observer.observe(value, &attributes);
                    }
                }
            });
        })
        .build();
    vec![count]
}

/// The age gauge, in seconds (a float, unlike the counts).
pub(super) fn age_gauge(meter: &Meter, observations: &Observations) -> ObservableGauge<f64> {
    let ages = observations.clone();
    meter
        .f64_observable_gauge("bus.backlog.oldest_age")
        .with_unit("s")
        .with_description(
            "How long the oldest message waiting for a consumer group or in a queue has \
             waited, where the broker can tell.",
        )
        .with_callback(move |observer| {
            each_reading(&ages, |backlog, attributes| {
                if let Some(age) = backlog.oldest_age {
                    observer.observe(age.as_secs_f64(), attributes);
                }
            });
        })
        .build()
}

/// Keeps the backlog of groups and queues exported (see
/// [`BusMetrics::observe_backlog`]); dropping it stops the readings and the export.
pub struct BacklogGauge {
    observed: Vec<Arc<Observed>>,
    task: JoinHandle<()>,
}

impl BacklogGauge {
    /// The last reading of `of`, if it is observed here and was read successfully.
    #[must_use]
    pub fn last(&self, of: &BacklogOf) -> Option<Backlog> {
        let (destination, group) = names(of);
        self.observed
            .iter()
            .find(|o| attributes_match(&o.attributes, &destination, group.as_deref()))
            .and_then(|o| o.last.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

impl Drop for BacklogGauge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for BacklogGauge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BacklogGauge")
            .field("observed", &self.observed.len())
            .finish_non_exhaustive()
    }
}

fn names(of: &BacklogOf) -> (String, Option<String>) {
    match of {
        BacklogOf::Group { topic, group } => (topic.clone(), Some(group.clone())),
        BacklogOf::Queue(name) => (name.clone(), None),
    }
}

fn attributes_match(attributes: &[KeyValue], destination: &str, group: Option<&str>) -> bool {
    let value = |key: &str| {
        attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str().into_owned())
    };
    value(semconv::MESSAGING_DESTINATION_NAME).as_deref() == Some(destination)
        && value(semconv::MESSAGING_CONSUMER_GROUP_NAME).as_deref() == group
}

impl BusMetrics {
    /// Exports the backlog of each of `of` on `broker` ([`Broker::backlog`]) as the gauges
    /// `bus.backlog` (`{message}`, one point per part the broker reports, told apart by
    /// [`BUS_BACKLOG_STATE`]: `waiting`, `in_flight`, `delayed`) and `bus.backlog.oldest_age`
    /// (`s`, where the broker can tell), with `messaging.system`,
    /// `messaging.destination.name` (the topic or queue) and, for a group,
    /// `messaging.consumer.group.name`.
    ///
    /// A task reads them all at once, then every `every`; a collection exports the last
    /// readings, so the meter provider's own interval never waits on the broker. A reading
    /// that fails (a group not subscribed yet, a broker away) is logged and exports nothing
    /// for that group or queue until one succeeds. Readings stop when the returned
    /// [`BacklogGauge`] is dropped. An adapter whose
    /// [`Capabilities::backlog`](crate::Capabilities::backlog) is unsupported exports
    /// nothing.
    ///
    /// Must be called within a tokio runtime.
    ///
    /// ```
    /// # async fn example(broker: std::sync::Arc<dyn bus_core::Broker>) {
    /// use std::time::Duration;
    /// use bus_core::BacklogOf;
    /// use bus_core::middleware::metrics::BusMetrics;
    ///
    /// let gauge = BusMetrics::global().observe_backlog(
    ///     broker,
    ///     [BacklogOf::group("orders", "billing"), BacklogOf::queue("emails")],
    ///     Duration::from_secs(15),
    /// );
    /// // Keep `gauge` for as long as the backlog should be exported.
    /// # drop(gauge); }
    /// ```
    #[must_use = "the backlog is exported only while the BacklogGauge lives"]
    pub fn observe_backlog(
        &self,
        broker: Arc<dyn Broker>,
        of: impl IntoIterator<Item = BacklogOf>,
        every: Duration,
    ) -> BacklogGauge {
        let system = messaging_system(broker.capabilities().name);
        let observed: Vec<(BacklogOf, Arc<Observed>)> = of
            .into_iter()
            .map(|of| {
                let (destination, group) = names(&of);
                let mut attributes = vec![
                    KeyValue::new(semconv::MESSAGING_SYSTEM, system.clone()),
                    KeyValue::new(semconv::MESSAGING_DESTINATION_NAME, destination),
                ];
                if let Some(group) = group {
                    attributes.push(KeyValue::new(semconv::MESSAGING_CONSUMER_GROUP_NAME, group));
                }
                let observed = Arc::new(Observed {
                    attributes,
                    last: Mutex::new(None),
                });
                (of, observed)
            })
            .collect();
        self.instruments
            .backlogs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(observed.iter().map(|(_, o)| Arc::downgrade(o)));
        let weak = observed
            .iter()
            .map(|(of, o)| (of.clone(), Arc::downgrade(o)))
            .collect();
        let task = tokio::spawn(refresh(broker, weak, every.max(Duration::from_millis(1))));
        BacklogGauge {
            observed: observed.into_iter().map(|(_, o)| o).collect(),
            task,
        }
    }
}

/// Reads every backlog now and then every `every`, until the [`BacklogGauge`] is dropped
/// (which holds the only strong references, so that the export stops at once).
async fn refresh(
    broker: Arc<dyn Broker>,
    observed: Vec<(BacklogOf, Weak<Observed>)>,
    every: Duration,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        for (of, observed) in &observed {
            let Some(observed) = observed.upgrade() else {
                return;
            };
            let reading = match broker.backlog(of).await {
                Ok(backlog) => Some(backlog),
                Err(error) => {
                    tracing::debug!(%error, %of, "reading a backlog for its gauge failed");
                    None
                }
            };
            *observed.last.lock().unwrap_or_else(|e| e.into_inner()) = reading;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use async_trait::async_trait;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
    use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

    use super::*;
    use crate::{
        Capabilities, ConsumeOptions, Envelope, Error, ErrorKind, Publisher, Queue, Requester,
        Requests, Responder, Result, ServeOptions, SubscribeOptions, Subscriber, Subscription,
        Support,
    };

    /// A broker that only counts: the backlog of each name is what the test sets.
    #[derive(Debug, Default)]
    struct Counting {
        backlogs: Mutex<HashMap<BacklogOf, Backlog>>,
    }

    fn none<T>() -> Result<T> {
        Err(Error::unsupported("only counts"))
    }

    #[async_trait]
    impl Publisher for Counting {
        async fn publish(&self, _: &str, _: Envelope) -> Result<()> {
            none()
        }
    }
    #[async_trait]
    impl Subscriber for Counting {
        async fn subscribe(&self, _: &str, _: SubscribeOptions) -> Result<Subscription> {
            none()
        }
    }
    #[async_trait]
    impl Queue for Counting {
        async fn send(&self, _: &str, _: Envelope) -> Result<()> {
            none()
        }
        async fn consume(&self, _: &str, _: ConsumeOptions) -> Result<Subscription> {
            none()
        }
    }
    #[async_trait]
    impl Requester for Counting {
        async fn request(&self, _: &str, _: Envelope, _: Duration) -> Result<Envelope> {
            none()
        }
    }
    #[async_trait]
    impl Responder for Counting {
        async fn serve(&self, _: &str, _: ServeOptions) -> Result<Requests> {
            none()
        }
    }
    #[async_trait]
    impl Broker for Counting {
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                name: "nats",
                backlog: Support::Native,
                ..Capabilities::default()
            }
        }
        async fn backlog(&self, of: &BacklogOf) -> Result<Backlog> {
            self.backlogs
                .lock()
                .unwrap()
                .get(of)
                .cloned()
                .ok_or_else(|| Error::new(ErrorKind::NotFound, "no such group"))
        }
        async fn close(&self) -> Result<()> {
            Ok(())
        }
    }

    /// Every point of the gauge `name` at the last collection: attributes → value.
    fn points(
        provider: &SdkMeterProvider,
        exporter: &InMemoryMetricExporter,
        name: &str,
    ) -> Vec<(Vec<(String, String)>, f64)> {
        provider.force_flush().expect("flush");
        let exported: Vec<ResourceMetrics> = exporter.get_finished_metrics().expect("metrics");
        let mut found = Vec::new();
        let Some(latest) = exported.last() else {
            return found;
        };
        for scope in latest.scope_metrics() {
            for metric in scope.metrics().filter(|m| m.name() == name) {
                match metric.data() {
                    AggregatedMetrics::U64(MetricData::Gauge(gauge)) => {
                        for p in gauge.data_points() {
                            found.push((kvs(p.attributes()), p.value() as f64));
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Gauge(gauge)) => {
                        for p in gauge.data_points() {
                            found.push((kvs(p.attributes()), p.value()));
                        }
                    }
                    other => panic!("{name}: not a gauge: {other:?}"),
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    fn kvs<'a>(it: impl Iterator<Item = &'a KeyValue>) -> Vec<(String, String)> {
        let mut v: Vec<_> = it
            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
            .collect();
        v.sort();
        v
    }

    fn attrs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<_> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        v.sort();
        v
    }

    /// Waits (in paused time, advancing it) until the gauge has read `of` as `expected`.
    async fn read_as(gauge: &BacklogGauge, of: &BacklogOf, expected: Option<u64>) {
        for _ in 0..1000 {
            if gauge.last(of).map(|b| b.total()) == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{of} never read as {expected:?}: {:?}", gauge.last(of));
    }

    #[tokio::test(start_paused = true)]
    async fn backlogs_are_exported_by_part_with_the_messaging_attributes() {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            .build();
        let metrics = BusMetrics::from_meter(&provider.meter("test"));
        let broker = Arc::new(Counting::default());
        let group = BacklogOf::group("orders", "billing");
        let queue = BacklogOf::queue("emails");
        let counted = Backlog {
            waiting: 7,
            in_flight: Some(2),
            delayed: None,
            oldest_age: Some(Duration::from_millis(1500)),
            ..Backlog::default()
        };
        broker
            .backlogs
            .lock()
            .unwrap()
            .insert(group.clone(), counted);

        let gauge = metrics.observe_backlog(
            broker.clone(),
            [group.clone(), queue.clone()],
            Duration::from_secs(10),
        );
        read_as(&gauge, &group, Some(9)).await;
        let base = [
            ("messaging.system", "nats"),
            ("messaging.destination.name", "orders"),
            ("messaging.consumer.group.name", "billing"),
        ];
        let with = |state: &'static str| {
            let mut pairs = base.to_vec();
            pairs.push((BUS_BACKLOG_STATE, state));
            attrs(&pairs)
        };
        // The queue is not known to the broker: nothing exported for it; `delayed`, which
        // the broker does not report, neither.
        assert_eq!(
            points(&provider, &exporter, "bus.backlog"),
            vec![(with("in_flight"), 2.0), (with("waiting"), 7.0)]
        );
        assert_eq!(
            points(&provider, &exporter, "bus.backlog.oldest_age"),
            vec![(attrs(&base), 1.5)]
        );

        // The next reading, an interval later, sees the queue.
        let emails = Backlog {
            waiting: 3,
            in_flight: Some(0),
            delayed: Some(1),
            ..Backlog::default()
        };
        broker
            .backlogs
            .lock()
            .unwrap()
            .insert(queue.clone(), emails);
        read_as(&gauge, &queue, Some(4)).await;
        let exported = points(&provider, &exporter, "bus.backlog");
        let queue_attrs = |state| {
            attrs(&[
                ("messaging.system", "nats"),
                ("messaging.destination.name", "emails"),
                (BUS_BACKLOG_STATE, state),
            ])
        };
        for (state, value) in [("waiting", 3.0), ("in_flight", 0.0), ("delayed", 1.0)] {
            assert!(
                exported.contains(&(queue_attrs(state), value)),
                "{state} of emails missing from {exported:?}"
            );
        }

        // Dropped: no reading or observation any more (what the SDK does with the points
        // last observed is its own affair), so a new count is never exported.
        drop(gauge);
        let mut more = broker.backlogs.lock().unwrap()[&group].clone();
        more.waiting = 100;
        broker.backlogs.lock().unwrap().insert(group.clone(), more);
        tokio::time::sleep(Duration::from_secs(30)).await;
        let exported = points(&provider, &exporter, "bus.backlog");
        assert!(
            exported.iter().all(|(_, value)| *value != 100.0),
            "read after the gauge was dropped: {exported:?}"
        );
    }
}
