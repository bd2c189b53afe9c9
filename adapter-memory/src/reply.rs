//! Native request-reply: responder groups and the requests waiting for them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bus_core::{
    async_trait, Envelope, Error, ErrorKind, Reply, Request, RequestSource, Requester, Requests,
    Responder, Result, ServeOptions,
};
use tokio::sync::mpsc;

use crate::broker::Inner;
use crate::MemoryBroker;

/// A request in a responder group's channel, with the way back to its requester.
#[derive(Debug)]
struct Pending {
    envelope: Envelope,
    reply_to: mpsc::Sender<Envelope>,
}

#[derive(Debug)]
struct Group {
    sender: async_channel::Sender<Pending>,
    receiver: async_channel::Receiver<Pending>,
    members: usize,
}

/// topic → responder group → channel.
#[derive(Debug, Default)]
pub(crate) struct Responders {
    topics: Mutex<HashMap<String, HashMap<String, Group>>>,
}

const DEFAULT_GROUP: &str = "default";

impl Responders {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, HashMap<String, Group>>> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn join(&self, topic: &str, group: &str, capacity: usize) -> async_channel::Receiver<Pending> {
        let mut topics = self.lock();
        let group = topics
            .entry(topic.to_owned())
            .or_default()
            .entry(group.to_owned())
            .or_insert_with(|| {
                let (sender, receiver) = async_channel::bounded(capacity);
                Group {
                    sender,
                    receiver,
                    members: 0,
                }
            });
        group.members += 1;
        group.receiver.clone()
    }

    fn leave(&self, topic: &str, group: &str) {
        let mut topics = self.lock();
        let Some(groups) = topics.get_mut(topic) else {
            return;
        };
        if let Some(g) = groups.get_mut(group) {
            g.members -= 1;
            if g.members == 0 {
                // Dropping the channel drops the requests still in it, and with them their
                // way back: those requesters learn at once that nobody will answer.
                g.receiver.close();
                groups.remove(group);
            }
        }
        if groups.is_empty() {
            topics.remove(topic);
        }
    }

    fn senders(&self, topic: &str) -> Vec<async_channel::Sender<Pending>> {
        self.lock()
            .get(topic)
            .map(|groups| groups.values().map(|g| g.sender.clone()).collect())
            .unwrap_or_default()
    }

    pub(crate) fn clear(&self) {
        for groups in self.lock().drain().map(|(_, groups)| groups) {
            for group in groups.into_values() {
                group.receiver.close();
            }
        }
    }
}

#[async_trait]
impl Requester for MemoryBroker {
    async fn request(&self, topic: &str, request: Envelope, timeout: Duration) -> Result<Envelope> {
        let inner = self.inner();
        inner.closed.check()?;
        inner.validate(&request)?;
        let senders = inner.responders.senders(topic);
        if senders.is_empty() {
            return Err(no_responders(topic));
        }
        // Every responder group gets the request; the first reply wins.
        let (reply_to, mut replies) = mpsc::channel(senders.len());
        let work = async {
            for sender in &senders {
                let pending = Pending {
                    envelope: request.clone(),
                    reply_to: reply_to.clone(),
                };
                // A group that left in the meantime simply does not get it.
                let _ = sender.send(pending).await;
            }
            drop(reply_to);
            replies.recv().await
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => Err(Error::new(
                ErrorKind::NoResponders,
                format!("every responder of `{topic}` left or dropped the request unanswered"),
            )),
            Err(_) => Err(Error::timeout(format!(
                "no reply from `{topic}` within {timeout:?}"
            ))),
        }
    }
}

fn no_responders(topic: &str) -> Error {
    Error::new(
        ErrorKind::NoResponders,
        format!("nobody serves requests on `{topic}`"),
    )
}

#[async_trait]
impl Responder for MemoryBroker {
    async fn serve(&self, topic: &str, options: ServeOptions) -> Result<Requests> {
        let inner = self.inner().clone();
        inner.closed.check()?;
        let group = options.group.unwrap_or_else(|| DEFAULT_GROUP.to_owned());
        let receiver = inner.responders.join(topic, &group, inner.config.capacity);
        Ok(Requests::new(Box::new(Serving {
            inner,
            topic: topic.to_owned(),
            group,
            receiver: Some(receiver),
        })))
    }
}

#[derive(Debug)]
struct Serving {
    inner: Arc<Inner>,
    topic: String,
    group: String,
    /// `None` once left, so requests still queued are dropped and their requesters told.
    receiver: Option<async_channel::Receiver<Pending>>,
}

impl Serving {
    fn leave(&mut self) {
        if self.receiver.take().is_some() {
            self.inner.responders.leave(&self.topic, &self.group);
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.leave();
    }
}

#[async_trait]
impl RequestSource for Serving {
    async fn next(&mut self) -> Option<Result<Request>> {
        let receiver = self.receiver.as_ref()?;
        tokio::select! {
            pending = receiver.recv() => {
                let pending = pending.ok()?;
                Some(Ok(Request::new(
                    pending.envelope,
                    Box::new(MemoryReply {
                        inner: self.inner.clone(),
                        reply_to: pending.reply_to,
                    }),
                )))
            }
            () = self.inner.closed.wait() => None,
        }
    }

    async fn close(&mut self) -> Result<()> {
        self.leave();
        Ok(())
    }
}

#[derive(Debug)]
struct MemoryReply {
    inner: Arc<Inner>,
    reply_to: mpsc::Sender<Envelope>,
}

#[async_trait]
impl Reply for MemoryReply {
    async fn reply(&self, response: Envelope) -> Result<()> {
        self.inner.closed.check()?;
        self.inner.validate(&response)?;
        // A requester that timed out is gone; like a broker, drop the late reply quietly.
        let _ = self.reply_to.try_send(response);
        Ok(())
    }
}
