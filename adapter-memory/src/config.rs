//! Configuration of the in-process broker.

use std::time::Duration;

use bus_core::secrets::redact_url;
use bus_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use url::Url;

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

    /// The default configuration with the query parameters of a `memory://` URL applied
    /// (see [`apply_url`](MemoryConfig::apply_url)).
    ///
    /// ```
    /// use adapter_memory::MemoryConfig;
    /// let config = MemoryConfig::from_url("memory://?capacity=1000&max_headers=10")?;
    /// assert_eq!(config.capacity, 1000);
    /// assert_eq!(config.max_headers, Some(10));
    /// # Ok::<(), bus_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when the URL does not parse, or as
    /// [`apply_url`](MemoryConfig::apply_url).
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = Url::parse(url.trim()).map_err(|error| {
            Error::with_source(
                ErrorKind::Config,
                format!("invalid memory URL `{}`", redact_url(url)),
                error,
            )
        })?;
        Self::default().apply_url(&parsed)
    }

    /// Applies the query parameters of a `memory://` URL onto this configuration:
    /// `capacity`, `publish_timeout_ms`, `max_payload` and `max_headers`.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for another scheme, a host, port, path or fragment (every
    /// `memory://` connection is its own broker), an unknown or repeated parameter, or a bad
    /// value.
    pub fn apply_url(mut self, url: &Url) -> Result<Self> {
        if url.scheme() != "memory" {
            return Err(Error::config(format!(
                "`{}` is not a memory:// URL",
                redact_url(url.as_str())
            )));
        }
        let shown = redact_url(url.as_str());
        let has_host = url.host_str().is_some_and(|h| !h.is_empty());
        if has_host
            || url.port().is_some()
            || !matches!(url.path(), "" | "/")
            || url.fragment().is_some()
        {
            return Err(Error::config(format!(
                "`{shown}`: a memory:// URL takes only query parameters (no host, port, path or \
             fragment); every memory:// connection is its own in-process broker"
            )));
        }

        let mut seen = std::collections::BTreeSet::new();
        let mut unknown = Vec::new();
        for (name, value) in url.query_pairs() {
            if !seen.insert(name.clone().into_owned()) {
                return Err(Error::config(format!(
                    "`{shown}`: query parameter `{name}` is given more than once"
                )));
            }
            let number = |what: &str| -> Result<u64> {
                value.parse::<u64>().map_err(|error| {
                    Error::with_source(
                        ErrorKind::Config,
                        format!("`{shown}`: `{name}` must be {what}, got `{value}`"),
                        error,
                    )
                })
            };
            let size = |what: &str| -> Result<usize> {
                let n = number(what)?;
                usize::try_from(n).map_err(|error| {
                    Error::with_source(
                        ErrorKind::Config,
                        format!("`{shown}`: `{name}` is too large: {n}"),
                        error,
                    )
                })
            };
            match &*name {
                "capacity" => {
                    let capacity = size("a number of messages, at least 1")?;
                    if capacity == 0 {
                        return Err(Error::config(format!(
                            "`{shown}`: `capacity` must be at least 1"
                        )));
                    }
                    self = self.with_capacity(capacity);
                }
                "publish_timeout_ms" => {
                    self = self.with_publish_timeout(Duration::from_millis(number(
                        "a number of milliseconds",
                    )?));
                }
                "max_payload" => self = self.with_max_payload(size("a number of bytes")?),
                "max_headers" => self = self.with_max_headers(size("a number of headers")?),
                _ => unknown.push(format!("`{name}`")),
            }
        }
        if !unknown.is_empty() {
            return Err(Error::config(format!(
                "`{shown}`: unknown query parameter{} {}; a memory:// URL takes capacity, \
             publish_timeout_ms, max_payload and max_headers",
                if unknown.len() == 1 { "" } else { "s" },
                unknown.join(", ")
            )));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<MemoryConfig> {
        MemoryConfig::from_url(url)
    }

    #[test]
    fn bare_url_is_the_default_config() {
        assert_eq!(parse("memory://").unwrap(), MemoryConfig::default());
        assert_eq!(parse("memory:///").unwrap(), MemoryConfig::default());
    }

    #[test]
    fn query_params_map_onto_the_config() {
        let config = parse(
            "memory://?capacity=1000&max_payload=262144&max_headers=10&publish_timeout_ms=250",
        )
        .unwrap();
        assert_eq!(
            config,
            MemoryConfig::default()
                .with_capacity(1000)
                .with_max_payload(262_144)
                .with_max_headers(10)
                .with_publish_timeout(Duration::from_millis(250))
        );
    }

    #[test]
    fn query_params_override_the_section() {
        let base = MemoryConfig::default().with_capacity(5).with_max_headers(3);
        let config = base
            .apply_url(&Url::parse("memory://?capacity=7").unwrap())
            .unwrap();
        assert_eq!(config.capacity, 7);
        assert_eq!(config.max_headers, Some(3));
    }

    #[test]
    fn unknown_params_are_named() {
        let err = parse("memory://?capacity=10&colour=blue&size=3").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let text = err.to_string();
        assert!(
            text.contains("unknown query parameters `colour`, `size`"),
            "{text}"
        );
    }

    #[test]
    fn bad_values_are_config_errors_with_the_parse_error_kept() {
        for url in [
            "memory://?capacity=lots",
            "memory://?capacity=0",
            "memory://?max_payload=-1",
            "memory://?capacity=1&capacity=2",
            "memory://somehost",
            "memory://?max_headers=99999999999999999999999",
        ] {
            let err = parse(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{url}: {err}");
        }
        let err = parse("memory://?capacity=lots").unwrap_err();
        assert!(err.to_string().contains("`capacity` must be"), "{err}");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn another_scheme_is_refused() {
        let err = MemoryConfig::from_url("nats://127.0.0.1:4222").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("not a memory:// URL"), "{err}");
    }
}
