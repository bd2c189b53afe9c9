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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            publish_timeout_ms: 5_000,
            max_payload: None,
            max_headers: None,
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

    /// The publish timeout as a [`Duration`].
    #[must_use]
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}
