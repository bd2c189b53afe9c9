//! Request-reply: requests on the request topic, replies on one reply topic per requester
//! connection, tied together by the request's id (the reply's causation id).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bus_core::{
    Envelope, Error, ErrorKind, MessageId, Reply, Request, RequestSource, Requester, Requests,
    Responder, Result, ServeOptions,
};
use tokio::sync::{oneshot, OnceCell};
use tokio::task::JoinHandle;

use crate::broker::Shared;
use crate::source::{self, KafkaSource, Spec, Start};
use crate::{names, wire, KafkaBroker};

type Pending = Arc<Mutex<HashMap<MessageId, oneshot::Sender<Envelope>>>>;

/// The reply namespace: every requester's reply topic is this prefix and a UUID, and a
/// responder replies nowhere else.
pub(crate) const REPLY_TOPIC_PREFIX: &str = "bus.replies.";

/// Whether `topic` is a reply topic a requester of `bus` made: responders refuse to send
/// anywhere else, so a request cannot make them produce into any topic it names.
pub(crate) fn is_reply_topic(topic: &str) -> bool {
    topic
        .strip_prefix(REPLY_TOPIC_PREFIX)
        .is_some_and(|id| uuid::Uuid::try_parse(id).is_ok())
}

/// The reply topic of this connection and the requests waiting for a reply.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    topic: OnceCell<String>,
    pending: Pending,
    /// The task reading the reply topic, awaited at close before the topic is deleted.
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Inbox {
    async fn topic(&self, shared: &Arc<Shared>) -> Result<&str> {
        let topic = self
            .topic
            .get_or_try_init(|| async {
                let topic = format!("{REPLY_TOPIC_PREFIX}{}", uuid::Uuid::now_v7());
                shared.ensure_topics(&[&topic], Some(1)).await?;
                let mut source = source::open(
                    shared,
                    Spec {
                        source: topic.clone(),
                        group: names::private_group(),
                        user_group: None,
                        start: Start::Earliest,
                        prefetch: 256,
                        retries: false,
                        private: true,
                    },
                )
                .await?;
                let pending = self.pending.clone();
                let reader = tokio::spawn(async move {
                    while let Some((delivery, _)) = source.next_item().await {
                        let reply = delivery.envelope().clone();
                        let _ = delivery.ack().await;
                        let Some(request_id) = reply.causation_id.clone() else {
                            continue;
                        };
                        let waiter = pending
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .remove(&request_id);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(reply);
                        }
                    }
                    source.shut_down().await;
                });
                *self
                    .reader
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reader);
                Ok::<_, Error>(topic)
            })
            .await?;
        Ok(topic)
    }

    /// At the connection's close (after `Shared::close`): waits (up to 30 s) until the reply
    /// reader has left its private group (which it deletes), then deletes the reply topic.
    pub(crate) async fn close(&self, shared: &Shared) {
        let Some(topic) = self.topic.get() else {
            return;
        };
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(reader) = reader {
            let _ = tokio::time::timeout(Duration::from_secs(30), reader).await;
        }
        if let Err(e) = shared.delete_topic(topic).await {
            tracing::debug!(error = %e, topic, "deleting the reply topic failed");
        }
    }

    /// The reply topic, once the first request made it.
    #[cfg(test)]
    pub(crate) fn topic_name(&self) -> Option<&str> {
        self.topic.get().map(String::as_str)
    }

    pub(crate) async fn request(
        &self,
        shared: &Arc<Shared>,
        topic: &str,
        request: Envelope,
        timeout: Duration,
    ) -> Result<Envelope> {
        shared.check_open()?;
        let reply_to = self.topic(shared).await?.to_owned();
        let (tx, rx) = oneshot::channel();
        let id = request.id.clone();
        self.lock().insert(id.clone(), tx);
        let outcome = async {
            shared
                .produce(topic, &request, &[(wire::REPLY_TO, &reply_to)])
                .await?;
            match rx.await {
                Ok(reply) => Ok(reply),
                Err(_) => Err(Error::closed("the Kafka connection closed")),
            }
        };
        let result = match tokio::time::timeout(timeout, outcome).await {
            Ok(result) => result,
            Err(_) => Err(Error::timeout(format!(
                "no reply to the request on `{topic}` within {timeout:?}"
            ))),
        };
        self.lock().remove(&id);
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MessageId, oneshot::Sender<Envelope>>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Serves a request topic: each request is acknowledged as it is handed out (a request is
/// answered once or times out; it is not redelivered).
#[derive(Debug)]
pub(crate) struct KafkaRequests {
    pub(crate) shared: Arc<Shared>,
    pub(crate) source: KafkaSource,
}

#[async_trait]
impl RequestSource for KafkaRequests {
    async fn next(&mut self) -> Option<Result<Request>> {
        loop {
            let (delivery, reply_to) = self.source.next_item().await?;
            let envelope = delivery.envelope().clone();
            // (An undecodable request is skipped below: it is answered nowhere.)
            let foreign = reply_to
                .as_deref()
                .filter(|r| delivery.undecodable().is_none() && !is_reply_topic(r));
            if let Some(reply_to) = foreign {
                // Replying would produce wherever the request says: refuse, and keep the
                // request in the dead-letter topic for whoever looks into it.
                let reason = format!(
                    "reply-to `{}` is outside bus's reply namespace ({REPLY_TOPIC_PREFIX}<uuid>)",
                    bus_core::headers::shorten(reply_to, 200)
                );
                let id = envelope.id.clone();
                if let Err(e) = delivery.reject(reason.clone()).await {
                    return Some(Err(e.into()));
                }
                return Some(Err(Error::new(
                    ErrorKind::Rejected,
                    format!("request {id} refused and dead-lettered: {reason}"),
                )));
            }
            let undecodable = delivery.undecodable().map(str::to_owned);
            if let Err(e) = delivery.ack().await {
                return Some(Err(e.into()));
            }
            if let Some(reason) = undecodable {
                // The requester cannot be answered usefully: it times out.
                tracing::warn!(id = %envelope.id, %reason, "undecodable request, skipped");
                continue;
            }
            let Some(reply_to) = reply_to else {
                tracing::debug!(id = %envelope.id, "request without a reply topic, skipped");
                continue;
            };
            let reply = KafkaReply {
                shared: self.shared.clone(),
                reply_to,
            };
            return Some(Ok(Request::new(envelope, Box::new(reply))));
        }
    }

    async fn close(&mut self) -> Result<()> {
        self.source.shut_down().await;
        Ok(())
    }
}

#[derive(Debug)]
struct KafkaReply {
    shared: Arc<Shared>,
    reply_to: String,
}

#[async_trait]
impl Reply for KafkaReply {
    /// Sends the reply to the requester's reply topic, which is never created here: it is
    /// the requester's, and deleted when the requester closes.
    async fn reply(&self, response: Envelope) -> Result<()> {
        self.shared.check_open()?;
        self.shared.check_envelope(&response)?;
        self.shared.check_exists(&self.reply_to).await?;
        self.shared.send(&self.reply_to, &response, &[]).await
    }
}

#[async_trait]
impl Requester for KafkaBroker {
    async fn request(&self, topic: &str, request: Envelope, timeout: Duration) -> Result<Envelope> {
        self.inbox
            .request(&self.shared, topic, request, timeout)
            .await
    }
}

#[async_trait]
impl Responder for KafkaBroker {
    async fn serve(&self, topic: &str, options: ServeOptions) -> Result<Requests> {
        let group = options
            .group
            .unwrap_or_else(|| names::responder_group(topic));
        let mut spec = self.spec(topic, group.clone(), Some(group), Start::Latest, None);
        spec.retries = false;
        let source = source::open(&self.shared, spec).await?;
        Ok(Requests::new(Box::new(KafkaRequests {
            shared: self.shared.clone(),
            source,
        })))
    }
}
