//! [`BusConfig`]: which broker to connect to and how, from a URL, serde, or `BUS_URL`.

use std::fmt;

use serde::{Deserialize, Serialize};
use url::Url;

use bus_core::{Error, ErrorKind, Result};

use crate::Bus;

/// The environment variable [`BusConfig::from_env`] reads.
const URL_VAR: &str = "BUS_URL";

/// The URL used when none is given: the in-process broker.
const DEFAULT_URL: &str = "memory://";

/// Which broker to connect to, and how.
///
/// The [`url`](BusConfig::url) picks the adapter by its scheme and carries the address,
/// credentials and simple options as query parameters; the per-adapter sections carry the
/// rest. The same structure reads from a file through serde (from the environment, only the
/// URL is read: `BUS_URL`, by [`from_env`](BusConfig::from_env)):
///
/// ```toml
/// url = "memory://?max_payload=262144"
///
/// [memory]
/// capacity = 1000
/// ```
///
/// # URL schemes
///
/// | scheme | adapter (cargo feature) | query parameters |
/// |---|---|---|
/// | `memory://` | in-process broker (`memory`) | `capacity`, `publish_timeout_ms`, `max_payload`, `max_headers` |
/// | `nats://` | NATS (`nats`) | `durable`, `prefetch`, `ack_wait_ms`, `publish_timeout_ms`, `connect_timeout_ms`, `name`, `tls`, `tls_ca`, `tls_cert`, `tls_key`, `tls_server_name`, `token`, `nkey`, `creds`, `storage`, `replicas`, `max_age_secs`, `prefix`, `source` |
/// | `amqp://`, `amqps://` | RabbitMQ (`rabbitmq`) | `prefetch`, `quorum_queues`, `connection_name`, `max_payload`, `confirm_timeout_ms`, `reconnect_timeout_ms`, `source`, `tls_ca`, `tls_cert`, `tls_key`, `tls_server_name`, `connect_timeout_ms`; lapin's `heartbeat`, `frame_max`, `channel_max`, `connection_timeout`, `auth_mechanism` |
/// | `kafka://` | Kafka (`kafka`) | `partitions`, `replication`, `client_id`, `source`, `compression`, `linger_ms`, `publish_timeout_ms`, `max_payload`, `idempotence`, `session_timeout_ms`, `prefetch`, `fetch_rewind`, `max_delayed`, `security_protocol`, `sasl_mechanism`, `tls_ca`, `tls_cert`, `tls_key`, `tls_verify_name`; user info sets the SASL user and password |
/// | `sqs://` | AWS SQS and SNS (`sqs`): `sqs://host:port` is the endpoint `http://host:port`, `sqs://` alone is AWS | `region`, `access_key_id`, `secret_access_key`, `session_token`, `profile`, `role_arn`, `role_session_name`, `external_id`, `sts_endpoint`, `tls_ca`, `tls_server_name`, `connect_timeout_ms`, `wait_time_secs`, `batch_size`, `visibility_timeout_secs`, `pollers`, `prefetch`, `fifo`, `fifo_dedup_by_id`, `max_receive_count`, `name_prefix`, `source`, `max_message_bytes`, `sender_idle_ms`, `tls` |
///
/// Each adapter reads its URL itself (`MemoryConfig`, `NatsConfig`, `RabbitMqConfig`,
/// `KafkaConfig` and `SqsConfig` each have `from_url(&str)` and `apply_url(self, &Url)`):
/// the URL's address, credentials and query parameters override the same settings of the
/// adapter's section. An unknown parameter is an error, not silently ignored. Each `memory://` connection is its own
/// broker: share the [`Bus`] (it is cheap to clone) to share messages.
///
/// # Secrets
///
/// The `Debug` output, and every error `bus` makes from the URL, show the URL with its
/// password (and the values of query parameters that look secret) replaced by `***`.
/// Serializing the configuration does too. The adapters' password, token, seed and
/// secret-key settings are [`bus_core::secrets::Secret`]s: given inline they are left out
/// when serializing, given as a reference (`{ env = "NAME" }`, `{ file = "/path" }`, read
/// when connecting) they are written as the reference. So a stored configuration holds no
/// secret, and one that must round-trip names where its secrets are, in the adapter
/// sections. A URL read back from its serialized form holds `***` for its password and is
/// refused by the broker: give such a URL at runtime (`BUS_URL`), or the password apart
/// (RabbitMQ `password`, NATS `credentials`, Kafka `sasl_password`, SQS `secret_access_key`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BusConfig {
    /// The broker's URL; its scheme picks the adapter. Defaults to `memory://`. Serialized
    /// without its secrets (`bus_core::secrets::serialize_url`).
    #[serde(
        default = "default_url",
        serialize_with = "bus_core::secrets::serialize_url"
    )]
    pub url: String,

    /// Settings of the in-process broker, used with `memory://` URLs.
    #[cfg(feature = "memory")]
    #[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<adapter_memory::MemoryConfig>,

    /// Settings of the NATS adapter, used with `nats://` URLs (the URL's address and query
    /// parameters override the section's).
    #[cfg(feature = "nats")]
    #[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<adapter_nats::NatsConfig>,

    /// Settings of the RabbitMQ adapter, used with `amqp://` and `amqps://` URLs (the URL
    /// given here replaces the section's own `url`).
    #[cfg(feature = "rabbitmq")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<adapter_rabbitmq::RabbitMqConfig>,

    /// Settings of the SQS adapter, used with `sqs://` URLs (the URL's endpoint and query
    /// parameters override the section's).
    #[cfg(feature = "sqs")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqs")))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqs: Option<adapter_sqs::SqsConfig>,

    /// Settings of the Kafka adapter, used with `kafka://` URLs (the URL's brokers and query
    /// parameters override the section's).
    #[cfg(feature = "kafka")]
    #[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<adapter_kafka::KafkaConfig>,
}

fn default_url() -> String {
    DEFAULT_URL.to_owned()
}

impl Default for BusConfig {
    /// The in-process broker with its default settings (`memory://`).
    fn default() -> Self {
        Self::new(DEFAULT_URL)
    }
}

impl BusConfig {
    /// A configuration connecting to `url`, with default settings for its adapter.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            #[cfg(feature = "memory")]
            memory: None,
            #[cfg(feature = "nats")]
            nats: None,
            #[cfg(feature = "rabbitmq")]
            rabbitmq: None,
            #[cfg(feature = "sqs")]
            sqs: None,
            #[cfg(feature = "kafka")]
            kafka: None,
        }
    }

    /// Reads the configuration from the environment: the URL from `BUS_URL`, or `memory://`
    /// when it is unset or empty.
    ///
    /// ```
    /// let config = bus::BusConfig::from_env()?;
    /// println!("connecting to {}", config.redacted_url());
    /// # Ok::<(), bus::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when `BUS_URL` is not valid Unicode. The URL itself is checked
    /// by [`connect`](BusConfig::connect).
    pub fn from_env() -> Result<Self> {
        Self::from_url_var(std::env::var(URL_VAR))
    }

    fn from_url_var(value: std::result::Result<String, std::env::VarError>) -> Result<Self> {
        match value {
            Ok(url) if !url.trim().is_empty() => Ok(Self::new(url.trim())),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Err(error @ std::env::VarError::NotUnicode(_)) => Err(Error::with_source(
                ErrorKind::Config,
                format!("{URL_VAR} is not valid Unicode"),
                error,
            )),
        }
    }

    /// Sets the settings of the in-process broker.
    #[cfg(feature = "memory")]
    #[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
    #[must_use]
    pub fn with_memory(mut self, memory: adapter_memory::MemoryConfig) -> Self {
        self.memory = Some(memory);
        self
    }

    /// Sets the settings of the SQS adapter.
    #[cfg(feature = "sqs")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqs")))]
    #[must_use]
    pub fn with_sqs(mut self, sqs: adapter_sqs::SqsConfig) -> Self {
        self.sqs = Some(sqs);
        self
    }

    /// Sets the settings of the RabbitMQ adapter.
    #[cfg(feature = "rabbitmq")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
    #[must_use]
    pub fn with_rabbitmq(mut self, rabbitmq: adapter_rabbitmq::RabbitMqConfig) -> Self {
        self.rabbitmq = Some(rabbitmq);
        self
    }

    /// Sets the settings of the Kafka adapter.
    #[cfg(feature = "kafka")]
    #[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
    #[must_use]
    pub fn with_kafka(mut self, kafka: adapter_kafka::KafkaConfig) -> Self {
        self.kafka = Some(kafka);
        self
    }

    /// Sets the settings of the NATS adapter.
    #[cfg(feature = "nats")]
    #[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
    #[must_use]
    pub fn with_nats(mut self, nats: adapter_nats::NatsConfig) -> Self {
        self.nats = Some(nats);
        self
    }

    /// The URL with its password and secret-looking query values replaced by `***`: safe to
    /// print or log. A URL that does not parse is shown only by its scheme.
    #[must_use]
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Connects to the broker.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> bus::Result<()> {
    /// let config = bus::BusConfig::new("memory://?capacity=100")
    ///     .with_memory(bus::MemoryConfig::default().with_max_headers(10));
    /// let bus = config.connect().await?;
    /// assert_eq!(bus.capabilities().max_headers, Some(10));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when the URL does not parse, its scheme is unknown, its adapter's
    /// cargo feature is off (the error names the feature), or a query parameter is unknown or
    /// invalid; otherwise
    /// the adapter's connection errors.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the connection attempt.
    pub async fn connect(&self) -> Result<Bus> {
        let url = Url::parse(self.url.trim()).map_err(|error| {
            Error::with_source(
                ErrorKind::Config,
                format!("invalid bus URL `{}`", redact(&self.url)),
                error,
            )
        })?;
        crate::scheme::connect(&url, self).await
    }
}

impl fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("BusConfig");
        d.field("url", &self.redacted_url());
        #[cfg(feature = "memory")]
        d.field("memory", &self.memory);
        #[cfg(feature = "nats")]
        d.field("nats", &self.nats);
        #[cfg(feature = "rabbitmq")]
        d.field("rabbitmq", &self.rabbitmq);
        #[cfg(feature = "sqs")]
        d.field("sqs", &self.sqs);
        #[cfg(feature = "kafka")]
        d.field("kafka", &self.kafka);
        d.finish()
    }
}

/// `url` safe to print (see [`bus_core::secrets::redact_url`]).
fn redact(url: &str) -> String {
    bus_core::secrets::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_var_unset_or_empty_means_memory() {
        let unset = BusConfig::from_url_var(Err(std::env::VarError::NotPresent)).unwrap();
        assert_eq!(unset.url, "memory://");
        let empty = BusConfig::from_url_var(Ok("  ".into())).unwrap();
        assert_eq!(empty.url, "memory://");
        let set = BusConfig::from_url_var(Ok("nats://127.0.0.1:4222\n".into())).unwrap();
        assert_eq!(set.url, "nats://127.0.0.1:4222");
    }

    #[cfg(unix)]
    #[test]
    fn env_var_not_unicode_is_a_config_error() {
        use std::os::unix::ffi::OsStringExt;
        let bad = std::ffi::OsString::from_vec(vec![0x6d, 0xff]);
        let err = BusConfig::from_url_var(Err(std::env::VarError::NotUnicode(bad))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("BUS_URL"), "{err}");
    }

    #[test]
    fn from_env_reads_the_process_environment() {
        // Whatever BUS_URL holds in this process, from_env agrees with reading it directly.
        let expected = match std::env::var("BUS_URL") {
            Ok(url) if !url.trim().is_empty() => url.trim().to_owned(),
            _ => "memory://".to_owned(),
        };
        assert_eq!(BusConfig::from_env().unwrap().url, expected);
    }

    #[test]
    fn debug_hides_the_password_but_keeps_the_rest() {
        let config = BusConfig::new("amqp://guest:s3cr%40t@127.0.0.1:5672/%2f");
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cr"), "{debug}");
        assert!(
            debug.contains("amqp://guest:***@127.0.0.1:5672/%2f"),
            "{debug}"
        );
    }

    #[test]
    fn debug_hides_secret_query_values() {
        let config = BusConfig::new(
            "sqs://127.0.0.1:4566?region=eu-west-1&secret_access_key=abc123&sasl_password=pw9",
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains("abc123"), "{debug}");
        assert!(!debug.contains("pw9"), "{debug}");
        assert!(debug.contains("region=eu-west-1"), "{debug}");
        assert!(debug.contains("secret_access_key=***"), "{debug}");
    }

    #[test]
    fn unparseable_url_is_never_echoed() {
        let config = BusConfig::new("amqp://user:hunter2@[bad-host/");
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("amqp://<unreadable URL>"), "{debug}");
        assert_eq!(redact("no scheme hunter2"), "<unreadable URL>");
    }

    #[test]
    fn a_token_in_the_user_part_and_a_password_with_a_slash_are_hidden() {
        let debug = format!("{:?}", BusConfig::new("nats://t0k3nABC@127.0.0.1:4222"));
        assert!(!debug.contains("t0k3nABC"), "{debug}");
        assert!(debug.contains("nats://***@127.0.0.1:4222"), "{debug}");
        let debug = format!("{:?}", BusConfig::new("amqp://user:12/pwXYZ@127.0.0.1/%2f"));
        assert!(!debug.contains("pwXYZ"), "{debug}");
    }

    #[tokio::test]
    async fn connect_errors_do_not_leak_the_password() {
        let err = BusConfig::new("amqp://user:hunter2@[bad-host/")
            .connect()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");

        let err = BusConfig::new("mqtt://user:hunter2@127.0.0.1/")
            .connect()
            .await
            .unwrap_err();
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
    }

    #[test]
    fn a_serialized_config_holds_no_secret() {
        const SECRET: &str = "Zq9-secret-value";
        let config: BusConfig = serde_json::from_str(&format!(
            r#"{{"url":"nats://svc:{SECRET}@127.0.0.1:4222?token={SECRET}"}}"#
        ))
        .unwrap();
        let json = serde_json::to_string(&config).unwrap();
        assert!(!json.contains(SECRET), "{json}");
        assert!(json.contains("nats://svc:***@127.0.0.1:4222"), "{json}");
    }

    #[test]
    fn serde_round_trip_with_default_url() {
        let config: BusConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, BusConfig::default());
        let config: BusConfig = serde_json::from_str(r#"{"url":"nats://127.0.0.1:4222"}"#).unwrap();
        assert_eq!(config.url, "nats://127.0.0.1:4222");
        let back: BusConfig =
            serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn serde_refuses_unknown_sections() {
        let err =
            serde_json::from_str::<BusConfig>(r#"{"url":"memory://","memroy":{}}"#).unwrap_err();
        assert!(err.to_string().contains("memroy"), "{err}");
    }

    #[cfg(feature = "rabbitmq")]
    mod rabbitmq {
        use super::*;

        #[test]
        fn the_section_reads_through_serde_and_hides_the_password() {
            let config: BusConfig = serde_json::from_str(
                r#"{"url":"amqp://app:hunter2@mq:5672/%2f","rabbitmq":{"prefetch":10,"url":"amqp://x:hunter2@y/"}}"#,
            )
            .unwrap();
            assert_eq!(config.rabbitmq.as_ref().unwrap().prefetch, 10);
            let debug = format!("{config:?}");
            assert!(!debug.contains("hunter2"), "{debug}");
        }
    }

    #[cfg(feature = "memory")]
    mod memory {
        use super::*;
        use adapter_memory::MemoryConfig;

        #[tokio::test]
        async fn connect_applies_url_and_section() {
            let bus = BusConfig::new("memory://?max_payload=16")
                .with_memory(MemoryConfig::default().with_max_headers(2))
                .connect()
                .await
                .unwrap();
            let caps = bus.capabilities();
            assert_eq!(caps.name, "memory");
            assert_eq!(caps.max_payload_bytes, Some(16));
            assert_eq!(caps.max_headers, Some(2));
            let err = bus
                .publish("t", bus_core::Envelope::new("k", vec![0u8; 17]))
                .await
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
        }

        #[test]
        fn toml_like_section_reads_through_serde() {
            let config: BusConfig = serde_json::from_str(
                r#"{"url":"memory://","memory":{"capacity":1000,"max_payload":262144}}"#,
            )
            .unwrap();
            let memory = config.memory.unwrap();
            assert_eq!(memory.capacity, 1000);
            assert_eq!(memory.max_payload, Some(262_144));
            assert_eq!(memory.max_headers, None);
        }
    }
}
