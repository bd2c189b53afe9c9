//! Moving dead letters back where they came from.

use std::time::Duration;

use super::unmark;
use crate::{headers, Broker, ConsumeOptions, Envelope, Error, Result};

/// Where redriven messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Topic(String),
    Queue(String),
}

/// Moves the messages of a dead-letter queue back to their topic or queue.
///
/// Each dead letter is sent back without its dead-letter headers (same id, kind, key,
/// correlation and causation ids, payload) and acknowledged on the dead-letter queue only
/// after the send succeeded: a crash in between leaves a duplicate, never a loss. A redriven
/// message starts again at attempt 1.
///
/// On a topic, every consumer group receives the redriven message again, not only the group
/// that dead-lettered it (its [`headers::DLQ_GROUP`] is in the dead letter for you to filter
/// on); make handlers idempotent (see the idempotency middleware) where that matters.
///
/// ```no_run
/// # async fn run(broker: &dyn bus_core::Broker) -> bus_core::Result<()> {
/// use bus_core::middleware::dead_letter::Redrive;
/// let report = Redrive::topic("orders").with_limit(1_000).run(broker).await?;
/// println!("moved {} dead letters back to orders", report.moved);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Redrive {
    target: Target,
    limit: Option<usize>,
    idle: Duration,
}

/// What a [`Redrive`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RedriveReport {
    /// How many dead letters were moved back.
    pub moved: usize,
}

impl Redrive {
    /// Redrives `<topic>.dlq` to `topic` (published: every group receives it).
    #[must_use]
    pub fn topic(topic: impl Into<String>) -> Self {
        Self::new(Target::Topic(topic.into()))
    }

    /// Redrives `<queue>.dlq` to `queue`.
    #[must_use]
    pub fn queue(queue: impl Into<String>) -> Self {
        Self::new(Target::Queue(queue.into()))
    }

    fn new(target: Target) -> Self {
        Self {
            target,
            limit: None,
            idle: Duration::from_secs(1),
        }
    }

    /// Moves at most `limit` messages.
    #[must_use]
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Stops once no dead letter arrived for `idle` (default 1 s).
    #[must_use]
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// Sends one dead letter back to the target without its dead-letter headers: the step
    /// [`run`](Redrive::run) takes for each, for callers that choose which dead letters to
    /// move (such as the `bus dlq redrive` command). The caller acknowledges the dead letter
    /// only after this succeeded.
    ///
    /// # Errors
    /// As [`Publisher::publish`](crate::Publisher::publish) or
    /// [`Queue::send`](crate::Queue::send).
    pub async fn send_back(&self, broker: &dyn Broker, dead_letter: &Envelope) -> Result<()> {
        let envelope = unmark(dead_letter.clone());
        match &self.target {
            Target::Topic(topic) => broker.publish(topic, envelope).await,
            Target::Queue(queue) => broker.send(queue, envelope).await,
        }
    }

    /// Runs the redrive on `broker`.
    ///
    /// # Errors
    /// When the dead-letter queue cannot be consumed, or a message cannot be sent back (the
    /// messages moved until then stay moved; the failing one stays in the dead-letter queue).
    ///
    /// # Cancel safety
    /// If the future is dropped, the message being moved may be both back and still in the
    /// dead-letter queue (a duplicate), never lost.
    pub async fn run(&self, broker: &dyn Broker) -> Result<RedriveReport> {
        let name = match &self.target {
            Target::Topic(name) | Target::Queue(name) => name,
        };
        let dlq = headers::dead_letter_queue(name);
        let mut dead_letters = broker.consume(&dlq, ConsumeOptions::default()).await?;
        let mut report = RedriveReport::default();
        while self.limit.is_none_or(|limit| report.moved < limit) {
            let delivery = match tokio::time::timeout(self.idle, dead_letters.next()).await {
                Err(_) | Ok(None) => break,
                Ok(Some(delivery)) => delivery?,
            };
            let sent = self.send_back(broker, delivery.envelope()).await;
            // On failure the delivery is dropped unsettled: it stays in the dead-letter queue.
            sent.map_err(|e| redrive_failed(&dlq, report.moved, e))?;
            delivery.ack().await.map_err(Error::from)?;
            report.moved += 1;
        }
        dead_letters.close().await?;
        Ok(report)
    }
}

fn redrive_failed(dlq: &str, moved: usize, error: Error) -> Error {
    Error::with_source(
        error.kind(),
        format!("redrive from `{dlq}` stopped after {moved} messages"),
        error,
    )
}
