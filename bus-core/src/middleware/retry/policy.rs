//! How often, and how long apart, a failing message is tried.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::Error;

type Predicate = Arc<dyn Fn(&Error) -> bool + Send + Sync>;

/// The retry policy: immediate retries inside one delivery, then redeliveries through the
/// broker with exponential backoff and jitter, then the dead-letter queue.
///
/// Two levels, so that each is easy to reason about:
/// - **Immediate retries** run the handler again at once, in process, a few times with a
///   short pause (default: 2 retries, 50 ms apart, jittered). They absorb blips without
///   broker round trips. They hold one of the consumer's concurrency slots while they pause,
///   never the other keys.
/// - **Redeliveries**: when the immediate retries are used up, the outcome asks for a retry
///   after a delay that grows with the delivery's [`attempt`](crate::Delivery::attempt)
///   (default: 200 ms doubling up to 5 min, jittered). The [`Consumer`](crate::Consumer) runs
///   it again after that delay, in place with its key waiting
///   ([`KeyOrder::Ordered`](crate::runtime::KeyOrder::Ordered)) or through the broker
///   ([`KeyOrder::Unordered`](crate::runtime::KeyOrder::Unordered)); either way as the next
///   attempt. After [`max_deliveries`](RetryPolicy::max_deliveries) attempts (default 5) the
///   message is rejected, which dead-letters it.
///
/// Errors the predicate calls permanent (by default those that are not
/// [`Error::is_retryable`]) are rejected at once, without retries.
///
/// So a message whose handler always fails transiently runs
/// `max_deliveries × (1 + immediate_retries)` times, then lands in the dead-letter queue with
/// `max_deliveries` as its attempt count.
#[derive(Clone)]
pub struct RetryPolicy {
    immediate_retries: u32,
    immediate_delay: Duration,
    max_deliveries: u32,
    backoff: ExponentialBuilder,
    retryable: Predicate,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            immediate_retries: 2,
            immediate_delay: Duration::from_millis(50),
            max_deliveries: 5,
            backoff: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_factor(2.0)
                .with_max_delay(Duration::from_secs(300))
                .with_jitter()
                .without_max_times(),
            retryable: Arc::new(Error::is_retryable),
        }
    }
}

impl RetryPolicy {
    /// The default policy (see the type's docs).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets how many times the handler is run again at once within one delivery, and the
    /// pause between those runs (jittered by up to the same amount).
    #[must_use]
    pub fn with_immediate_retries(mut self, retries: u32, pause: Duration) -> Self {
        self.immediate_retries = retries;
        self.immediate_delay = pause;
        self
    }

    /// Sets how many deliveries a message gets before it is dead-lettered (at least 1).
    #[must_use]
    pub fn with_max_deliveries(mut self, deliveries: u32) -> Self {
        self.max_deliveries = deliveries.max(1);
        self
    }

    /// Sets the redelivery backoff: the delay after the first delivery is `min`, then it grows
    /// by `factor` up to `max`, each with jitter.
    #[must_use]
    pub fn with_backoff(mut self, min: Duration, factor: f32, max: Duration) -> Self {
        self.backoff = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_factor(factor)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        self
    }

    /// Sets which errors are worth retrying; the others are dead-lettered at once.
    #[must_use]
    pub fn with_retryable(
        mut self,
        predicate: impl Fn(&Error) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.retryable = Arc::new(predicate);
        self
    }

    /// How many immediate retries one delivery gets.
    #[must_use]
    pub fn immediate_retries(&self) -> u32 {
        self.immediate_retries
    }

    /// How many deliveries a message gets before it is dead-lettered.
    #[must_use]
    pub fn max_deliveries(&self) -> u32 {
        self.max_deliveries
    }

    /// Whether `error` is worth retrying.
    #[must_use]
    pub fn is_retryable(&self, error: &Error) -> bool {
        (self.retryable)(error)
    }

    /// The pause before immediate retry number `retry` (1-based), with jitter.
    #[must_use]
    pub fn immediate_pause(&self, retry: u32) -> Duration {
        let _ = retry;
        self.immediate_delay + self.immediate_delay.mul_f64(fastrand::f64())
    }

    /// The redelivery delay after delivery `attempt` failed (1-based), with jitter.
    #[must_use]
    pub fn redelivery_delay(&self, attempt: u32) -> Duration {
        let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .build()
            .nth(index)
            .unwrap_or(Duration::from_secs(300))
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("immediate_retries", &self.immediate_retries)
            .field("immediate_delay", &self.immediate_delay)
            .field("max_deliveries", &self.max_deliveries)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivery_delays_grow_within_their_bounds() {
        let policy = RetryPolicy::new().with_backoff(
            Duration::from_millis(100),
            2.0,
            Duration::from_secs(1),
        );
        for _ in 0..20 {
            let first = policy.redelivery_delay(1);
            assert!(
                first >= Duration::from_millis(100) && first <= Duration::from_millis(200),
                "{first:?}"
            );
            let third = policy.redelivery_delay(3);
            assert!(
                third >= Duration::from_millis(400) && third <= Duration::from_millis(800),
                "{third:?}"
            );
            let late = policy.redelivery_delay(40);
            assert!(late <= Duration::from_secs(2), "{late:?}");
        }
    }

    #[test]
    fn only_retryable_errors_are_retried_by_default() {
        let policy = RetryPolicy::new();
        assert!(policy.is_retryable(&Error::timeout("slow")));
        assert!(!policy.is_retryable(&Error::new(crate::ErrorKind::Serialization, "garbage")));
    }
}
