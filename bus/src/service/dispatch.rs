//! One subscription's handler: routes each delivery by its envelope's kind to the typed
//! handler registered for that kind, decoding the payload on the way.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bus_core::runtime::{Handler, Outcome};
use bus_core::{async_trait, Delivery, Envelope, Error, ErrorKind, Message};

use super::respond::Pending;
use super::upcast::Upcasters;
use super::{Channel, Context, UnknownKinds};
use crate::Bus;

/// What every route of one subscription shares: the bus, the service, the counts of the
/// report, and for a request channel the requests waiting for their reply.
#[derive(Debug)]
pub(crate) struct Env {
    pub(crate) bus: Bus,
    pub(crate) service: Arc<str>,
    pub(crate) counts: Arc<Counts>,
    pub(crate) pending: Option<Arc<Pending>>,
    pub(crate) upcasters: Arc<Upcasters>,
}

impl Env {
    fn context(&self, delivery: &Delivery) -> Context {
        Context::new(self.bus.clone(), self.service.clone(), delivery)
    }

    /// Decodes the delivery as `M`, upcasting an older schema version through the
    /// service's conversions; on failure counts it and says why, naming the type.
    fn decode<M: Message>(&self, delivery: &Delivery) -> Result<M, Error> {
        let envelope = delivery.envelope();
        let decoded = self
            .upcasters
            .decode::<M>(envelope)
            .map(|(message, upcast)| {
                if upcast {
                    self.counts.upcast.fetch_add(1, Ordering::Relaxed);
                }
                message
            });
        decoded.map_err(|error| {
            self.counts.undecodable.fetch_add(1, Ordering::Relaxed);
            let reason = format!(
                "cannot decode `{}` message {} as `{}`: {}",
                envelope.kind,
                envelope.id,
                std::any::type_name::<M>(),
                error.message()
            );
            Error::with_source(ErrorKind::Serialization, reason, error)
        })
    }
}

/// A typed handler with its message type erased, so that handlers of several types can sit
/// in one table.
#[async_trait]
pub(crate) trait Route: Send + Sync + 'static {
    /// Decodes the delivery's payload and runs the handler on it.
    async fn handle(&self, delivery: &Delivery, env: &Env) -> Outcome;
}

/// The route of message type `M` to the handler `F`, which returns `Result<()>`.
pub(crate) struct Typed<M, F> {
    handler: F,
    message: PhantomData<fn() -> M>,
}

impl<M, F> Typed<M, F> {
    pub(crate) fn new(handler: F) -> Self {
        Self {
            handler,
            message: PhantomData,
        }
    }
}

#[async_trait]
impl<M, F, Fut> Route for Typed<M, F>
where
    M: Message,
    F: Fn(M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Error>> + Send + 'static,
{
    async fn handle(&self, delivery: &Delivery, env: &Env) -> Outcome {
        match env.decode::<M>(delivery) {
            // Decoding never succeeds on a later attempt: dead-letter it at once.
            Err(error) => Outcome::reject(error),
            Ok(message) => (self.handler)(message, env.context(delivery)).await.into(),
        }
    }
}

/// The route of request type `Q` to the handler `F`, which returns the reply `R`.
pub(crate) struct Responding<Q, R, F> {
    handler: F,
    message: PhantomData<fn(Q) -> R>,
}

impl<Q, R, F> Responding<Q, R, F> {
    pub(crate) fn new(handler: F) -> Self {
        Self {
            handler,
            message: PhantomData,
        }
    }
}

#[async_trait]
impl<Q, R, F, Fut> Route for Responding<Q, R, F>
where
    Q: Message,
    R: Message,
    F: Fn(Q, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, Error>> + Send + 'static,
{
    async fn handle(&self, delivery: &Delivery, env: &Env) -> Outcome {
        let Some(pending) = &env.pending else {
            return Outcome::reject(Error::new(
                ErrorKind::Other,
                "a responder route outside a request channel",
            ));
        };
        let result = match env.decode::<Q>(delivery) {
            Ok(request) => {
                let context = env.context(delivery);
                (self.handler)(request, context.clone())
                    .await
                    .and_then(|reply| Envelope::encode(&reply))
                    .map(|reply| context.follow_up(reply))
            }
            Err(error) => Err(error),
        };
        // The requester is waiting: answer at once, with the reply or with the error, and
        // leave retrying to it (it knows its deadline).
        match result {
            Ok(reply) => match pending.reply(delivery.envelope(), reply).await {
                Ok(()) => Outcome::Ack,
                Err(error) => Outcome::reject(error),
            },
            Err(error) => {
                pending.reply_error(delivery.envelope(), &error).await;
                Outcome::reject(error)
            }
        }
    }
}

/// Runs one route with its subscription's environment: the innermost [`Handler`] of a kind,
/// which the handler's own layers wrap.
pub(crate) struct RouteHandler {
    pub(crate) route: Box<dyn Route>,
    pub(crate) env: Arc<Env>,
}

#[async_trait]
impl Handler for RouteHandler {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        self.route.handle(delivery, &self.env).await
    }
}

/// What a [`Dispatch`] counted, shared with the service's report.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) unknown_kinds: AtomicU64,
    pub(crate) undecodable: AtomicU64,
    pub(crate) upcast: AtomicU64,
}

/// The [`Handler`] of one subscription of a service: a table from kind to handler.
pub(crate) struct Dispatch {
    pub(crate) env: Arc<Env>,
    pub(crate) channel: Channel,
    pub(crate) name: String,
    pub(crate) routes: BTreeMap<&'static str, Arc<dyn Handler>>,
    pub(crate) unknown_kinds: UnknownKinds,
}

#[async_trait]
impl Handler for Dispatch {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let kind = delivery.envelope().kind.as_str();
        if let Some(route) = self.routes.get(kind) {
            return route.handle(delivery).await;
        }
        self.env
            .counts
            .unknown_kinds
            .fetch_add(1, Ordering::Relaxed);
        let unknown = || {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "service `{}` has no handler for kind `{kind}` on {} `{}`",
                    self.env.service, self.channel, self.name
                ),
            )
        };
        if let Some(pending) = &self.env.pending {
            // A requester waits for an answer: tell it nobody here handles its kind.
            let error = unknown();
            pending.reply_error(delivery.envelope(), &error).await;
            return Outcome::reject(error);
        }
        match self.unknown_kinds {
            UnknownKinds::Skip => {
                tracing::debug!(
                    service = %self.env.service,
                    channel = %self.channel,
                    name = %self.name,
                    kind,
                    id = %delivery.envelope().id,
                    "no handler for this kind: acknowledged and skipped"
                );
                Outcome::Ack
            }
            UnknownKinds::DeadLetter => Outcome::reject(unknown()),
        }
    }
}

impl fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatch")
            .field("service", &self.env.service)
            .field("channel", &self.channel)
            .field("name", &self.name)
            .field("kinds", &self.routes.keys().collect::<Vec<_>>())
            .field("unknown_kinds", &self.unknown_kinds)
            .finish_non_exhaustive()
    }
}
