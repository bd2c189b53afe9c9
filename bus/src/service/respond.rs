//! Request channels in a service: the requests of [`Bus::serve`](crate::Bus::serve) turned
//! into deliveries for a [`Consumer`](bus_core::runtime::Consumer), and the error replies
//! a responder sends when its handler fails.
//!
//! Running requests through the consumer gives responders what event handlers have:
//! bounded concurrency, panic recovery, middleware and a graceful shutdown. A request is
//! answered by its route as soon as the handler returns; its "settlement" only answers what
//! the route did not (a middleware or a panic that failed it: an error reply; a middleware
//! that acked it without running the handler: no reply).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bus_core::{
    async_trait, Delivery, DeliverySource, Envelope, Error, ErrorKind, Message, MessageId, Request,
    Requests, Result, Settle, Settlement,
};
use serde::{Deserialize, Serialize};

/// The kind of the reply a service's responder sends when its handler failed (or no handler
/// handles the request's kind): see [`decode_reply`].
pub const ERROR_REPLY_KIND: &str = "bus.error";

/// The payload of an error reply ([`ERROR_REPLY_KIND`]): the error's kind by its stable name
/// ([`ErrorKind::as_str`]) and its message.
#[derive(Debug, Serialize, Deserialize)]
struct ErrorReply {
    kind: String,
    message: String,
}

impl Message for ErrorReply {
    const KIND: &'static str = ERROR_REPLY_KIND;
}

/// Decodes the reply to a request as `R`, or turns an error reply of a [`Service`]'s
/// responder back into the error its handler failed with.
///
/// [`Context::request`](super::Context::request) calls it; use it with
/// [`Bus::request`](crate::Bus::request) when requesting from outside a handler.
///
/// ```
/// use bus::{service::decode_reply, Envelope, ErrorKind, Message};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Quote { cents: u64 }
/// impl Message for Quote { const KIND: &'static str = "quote"; }
///
/// let reply = Envelope::encode(&Quote { cents: 120 }).unwrap();
/// assert_eq!(decode_reply::<Quote>(&reply).unwrap().cents, 120);
/// ```
///
/// # Errors
/// For an error reply, an error of the kind the responder's handler failed with (an unknown
/// kind name becomes [`ErrorKind::Handler`]), whose message names the responder's error;
/// [`ErrorKind::Serialization`] when the reply is not an `R` (see
/// [`Envelope::decode`]).
///
/// [`Service`]: super::Service
pub fn decode_reply<R: Message>(reply: &Envelope) -> Result<R> {
    if reply.kind != ERROR_REPLY_KIND || R::KIND == ERROR_REPLY_KIND {
        return reply.decode();
    }
    let error: ErrorReply = reply.decode()?;
    Err(Error::new(
        kind_named(&error.kind),
        format!("the responder failed: {}", error.message),
    ))
}

fn kind_named(name: &str) -> ErrorKind {
    [
        ErrorKind::Connection,
        ErrorKind::Timeout,
        ErrorKind::NoResponders,
        ErrorKind::NotFound,
        ErrorKind::PayloadTooLarge,
        ErrorKind::HeadersTooLarge,
        ErrorKind::Serialization,
        ErrorKind::Rejected,
        ErrorKind::Unsupported,
        ErrorKind::Closed,
        ErrorKind::Config,
        ErrorKind::Backpressure,
        ErrorKind::Other,
    ]
    .into_iter()
    .find(|kind| kind.as_str() == name)
    .unwrap_or(ErrorKind::Handler)
}

fn error_reply(kind: ErrorKind, message: &str) -> Result<Envelope> {
    Envelope::encode(&ErrorReply {
        kind: kind.as_str().to_owned(),
        message: message.to_owned(),
    })
}

type Slot = Mutex<Option<Request>>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The requests of one request channel handed to the consumer and not answered yet, by
/// request id. Several requests may carry one id (a requester that sent one envelope twice);
/// they are answered in turn.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    waiting: Mutex<HashMap<MessageId, Vec<Arc<Slot>>>>,
}

impl Pending {
    fn insert(&self, request: Request) -> Arc<Slot> {
        let id = request.envelope().id.clone();
        let slot = Arc::new(Mutex::new(Some(request)));
        lock(&self.waiting)
            .entry(id)
            .or_default()
            .push(slot.clone());
        slot
    }

    /// The first unanswered request of `id`, taken out of its slot.
    fn take(&self, id: &MessageId) -> Option<Request> {
        let waiting = lock(&self.waiting);
        waiting.get(id)?.iter().find_map(|slot| lock(slot).take())
    }

    /// Forgets `slot`, returning its request if it was not answered.
    fn remove(&self, id: &MessageId, slot: &Arc<Slot>) -> Option<Request> {
        let mut waiting = lock(&self.waiting);
        if let Some(slots) = waiting.get_mut(id) {
            slots.retain(|s| !Arc::ptr_eq(s, slot));
            if slots.is_empty() {
                waiting.remove(id);
            }
        }
        drop(waiting);
        lock(slot).take()
    }

    /// Answers the request `request` with `reply`.
    pub(crate) async fn reply(&self, request: &Envelope, reply: Envelope) -> Result<()> {
        match self.take(&request.id) {
            Some(waiting) => waiting.reply(reply).await,
            None => Err(Error::new(
                ErrorKind::Other,
                format!("request {} was answered already", request.id),
            )),
        }
    }

    /// Answers the request `request` with an error reply; failures are logged (the requester
    /// will time out).
    pub(crate) async fn reply_error(&self, request: &Envelope, error: &Error) {
        if let Some(waiting) = self.take(&request.id) {
            answer_with_error(waiting, error.kind(), error.message()).await;
        }
    }
}

async fn answer_with_error(request: Request, kind: ErrorKind, message: &str) {
    let id = request.envelope().id.clone();
    let sent = match error_reply(kind, message) {
        Ok(reply) => request.reply(reply).await,
        Err(error) => Err(error),
    };
    if let Err(error) = sent {
        tracing::warn!(%error, request = %id, "sending an error reply failed");
    }
}

/// A request channel's requests as a source of deliveries.
#[derive(Debug)]
pub(crate) struct RequestDeliveries {
    pub(crate) requests: Requests,
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) pending: Arc<Pending>,
}

#[async_trait]
impl DeliverySource for RequestDeliveries {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let request = match self.requests.next().await? {
            Ok(request) => request,
            Err(error) => return Some(Err(error)),
        };
        let envelope = request.envelope().clone();
        let slot = self.pending.insert(request);
        let settle = RequestSettle {
            id: envelope.id.clone(),
            slot,
            pending: self.pending.clone(),
        };
        Some(Ok(Delivery::new(
            envelope,
            1,
            &self.topic,
            Some(self.group.clone()),
            Box::new(settle),
        )))
    }

    async fn close(&mut self) -> Result<()> {
        self.requests.close().await
    }
}

/// The settlement of a request handed out as a delivery: answers what its route did not.
#[derive(Debug)]
struct RequestSettle {
    id: MessageId,
    slot: Arc<Slot>,
    pending: Arc<Pending>,
}

#[async_trait]
impl Settle for RequestSettle {
    async fn settle(&self, settlement: Settlement) -> Result<()> {
        let Some(request) = self.pending.remove(&self.id, &self.slot) else {
            return Ok(());
        };
        match settlement {
            // Acked without a reply (a middleware skipped it): nothing to say.
            Settlement::Ack => drop(request),
            Settlement::Reject { reason, .. } => {
                answer_with_error(request, ErrorKind::Handler, &reason).await;
            }
            // Requests are not redelivered: a failed attempt is the requester's to retry.
            Settlement::Nack(_) => {
                answer_with_error(request, ErrorKind::Handler, "the handler failed").await;
            }
            _ => answer_with_error(request, ErrorKind::Handler, "not answered").await,
        }
        Ok(())
    }

    fn abandon(&self) {
        // Dropped unanswered (a shutdown that ran out of time): the requester times out, or
        // learns at once where the broker tells it nobody will answer.
        drop(self.pending.remove(&self.id, &self.slot));
    }
}
