//! Dead-lettering in the handler pipeline, for adapters without their own.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tower_layer::Layer;

use super::{mark, DeadLetterInfo};
use crate::runtime::{Handler, Outcome};
use crate::{headers, Delivery, Error, ErrorKind, Queue};

/// A [`Layer`] that wraps a handler in [`DeadLettering`].
#[derive(Clone)]
pub struct DeadLetterLayer {
    queue: Arc<dyn Queue>,
}

impl DeadLetterLayer {
    /// Dead letters are sent through `queue` (usually the same broker connection).
    #[must_use]
    pub fn new(queue: Arc<dyn Queue>) -> Self {
        Self { queue }
    }
}

impl fmt::Debug for DeadLetterLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterLayer").finish_non_exhaustive()
    }
}

impl<H> Layer<H> for DeadLetterLayer {
    type Service = DeadLettering<H>;

    fn layer(&self, inner: H) -> DeadLettering<H> {
        DeadLettering {
            inner,
            queue: self.queue.clone(),
        }
    }
}

/// A handler that turns its inner handler's [`Outcome::Reject`] into a message on the
/// dead-letter queue (with the dead-letter headers) and an acknowledgement of the original.
///
/// If the dead letter cannot be sent, the original is retried instead, so nothing is lost.
pub struct DeadLettering<H> {
    inner: H,
    queue: Arc<dyn Queue>,
}

impl<H: fmt::Debug> fmt::Debug for DeadLettering<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLettering")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// How long to wait before retrying a message whose dead letter could not be sent.
const SEND_FAILED_RETRY: Duration = Duration::from_secs(1);

#[async_trait]
impl<H: Handler> Handler for DeadLettering<H> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let error = match self.inner.handle(delivery).await {
            Outcome::Reject { error } => error,
            other => return other,
        };
        let reason = error.to_string();
        let dead = mark(
            delivery.envelope().clone(),
            &DeadLetterInfo {
                reason: &reason,
                source: delivery.source(),
                group: delivery.group(),
                attempts: delivery.attempt(),
                first_failure: None,
            },
        );
        let dlq = headers::dead_letter_queue(delivery.source());
        match self.queue.send(&dlq, dead).await {
            Ok(()) => Outcome::Ack,
            Err(send_error) => {
                tracing::warn!(%send_error, %dlq, "dead letter not sent; the message will be retried");
                Outcome::retry_after(
                    SEND_FAILED_RETRY,
                    Error::with_source(
                        ErrorKind::Handler,
                        format!("could not dead-letter to `{dlq}` ({error})"),
                        send_error,
                    ),
                )
            }
        }
    }
}
