//! Configuration of the RabbitMQ adapter.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bus_core::secrets::Secret;
use bus_core::{Error, ErrorKind, Result};
use lapin::ConnectionProperties;
use serde::{Deserialize, Serialize};
use url::Url;

/// A function that adjusts lapin's [`ConnectionProperties`] before connecting: the escape
/// hatch to everything this configuration does not name (client properties, executors, …).
pub type PropertiesHook = Arc<dyn Fn(ConnectionProperties) -> ConnectionProperties + Send + Sync>;

/// PEM data for a TLS setting: a file read at each connection attempt, or the text itself.
///
/// In serde, `{ "file": "/etc/bus/ca.pem" }` or `{ "text": "-----BEGIN CERTIFICATE-----…" }`.
/// `Debug` shows a file's path and only the length of a text; a private key given as text is
/// not serialized (serializing it fails: give a key that must round-trip as a file).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Pem {
    /// A PEM file, read when connecting.
    File(PathBuf),
    /// PEM text.
    Text(String),
}

impl Pem {
    /// A PEM file, read when connecting.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Pem::File(path.into())
    }

    /// PEM text (certificates or a private key).
    pub fn text(pem: impl Into<String>) -> Self {
        Pem::Text(pem.into())
    }
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pem::File(path) => f.debug_tuple("File").field(path).finish(),
            Pem::Text(text) => write!(f, "Text(<{} bytes>)", text.len()),
        }
    }
}

/// The SASL mechanism the connection logs in with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum AuthMechanism {
    /// User name and password from the URL (RabbitMQ's default).
    Plain,
    /// User name and password from the URL, in RabbitMQ's older AMQPLAIN encoding.
    AmqPlain,
    /// The client certificate (mutual TLS) names the user; the URL's user and password are
    /// not sent. Needs `amqps://`, a client certificate and key, and the broker's
    /// `rabbitmq_auth_mechanism_ssl` plugin.
    External,
}

/// How to reach RabbitMQ and how to use it.
///
/// Reads through serde (a `[rabbitmq]` section of `BusConfig`); the URL carries the address,
/// credentials, virtual host and TLS (`amqps://`). TLS is set with a custom CA, a client
/// certificate and key (mutual TLS) and a server-name override, either in the fields below
/// or as URL query parameters (`tls_ca`, `tls_cert`, `tls_key`,
/// `tls_server_name`); see docs/adapters/rabbitmq.md, "TLS and authentication". The password
/// and the private key never appear in `Debug` output, in errors or in logs.
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
    /// `connection_timeout`, `auth_mechanism`) are passed through; the TLS parameters
    /// (`tls_ca`, `tls_cert`, `tls_key`, `tls_server_name`) and
    /// `connect_timeout_ms` override the fields of the same meaning. Serialized without its
    /// password (`bus_core::secrets::serialize_url`): a config that must round-trip gives
    /// the password in [`password`](Self::password) as a reference instead.
    #[serde(serialize_with = "bus_core::secrets::serialize_url")]
    pub url: String,
    /// The password, instead of the URL's: inline (never shown nor serialized) or read when
    /// connecting from an environment variable or a file (`{ env = "NAME" }`,
    /// `{ file = "/path" }`), which is serialized as the reference.
    #[serde(skip_serializing_if = "Secret::is_inline_or_none")]
    pub password: Option<Secret>,
    /// The CA certificates (PEM) that the server's certificate must chain to, instead of the
    /// system's roots. `amqps://` only.
    pub tls_ca: Option<Pem>,
    /// The client certificate chain (PEM) for mutual TLS, with [`tls_key`](Self::tls_key).
    /// `amqps://` only.
    pub tls_cert: Option<Pem>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of the client certificate. A key given
    /// as text is never serialized nor shown.
    #[serde(serialize_with = "serialize_key")]
    pub tls_key: Option<Pem>,
    /// The name the server's certificate must be valid for, and the SNI sent, instead of the
    /// URL's host (for a broker reached through an IP address or a tunnel). `amqps://` only.
    pub tls_server_name: Option<String>,
    /// The SASL mechanism; `None`: the URL's `auth_mechanism` parameter, else PLAIN.
    pub auth_mechanism: Option<AuthMechanism>,
    /// How long one connection attempt (TCP, TLS handshake, login, the adapter's
    /// declarations) may take before it fails with a `Timeout` error, in milliseconds.
    pub connect_timeout_ms: u64,
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
    /// The CloudEvents `source` of every message this connection sends
    /// (`cloudEvents:source`), as on every adapter: the producing service, default `bus`.
    pub source: String,
    /// Adjusts lapin's connection properties (code only, not serde).
    #[serde(skip)]
    pub properties: Option<PropertiesHook>,
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            password: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_server_name: None,
            auth_mechanism: None,
            connect_timeout_ms: 10_000,
            connection_name: None,
            prefetch: 100,
            quorum_queues: false,
            confirm_timeout_ms: 30_000,
            reconnect_timeout_ms: 10_000,
            max_payload: 128 * 1024 * 1024,
            topic_exchange: "bus.topics".to_owned(),
            request_exchange: "bus.requests".to_owned(),
            queue_expires_ms: None,
            source: "bus".to_owned(),
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
            && self.password == other.password
            && self.tls_ca == other.tls_ca
            && self.tls_cert == other.tls_cert
            && self.tls_key == other.tls_key
            && self.tls_server_name == other.tls_server_name
            && self.auth_mechanism == other.auth_mechanism
            && self.connect_timeout_ms == other.connect_timeout_ms
            && self.connection_name == other.connection_name
            && self.prefetch == other.prefetch
            && self.quorum_queues == other.quorum_queues
            && self.confirm_timeout_ms == other.confirm_timeout_ms
            && self.reconnect_timeout_ms == other.reconnect_timeout_ms
            && self.max_payload == other.max_payload
            && self.topic_exchange == other.topic_exchange
            && self.request_exchange == other.request_exchange
            && self.queue_expires_ms == other.queue_expires_ms
            && self.source == other.source
    }
}

impl fmt::Debug for RabbitMqConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqConfig")
            .field("url", &redact(&self.url))
            .field("password", &self.password)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_server_name", &self.tls_server_name)
            .field("auth_mechanism", &self.auth_mechanism)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("connection_name", &self.connection_name)
            .field("prefetch", &self.prefetch)
            .field("quorum_queues", &self.quorum_queues)
            .field("confirm_timeout_ms", &self.confirm_timeout_ms)
            .field("reconnect_timeout_ms", &self.reconnect_timeout_ms)
            .field("max_payload", &self.max_payload)
            .field("topic_exchange", &self.topic_exchange)
            .field("request_exchange", &self.request_exchange)
            .field("queue_expires_ms", &self.queue_expires_ms)
            .field("source", &self.source)
            .field("properties", &self.properties.as_ref().map(|_| "<hook>"))
            .finish()
    }
}

/// `url` safe to print: no password, token or secret parameter (`bus_core::secrets`).
pub(crate) fn redact(url: &str) -> String {
    bus_core::secrets::redact_url(url)
}

/// A private key given as text is not written out: only a file reference round-trips.
fn serialize_key<S: serde::Serializer>(
    key: &Option<Pem>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match key {
        Some(Pem::Text(_)) => Err(serde::ser::Error::custom(
            "tls_key holds a private key as text, which is never serialized; give it as a file",
        )),
        other => other.serialize(serializer),
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

    /// Sets the password, instead of the URL's (see [`password`](Self::password)).
    #[must_use]
    pub fn with_password(mut self, password: impl Into<Secret>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Trusts only the CA certificates in `ca` (PEM) for the server's certificate, instead of
    /// the system's roots.
    #[must_use]
    pub fn with_tls_ca(mut self, ca: Pem) -> Self {
        self.tls_ca = Some(ca);
        self
    }

    /// Presents this client certificate chain and key (PEM) to the server: mutual TLS, and
    /// the identity [`AuthMechanism::External`] logs in with.
    #[must_use]
    pub fn with_tls_client_cert(mut self, cert: Pem, key: Pem) -> Self {
        self.tls_cert = Some(cert);
        self.tls_key = Some(key);
        self
    }

    /// Checks the server's certificate against `name`, and sends it as SNI, instead of the
    /// URL's host.
    #[must_use]
    pub fn with_tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls_server_name = Some(name.into());
        self
    }

    /// Logs in with `mechanism` (over the URL's `auth_mechanism` parameter).
    #[must_use]
    pub fn with_auth_mechanism(mut self, mechanism: AuthMechanism) -> Self {
        self.auth_mechanism = Some(mechanism);
        self
    }

    /// Sets how long one connection attempt may take (at least 1 ms).
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout_ms = millis(timeout).max(1);
        self
    }

    /// Sets the CloudEvents `source` of the messages sent ([`source`](Self::source)).
    #[must_use]
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
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

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }

    pub(crate) fn reconnect_timeout(&self) -> Duration {
        Duration::from_millis(self.reconnect_timeout_ms)
    }

    /// The default configuration with `url` applied (see
    /// [`apply_url`](RabbitMqConfig::apply_url)).
    ///
    /// ```
    /// use adapter_rabbitmq::RabbitMqConfig;
    /// let config = RabbitMqConfig::from_url("amqp://app:pw@mq:5672/%2f?prefetch=50&heartbeat=10")?;
    /// assert_eq!(config.prefetch, 50);
    /// assert_eq!(config.url, "amqp://app:pw@mq:5672/%2f?heartbeat=10");
    /// # Ok::<(), bus_core::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when the URL does not parse, or as
    /// [`apply_url`](RabbitMqConfig::apply_url).
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = Url::parse(url.trim()).map_err(|error| {
            Error::with_source(
                ErrorKind::Config,
                format!("invalid RabbitMQ URL `{}`", redact(url)),
                error,
            )
        })?;
        Self::default().apply_url(&parsed)
    }

    /// Applies an `amqp://` or `amqps://` URL onto this configuration: the URL becomes
    /// [`url`](RabbitMqConfig::url), and the query parameters the adapter knows are taken
    /// out of it into their fields (`prefetch`, `quorum_queues`, `connection_name`,
    /// `max_payload`, `confirm_timeout_ms`, `reconnect_timeout_ms`, `source`). lapin's own
    /// (`heartbeat`, `frame_max`, `channel_max`, `connection_timeout`, `auth_mechanism`) and
    /// the TLS ones read when connecting ([`URL_PARAMETERS`](crate::URL_PARAMETERS):
    /// `tls_ca`, `tls_cert`, …) stay in the URL.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for another scheme, an unknown parameter or a bad value.
    pub fn apply_url(mut self, url: &Url) -> Result<Self> {
        if !matches!(url.scheme(), "amqp" | "amqps") {
            return Err(Error::config(format!(
                "`{}` is not an amqp:// or amqps:// URL",
                redact(url.as_str())
            )));
        }
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
                    self.prefetch = u16::try_from(number()?)
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
                    self.quorum_queues = match &*value {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(Error::config(format!(
                                "`{shown}`: `quorum_queues` must be true or false, got `{value}`"
                            )))
                        }
                    }
                }
                "connection_name" => self.connection_name = Some(value.clone().into_owned()),
                "source" => self.source = value.clone().into_owned(),
                "max_payload" => {
                    self.max_payload = usize::try_from(number()?).unwrap_or(usize::MAX);
                }
                "confirm_timeout_ms" => self.confirm_timeout_ms = number()?,
                "reconnect_timeout_ms" => self.reconnect_timeout_ms = number()?,
                other
                    if LAPIN_PARAMS.contains(&other)
                        || crate::endpoint::URL_PARAMETERS.contains(&other) =>
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
        self.url = url.into();
        Ok(self)
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
        assert!(!redact("garbage hunter2").contains("hunter2"));
        // A raw `/` in the password used to be printed as it was.
        assert!(!redact("amqp://app:hun/ter2@mq:5672/%2f").contains("ter2"));
    }

    #[test]
    fn key_text_is_neither_shown_nor_serialized() {
        let key = "-----BEGIN PRIVATE KEY-----\nTOPSECRETKEYMATERIAL\n-----END PRIVATE KEY-----\n";
        let config = RabbitMqConfig::new("amqps://mq.example/%2f")
            .with_tls_client_cert(Pem::file("/etc/bus/client.pem"), Pem::text(key))
            .with_tls_ca(Pem::file("/etc/bus/ca.pem"));
        let debug = format!("{config:?}");
        assert!(!debug.contains("TOPSECRET"), "{debug}");
        assert!(debug.contains("/etc/bus/client.pem"), "{debug}");
        let err = serde_json::to_string(&config).unwrap_err().to_string();
        assert!(!err.contains("TOPSECRET"), "{err}");
        let from_file = config.with_tls_client_cert(
            Pem::file("/etc/bus/client.pem"),
            Pem::file("/etc/bus/client.key"),
        );
        let json = serde_json::to_string(&from_file).unwrap();
        let back: RabbitMqConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, from_file);
        assert!(
            json.contains(r#""tls_key":{"file":"/etc/bus/client.key"}"#),
            "{json}"
        );
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

    #[test]
    fn a_serialized_config_holds_no_secret() {
        const SECRET: &str = "Zq9-secret-value";
        let config = RabbitMqConfig::new(format!("amqps://svc:{SECRET}@mq.example/%2f"));
        let json = serde_json::to_string(&config).unwrap();
        assert!(!json.contains(SECRET), "{json}");
        assert!(json.contains("amqps://svc:***@mq.example/%2f"), "{json}");
        let debug = format!("{config:?}");
        assert!(!debug.contains(SECRET), "{debug}");

        let inline = config.clone().with_password(SECRET);
        let json = serde_json::to_string(&inline).unwrap();
        assert!(!json.contains(SECRET), "{json}");
        assert!(!format!("{inline:?}").contains(SECRET));

        for reference in [
            Secret::env("RABBITMQ_PASSWORD"),
            Secret::file("/run/secrets/mq"),
        ] {
            let by_reference =
                RabbitMqConfig::new("amqps://svc@mq.example/%2f").with_password(reference);
            let json = serde_json::to_string(&by_reference).unwrap();
            let back: RabbitMqConfig = serde_json::from_str(&json).unwrap();
            assert_eq!(back, by_reference, "{json}");
        }
    }

    fn parse(url: &str, base: RabbitMqConfig) -> Result<RabbitMqConfig> {
        base.apply_url(&Url::parse(url).unwrap())
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
    fn from_url_checks_the_scheme() {
        let config = RabbitMqConfig::from_url("amqps://u:p@mq/%2f?quorum_queues=1").unwrap();
        assert!(config.quorum_queues);
        let err = RabbitMqConfig::from_url("nats://127.0.0.1:4222").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
    }
}
