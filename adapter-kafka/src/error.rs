//! rdkafka errors as `bus` errors, the rdkafka error kept as the typed source.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::{Error, ErrorKind, Result};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::ClientContext;

use crate::oauth::Auth;
use crate::KafkaConfig;

/// Maps `error`, raised while doing `what`, to a bus error of the matching kind.
pub(crate) fn map(error: KafkaError, what: impl Into<String>) -> Error {
    let kind = error
        .rdkafka_error_code()
        .map_or(ErrorKind::Other, code_kind);
    let kind = match &error {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => ErrorKind::Config,
        KafkaError::Canceled => ErrorKind::Closed,
        _ => kind,
    };
    Error::with_source(kind, format!("{}: {error}", what.into()), error)
}

/// Maps an error creating a client with `config`. librdkafka reports a client key it could
/// not load (encrypted with another password, or without `ssl_key_password`) as OpenSSL's
/// "PEM lib": the message then says what to check.
pub(crate) fn creating(error: KafkaError, what: &str, config: &KafkaConfig) -> Error {
    let text = error.to_string();
    match &config.ssl_key_location {
        Some(key) if text.contains("ssl.key.location failed") => {
            let check = if config.ssl_key_password.is_some() {
                "is ssl_key_password the key's password?"
            } else {
                "an encrypted key needs ssl_key_password"
            };
            Error::with_source(
                ErrorKind::Config,
                format!("{what}: {text} (the client key `{key}` cannot be loaded: {check})"),
                error,
            )
        }
        _ => map(error, what),
    }
}

/// A client context that keeps the last error librdkafka reported on its own (a failed TLS
/// handshake, a refused SASL login): a failed metadata request only says "transport failure".
/// It hands out OAUTHBEARER tokens as every client of the adapter does.
#[derive(Debug, Default)]
struct LastError {
    reason: Arc<Mutex<Option<String>>>,
    auth: Auth,
}

impl ClientContext for LastError {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        config: Option<&str>,
    ) -> std::result::Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        self.auth.generate(config)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka's reasons name the broker and the TLS/SASL failure, never a secret.
        tracing::warn!(%error, reason, "librdkafka");
        let mut last = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        // "0/1 brokers are down" follows the reason that brought them down: keep that one.
        if last.is_none() || error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            *last = Some(reason.to_owned());
        }
    }
}

/// Asks the brokers for metadata with `config`'s connection settings, and says why not when
/// they do not answer within `timeout`: a certificate librdkafka refused is a `Config` error,
/// a failed SASL login or a client certificate the broker refused `Rejected`, anything else
/// as [`map`] says; the message ends with librdkafka's last reported reason. A failure of the
/// OAUTHBEARER token provider ends the wait at once, as the provider's error. Blocks the
/// thread.
pub(crate) fn probe(config: &KafkaConfig, timeout: Duration) -> Result<()> {
    const WHAT: &str = "connecting to Kafka";
    let auth = Auth::new(config.token_provider());
    let last = LastError {
        reason: Arc::default(),
        auth: auth.clone(),
    };
    let reported = last.reason.clone();
    let client: FutureProducer<LastError> = config
        .probe_config()?
        .create_with_context(last)
        .map_err(|e| creating(e, WHAT, config))?;
    // Asked in slices, so that a provider's failure (served by the producer's polling thread
    // meanwhile) is seen as soon as it happens.
    let deadline = Instant::now() + timeout;
    let error = loop {
        let slice = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(500));
        let asked = Instant::now();
        match client.client().fetch_metadata(None, slice) {
            Ok(_) => return Ok(()),
            Err(error) => {
                if let Some(failure) = auth.take_failure() {
                    return Err(failure);
                }
                // A refused certificate or login does not become right by waiting.
                let refused = reported
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_deref()
                    .and_then(refusal)
                    .is_some();
                if refused || Instant::now() >= deadline {
                    break error;
                }
                // Not a busy loop where librdkafka answers at once (no broker known yet).
                if asked.elapsed() < Duration::from_millis(10) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    };
    let last = reported.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(reason) = last else {
        return Err(map(error, WHAT));
    };
    let kind = refusal(&reason).unwrap_or_else(|| map(error.clone(), WHAT).kind());
    Err(Error::with_source(
        kind,
        format!("{WHAT}: {error}; last broker error: {reason}"),
        error,
    ))
}

/// The kind of a connection failure librdkafka reported that is definite: the broker's
/// certificate refused here (`Config`), or the login or client certificate refused by the
/// broker (`Rejected`). `None` for anything that may pass (a broker not up yet).
fn refusal(reason: &str) -> Option<ErrorKind> {
    if reason.contains("SSL handshake failed") || reason.contains("certificate verify") {
        Some(ErrorKind::Config)
    } else if reason.contains("SASL authentication")
        || reason.contains("Authentication failed")
        // TLS alerts of a broker that refused (or missed) our client certificate.
        || reason.contains("alert certificate required")
        || reason.contains("alert bad certificate")
        || reason.contains("alert unknown ca")
    {
        Some(ErrorKind::Rejected)
    } else {
        None
    }
}

fn code_kind(code: RDKafkaErrorCode) -> ErrorKind {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageSizeTooLarge | C::InvalidMessageSize => ErrorKind::PayloadTooLarge,
        C::MessageTimedOut | C::OperationTimedOut | C::RequestTimedOut => ErrorKind::Timeout,
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => ErrorKind::NotFound,
        C::QueueFull => ErrorKind::Backpressure,
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::NetworkException
        | C::Resolve
        | C::NotLeaderForPartition
        | C::LeaderNotAvailable
        | C::NotCoordinator
        | C::CoordinatorNotAvailable
        | C::CoordinatorLoadInProgress => ErrorKind::Connection,
        C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::InvalidRecord
        | C::PolicyViolation => ErrorKind::Rejected,
        C::InvalidTopic | C::InvalidConfig | C::InvalidArgument => ErrorKind::Config,
        _ => ErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_typed_source() {
        let err = map(
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            "publishing to `t`",
        );
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
        let source = err.source_ref().unwrap().downcast_ref::<KafkaError>();
        assert!(source.is_some());
        let err = map(
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
            "x",
        );
        assert!(err.is_retryable());
    }
}
