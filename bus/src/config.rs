//! [`BusConfig`]: which broker to connect to and how, from a URL, serde or the environment.

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
/// rest. The same structure reads from a file or the environment through serde:
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
/// | `nats://` | NATS (`nats`) | `durable`, `prefetch`, `ack_wait_ms`, `publish_timeout_ms`, `name`, `tls`, `token`, `creds`, `storage`, `replicas`, `max_age_secs`, `prefix`, `source` |
/// | `amqp://`, `amqps://` | RabbitMQ (`rabbitmq`) | `prefetch`, `quorum_queues`, `connection_name`, `max_payload`, `confirm_timeout_ms`, `reconnect_timeout_ms`; lapin's `heartbeat`, `frame_max`, `channel_max`, `connection_timeout`, `auth_mechanism` |
/// | `kafka://` | Kafka (`kafka`) | `partitions`, `replication`, `client_id`, `compression`, `linger_ms`, `publish_timeout_ms`, `max_payload`, `idempotence`, `session_timeout_ms`, `prefetch`, `security_protocol`, `sasl_mechanism`; user info sets the SASL user and password |
/// | `sqs://` | AWS SQS and SNS (`sqs`): `sqs://host:port` is the endpoint `http://host:port`, `sqs://` alone is AWS | `region`, `access_key_id`, `secret_access_key`, `session_token`, `profile`, `role_arn`, `role_session_name`, `external_id`, `sts_endpoint`, `tls_ca`, `tls_server_name`, `connect_timeout_ms`, `wait_time_secs`, `batch_size`, `visibility_timeout_secs`, `pollers`, `prefetch`, `fifo`, `max_receive_count`, `name_prefix`, `source`, `max_message_bytes`, `sender_idle_ms`, `tls` |
///
/// Query parameters of the URL override the same setting in the adapter's section. An
/// unknown parameter is an error, not silently ignored. Each `memory://` connection is its own
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
    /// cargo feature is off (the error names the feature), its adapter is not built yet (the
    /// error names the tracking issue), or a query parameter is unknown or invalid; otherwise
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

/// Applies the query parameters of a `memory://` URL onto `base`.
#[cfg(feature = "memory")]
/// The RabbitMQ settings for `url`: the section (or the defaults) with the URL, and the
/// query parameters `bus` knows taken out of it (`prefetch`, `quorum_queues`,
/// `connection_name`, `max_payload`, `confirm_timeout_ms`, `reconnect_timeout_ms`); lapin's own
/// (`heartbeat`, `frame_max`, `channel_max`, `connection_timeout`, `auth_mechanism`) and the
/// adapter's TLS ones ([`adapter_rabbitmq::URL_PARAMETERS`]: `tls_ca`, `tls_cert`, …) stay in
/// the URL. Any other parameter is an error.
#[cfg(feature = "rabbitmq")]
pub(crate) fn rabbitmq_from_url(
    url: &Url,
    mut base: adapter_rabbitmq::RabbitMqConfig,
) -> Result<adapter_rabbitmq::RabbitMqConfig> {
    const LAPIN_PARAMS: &[&str] = &[
        "heartbeat",
        "frame_max",
        "channel_max",
        "connection_timeout",
        "auth_mechanism",
    ];
    let shown = redact(url.as_str());
    let mut kept = Vec::new();
    let mut unknown = Vec::new();
    for (name, value) in url.query_pairs() {
        let number = || -> Result<u64> {
            value.parse::<u64>().map_err(|error| {
                Error::with_source(
                    ErrorKind::Config,
                    format!("`{shown}`: `{name}` must be a non-negative number, got `{value}`"),
                    error,
                )
            })
        };
        match &*name {
            "prefetch" => {
                base.prefetch = u16::try_from(number()?)
                    .map_err(|e| {
                        Error::with_source(
                            ErrorKind::Config,
                            format!("`{shown}`: `prefetch` must be at most 65535"),
                            e,
                        )
                    })?
                    .max(1);
            }
            "quorum_queues" => {
                base.quorum_queues = match &*value {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(Error::config(format!(
                            "`{shown}`: `quorum_queues` must be true or false, got `{value}`"
                        )))
                    }
                }
            }
            "connection_name" => base.connection_name = Some(value.clone().into_owned()),
            "max_payload" => {
                base.max_payload = usize::try_from(number()?).unwrap_or(usize::MAX);
            }
            "confirm_timeout_ms" => base.confirm_timeout_ms = number()?,
            "reconnect_timeout_ms" => base.reconnect_timeout_ms = number()?,
            other
                if LAPIN_PARAMS.contains(&other)
                    || adapter_rabbitmq::URL_PARAMETERS.contains(&other) =>
            {
                kept.push((name.clone().into_owned(), value.clone().into_owned()));
            }
            other => unknown.push(format!("`{other}`")),
        }
    }
    if !unknown.is_empty() {
        return Err(Error::config(format!(
            "`{shown}`: unknown query parameters {}",
            unknown.join(", ")
        )));
    }
    let mut url = url.clone();
    url.set_query(None);
    if !kept.is_empty() {
        url.query_pairs_mut().extend_pairs(kept);
    }
    base.url = url.into();
    Ok(base)
}

pub(crate) fn memory_from_url(
    url: &Url,
    mut base: adapter_memory::MemoryConfig,
) -> Result<adapter_memory::MemoryConfig> {
    let shown = redact(url.as_str());
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
                base = base.with_capacity(capacity);
            }
            "publish_timeout_ms" => {
                base = base.with_publish_timeout(std::time::Duration::from_millis(number(
                    "a number of milliseconds",
                )?));
            }
            "max_payload" => base = base.with_max_payload(size("a number of bytes")?),
            "max_headers" => base = base.with_max_headers(size("a number of headers")?),
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
    Ok(base)
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
        use adapter_rabbitmq::RabbitMqConfig;

        fn parse(url: &str, base: RabbitMqConfig) -> Result<RabbitMqConfig> {
            rabbitmq_from_url(&Url::parse(url).unwrap(), base)
        }

        #[test]
        fn query_params_override_the_section_and_lapin_params_stay_in_the_url() {
            let base = RabbitMqConfig::default()
                .with_prefetch(7)
                .with_connection_name("from-section");
            let config = parse(
                "amqp://u:p@mq:5672/%2f?prefetch=50&quorum_queues=true&heartbeat=10&max_payload=1024",
                base,
            )
            .unwrap();
            assert_eq!(config.prefetch, 50);
            assert!(config.quorum_queues);
            assert_eq!(config.max_payload, 1024);
            assert_eq!(config.connection_name.as_deref(), Some("from-section"));
            assert_eq!(config.url, "amqp://u:p@mq:5672/%2f?heartbeat=10");
        }

        #[test]
        fn the_adapters_tls_params_stay_in_the_url() {
            let config = parse(
                "amqps://u:p@mq:5671/%2f?tls_ca=%2Fca.pem&tls_server_name=mq&prefetch=5",
                RabbitMqConfig::default(),
            )
            .unwrap();
            assert_eq!(config.prefetch, 5);
            assert_eq!(
                config.url,
                "amqps://u:p@mq:5671/%2f?tls_ca=%2Fca.pem&tls_server_name=mq"
            );
        }

        #[test]
        fn unknown_and_bad_params_are_config_errors() {
            let err = parse("amqp://mq/?colour=blue", RabbitMqConfig::default()).unwrap_err();
            assert!(err.to_string().contains("`colour`"), "{err}");
            for url in [
                "amqp://mq/?prefetch=lots",
                "amqp://mq/?prefetch=70000",
                "amqp://mq/?quorum_queues=maybe",
            ] {
                let err = parse(url, RabbitMqConfig::default()).unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Config, "{url}: {err}");
            }
        }

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
        use std::time::Duration;

        fn parse(url: &str) -> Result<MemoryConfig> {
            memory_from_url(&Url::parse(url).unwrap(), MemoryConfig::default())
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
            let config =
                memory_from_url(&Url::parse("memory://?capacity=7").unwrap(), base).unwrap();
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
