//! Request-reply: a request queue per topic shared by its responders, and one reply queue per
//! requester (per broker connection), created on the first request and deleted on close.
//!
//! A request carries its reply queue's URL in the `bus-reply-to` attribute. The reply is
//! matched to its request by the reply's causation id (the request's id, which
//! `Request::reply` sets), or else by its correlation id.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use bus_core::{
    headers, ConsumeOptions, Envelope, Error, Reply, Request, RequestSource, Requester, Requests,
    Responder, Result, ServeOptions, Subscription,
};
use tokio::sync::{oneshot, watch, OnceCell};

use crate::broker::{send_wire, QueueRole, Shared};
use crate::source::{self, Target};
use crate::wire::{self, REPLY_TO};
use crate::SqsBroker;

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Envelope>>>>;

struct ReplyQueue {
    url: String,
    name: String,
    pending: Pending,
    stop: watch::Sender<bool>,
}

/// The requester side of one broker connection.
pub(crate) struct Replies {
    inner: Shared,
    queue: OnceCell<ReplyQueue>,
}

impl fmt::Debug for Replies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replies")
            .field("reply_queue", &self.queue.get().map(|q| &q.name))
            .finish()
    }
}

impl Replies {
    pub(crate) fn new(inner: Shared) -> Self {
        Self {
            inner,
            queue: OnceCell::new(),
        }
    }

    async fn reply_queue(&self) -> Result<&ReplyQueue> {
        self.queue
            .get_or_try_init(|| async {
                let unique = uuid::Uuid::now_v7().simple().to_string();
                let name = self.inner.names.reply_queue(&unique);
                let url = self.inner.queue_url(&name, QueueRole::Plain, None).await?;
                let pending: Pending = Arc::default();
                let (stop, stopped) = watch::channel(false);
                tokio::spawn(poll_replies(
                    self.inner.clone(),
                    url.clone(),
                    pending.clone(),
                    stopped,
                ));
                Ok(ReplyQueue {
                    url,
                    name,
                    pending,
                    stop,
                })
            })
            .await
    }

    pub(crate) async fn request(
        &self,
        topic: &str,
        request: Envelope,
        timeout: Duration,
    ) -> Result<Envelope> {
        let deadline = headers::saturating_deadline(tokio::time::Instant::now(), timeout);
        let work = async {
            let replies = self.reply_queue().await?;
            let name = self.inner.names.request_queue(topic);
            let url = self.inner.queue_url(&name, QueueRole::Plain, None).await?;
            let wire = self.inner.encode(&request, &[(REPLY_TO, &replies.url)])?;
            let (tx, rx) = oneshot::channel();
            let key = request.id.to_string();
            replies
                .pending
                .lock()
                .expect("pending replies")
                .insert(key.clone(), tx);
            let _unregister = Unregister(&replies.pending, key);
            send_wire(
                &self.inner,
                &url,
                &request,
                wire,
                &format!("the request queue of `{topic}`"),
            )
            .await?;
            rx.await
                .map_err(|_| Error::closed("the broker closed while waiting for the reply"))
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(result) => result,
            Err(_) => Err(Error::timeout(format!(
                "no reply to request {} on `{topic}` within {timeout:?}",
                request.id
            ))),
        }
    }

    pub(crate) async fn close(&self) {
        if let Some(queue) = self.queue.get() {
            queue.stop.send_replace(true);
            queue.pending.lock().expect("pending replies").clear();
            self.inner.forget_queue(&queue.name);
            let _ = self
                .inner
                .sqs
                .delete_queue()
                .queue_url(&queue.url)
                .send()
                .await;
        }
    }
}

struct Unregister<'a>(&'a Pending, String);

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.0.lock().expect("pending replies").remove(&self.1);
    }
}

async fn poll_replies(
    inner: Shared,
    url: String,
    pending: Pending,
    mut stop: watch::Receiver<bool>,
) {
    let mut broker_closed = inner.closed_signal();
    while !*stop.borrow() && !*broker_closed.borrow() {
        let receive = inner
            .sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(i32::try_from(inner.config.wait_time_secs).unwrap_or(20))
            .message_attribute_names("All")
            .send();
        let out = tokio::select! {
            out = receive => out,
            _ = stop.changed() => return,
            _ = broker_closed.changed() => return,
        };
        let Ok(out) = out else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut entries = Vec::new();
        for (i, message) in out.messages().iter().enumerate() {
            let decoded = wire::decode(wire::Received::from_message(message));
            if let Some(reason) = &decoded.undecodable {
                tracing::warn!(
                    id = %decoded.envelope.id,
                    %reason,
                    "undecodable reply, dropped (its requester times out)"
                );
            } else {
                let reply = decoded.envelope;
                let waiter = {
                    let mut pending = pending.lock().expect("pending replies");
                    reply
                        .causation_id
                        .as_ref()
                        .and_then(|id| pending.remove(id.as_str()))
                        .or_else(|| pending.remove(reply.correlation_id.as_str()))
                };
                if let Some(waiter) = waiter {
                    let _ = waiter.send(reply);
                }
            }
            // Replies nobody waits for any more (timed out) are dropped too.
            if let Some(receipt) = message.receipt_handle() {
                if let Ok(entry) = DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt)
                    .build()
                {
                    entries.push(entry);
                }
            }
        }
        if !entries.is_empty() {
            let _ = inner
                .sqs
                .delete_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await;
        }
    }
}

/// Starts serving `topic`: reads its request queue (shared by every responder of the topic).
pub(crate) async fn serve(inner: Shared, topic: &str) -> Result<Requests> {
    let name = inner.names.request_queue(topic);
    let url = inner.queue_url(&name, QueueRole::Plain, None).await?;
    let prefetch = ConsumeOptions::default()
        .prefetch
        .unwrap_or(inner.config.prefetch);
    // Reply queues live in the request queue's account.
    let account = account_of(&url).unwrap_or_default().to_owned();
    let source = source::start(
        inner.clone(),
        Target {
            source: topic.into(),
            group: None,
            queue_name: name,
            url,
            private: None,
        },
        prefetch,
    );
    Ok(Requests::new(Box::new(SqsRequests {
        inner,
        account,
        deliveries: Subscription::new(Box::new(source)),
    })))
}

struct SqsRequests {
    inner: Shared,
    /// The account of the request queue (the path segment before its name in the queue URL):
    /// where reply queues are.
    account: String,
    deliveries: Subscription,
}

impl SqsRequests {
    /// Whether `url` is the URL of a reply queue a requester of `bus` made, in this account:
    /// responders reply nowhere else. The host is not compared: one queue has several URLs
    /// (regional, legacy, VPC endpoints), and the SDK sends to its own endpoint whatever the
    /// URL's host says.
    fn is_reply_queue(&self, url: &str) -> bool {
        let name = url.rsplit('/').next().unwrap_or_default();
        !self.account.is_empty()
            && account_of(url) == Some(self.account.as_str())
            && self.inner.names.is_reply_queue(name)
    }
}

/// The account segment of a queue URL (`https://sqs.<region>.amazonaws.com/<account>/<name>`).
fn account_of(url: &str) -> Option<&str> {
    let mut segments = url.rsplit('/');
    let _name = segments.next()?;
    segments.next().filter(|account| !account.is_empty())
}

impl fmt::Debug for SqsRequests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsRequests")
            .field("deliveries", &self.deliveries)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RequestSource for SqsRequests {
    async fn next(&mut self) -> Option<Result<Request>> {
        loop {
            let delivery = match self.deliveries.next().await? {
                Ok(d) => d,
                Err(e) => return Some(Err(e)),
            };
            let mut envelope = delivery.envelope().clone();
            let reply_to = envelope.headers.remove(REPLY_TO);
            // (An undecodable request is skipped below: it is answered nowhere.)
            let foreign = reply_to
                .as_deref()
                .filter(|r| delivery.undecodable().is_none() && !self.is_reply_queue(r));
            if let Some(reply_to) = foreign {
                // Replying would send wherever the request says: refuse, and keep the request
                // in the dead-letter queue for whoever looks into it.
                let reason = format!(
                    "reply-to `{}` is outside bus's reply namespace (a reply queue beside the \
                     request queue)",
                    bus_core::headers::shorten(reply_to, 200)
                );
                let id = envelope.id.clone();
                if let Err(e) = delivery.reject(reason.clone()).await {
                    return Some(Err(e.into()));
                }
                return Some(Err(Error::new(
                    bus_core::ErrorKind::Rejected,
                    format!("request {id} refused and dead-lettered: {reason}"),
                )));
            }
            let undecodable = delivery.undecodable().map(str::to_owned);
            // A request is taken once: deleted as it is handed out (a requester that gets no
            // reply times out).
            if let Err(e) = delivery.ack().await {
                return Some(Err(e.into()));
            }
            if let Some(reason) = undecodable {
                // Requests have no dead-letter queue: the requester times out.
                tracing::warn!(id = %envelope.id, %reason, "undecodable request, skipped");
                continue;
            }
            let Some(reply_to) = reply_to else {
                tracing::warn!(id = %envelope.id, "request without a reply queue dropped");
                continue;
            };
            return Some(Ok(Request::new(
                envelope,
                Box::new(SqsReply {
                    inner: self.inner.clone(),
                    reply_to,
                }),
            )));
        }
    }

    async fn close(&mut self) -> Result<()> {
        self.deliveries.close().await
    }
}

struct SqsReply {
    inner: Shared,
    reply_to: String,
}

impl fmt::Debug for SqsReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsReply")
            .field("reply_to", &self.reply_to)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Reply for SqsReply {
    async fn reply(&self, response: Envelope) -> Result<()> {
        let wire = self.inner.encode(&response, &[])?;
        send_wire(
            &self.inner,
            &self.reply_to,
            &response,
            wire,
            "the reply queue",
        )
        .await
        .map_err(|e| {
            if e.kind() == bus_core::ErrorKind::NotFound {
                Error::with_source(
                    bus_core::ErrorKind::NotFound,
                    "the requester's reply queue is gone (it closed)",
                    e,
                )
            } else {
                e
            }
        })
    }
}

#[async_trait]
impl Requester for SqsBroker {
    async fn request(&self, topic: &str, request: Envelope, timeout: Duration) -> Result<Envelope> {
        self.inner.check_open()?;
        self.replies.request(topic, request, timeout).await
    }
}

#[async_trait]
impl Responder for SqsBroker {
    async fn serve(&self, topic: &str, _options: ServeOptions) -> Result<Requests> {
        self.inner.check_open()?;
        serve(self.inner.clone(), topic).await
    }
}
