//! Native request-reply: requests on core NATS with a reply inbox, responders in queue groups.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use bus_core::{
    async_trait, Envelope, Error, ErrorKind, Reply, Request, RequestSource, Requester, Requests,
    Responder, Result, ServeOptions,
};
use futures::StreamExt;
use tokio::sync::watch;

use crate::broker::Inner;
use crate::{error, names, wire, NatsBroker};

/// The queue group of responders that name none.
const DEFAULT_GROUP: &str = "default";

#[async_trait]
impl Requester for NatsBroker {
    async fn request(&self, topic: &str, request: Envelope, timeout: Duration) -> Result<Envelope> {
        let inner = &self.inner;
        inner.check()?;
        let headers = wire::encode(&request, &inner.config.source)?;
        inner.check_size(&headers, request.payload.len())?;
        let subject = inner.names.request_subject(topic);
        let reply = inner
            .client
            .send_request(
                subject,
                async_nats::Request::new()
                    .payload(request.payload.clone())
                    .headers(headers)
                    .timeout(Some(timeout)),
            )
            .await
            .map_err(|e| error::request(e, topic, timeout))?;
        let received = wire::decode(
            reply.headers.as_ref(),
            reply.status.map(|s| (s, reply.description.as_deref())),
            reply.payload,
            wire::Defaults {
                stored: None,
                kind: topic,
                time: None,
            },
        );
        match received.undecodable {
            None => Ok(received.envelope),
            Some(reason) => Err(Error::new(
                ErrorKind::Serialization,
                format!("the reply to a request on `{topic}` is undecodable: {reason}"),
            )),
        }
    }
}

#[async_trait]
impl Responder for NatsBroker {
    async fn serve(&self, topic: &str, options: ServeOptions) -> Result<Requests> {
        let inner = &self.inner;
        inner.check()?;
        let subject = inner.names.request_subject(topic);
        let group = names::encode(options.group.as_deref().unwrap_or(DEFAULT_GROUP));
        let subscriber = inner
            .client
            .queue_subscribe(subject.clone(), group)
            .await
            .map_err(|e| error::subscribe(e, &subject))?;
        inner.confirm_subscription(&subject).await?;
        Ok(Requests::new(Box::new(Serving {
            inner: inner.clone(),
            closed: inner.closed_signal(),
            topic: topic.to_owned(),
            subscriber: Some(subscriber),
        })))
    }
}

struct Serving {
    inner: Arc<Inner>,
    closed: watch::Receiver<bool>,
    topic: String,
    subscriber: Option<async_nats::Subscriber>,
}

impl fmt::Debug for Serving {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serving")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RequestSource for Serving {
    async fn next(&mut self) -> Option<Result<Request>> {
        loop {
            if self.inner.is_closed() {
                return None;
            }
            let subscriber = self.subscriber.as_mut()?;
            let message = tokio::select! {
                message = subscriber.next() => message?,
                _ = self.closed.wait_for(|closed| *closed) => return None,
            };
            // A message without a reply subject is not a request: nobody could get an answer.
            let Some(reply_to) = message.reply else {
                continue;
            };
            // A request `bus` cannot read is still handed over (there is no dead-letter queue
            // for requests): the responder sees what could be read of it.
            let envelope = wire::decode(
                message.headers.as_ref(),
                None,
                message.payload,
                wire::Defaults {
                    stored: None,
                    kind: &self.topic,
                    time: None,
                },
            )
            .envelope;
            return Some(Ok(Request::new(
                envelope,
                Box::new(NatsReply {
                    inner: self.inner.clone(),
                    reply_to,
                }),
            )));
        }
    }

    async fn close(&mut self) -> Result<()> {
        if let Some(mut subscriber) = self.subscriber.take() {
            let _ = subscriber.unsubscribe().await;
        }
        Ok(())
    }
}

struct NatsReply {
    inner: Arc<Inner>,
    reply_to: Subject,
}

impl fmt::Debug for NatsReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsReply")
            .field("reply_to", &self.reply_to)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Reply for NatsReply {
    async fn reply(&self, response: Envelope) -> Result<()> {
        let inner = &self.inner;
        inner.check()?;
        let headers = wire::encode(&response, &inner.config.source)?;
        inner.check_size(&headers, response.payload.len())?;
        inner
            .client
            .publish_with_headers(self.reply_to.clone(), headers, response.payload.clone())
            .await
            .map_err(|e| error::core_publish(e, self.reply_to.as_str()))
    }
}
