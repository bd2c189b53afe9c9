//! The consumer side's counts, kept by [`Metered`](super::Metered) and handed to the SDK when
//! the meter provider collects.
//!
//! `messaging.client.consumed.messages` and `bus.consumer.outcomes` are observable counters:
//! the layer adds one to an atomic total kept per system, destination and consumer group (and
//! per outcome and error type), and the counters' callbacks report those totals at each
//! collection. Exported, they are the same monotonic sums a synchronous counter gives. Adding
//! through a synchronous counter made the SDK look up the attribute set (hashing four to six
//! key–values) for every message, twice; the layer finds its totals by comparing the
//! delivery's names with those of the totals it used last, which is a pointer comparison when
//! the adapter shares its names with its deliveries.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use opentelemetry::metrics::{Meter, ObservableCounter};
use opentelemetry::{KeyValue, StringValue};

use crate::delivery::Name;
use crate::middleware::tracing::semconv;
use crate::runtime::Outcome;

/// Every [`Totals`] made so far, read by the counters' callbacks. Entries are never removed:
/// there is one per system, destination and group a consumer has handled, as the SDK's own
/// attribute sets would be.
pub(super) type Registry = Arc<Mutex<Vec<Arc<Totals>>>>;

/// The counts of one system, destination and consumer group.
pub(super) struct Totals {
    system: Cow<'static, str>,
    source: Arc<str>,
    group: Option<Arc<str>>,
    /// `messaging.system`, `messaging.destination.name`, `messaging.operation.name` (`process`)
    /// and, for a group, `messaging.consumer.group.name`.
    attributes: Vec<KeyValue>,
    consumed: AtomicU64,
    acked: AtomicU64,
    /// Retries and rejects: the outcome, the error type and how many.
    failed: Mutex<Vec<(&'static str, &'static str, u64)>>,
}

impl Totals {
    // A `Cow`, cloned, keeps a system name that is a `&'static str` borrowed.
    #[allow(clippy::ptr_arg)]
    fn new(system: &Cow<'static, str>, source: Arc<str>, group: Option<Arc<str>>) -> Self {
        let mut attributes = Vec::with_capacity(4);
        attributes.extend([
            KeyValue::new(semconv::MESSAGING_SYSTEM, system.clone()),
            KeyValue::new(
                semconv::MESSAGING_DESTINATION_NAME,
                StringValue::from(source.clone()),
            ),
            KeyValue::new(
                semconv::MESSAGING_OPERATION_NAME,
                semconv::OPERATION_PROCESS,
            ),
        ]);
        if let Some(group) = &group {
            attributes.push(KeyValue::new(
                semconv::MESSAGING_CONSUMER_GROUP_NAME,
                StringValue::from(group.clone()),
            ));
        }
        Self {
            system: system.clone(),
            source,
            group,
            attributes,
            consumed: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            failed: Mutex::new(Vec::new()),
        }
    }

    /// Whether these are the totals of `system`, `source` and `group`.
    fn is(&self, system: &str, source: &str, group: Option<&str>) -> bool {
        same(&self.source, source)
            && match (&self.group, group) {
                (Some(mine), Some(group)) => same(mine, group),
                (None, None) => true,
                _ => false,
            }
            && self.system == system
    }

    /// The attributes of the consumed count, which a run's duration and outcome extend.
    pub(super) fn attributes(&self) -> &[KeyValue] {
        &self.attributes
    }

    /// Counts a delivery handed to the handler.
    pub(super) fn consumed(&self) {
        self.consumed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a run that ended in `outcome`.
    pub(super) fn outcome(&self, outcome: &Outcome) {
        let Some(error) = outcome.error() else {
            self.acked.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let (outcome, error) = (outcome.as_str(), error.kind().as_str());
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        match failed
            .iter_mut()
            .find(|(o, e, _)| *o == outcome && *e == error)
        {
            Some((_, _, count)) => *count += 1,
            None => failed.push((outcome, error, 1)),
        }
    }
}

/// Equal names, compared by address first (a name shared by an adapter's deliveries).
fn same(mine: &Arc<str>, name: &str) -> bool {
    (std::ptr::eq(mine.as_ptr(), name.as_ptr()) && mine.len() == name.len()) || **mine == *name
}

/// The totals of `system`, `source` and `group`: from `cache` (the layer's own, usually one
/// entry), else from `registry`, made there if new.
#[allow(clippy::ptr_arg)] // as in `Totals::new`
pub(super) fn find(
    cache: &Mutex<Vec<Arc<Totals>>>,
    registry: &Registry,
    system: &Cow<'static, str>,
    source: &Name,
    group: Option<&Name>,
) -> Arc<Totals> {
    let (name, group_name) = (source.as_str(), group.map(Name::as_str));
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(totals) = cache.iter().find(|t| t.is(system, name, group_name)) {
        return totals.clone();
    }
    let mut registry = registry.lock().unwrap_or_else(PoisonError::into_inner);
    let totals = match registry.iter().find(|t| t.is(system, name, group_name)) {
        Some(totals) => totals.clone(),
        None => {
            let totals = Arc::new(Totals::new(
                system,
                source.to_shared(),
                group.map(Name::to_shared),
            ));
            registry.push(totals.clone());
            totals
        }
    };
    cache.push(totals.clone());
    totals
}

/// The two observable counters, reporting the totals in `registry`.
pub(super) fn counters(meter: &Meter, registry: &Registry) -> Vec<ObservableCounter<u64>> {
    let consumed = {
        let registry = registry.clone();
        meter
            .u64_observable_counter("messaging.client.consumed.messages")
            .with_unit("{message}")
            .with_description("Number of messages delivered to the application's handlers.")
            .with_callback(move |observer| {
                let registry = registry.lock().unwrap_or_else(PoisonError::into_inner);
                for totals in registry.iter() {
                    observer.observe(totals.consumed.load(Ordering::Relaxed), &totals.attributes);
                }
            })
            .build()
    };
    let outcomes = {
        let registry = registry.clone();
        meter
            .u64_observable_counter("bus.consumer.outcomes")
            .with_unit("{message}")
            .with_description(
                "Messages handled, by outcome: ack (processed), retry (failed, redelivered), \
                 reject (dead-lettered).",
            )
            .with_callback(move |observer| {
                let registry = registry.lock().unwrap_or_else(PoisonError::into_inner);
                for totals in registry.iter() {
                    let with = |outcome: &'static str, error: Option<&'static str>| {
                        let mut attributes = Vec::with_capacity(totals.attributes.len() + 2);
                        attributes.extend_from_slice(&totals.attributes);
                        attributes.push(KeyValue::new(semconv::BUS_OUTCOME, outcome));
                        if let Some(error) = error {
                            attributes.push(KeyValue::new(semconv::ERROR_TYPE, error));
                        }
                        attributes
                    };
                    let acked = totals.acked.load(Ordering::Relaxed);
                    if acked > 0 {
                        observer.observe(acked, &with(Outcome::Ack.as_str(), None));
                    }
                    let failed = totals.failed.lock().unwrap_or_else(PoisonError::into_inner);
                    for (outcome, error, count) in failed.iter() {
                        observer.observe(*count, &with(outcome, Some(error)));
                    }
                }
            })
            .build()
    };
    vec![consumed, outcomes]
}
