//! Request-reply over direct reply-to (`amq.rabbitmq.reply-to`).
//!
//! Requests are published, mandatory, to the request exchange with the escaped topic as
//! routing key; each responder group consumes an auto-deleted queue bound there. When no
//! responder queue is bound the broker returns the request at once: that is
//! `ErrorKind::NoResponders`. Replies come back on the requester's channel, which consumes
//! the direct reply-to pseudo-queue, and are matched to their request by causation id (a reply
//! is caused by its request). The waiting requests read the replies themselves, one at a time
//! (see [`ReplyChannel::reply`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bus_core::middleware::dead_letter;
use bus_core::{
    async_trait, Envelope, Error, ErrorKind, MessageId, Reply, Request, RequestSource, Requester,
    Requests, Responder, Result, ServeOptions,
};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::oneshot;

use crate::broker::{check_name, Inner};
use crate::error::map;
use crate::link::{confirmed, Confirmed};
use crate::source::{prefetch, Endpoint, Raw, Source};
use crate::{wire, RabbitMqBroker};

/// RabbitMQ's direct reply-to pseudo-queue.
const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// What the broker makes of [`REPLY_TO`] on a request it delivers: responders reply only to
/// such a name, which RabbitMQ routes to the requester's channel and nowhere else.
const DIRECT_REPLY_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// The responder group of `ServeOptions::default()`.
const DEFAULT_GROUP: &str = "default";

type Pending = Arc<Mutex<HashMap<MessageId, oneshot::Sender<Envelope>>>>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The requester's channel (consuming direct reply-to) and the requests awaiting replies.
#[derive(Debug, Default)]
pub(crate) struct Replies {
    channel: tokio::sync::Mutex<Option<Arc<ReplyChannel>>>,
    pending: Pending,
}

impl Replies {
    /// The channel requests are published on, with its reply consumer; made again after a
    /// connection loss.
    async fn channel(&self, inner: &Inner) -> Result<Arc<ReplyChannel>> {
        let mut guard = self.channel.lock().await;
        if let Some(current) = guard.as_ref() {
            if current.channel.status().connected() && !current.ended.load(Ordering::Acquire) {
                return Ok(current.clone());
            }
        }
        let session = inner.link.session().await?;
        let channel = session.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| map(e, "enabling publisher confirms"))?;
        let replies = channel
            .basic_consume(
                REPLY_TO,
                &format!("bus-replies-{}", MessageId::new()),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map(e, "consuming direct reply-to"))?;
        let current = Arc::new(ReplyChannel {
            channel,
            replies: tokio::sync::Mutex::new(replies),
            ended: AtomicBool::new(false),
        });
        *guard = Some(current.clone());
        Ok(current)
    }
}

/// A channel publishing requests and consuming their replies (direct reply-to).
#[derive(Debug)]
struct ReplyChannel {
    channel: Channel,
    /// The replies, read by one waiting request at a time.
    replies: tokio::sync::Mutex<Consumer>,
    /// The reply consumer ended (channel closed or consumer cancelled): no more replies come.
    ended: AtomicBool,
}

impl ReplyChannel {
    /// Waits for the reply to `request`, which `rx` receives if another request reads it.
    ///
    /// The waiting requests take turns reading the replies: the one holding the consumer hands
    /// each other request's reply to its `pending` sender and stops at its own. A lone request
    /// is so woken by lapin itself, as a raw client is; a task reading every reply added a task
    /// and a thread wake-up to each round trip (benches/request_reply.rs). Replies nobody
    /// waits for any more stay buffered in lapin until the next request reads and drops them.
    /// When the consumer ends (its channel closed), the waiting requests fail with
    /// `Connection` at once instead of timing out.
    ///
    /// Cancel safe: lapin's consumer loses nothing when its `next` is dropped.
    async fn reply(
        &self,
        pending: &Pending,
        request: &MessageId,
        mut rx: oneshot::Receiver<Envelope>,
    ) -> Result<Envelope> {
        let lost = || {
            Error::new(
                ErrorKind::Connection,
                "the reply channel was lost before the reply came",
            )
        };
        let mut replies = tokio::select! {
            biased;
            reply = &mut rx => return reply.map_err(|_| lost()),
            replies = self.replies.lock() => replies,
        };
        loop {
            if self.ended.load(Ordering::Acquire) {
                return Err(lost());
            }
            let delivery = tokio::select! {
                biased;
                reply = &mut rx => return reply.map_err(|_| lost()),
                delivery = replies.next() => delivery,
            };
            let Some(Ok(delivery)) = delivery else {
                self.ended.store(true, Ordering::Release);
                return Err(lost());
            };
            let received = wire::envelope(&delivery.properties, delivery.data);
            let reply = received.envelope;
            if let Some(reason) = received.undecodable {
                // Not handed over as a good reply: the requester times out.
                tracing::warn!(id = %reply.id, %reason, "undecodable reply, dropped");
                continue;
            }
            let Some(cause) = reply.causation_id.as_ref() else {
                continue;
            };
            if cause == request {
                return Ok(reply);
            }
            // A reply nobody waits for any more (timed out) is dropped.
            let waiting = lock(pending).remove(cause);
            if let Some(waiting) = waiting {
                let _ = waiting.send(reply);
            }
        }
    }
}

/// Removes a request from the pending map however the request ends.
struct Forget<'a>(&'a Pending, MessageId);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.0).remove(&self.1);
    }
}

#[async_trait]
impl Requester for RabbitMqBroker {
    async fn request(&self, topic: &str, request: Envelope, timeout: Duration) -> Result<Envelope> {
        let inner = &self.inner;
        inner.link.check()?;
        inner.validate(&request)?;
        let key = wire::routing_key(topic);
        check_name(&key, "topic")?;
        let (tx, rx) = oneshot::channel();
        lock(&inner.replies.pending).insert(request.id.clone(), tx);
        let _forget = Forget(&inner.replies.pending, request.id.clone());
        let work = async {
            let replies = inner.replies.channel(inner).await?;
            let props = wire::properties(&request, &inner.config().source, 1)?
                .with_reply_to(REPLY_TO.into());
            inner.link.session().await?.check_headers(&props)?;
            let confirm = replies
                .channel
                .basic_publish(
                    &inner.config().request_exchange,
                    &key,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &request.payload,
                    props,
                )
                .await
                .map_err(|e| map(e, "publishing the request"))?;
            match confirmed(confirm, inner.config().confirm_timeout()).await? {
                Confirmed::Ack => {}
                Confirmed::Returned(_) => {
                    return Err(Error::new(
                        ErrorKind::NoResponders,
                        format!("nobody serves requests on `{topic}`"),
                    ))
                }
            }
            replies.reply(&inner.replies.pending, &request.id, rx).await
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(Error::timeout(format!(
                "no reply from `{topic}` within {timeout:?}"
            ))),
        }
    }
}

#[async_trait]
impl Responder for RabbitMqBroker {
    async fn serve(&self, topic: &str, options: ServeOptions) -> Result<Requests> {
        let inner = self.inner.clone();
        inner.link.check()?;
        let group = options.group.unwrap_or_else(|| DEFAULT_GROUP.to_owned());
        let prefetch = prefetch(None, inner.config().prefetch);
        let endpoint = Endpoint::Responder {
            topic: topic.to_owned(),
            group,
        };
        let source = Source::open(inner, endpoint, prefetch).await?;
        Ok(Requests::new(Box::new(Serving {
            source,
            topic: topic.to_owned(),
        })))
    }
}

#[derive(Debug)]
struct Serving {
    source: Source,
    /// The served topic: its dead-letter queue keeps refused requests.
    topic: String,
}

#[async_trait]
impl RequestSource for Serving {
    async fn next(&mut self) -> Option<Result<Request>> {
        loop {
            let Raw {
                delivery, channel, ..
            } = match self.source.next_raw().await? {
                Ok(raw) => raw,
                Err(e) => return Some(Err(e)),
            };
            let received = wire::envelope(&delivery.properties, delivery.data);
            // (An undecodable request is skipped below: it is answered nowhere.)
            let foreign = received
                .reply_to
                .as_deref()
                .filter(|r| received.undecodable.is_none() && !r.starts_with(DIRECT_REPLY_PREFIX));
            if let Some(reply_to) = foreign {
                // Replying would publish wherever the request says: refuse, and keep the
                // request in the dead-letter queue for whoever looks into it.
                let reason = format!(
                    "reply-to `{}` is outside bus's reply namespace ({DIRECT_REPLY_PREFIX}…)",
                    bus_core::headers::shorten(reply_to, 200)
                );
                let id = received.envelope.id.clone();
                if let Err(e) = self.dead_letter(&received.envelope, &reason).await {
                    let _ = channel
                        .basic_reject(delivery.delivery_tag, BasicRejectOptions { requeue: true })
                        .await;
                    return Some(Err(e));
                }
                if let Err(e) = channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                    .await
                {
                    return Some(Err(map(e, "acknowledging the refused request")));
                }
                return Some(Err(Error::new(
                    ErrorKind::Rejected,
                    format!("request {id} refused and dead-lettered: {reason}"),
                )));
            }
            // A request is answered once or not at all: it is acked as it is handed out.
            if let Err(e) = channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await
            {
                return Some(Err(map(e, "acknowledging the request")));
            }
            if let Some(reason) = received.undecodable {
                // Requests have no dead-letter queue: the requester times out.
                tracing::warn!(id = %received.envelope.id, %reason, "undecodable request, skipped");
                continue;
            }
            return Some(Ok(Request::new(
                received.envelope,
                Box::new(RabbitReply {
                    inner: self.source_inner(),
                    reply_to: received.reply_to,
                }),
            )));
        }
    }

    async fn close(&mut self) -> Result<()> {
        self.source.close().await
    }
}

impl Serving {
    fn source_inner(&self) -> Arc<Inner> {
        self.source.inner()
    }

    /// Sends `request`, marked with `reason`, to the dead-letter queue of the served topic.
    async fn dead_letter(&self, request: &Envelope, reason: &str) -> Result<()> {
        let topic = &self.topic;
        let dead = dead_letter::mark(
            request.clone(),
            &dead_letter::DeadLetterInfo {
                reason,
                source: topic,
                group: None,
                attempts: 1,
                first_failure: None,
            },
        );
        let dlq = bus_core::headers::dead_letter_queue(topic);
        let inner = self.source_inner();
        let session = inner.link.session().await?;
        let props = wire::properties_fitted(&dead, &inner.config().source, 1, session.frame_max());
        inner
            .link
            .send_to_queue_on(&session, &dlq, &dead.payload, props)
            .await
    }
}

#[derive(Debug)]
struct RabbitReply {
    inner: Arc<Inner>,
    reply_to: Option<String>,
}

#[async_trait]
impl Reply for RabbitReply {
    async fn reply(&self, response: Envelope) -> Result<()> {
        self.inner.link.check()?;
        self.inner.validate(&response)?;
        let Some(reply_to) = self.reply_to.as_deref() else {
            return Err(Error::new(
                ErrorKind::Rejected,
                "the request carried no reply-to address",
            ));
        };
        let props = wire::properties(&response, &self.inner.config().source, 1)?;
        // Not mandatory: a requester that gave up is gone, and its reply is dropped.
        self.inner
            .link
            .publish("", reply_to, false, &response.payload, props)
            .await
            .map(|_| ())
    }
}
