//! Configuration of the SQS adapter.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bus_core::secrets::Secret;
use bus_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use url::Url;

/// A function that adjusts the shared AWS configuration loader (credentials providers, retry
/// and timeout settings, HTTP client, …) before the SQS and SNS clients are built.
pub type LoaderHook =
    Arc<dyn Fn(aws_config::ConfigLoader) -> aws_config::ConfigLoader + Send + Sync>;

/// A function that adjusts the SQS client's configuration builder: the escape hatch to every
/// `aws_sdk_sqs::Config` setting this configuration does not name.
pub type SqsConfigHook =
    Arc<dyn Fn(aws_sdk_sqs::config::Builder) -> aws_sdk_sqs::config::Builder + Send + Sync>;

/// SQS's largest message: body plus message attributes (names, types and values), in bytes.
pub const SQS_MAX_MESSAGE_BYTES: usize = 262_144;

/// The smallest [`SqsConfig::max_message_bytes`] accepted: a dead letter cut to its last
/// resort (every `bus-dlq-*` header, the trace context and the envelope fields shortened)
/// always fits in it, so no message is left that can be neither handled nor dead-lettered.
pub const SQS_MIN_MESSAGE_BYTES: usize = 16 * 1024;

/// The longest a message can be kept invisible: SQS's limit of 12 hours, in seconds.
pub const SQS_MAX_VISIBILITY_SECS: u32 = 43_200;

/// Where the credentials come from, in the order [`SqsConfig`] chooses them (see
/// [`SqsConfig::credentials_source`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CredentialsSource {
    /// [`SqsConfig::access_key_id`] and [`SqsConfig::secret_access_key`] (and
    /// [`SqsConfig::session_token`]).
    Static,
    /// The named profile of the shared AWS config and credentials files
    /// ([`SqsConfig::profile`]).
    Profile,
    /// The AWS SDK's default chain: environment, profile files (`AWS_PROFILE`), SSO, web
    /// identity, container and instance roles.
    DefaultChain,
    /// Dummy credentials, for a local server on a loopback endpoint when nothing else is
    /// configured (no key, profile or role here, neither `AWS_ACCESS_KEY_ID` nor `AWS_PROFILE`
    /// in the environment).
    LocalTest,
}

/// How to reach SQS and SNS and how to use them.
///
/// Reads through serde (an `[sqs]` section of `BusConfig`) or from an `sqs://` URL
/// ([`SqsConfig::from_url`]). Without an endpoint the AWS SDK's defaults apply: the region and
/// credentials come from the environment, profile files or instance metadata, exactly as for
/// any AWS program. With an endpoint (a local server such as moto, or a VPC endpoint) the
/// region still matters for signing. Credentials: static keys, a [`profile`](Self::profile),
/// or the default chain, optionally used to assume a [`role_arn`](Self::role_arn) (see
/// [`credentials_source`](Self::credentials_source)). An `https` endpoint is verified against
/// the system's roots, or [`tls_ca`](Self::tls_ca). The secret key and session token never
/// appear in `Debug` output, errors or logs; given inline they are not serialized, given as
/// a [`Secret`] reference (environment variable or file) the reference is.
///
/// ```
/// use adapter_sqs::SqsConfig;
/// let config = SqsConfig::from_url("sqs://127.0.0.1:4566?region=us-east-1")
///     .unwrap()
///     .with_credentials("test", "s3cret")
///     .with_pollers(4);
/// assert_eq!(config.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SqsConfig {
    /// The endpoint URL of both SQS and SNS (`http://127.0.0.1:4566` for a local server);
    /// `None` for AWS's own endpoints.
    pub endpoint: Option<String>,
    /// The AWS region; `None` takes it from the environment (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// The access key id; with [`secret_access_key`](Self::secret_access_key) replaces the
    /// default credential chain.
    pub access_key_id: Option<String>,
    /// The secret access key: inline (never printed, and not serialized), or a reference to
    /// an environment variable or file read when connecting (`{ env = "NAME" }`,
    /// `{ file = "/path" }`), which is serialized as the reference.
    #[serde(skip_serializing_if = "Secret::is_inline_or_none")]
    pub secret_access_key: Option<Secret>,
    /// A session token for temporary credentials, given like
    /// [`secret_access_key`](Self::secret_access_key).
    #[serde(skip_serializing_if = "Secret::is_inline_or_none")]
    pub session_token: Option<Secret>,
    /// The profile of the shared AWS config and credentials files (`~/.aws/config`,
    /// `~/.aws/credentials`, or `AWS_CONFIG_FILE` and `AWS_SHARED_CREDENTIALS_FILE`) whose
    /// credentials and region to use, instead of `AWS_PROFILE` or `default`. Ignored for
    /// credentials when static keys are given.
    pub profile: Option<String>,
    /// An IAM role to assume (`sts:AssumeRole`) with the credentials chosen otherwise (static
    /// keys, profile or default chain); the role's temporary credentials sign every call and
    /// are renewed before they expire.
    pub role_arn: Option<String>,
    /// The session name of the assumed role (shown in CloudTrail); default `bus-<uuid>`.
    pub role_session_name: Option<String>,
    /// The external id the role's trust policy may require.
    pub external_id: Option<String>,
    /// The STS endpoint used to assume [`role_arn`](Self::role_arn); `None`: the SDK's own
    /// (AWS's regional STS, or `AWS_ENDPOINT_URL_STS`). [`endpoint`](Self::endpoint) is for
    /// SQS and SNS only.
    pub sts_endpoint: Option<String>,
    /// The CA certificates (a PEM file's path, or PEM text) that the endpoint's TLS
    /// certificate must chain to, instead of the system's roots. Setting it makes an `sqs://`
    /// URL's endpoint `https`.
    pub tls_ca: Option<String>,
    /// A name the endpoint's certificate may be valid for besides the endpoint's host (a
    /// certificate for `sqs.internal` reached as `10.0.0.5`). Also makes the endpoint `https`.
    pub tls_server_name: Option<String>,
    /// How long connecting may take, in milliseconds: each TCP and TLS connect of the HTTP
    /// client, and the whole first call that checks the endpoint and credentials in
    /// [`SqsBroker::connect_with`](crate::SqsBroker::connect_with) (with its retries and
    /// credential lookups). Default 10,000.
    pub connect_timeout_ms: u64,
    /// Long-polling wait of each receive (`WaitTimeSeconds`), 0 to 20 seconds.
    pub wait_time_secs: u32,
    /// Messages per receive, send and delete call, 1 to 10 (SQS's batch limit).
    pub batch_size: u32,
    /// How long a received message stays invisible to other consumers before SQS redelivers
    /// it, in seconds (`VisibilityTimeout` of each receive); extend it with
    /// `Delivery::in_progress`.
    pub visibility_timeout_secs: u32,
    /// Concurrent receive loops per subscription.
    pub pollers: usize,
    /// How many received, unsettled deliveries a subscription buffers by default.
    pub prefetch: usize,
    /// Use FIFO queues and topics (`.fifo` names): per-key order through `MessageGroupId`,
    /// deduplication by envelope id.
    pub fifo: bool,
    /// On FIFO queues and topics, use the envelope id as `MessageDeduplicationId`, so SQS
    /// drops a second publish of the same envelope within its 5-minute window (a retried
    /// publish is not duplicated). `false`: a fresh id per publish call, every copy delivered
    /// (the idempotency middleware then handles copies).
    pub fifo_dedup_by_id: bool,
    /// Attach a native redrive policy to group and work queues: after this many receives SQS
    /// moves a message to the dead-letter queue itself. `None`: only `reject` dead-letters.
    pub max_receive_count: Option<u32>,
    /// Prepended to every queue and topic name `bus` creates (e.g. `dev-`), to share an
    /// account between environments.
    pub name_prefix: String,
    /// The CloudEvents `source` attribute of published messages.
    pub source: String,
    /// The largest message accepted, in bytes, counting the body (after encoding) and every
    /// message attribute. Larger messages fail with `PayloadTooLarge` before they are sent;
    /// dead letters are cut to fit. At least [`SQS_MIN_MESSAGE_BYTES`] (connecting with less
    /// fails with `ErrorKind::Config`).
    pub max_message_bytes: usize,
    /// How long a queue's send batcher (one task per destination queue: sends, dead letters,
    /// replies) waits for another message before it stops, in milliseconds; the next send to
    /// that queue starts a new one. Default 60,000; at least 1.
    pub sender_idle_ms: u64,
    /// Adjusts the AWS configuration loader (code only, not serde).
    #[serde(skip)]
    pub loader: Option<LoaderHook>,
    /// Adjusts the SQS client configuration (code only, not serde).
    #[serde(skip)]
    pub sqs_config: Option<SqsConfigHook>,
}

impl Default for SqsConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            profile: None,
            role_arn: None,
            role_session_name: None,
            external_id: None,
            sts_endpoint: None,
            tls_ca: None,
            tls_server_name: None,
            connect_timeout_ms: 10_000,
            wait_time_secs: 20,
            batch_size: 10,
            visibility_timeout_secs: 30,
            pollers: 2,
            prefetch: 20,
            fifo: false,
            fifo_dedup_by_id: true,
            max_receive_count: None,
            name_prefix: String::new(),
            source: "bus".to_owned(),
            max_message_bytes: SQS_MAX_MESSAGE_BYTES,
            sender_idle_ms: 60_000,
            loader: None,
            sqs_config: None,
        }
    }
}

impl fmt::Debug for SqsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // PEM text is shown by its length only: it is public, but long.
        let ca = self.tls_ca.as_ref().map(|ca| {
            if ca.contains("-----BEGIN") {
                format!("<PEM, {} bytes>", ca.len())
            } else {
                ca.clone()
            }
        });
        f.debug_struct("SqsConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("session_token", &self.session_token)
            .field("profile", &self.profile)
            .field("role_arn", &self.role_arn)
            .field("role_session_name", &self.role_session_name)
            .field("external_id", &self.external_id)
            .field("sts_endpoint", &self.sts_endpoint)
            .field("tls_ca", &ca)
            .field("tls_server_name", &self.tls_server_name)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("wait_time_secs", &self.wait_time_secs)
            .field("batch_size", &self.batch_size)
            .field("visibility_timeout_secs", &self.visibility_timeout_secs)
            .field("pollers", &self.pollers)
            .field("prefetch", &self.prefetch)
            .field("fifo", &self.fifo)
            .field("fifo_dedup_by_id", &self.fifo_dedup_by_id)
            .field("max_receive_count", &self.max_receive_count)
            .field("name_prefix", &self.name_prefix)
            .field("source", &self.source)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("sender_idle_ms", &self.sender_idle_ms)
            .field("loader", &self.loader.as_ref().map(|_| "<hook>"))
            .field("sqs_config", &self.sqs_config.as_ref().map(|_| "<hook>"))
            .finish()
    }
}

impl PartialEq for SqsConfig {
    fn eq(&self, other: &Self) -> bool {
        fn same<T: ?Sized>(a: Option<&Arc<T>>, b: Option<&Arc<T>>) -> bool {
            match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
        }
        same(self.loader.as_ref(), other.loader.as_ref())
            && same(self.sqs_config.as_ref(), other.sqs_config.as_ref())
            && self.endpoint == other.endpoint
            && self.region == other.region
            && self.access_key_id == other.access_key_id
            && self.secret_access_key == other.secret_access_key
            && self.session_token == other.session_token
            && self.profile == other.profile
            && self.role_arn == other.role_arn
            && self.role_session_name == other.role_session_name
            && self.external_id == other.external_id
            && self.sts_endpoint == other.sts_endpoint
            && self.tls_ca == other.tls_ca
            && self.tls_server_name == other.tls_server_name
            && self.connect_timeout_ms == other.connect_timeout_ms
            && self.wait_time_secs == other.wait_time_secs
            && self.batch_size == other.batch_size
            && self.visibility_timeout_secs == other.visibility_timeout_secs
            && self.pollers == other.pollers
            && self.prefetch == other.prefetch
            && self.fifo == other.fifo
            && self.fifo_dedup_by_id == other.fifo_dedup_by_id
            && self.max_receive_count == other.max_receive_count
            && self.name_prefix == other.name_prefix
            && self.source == other.source
            && self.max_message_bytes == other.max_message_bytes
            && self.sender_idle_ms == other.sender_idle_ms
    }
}

impl SqsConfig {
    /// The configuration an `sqs://` URL describes (see [`apply_url`](Self::apply_url)).
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a URL that does not parse or is not `sqs://`, and for an
    /// unknown or invalid query parameter.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = Url::parse(url)
            .map_err(|e| Error::with_source(ErrorKind::Config, "the SQS URL does not parse", e))?;
        Self::default().apply_url(&parsed)
    }

    /// Applies an `sqs://` URL onto this configuration.
    ///
    /// `sqs://host:port` sets the endpoint `http://host:port` (`https` with `tls=true`, or
    /// with `tls_ca` or `tls_server_name`); `sqs://` without a host keeps AWS's own endpoints.
    /// Query parameters: `region`, `access_key_id`, `secret_access_key`, `session_token`,
    /// `profile`, `role_arn`, `role_session_name`, `external_id`, `sts_endpoint`, `tls_ca`,
    /// `tls_server_name`, `connect_timeout_ms`, `wait_time_secs`, `batch_size`,
    /// `visibility_timeout_secs`, `pollers`, `prefetch`, `fifo`, `fifo_dedup_by_id`,
    /// `max_receive_count`,
    /// `name_prefix`, `source`, `max_message_bytes`, `sender_idle_ms`, `tls`.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for another scheme, an unknown parameter, or a bad value.
    pub fn apply_url(mut self, url: &Url) -> Result<Self> {
        if url.scheme() != "sqs" {
            return Err(Error::config(format!(
                "an SQS URL starts with `sqs://`, not `{}://`",
                url.scheme()
            )));
        }
        let mut tls = false;
        for (name, value) in url.query_pairs() {
            let number = || -> Result<u64> {
                value.parse::<u64>().map_err(|e| {
                    Error::with_source(
                        ErrorKind::Config,
                        format!("SQS URL: `{name}` must be a non-negative number"),
                        e,
                    )
                })
            };
            let flag = || -> Result<bool> {
                match &*value {
                    "true" | "1" | "yes" => Ok(true),
                    "false" | "0" | "no" => Ok(false),
                    _ => Err(Error::config(format!(
                        "SQS URL: `{name}` must be true or false"
                    ))),
                }
            };
            let small = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
            match &*name {
                "region" => self.region = Some(value.into_owned()),
                "access_key_id" => self.access_key_id = Some(value.into_owned()),
                "secret_access_key" => {
                    self.secret_access_key = Some(Secret::Inline(value.into_owned()));
                }
                "session_token" => self.session_token = Some(Secret::Inline(value.into_owned())),
                "profile" => self.profile = Some(value.into_owned()),
                "role_arn" => self.role_arn = Some(value.into_owned()),
                "role_session_name" => self.role_session_name = Some(value.into_owned()),
                "external_id" => self.external_id = Some(value.into_owned()),
                "sts_endpoint" => self.sts_endpoint = Some(value.into_owned()),
                "tls_ca" => {
                    self.tls_ca = Some(value.into_owned());
                    tls = true;
                }
                "tls_server_name" => {
                    self.tls_server_name = Some(value.into_owned());
                    tls = true;
                }
                "connect_timeout_ms" => self.connect_timeout_ms = number()?.max(1),
                "wait_time_secs" => self.wait_time_secs = small(number()?).min(20),
                "batch_size" => self.batch_size = small(number()?).clamp(1, 10),
                "visibility_timeout_secs" => {
                    self.visibility_timeout_secs = small(number()?).min(SQS_MAX_VISIBILITY_SECS);
                }
                "pollers" => self.pollers = usize::try_from(number()?).unwrap_or(1).max(1),
                "prefetch" => self.prefetch = usize::try_from(number()?).unwrap_or(1).max(1),
                "fifo" => self.fifo = flag()?,
                "fifo_dedup_by_id" => self.fifo_dedup_by_id = flag()?,
                "max_receive_count" => self.max_receive_count = Some(small(number()?).max(1)),
                "name_prefix" => self.name_prefix = value.into_owned(),
                "source" => self.source = value.into_owned(),
                "max_message_bytes" => {
                    self.max_message_bytes = usize::try_from(number()?).unwrap_or(usize::MAX);
                    self.check_max_message_bytes()?;
                }
                "sender_idle_ms" => self.sender_idle_ms = number()?.max(1),
                "tls" => tls = flag()?,
                other => {
                    return Err(Error::config(format!(
                        "SQS URL: unknown query parameter `{other}`"
                    )))
                }
            }
        }
        match url.host_str() {
            Some(host) if !host.is_empty() => {
                let scheme = if tls { "https" } else { "http" };
                let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
                self.endpoint = Some(format!("{scheme}://{host}{port}"));
            }
            _ => {}
        }
        Ok(self)
    }

    /// Sets the endpoint of SQS and SNS.
    #[must_use]
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Sets the region.
    #[must_use]
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Sets static credentials instead of the default credential chain.
    #[must_use]
    pub fn with_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<Secret>,
    ) -> Self {
        self.access_key_id = Some(access_key_id.into());
        self.secret_access_key = Some(secret_access_key.into());
        self
    }

    /// Sets a session token, for temporary static credentials.
    #[must_use]
    pub fn with_session_token(mut self, token: impl Into<Secret>) -> Self {
        self.session_token = Some(token.into());
        self
    }

    /// Takes credentials (and the region, unless set) from this profile of the shared AWS
    /// config and credentials files (see [`profile`](Self::profile)).
    #[must_use]
    pub fn with_profile(mut self, profile: impl Into<String>) -> Self {
        self.profile = Some(profile.into());
        self
    }

    /// Assumes this IAM role with the credentials chosen otherwise (see
    /// [`role_arn`](Self::role_arn)).
    #[must_use]
    pub fn with_role(mut self, role_arn: impl Into<String>) -> Self {
        self.role_arn = Some(role_arn.into());
        self
    }

    /// Sets the session name of the assumed role.
    #[must_use]
    pub fn with_role_session_name(mut self, name: impl Into<String>) -> Self {
        self.role_session_name = Some(name.into());
        self
    }

    /// Sets the external id passed when assuming the role.
    #[must_use]
    pub fn with_external_id(mut self, id: impl Into<String>) -> Self {
        self.external_id = Some(id.into());
        self
    }

    /// Sets the STS endpoint used to assume the role (see
    /// [`sts_endpoint`](Self::sts_endpoint)).
    #[must_use]
    pub fn with_sts_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.sts_endpoint = Some(endpoint.into());
        self
    }

    /// Trusts these CA certificates (a PEM file's path, or PEM text) for the endpoint's TLS
    /// certificate instead of the system's roots.
    #[must_use]
    pub fn with_tls_ca(mut self, ca: impl Into<String>) -> Self {
        self.tls_ca = Some(ca.into());
        self
    }

    /// Accepts an endpoint certificate valid for `name` (see
    /// [`tls_server_name`](Self::tls_server_name)).
    #[must_use]
    pub fn with_tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls_server_name = Some(name.into());
        self
    }

    /// Sets the connect timeout (see [`connect_timeout_ms`](Self::connect_timeout_ms)); at
    /// least 1 ms.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout_ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self
    }

    /// The connect timeout, as a duration.
    #[must_use]
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }

    /// Where the credentials come from with this configuration, before a role is assumed
    /// with them ([`role_arn`](Self::role_arn)): static keys when both the key id and the
    /// secret are set; else the profile when one is named; else, for an endpoint on loopback
    /// (`127.0.0.1`, `::1`, `localhost`) with neither `AWS_ACCESS_KEY_ID` nor `AWS_PROFILE` in
    /// the environment and no role to assume, dummy credentials (a local server such as moto
    /// takes any); else the default chain.
    #[must_use]
    pub fn credentials_source(&self) -> CredentialsSource {
        if self.access_key_id.is_some() && self.secret_access_key.is_some() {
            CredentialsSource::Static
        } else if self.profile.is_some() {
            CredentialsSource::Profile
        } else if self.role_arn.is_none()
            && self.endpoint.as_deref().is_some_and(is_loopback)
            && std::env::var_os("AWS_ACCESS_KEY_ID").is_none()
            && std::env::var_os("AWS_PROFILE").is_none()
        {
            CredentialsSource::LocalTest
        } else {
            CredentialsSource::DefaultChain
        }
    }

    /// Sets the long-polling wait (at most 20 s).
    #[must_use]
    pub fn with_wait_time(mut self, wait: Duration) -> Self {
        self.wait_time_secs = u32::try_from(wait.as_secs()).unwrap_or(20).min(20);
        self
    }

    /// Sets the batch size (1 to 10).
    #[must_use]
    pub fn with_batch_size(mut self, size: u32) -> Self {
        self.batch_size = size.clamp(1, 10);
        self
    }

    /// Sets the visibility timeout of received messages (at most 12 hours).
    #[must_use]
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout_secs = u32::try_from(timeout.as_secs())
            .unwrap_or(SQS_MAX_VISIBILITY_SECS)
            .min(SQS_MAX_VISIBILITY_SECS);
        self
    }

    /// Sets the number of concurrent receive loops per subscription (at least 1).
    #[must_use]
    pub fn with_pollers(mut self, pollers: usize) -> Self {
        self.pollers = pollers.max(1);
        self
    }

    /// Sets the default prefetch (at least 1).
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Uses FIFO queues and topics.
    #[must_use]
    pub fn with_fifo(mut self, fifo: bool) -> Self {
        self.fifo = fifo;
        self
    }

    /// Sets whether FIFO deduplication uses the envelope id (see
    /// [`fifo_dedup_by_id`](Self::fifo_dedup_by_id)).
    #[must_use]
    pub fn with_fifo_dedup_by_id(mut self, by_id: bool) -> Self {
        self.fifo_dedup_by_id = by_id;
        self
    }

    /// Sets how long an idle send batcher waits before it stops (see
    /// [`sender_idle_ms`](Self::sender_idle_ms)); at least 1 ms.
    #[must_use]
    pub fn with_sender_idle(mut self, idle: Duration) -> Self {
        self.sender_idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).max(1);
        self
    }

    /// The idle time of send batchers, as a duration.
    #[must_use]
    pub fn sender_idle(&self) -> Duration {
        Duration::from_millis(self.sender_idle_ms.max(1))
    }

    /// Attaches a native redrive policy moving a message to the dead-letter queue after
    /// `count` receives.
    #[must_use]
    pub fn with_max_receive_count(mut self, count: u32) -> Self {
        self.max_receive_count = Some(count.max(1));
        self
    }

    /// Sets the prefix of every queue and topic name.
    #[must_use]
    pub fn with_name_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.name_prefix = prefix.into();
        self
    }

    /// Adjusts the AWS configuration loader before the clients are built.
    ///
    /// ```
    /// use adapter_sqs::SqsConfig;
    /// let config = SqsConfig::default().with_loader(|loader| loader.profile_name("billing"));
    /// assert!(config.loader.is_some());
    /// ```
    #[must_use]
    pub fn with_loader<F>(mut self, hook: F) -> Self
    where
        F: Fn(aws_config::ConfigLoader) -> aws_config::ConfigLoader + Send + Sync + 'static,
    {
        self.loader = Some(Arc::new(hook));
        self
    }

    /// Adjusts the SQS client's configuration builder.
    #[must_use]
    pub fn with_sqs_config<F>(mut self, hook: F) -> Self
    where
        F: Fn(aws_sdk_sqs::config::Builder) -> aws_sdk_sqs::config::Builder + Send + Sync + 'static,
    {
        self.sqs_config = Some(Arc::new(hook));
        self
    }

    /// Sets the largest message accepted (see
    /// [`max_message_bytes`](Self::max_message_bytes)); connecting fails when it is below
    /// [`SQS_MIN_MESSAGE_BYTES`].
    #[must_use]
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Checks what the builders and serde cannot refuse on their own.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for a `max_message_bytes` below [`SQS_MIN_MESSAGE_BYTES`].
    pub(crate) fn check_max_message_bytes(&self) -> Result<()> {
        if self.max_message_bytes < SQS_MIN_MESSAGE_BYTES {
            return Err(Error::config(format!(
                "SQS: `max_message_bytes` is {}, below the minimum of {SQS_MIN_MESSAGE_BYTES} \
                 (a dead letter must always fit)",
                self.max_message_bytes
            )));
        }
        Ok(())
    }

    /// Checks the credential and TLS settings that can be checked before connecting.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] for half a key pair, a session token without keys, or a TLS
    /// setting with a plain `http` endpoint.
    pub(crate) fn check_connection_settings(&self) -> Result<()> {
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(_), None) => {
                return Err(Error::config(
                    "SQS: `access_key_id` is set without `secret_access_key`",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    "SQS: `secret_access_key` is set without `access_key_id`",
                ))
            }
            _ => {}
        }
        if self.session_token.is_some() && self.access_key_id.is_none() {
            return Err(Error::config(
                "SQS: `session_token` is set without `access_key_id` and `secret_access_key`",
            ));
        }
        if self.tls_ca.is_some() || self.tls_server_name.is_some() {
            if let Some(endpoint) = &self.endpoint {
                if !endpoint.starts_with("https://") {
                    return Err(Error::config(format!(
                        "SQS: `tls_ca` or `tls_server_name` is set but the endpoint `{}` is not \
                         https",
                        bus_core::secrets::redact_url(endpoint)
                    )));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn visibility(&self) -> i32 {
        i32::try_from(self.visibility_timeout_secs.min(SQS_MAX_VISIBILITY_SECS)).unwrap_or(30)
    }
}

/// Whether an endpoint URL's host is a loopback address or `localhost`.
fn is_loopback(endpoint: &str) -> bool {
    let Ok(url) = Url::parse(endpoint) else {
        return false;
    };
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_sets_endpoint_region_and_options() {
        let c = SqsConfig::from_url(
            "sqs://127.0.0.1:4566?region=us-east-1&pollers=3&fifo=true&secret_access_key=hunter2",
        )
        .unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(c.region.as_deref(), Some("us-east-1"));
        assert_eq!(c.pollers, 3);
        assert!(c.fifo);
        assert!(!format!("{c:?}").contains("hunter2"));
        let aws = SqsConfig::from_url("sqs://?region=eu-west-1").unwrap();
        assert_eq!(aws.endpoint, None);
        let err = SqsConfig::from_url("sqs://h?colour=blue").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(SqsConfig::from_url("nats://h").is_err());
    }

    /// Before: any size was taken, and below the dead-letter headers a dead letter could not
    /// be cut to fit.
    #[test]
    fn max_message_bytes_has_a_minimum() {
        let err = SqsConfig::from_url("sqs://h?max_message_bytes=1000").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("16384"), "{err}");
        let c = SqsConfig::from_url("sqs://h?max_message_bytes=16384").unwrap();
        assert_eq!(c.max_message_bytes, SQS_MIN_MESSAGE_BYTES);
        let small = SqsConfig::default().with_max_message_bytes(100);
        assert_eq!(
            small.check_max_message_bytes().unwrap_err().kind(),
            ErrorKind::Config
        );
    }

    /// Before: no TLS or credential settings but static keys, and serde wrote the secret key
    /// and session token in clear.
    #[test]
    fn tls_and_credential_settings() {
        let c = SqsConfig::from_url(
            "sqs://localhost:4566?tls_ca=/etc/ca.pem&tls_server_name=sqs.internal&profile=p\
             &role_arn=arn:aws:iam::1:role/r&role_session_name=s&external_id=x\
             &sts_endpoint=https://sts.internal&connect_timeout_ms=500",
        )
        .unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("https://localhost:4566"));
        assert_eq!(c.tls_ca.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(c.tls_server_name.as_deref(), Some("sqs.internal"));
        assert_eq!(c.profile.as_deref(), Some("p"));
        assert_eq!(c.role_arn.as_deref(), Some("arn:aws:iam::1:role/r"));
        assert_eq!(c.external_id.as_deref(), Some("x"));
        assert_eq!(c.sts_endpoint.as_deref(), Some("https://sts.internal"));
        assert_eq!(c.connect_timeout(), Duration::from_millis(500));
        assert_eq!(c.credentials_source(), CredentialsSource::Profile);
        let keys = c.clone().with_credentials("AKID", "s3cret");
        assert_eq!(keys.credentials_source(), CredentialsSource::Static);
        let remote = SqsConfig::default().with_endpoint("https://vpce.example:443");
        assert_eq!(remote.credentials_source(), CredentialsSource::DefaultChain);

        let secret = SqsConfig::default()
            .with_credentials("AKID", "s3cretKEY")
            .with_session_token("s3cretTOKEN")
            .with_tls_ca("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        let json = serde_json::to_string(&secret).unwrap();
        let debug = format!("{secret:?}");
        for shown in [&json, &debug] {
            assert!(!shown.contains("s3cret"), "{shown}");
        }
        assert!(debug.contains("<PEM, "), "{debug}");
        assert_eq!(
            SqsConfig::default()
                .with_credentials("AKID", "x")
                .with_endpoint("http://h")
                .with_tls_ca("/ca.pem")
                .check_connection_settings()
                .unwrap_err()
                .kind(),
            ErrorKind::Config
        );
        let half = SqsConfig {
            access_key_id: Some("AKID".into()),
            ..SqsConfig::default()
        };
        assert_eq!(
            half.check_connection_settings().unwrap_err().kind(),
            ErrorKind::Config
        );
    }

    #[test]
    fn serde_reads_a_section() {
        let c: SqsConfig =
            serde_json::from_str(r#"{"region":"eu-west-1","batch_size":5}"#).unwrap();
        assert_eq!(c.batch_size, 5);
        assert_eq!(c.wait_time_secs, 20);
        assert!(serde_json::from_str::<SqsConfig>(r#"{"regoin":"x"}"#).is_err());
    }
}
