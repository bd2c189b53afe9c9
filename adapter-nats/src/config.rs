//! Configuration of the NATS adapter: address, credentials, TLS, consumer tuning, stream
//! settings, and an escape hatch to `async_nats::ConnectOptions`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bus_core::secrets::Secret;
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
///
/// The password, token and seed are [`Secret`]s: given inline (a string) they are never
/// serialized; given as `{ env = "NAME" }` or `{ file = "/path" }` they are read when the
/// broker connects, and the reference is what a serialized config holds:
///
/// ```
/// use adapter_nats::{Credentials, NatsConfig};
/// use bus_core::secrets::Secret;
///
/// let config: NatsConfig = serde_json::from_str(
///     r#"{"credentials":{"user_password":{"user":"svc","password":{"env":"NATS_PASSWORD"}}}}"#,
/// )?;
/// assert_eq!(
///     config.credentials,
///     Credentials::user_password("svc", Secret::env("NATS_PASSWORD"))
/// );
/// let json = serde_json::to_string(&config)?;
/// assert!(json.contains(r#""password":{"env":"NATS_PASSWORD"}"#));
/// # Ok::<(), serde_json::Error>(())
/// ```
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
        /// The password (serialized only as an `env` or `file` reference).
        #[serde(default, skip_serializing_if = "Secret::is_inline")]
        password: Secret,
    },
    /// A token.
    Token {
        /// The token (serialized only as an `env` or `file` reference).
        #[serde(default, skip_serializing_if = "Secret::is_inline")]
        token: Secret,
    },
    /// A `.creds` file (the user's JWT and NKey seed), as `nsc` writes it, for a server in
    /// operator (decentralized JWT) mode.
    CredsFile {
        /// Path of the file.
        path: PathBuf,
    },
    /// An NKey: the user's seed (`SU…`), which signs the server's nonce; the server knows the
    /// public key (`U…`).
    #[serde(rename = "nkey")]
    NKey {
        /// The seed (serialized only as an `env` or `file` reference).
        #[serde(default, skip_serializing_if = "Secret::is_inline")]
        seed: Secret,
    },
}

impl Credentials {
    /// A user name and password.
    #[must_use]
    pub fn user_password(user: impl Into<String>, password: impl Into<Secret>) -> Self {
        Credentials::UserPassword {
            user: user.into(),
            password: password.into(),
        }
    }

    /// A token.
    #[must_use]
    pub fn token(token: impl Into<Secret>) -> Self {
        Credentials::Token {
            token: token.into(),
        }
    }

    /// An NKey seed (`SU…`).
    #[must_use]
    pub fn nkey(seed: impl Into<Secret>) -> Self {
        Credentials::NKey { seed: seed.into() }
    }

    /// A `.creds` file.
    #[must_use]
    pub fn creds_file(path: impl Into<PathBuf>) -> Self {
        Credentials::CredsFile { path: path.into() }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `Secret`'s own Debug shows a reference and hides an inline value.
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::UserPassword { user, password } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", password)
                .finish(),
            Credentials::Token { token } => f.debug_struct("Token").field("token", token).finish(),
            Credentials::CredsFile { path } => {
                f.debug_struct("CredsFile").field("path", path).finish()
            }
            Credentials::NKey { seed } => f.debug_struct("NKey").field("seed", seed).finish(),
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
/// `tls_ca`, `tls_cert`, `tls_key` (PEM file paths), `tls_server_name`, `token`, `nkey` (a
/// seed), `creds` (a path), `connect_timeout_ms`, `storage` (`file`/`memory`), `replicas`,
/// `max_age_secs`, `prefix`, `source`, `publish_timeout_ms`; user and password as the URL's
/// user info. An unknown parameter is an error.
///
/// # TLS
///
/// ```
/// use adapter_nats::NatsConfig;
/// let config = NatsConfig::from_url(
///     "tls://svc:pw@10.0.0.5:4222?tls_ca=/etc/nats/ca.pem&tls_server_name=nats.internal",
/// )?
/// .with_client_certificate("/etc/nats/client.pem", "/etc/nats/client-key.pem");
/// assert!(config.tls_required());
/// # Ok::<(), bus_core::Error>(())
/// ```
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The server address, `nats://host:port` (`tls://` for TLS). Serialized without its
    /// password or token (`bus_core::secrets::serialize_url`).
    #[serde(serialize_with = "bus_core::secrets::serialize_url")]
    pub url: String,
    /// How to authenticate.
    pub credentials: Credentials,
    /// Require TLS (also implied by `tls://` and by any other `tls_*` setting).
    pub tls: bool,
    /// A PEM file of the certificate authorities the server's certificate must chain to,
    /// trusted instead of the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// The client certificate chain (PEM) presented for mutual TLS; needs `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry when it is not the URL's host (a server
    /// reached by IP address whose certificate names its DNS name). Needs `tls_ca`.
    pub tls_server_name: Option<String>,
    /// How long connecting may take in all, in milliseconds: TCP, the server's INFO, the TLS
    /// handshake and authentication. The first connect is tried once; reconnecting later is
    /// the client's business (without limit).
    pub connect_timeout_ms: u64,
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
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_server_name: None,
            connect_timeout_ms: 10_000,
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
            && self.tls_ca == other.tls_ca
            && self.tls_cert == other.tls_cert
            && self.tls_key == other.tls_key
            && self.tls_server_name == other.tls_server_name
            && self.connect_timeout_ms == other.connect_timeout_ms
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
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_server_name", &self.tls_server_name)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
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
            let user = percent_decoded(url.username());
            self.credentials = match url.password() {
                Some(password) => Credentials::user_password(user, percent_decoded(password)),
                // `nats://TOKEN@host` is how NATS URLs carry a token.
                None => Credentials::token(user),
            };
        }
        let mut unknown = Vec::new();
        for (name, value) in url.query_pairs() {
            let invalid = |what: &str| {
                Error::config(format!(
                    "`{shown}`: query parameter `{name}` must be {what}, not `{}`",
                    if is_secret(&name) { "***" } else { &value }
                ))
            };
            match name.as_ref() {
                "durable" => {
                    self.durable = parse_bool(&value).ok_or_else(|| invalid("true or false"))?
                }
                "tls" => self.tls = parse_bool(&value).ok_or_else(|| invalid("true or false"))?,
                "tls_ca" => {
                    self.tls_ca = Some(non_empty_path(&value).ok_or_else(|| invalid("a path"))?)
                }
                "tls_cert" => {
                    self.tls_cert = Some(non_empty_path(&value).ok_or_else(|| invalid("a path"))?);
                }
                "tls_key" => {
                    self.tls_key = Some(non_empty_path(&value).ok_or_else(|| invalid("a path"))?)
                }
                "tls_server_name" => {
                    if value.is_empty() {
                        return Err(invalid("a DNS name or IP address"));
                    }
                    self.tls_server_name = Some(value.into_owned());
                }
                "connect_timeout_ms" => {
                    self.connect_timeout_ms = value
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| invalid("a positive number of milliseconds"))?;
                }
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
                "token" => self.credentials = Credentials::token(value.into_owned()),
                "nkey" => self.credentials = Credentials::nkey(value.into_owned()),
                "creds" => self.credentials = Credentials::creds_file(value.as_ref()),
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
                 ack_wait_ms, publish_timeout_ms, name, tls, tls_ca, tls_cert, tls_key, \
                 tls_server_name, token, nkey, creds, connect_timeout_ms, storage, replicas, \
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

    /// Sets the credentials: [`Credentials::user_password`], [`Credentials::token`],
    /// [`Credentials::nkey`] (each secret inline or a [`Secret`] reference) or
    /// [`Credentials::creds_file`].
    #[must_use]
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// Requires TLS (or not). The other TLS settings require it whatever this says.
    #[must_use]
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Trusts the certificate authorities in the PEM file `ca` (instead of the system's roots)
    /// to sign the server's certificate. Requires TLS.
    #[must_use]
    pub fn with_tls_ca(mut self, ca: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(ca.into());
        self
    }

    /// Presents the certificate chain in the PEM file `cert`, with the private key in `key`,
    /// to a server that asks for one (mutual TLS). Requires TLS.
    #[must_use]
    pub fn with_client_certificate(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls_cert = Some(cert.into());
        self.tls_key = Some(key.into());
        self
    }

    /// Checks the server's certificate against `name` rather than the URL's host. Needs
    /// [`NatsConfig::with_tls_ca`]; requires TLS.
    #[must_use]
    pub fn with_tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls_server_name = Some(name.into());
        self
    }

    /// Sets how long connecting may take in all (TCP, TLS handshake, authentication); at
    /// least 1 ms.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout_ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self
    }

    /// Whether connecting requires TLS: `tls`, or any of `tls_ca`, `tls_cert`, `tls_key`,
    /// `tls_server_name` set (a certificate meant for TLS is never silently left unused).
    #[must_use]
    pub fn tls_required(&self) -> bool {
        self.tls
            || self.tls_ca.is_some()
            || self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.tls_server_name.is_some()
    }

    /// The connect timeout as a [`Duration`].
    #[must_use]
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
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
                async_nats::ConnectOptions::with_user_and_password(
                    user.clone(),
                    resolve(password, "user_password.password")?,
                )
            }
            Credentials::Token { token } => {
                async_nats::ConnectOptions::with_token(resolve(token, "token.token")?)
            }
            Credentials::NKey { seed } => {
                async_nats::ConnectOptions::with_nkey(resolve(seed, "nkey.seed")?)
            }
            Credentials::CredsFile { path } => {
                async_nats::ConnectOptions::with_credentials_file(path.clone())
                    .await
                    .map_err(|e| {
                        // async-nats' own errors quote neither the JWT nor the seed.
                        let what = if e.kind() == std::io::ErrorKind::InvalidData {
                            "holds no user JWT and NKey seed that can be read (the .creds \
                             format nsc writes)"
                        } else {
                            "cannot be read"
                        };
                        Error::with_source(
                            ErrorKind::Config,
                            format!("the NATS credentials file {} {what}", path.display()),
                            e,
                        )
                    })?
            }
        };
        crate::tls::ensure_provider();
        options = options
            .require_tls(self.tls_required())
            .connection_timeout(self.connect_timeout());
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => {
                return Err(Error::config(
                    "a NATS client certificate needs both tls_cert and tls_key",
                ))
            }
        };
        if let Some(ca) = &self.tls_ca {
            options = options.tls_client_config(crate::tls::client_config(
                ca,
                identity,
                self.tls_server_name.as_deref(),
            )?);
        } else if self.tls_server_name.is_some() {
            return Err(Error::config(
                "tls_server_name needs tls_ca: the override is checked against that CA",
            ));
        } else if let Some((cert, key)) = identity {
            // The system's roots, loaded by async-nats; the files are checked here so that a
            // wrong one is named now rather than reported as a TLS failure on connect.
            crate::tls::certificates(cert, "client certificate")?;
            crate::tls::private_key(key)?;
            options = options.add_client_certificate(cert.to_owned(), key.to_owned());
        }
        if let Some(name) = &self.client_name {
            options = options.name(name);
        }
        if let Some(hook) = &self.connect_options {
            options = hook(options);
        }
        Ok(options)
    }
}

/// The value of the credentials' secret `field`, read now. The error names the field and the
/// variable or file, never a value.
fn resolve(secret: &Secret, field: &str) -> Result<String> {
    secret
        .resolve()
        .map_err(|e| Error::config(format!("NATS credentials ({field}): {}", e.message())))
}

/// Query parameters whose values are secrets, shown as `***`.
fn is_secret(name: &str) -> bool {
    bus_core::secrets::is_secret_name(name)
}

fn non_empty_path(value: &str) -> Option<PathBuf> {
    (!value.is_empty()).then(|| PathBuf::from(value))
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// `url` with its password, a token in its user info, and secret query values hidden.
pub(crate) fn redact_url(url: &str) -> String {
    bus_core::secrets::redact_url(url)
}

/// `text` with its `%XX` escapes decoded (a user or password in a NATS URL).
fn percent_decoded(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
            Credentials::user_password("alice", "s3cr@t")
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
        assert_eq!(config.credentials, Credentials::user_password("svc", "pw"));
        assert!(!format!("{config:?}").contains("\"pw\""));
        // Serialized without the inline password: read back, it is empty.
        let json = serde_json::to_string(&config).unwrap();
        assert!(!json.contains("\"pw\""), "{json}");
        let back: NatsConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.credentials, Credentials::user_password("svc", ""));
        let plain = NatsConfig {
            credentials: Credentials::None,
            ..config.clone()
        };
        let back: NatsConfig =
            serde_json::from_str(&serde_json::to_string(&plain).unwrap()).unwrap();
        assert_eq!(back, plain);
        assert!(serde_json::from_str::<NatsConfig>(r#"{"prefetsh":1}"#).is_err());
    }

    #[test]
    fn tls_and_nkey_parameters_apply() {
        let config = NatsConfig::from_url(
            "nats://127.0.0.1?tls_ca=/etc/ca.pem&tls_cert=/etc/c.pem&tls_key=/etc/k.pem\
             &tls_server_name=nats.internal&connect_timeout_ms=2500&nkey=SUSEED",
        )
        .unwrap();
        assert_eq!(config.tls_ca.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(config.tls_cert.as_deref(), Some(Path::new("/etc/c.pem")));
        assert_eq!(config.tls_key.as_deref(), Some(Path::new("/etc/k.pem")));
        assert_eq!(config.tls_server_name.as_deref(), Some("nats.internal"));
        assert_eq!(config.connect_timeout(), Duration::from_millis(2500));
        assert!(config.tls_required() && !config.tls);
        assert_eq!(config.credentials, Credentials::nkey("SUSEED"));
        assert!(!format!("{config:?}").contains("SUSEED"));
        assert!(!redact_url("nats://h?nkey=SUSEED").contains("SUSEED"));
        let err = NatsConfig::from_url("nats://h?nkey=SUSEED&connect_timeout_ms=0").unwrap_err();
        assert!(!err.to_string().contains("SUSEED"), "{err}");
        assert!(!NatsConfig::default().tls_required());
        let config: NatsConfig = serde_json::from_str(
            r#"{"credentials":{"nkey":{"seed":"SUSEED"}},"tls_ca":"/etc/ca.pem","connect_timeout_ms":900}"#,
        )
        .unwrap();
        assert_eq!(config.credentials, Credentials::nkey("SUSEED"));
        assert!(config.tls_required());
        assert_eq!(config.connect_timeout(), Duration::from_millis(900));
    }

    #[tokio::test]
    async fn tls_settings_that_cannot_work_are_config_errors() {
        let half = NatsConfig::default().with_tls_ca("/nonexistent/ca.pem");
        let mut cert_only = half.clone();
        cert_only.tls_cert = Some("/etc/c.pem".into());
        let err = cert_only.connect_options().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("tls_key"), "{err}");
        let err = half.connect_options().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let err = NatsConfig::default()
            .with_tls_server_name("nats.internal")
            .connect_options()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("needs tls_ca"), "{err}");
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

    #[test]
    fn a_serialized_config_holds_no_secret() {
        const SECRET: &str = "Zq9-secret-value";
        for credentials in [
            Credentials::user_password("svc", SECRET),
            Credentials::token(SECRET),
            Credentials::nkey(SECRET),
        ] {
            let config = NatsConfig {
                url: format!("nats://{SECRET}@127.0.0.1:4222?token={SECRET}"),
                credentials,
                ..NatsConfig::default()
            };
            let json = serde_json::to_string(&config).unwrap();
            assert!(!json.contains(SECRET), "{json}");
            let debug = format!("{config:?}");
            assert!(!debug.contains(SECRET), "{debug}");
        }
    }

    #[test]
    fn secret_references_round_trip_through_serde() {
        for credentials in [
            Credentials::user_password("svc", Secret::env("NATS_PASSWORD")),
            Credentials::user_password("svc", Secret::file("/run/secrets/nats-password")),
            Credentials::token(Secret::env("NATS_TOKEN")),
            Credentials::nkey(Secret::file("/run/secrets/nats.nk")),
            Credentials::creds_file("/run/secrets/user.creds"),
        ] {
            let config = NatsConfig {
                credentials,
                ..NatsConfig::default()
            };
            let json = serde_json::to_string(&config).unwrap();
            let back: NatsConfig = serde_json::from_str(&json).unwrap();
            assert_eq!(back, config, "{json}");
        }

        // As a config file writes them.
        let config: NatsConfig = serde_json::from_str(
            r#"{"credentials":{"user_password":{"user":"svc","password":{"env":"NATS_PASSWORD"}}}}"#,
        )
        .unwrap();
        assert_eq!(
            config.credentials,
            Credentials::user_password("svc", Secret::env("NATS_PASSWORD"))
        );
        let json = serde_json::to_string(&config.credentials).unwrap();
        assert_eq!(
            json,
            r#"{"user_password":{"user":"svc","password":{"env":"NATS_PASSWORD"}}}"#
        );
        let config: NatsConfig =
            serde_json::from_str(r#"{"credentials":{"nkey":{"seed":{"file":"/run/nk"}}}}"#)
                .unwrap();
        assert_eq!(
            config.credentials,
            Credentials::nkey(Secret::file("/run/nk"))
        );
        assert_eq!(
            format!("{:?}", config.credentials),
            r#"NKey { seed: Secret(file "/run/nk") }"#
        );

        // Inline: left out, so what is read back has an empty secret.
        let json = serde_json::to_string(&Credentials::token("t0k3n-Zq9")).unwrap();
        assert_eq!(json, r#"{"token":{}}"#);
        assert_eq!(
            serde_json::from_str::<Credentials>(&json).unwrap(),
            Credentials::token("")
        );
    }

    #[tokio::test]
    async fn an_unreadable_secret_is_a_config_error_naming_where_it_was_looked_for() {
        let variable = format!("BUS_NATS_UNIT_UNSET_{}", std::process::id());
        let error = NatsConfig::default()
            .with_credentials(Credentials::user_password("svc", Secret::env(&variable)))
            .connect_options()
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(error.to_string().contains(&variable), "{error}");
        assert!(
            error.to_string().contains("user_password.password"),
            "{error}"
        );
        let error = NatsConfig::default()
            .with_credentials(Credentials::nkey(Secret::file("/nonexistent/bus/nats.nk")))
            .connect_options()
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(
            error.to_string().contains("/nonexistent/bus/nats.nk"),
            "{error}"
        );
    }
}
