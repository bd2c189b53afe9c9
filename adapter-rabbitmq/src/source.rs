//! The queue source that subscriptions, queue consumers and responders read from: a consumer
//! on its own channel, declared and re-attached after a connection loss, handing out raw
//! deliveries.

use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bus_core::{Error, ErrorKind, MessageId, Result};
use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::broker::{check_name, Inner};
use crate::error::map;
use crate::wire;

/// What a consumer reads from, and how to (re)declare it.
#[derive(Debug, Clone)]
pub(crate) enum Endpoint {
    /// A consumer group's durable queue on a topic.
    Group { topic: String, group: String },
    /// A private subscription: an exclusive, auto-deleted queue on a topic.
    Private { topic: String },
    /// A durable work queue.
    Queue { name: String },
    /// A responder group's auto-deleted queue on the request exchange.
    Responder { topic: String, group: String },
}

/// A consumer attached to its queue on its own channel.
pub(crate) struct Attached {
    pub(crate) channel: Channel,
    consumer: Consumer,
    /// Shared by every delivery's settlement, never copied per message.
    pub(crate) queue: Arc<str>,
    /// The connection the channel is on ([`Session::generation`](crate::link::Session)).
    generation: u64,
}

/// One delivery as lapin handed it out, with where it came from.
pub(crate) struct Raw {
    pub(crate) delivery: lapin::message::Delivery,
    /// The channel it came on, the only one that can settle it.
    pub(crate) channel: Channel,
    /// The queue it came from.
    pub(crate) queue: Arc<str>,
    /// The connection that channel is on.
    pub(crate) generation: u64,
}

impl Endpoint {
    async fn attach(&self, inner: &Inner, prefetch: u16) -> Result<Attached> {
        let session = inner.link.session().await?;
        let channel = session.channel().await?;
        channel
            .basic_qos(prefetch.max(1), BasicQosOptions::default())
            .await
            .map_err(|e| map(e, "setting the prefetch (basic.qos)"))?;
        let config = inner.config();
        let bind = |queue: String, exchange: String, topic: String| {
            let channel = channel.clone();
            async move {
                channel
                    .queue_bind(
                        &queue,
                        &exchange,
                        &wire::routing_key(&topic),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| map(e, &format!("binding queue `{queue}` to `{topic}`")))?;
                Ok::<String, Error>(queue)
            }
        };
        let queue = match self {
            Endpoint::Group { topic, group } => {
                let queue = wire::group_queue(topic, group);
                check_name(&queue, "group queue")?;
                crate::link::declare_queue(&channel, &queue, &inner.link.queue_args()).await?;
                bind(queue, config.topic_exchange.clone(), topic.clone()).await?
            }
            Endpoint::Private { topic } => {
                let declared = channel
                    .queue_declare(
                        "",
                        QueueDeclareOptions {
                            exclusive: true,
                            auto_delete: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| map(e, "declaring a private queue"))?;
                let queue = declared.name().as_str().to_owned();
                bind(queue, config.topic_exchange.clone(), topic.clone()).await?
            }
            Endpoint::Queue { name } => {
                check_name(name, "queue")?;
                crate::link::declare_queue(&channel, name, &inner.link.queue_args()).await?;
                name.clone()
            }
            Endpoint::Responder { topic, group } => {
                let queue = wire::responder_queue(topic, group);
                check_name(&queue, "responder queue")?;
                channel
                    .queue_declare(
                        &queue,
                        QueueDeclareOptions {
                            auto_delete: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| map(e, &format!("declaring queue `{queue}`")))?;
                bind(queue, config.request_exchange.clone(), topic.clone()).await?
            }
        };
        let tag = format!("bus-{}", MessageId::new());
        let consumer = channel
            .basic_consume(
                &queue,
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| map(e, &format!("consuming from `{queue}`")))?;
        Ok(Attached {
            channel,
            consumer,
            queue: queue.into(),
            generation: session.generation,
        })
    }
}

/// A consumer that re-attaches itself after the connection or channel was lost.
pub(crate) struct Source {
    inner: Arc<Inner>,
    pub(crate) endpoint: Endpoint,
    prefetch: u16,
    attached: Option<Attached>,
    attaching: Option<JoinHandle<Result<Attached>>>,
    closed: watch::Receiver<bool>,
    done: bool,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("endpoint", &self.endpoint)
            .field("prefetch", &self.prefetch)
            .field("queue", &self.attached.as_ref().map(|a| &*a.queue))
            .field("done", &self.done)
            .finish()
    }
}

impl Source {
    /// Attaches now, so that a group exists (and keeps messages) once `subscribe` returns.
    pub(crate) async fn open(inner: Arc<Inner>, endpoint: Endpoint, prefetch: u16) -> Result<Self> {
        inner.link.check()?;
        let attached = endpoint.attach(&inner, prefetch).await?;
        let closed = inner.link.closed_signal();
        Ok(Self {
            inner,
            endpoint,
            prefetch,
            attached: Some(attached),
            attaching: None,
            closed,
            done: false,
        })
    }

    pub(crate) fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }

    fn ended(&self) -> bool {
        self.done || self.inner.link.is_closed()
    }

    /// The next raw delivery with the channel, connection and queue it came from.
    ///
    /// Cancel safe: a re-attachment in progress runs in its own task and is picked up by the
    /// next call; lapin's consumer stream loses nothing when its `next` is dropped.
    pub(crate) async fn next_raw(&mut self) -> Option<Result<Raw>> {
        loop {
            if self.ended() {
                return None;
            }
            let mut closed = self.closed.clone();
            let Some(attached) = self.attached.as_mut() else {
                let inner = self.inner.clone();
                let endpoint = self.endpoint.clone();
                let prefetch = self.prefetch;
                let task = self.attaching.get_or_insert_with(|| {
                    tokio::spawn(async move { endpoint.attach(&inner, prefetch).await })
                });
                let result = tokio::select! {
                    result = task => result,
                    _ = closed.wait_for(|c| *c) => return None,
                };
                self.attaching = None;
                match result {
                    Ok(Ok(attached)) => {
                        tracing::info!(queue = %attached.queue, "consumer re-attached");
                        self.attached = Some(attached);
                        continue;
                    }
                    Ok(Err(e)) if self.ended() || e.is_closed() => return None,
                    Ok(Err(e)) => return Some(Err(e)),
                    Err(join) => {
                        return Some(Err(Error::with_source(
                            ErrorKind::Other,
                            "re-attaching the consumer failed",
                            join,
                        )))
                    }
                }
            };
            let item = tokio::select! {
                item = attached.consumer.next() => item,
                _ = closed.wait_for(|c| *c) => return None,
            };
            match self.take(item) {
                Some(raw) => return Some(raw),
                None if self.ended() => return None,
                // Cancelled by the broker (queue deleted, node restarting) or the channel
                // closed: attach again.
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// A delivery lapin has buffered already, without waiting; `None` when there is none, or
    /// when the consumer is detached or ends here (the next [`next_raw`](Self::next_raw)
    /// attaches it again). lapin's stream is polled with a waker that does nothing: a source
    /// found empty is waited on through `next_raw`, whose poll registers the real one.
    pub(crate) fn try_next_raw(&mut self) -> Option<Result<Raw>> {
        if self.ended() {
            return None;
        }
        let attached = self.attached.as_mut()?;
        let mut cx = Context::from_waker(Waker::noop());
        let Poll::Ready(item) = attached.consumer.poll_next_unpin(&mut cx) else {
            return None;
        };
        self.take(item)
    }

    /// What one item of the attached consumer's stream hands out: a delivery, or the error
    /// that detached the consumer. `None` when the stream ended (the broker cancelled the
    /// consumer, or its channel closed: detached, to be attached again) or the source did.
    fn take(
        &mut self,
        item: Option<lapin::Result<lapin::message::Delivery>>,
    ) -> Option<Result<Raw>> {
        match item {
            Some(Ok(delivery)) => {
                let attached = self.attached.as_ref()?;
                Some(Ok(Raw {
                    delivery,
                    channel: attached.channel.clone(),
                    queue: attached.queue.clone(),
                    generation: attached.generation,
                }))
            }
            Some(Err(e)) => {
                self.attached = None;
                (!self.ended()).then(|| Err(map(e, "receiving (the consumer will re-attach)")))
            }
            None => {
                self.attached = None;
                None
            }
        }
    }

    /// Stops consuming; what lapin had already buffered goes back to the queue. The channel
    /// stays open while deliveries handed out are unsettled, so they can still be settled.
    pub(crate) async fn close(&mut self) -> Result<()> {
        self.done = true;
        if let Some(task) = self.attaching.take() {
            task.abort();
        }
        if let Some(mut attached) = self.attached.take() {
            let tag = attached.consumer.tag();
            if attached.channel.status().connected() {
                let _ = attached
                    .channel
                    .basic_cancel(tag.as_str(), BasicCancelOptions::default())
                    .await;
                let drain = async {
                    while let Some(Ok(d)) = attached.consumer.next().await {
                        let _ = attached
                            .channel
                            .basic_reject(d.delivery_tag, BasicRejectOptions { requeue: true })
                            .await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
            }
        }
        Ok(())
    }
}

pub(crate) fn prefetch(asked: Option<usize>, default: u16) -> u16 {
    asked.map_or(default, |n| u16::try_from(n).unwrap_or(u16::MAX).max(1))
}
