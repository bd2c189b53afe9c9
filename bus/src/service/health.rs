//! Health of a running service: per subscription and for the broker connection, ready,
//! degraded or down, for a readiness endpoint.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bus_core::{async_trait, Delivery, DeliverySource, Error, ErrorKind, Result, Subscription};
use tokio::sync::watch;

use super::Channel;

/// How well a part of a service works.
///
/// Ordered from best to worst, so the health of a whole is the [`max`](Ord::max) of its
/// parts'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Health {
    /// Working: receiving, or ready to receive.
    Ready,
    /// Working with failures that `bus` retries: receiving failed (a lost connection being
    /// re-established, a timeout), and nothing was received since.
    Degraded,
    /// Not working: the subscription ended (the bus was closed, the consumer stopped).
    Down,
}

impl Health {
    /// A short, stable, lower-case name: `ready`, `degraded` or `down`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ready => "ready",
            Health::Degraded => "degraded",
            Health::Down => "down",
        }
    }

    /// Whether it is [`Ready`](Health::Ready).
    #[must_use]
    pub fn is_ready(self) -> bool {
        self == Health::Ready
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The health of a running [`Service`](super::Service), from
/// [`ServiceHandle::health`](super::ServiceHandle::health): the service's as a whole
/// (`status`, the worst of the parts), the broker connection's, and each subscription's.
///
/// Serve it from your own HTTP endpoint: a readiness probe answers 200 while `status` is
/// not [`Health::Down`] (or only while it is [`Health::Ready`], to take a degraded instance
/// out of rotation), and the `Display` form is a one-line summary for its body.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServiceHealth {
    /// The service's name.
    pub service: String,
    /// The worst of `broker` and every subscription.
    pub status: Health,
    /// The broker connection, as its subscriptions see it.
    pub broker: BrokerHealth,
    /// One per subscription, in the order of [`ServiceReport::subscriptions`](super::ServiceReport::subscriptions).
    pub subscriptions: Vec<SubscriptionHealth>,
}

impl ServiceHealth {
    /// The health of the subscription to the topic `topic`, if the service has one.
    #[must_use]
    pub fn subscription(&self, topic: &str) -> Option<&SubscriptionHealth> {
        self.find(Channel::Topic, topic)
    }

    /// The health of the consumer of the work queue `queue`, if the service has one.
    #[must_use]
    pub fn queue(&self, queue: &str) -> Option<&SubscriptionHealth> {
        self.find(Channel::Queue, queue)
    }

    /// The health of the responder on the request channel `topic`, if the service has one.
    #[must_use]
    pub fn responder(&self, topic: &str) -> Option<&SubscriptionHealth> {
        self.find(Channel::Requests, topic)
    }

    fn find(&self, channel: Channel, name: &str) -> Option<&SubscriptionHealth> {
        self.subscriptions
            .iter()
            .find(|s| s.channel == channel && s.name == name)
    }

    /// Works out the broker's and the whole's status from the subscriptions'.
    fn settle(&mut self) {
        let subscriptions = &self.subscriptions;
        let ended = |s: &&SubscriptionHealth| s.status == Health::Down && !s.stopped;
        let lost = |s: &&SubscriptionHealth| {
            s.status == Health::Degraded && s.error.is_some_and(is_connection_error)
        };
        self.broker = if !subscriptions.is_empty() && subscriptions.iter().all(|s| ended(&s)) {
            BrokerHealth {
                status: Health::Down,
                reason: Some(
                    "every subscription ended: the bus was closed or its connection is gone".into(),
                ),
            }
        } else if let Some(s) = subscriptions.iter().find(lost) {
            BrokerHealth {
                status: Health::Degraded,
                reason: s.reason.clone(),
            }
        } else {
            BrokerHealth::default()
        };
        self.status = subscriptions
            .iter()
            .map(|s| s.status)
            .fold(self.broker.status, Ord::max);
    }
}

fn is_connection_error(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Closed
    )
}

impl fmt::Display for ServiceHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}; broker {}",
            self.service, self.status, self.broker.status
        )?;
        if let Some(reason) = &self.broker.reason {
            write!(f, " ({reason})")?;
        }
        for s in &self.subscriptions {
            write!(f, "; {} {} {}", s.channel, s.name, s.status)?;
            if let Some(reason) = &s.reason {
                write!(f, " ({reason})")?;
            }
        }
        Ok(())
    }
}

/// The health of a service's broker connection.
///
/// The [`Broker`](bus_core::Broker) trait has no health probe, so this is what the service's
/// subscriptions see of the connection: [`Down`](Health::Down) when every subscription
/// ended on its own (the bus was closed), [`Degraded`](Health::Degraded) while one's last
/// receive failed with a connection, timeout or closed error, [`Ready`](Health::Ready)
/// otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerHealth {
    /// Ready, degraded or down.
    pub status: Health,
    /// Why it is not ready.
    pub reason: Option<String>,
}

impl Default for BrokerHealth {
    fn default() -> Self {
        Self {
            status: Health::Ready,
            reason: None,
        }
    }
}

/// The health of one subscription (topic, queue or request channel) of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionHealth {
    /// What the subscription is.
    pub channel: Channel,
    /// The topic, queue or request channel's name.
    pub name: String,
    /// Its group, if any.
    pub group: Option<String>,
    /// [`Ready`](Health::Ready) from the start and after every delivery;
    /// [`Degraded`](Health::Degraded) after a receive error, until the next delivery;
    /// [`Down`](Health::Down) once it ended (the bus was closed) or its consumer stopped.
    pub status: Health,
    /// Why it is not ready: the receive error, or why it ended.
    pub reason: Option<String>,
    error: Option<ErrorKind>,
    /// Ended because the service was stopped, not on its own.
    stopped: bool,
}

impl SubscriptionHealth {
    pub(crate) fn new(channel: Channel, name: String, group: Option<String>) -> Self {
        Self {
            channel,
            name,
            group,
            status: Health::Ready,
            reason: None,
            error: None,
            stopped: false,
        }
    }
}

/// Where a running service keeps its health, shared by its subscriptions and its handle.
#[derive(Debug, Clone)]
pub(crate) struct HealthState(Arc<watch::Sender<ServiceHealth>>);

impl HealthState {
    pub(crate) fn new(service: &str, subscriptions: Vec<SubscriptionHealth>) -> Self {
        let mut health = ServiceHealth {
            service: service.to_owned(),
            status: Health::Ready,
            broker: BrokerHealth::default(),
            subscriptions,
        };
        health.settle();
        Self(Arc::new(watch::channel(health).0))
    }

    pub(crate) fn current(&self) -> ServiceHealth {
        self.0.borrow().clone()
    }

    pub(crate) fn watch(&self) -> HealthWatch {
        HealthWatch(self.0.subscribe())
    }

    /// Sets subscription `index`'s status, telling watchers only of changes.
    pub(crate) fn set(&self, index: usize, status: Health, error: Option<&Error>, stopped: bool) {
        self.0.send_if_modified(|health| {
            let Some(s) = health.subscriptions.get_mut(index) else {
                return false;
            };
            let reason = error.map(ToString::to_string);
            // Once down, a subscription stays down, for its first reason: a consumer does not
            // come back.
            if s.status == Health::Down || (s.status == status && s.reason == reason) {
                return false;
            }
            s.status = status;
            s.reason = reason;
            s.error = error.map(Error::kind);
            s.stopped = stopped;
            health.settle();
            true
        });
    }

    /// Wraps `subscription` so that what it yields sets subscription `index`'s health.
    pub(crate) fn watch_subscription(
        &self,
        index: usize,
        subscription: Subscription,
    ) -> Subscription {
        Subscription::new(Box::new(Watched {
            inner: subscription,
            health: self.clone(),
            index,
        }))
    }
}

/// Watches a running service's health: [`current`](HealthWatch::current) for a snapshot,
/// [`changed`](HealthWatch::changed) or [`wait_for`](HealthWatch::wait_for) to wait for a
/// transition. From [`ServiceHandle::health_watch`](super::ServiceHandle::health_watch);
/// cheap to clone and independent of the handle, so it can live in an HTTP server's state
/// (after the service stopped, it reads every subscription [`Down`](Health::Down)).
#[derive(Debug, Clone)]
pub struct HealthWatch(watch::Receiver<ServiceHealth>);

impl HealthWatch {
    /// The health now.
    #[must_use]
    pub fn current(&self) -> ServiceHealth {
        self.0.borrow().clone()
    }

    /// Waits for the health to change since it was last read through this watch, and
    /// returns it.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future misses no change (the next call sees it).
    pub async fn changed(&mut self) -> ServiceHealth {
        // The sender lives as long as the service's tasks and the handle; after both are
        // gone nothing changes any more.
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.0.borrow_and_update().clone()
    }

    /// Waits until `condition` holds for the health (at once if it does now), and returns
    /// it.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn wait_for(
        &mut self,
        mut condition: impl FnMut(&ServiceHealth) -> bool,
    ) -> ServiceHealth {
        match self.0.wait_for(|health| condition(health)).await {
            Ok(health) => health.clone(),
            Err(_) => std::future::pending().await,
        }
    }
}

/// A subscription whose deliveries, errors and end set its health.
#[derive(Debug)]
struct Watched {
    inner: Subscription,
    health: HealthState,
    index: usize,
}

impl Watched {
    /// A delivery makes the subscription ready; an error degraded, or down when closed.
    fn received(&self, item: &Result<Delivery>) {
        match item {
            Ok(_) => self.health.set(self.index, Health::Ready, None, false),
            Err(error) => {
                let status = if error.is_closed() {
                    Health::Down
                } else {
                    Health::Degraded
                };
                self.health.set(self.index, status, Some(error), false);
            }
        }
    }
}

#[async_trait]
impl DeliverySource for Watched {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let item = self.inner.next().await;
        match &item {
            Some(item) => self.received(item),
            None => {
                let ended = Error::closed("the subscription ended");
                self.health
                    .set(self.index, Health::Down, Some(&ended), false);
            }
        }
        item
    }

    fn try_next(&mut self) -> Option<Result<Delivery>> {
        let item = self.inner.try_next()?;
        self.received(&item);
        Some(item)
    }

    async fn close(&mut self) -> Result<()> {
        self.inner.close().await
    }

    fn lease(&self) -> Option<Duration> {
        self.inner.lease()
    }

    fn keeps_key_order(&self) -> bool {
        self.inner.keeps_key_order()
    }
}
