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
//! Beside topics, a service consumes work queues ([`Service::on_queue`]: each message to one
//! consumer) and answers requests ([`Service::on_request`]: a handler from request `Q` to
//! reply `R`). A handler asks other services with [`Context::request`], which keeps the
//! conversation's correlation id, causation and trace context as publishing does.
//!
//! # Schema versions
//!
//! A type declares its version ([`Message::SCHEMA_VERSION`]). A message of a newer version
//! is refused (dead-lettered); an older one is read through the conversion registered with
//! [`Service::upcast`], or as the current type when there is none.
//!
//! # Per-handler settings
//!
//! The `with_*` methods of [`Service`] apply to every subscription; [`Service::on_with`] and
//! its siblings take [`HandlerOptions`] for one handler: a group of its own, its
//! subscription's concurrency and key order, layers around it alone.
//!
//! # Health and tests
//!
//! [`ServiceHandle::health`] says per subscription and for the broker connection whether
//! the service is ready, degraded or down ([`ServiceHealth`]), for a readiness endpoint.
//! [`testing::TestHarness`] (feature `memory`) runs services on an in-process bus whose
//! published, sent and consumed messages a test awaits by type.
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

#[cfg(feature = "asyncapi")]
#[cfg_attr(docsrs, doc(cfg(feature = "asyncapi")))]
pub mod asyncapi;
mod context;
mod dispatch;
mod handle;
mod health;
mod options;
mod respond;
mod signal;
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub mod testing;
mod upcast;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bus_core::runtime::{Consumer, Handler, KeyOrder};
use bus_core::{
    ConsumeOptions, Error, Message, Result, ServeOptions, SubscribeOptions, Subscription,
};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower_layer::Layer;

pub use context::Context;
pub use handle::{ServiceHandle, ServiceReport, SubscriptionReport};
pub use health::{BrokerHealth, Health, HealthWatch, ServiceHealth, SubscriptionHealth};
pub use options::HandlerOptions;
pub use respond::{decode_reply, ERROR_REPLY_KIND};
pub use signal::shutdown_signal;

use crate::Bus;
use dispatch::{Counts, Dispatch, Env, Responding, Route, RouteHandler, Typed};
use handle::Entry;
use health::HealthState;
use respond::{Pending, RequestDeliveries};
use upcast::Upcasters;

/// What a [`Service`] does with a message whose kind no handler on its topic or queue was
/// registered for. (A request of an unknown kind is always answered with an error, as the
/// requester waits for an answer.)
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

/// Where a service's handlers receive from: what one of its subscriptions is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Channel {
    /// A topic, in a consumer group ([`Service::on`]): every group gets every message.
    Topic,
    /// A work queue ([`Service::on_queue`]): each message to one consumer.
    Queue,
    /// Requests sent to a topic, answered with a reply ([`Service::on_request`]).
    Requests,
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Channel::Topic => "topic",
            Channel::Queue => "queue",
            Channel::Requests => "request channel",
        })
    }
}

/// Wraps a subscription's handler in one middleware layer.
pub(crate) type LayerFn = Arc<dyn Fn(Arc<dyn Handler>) -> Arc<dyn Handler> + Send + Sync>;

/// The handlers registered for one subscription.
struct Registered {
    channel: Channel,
    name: String,
    /// The consumer group (topics) or responder group (requests); `None` for queues.
    group: Option<String>,
    /// Set by a handler's options; otherwise the service's.
    concurrency: Option<usize>,
    key_order: Option<KeyOrder>,
    task_per_delivery: Option<bool>,
    routes: BTreeMap<&'static str, Routed>,
}

/// One handler: its route and its own layers.
#[cfg_attr(not(feature = "asyncapi"), allow(dead_code))]
struct Routed {
    route: Box<dyn Route>,
    layers: Vec<LayerFn>,
    /// What it handles (and for a responder, what it replies), for the AsyncAPI document.
    message: MessageType,
    reply: Option<MessageType>,
}

/// A message type as the AsyncAPI document names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "asyncapi"), allow(dead_code))]
pub(crate) struct MessageType {
    pub(crate) kind: &'static str,
    pub(crate) version: u32,
    pub(crate) rust_type: &'static str,
}

impl MessageType {
    fn of<M: Message>() -> Self {
        Self {
            kind: M::KIND,
            version: M::SCHEMA_VERSION,
            rust_type: std::any::type_name::<M>(),
        }
    }
}

/// What a service said it publishes, sends or requests ([`Service::publishes`],
/// [`Service::sends`], [`Service::requests`]): only the AsyncAPI document reads it.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "asyncapi"), allow(dead_code))]
pub(crate) struct Declared {
    pub(crate) channel: Channel,
    pub(crate) name: String,
    pub(crate) message: MessageType,
    pub(crate) reply: Option<MessageType>,
}

/// A service: a name (its consumer group), typed handlers on topics, queues and request
/// channels, and a graceful run.
///
/// Built by value: [`Service::new`], then [`on`](Service::on) once per message type and
/// topic (and [`on_queue`](Service::on_queue), [`on_request`](Service::on_request)), then
/// [`run`](Service::run) (or [`start`](Service::start) for a handle). See the
/// [module docs](self) for the whole picture and an example.
///
/// Every topic gets one subscription in the group named after the service, every queue one
/// consumer of it and every request channel one responder in the service's group; each has
/// one [`Consumer`] with the settings of the `with_*` methods: at most
/// [`with_concurrency`](Service::with_concurrency) handlers at once, one message per key at a
/// time in publish order, panics caught as failed attempts.
#[must_use = "a service does nothing until `run` or `start` is called"]
pub struct Service {
    name: Arc<str>,
    bus: Bus,
    registered: Vec<Registered>,
    unknown_kinds: UnknownKinds,
    concurrency: Option<usize>,
    shutdown_timeout: Option<Duration>,
    key_order: Option<KeyOrder>,
    task_per_delivery: Option<bool>,
    layers: Vec<LayerFn>,
    upcasters: Upcasters,
    declared: Vec<Declared>,
    #[cfg(feature = "asyncapi")]
    schemas: asyncapi::Schemas,
}

impl Service {
    /// A service called `name` on `bus`. The name is the consumer group of its
    /// subscriptions: several instances of one service share the work, and every other
    /// service gets every message too.
    pub fn new(name: impl Into<String>, bus: Bus) -> Self {
        Self {
            name: Arc::from(name.into()),
            bus,
            registered: Vec::new(),
            unknown_kinds: UnknownKinds::default(),
            concurrency: None,
            shutdown_timeout: None,
            key_order: None,
            task_per_delivery: None,
            layers: Vec::new(),
            upcasters: Upcasters::default(),
            declared: Vec::new(),
            #[cfg(feature = "asyncapi")]
            schemas: asyncapi::Schemas::default(),
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
    /// [`Handler`](bus_core::ErrorKind::Handler) error) and dead-letters it otherwise. Without
    /// a retry layer ([`with_layer`](Service::with_layer)) a retryable failure is retried for
    /// as long as it fails. The message type is usually inferred from the handler; otherwise
    /// name it: `.on::<OrderPlaced, _, _>(…)`.
    ///
    /// Several types may be registered on one topic: they share its subscription and each
    /// message goes to the handler of its kind ([`Message::KIND`]).
    ///
    /// # Panics
    /// When a handler for `M::KIND` on `topic` is already registered: which one should run
    /// would be a guess.
    pub fn on<M, F, Fut>(self, topic: impl Into<String>, handler: F) -> Self
    where
        M: Message,
        F: Fn(M, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        self.on_with(topic, HandlerOptions::default(), handler)
    }

    /// As [`on`](Service::on), with settings of the handler's own: a consumer group,
    /// concurrency, key order, middleware layers (see [`HandlerOptions`]).
    ///
    /// # Panics
    /// When a handler for `M::KIND` on `topic` in the same group is already registered, or
    /// `options` set a concurrency or key order another handler of the subscription set
    /// differently.
    pub fn on_with<M, F, Fut>(
        self,
        topic: impl Into<String>,
        options: HandlerOptions,
        handler: F,
    ) -> Self
    where
        M: Message,
        F: Fn(M, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let route = Box::new(Typed::<M, F>::new(handler));
        let handles = (MessageType::of::<M>(), None);
        self.register(Channel::Topic, topic.into(), options, handles, route)
    }

    /// Handles messages of type `M` sent to the work queue `queue` ([`Bus::send`],
    /// [`Context::send`]) with `handler`, as [`on`](Service::on) does for topics.
    ///
    /// A queue has no consumer groups: each message goes to one consumer of the queue, in
    /// this service or elsewhere. Several types may share one queue, dispatched by kind.
    ///
    /// ```
    /// # use bus::{Message, service::Context, Service};
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct ResizeImage { url: String }
    /// # impl Message for ResizeImage { const KIND: &'static str = "image.resize"; }
    /// async fn resize(job: ResizeImage, _ctx: Context) -> bus::Result<()> {
    ///     println!("resizing {}", job.url);
    ///     Ok(())
    /// }
    /// # async fn example(bus: bus::Bus) {
    /// let service = Service::new("thumbnails", bus).on_queue("images.resize", resize);
    /// # let _ = service; }
    /// ```
    ///
    /// # Panics
    /// When a handler for `M::KIND` on `queue` is already registered.
    pub fn on_queue<M, F, Fut>(self, queue: impl Into<String>, handler: F) -> Self
    where
        M: Message,
        F: Fn(M, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        self.on_queue_with(queue, HandlerOptions::default(), handler)
    }

    /// As [`on_queue`](Service::on_queue), with settings of the handler's own (see
    /// [`HandlerOptions`]).
    ///
    /// # Panics
    /// When a handler for `M::KIND` on `queue` is already registered, `options` set a
    /// concurrency or key order another handler of the queue set differently, or `options`
    /// name a group (queues have none).
    pub fn on_queue_with<M, F, Fut>(
        self,
        queue: impl Into<String>,
        options: HandlerOptions,
        handler: F,
    ) -> Self
    where
        M: Message,
        F: Fn(M, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let route = Box::new(Typed::<M, F>::new(handler));
        let handles = (MessageType::of::<M>(), None);
        self.register(Channel::Queue, queue.into(), options, handles, route)
    }

    /// Answers requests of type `Q` sent to `topic` ([`Context::request`],
    /// [`Bus::request`]) with the reply `handler` returns: an async function of the decoded
    /// request and a [`Context`] to `Result<R>`.
    ///
    /// The reply is marked as caused by the request (same correlation id, causation id = the
    /// request's id, its trace context) and sent as soon as the handler returns. When the
    /// handler fails, the request does not decode as `Q`, or no handler handles its kind, the
    /// requester gets an error reply (kind [`ERROR_REPLY_KIND`]) at once, which
    /// [`Context::request`] and [`decode_reply`] turn back into an error of the handler's
    /// [`ErrorKind`](bus_core::ErrorKind). Requests are never retried nor dead-lettered: the
    /// requester, which knows its deadline, decides whether to ask again.
    ///
    /// The service serves `topic` in the responder group named after it: its instances share
    /// the requests. Several request types may share one topic, dispatched by kind.
    ///
    /// ```
    /// # use bus::{Message, service::Context, Service};
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct GetQuote { sku: String }
    /// impl Message for GetQuote { const KIND: &'static str = "quote.get"; }
    ///
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Quote { cents: u64 }
    /// impl Message for Quote { const KIND: &'static str = "quote"; }
    ///
    /// async fn quote(request: GetQuote, _ctx: Context) -> bus::Result<Quote> {
    ///     Ok(Quote { cents: if request.sku == "gold" { 10_000 } else { 100 } })
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> bus::Result<()> {
    /// let bus = bus::connect("memory://").await?;
    /// let pricing = Service::new("pricing", bus.clone()).on_request("quotes", quote).start().await?;
    ///
    /// let request = bus::Envelope::encode(&GetQuote { sku: "gold".into() })?;
    /// let reply = bus.request("quotes", request, std::time::Duration::from_secs(5)).await?;
    /// let quote: Quote = bus::service::decode_reply(&reply)?;
    /// assert_eq!(quote.cents, 10_000);
    /// pricing.stop().await;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Panics
    /// When a handler for `Q::KIND` on `topic` is already registered.
    pub fn on_request<Q, R, F, Fut>(self, topic: impl Into<String>, handler: F) -> Self
    where
        Q: Message,
        R: Message,
        F: Fn(Q, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R>> + Send + 'static,
    {
        self.on_request_with(topic, HandlerOptions::default(), handler)
    }

    /// As [`on_request`](Service::on_request), with settings of the handler's own (see
    /// [`HandlerOptions`]; a group is a responder group).
    ///
    /// # Panics
    /// When a handler for `Q::KIND` on `topic` in the same group is already registered, or
    /// `options` set a concurrency or key order another handler of the channel set
    /// differently.
    pub fn on_request_with<Q, R, F, Fut>(
        self,
        topic: impl Into<String>,
        options: HandlerOptions,
        handler: F,
    ) -> Self
    where
        Q: Message,
        R: Message,
        F: Fn(Q, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R>> + Send + 'static,
    {
        let route = Box::new(Responding::<Q, R, F>::new(handler));
        let handles = (MessageType::of::<Q>(), Some(MessageType::of::<R>()));
        self.register(Channel::Requests, topic.into(), options, handles, route)
    }

    fn register(
        mut self,
        channel: Channel,
        name: String,
        options: HandlerOptions,
        (message, reply): (MessageType, Option<MessageType>),
        route: Box<dyn Route>,
    ) -> Self {
        let kind = message.kind;
        let group = match channel {
            Channel::Queue => {
                assert!(
                    options.group.is_none(),
                    "queue `{name}` has no consumer groups: a handler on it cannot set one"
                );
                None
            }
            _ => Some(options.group.unwrap_or_else(|| self.name.to_string())),
        };
        let found = self
            .registered
            .iter()
            .position(|r| r.channel == channel && r.name == name && r.group == group);
        let index = found.unwrap_or_else(|| {
            self.registered.push(Registered {
                channel,
                name,
                group,
                concurrency: None,
                key_order: None,
                task_per_delivery: None,
                routes: BTreeMap::new(),
            });
            self.registered.len() - 1
        });
        let service = &self.name;
        let registered = &mut self.registered[index];
        let what = match &registered.group {
            Some(group) => format!("{channel} `{}` in group `{group}`", registered.name),
            None => format!("{channel} `{}`", registered.name),
        };
        merge(
            &mut registered.concurrency,
            options.concurrency,
            "concurrency limits",
            &what,
        );
        merge(
            &mut registered.key_order,
            options.key_order,
            "key orders",
            &what,
        );
        merge(
            &mut registered.task_per_delivery,
            options.task_per_delivery,
            "task-per-delivery settings",
            &what,
        );
        let routed = Routed {
            route,
            layers: options.layers,
            message,
            reply,
        };
        assert!(
            registered.routes.insert(kind, routed).is_none(),
            "service `{service}` already has a handler for kind `{kind}` on {what}"
        );
        self
    }

    /// Reads messages of type `M` written with the older schema version `from_version`
    /// through `convert`: their payload is decoded as `Old` (JSON) and converted to `M`,
    /// before any handler of `M` (on any topic, queue or request channel of the service)
    /// sees it.
    ///
    /// `Old` is the shape the old version had: a type kept for it (`OrderPlacedV1`), or
    /// [`serde_json::Value`](https://docs.rs/serde_json) to rewrite the JSON by hand. Each
    /// conversion goes from its version straight to the current one, so a type at version 3
    /// registers one for 1 and one for 2. What is converted:
    ///
    /// | schema version of the message | read as |
    /// |---|---|
    /// | older, with a conversion registered | `Old`, then `convert` |
    /// | older, without one | `M` directly (give new fields serde defaults) |
    /// | `M::SCHEMA_VERSION`, or no `schemaversion` header (a foreign producer) | `M` |
    /// | newer | refused: dead-lettered, never retried |
    ///
    /// A payload that does not decode as `Old`, or a conversion that fails, dead-letters the
    /// message at once with the reason (a request: an error reply), as an undecodable
    /// payload does. Upcast messages are counted per subscription
    /// ([`SubscriptionReport::upcast`]).
    ///
    /// ```
    /// use bus::{Message, Service, service::Context};
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct OrderPlaced { order_id: String, total_cents: u64 }
    /// impl Message for OrderPlaced {
    ///     const KIND: &'static str = "order.placed";
    ///     const SCHEMA_VERSION: u32 = 2;
    /// }
    ///
    /// /// Version 1 had the total in euros, as a float.
    /// #[derive(serde::Deserialize)]
    /// struct OrderPlacedV1 { order_id: String, total: f64 }
    ///
    /// # async fn on_order(_: OrderPlaced, _: Context) -> bus::Result<()> { Ok(()) }
    /// # fn example(bus: bus::Bus) {
    /// let service = Service::new("billing", bus)
    ///     .on("orders", on_order)
    ///     .upcast(1, |old: OrderPlacedV1| {
    ///         Ok(OrderPlaced { order_id: old.order_id, total_cents: (old.total * 100.0).round() as u64 })
    ///     });
    /// # let _ = service; }
    /// ```
    ///
    /// # Panics
    /// When `from_version` is not older than `M::SCHEMA_VERSION`, or a conversion for it is
    /// registered already.
    pub fn upcast<M, Old, F>(mut self, from_version: u32, convert: F) -> Self
    where
        M: Message,
        Old: serde::de::DeserializeOwned,
        F: Fn(Old) -> Result<M> + Send + Sync + 'static,
    {
        assert!(
            from_version < M::SCHEMA_VERSION,
            "cannot upcast `{}` from schema version {from_version}: the type is at version {}",
            M::KIND,
            M::SCHEMA_VERSION
        );
        assert!(
            self.upcasters.insert::<M, Old, F>(from_version, convert),
            "service `{}` already upcasts `{}` from schema version {from_version}",
            self.name,
            M::KIND
        );
        self
    }

    /// Declares that the service's handlers publish messages of type `M` to `topic` (with
    /// [`Context::publish`] or otherwise). Nothing checks or enforces it: it is what the
    /// service's AsyncAPI document (`Service::asyncapi`, feature `asyncapi`) lists as a
    /// `send` operation, so the document says what the service emits as well as what it
    /// handles.
    pub fn publishes<M: Message>(mut self, topic: impl Into<String>) -> Self {
        self.declared.push(Declared {
            channel: Channel::Topic,
            name: topic.into(),
            message: MessageType::of::<M>(),
            reply: None,
        });
        self
    }

    /// Declares that the service's handlers send messages of type `M` to the work queue
    /// `queue` ([`Context::send`]), as [`publishes`](Service::publishes) does for topics.
    pub fn sends<M: Message>(mut self, queue: impl Into<String>) -> Self {
        self.declared.push(Declared {
            channel: Channel::Queue,
            name: queue.into(),
            message: MessageType::of::<M>(),
            reply: None,
        });
        self
    }

    /// Declares that the service's handlers ask requests of type `Q` on `topic` and expect
    /// replies of type `R` ([`Context::request`]), as [`publishes`](Service::publishes)
    /// does for events: a `send` operation with a reply in the AsyncAPI document.
    pub fn requests<Q: Message, R: Message>(mut self, topic: impl Into<String>) -> Self {
        self.declared.push(Declared {
            channel: Channel::Requests,
            name: topic.into(),
            message: MessageType::of::<Q>(),
            reply: Some(MessageType::of::<R>()),
        });
        self
    }

    /// Sets what happens to messages of a kind no handler on their topic or queue handles
    /// (default [`UnknownKinds::Skip`]).
    pub fn with_unknown_kinds(mut self, policy: UnknownKinds) -> Self {
        self.unknown_kinds = policy;
        self
    }

    /// Runs at most `concurrency` handlers at once per subscription (default
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

    /// Runs each delivery's handler as its own tokio task (`true`), in parallel on a
    /// multi-threaded runtime's workers, instead of polling the handlers inside their
    /// subscription's consumer task (`false`, the default). Worth it for handlers that
    /// compute for long between two `.await`s; it costs a task per delivery (see
    /// [`Consumer::with_task_per_delivery`]). [`HandlerOptions::with_task_per_delivery`]
    /// sets it for one handler's subscription.
    pub fn with_task_per_delivery(mut self, task_per_delivery: bool) -> Self {
        self.task_per_delivery = Some(task_per_delivery);
        self
    }

    /// Wraps the handling of every subscription in `layer`: any of the
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
        self.layers.push(layer_fn(layer));
        self
    }

    /// Opens every subscription (topics in the service's group, queues, request channels in
    /// the service's responder group) and starts a [`Consumer`] on each, on tokio tasks;
    /// returns a handle to stop them.
    ///
    /// Once this returned, the service receives every message published to its topics (a
    /// group gets what is published after it first subscribed).
    ///
    /// # Errors
    /// [`ErrorKind::Config`](bus_core::ErrorKind::Config) when no handler is registered;
    /// otherwise the first error of [`Bus::subscribe`], [`Bus::consume`] or [`Bus::serve`],
    /// after closing the subscriptions already opened.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    ///
    /// # Cancel safety
    /// If the future is dropped, the subscriptions opened so far are dropped (closed) and
    /// nothing has been received.
    pub async fn start(self) -> Result<ServiceHandle> {
        if self.registered.is_empty() {
            return Err(Error::config(format!(
                "service `{}` has no handlers: register one with `Service::on`",
                self.name
            )));
        }
        let mut opened = Vec::with_capacity(self.registered.len());
        for registered in &self.registered {
            match self.open(registered).await {
                Ok(subscription) => opened.push(subscription),
                Err(error) => {
                    for (mut subscription, _) in opened {
                        if let Err(close) = subscription.close().await {
                            tracing::warn!(%close, "closing a subscription of a service that failed to start");
                        }
                    }
                    return Err(error);
                }
            }
        }

        let upcasters = Arc::new(self.upcasters);
        let health = HealthState::new(
            &self.name,
            self.registered
                .iter()
                .map(|r| SubscriptionHealth::new(r.channel, r.name.clone(), r.group.clone()))
                .collect(),
        );
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut index_of = std::collections::HashMap::new();
        let mut entries = Vec::with_capacity(self.registered.len());
        for (index, (registered, (subscription, pending))) in
            self.registered.into_iter().zip(opened).enumerate()
        {
            let counts = Arc::new(Counts::default());
            let kinds = registered.routes.keys().copied().collect();
            let env = Arc::new(Env {
                bus: self.bus.clone(),
                service: self.name.clone(),
                counts: counts.clone(),
                pending,
                upcasters: upcasters.clone(),
            });
            let routes = registered
                .routes
                .into_iter()
                .map(|(kind, routed)| {
                    let mut handler: Arc<dyn Handler> = Arc::new(RouteHandler {
                        route: routed.route,
                        env: env.clone(),
                    });
                    for layer in routed.layers.iter().rev() {
                        handler = layer(handler);
                    }
                    (kind, handler)
                })
                .collect();
            let dispatch = Dispatch {
                env,
                channel: registered.channel,
                name: registered.name.clone(),
                routes,
                unknown_kinds: self.unknown_kinds,
            };
            let mut handler: Arc<dyn Handler> = Arc::new(dispatch);
            for layer in self.layers.iter().rev() {
                handler = layer(handler);
            }
            let subscription = health.watch_subscription(index, subscription);
            let mut consumer = Consumer::new(subscription, handler);
            if let Some(concurrency) = registered.concurrency.or(self.concurrency) {
                consumer = consumer.with_concurrency(concurrency);
            }
            if let Some(timeout) = self.shutdown_timeout {
                consumer = consumer.with_shutdown_timeout(timeout);
            }
            if let Some(order) = registered.key_order.or(self.key_order) {
                consumer = consumer.with_key_order(order);
            }
            if let Some(tasks) = registered.task_per_delivery.or(self.task_per_delivery) {
                consumer = consumer.with_task_per_delivery(tasks);
            }
            let mut stopped = stopped.clone();
            let task = tasks.spawn(consumer.run(async move {
                // An error means the handle is gone: stop as well.
                let _ = stopped.wait_for(|stop| *stop).await;
            }));
            index_of.insert(task.id(), index);
            entries.push(Entry {
                channel: registered.channel,
                name: registered.name,
                group: registered.group,
                kinds,
                counts,
            });
        }
        tracing::info!(
            service = %self.name,
            subscriptions = ?entries.iter().map(|e| format!("{} {}", e.channel, e.name)).collect::<Vec<_>>(),
            "service started"
        );
        Ok(ServiceHandle {
            name: self.name,
            health,
            stop,
            tasks,
            index_of,
            entries,
        })
    }

    /// Opens the subscription of `registered`; for a request channel, also the requests
    /// waiting for their reply.
    async fn open(&self, registered: &Registered) -> Result<(Subscription, Option<Arc<Pending>>)> {
        let name = &registered.name;
        match registered.channel {
            Channel::Topic => {
                let mut options = SubscribeOptions::default();
                options.group.clone_from(&registered.group);
                Ok((self.bus.subscribe(name, options).await?, None))
            }
            Channel::Queue => Ok((
                self.bus.consume(name, ConsumeOptions::default()).await?,
                None,
            )),
            Channel::Requests => {
                let mut options = ServeOptions::default();
                options.group.clone_from(&registered.group);
                let requests = self.bus.serve(name, options).await?;
                let pending = Arc::new(Pending::default());
                let source = RequestDeliveries {
                    requests,
                    topic: name.clone(),
                    group: registered.group.clone().unwrap_or_default(),
                    pending: pending.clone(),
                };
                Ok((Subscription::new(Box::new(source)), Some(pending)))
            }
        }
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

/// Sets a subscription's setting from a handler's, refusing two different ones.
fn merge<T: PartialEq + fmt::Debug>(current: &mut Option<T>, set: Option<T>, what: &str, on: &str) {
    match (current.as_ref(), set) {
        (_, None) => {}
        (Some(current), Some(set)) => assert!(
            *current == set,
            "handlers of {on} set different {what} ({current:?} and {set:?}): they share one consumer; give one a group of its own"
        ),
        (None, Some(set)) => *current = Some(set),
    }
}

pub(crate) fn layer_fn<L>(layer: L) -> LayerFn
where
    L: Layer<Arc<dyn Handler>> + Send + Sync + 'static,
    L::Service: Handler,
{
    Arc::new(move |inner: Arc<dyn Handler>| -> Arc<dyn Handler> { Arc::new(layer.layer(inner)) })
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let registered: Vec<_> = self
            .registered
            .iter()
            .map(|r| {
                (
                    r.channel,
                    &r.name,
                    &r.group,
                    r.routes.keys().collect::<Vec<_>>(),
                )
            })
            .collect();
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("bus", &self.bus)
            .field("registered", &registered)
            .field("unknown_kinds", &self.unknown_kinds)
            .field("concurrency", &self.concurrency)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("key_order", &self.key_order)
            .field("task_per_delivery", &self.task_per_delivery)
            .field("layers", &self.layers.len())
            .field("upcasters", &self.upcasters)
            .finish()
    }
}
