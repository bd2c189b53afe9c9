//! [`ServiceHandle`]: a started service, and what it reports when it stops.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bus_core::runtime::ConsumerReport;
use bus_core::{Error, ErrorKind, Result};
use tokio::sync::watch;
use tokio::task::{Id, JoinSet};

use super::dispatch::Counts;
use super::health::{Health, HealthState, HealthWatch, ServiceHealth};
use super::Channel;
#[cfg(doc)]
use super::{Service, UnknownKinds};

/// One running subscription of a [`ServiceHandle`].
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) channel: Channel,
    pub(super) name: String,
    pub(super) group: Option<String>,
    pub(super) kinds: Vec<&'static str>,
    pub(super) counts: Arc<Counts>,
}

/// A started [`Service`], made by [`Service::start`]: its consumers run on tokio tasks until
/// [`stop`](ServiceHandle::stop).
///
/// Dropping the handle aborts the consumers: running handlers are dropped and their
/// deliveries redelivered by the broker. Stop it to let them finish.
#[derive(Debug)]
#[must_use = "dropping the handle aborts the service's consumers"]
pub struct ServiceHandle {
    pub(super) name: Arc<str>,
    pub(super) health: HealthState,
    pub(super) stop: watch::Sender<bool>,
    pub(super) tasks: JoinSet<Result<ConsumerReport>>,
    pub(super) index_of: HashMap<Id, usize>,
    pub(super) entries: Vec<Entry>,
}

impl ServiceHandle {
    /// Asks every consumer to shut down gracefully; [`join`](ServiceHandle::join) waits for
    /// them. Calling it again does nothing.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// The service's health now: the broker connection's and every subscription's, ready,
    /// degraded or down (see [`ServiceHealth`]), for a readiness endpoint.
    ///
    /// ```
    /// # use bus::{Message, Service, service::{Context, Health}};
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced { order_id: String }
    /// # impl Message for OrderPlaced { const KIND: &'static str = "order.placed"; }
    /// # async fn on_order(_: OrderPlaced, _: Context) -> bus::Result<()> { Ok(()) }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> bus::Result<()> {
    /// let bus = bus::connect("memory://").await?;
    /// let service = Service::new("billing", bus.clone()).on("orders", on_order).start().await?;
    /// let health = service.health();
    /// assert_eq!(health.status, Health::Ready);
    /// assert_eq!(health.subscription("orders").unwrap().status, Health::Ready);
    ///
    /// // What an HTTP handler would do with it: 503 unless ready, the summary as body.
    /// let code = if health.status.is_ready() { 200 } else { 503 };
    /// println!("{code} {health}");
    /// # service.stop().await;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn health(&self) -> ServiceHealth {
        self.health.current()
    }

    /// A watch on the service's health, to wait for transitions or to read it from
    /// elsewhere (an HTTP server's state) without the handle.
    #[must_use]
    pub fn health_watch(&self) -> HealthWatch {
        self.health.watch()
    }

    /// Waits until every consumer has stopped (after [`shutdown`](ServiceHandle::shutdown),
    /// or when their subscriptions end) and returns the report.
    ///
    /// # Cancel safety
    /// If the future is dropped, the handle is dropped with it, which aborts the consumers.
    pub async fn join(self) -> ServiceReport {
        self.finish(std::future::pending()).await
    }

    /// Shuts down gracefully and waits: [`shutdown`](ServiceHandle::shutdown), then
    /// [`join`](ServiceHandle::join).
    ///
    /// # Cancel safety
    /// As [`join`](ServiceHandle::join).
    pub async fn stop(self) -> ServiceReport {
        self.shutdown();
        self.join().await
    }

    /// Waits for every consumer to stop, shutting them down when `shutdown` completes.
    pub(super) async fn finish(mut self, shutdown: impl Future<Output = ()>) -> ServiceReport {
        let mut shutdown = pin!(shutdown);
        let mut stopping = false;
        let mut results: Vec<Option<Result<ConsumerReport>>> =
            self.entries.iter().map(|_| None).collect();
        loop {
            tokio::select! {
                () = &mut shutdown, if !stopping => {
                    tracing::info!(service = %self.name, "service shutting down");
                    stopping = true;
                    self.shutdown();
                }
                joined = self.tasks.join_next_with_id() => {
                    let (id, result) = match joined {
                        None => break,
                        Some(Ok((id, result))) => (id, result),
                        Some(Err(error)) => (
                            error.id(),
                            Err(Error::with_source(
                                ErrorKind::Other,
                                "the consumer's task failed",
                                error,
                            )),
                        ),
                    };
                    if let Some(&index) = self.index_of.get(&id) {
                        let why = match &result {
                            Ok(_) => Error::closed("the consumer stopped"),
                            Err(error) => Error::new(
                                error.kind(),
                                format!("the consumer stopped: {error}"),
                            ),
                        };
                        self.health.set(index, Health::Down, Some(&why), true);
                        results[index] = Some(result);
                    }
                }
            }
        }
        let subscriptions = self
            .entries
            .into_iter()
            .zip(results)
            .map(|(entry, result)| SubscriptionReport {
                channel: entry.channel,
                group: entry.group,
                consumer: result.unwrap_or_else(|| {
                    Err(Error::new(ErrorKind::Other, "the consumer's task vanished"))
                }),
                unknown_kinds: entry.counts.unknown_kinds.load(Ordering::Relaxed),
                undecodable: entry.counts.undecodable.load(Ordering::Relaxed),
                upcast: entry.counts.upcast.load(Ordering::Relaxed),
                name: entry.name,
                kinds: entry.kinds,
            })
            .collect();
        let report = ServiceReport {
            service: self.name.to_string(),
            subscriptions,
        };
        tracing::info!(?report, "service stopped");
        report
    }
}

/// What a [`Service`] did, per subscription: returned by [`Service::run`] and
/// [`ServiceHandle::stop`].
#[derive(Debug)]
#[non_exhaustive]
pub struct ServiceReport {
    /// The service's name.
    pub service: String,
    /// One report per subscription (topic and group, queue, or request channel), in the
    /// order they were first registered.
    pub subscriptions: Vec<SubscriptionReport>,
}

impl ServiceReport {
    /// The report of the (first) subscription to the topic `topic`, if the service had one.
    #[must_use]
    pub fn subscription(&self, topic: &str) -> Option<&SubscriptionReport> {
        self.find(Channel::Topic, topic)
    }

    /// The report of the consumer of the work queue `queue`, if the service had one.
    #[must_use]
    pub fn queue(&self, queue: &str) -> Option<&SubscriptionReport> {
        self.find(Channel::Queue, queue)
    }

    /// The report of the responder on the request channel `topic`, if the service had one.
    #[must_use]
    pub fn responder(&self, topic: &str) -> Option<&SubscriptionReport> {
        self.find(Channel::Requests, topic)
    }

    fn find(&self, channel: Channel, name: &str) -> Option<&SubscriptionReport> {
        self.subscriptions
            .iter()
            .find(|s| s.channel == channel && s.name == name)
    }

    /// Whether every consumer stopped without an error.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.subscriptions.iter().all(|s| s.consumer.is_ok())
    }
}

/// What one subscription of a [`Service`] did.
#[derive(Debug)]
#[non_exhaustive]
pub struct SubscriptionReport {
    /// What the subscription is: a topic, a queue or a request channel.
    pub channel: Channel,
    /// The topic, queue or request channel's name.
    pub name: String,
    /// The consumer group (topics) or responder group (requests): the service's name unless
    /// the handler set its own; `None` for queues.
    pub group: Option<String>,
    /// The message kinds handled on it.
    pub kinds: Vec<&'static str>,
    /// The consumer's counts (received, acked, retried, rejected, abandoned, …), or the
    /// error it stopped with (its subscription could not be closed cleanly, or its task
    /// failed); every delivery was settled or left to the broker to redeliver either way.
    pub consumer: Result<ConsumerReport>,
    /// Deliveries of a kind no handler was registered for, skipped or dead-lettered as
    /// [`UnknownKinds`] said (also counted as acked or rejected in `consumer`).
    pub unknown_kinds: u64,
    /// Deliveries whose payload did not decode as the registered type, dead-lettered (also
    /// counted as rejected in `consumer`). On a request channel: requests answered with an
    /// error reply instead.
    pub undecodable: u64,
    /// Messages of an older schema version read through a conversion registered with
    /// [`Service::upcast`] (and then handled as usual).
    pub upcast: u64,
}
