//! [`HandlerOptions`]: what one handler sets for itself, over the service's settings.

use std::fmt;
use std::sync::Arc;

use bus_core::runtime::{Handler, KeyOrder};
use tower_layer::Layer;

use super::{layer_fn, LayerFn};

/// Settings of one handler, given to [`Service::on_with`](super::Service::on_with),
/// [`on_queue_with`](super::Service::on_queue_with) or
/// [`on_request_with`](super::Service::on_request_with); whatever is not set here is the
/// service's.
///
/// - **Group** ([`with_group`](HandlerOptions::with_group)): the handler gets a subscription
///   of its own in that consumer group (for a request channel: responder group), instead of
///   sharing the service's. A second group on one topic receives every message again, e.g.
///   an audit handler that must see every order even while the main one is behind.
/// - **Concurrency, key order and tasks** ([`with_concurrency`](HandlerOptions::with_concurrency),
///   [`with_key_order`](HandlerOptions::with_key_order),
///   [`with_task_per_delivery`](HandlerOptions::with_task_per_delivery)) belong to the subscription's
///   [`Consumer`](crate::runtime::Consumer): they apply to every handler sharing the
///   subscription (same topic and group). Two handlers of one subscription setting different
///   values panic at registration; give one its own group instead.
/// - **Layers** ([`with_layer`](HandlerOptions::with_layer)) wrap this handler alone, inside
///   the service's layers: the service's see every delivery before dispatch, the handler's
///   see only its kind's, after dispatch and before decoding.
///
/// ```
/// use std::time::Duration;
/// use bus::middleware::{RetryLayer, RetryPolicy};
/// use bus::service::HandlerOptions;
/// # use bus::{Message, service::Context};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced { order_id: String }
/// # impl Message for OrderPlaced { const KIND: &'static str = "order.placed"; }
/// # async fn charge(_: OrderPlaced, _: Context) -> bus::Result<()> { Ok(()) }
/// # async fn audit(_: OrderPlaced, _: Context) -> bus::Result<()> { Ok(()) }
/// # fn example(bus: bus::Bus) {
/// let service = bus::Service::new("billing", bus)
///     .on_with(
///         "orders",
///         HandlerOptions::new()
///             .with_concurrency(4)
///             .with_layer(RetryLayer::new(RetryPolicy::new().with_max_deliveries(10))),
///         charge,
///     )
///     .on_with("orders", HandlerOptions::new().with_group("billing-audit"), audit);
/// # let _ = service; }
/// ```
#[derive(Clone, Default)]
#[must_use]
pub struct HandlerOptions {
    pub(crate) group: Option<String>,
    pub(crate) concurrency: Option<usize>,
    pub(crate) key_order: Option<KeyOrder>,
    pub(crate) task_per_delivery: Option<bool>,
    pub(crate) layers: Vec<LayerFn>,
}

impl HandlerOptions {
    /// Options that set nothing: the handler takes the service's settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Receives in the consumer group (topics) or responder group (request channels)
    /// `group` instead of the service's name, on a subscription of its own.
    ///
    /// Work queues have no groups: [`on_queue_with`](super::Service::on_queue_with) panics
    /// on options with a group.
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Runs at most `concurrency` handlers at once on this handler's subscription (see
    /// [`Service::with_concurrency`](super::Service::with_concurrency)).
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = Some(concurrency);
        self
    }

    /// Sets what a failing message does to its key's order on this handler's subscription
    /// (see [`Service::with_key_order`](super::Service::with_key_order)).
    pub fn with_key_order(mut self, order: KeyOrder) -> Self {
        self.key_order = Some(order);
        self
    }

    /// Runs each delivery of this handler's subscription as its own tokio task (`true`) or
    /// inside the subscription's consumer task (`false`) (see
    /// [`Service::with_task_per_delivery`](super::Service::with_task_per_delivery)).
    pub fn with_task_per_delivery(mut self, task_per_delivery: bool) -> Self {
        self.task_per_delivery = Some(task_per_delivery);
        self
    }

    /// Wraps this handler alone in `layer`, inside the service's layers. The first layer
    /// added is the outermost.
    pub fn with_layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<Arc<dyn Handler>> + Send + Sync + 'static,
        L::Service: Handler,
    {
        self.layers.push(layer_fn(layer));
        self
    }
}

impl fmt::Debug for HandlerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerOptions")
            .field("group", &self.group)
            .field("concurrency", &self.concurrency)
            .field("key_order", &self.key_order)
            .field("task_per_delivery", &self.task_per_delivery)
            .field("layers", &self.layers.len())
            .finish()
    }
}
