//! Configuration of the RabbitMQ adapter.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use lapin::ConnectionProperties;
use serde::{Deserialize, Serialize};

/// A function that adjusts lapin's [`ConnectionProperties`] before connecting: the escape
/// hatch to everything this configuration does not name (client properties, executors, …).
pub type PropertiesHook = Arc<dyn Fn(ConnectionProperties) -> ConnectionProperties + Send + Sync>;

/// How to reach RabbitMQ and how to use it.
///
/// Reads through serde (a `[rabbitmq]` section of `BusConfig`); the URL carries the address,
/// credentials, virtual host and TLS (`amqps://`). The password never appears in `Debug`
/// output or in logs.
///
/// ```
/// use adapter_rabbitmq::RabbitMqConfig;
/// let config = RabbitMqConfig::new("amqp://app:s3cret@127.0.0.1:5672/%2f")
///     .with_prefetch(50)
///     .with_quorum_queues(true)
///     .with_connection_name("billing-service");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RabbitMqConfig {
    /// `amqp://user:password@host:port/vhost` (vhost `%2f` is `/`), or `amqps://` for TLS.
    /// lapin's own query parameters (`heartbeat`, `frame_max`, `channel_max`,
    /// `connection_timeout`, `auth_mechanism`) are passed through.
    pub url: String,
    /// The connection name shown in RabbitMQ's management UI and logs.
    pub connection_name: Option<String>,
    /// How many unsettled deliveries a subscription holds by default (`basic.qos`), when its
    /// options name none.
    pub prefetch: u16,
    /// Declare consumer-group queues and work queues as quorum queues (replicated, and
    /// required by some clusters) instead of classic queues. Fixed per queue at its first
    /// declaration: RabbitMQ refuses to redeclare a queue with another type.
    pub quorum_queues: bool,
    /// How long a publish waits for the broker's confirm, in milliseconds.
    pub confirm_timeout_ms: u64,
    /// How long an operation waits for the connection to come back after it was lost, in
    /// milliseconds, before failing with a retryable connection error.
    pub reconnect_timeout_ms: u64,
    /// The largest payload accepted, in bytes. Larger messages fail with `PayloadTooLarge`
    /// before they are sent. Match it to the broker's `max_message_size` (128 MiB by default on
    /// RabbitMQ 3.10), or set it lower.
    pub max_payload: usize,
    /// The topic exchange every topic is published to.
    pub topic_exchange: String,
    /// The topic exchange requests are published to.
    pub request_exchange: String,
    /// Delete consumer-group and work queues that stayed unused (no consumer, no
    /// redeclaration) this long, in milliseconds (`x-expires`). `None`: kept until deleted.
    pub queue_expires_ms: Option<u64>,
    /// Adjusts lapin's connection properties (code only, not serde).
    #[serde(skip)]
    pub properties: Option<PropertiesHook>,
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            connection_name: None,
            prefetch: 100,
            quorum_queues: false,
            confirm_timeout_ms: 30_000,
            reconnect_timeout_ms: 10_000,
            max_payload: 128 * 1024 * 1024,
            topic_exchange: "bus.topics".to_owned(),
            request_exchange: "bus.requests".to_owned(),
            queue_expires_ms: None,
            properties: None,
        }
    }
}

impl PartialEq for RabbitMqConfig {
    fn eq(&self, other: &Self) -> bool {
        let hooks_equal = match (&self.properties, &other.properties) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        hooks_equal
            && self.url == other.url
            && self.connection_name == other.connection_name
            && self.prefetch == other.prefetch
            && self.quorum_queues == other.quorum_queues
            && self.confirm_timeout_ms == other.confirm_timeout_ms
            && self.reconnect_timeout_ms == other.reconnect_timeout_ms
            && self.max_payload == other.max_payload
            && self.topic_exchange == other.topic_exchange
            && self.request_exchange == other.request_exchange
            && self.queue_expires_ms == other.queue_expires_ms
    }
}

impl fmt::Debug for RabbitMqConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqConfig")
            .field("url", &redact(&self.url))
            .field("connection_name", &self.connection_name)
            .field("prefetch", &self.prefetch)
            .field("quorum_queues", &self.quorum_queues)
            .field("confirm_timeout_ms", &self.confirm_timeout_ms)
            .field("reconnect_timeout_ms", &self.reconnect_timeout_ms)
            .field("max_payload", &self.max_payload)
            .field("topic_exchange", &self.topic_exchange)
            .field("request_exchange", &self.request_exchange)
            .field("queue_expires_ms", &self.queue_expires_ms)
            .field("properties", &self.properties.as_ref().map(|_| "<hook>"))
            .finish()
    }
}

/// `url` with the password replaced by `***`, safe to print.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparseable>".to_owned();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

impl RabbitMqConfig {
    /// The default configuration with `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Sets the URL.
    #[must_use]
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Sets the connection name.
    #[must_use]
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Sets the default prefetch (at least 1).
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Declares group and work queues as quorum queues.
    #[must_use]
    pub fn with_quorum_queues(mut self, quorum: bool) -> Self {
        self.quorum_queues = quorum;
        self
    }

    /// Sets how long a publish waits for its confirm.
    #[must_use]
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout_ms = millis(timeout);
        self
    }

    /// Sets how long an operation waits for a lost connection to come back.
    #[must_use]
    pub fn with_reconnect_timeout(mut self, timeout: Duration) -> Self {
        self.reconnect_timeout_ms = millis(timeout);
        self
    }

    /// Sets the payload limit, in bytes.
    #[must_use]
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Deletes group and work queues left unused for `after` (`x-expires`).
    #[must_use]
    pub fn with_queue_expires(mut self, after: Duration) -> Self {
        self.queue_expires_ms = Some(millis(after));
        self
    }

    /// Adjusts lapin's [`ConnectionProperties`] before each connection attempt.
    ///
    /// ```
    /// use adapter_rabbitmq::RabbitMqConfig;
    /// let config = RabbitMqConfig::default().with_properties(|props| {
    ///     props.with_connection_name("custom".into())
    /// });
    /// assert!(config.properties.is_some());
    /// ```
    #[must_use]
    pub fn with_properties<F>(mut self, hook: F) -> Self
    where
        F: Fn(ConnectionProperties) -> ConnectionProperties + Send + Sync + 'static,
    {
        self.properties = Some(Arc::new(hook));
        self
    }

    pub(crate) fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.confirm_timeout_ms)
    }

    pub(crate) fn reconnect_timeout(&self) -> Duration {
        Duration::from_millis(self.reconnect_timeout_ms)
    }

    /// The URL without the password, for messages and logs.
    #[must_use]
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let config = RabbitMqConfig::new("amqps://app:hunter2@mq.example:5671/prod?heartbeat=10");
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(
            debug.contains("amqps://app:***@mq.example:5671/prod?heartbeat=10"),
            "{debug}"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
        assert_eq!(redact("garbage hunter2"), "<unparseable>");
    }

    #[test]
    fn serde_reads_a_section() {
        let config: RabbitMqConfig =
            serde_json::from_str(r#"{"prefetch":10,"quorum_queues":true}"#).unwrap();
        assert_eq!(config.prefetch, 10);
        assert!(config.quorum_queues);
        assert_eq!(config.topic_exchange, "bus.topics");
        assert!(serde_json::from_str::<RabbitMqConfig>(r#"{"prefetsh":1}"#).is_err());
    }
}
