//! Configuration of the Kafka adapter: bootstrap servers, client id, topic settings, consumer
//! and producer tuning, SASL/TLS, and an escape hatch to any rdkafka `ClientConfig` key.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bus_core::secrets::{redact_url, Secret};
use bus_core::{Error, Result};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::oauth::{OAuthTokenProvider, TokenProvider};

/// Compression of produced message batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Compression {
    /// No compression (the default).
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// Zstandard: needs this crate's `zstd` feature (librdkafka built with zstd).
    Zstd,
}

impl Compression {
    fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "none" => Compression::None,
            "gzip" => Compression::Gzip,
            "snappy" => Compression::Snappy,
            "lz4" => Compression::Lz4,
            "zstd" => Compression::Zstd,
            other => {
                return Err(Error::config(format!(
                    "unknown Kafka compression `{other}` (none, gzip, snappy, lz4, zstd)"
                )))
            }
        })
    }
}

/// How the adapter connects to Kafka and how it lays `bus` out on it.
///
/// Read from serde (the `[kafka]` section of `BusConfig`), from a URL with
/// [`KafkaConfig::from_url`], or built in code:
///
/// ```
/// use adapter_kafka::{Compression, KafkaConfig};
/// let config = KafkaConfig::from_url("kafka://127.0.0.1:9092?partitions=6&client_id=billing")?
///     .with_compression(Compression::Lz4)
///     .with_client_option("socket.keepalive.enable", "true");
/// assert_eq!(config.partitions, 6);
/// # Ok::<(), bus_core::Error>(())
/// ```
///
/// `Debug` output never shows the SASL password, the TLS key password, or the values of
/// [`client_options`](KafkaConfig::client_options) (which may hold secrets). Those passwords
/// are [`Secret`]s: given inline they are never serialized; given as `{ env = "NAME" }` or
/// `{ file = "/path" }` the reference is serialized, and read each time a client is created.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// `host:port` of one or more brokers, comma-separated (`bootstrap.servers`).
    pub bootstrap_servers: String,
    /// The client id the brokers see (`client.id`).
    pub client_id: String,
    /// The CloudEvents `source` of every message this adapter publishes (`ce_source`), as on
    /// every adapter: the producing service, default `bus`.
    pub source: String,
    /// Partitions of the topics `bus` creates. More partitions let more members of a group
    /// share the work; per-key order holds within a partition whatever the count.
    pub partitions: i32,
    /// Replication factor of the topics `bus` creates.
    pub replication: i32,
    /// Compression of produced batches.
    pub compression: Compression,
    /// How long the producer waits to fill a batch (`linger.ms`).
    pub linger_ms: u64,
    /// How long a publish may wait for the broker's acknowledgement, retries included
    /// (`message.timeout.ms`); then it fails with a timeout.
    pub publish_timeout_ms: u64,
    /// The largest message the producer sends (`message.max.bytes`); larger payloads fail with
    /// `PayloadTooLarge` before anything is sent.
    pub max_payload_bytes: usize,
    /// Idempotent producer (`enable.idempotence`): on by default, so the producer's own
    /// retries never duplicate or reorder a message.
    pub idempotence: bool,
    /// Consumer session timeout (`session.timeout.ms`): how soon the group notices a member
    /// that died without leaving.
    pub session_timeout_ms: u64,
    /// How many unsettled deliveries a subscription holds by default, when
    /// `SubscribeOptions::prefetch` does not say.
    pub prefetch: usize,
    /// `security.protocol`: `plaintext`, `ssl`, `sasl_plaintext`, `sasl_ssl`. When unset it
    /// is `plaintext`, or `ssl` (`sasl_ssl` with SASL credentials) as soon as a TLS setting
    /// below is given; a TLS setting with an explicitly plaintext protocol is a `Config`
    /// error (librdkafka would ignore it and connect in clear).
    pub security_protocol: Option<String>,
    /// `sasl.mechanism`, e.g. `PLAIN`, `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    /// `sasl.username`.
    pub sasl_username: Option<String>,
    /// `sasl.password`: inline (never shown in `Debug`, not serialized), or a reference to an
    /// environment variable or a file (serialized as the reference), read when each client is
    /// created.
    #[serde(default, skip_serializing_if = "Secret::is_inline_or_none")]
    pub sasl_password: Option<Secret>,
    /// `ssl.ca.location`: a PEM file of the CA certificates that may sign the brokers'
    /// certificates (instead of the system's trust store).
    pub ssl_ca_location: Option<String>,
    /// `ssl.certificate.location`: the client certificate (PEM) for mutual TLS.
    pub ssl_certificate_location: Option<String>,
    /// `ssl.key.location`: the client certificate's private key (PEM).
    pub ssl_key_location: Option<String>,
    /// `ssl.key.password`: the password of an encrypted client key ([`ssl_key_location`]
    /// in PKCS#8 `ENCRYPTED PRIVATE KEY` or traditional encrypted PEM), a [`Secret`] as
    /// [`sasl_password`](KafkaConfig::sasl_password) is.
    ///
    /// [`ssl_key_location`]: KafkaConfig::ssl_key_location
    #[serde(default, skip_serializing_if = "Secret::is_inline_or_none")]
    pub ssl_key_password: Option<Secret>,
    /// Whether the broker's certificate must name the host it was reached by
    /// (`ssl.endpoint.identification.algorithm` `https`, librdkafka's default, when unset or
    /// `true`; `none` when `false`, which trusts any certificate the CA signed, for any
    /// host). librdkafka has no server-name override: the name checked (and sent as SNI) is
    /// the host of the bootstrap server or of the advertised listener.
    pub ssl_endpoint_identification: Option<bool>,
    /// How many offsets before a committed offset a consumer starts fetching (the records
    /// before the committed offset are skipped), and the most records the producer puts in
    /// one batch (`batch.num.messages`). Needed by brokers that return only the record
    /// batches starting at or after the fetch offset, as tansu 0.6 does: without it a
    /// consumer resuming in the middle of a batch would skip the batch's remaining records.
    /// 0 turns it off (for Apache Kafka, which does not need it).
    pub fetch_rewind: i64,
    /// How many retry copies (nacked with a delay) a subscription holds in memory waiting for
    /// their time. At the bound it stops fetching its retry topic until one is handed out, so
    /// memory stays bounded whatever the nacks; those behind wait in Kafka (at least 1).
    pub max_delayed: usize,
    /// Any other rdkafka `ClientConfig` key, applied last to every client (producer,
    /// consumers, admin), so it can override what `bus` sets. Serialized with the values of
    /// secret-looking keys (`sasl.password`, `ssl.key.password`, …) as `***`.
    #[serde(serialize_with = "bus_core::secrets::serialize_settings")]
    pub client_options: BTreeMap<String, String>,
    /// Gives the tokens of SASL `OAUTHBEARER`: set in code only (not serialized), with
    /// [`with_oauth_token_provider`](KafkaConfig::with_oauth_token_provider).
    #[serde(skip)]
    oauth: Option<TokenProvider>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            client_id: "bus".into(),
            source: "bus".into(),
            partitions: 3,
            replication: 1,
            compression: Compression::None,
            linger_ms: 5,
            publish_timeout_ms: 30_000,
            max_payload_bytes: 1_000_000,
            idempotence: true,
            session_timeout_ms: 10_000,
            prefetch: 256,
            fetch_rewind: 500,
            max_delayed: 1024,
            security_protocol: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            ssl_key_password: None,
            ssl_endpoint_identification: None,
            client_options: BTreeMap::new(),
            oauth: None,
        }
    }
}

impl KafkaConfig {
    /// A configuration for the brokers at `bootstrap_servers` (`host:port[,host:port…]`).
    #[must_use]
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            ..Self::default()
        }
    }

    /// Reads `kafka://host:port[,host:port…][?query]`. Query parameters: `partitions`,
    /// `replication`, `client_id`, `source`, `compression`, `linger_ms`, `publish_timeout_ms`,
    /// `max_payload`, `idempotence`, `session_timeout_ms`, `prefetch`, `fetch_rewind`,
    /// `max_delayed`, `security_protocol`, `sasl_mechanism`, and for TLS `tls_ca`
    /// ([`ssl_ca_location`](KafkaConfig::ssl_ca_location)), `tls_cert`
    /// ([`ssl_certificate_location`](KafkaConfig::ssl_certificate_location)), `tls_key`
    /// ([`ssl_key_location`](KafkaConfig::ssl_key_location)) and `tls_verify_name`
    /// (`true`/`false`, [`ssl_endpoint_identification`](KafkaConfig::ssl_endpoint_identification));
    /// user info in the URL sets the SASL user name and password. The key password has no
    /// URL parameter (set it in the config or with
    /// [`with_ssl_key_password`](KafkaConfig::with_ssl_key_password)).
    ///
    /// # Errors
    /// [`ErrorKind::Config`](bus_core::ErrorKind::Config) for another scheme, a missing host,
    /// or a bad query value.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::default().apply_url_text(url)
    }

    /// Applies `url` (as [`from_url`](KafkaConfig::from_url) reads it) over this configuration:
    /// its brokers, user info and query parameters override what is set. A parsed [`Url`]
    /// holds one host; a list of brokers (`kafka://a:9092,b:9092`) goes through
    /// [`from_url`](KafkaConfig::from_url) or
    /// [`bootstrap_servers`](KafkaConfig::bootstrap_servers).
    ///
    /// # Errors
    /// As [`from_url`](KafkaConfig::from_url).
    pub fn apply_url(self, url: &Url) -> Result<Self> {
        self.apply_url_text(url.as_str())
    }

    /// [`apply_url`](KafkaConfig::apply_url) on the URL's text, which may list several brokers.
    fn apply_url_text(mut self, url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| Error::config(format!("`{}` is not a kafka:// URL", redact_url(url))))?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = authority.trim_end_matches('/');
        let hosts = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                self.sasl_username = Some(decode(user));
                if !password.is_empty() {
                    self.sasl_password = Some(Secret::from(decode(password)));
                }
                hosts
            }
            None => authority,
        };
        if hosts.is_empty() {
            return Err(Error::config(format!(
                "`{}` names no Kafka broker",
                redact_url(url)
            )));
        }
        self.bootstrap_servers = hosts.to_owned();
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let value = value.into_owned();
            let bad = |e: &dyn fmt::Display| {
                Error::config(format!("kafka URL parameter `{name}={value}`: {e}"))
            };
            match &*name {
                "partitions" => self.partitions = value.parse().map_err(|e| bad(&e))?,
                "replication" => self.replication = value.parse().map_err(|e| bad(&e))?,
                "client_id" => self.client_id = value,
                "source" => self.source = value,
                "compression" => self.compression = Compression::parse(&value)?,
                "linger_ms" => self.linger_ms = value.parse().map_err(|e| bad(&e))?,
                "publish_timeout_ms" => {
                    self.publish_timeout_ms = value.parse().map_err(|e| bad(&e))?;
                }
                "max_payload" => self.max_payload_bytes = value.parse().map_err(|e| bad(&e))?,
                "idempotence" => self.idempotence = value.parse().map_err(|e| bad(&e))?,
                "session_timeout_ms" => {
                    self.session_timeout_ms = value.parse().map_err(|e| bad(&e))?;
                }
                "prefetch" => self.prefetch = value.parse().map_err(|e| bad(&e))?,
                "fetch_rewind" => self.fetch_rewind = value.parse().map_err(|e| bad(&e))?,
                "max_delayed" => self.max_delayed = value.parse().map_err(|e| bad(&e))?,
                "security_protocol" => self.security_protocol = Some(value),
                "sasl_mechanism" => self.sasl_mechanism = Some(value),
                "tls_ca" => self.ssl_ca_location = Some(value),
                "tls_cert" => self.ssl_certificate_location = Some(value),
                "tls_key" => self.ssl_key_location = Some(value),
                "tls_verify_name" => {
                    self.ssl_endpoint_identification = Some(value.parse().map_err(|e| bad(&e))?);
                }
                other => {
                    return Err(Error::config(format!(
                        "unknown kafka URL parameter `{other}`"
                    )))
                }
            }
        }
        self.validate()?;
        Ok(self)
    }

    /// Sets the partitions of created topics.
    #[must_use]
    pub fn with_partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Sets the replication factor of created topics.
    #[must_use]
    pub fn with_replication(mut self, replication: i32) -> Self {
        self.replication = replication;
        self
    }

    /// Sets the client id.
    #[must_use]
    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }

    /// Sets the CloudEvents `source` of what is published ([`source`](KafkaConfig::source)).
    #[must_use]
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Sets the compression.
    #[must_use]
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Sets `linger.ms`.
    #[must_use]
    pub fn with_linger_ms(mut self, linger_ms: u64) -> Self {
        self.linger_ms = linger_ms;
        self
    }

    /// Sets the payload limit.
    #[must_use]
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }

    /// Turns the idempotent producer on or off.
    #[must_use]
    pub fn with_idempotence(mut self, on: bool) -> Self {
        self.idempotence = on;
        self
    }

    /// Sets the default prefetch.
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets how many delayed retry copies a subscription holds in memory
    /// ([`max_delayed`](KafkaConfig::max_delayed)).
    #[must_use]
    pub fn with_max_delayed(mut self, max_delayed: usize) -> Self {
        self.max_delayed = max_delayed;
        self
    }

    /// Sets the session timeout (`session.timeout.ms`).
    #[must_use]
    pub fn with_session_timeout_ms(mut self, session_timeout_ms: u64) -> Self {
        self.session_timeout_ms = session_timeout_ms;
        self
    }

    /// Sets SASL credentials (and the mechanism). The password is a [`Secret`]: a string, or
    /// `Secret::env("NAME")` / `Secret::file("/path")` read when each client is created.
    #[must_use]
    pub fn with_sasl(
        mut self,
        mechanism: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<Secret>,
    ) -> Self {
        self.sasl_mechanism = Some(mechanism.into());
        self.sasl_username = Some(username.into());
        self.sasl_password = Some(password.into());
        self
    }

    /// Sets `security.protocol`.
    #[must_use]
    pub fn with_security_protocol(mut self, protocol: impl Into<String>) -> Self {
        self.security_protocol = Some(protocol.into());
        self
    }

    /// Trusts the CA certificates in the PEM file at `path` (`ssl.ca.location`) and turns
    /// TLS on (see [`security_protocol`](KafkaConfig::security_protocol)).
    #[must_use]
    pub fn with_ssl_ca_location(mut self, path: impl Into<String>) -> Self {
        self.ssl_ca_location = Some(path.into());
        self
    }

    /// Presents the client certificate at `certificate` with its private key at `key` (PEM
    /// files) for mutual TLS, and turns TLS on.
    #[must_use]
    pub fn with_ssl_client_certificate(
        mut self,
        certificate: impl Into<String>,
        key: impl Into<String>,
    ) -> Self {
        self.ssl_certificate_location = Some(certificate.into());
        self.ssl_key_location = Some(key.into());
        self
    }

    /// Sets the password of an encrypted client key (`ssl.key.password`; never shown in
    /// `Debug` or errors): a string, or `Secret::env("NAME")` / `Secret::file("/path")`.
    #[must_use]
    pub fn with_ssl_key_password(mut self, password: impl Into<Secret>) -> Self {
        self.ssl_key_password = Some(password.into());
        self
    }

    /// Checks (`true`, the default) or skips (`false`) that the broker's certificate names
    /// the host it was reached by ([`ssl_endpoint_identification`](KafkaConfig::ssl_endpoint_identification)).
    #[must_use]
    pub fn with_ssl_endpoint_identification(mut self, check: bool) -> Self {
        self.ssl_endpoint_identification = Some(check);
        self
    }

    /// Sets any rdkafka `ClientConfig` key (the escape hatch), applied to every client.
    #[must_use]
    pub fn with_client_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.client_options.insert(key.into(), value.into());
        self
    }

    /// Sets what gives the tokens of SASL `OAUTHBEARER` (with
    /// `with_sasl_mechanism("OAUTHBEARER")` or `sasl_mechanism = "OAUTHBEARER"`). Not
    /// serialized; `Debug` says whether one is set. Two configurations are equal only if they
    /// hold the same provider (the same `Arc`).
    ///
    /// rdkafka's admin client cannot ask a provider for a token (it never serves the request,
    /// rust-rdkafka issue 757), so a connection using one creates no topics: the topics it
    /// uses, including the `.retry` and `.dlq` topics and request-reply's reply topics, must
    /// exist or be created by the broker when first named (`auto.create.topics.enable`);
    /// a missing one is a [`NotFound`](bus_core::ErrorKind::NotFound) error. Nor does it
    /// delete the private groups of closed subscriptions or the reply topics of closed
    /// connections.
    #[must_use]
    pub fn with_oauth_token_provider(mut self, provider: Arc<dyn OAuthTokenProvider>) -> Self {
        self.oauth = Some(TokenProvider(provider));
        self
    }

    /// Sets `sasl.mechanism` alone, e.g. `OAUTHBEARER` (see
    /// [`with_oauth_token_provider`](KafkaConfig::with_oauth_token_provider)).
    #[must_use]
    pub fn with_sasl_mechanism(mut self, mechanism: impl Into<String>) -> Self {
        self.sasl_mechanism = Some(mechanism.into());
        self
    }

    /// The OAUTHBEARER token provider, if one is set.
    #[must_use]
    pub fn oauth_token_provider(&self) -> Option<&Arc<dyn OAuthTokenProvider>> {
        self.oauth.as_ref().map(|p| &p.0)
    }

    pub(crate) fn token_provider(&self) -> Option<&TokenProvider> {
        self.oauth.as_ref()
    }

    /// Whether the clients authenticate with tokens from a provider: SASL `OAUTHBEARER`
    /// (set here or in the escape hatch) and a provider set. rdkafka's admin client cannot.
    pub(crate) fn uses_token_provider(&self) -> bool {
        let mechanism = ["sasl.mechanism", "sasl.mechanisms"]
            .iter()
            .rev()
            .find_map(|key| self.client_options.get(*key))
            .or(self.sasl_mechanism.as_ref());
        self.oauth.is_some()
            && mechanism.is_some_and(|m| m.trim().eq_ignore_ascii_case("OAUTHBEARER"))
    }

    /// Checks the values that would otherwise fail late.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](bus_core::ErrorKind::Config) naming the bad value.
    pub fn validate(&self) -> Result<()> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(Error::config("kafka: bootstrap_servers is empty"));
        }
        if self.fetch_rewind < 0 {
            return Err(Error::config("kafka: fetch_rewind must not be negative"));
        }
        if self.max_delayed < 1 {
            return Err(Error::config("kafka: max_delayed must be at least 1"));
        }
        if self.partitions < 1 || self.replication < 1 {
            return Err(Error::config(
                "kafka: partitions and replication must be at least 1",
            ));
        }
        if self.uses_tls_settings()
            && self
                .security_protocol
                .as_deref()
                .is_some_and(|p| !p.to_ascii_lowercase().ends_with("ssl"))
        {
            return Err(Error::config(format!(
                "kafka: TLS settings are given but security_protocol is `{}` (use ssl or sasl_ssl)",
                self.security_protocol.as_deref().unwrap_or_default()
            )));
        }
        if self.ssl_certificate_location.is_some() != self.ssl_key_location.is_some() {
            return Err(Error::config(
                "kafka: a client certificate needs both ssl_certificate_location and ssl_key_location",
            ));
        }
        if self.compression == Compression::Zstd && !cfg!(feature = "zstd") {
            return Err(Error::config(
                "kafka: zstd compression needs adapter-kafka's `zstd` feature",
            ));
        }
        Ok(())
    }

    fn uses_tls_settings(&self) -> bool {
        self.ssl_ca_location.is_some()
            || self.ssl_certificate_location.is_some()
            || self.ssl_key_location.is_some()
            || self.ssl_key_password.is_some()
            || self.ssl_endpoint_identification.is_some()
    }

    /// `security.protocol` as given, else inferred from the TLS and SASL settings.
    fn effective_security_protocol(&self) -> Option<String> {
        if let Some(protocol) = &self.security_protocol {
            return Some(protocol.clone());
        }
        let sasl = self.sasl_mechanism.is_some() || self.sasl_username.is_some();
        match (self.uses_tls_settings(), sasl) {
            (true, true) => Some("sasl_ssl".into()),
            (true, false) => Some("ssl".into()),
            (false, _) => None,
        }
    }

    /// The settings every client shares: servers, client id, security (the secrets read now).
    ///
    /// # Errors
    /// [`ErrorKind::Config`](bus_core::ErrorKind::Config) when a secret's variable or file
    /// cannot be read (naming it, never a value).
    pub(crate) fn client_config(&self) -> Result<ClientConfig> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", &self.client_id);
        if let Some(check) = self.ssl_endpoint_identification {
            c.set(
                "ssl.endpoint.identification.algorithm",
                if check { "https" } else { "none" },
            );
        }
        let protocol = self.effective_security_protocol();
        let sasl_password = resolve(self.sasl_password.as_ref(), "sasl_password")?;
        let ssl_key_password = resolve(self.ssl_key_password.as_ref(), "ssl_key_password")?;
        let optional = [
            ("security.protocol", &protocol),
            ("sasl.mechanism", &self.sasl_mechanism),
            ("sasl.username", &self.sasl_username),
            ("sasl.password", &sasl_password),
            ("ssl.ca.location", &self.ssl_ca_location),
            ("ssl.certificate.location", &self.ssl_certificate_location),
            ("ssl.key.location", &self.ssl_key_location),
            ("ssl.key.password", &ssl_key_password),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                c.set(key, value);
            }
        }
        Ok(c)
    }

    /// The connection settings alone, for the client that checks the brokers answer (and
    /// for the admin client).
    pub(crate) fn probe_config(&self) -> Result<ClientConfig> {
        Ok(self.finish(self.client_config()?))
    }

    /// Applies the escape hatch last.
    pub(crate) fn finish(&self, mut c: ClientConfig) -> ClientConfig {
        for (key, value) in &self.client_options {
            c.set(key, value);
        }
        c
    }

    /// The largest record the producer sends (`message.max.bytes`): the payload limit, with
    /// room for headers and the batch framing.
    pub(crate) fn max_record_bytes(&self) -> usize {
        self.max_payload_bytes.saturating_add(64 * 1024)
    }

    pub(crate) fn producer_config(&self) -> Result<ClientConfig> {
        let mut c = self.client_config()?;
        c.set("enable.idempotence", self.idempotence.to_string())
            .set("acks", "all")
            .set("linger.ms", self.linger_ms.to_string())
            .set("message.timeout.ms", self.publish_timeout_ms.to_string())
            .set("compression.type", self.compression.as_str())
            .set("message.max.bytes", self.max_record_bytes().to_string());
        if self.fetch_rewind > 0 {
            c.set(
                "batch.num.messages",
                self.fetch_rewind.min(1_000_000).to_string(),
            );
        }
        Ok(self.finish(c))
    }

    pub(crate) fn consumer_config(&self, group: &str) -> Result<ClientConfig> {
        let mut c = self.client_config()?;
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Start offsets are chosen explicitly at assignment (see source.rs).
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (self.session_timeout_ms / 5).max(100).to_string(),
            )
            .set("partition.assignment.strategy", "range,roundrobin")
            .set("fetch.wait.max.ms", "100")
            .set("enable.partition.eof", "false");
        Ok(self.finish(c))
    }
}

/// The value of the secret setting `name`, read now.
fn resolve(secret: Option<&Secret>, name: &str) -> Result<Option<String>> {
    secret
        .map(|s| {
            s.resolve()
                .map_err(|e| Error::config(format!("kafka: {name}: {}", e.message())))
        })
        .transpose()
}

fn decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("client_id", &self.client_id)
            .field("source", &self.source)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("compression", &self.compression)
            .field("linger_ms", &self.linger_ms)
            .field("publish_timeout_ms", &self.publish_timeout_ms)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("idempotence", &self.idempotence)
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("prefetch", &self.prefetch)
            .field("fetch_rewind", &self.fetch_rewind)
            .field("max_delayed", &self.max_delayed)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &self.sasl_password)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_certificate_location", &self.ssl_certificate_location)
            .field("ssl_key_location", &self.ssl_key_location)
            .field("ssl_key_password", &self.ssl_key_password)
            .field(
                "ssl_endpoint_identification",
                &self.ssl_endpoint_identification,
            )
            .field(
                "client_options",
                &self.client_options.keys().collect::<Vec<_>>(),
            )
            .field("oauth_token_provider", &self.oauth.as_ref().map(|_| "set"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_errors_never_show_the_password() {
        for url in [
            "amqp://user:Pw9SECRET@127.0.0.1:9092",
            "kafka://user:Pw9SECRET@",
            "kafka://user:Pw9SECRET@?partitions=1",
        ] {
            let error = KafkaConfig::from_url(url).unwrap_err();
            let shown = format!("{error} {error:?}");
            assert!(!shown.contains("Pw9SECRET"), "{url}: {shown}");
        }
    }

    #[test]
    fn url_sets_servers_credentials_and_options() {
        let c = KafkaConfig::from_url(
            "kafka://app:s%40cret@k1:9092,k2:9092?partitions=6&compression=lz4&client_id=billing",
        )
        .unwrap();
        assert_eq!(c.bootstrap_servers, "k1:9092,k2:9092");
        assert_eq!(c.sasl_username.as_deref(), Some("app"));
        assert_eq!(c.sasl_password, Some(Secret::from("s@cret")));
        assert_eq!(c.partitions, 6);
        assert_eq!(c.compression, Compression::Lz4);
        assert_eq!(c.client_id, "billing");
        assert!(KafkaConfig::from_url("nats://x").is_err());
        assert!(KafkaConfig::from_url("kafka://h:1?bogus=1").is_err());
        assert!(KafkaConfig::from_url("kafka://h:1?partitions=0").is_err());
    }

    #[test]
    fn url_sets_tls_and_infers_the_protocol() {
        let c = KafkaConfig::from_url(
            "kafka://k1:9093?tls_ca=/etc/ca.pem&tls_cert=/etc/c.pem&tls_key=/etc/c.key&tls_verify_name=false",
        )
        .unwrap();
        assert_eq!(c.ssl_ca_location.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(c.ssl_certificate_location.as_deref(), Some("/etc/c.pem"));
        assert_eq!(c.ssl_key_location.as_deref(), Some("/etc/c.key"));
        assert_eq!(c.ssl_endpoint_identification, Some(false));
        let native = c.client_config().unwrap();
        assert_eq!(native.get("security.protocol"), Some("ssl"));
        assert_eq!(native.get("ssl.ca.location"), Some("/etc/ca.pem"));
        assert_eq!(
            native.get("ssl.endpoint.identification.algorithm"),
            Some("none")
        );
        let sasl = KafkaConfig::from_url("kafka://u:p@k1:9093?tls_ca=/ca.pem").unwrap();
        assert_eq!(
            sasl.client_config().unwrap().get("security.protocol"),
            Some("sasl_ssl")
        );
        let plain = KafkaConfig::new("k1:9092").client_config().unwrap();
        assert_eq!(plain.get("security.protocol"), None);
        assert_eq!(plain.get("ssl.endpoint.identification.algorithm"), None);
        for bad in [
            "kafka://k1:9093?tls_ca=/ca.pem&security_protocol=plaintext",
            "kafka://k1:9093?tls_cert=/c.pem",
            "kafka://k1:9093?tls_verify_name=maybe",
        ] {
            let error = KafkaConfig::from_url(bad).unwrap_err();
            assert_eq!(error.kind(), bus_core::ErrorKind::Config, "{bad}");
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let c = KafkaConfig::new("h:1")
            .with_sasl("PLAIN", "app", "hunter2")
            .with_ssl_key_password("keypass77")
            .with_client_option("ssl.keystore.password", "topsecret");
        let text = format!("{c:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("topsecret") && !text.contains("keypass77"),
            "{text}"
        );
        assert!(text.contains("app"));
    }

    #[test]
    fn serde_defaults_fill_missing_fields() {
        let c: KafkaConfig =
            serde_json::from_str(r#"{"bootstrap_servers":"h:1","compression":"gzip"}"#).unwrap();
        assert_eq!(c.compression, Compression::Gzip);
        assert!(c.idempotence);
        assert_eq!(c.partitions, 3);
    }

    #[test]
    fn a_serialized_config_holds_no_secret() {
        const SECRET: &str = "Zq9-secret-value";
        let config = KafkaConfig::default()
            .with_sasl("SCRAM-SHA-256", "svc", SECRET)
            .with_ssl_key_password(SECRET)
            .with_client_option("sasl.oauthbearer.client.secret", SECRET)
            .with_client_option("client.id", "billing");
        let json = serde_json::to_string(&config).unwrap();
        assert!(!json.contains(SECRET), "{json}");
        assert!(json.contains(r#""client.id":"billing""#), "{json}");
        let debug = format!("{config:?}");
        assert!(!debug.contains(SECRET), "{debug}");
        // Read back, it is the same but for the secrets.
        let back: KafkaConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.sasl_password, None);
        assert_eq!(back.ssl_key_password, None);
        assert_eq!(back.sasl_username.as_deref(), Some("svc"));

        // Given as references, the secrets are serialized as the references, and the config
        // reads back equal.
        let by_reference = config
            .with_sasl("SCRAM-SHA-256", "svc", Secret::env("BUS_KAFKA_PASSWORD"))
            .with_ssl_key_password(Secret::file("/run/secrets/kafka-key-password"));
        let json = serde_json::to_string(&by_reference).unwrap();
        assert!(
            json.contains(r#""sasl_password":{"env":"BUS_KAFKA_PASSWORD"}"#),
            "{json}"
        );
        assert!(
            json.contains(r#""ssl_key_password":{"file":"/run/secrets/kafka-key-password"}"#),
            "{json}"
        );
        assert!(!json.contains(SECRET), "{json}");
        let back: KafkaConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.sasl_password, by_reference.sasl_password);
        assert_eq!(back.ssl_key_password, by_reference.ssl_key_password);
        // Equal but for the escape hatch's secret value, which is serialized as `***`.
        let mut expected = by_reference.clone();
        expected.client_options.insert(
            "sasl.oauthbearer.client.secret".into(),
            REDACTED_VALUE.into(),
        );
        assert_eq!(back, expected);
    }

    const REDACTED_VALUE: &str = bus_core::secrets::REDACTED;

    #[test]
    fn secret_references_round_trip_and_resolve_when_a_client_is_built() {
        let text = r#"{
            "bootstrap_servers": "h:1",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "svc",
            "sasl_password": {"env": "BUS_KAFKA_UNIT_PASSWORD"},
            "ssl_ca_location": "/ca.pem",
            "ssl_certificate_location": "/c.pem",
            "ssl_key_location": "/c.key",
            "ssl_key_password": {"file": "/run/secrets/bus-kafka-key-password"}
        }"#;
        let config: KafkaConfig = serde_json::from_str(text).unwrap();
        assert_eq!(
            config.sasl_password,
            Some(Secret::env("BUS_KAFKA_UNIT_PASSWORD"))
        );
        let json = serde_json::to_string(&config).unwrap();
        assert!(
            json.contains(r#""sasl_password":{"env":"BUS_KAFKA_UNIT_PASSWORD"}"#),
            "{json}"
        );
        assert!(
            json.contains(r#""ssl_key_password":{"file":"/run/secrets/bus-kafka-key-password"}"#),
            "{json}"
        );
        let back: KafkaConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
        let debug = format!("{config:?}");
        assert!(debug.contains("BUS_KAFKA_UNIT_PASSWORD"), "{debug}");

        // Read when a client is built: an unset variable is a Config error naming it.
        std::env::remove_var("BUS_KAFKA_UNIT_PASSWORD");
        let error = config.client_config().unwrap_err();
        assert_eq!(error.kind(), bus_core::ErrorKind::Config);
        assert!(
            error.to_string().contains("sasl_password")
                && error.to_string().contains("BUS_KAFKA_UNIT_PASSWORD"),
            "{error}"
        );

        let dir = std::env::temp_dir().join(format!("bus-kafka-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key_password = dir.join("key-password");
        std::fs::write(&key_password, "Zq9-key-pass\n").unwrap();
        std::env::set_var("BUS_KAFKA_UNIT_PASSWORD", "Zq9-sasl-pass");
        let config = config.with_ssl_key_password(Secret::file(&key_password));
        let native = config.client_config().unwrap();
        assert_eq!(native.get("sasl.password"), Some("Zq9-sasl-pass"));
        assert_eq!(native.get("ssl.key.password"), Some("Zq9-key-pass"));
        std::fs::remove_dir_all(&dir).unwrap();
        let error = config.client_config().unwrap_err();
        assert_eq!(error.kind(), bus_core::ErrorKind::Config);
        assert!(error.to_string().contains("ssl_key_password"), "{error}");
        assert!(!format!("{error} {error:?}").contains("Zq9"), "{error}");
        // And the values never in a serialized config or its Debug.
        let shown = format!("{} {config:?}", serde_json::to_string(&config).unwrap());
        assert!(!shown.contains("Zq9"), "{shown}");
    }

    #[test]
    fn a_token_provider_is_neither_serialized_nor_shown_and_turns_off_the_admin_client() {
        struct None_;
        impl crate::OAuthTokenProvider for None_ {
            fn token(&self, _config: Option<&str>) -> Result<crate::OAuthToken> {
                Err(Error::config("none"))
            }
        }
        let provider: Arc<dyn crate::OAuthTokenProvider> = Arc::new(None_);
        let config = KafkaConfig::new("h:1").with_oauth_token_provider(provider.clone());
        assert!(format!("{config:?}").contains(r#"oauth_token_provider: Some("set")"#));
        assert!(format!("{:?}", KafkaConfig::new("h:1")).contains("oauth_token_provider: None"));
        let json = serde_json::to_string(&config).unwrap();
        assert!(!json.contains("oauth"), "{json}");
        assert!(serde_json::from_str::<KafkaConfig>(r#"{"oauth": null}"#).is_err());
        let back: KafkaConfig = serde_json::from_str(&json).unwrap();
        assert!(back.oauth_token_provider().is_none());
        assert_eq!(config.clone(), config);
        assert_ne!(
            config,
            KafkaConfig::new("h:1").with_oauth_token_provider(Arc::new(None_))
        );

        // The provider is used (and the admin client left out) only with OAUTHBEARER.
        assert!(!config.uses_token_provider());
        assert!(config
            .clone()
            .with_sasl_mechanism("oauthbearer")
            .uses_token_provider());
        assert!(config
            .clone()
            .with_sasl_mechanism("PLAIN")
            .with_client_option("sasl.mechanisms", "OAUTHBEARER")
            .uses_token_provider());
        assert!(!config
            .clone()
            .with_sasl_mechanism("OAUTHBEARER")
            .with_client_option("sasl.mechanism", "PLAIN")
            .uses_token_provider());
        assert!(!KafkaConfig::new("h:1")
            .with_sasl_mechanism("OAUTHBEARER")
            .uses_token_provider());
    }
}
