//! Keeping secrets out of output: one redaction for every broker URL that `bus` prints, puts in
//! an error, logs or shows in a `Debug`.
//!
//! A setting that carries a secret is a [`Secret`]: given inline it is never shown nor
//! serialized; given as a reference to an environment variable or a file, the reference is what
//! a serialized config holds, so such a config round-trips without the secret in it.
//!
//! [`redact_url`] hides a URL's password, a user part that stands alone (NATS and others take
//! a token there: `nats://<token>@host`), and the values of query parameters whose names say
//! they carry a secret ([`is_secret_name`]). A URL it cannot read with certainty (it does not
//! parse, or parses in a way that may have moved part of a password into the host, path or
//! query, as a raw `/` or `?` in a password does) is shown as its scheme and
//! [`UNREADABLE`] only. Every adapter and the facade use it, so a secret is hidden the same way
//! wherever it appears.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use url::Url;

use crate::Error;

/// What stands in for a hidden value.
pub const REDACTED: &str = "***";

/// What stands in for a URL that cannot be shown safely.
pub const UNREADABLE: &str = "<unreadable URL>";

/// Whether a query parameter or setting named `name` carries a secret: names containing
/// `password`, `passwd`, `secret`, `token`, `credential`, `signature`, `sasl`, `private`, or
/// named `pass`, `pwd`, `key`, `seed`, `nkey`, `jwt`, `sig` or ending in `_key` (so
/// `secret_access_key` and `api_key`, but not `tls_key_file`), ASCII case ignored.
#[must_use]
pub fn is_secret_name(name: &str) -> bool {
    const CONTAINED: &[&str] = &[
        "password",
        "passwd",
        "secret",
        "token",
        "credential",
        "signature",
        "sasl",
        "private",
    ];
    const WHOLE: &[&str] = &["pass", "pwd", "key", "seed", "nkey", "jwt", "sig"];
    let lower = name.to_ascii_lowercase();
    CONTAINED.iter().any(|s| lower.contains(s))
        || WHOLE.contains(&lower.as_str())
        || lower.ends_with("_key")
        || lower.ends_with("-key")
}

/// The schemes whose user part without a password is only a user name (the password is then
/// given apart, as a [`Secret`]); for any other, a lone user part may be a token and is hidden.
const USER_NAME_SCHEMES: &[&str] = &["amqp", "amqps", "kafka"];

/// `url` safe to print: the password, a user part without a password (a token, except on
/// `amqp`, `amqps` and `kafka`, where it is the user name), and the
/// values of secret query parameters replaced by [`REDACTED`]; the scheme, user name, host,
/// port, path and other parameters kept, so the output still says where it connects.
///
/// ```
/// use bus_core::secrets::redact_url;
///
/// assert_eq!(
///     redact_url("amqp://guest:hunter2@127.0.0.1:5672/%2f?heartbeat=10"),
///     "amqp://guest:***@127.0.0.1:5672/%2f?heartbeat=10"
/// );
/// assert_eq!(redact_url("nats://s3cr3t-token@127.0.0.1:4222"), "nats://***@127.0.0.1:4222");
/// assert_eq!(
///     redact_url("sqs://127.0.0.1:4566?region=eu-west-1&secret_access_key=abc"),
///     "sqs://127.0.0.1:4566?region=eu-west-1&secret_access_key=***"
/// );
/// // A raw `/` in the password: not readable with certainty, so nothing but the scheme.
/// assert_eq!(redact_url("amqp://user:12/ab@host"), "amqp://<unreadable URL>");
/// ```
#[must_use]
pub fn redact_url(url: &str) -> String {
    let url = url.trim();
    let scheme = url.split_once("://").map(|(scheme, _)| scheme).filter(|s| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    let unreadable = || match scheme {
        Some(scheme) => format!("{scheme}://{UNREADABLE}"),
        None => UNREADABLE.to_owned(),
    };
    let Ok(mut parsed) = Url::parse(url) else {
        return unreadable();
    };
    // Whatever follows the authority must hold no `@`: one there means the parser took part of
    // the user information (a password with a raw `/`, `?` or `#`) for the path or query.
    let after_authority = &parsed[url::Position::BeforePath..];
    if after_authority.contains('@') || after_authority.contains("%40") {
        return unreadable();
    }
    if parsed.password().is_some() {
        if parsed.set_password(Some(REDACTED)).is_err() {
            return unreadable();
        }
    } else if !parsed.username().is_empty()
        && !USER_NAME_SCHEMES.contains(&parsed.scheme())
        && parsed.set_username(REDACTED).is_err()
    {
        return unreadable();
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(name, value)| {
                let value = if is_secret_name(&name) {
                    REDACTED.to_owned()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    if parsed.fragment().is_some() {
        parsed.set_fragment(None);
    }
    // Keep the marker readable rather than percent-encoded.
    parsed.as_str().replace("%2A%2A%2A", REDACTED)
}

/// A serde `serialize_with` for a URL setting: writes [`redact_url`] of it, so a serialized
/// configuration never holds the URL's password, token or secret parameters. Read back, such
/// a URL authenticates with [`REDACTED`] and is refused by the broker: give secrets at runtime
/// (a URL from the environment such as `BUS_URL`, or a file), not in a stored configuration.
///
/// ```
/// #[derive(serde::Serialize)]
/// struct Config {
///     #[serde(serialize_with = "bus_core::secrets::serialize_url")]
///     url: String,
/// }
/// let json = serde_json::to_string(&Config { url: "amqp://app:hunter2@mq/%2f".into() }).unwrap();
/// assert_eq!(json, r#"{"url":"amqp://app:***@mq/%2f"}"#);
/// ```
///
/// # Errors
/// Those of the serializer.
pub fn serialize_url<S: Serializer>(url: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redact_url(url))
}

/// A serde `serialize_with` for free-form client settings (a name → value map passed to a
/// broker's own client): writes every entry, the values of those whose names carry a secret
/// ([`is_secret_name`]) as [`REDACTED`].
///
/// # Errors
/// Those of the serializer.
pub fn serialize_settings<S: Serializer>(
    settings: &BTreeMap<String, String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut map = serializer.serialize_map(Some(settings.len()))?;
    for (name, value) in settings {
        if is_secret_name(name) {
            map.serialize_entry(name, REDACTED)?;
        } else {
            map.serialize_entry(name, value)?;
        }
    }
    map.end()
}

/// A secret setting (a password, token, key or seed): the value itself, or where to read it
/// when the client connects.
///
/// In a config file it is a string (the value, [`Secret::Inline`]), `{ env = "NAME" }`
/// ([`Secret::Env`]) or `{ file = "/path" }` ([`Secret::File`], the file's content with one
/// trailing newline removed). `Debug` never shows an inline value, and serialization writes
/// only the references: an inline secret is left out of a serialized config (fields holding
/// one use `skip_serializing_if = "Secret::is_inline"`), so a config that must round-trip
/// through a file names an environment variable or a file instead.
///
/// ```
/// use bus_core::secrets::Secret;
///
/// let inline: Secret = serde_json::from_str(r#""hunter2""#).unwrap();
/// assert_eq!(format!("{inline:?}"), "Secret(***)");
/// assert!(inline.is_inline());
///
/// let by_env: Secret = serde_json::from_str(r#"{"env": "BUS_DOC_SECRET"}"#).unwrap();
/// assert_eq!(serde_json::to_string(&by_env).unwrap(), r#"{"env":"BUS_DOC_SECRET"}"#);
/// std::env::set_var("BUS_DOC_SECRET", "hunter2");
/// assert_eq!(by_env.resolve().unwrap(), "hunter2");
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Secret {
    /// The value itself. Never shown nor serialized.
    Inline(String),
    /// Read from this environment variable when the client connects.
    Env {
        /// The variable's name.
        env: String,
    },
    /// Read from this file when the client connects (one trailing `\n` or `\r\n` removed).
    File {
        /// The file's path.
        file: PathBuf,
    },
}

impl Secret {
    /// A secret read from the environment variable `name`.
    #[must_use]
    pub fn env(name: impl Into<String>) -> Self {
        Secret::Env { env: name.into() }
    }

    /// A secret read from the file at `path`.
    #[must_use]
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Secret::File { file: path.into() }
    }

    /// Whether the value is given inline (and so is not serialized).
    #[must_use]
    pub fn is_inline(&self) -> bool {
        matches!(self, Secret::Inline(_))
    }

    /// [`is_inline`](Self::is_inline) for an optional secret: `skip_serializing_if` of an
    /// `Option<Secret>` field.
    #[must_use]
    #[allow(clippy::ref_option)] // serde passes `&Option<Secret>`.
    pub fn is_inline_or_none(secret: &Option<Secret>) -> bool {
        secret.as_ref().is_none_or(Secret::is_inline)
    }

    /// The value: the inline one, or the variable's or file's content now.
    ///
    /// # Errors
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) when the variable is unset or not
    /// UTF-8, or the file cannot be read; the message names the variable or file, never a
    /// value.
    pub fn resolve(&self) -> Result<String, Error> {
        match self {
            Secret::Inline(value) => Ok(value.clone()),
            Secret::Env { env } => std::env::var(env).map_err(|e| {
                Error::config(format!(
                    "secret: environment variable `{env}` cannot be read: {e}"
                ))
            }),
            Secret::File { file } => {
                let mut value = std::fs::read_to_string(file).map_err(|e| {
                    Error::config(format!(
                        "secret: file `{}` cannot be read: {e}",
                        file.display()
                    ))
                })?;
                if value.ends_with('\n') {
                    value.pop();
                    if value.ends_with('\r') {
                        value.pop();
                    }
                }
                Ok(value)
            }
        }
    }
}

impl Default for Secret {
    /// An empty inline secret.
    fn default() -> Self {
        Secret::Inline(String::new())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::Inline(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::Inline(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Inline(_) => write!(f, "Secret({REDACTED})"),
            Secret::Env { env } => write!(f, "Secret(env {env:?})"),
            Secret::File { file } => write!(f, "Secret(file {:?})", file.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way a secret was seen to leak, and what must be shown instead.
    #[test]
    fn secrets_never_survive() {
        let secret = "Zq9SECRETx";
        let cases = [
            format!("amqp://guest:{secret}@127.0.0.1:5672/%2f"),
            format!("amqps://guest:{secret}@broker.example:5671/vhost?heartbeat=5"),
            format!("nats://{secret}@127.0.0.1:4222"),
            format!("nats://user:{secret}@127.0.0.1:4222,127.0.0.1:4223"),
            format!("nats://127.0.0.1:4222?token={secret}"),
            format!("kafka://user:{secret}@127.0.0.1:9092?sasl_mechanism=PLAIN"),
            format!("kafka://127.0.0.1:9092?sasl_password={secret}"),
            format!("sqs://127.0.0.1:4566?secret_access_key={secret}&region=x"),
            format!("sqs://127.0.0.1:4566?session_token={secret}"),
            format!("amqp://user:12/{secret}@host"),
            format!("amqp://user:12?{secret}@host"),
            format!("amqp://user:12#{secret}@host"),
            format!("amqp://user:ab/{secret}@host:5672/%2f"),
            format!("amqp://user:{secret}@[bad-host/"),
            format!("no scheme {secret}"),
            format!("amqp://user:{secret}%40more@127.0.0.1"),
            format!("nats://127.0.0.1:4222#{secret}"),
            format!("http://h/?api_key={secret}&X-Amz-Signature={secret}"),
        ];
        for url in &cases {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} → {shown}");
        }
    }

    #[test]
    fn what_is_not_secret_is_kept() {
        assert_eq!(
            redact_url("amqp://guest:x@127.0.0.1:5672/%2f?heartbeat=10&tls_key_file=/k.pem"),
            "amqp://guest:***@127.0.0.1:5672/%2f?heartbeat=10&tls_key_file=%2Fk.pem"
        );
        assert_eq!(
            redact_url("kafka://127.0.0.1:9092"),
            "kafka://127.0.0.1:9092"
        );
        assert_eq!(redact_url("memory://"), "memory://");
        assert_eq!(redact_url("amqps://svc@mq/%2f"), "amqps://svc@mq/%2f");
        assert_eq!(redact_url("nats://svc@127.0.0.1"), "nats://***@127.0.0.1");
        assert_eq!(redact_url("garbage"), UNREADABLE);
        assert_eq!(redact_url("amqp://[bad"), "amqp://<unreadable URL>");
    }

    #[test]
    fn secret_names() {
        for name in [
            "password",
            "sasl_password",
            "SECRET_ACCESS_KEY",
            "token",
            "session_token",
            "api_key",
            "key",
            "nkey",
            "seed",
            "X-Amz-Credential",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in [
            "region",
            "heartbeat",
            "tls_key_file",
            "prefetch",
            "keyspace",
        ] {
            assert!(!is_secret_name(name), "{name}");
        }
    }
    #[test]
    fn a_secret_resolves_from_where_it_says_and_never_shows_inline() {
        let dir = std::env::temp_dir().join(format!("bus-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("password");
        std::fs::write(&path, "from-file-Zq9\r\n").unwrap();
        assert_eq!(Secret::file(&path).resolve().unwrap(), "from-file-Zq9");
        std::fs::remove_dir_all(&dir).unwrap();

        std::env::set_var("BUS_SECRET_TEST_VAR", "from-env-Zq9");
        assert_eq!(
            Secret::env("BUS_SECRET_TEST_VAR").resolve().unwrap(),
            "from-env-Zq9"
        );

        let missing = Secret::env("BUS_SECRET_TEST_UNSET").resolve().unwrap_err();
        assert_eq!(missing.kind(), crate::ErrorKind::Config);
        assert!(
            missing.to_string().contains("BUS_SECRET_TEST_UNSET"),
            "{missing}"
        );
        let missing = Secret::file("/nonexistent/bus/secret")
            .resolve()
            .unwrap_err();
        assert_eq!(missing.kind(), crate::ErrorKind::Config);

        let inline = Secret::from("Zq9SECRETx");
        assert!(!format!("{inline:?}").contains("Zq9"));
        assert_eq!(inline.resolve().unwrap(), "Zq9SECRETx");
    }

    #[test]
    fn only_references_are_serialized() {
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Config {
            #[serde(default, skip_serializing_if = "Secret::is_inline_or_none")]
            password: Option<Secret>,
        }
        let inline: Config = serde_json::from_str(r#"{"password": "Zq9SECRETx"}"#).unwrap();
        assert_eq!(inline.password, Some(Secret::from("Zq9SECRETx")));
        assert_eq!(serde_json::to_string(&inline).unwrap(), "{}");

        for json in [
            r#"{"password":{"env":"PW"}}"#,
            r#"{"password":{"file":"/run/pw"}}"#,
        ] {
            let config: Config = serde_json::from_str(json).unwrap();
            assert_eq!(serde_json::to_string(&config).unwrap(), json);
        }
        assert!(serde_json::from_str::<Config>(r#"{"password":{"vault":"x"}}"#).is_err());
    }
}
