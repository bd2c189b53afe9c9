//! SASL OAUTHBEARER tokens from the application: [`OAuthTokenProvider`], and the client
//! context through which every librdkafka client of a connection asks it for a token.
//!
//! librdkafka asks for a token when a client starts and again at 80 % of the token's lifetime,
//! by an event on the client's main queue: rdkafka answers it (calling
//! [`ClientContext::generate_oauth_token`]) only from that queue's poll. The producer and the
//! connection probe poll it on their own threads, a subscription's consumer on its worker
//! thread; a short-lived consumer must poll before it does anything ([`Auth::prime`]).
//! rdkafka's `AdminClient` never polls it (rust-rdkafka issue 757), so with a provider the
//! adapter creates no admin client (see `broker.rs`).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bus_core::{Error, Result};
use rdkafka::consumer::ConsumerContext;
use rdkafka::ClientContext;

/// Gives the tokens of SASL `OAUTHBEARER` (`sasl_mechanism = "OAUTHBEARER"`): set one with
/// [`KafkaConfig::with_oauth_token_provider`](crate::KafkaConfig::with_oauth_token_provider).
///
/// Every librdkafka client of a connection (the producer, the connection check, each
/// subscription's consumer) calls [`token`](Self::token) when it starts and again when 80 % of
/// the token's lifetime has passed, on that client's own polling thread (never on the async
/// runtime). It may block, but the client serves nothing else meanwhile: a provider that
/// fetches from an identity provider should cache the token and fetch a new one ahead of its
/// expiry.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use adapter_kafka::{OAuthToken, OAuthTokenProvider};
///
/// struct Fixed;
/// impl OAuthTokenProvider for Fixed {
///     fn token(&self, _config: Option<&str>) -> bus_core::Result<OAuthToken> {
///         let expires = SystemTime::now() + Duration::from_secs(3600);
///         Ok(OAuthToken::new("eyJhbGciOi…", "billing-service", expires))
///     }
/// }
/// ```
pub trait OAuthTokenProvider: Send + Sync {
    /// A token valid now. `config` is librdkafka's `sasl.oauthbearer.config`, when set (in
    /// [`client_options`](crate::KafkaConfig::client_options)).
    ///
    /// # Errors
    /// Whatever stops it from giving a token, of the kind that says why (an identity provider
    /// that cannot be reached: [`Connection`](bus_core::ErrorKind::Connection); one that refuses the
    /// client's credentials: [`Rejected`](bus_core::ErrorKind::Rejected)). `KafkaBroker::connect`
    /// returns it as the kind given, with this error as its source; a client that fails to
    /// refresh its token later asks again 10 seconds after, and logs the failure. The message
    /// is logged: it must not hold a secret.
    fn token(&self, config: Option<&str>) -> Result<OAuthToken>;
}

/// A token for SASL `OAUTHBEARER`, as an [`OAuthTokenProvider`] gives it. `Debug` does not
/// show its value.
///
/// rdkafka 0.39 cannot pass SASL extensions (RFC 7628 key-value pairs) with a token, so there
/// are none here.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OAuthToken {
    /// The token the client sends (`auth=Bearer <value>`): visible ASCII characters, spaces,
    /// tabs, CR and LF only (RFC 7628).
    pub value: String,
    /// The principal (user) the token is for, as the broker should see it; not empty.
    pub principal: String,
    /// When the token expires: librdkafka asks for a new one at 80 % of the time left.
    pub expires_at: SystemTime,
}

impl OAuthToken {
    /// A token `value` for `principal`, valid until `expires_at`.
    #[must_use]
    pub fn new(
        value: impl Into<String>,
        principal: impl Into<String>,
        expires_at: SystemTime,
    ) -> Self {
        Self {
            value: value.into(),
            principal: principal.into(),
            expires_at,
        }
    }

    /// Why librdkafka would refuse this token, in words that never hold its value (librdkafka's
    /// own message for a bad character quotes the whole token).
    fn check(&self) -> std::result::Result<i64, String> {
        let allowed = |c: char| matches!(c, '\x21'..='\x7e' | ' ' | '\t' | '\r' | '\n');
        if self.value.is_empty() {
            return Err("the token is empty".into());
        }
        if let Some(position) = self.value.chars().position(|c| !allowed(c)) {
            return Err(format!(
                "the token holds a character RFC 7628 does not allow (at character {position}; \
                 only visible ASCII, space, tab, CR and LF)"
            ));
        }
        if self.principal.is_empty() || self.principal.contains('\0') {
            return Err("the token's principal is empty or holds a NUL".into());
        }
        let expires = self
            .expires_at
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_millis()).ok())
            .unwrap_or(0);
        if self.expires_at <= SystemTime::now() {
            return Err(format!(
                "the token expired already (expires_at is {expires} ms after the Unix epoch)"
            ));
        }
        Ok(expires)
    }
}

impl fmt::Debug for OAuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthToken")
            .field("value", &bus_core::secrets::REDACTED)
            .field("principal", &self.principal)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The provider a configuration holds: compared by identity, so that `KafkaConfig` stays
/// `PartialEq`.
#[derive(Clone)]
pub(crate) struct TokenProvider(pub(crate) Arc<dyn OAuthTokenProvider>);

impl PartialEq for TokenProvider {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TokenProvider {}

/// The context of every client the adapter creates (or the part of it that the consumer's
/// own context delegates to): hands librdkafka the provider's tokens, and keeps the provider's
/// last failure for the connection check to report.
#[derive(Clone, Default)]
pub(crate) struct Auth {
    provider: Option<Arc<dyn OAuthTokenProvider>>,
    /// The provider's last failure (or why its token was refused), taken by the probe.
    failure: Arc<Mutex<Option<Error>>>,
    /// How many tokens this client was given.
    given: Arc<AtomicU64>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("provider", &self.provider.as_ref().map(|_| "set"))
            .field("given", &self.given.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// A context for one client, asking `provider` for its tokens.
    pub(crate) fn new(provider: Option<&TokenProvider>) -> Self {
        Self {
            provider: provider.map(|p| p.0.clone()),
            ..Self::default()
        }
    }

    /// The provider's failure since the last call, if any.
    pub(crate) fn take_failure(&self) -> Option<Error> {
        self.failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Serves the first token request of a client that nothing polls yet: calls `poll` (one
    /// short poll of the client's main queue) until the client was given a token, the
    /// provider failed, or `within` passed. Without it a consumer's synchronous commit fails,
    /// the client never logged in. Nothing to do without a provider.
    pub(crate) fn prime(&self, within: Duration, mut poll: impl FnMut()) {
        if self.provider.is_none() {
            return;
        }
        let deadline = Instant::now() + within;
        while self.given.load(Ordering::SeqCst) == 0
            && self
                .failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_none()
            && Instant::now() < deadline
        {
            poll();
        }
    }

    fn fail(&self, error: Error) -> Box<dyn std::error::Error> {
        // librdkafka reports this text as the reason of its authentication error.
        let text = error.to_string();
        tracing::warn!(error = %text, "Kafka OAUTHBEARER token");
        *self
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
        text.into()
    }

    /// The token librdkafka asked for, as rdkafka passes it on.
    pub(crate) fn generate(
        &self,
        config: Option<&str>,
    ) -> std::result::Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        let Some(provider) = &self.provider else {
            return Err(self.fail(Error::config(
                "kafka: sasl_mechanism is OAUTHBEARER but no token provider is set \
                 (KafkaConfig::with_oauth_token_provider)",
            )));
        };
        let token = match provider.token(config) {
            Ok(token) => token,
            Err(e) => {
                let kind = e.kind();
                let message = format!(
                    "kafka: the OAUTHBEARER token provider failed: {}",
                    e.message()
                );
                return Err(self.fail(Error::with_source(kind, message, e)));
            }
        };
        let lifetime_ms = token.check().map_err(|why| {
            self.fail(Error::config(format!(
                "kafka: the OAUTHBEARER token provider gave a token librdkafka cannot use: {why}"
            )))
        })?;
        self.given.fetch_add(1, Ordering::SeqCst);
        Ok(rdkafka::client::OAuthToken {
            token: token.value,
            principal_name: token.principal,
            lifetime_ms,
        })
    }
}

impl ClientContext for Auth {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        config: Option<&str>,
    ) -> std::result::Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        self.generate(config)
    }
}

impl ConsumerContext for Auth {}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_core::ErrorKind;

    struct Gives(std::result::Result<OAuthToken, ErrorKind>);

    impl OAuthTokenProvider for Gives {
        fn token(&self, _config: Option<&str>) -> Result<OAuthToken> {
            self.0
                .clone()
                .map_err(|kind| Error::new(kind, "identity provider down"))
        }
    }

    fn auth(gives: std::result::Result<OAuthToken, ErrorKind>) -> Auth {
        Auth::new(Some(&TokenProvider(Arc::new(Gives(gives)))))
    }

    fn in_an_hour() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    #[test]
    fn a_token_goes_to_librdkafka_as_given() {
        let expires = in_an_hour();
        let auth = auth(Ok(OAuthToken::new("tok-Zq9", "svc", expires)));
        let Ok(given) = auth.generate(Some("scope=x")) else {
            panic!("no token")
        };
        assert_eq!(given.token, "tok-Zq9");
        assert_eq!(given.principal_name, "svc");
        let ms = expires.duration_since(UNIX_EPOCH).unwrap().as_millis();
        assert_eq!(given.lifetime_ms, i64::try_from(ms).unwrap());
        assert!(auth.take_failure().is_none());
        assert_eq!(auth.given.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_failure_keeps_its_kind_and_a_bad_token_never_shows() {
        let failing = auth(Err(ErrorKind::Connection));
        let Err(text) = failing.generate(None) else {
            panic!("a token from a failing provider")
        };
        let text = text.to_string();
        assert!(text.contains("identity provider down"), "{text}");
        let failure = failing.take_failure().unwrap();
        assert_eq!(failure.kind(), ErrorKind::Connection);
        assert!(failure.source_ref().unwrap().is::<Error>());

        for (token, why) in [
            (
                OAuthToken::new("Zq9\u{7f}secret", "svc", in_an_hour()),
                "character",
            ),
            (OAuthToken::new("", "svc", in_an_hour()), "empty"),
            (OAuthToken::new("Zq9secret", "", in_an_hour()), "principal"),
            (
                OAuthToken::new(
                    "Zq9secret",
                    "svc",
                    SystemTime::now() - Duration::from_secs(1),
                ),
                "expired",
            ),
        ] {
            let refused = auth(Ok(token.clone()));
            let Err(text) = refused.generate(None) else {
                panic!("a token librdkafka would refuse was handed on: {token:?}")
            };
            let text = text.to_string();
            let failure = refused.take_failure().unwrap();
            assert_eq!(failure.kind(), ErrorKind::Config, "{failure}");
            assert!(text.contains(why), "{text}");
            assert!(!text.contains("Zq9"), "{text}");
            assert!(!format!("{token:?}").contains("Zq9"));
        }

        let none = Auth::new(None);
        assert!(none.generate(None).is_err());
        assert_eq!(none.take_failure().unwrap().kind(), ErrorKind::Config);
    }
}
