//! One subscription's handler: routes each delivery by its envelope's kind to the typed
//! handler registered for that kind, decoding the payload on the way.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bus_core::runtime::{Handler, Outcome};
use bus_core::{async_trait, Delivery, Error, ErrorKind, Message};

use super::{Context, UnknownKinds};
use crate::Bus;

/// A typed handler with its message type erased, so that handlers of several types can sit
/// in one table.
#[async_trait]
pub(crate) trait Route: Send + Sync + 'static {
    /// Decodes the delivery's payload and runs the handler on it.
    async fn handle(&self, delivery: &Delivery, context: Context, counts: &Counts) -> Outcome;
}

/// The route of message type `M` to the handler `F`.
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
    async fn handle(&self, delivery: &Delivery, context: Context, counts: &Counts) -> Outcome {
        let envelope = delivery.envelope();
        let message = match envelope.decode::<M>() {
            Ok(message) => message,
            Err(error) => {
                counts.undecodable.fetch_add(1, Ordering::Relaxed);
                // Decoding never succeeds on a later attempt: dead-letter it at once, saying
                // what it was read as and why that failed.
                let reason = format!(
                    "cannot decode `{}` message {} as `{}`: {}",
                    envelope.kind,
                    envelope.id,
                    std::any::type_name::<M>(),
                    error.message()
                );
                return Outcome::reject(Error::with_source(
                    ErrorKind::Serialization,
                    reason,
                    error,
                ));
            }
        };
        (self.handler)(message, context).await.into()
    }
}

/// What a [`Dispatch`] counted, shared with the service's report.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) unknown_kinds: AtomicU64,
    pub(crate) undecodable: AtomicU64,
}

/// The [`Handler`] of one subscription of a service: a table from kind to typed route.
pub(crate) struct Dispatch {
    pub(crate) bus: Bus,
    pub(crate) service: Arc<str>,
    pub(crate) topic: String,
    pub(crate) routes: BTreeMap<&'static str, Box<dyn Route>>,
    pub(crate) unknown_kinds: UnknownKinds,
    pub(crate) counts: Arc<Counts>,
}

#[async_trait]
impl Handler for Dispatch {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let kind = delivery.envelope().kind.as_str();
        let Some(route) = self.routes.get(kind) else {
            self.counts.unknown_kinds.fetch_add(1, Ordering::Relaxed);
            return match self.unknown_kinds {
                UnknownKinds::Skip => {
                    tracing::debug!(
                        service = %self.service,
                        topic = %self.topic,
                        kind,
                        id = %delivery.envelope().id,
                        "no handler for this kind: acknowledged and skipped"
                    );
                    Outcome::Ack
                }
                UnknownKinds::DeadLetter => Outcome::reject(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "service `{}` has no handler for kind `{kind}` on topic `{}`",
                        self.service, self.topic
                    ),
                )),
            };
        };
        let context = Context::new(self.bus.clone(), self.service.clone(), delivery);
        route.handle(delivery, context, &self.counts).await
    }
}

impl fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatch")
            .field("service", &self.service)
            .field("topic", &self.topic)
            .field("kinds", &self.routes.keys().collect::<Vec<_>>())
            .field("unknown_kinds", &self.unknown_kinds)
            .finish_non_exhaustive()
    }
}
