//! The layer services are written in: typed handlers per message kind, a [`Context`] that
//! publishes with correlation, causation and trace context, and a graceful run.
//!
//! A [`Service`] has a name, its consumer group, and registers an async handler per message
//! type and topic with [`Service::on`]. The handler receives the decoded message and a
//! [`Context`], and returns `Result<(), Error>`: `Ok` acknowledges the message, a
//! [retryable](crate::Error::is_retryable) error retries it, any other error dead-letters it
//! (as [`handler_fn`](crate::runtime::handler_fn) does). [`Service::run`] opens one
//! subscription per topic in the service's group, runs a [`Consumer`] over each until a
//! shutdown future completes (for instance [`shutdown_signal`]: SIGINT or SIGTERM), drains
//! them, and returns one [`ServiceReport`].
//!
//! Under the hood this is the lower-level API of [`Bus::subscribe`] and [`Consumer`], which
//! stays available for what the service layer does not cover.
//!
//! # Several message types on one topic
//!
//! Handlers of several types on one topic share one subscription; each delivery goes to the
//! handler of its envelope's [`kind`](crate::Envelope::kind) (the type's
//! [`Message::KIND`]). A delivery of a kind nobody registered is handled as
//! [`UnknownKinds`] says: acknowledged and skipped (the default: a topic may carry events
//! this service does not care about), or dead-lettered with a reason naming the kind. A
//! payload that does not decode as the registered type, or whose schema version is newer
//! than the type's [`Message::SCHEMA_VERSION`], is dead-lettered at once with a reason
//! naming the type and the decoding error: no retry would make it decode.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use bus::{service::Context, Message, Service};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct OrderPlaced { order_id: String }
//! impl Message for OrderPlaced { const KIND: &'static str = "order.placed"; }
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct PaymentRequested { order_id: String }
//! impl Message for PaymentRequested { const KIND: &'static str = "payment.requested"; }
//!
//! async fn request_payment(order: OrderPlaced, ctx: Context) -> bus::Result<()> {
//!     // Correlated with the order, caused by it, in its trace: no code needed for that.
//!     ctx.publish("payments", &PaymentRequested { order_id: order.order_id }).await?;
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> bus::Result<()> {
//! let bus = bus::connect("memory://").await?;
//! let mut payments = bus.subscribe("payments", bus::SubscribeOptions::group("audit")).await?;
//!
//! let billing = Service::new("billing", bus.clone())
//!     .on("orders", request_payment)
//!     .with_shutdown_timeout(Duration::from_secs(10))
//!     .start()
//!     .await?;
//!
//! let order = bus.publish_message("orders", &OrderPlaced { order_id: "o-1".into() }).await?;
//! let payment = payments.next().await.expect("subscription open")?;
//! assert_eq!(payment.envelope().causation_id.as_ref(), Some(&order));
//! payment.ack().await?;
//!
//! // In a real service: `service.run(bus::shutdown_signal()?).await?` instead of start/stop.
//! let report = billing.stop().await;
//! assert_eq!(report.subscription("orders").unwrap().consumer.as_ref().unwrap().acked, 1);
//! # Ok(())
//! # }
//! ```

mod context;
mod dispatch;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bus_core::runtime::{Consumer, ConsumerReport, Handler, KeyOrder};
use bus_core::{Error, ErrorKind, Message, Result, SubscribeOptions};
use tokio::sync::watch;
use tokio::task::{Id, JoinSet};
use tower_layer::Layer;

pub use context::Context;

use crate::Bus;
use dispatch::{Counts, Dispatch, Route, Typed};

/// What a [`Service`] does with a message whose kind no handler on its topic was registered
/// for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnknownKinds {
    /// Acknowledge it without running anything (the default): a topic often carries kinds a
    /// given service does not care about. Logged at debug level, counted in
    /// [`SubscriptionReport::unknown_kinds`].
    #[default]
    Skip,
    /// Reject it to the dead-letter queue (`<topic>.dlq`), with a reason naming the kind, the
    /// topic and the service: for topics on which every kind must be handled.
    DeadLetter,
}

/// Wraps a subscription's handler in one middleware layer.
type LayerFn = Arc<dyn Fn(Arc<dyn Handler>) -> Arc<dyn Handler> + Send + Sync>;

/// The handlers registered for one topic.
struct Registered {
    topic: String,
    routes: BTreeMap<&'static str, Box<dyn Route>>,
}

/// A service: a name (its consumer group), typed handlers on topics, and a graceful run.
///
/// Built by value: [`Service::new`], then [`on`](Service::on) once per message type and
/// topic, then [`run`](Service::run) (or [`start`](Service::start) for a handle). See the
/// [module docs](self) for the whole picture and an example.
///
/// Every topic gets one subscription in the group named after the service, and one
/// [`Consumer`] with the settings of the `with_*` methods: at most
/// [`with_concurrency`](Service::with_concurrency) handlers at once per topic, one message
/// per key at a time in publish order, panics caught as failed attempts.
#[must_use = "a service does nothing until `run` or `start` is called"]
pub struct Service {
    name: Arc<str>,
    bus: Bus,
    topics: Vec<Registered>,
    unknown_kinds: UnknownKinds,
    concurrency: Option<usize>,
    shutdown_timeout: Option<Duration>,
    key_order: Option<KeyOrder>,
    layers: Vec<LayerFn>,
}

impl Service {
    /// A service called `name` on `bus`. The name is the consumer group of its
    /// subscriptions: several instances of one service share the work, and every other
    /// service gets every message too.
    pub fn new(name: impl Into<String>, bus: Bus) -> Self {
        Self {
            name: Arc::from(name.into()),
            bus,
            topics: Vec::new(),
            unknown_kinds: UnknownKinds::default(),
            concurrency: None,
            shutdown_timeout: None,
            key_order: None,
            layers: Vec::new(),
        }
    }

    /// The service's name, which is also its consumer group.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Handles messages of type `M` published to `topic` with `handler`: an async function
    /// of the decoded message and a [`Context`].
    ///
    /// `handler`'s result settles the message: `Ok(())` acknowledges it; an error retries it
    /// when it [is retryable](Error::is_retryable) (a lost connection, a timeout, a
    /// [`Handler`](ErrorKind::Handler) error) and dead-letters it otherwise. Without a retry
    /// layer ([`with_layer`](Service::with_layer)) a retryable failure is retried for as long
    /// as it fails. The message type is usually inferred from the handler; otherwise name it:
    /// `.on::<OrderPlaced, _, _>(…)`.
    ///
    /// Several types may be registered on one topic: they share its subscription and each
    /// message goes to the handler of its kind ([`Message::KIND`]).
    ///
    /// # Panics
    /// When a handler for `M::KIND` on `topic` is already registered: which one should run
    /// would be a guess.
    pub fn on<M, F, Fut>(mut self, topic: impl Into<String>, handler: F) -> Self
    where
        M: Message,
        F: Fn(M, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let topic = topic.into();
        let index = match self.topics.iter().position(|t| t.topic == topic) {
            Some(index) => index,
            None => {
                self.topics.push(Registered {
                    topic,
                    routes: BTreeMap::new(),
                });
                self.topics.len() - 1
            }
        };
        let registered = &mut self.topics[index];
        let route: Box<dyn Route> = Box::new(Typed::<M, F>::new(handler));
        assert!(
            registered.routes.insert(M::KIND, route).is_none(),
            "service `{}` already has a handler for kind `{}` on topic `{}`",
            self.name,
            M::KIND,
            registered.topic
        );
        self
    }

    /// Sets what happens to messages of a kind no handler on their topic handles (default
    /// [`UnknownKinds::Skip`]).
    pub fn with_unknown_kinds(mut self, policy: UnknownKinds) -> Self {
        self.unknown_kinds = policy;
        self
    }

    /// Runs at most `concurrency` handlers at once per topic (default
    /// [`DEFAULT_CONCURRENCY`](crate::runtime::DEFAULT_CONCURRENCY); see
    /// [`Consumer::with_concurrency`]).
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = Some(concurrency);
        self
    }

    /// Lets running handlers finish for at most `timeout` after shutdown, then aborts them,
    /// their messages to be redelivered (default
    /// [`DEFAULT_SHUTDOWN_TIMEOUT`](crate::runtime::DEFAULT_SHUTDOWN_TIMEOUT); see
    /// [`Consumer::with_shutdown_timeout`]).
    pub fn with_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = Some(timeout);
        self
    }

    /// Sets what a failing message does to its key's order (default: as
    /// [`Consumer::with_key_order`]).
    pub fn with_key_order(mut self, order: KeyOrder) -> Self {
        self.key_order = Some(order);
        self
    }

    /// Wraps the handling of every topic in `layer`: any of the
    /// [`middleware`](crate::middleware) layers (retry, timeout, idempotency, tracing, …) or
    /// one of your own. It sees each delivery before it is decoded and dispatched, and the
    /// outcome after. The first layer added is the outermost, as with
    /// [`HandlerBuilder`](crate::runtime::HandlerBuilder).
    ///
    /// ```
    /// use std::time::Duration;
    /// use bus::middleware::{RetryLayer, RetryPolicy, TimeoutLayer};
    /// # async fn example(bus: bus::Bus) {
    /// let service = bus::Service::new("billing", bus)
    ///     .with_layer(RetryLayer::new(RetryPolicy::new().with_max_deliveries(5)))
    ///     .with_layer(TimeoutLayer::new(Duration::from_secs(30)));
    /// # let _ = service; }
    /// ```
    pub fn with_layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<Arc<dyn Handler>> + Send + Sync + 'static,
        L::Service: Handler,
    {
        self.layers.push(Arc::new(
            move |inner: Arc<dyn Handler>| -> Arc<dyn Handler> { Arc::new(layer.layer(inner)) },
        ));
        self
    }

    /// Subscribes to every registered topic in the service's group and starts a
    /// [`Consumer`] on each, on tokio tasks; returns a handle to stop them.
    ///
    /// Once this returned, the service receives every message published to its topics (a
    /// group gets what is published after it first subscribed).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when no handler is registered; otherwise the first error of
    /// [`Bus::subscribe`], after closing the subscriptions already opened.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    ///
    /// # Cancel safety
    /// If the future is dropped, the subscriptions opened so far are dropped (closed) and
    /// nothing has been received.
    pub async fn start(self) -> Result<ServiceHandle> {
        if self.topics.is_empty() {
            return Err(Error::config(format!(
                "service `{}` has no handlers: register one with `Service::on`",
                self.name
            )));
        }
        let mut subscriptions = Vec::with_capacity(self.topics.len());
        for registered in &self.topics {
            let options = SubscribeOptions::group(&*self.name);
            match self.bus.subscribe(&registered.topic, options).await {
                Ok(subscription) => subscriptions.push(subscription),
                Err(error) => {
                    for mut subscription in subscriptions {
                        if let Err(close) = subscription.close().await {
                            tracing::warn!(%close, "closing a subscription of a service that failed to start");
                        }
                    }
                    return Err(error);
                }
            }
        }

        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut index_of = HashMap::new();
        let mut entries = Vec::with_capacity(self.topics.len());
        for (index, (registered, subscription)) in
            self.topics.into_iter().zip(subscriptions).enumerate()
        {
            let counts = Arc::new(Counts::default());
            let kinds = registered.routes.keys().copied().collect();
            let dispatch = Dispatch {
                bus: self.bus.clone(),
                service: self.name.clone(),
                topic: registered.topic.clone(),
                routes: registered.routes,
                unknown_kinds: self.unknown_kinds,
                counts: counts.clone(),
            };
            let mut handler: Arc<dyn Handler> = Arc::new(dispatch);
            for layer in self.layers.iter().rev() {
                handler = layer(handler);
            }
            let mut consumer = Consumer::new(subscription, handler);
            if let Some(concurrency) = self.concurrency {
                consumer = consumer.with_concurrency(concurrency);
            }
            if let Some(timeout) = self.shutdown_timeout {
                consumer = consumer.with_shutdown_timeout(timeout);
            }
            if let Some(order) = self.key_order {
                consumer = consumer.with_key_order(order);
            }
            let mut stopped = stopped.clone();
            let task = tasks.spawn(consumer.run(async move {
                // An error means the handle is gone: stop as well.
                let _ = stopped.wait_for(|stop| *stop).await;
            }));
            index_of.insert(task.id(), index);
            entries.push(Entry {
                topic: registered.topic,
                kinds,
                counts,
            });
        }
        tracing::info!(
            service = %self.name,
            topics = ?entries.iter().map(|e| e.topic.as_str()).collect::<Vec<_>>(),
            "service started"
        );
        Ok(ServiceHandle {
            name: self.name,
            stop,
            tasks,
            index_of,
            entries,
        })
    }

    /// Runs the service until `shutdown` completes, then drains it: each consumer stops
    /// receiving, lets its running handlers finish (for at most
    /// [`with_shutdown_timeout`](Service::with_shutdown_timeout)) and settles them; what was
    /// received but not started is left to the broker to redeliver. Returns the report of
    /// every subscription. Also returns when every subscription has ended on its own (the
    /// bus was closed).
    ///
    /// ```no_run
    /// # async fn example(service: bus::Service) -> bus::Result<()> {
    /// let report = service.run(bus::shutdown_signal()?).await?;
    /// tracing::info!(?report, "service stopped");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Service::start`]. Errors of single subscriptions once running (closing one
    /// failed) are in the report, in [`SubscriptionReport::consumer`].
    ///
    /// # Panics
    /// When polled outside a tokio runtime.
    ///
    /// # Cancel safety
    /// If the future is dropped, the consumers are aborted: running handlers are dropped and
    /// every unsettled delivery is redelivered by the broker. Nothing is lost, but prefer the
    /// shutdown future, which lets handlers finish.
    pub async fn run<F>(self, shutdown: F) -> Result<ServiceReport>
    where
        F: Future<Output = ()>,
    {
        Ok(self.start().await?.finish(shutdown).await)
    }
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let topics: Vec<_> = self
            .topics
            .iter()
            .map(|t| (&t.topic, t.routes.keys().collect::<Vec<_>>()))
            .collect();
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("bus", &self.bus)
            .field("topics", &topics)
            .field("unknown_kinds", &self.unknown_kinds)
            .field("concurrency", &self.concurrency)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("key_order", &self.key_order)
            .field("layers", &self.layers.len())
            .finish()
    }
}

/// One running subscription of a [`ServiceHandle`].
#[derive(Debug)]
struct Entry {
    topic: String,
    kinds: Vec<&'static str>,
    counts: Arc<Counts>,
}

/// A started [`Service`], made by [`Service::start`]: its consumers run on tokio tasks until
/// [`stop`](ServiceHandle::stop).
///
/// Dropping the handle aborts the consumers: running handlers are dropped and their
/// deliveries redelivered by the broker. Stop it to let them finish.
#[derive(Debug)]
#[must_use = "dropping the handle aborts the service's consumers"]
pub struct ServiceHandle {
    name: Arc<str>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<Result<ConsumerReport>>,
    index_of: HashMap<Id, usize>,
    entries: Vec<Entry>,
}

impl ServiceHandle {
    /// Asks every consumer to shut down gracefully; [`join`](ServiceHandle::join) waits for
    /// them. Calling it again does nothing.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
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
    async fn finish(mut self, shutdown: impl Future<Output = ()>) -> ServiceReport {
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
                group: self.name.to_string(),
                consumer: result.unwrap_or_else(|| {
                    Err(Error::new(ErrorKind::Other, "the consumer's task vanished"))
                }),
                unknown_kinds: entry.counts.unknown_kinds.load(Ordering::Relaxed),
                undecodable: entry.counts.undecodable.load(Ordering::Relaxed),
                topic: entry.topic,
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
    /// One report per topic, in the order the topics were first registered.
    pub subscriptions: Vec<SubscriptionReport>,
}

impl ServiceReport {
    /// The report of the subscription to `topic`, if the service had one.
    #[must_use]
    pub fn subscription(&self, topic: &str) -> Option<&SubscriptionReport> {
        self.subscriptions.iter().find(|s| s.topic == topic)
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
    /// The topic.
    pub topic: String,
    /// The consumer group (the service's name).
    pub group: String,
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
    /// counted as rejected in `consumer`).
    pub undecodable: u64,
}

/// A future that completes when the process receives SIGINT (Ctrl-C) or SIGTERM (what
/// container runtimes and systemd send to stop a service); on other platforms, Ctrl-C.
/// Give it to [`Service::run`].
///
/// The signal handlers are installed when this is called, not when the future is first
/// polled, so a signal that arrives in between is not missed. Once installed they stay for
/// the life of the process: those signals no longer end it by themselves.
///
/// # Errors
/// [`ErrorKind::Other`] when the signal handlers cannot be installed.
///
/// # Panics
/// When called outside a tokio runtime.
pub fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static> {
    shutdown_signal_impl()
}

#[cfg(unix)]
fn shutdown_signal_impl() -> Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let listen = |kind: SignalKind, name: &'static str| {
        signal(kind).map_err(|error| {
            Error::with_source(ErrorKind::Other, format!("cannot listen for {name}"), error)
        })
    };
    let mut interrupt = listen(SignalKind::interrupt(), "SIGINT")?;
    let mut terminate = listen(SignalKind::terminate(), "SIGTERM")?;
    Ok(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "shutdown signal received");
    })
}

#[cfg(not(unix))]
fn shutdown_signal_impl() -> Result<impl Future<Output = ()> + Send + 'static> {
    Ok(async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            // Without a way to hear Ctrl-C, never ask for a shutdown rather than at once.
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    })
}
