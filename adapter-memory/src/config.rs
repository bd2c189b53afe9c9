//! Configuration of the in-process broker.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the memory broker buffers messages and which broker limits it imitates.
///
/// ```
/// use adapter_memory::MemoryConfig;
/// // Behave like SQS on payload size and attribute count.
/// let config = MemoryConfig::default()
///     .with_max_payload(256 * 1024)
///     .with_max_headers(10);
/// assert_eq!(config.capacity, 10_000);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// The most messages one consumer group or queue holds (waiting plus unsettled). A publish
    /// to a full group waits for room; memory never grows without bound.
    pub capacity: usize,
    /// How long a publish waits for room before failing with
    /// [`ErrorKind::Backpressure`](bus_core::ErrorKind::Backpressure), in milliseconds.
    pub publish_timeout_ms: u64,
    /// The largest payload accepted, in bytes; larger ones fail with
    /// [`ErrorKind::PayloadTooLarge`](bus_core::ErrorKind::PayloadTooLarge). `None`: no limit.
    pub max_payload: Option<usize>,
    /// The most headers a message may carry; more fail with
    /// [`ErrorKind::HeadersTooLarge`](bus_core::ErrorKind::HeadersTooLarge). `None`: no limit.
    pub max_headers: Option<usize>,
    /// Faults to inject, so handlers can be proven idempotent and order-safe in tests.
    /// `None` (the default): a well-behaved broker.
    pub chaos: Option<Chaos>,
}

/// Faults the memory broker injects at given rates (each a probability from 0.0 to 1.0).
///
/// Every fault is one a real broker may produce under at-least-once delivery; none loses a
/// message or breaks per-key order.
///
/// ```
/// use adapter_memory::{Chaos, MemoryConfig};
/// let config = MemoryConfig::default().with_chaos(
///     Chaos::default()
///         .with_duplicate_rate(0.1)
///         .with_redeliver_rate(0.05)
///         .with_delay_rate(0.2, std::time::Duration::from_millis(20))
///         .with_seed(7),
/// );
/// assert!(config.chaos.is_some());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Chaos {
    /// How often a published message is stored twice (the publisher's retry after a lost
    /// confirm): the group gets two deliveries with the same id.
    pub duplicate_rate: f64,
    /// How often an acknowledgement is lost: the acked message comes again, as the next
    /// attempt.
    pub redeliver_rate: f64,
    /// How often a published message is held back before it becomes deliverable.
    pub delay_rate: f64,
    /// The longest such hold, in milliseconds (each is uniform up to it).
    pub max_delay_ms: u64,
    /// Seed of the random source, for reproducible runs. `None`: random.
    pub seed: Option<u64>,
}

impl Chaos {
    /// Sets [`duplicate_rate`](Chaos::duplicate_rate).
    #[must_use]
    pub fn with_duplicate_rate(mut self, rate: f64) -> Self {
        self.duplicate_rate = rate.clamp(0.0, 1.0);
        self
    }

    /// Sets [`redeliver_rate`](Chaos::redeliver_rate).
    #[must_use]
    pub fn with_redeliver_rate(mut self, rate: f64) -> Self {
        self.redeliver_rate = rate.clamp(0.0, 1.0);
        self
    }

    /// Sets [`delay_rate`](Chaos::delay_rate) and the longest delay.
    #[must_use]
    pub fn with_delay_rate(mut self, rate: f64, max_delay: Duration) -> Self {
        self.delay_rate = rate.clamp(0.0, 1.0);
        self.max_delay_ms = u64::try_from(max_delay.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Sets the seed.
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            publish_timeout_ms: 5_000,
            max_payload: None,
            max_headers: None,
            chaos: None,
        }
    }
}

impl MemoryConfig {
    /// Sets [`capacity`](MemoryConfig::capacity) (at least 1).
    #[must_use]
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// Sets how long a publish waits for room.
    #[must_use]
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Sets the payload limit, in bytes.
    #[must_use]
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = Some(bytes);
        self
    }

    /// Sets the header count limit.
    #[must_use]
    pub fn with_max_headers(mut self, count: usize) -> Self {
        self.max_headers = Some(count);
        self
    }

    /// Turns on fault injection.
    #[must_use]
    pub fn with_chaos(mut self, chaos: Chaos) -> Self {
        self.chaos = Some(chaos);
        self
    }

    /// The publish timeout as a [`Duration`].
    #[must_use]
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}
