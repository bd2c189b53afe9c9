//! Configuration of the NATS adapter: address, credentials, TLS, consumer tuning, stream
//! settings, and an escape hatch to `async_nats::ConnectOptions`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bus_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use url::Url;

/// Where JetStream keeps the streams `bus` creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Storage {
    /// On disk: messages survive a server restart (the default).
    #[default]
    File,
    /// In memory: faster, lost when the server stops.
    Memory,
}

/// How the adapter authenticates. Secrets never appear in `Debug` output.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Credentials {
    /// No authentication (or whatever the URL's user info says).
    #[default]
    None,
    /// A user name and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A token.
    Token {
        /// The token.
        token: String,
    },
    /// A `.creds` file (JWT and NKey seed), as `nsc` writes it.
    CredsFile {
        /// Path of the file.
        path: PathBuf,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"***")
                .finish(),
            Credentials::Token { .. } => f.debug_struct("Token").field("token", &"***").finish(),
            Credentials::CredsFile { path } => {
                f.debug_struct("CredsFile").field("path", path).finish()
            }
        }
    }
}

type ConnectHook = dyn Fn(async_nats::ConnectOptions) -> async_nats::ConnectOptions + Send + Sync;

/// How to connect to NATS and how to lay `bus` out on it.
///
/// Read from serde (the `[nats]` section of `BusConfig`), from a URL with
/// [`NatsConfig::from_url`], or built in code:
///
/// ```
/// use std::time::Duration;
/// use adapter_nats::NatsConfig;
/// let config = NatsConfig::from_url("nats://127.0.0.1:4222?prefetch=256&name=billing")?
///     .with_ack_wait(Duration::from_secs(60))
///     .with_connect_options(|options| options.ping_interval(Duration::from_secs(10)));
/// assert_eq!(config.prefetch, 256);
/// # Ok::<(), bus_core::Error>(())
/// ```
///
/// # URL query parameters
///
/// `durable` (`true`/`false`), `prefetch`, `ack_wait_ms`, `name`, `tls` (`true`/`false`),
/// `token`, `creds` (a path), `storage` (`file`/`memory`), `replicas`, `max_age_secs`,
/// `prefix`, `source`, `publish_timeout_ms`; user and password as the URL's user info. An
/// unknown parameter is an error.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The server address, `nats://host:port` (`tls://` for TLS).
    pub url: String,
    /// How to authenticate.
    pub credentials: Credentials,
    /// Require TLS.
    pub tls: bool,
    /// The client name the server shows in its monitoring.
    pub client_name: Option<String>,
    /// How many messages a subscription pulls from JetStream at a time, when the subscription
    /// sets no prefetch of its own.
    pub prefetch: usize,
    /// How long JetStream waits for a settlement before redelivering, in milliseconds.
    pub ack_wait_ms: u64,
    /// How long a JetStream publish waits for the server's acknowledgement, in milliseconds.
    pub publish_timeout_ms: u64,
    /// Where streams are stored.
    pub storage: Storage,
    /// Replicas of each stream (1 on a single server).
    pub replicas: usize,
    /// How long a topic's stream keeps messages, in seconds; `None` keeps them until the
    /// server's limits say otherwise.
    pub max_age_secs: Option<u64>,
    /// `true` (the default): topics on JetStream. `false`: topics on core NATS subjects, not
    /// durable, without redelivery, delays or dead letters (queues stay on JetStream).
    pub durable: bool,
    /// The first token of every subject and stream name `bus` uses.
    pub prefix: String,
    /// The CloudEvents `source` attribute written on every message.
    pub source: String,
    /// Changes the `async_nats::ConnectOptions` after `bus` set them: anything the client can
    /// do that this configuration does not name. Code only (not serialized).
    #[serde(skip)]
    pub connect_options: Option<Arc<ConnectHook>>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            credentials: Credentials::None,
            tls: false,
            client_name: None,
            prefetch: 64,
            ack_wait_ms: 30_000,
            publish_timeout_ms: 5_000,
            storage: Storage::File,
            replicas: 1,
            max_age_secs: None,
            durable: true,
            prefix: "bus".to_owned(),
            source: "bus".to_owned(),
            connect_options: None,
        }
    }
}

impl PartialEq for NatsConfig {
    fn eq(&self, other: &Self) -> bool {
        self.url == other.url
            && self.credentials == other.credentials
            && self.tls == other.tls
            && self.client_name == other.client_name
            && self.prefetch == other.prefetch
            && self.ack_wait_ms == other.ack_wait_ms
            && self.publish_timeout_ms == other.publish_timeout_ms
            && self.storage == other.storage
            && self.replicas == other.replicas
            && self.max_age_secs == other.max_age_secs
            && self.durable == other.durable
            && self.prefix == other.prefix
            && self.source == other.source
            && self.connect_options.is_some() == other.connect_options.is_some()
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_url(&self.url))
            .field("credentials", &self.credentials)
            .field("tls", &self.tls)
            .field("client_name", &self.client_name)
            .field("prefetch", &self.prefetch)
            .field("ack_wait_ms", &self.ack_wait_ms)
            .field("publish_timeout_ms", &self.publish_timeout_ms)
            .field("storage", &self.storage)
            .field("replicas", &self.replicas)
            .field("max_age_secs", &self.max_age_secs)
            .field("durable", &self.durable)
            .field("prefix", &self.prefix)
            .field("source", &self.source)
            .field("connect_options", &self.connect_options.is_some())
            .finish()
    }
}

impl NatsConfig {
    /// The default configuration with `url`'s address, credentials and query parameters.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] when the URL does not parse, is not `nats://` or `tls://`, or
    /// has an unknown or invalid query parameter.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = Url::parse(url.trim()).map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("invalid NATS URL `{}`", redact_url(url)),
                e,
            )
        })?;
        Self::default().apply_url(&parsed)
    }

    /// Applies `url` onto this configuration: its address, user info and query parameters
    /// override what is set.
    ///
    /// # Errors
    /// As [`NatsConfig::from_url`].
    pub fn apply_url(mut self, url: &Url) -> Result<Self> {
        let shown = redact_url(url.as_str());
        let scheme = match url.scheme() {
            "nats" => "nats",
            "tls" => {
                self.tls = true;
                "tls"
            }
            other => {
                return Err(Error::config(format!(
                    "`{shown}`: a NATS URL has the scheme nats:// or tls://, not {other}://"
                )))
            }
        };
        let host = url.host_str().unwrap_or("127.0.0.1");
        let port = url.port().unwrap_or(4222);
        self.url = format!("{scheme}://{host}:{port}");
        if !url.username().is_empty() {
            let user = percent_decode(url.username());
            self.credentials = match url.password() {
                Some(password) => Credentials::UserPassword {
                    user,
                    password: percent_decode(password),
                },
                // `nats://TOKEN@host` is how NATS URLs carry a token.
                None => Credentials::Token { token: user },
            };
        }
        let mut unknown = Vec::new();
        for (name, value) in url.query_pairs() {
            let invalid = |what: &str| {
                Error::config(format!(
                    "`{shown}`: query parameter `{name}` must be {what}, not `{}`",
                    if name == "token" { "***" } else { &value }
                ))
            };
            match name.as_ref() {
                "durable" => {
                    self.durable = parse_bool(&value).ok_or_else(|| invalid("true or false"))?
                }
                "tls" => self.tls = parse_bool(&value).ok_or_else(|| invalid("true or false"))?,
                "prefetch" => {
                    self.prefetch = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| invalid("a positive number"))?;
                }
                "ack_wait_ms" => {
                    self.ack_wait_ms = value
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| invalid("a positive number of milliseconds"))?;
                }
                "publish_timeout_ms" => {
                    self.publish_timeout_ms = value
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| invalid("a positive number of milliseconds"))?;
                }
                "replicas" => {
                    self.replicas = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=5).contains(n))
                        .ok_or_else(|| invalid("a number from 1 to 5"))?;
                }
                "max_age_secs" => {
                    self.max_age_secs = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| invalid("a positive number of seconds"))?,
                    );
                }
                "storage" => {
                    self.storage = match value.as_ref() {
                        "file" => Storage::File,
                        "memory" => Storage::Memory,
                        _ => return Err(invalid("file or memory")),
                    };
                }
                "name" => self.client_name = Some(value.into_owned()),
                "token" => {
                    self.credentials = Credentials::Token {
                        token: value.into_owned(),
                    };
                }
                "creds" => {
                    self.credentials = Credentials::CredsFile {
                        path: PathBuf::from(value.as_ref()),
                    };
                }
                "prefix" => {
                    if value.is_empty()
                        || !value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        return Err(invalid("letters, digits, `-` and `_`"));
                    }
                    self.prefix = value.into_owned();
                }
                "source" => self.source = value.into_owned(),
                _ => unknown.push(format!("`{name}`")),
            }
        }
        if !unknown.is_empty() {
            return Err(Error::config(format!(
                "`{shown}`: unknown query parameter{} {}; a nats:// URL takes durable, prefetch, \
                 ack_wait_ms, publish_timeout_ms, name, tls, token, creds, storage, replicas, \
                 max_age_secs, prefix and source",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.join(", ")
            )));
        }
        Ok(self)
    }

    /// Sets the server address.
    #[must_use]
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Sets the credentials.
    #[must_use]
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// Requires TLS (or not).
    #[must_use]
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the client name.
    #[must_use]
    pub fn with_client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = Some(name.into());
        self
    }

    /// Sets the default prefetch (at least 1).
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Sets how long JetStream waits for a settlement before redelivering.
    #[must_use]
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait_ms = u64::try_from(ack_wait.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self
    }

    /// Sets where streams are stored.
    #[must_use]
    pub fn with_storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// Sets how many replicas each stream has.
    #[must_use]
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    /// Sets how long topic streams keep messages.
    #[must_use]
    pub fn with_max_age(mut self, max_age: Duration) -> Self {
        self.max_age_secs = Some(max_age.as_secs().max(1));
        self
    }

    /// Puts topics on JetStream (`true`, the default) or on core NATS (`false`).
    #[must_use]
    pub fn with_durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Sets the subject and stream name prefix.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Changes the `async_nats::ConnectOptions` after `bus` has set them.
    #[must_use]
    pub fn with_connect_options<F>(mut self, hook: F) -> Self
    where
        F: Fn(async_nats::ConnectOptions) -> async_nats::ConnectOptions + Send + Sync + 'static,
    {
        self.connect_options = Some(Arc::new(hook));
        self
    }

    /// The ack wait as a [`Duration`].
    #[must_use]
    pub fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.ack_wait_ms)
    }

    /// The publish timeout as a [`Duration`].
    #[must_use]
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    /// The URL with any password or token replaced by `***`: safe to log.
    #[must_use]
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    pub(crate) async fn connect_options(&self) -> Result<async_nats::ConnectOptions> {
        let mut options = match &self.credentials {
            Credentials::None => async_nats::ConnectOptions::new(),
            Credentials::UserPassword { user, password } => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            Credentials::Token { token } => async_nats::ConnectOptions::with_token(token.clone()),
            Credentials::CredsFile { path } => {
                async_nats::ConnectOptions::with_credentials_file(path.clone())
                    .await
                    .map_err(|e| {
                        Error::with_source(
                            ErrorKind::Config,
                            format!("reading the NATS credentials file {}", path.display()),
                            e,
                        )
                    })?
            }
        };
        options = options
            .require_tls(self.tls)
            .connection_timeout(Duration::from_secs(5));
        if let Some(name) = &self.client_name {
            options = options.name(name);
        }
        if let Some(hook) = &self.connect_options {
            options = hook(options);
        }
        Ok(options)
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(byte) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `url` with its password, a token in its user info, and secret query values hidden.
pub(crate) fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url.trim()) else {
        return "<unparseable NATS URL>".to_owned();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    } else if !parsed.username().is_empty() {
        // A user without password is a token.
        let _ = parsed.set_username("***");
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let secret = matches!(k.as_ref(), "token" | "password" | "pass");
                (
                    k.into_owned(),
                    if secret {
                        "***".to_owned()
                    } else {
                        v.into_owned()
                    },
                )
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.as_str().replace("%2A%2A%2A", "***")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_apply() {
        let config = NatsConfig::from_url(
            "nats://alice:s3cr%40t@10.0.0.1:4223?durable=false&prefetch=10&ack_wait_ms=5000\
             &name=svc&storage=memory&replicas=3&max_age_secs=60&prefix=app",
        )
        .unwrap();
        assert_eq!(config.url, "nats://10.0.0.1:4223");
        assert_eq!(
            config.credentials,
            Credentials::UserPassword {
                user: "alice".into(),
                password: "s3cr@t".into()
            }
        );
        assert!(!config.durable);
        assert_eq!(config.prefetch, 10);
        assert_eq!(config.ack_wait(), Duration::from_secs(5));
        assert_eq!(config.client_name.as_deref(), Some("svc"));
        assert_eq!(config.storage, Storage::Memory);
        assert_eq!(config.replicas, 3);
        assert_eq!(config.max_age_secs, Some(60));
        assert_eq!(config.prefix, "app");
    }

    #[test]
    fn unknown_and_invalid_parameters_are_errors() {
        let err = NatsConfig::from_url("nats://127.0.0.1?prefetsh=1").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("`prefetsh`"), "{err}");
        let err = NatsConfig::from_url("nats://127.0.0.1?durable=maybe").unwrap_err();
        assert!(err.to_string().contains("true or false"), "{err}");
        let err = NatsConfig::from_url("kafka://127.0.0.1").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
    }

    #[test]
    fn serde_section_reads_credentials_and_defaults() {
        let config: NatsConfig = serde_json::from_str(
            r#"{"url":"nats://10.0.0.2:4222","credentials":{"user_password":{"user":"svc","password":"pw"}},"prefetch":8,"storage":"memory"}"#,
        )
        .unwrap();
        assert_eq!(config.prefetch, 8);
        assert_eq!(config.storage, Storage::Memory);
        assert!(config.durable);
        assert_eq!(
            config.credentials,
            Credentials::UserPassword {
                user: "svc".into(),
                password: "pw".into()
            }
        );
        assert!(!format!("{config:?}").contains("\"pw\""));
        let back: NatsConfig =
            serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(back, config);
        assert!(serde_json::from_str::<NatsConfig>(r#"{"prefetsh":1}"#).is_err());
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let config = NatsConfig::from_url("nats://alice:hunter2@127.0.0.1:4222").unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        let config = NatsConfig::from_url("nats://127.0.0.1?token=t0k3n").unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("t0k3n"), "{shown}");
        assert!(!redact_url("nats://t0k3n@127.0.0.1").contains("t0k3n"));
        assert!(!redact_url("nats://a:hunter2@127.0.0.1?token=x").contains("hunter2"));
        let err = NatsConfig::from_url("nats://127.0.0.1?token=t0k3n&nope=1").unwrap_err();
        assert!(!err.to_string().contains("t0k3n"), "{err}");
    }
}
