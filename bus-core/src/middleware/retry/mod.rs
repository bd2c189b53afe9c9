//! Retries: immediate retries in process, then broker redeliveries with backoff, then the
//! dead-letter queue.
//!
//! The flow of one failing message, with the default [`RetryPolicy`] (2 immediate retries,
//! 5 deliveries):
//!
//! 1. attempt 1: the handler runs, fails with a retryable error, runs twice more at once
//!    (immediate retries); still failing, the outcome is [`Outcome::Retry`] with a delay of
//!    about 200 ms. The [`Consumer`](crate::Consumer) runs it again after that delay: in place,
//!    its key waiting behind it, where it keeps per-key order
//!    ([`KeyOrder::Ordered`](crate::runtime::KeyOrder::Ordered)), or by nacking it to the
//!    broker with that delay ([`KeyOrder::Unordered`](crate::runtime::KeyOrder::Unordered));
//! 2. attempts 2 to 4: the same, the delay doubling each time;
//! 3. attempt 5 (the last): still failing, the outcome becomes [`Outcome::Reject`], and the
//!    consumer rejects: the message moves to the dead-letter queue with its reason and attempt
//!    count (see [`dead_letter`](crate::middleware::dead_letter)).
//!
//! A delivery whose attempt is already past the policy's last (the broker counted deliveries
//! that ended unsettled, e.g. because the handler crashed the process) is rejected without
//! running the handler, so a message that kills its consumer still reaches the dead-letter
//! queue. A permanent error (not retryable by the policy's predicate) is rejected on the spot. A
//! handler that itself returns `Reject` is never retried.  A handler (or inner layer) that returns
//! `Retry` with a delay skips the immediate retries: it wants the broker to wait.
//!
//! ```
//! use std::time::Duration;
//! use bus_core::middleware::{RetryLayer, RetryPolicy};
//! use bus_core::runtime::{handler_fn, DeliveryInfo};
//! use bus_core::Envelope;
//! use tower_layer::Layer;
//!
//! let policy = RetryPolicy::new()
//!     .with_immediate_retries(1, Duration::from_millis(20))
//!     .with_max_deliveries(3);
//! let handler = RetryLayer::new(policy).layer(handler_fn(|_: Envelope, _: DeliveryInfo| async {}));
//! # let _ = handler;
//! ```

mod policy;

use async_trait::async_trait;
use tower_layer::Layer;

pub use policy::RetryPolicy;

use crate::runtime::{Handler, Outcome};
use crate::{Delivery, Error, ErrorKind};

/// A [`Layer`] that wraps a handler in [`Retry`].
#[derive(Debug, Clone, Default)]
pub struct RetryLayer {
    policy: RetryPolicy,
}

impl RetryLayer {
    /// Retries as `policy` says.
    #[must_use]
    pub fn new(policy: RetryPolicy) -> Self {
        Self { policy }
    }
}

impl<H> Layer<H> for RetryLayer {
    type Service = Retry<H>;

    fn layer(&self, inner: H) -> Retry<H> {
        Retry {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// A handler that retries its inner handler as its [`RetryPolicy`] says.
#[derive(Debug, Clone)]
pub struct Retry<H> {
    inner: H,
    policy: RetryPolicy,
}

impl<H> Retry<H> {
    /// Wraps `inner` with `policy`.
    pub fn new(inner: H, policy: RetryPolicy) -> Self {
        Self { inner, policy }
    }

    /// The policy.
    #[must_use]
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

#[async_trait]
impl<H: Handler> Handler for Retry<H> {
    async fn handle(&self, delivery: &Delivery) -> Outcome {
        let attempt = delivery.attempt();
        if attempt > self.policy.max_deliveries() {
            // Past the last delivery without having been settled: the earlier ones ended
            // without an outcome, most likely because the handler took the process down. Running
            // it again would do the same, for ever.
            let max = self.policy.max_deliveries();
            tracing::warn!(message_id = %delivery.envelope().id, attempt, max, "delivered past the policy's last attempt: dead-lettering without running the handler");
            return Outcome::reject(Error::new(
                ErrorKind::Handler,
                format!(
                    "gave up after {max} deliveries: delivery {attempt} came after the earlier \
                     ones ended unsettled (did the handler take the consumer down?)"
                ),
            ));
        }
        let mut immediate = 0;
        loop {
            let (asked_after, error) = match self.inner.handle(delivery).await {
                Outcome::Retry { after, error } => (after, error),
                other => return other,
            };
            if !self.policy.is_retryable(&error) {
                tracing::debug!(message_id = %delivery.envelope().id, %error, "permanent failure: dead-lettering");
                return Outcome::reject(error);
            }
            // A handler (or an inner layer) that asks for a delay wants the broker to wait.
            if asked_after.is_none() && immediate < self.policy.immediate_retries() {
                immediate += 1;
                tokio::time::sleep(self.policy.immediate_pause(immediate)).await;
                continue;
            }
            let attempt = delivery.attempt();
            if attempt >= self.policy.max_deliveries() {
                tracing::debug!(message_id = %delivery.envelope().id, attempt, %error, "out of deliveries: dead-lettering");
                let reason = format!("gave up after {attempt} deliveries: {}", error.message());
                return Outcome::reject(Error::with_source(error.kind(), reason, error));
            }
            let after = asked_after
                .unwrap_or_default()
                .max(self.policy.redelivery_delay(attempt));
            return Outcome::retry_after(after, error);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::runtime::{handler_fn, DeliveryInfo};
    use crate::{Envelope, Result, Settle, Settlement};

    #[derive(Debug)]
    struct Unsettled;

    #[async_trait]
    impl Settle for Unsettled {
        async fn settle(&self, _: Settlement) -> Result<()> {
            Ok(())
        }
        fn abandon(&self) {}
    }

    #[tokio::test]
    async fn a_delivery_past_the_last_attempt_is_rejected_without_running_the_handler() {
        let runs = Arc::new(AtomicU32::new(0));
        let handler =
            RetryLayer::new(RetryPolicy::new().with_max_deliveries(3)).layer(handler_fn({
                let runs = runs.clone();
                move |_: Envelope, _: DeliveryInfo| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    async {}
                }
            }));
        let delivery = |attempt| {
            Delivery::new(
                Envelope::new("k", "p"),
                attempt,
                "t",
                None,
                Box::new(Unsettled),
            )
        };
        assert!(handler.handle(&delivery(3)).await.is_ack());
        let outcome = handler.handle(&delivery(4)).await;
        assert!(outcome.is_reject(), "{outcome:?}");
        let reason = outcome.error().unwrap().message().to_owned();
        assert!(reason.contains("gave up after 3 deliveries"), "{reason}");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
