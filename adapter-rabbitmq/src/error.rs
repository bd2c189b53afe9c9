//! lapin's errors as bus errors, with lapin's error kept as the typed source.

use bus_core::{Error, ErrorKind};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

use crate::endpoint::Endpoint;

/// Maps a lapin error met while `doing` something to a bus [`Error`]; the lapin error stays
/// reachable through [`Error::source_ref`] (downcast to [`lapin::Error`]).
pub(crate) fn map(error: lapin::Error, doing: &str) -> Error {
    let kind = kind_of(&error);
    Error::with_source(kind, format!("{doing}: {error}"), error)
}

/// Maps the failure of a connection attempt to `endpoint`: the server's certificate refused
/// here, and other TLS failures, are `Config` errors; the client certificate refused by the
/// server (its alert) and a refused login are `Rejected` (the login with "authentication
/// failed"); I/O
/// failures `Connection`. Messages name the URL without its password; lapin's error stays
/// the typed source (its own source, for TLS, the [`rustls::Error`]).
pub(crate) fn connecting(error: lapin::Error, endpoint: &Endpoint) -> Error {
    let shown = &endpoint.shown;
    let (kind, message) = match &error {
        lapin::Error::IOError(io) => match io.get_ref().and_then(|e| e.downcast_ref()) {
            Some(rustls::Error::InvalidCertificate(reason)) => (
                ErrorKind::Config,
                format!(
                    "TLS handshake with {shown} failed: the server's certificate was not \
                     accepted ({reason:?}); tls_ca must hold the CA that signed it, and \
                     tls_server_name (else the URL's host) a name it is valid for"
                ),
            ),
            // The server refused the client certificate (or wanted one): refused like a
            // wrong password, as on every adapter.
            Some(rustls::Error::AlertReceived(
                alert @ (rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::CertificateRequired
                | rustls::AlertDescription::UnknownCA
                | rustls::AlertDescription::CertificateUnknown
                | rustls::AlertDescription::CertificateRevoked
                | rustls::AlertDescription::CertificateExpired
                | rustls::AlertDescription::UnsupportedCertificate
                | rustls::AlertDescription::AccessDenied),
            )) => (
                ErrorKind::Rejected,
                format!(
                    "TLS handshake with {shown} failed: the server ended it with the alert \
                     {alert:?}: it does not accept the client certificate, or needs one \
                     (tls_cert, tls_key)"
                ),
            ),
            Some(rustls::Error::AlertReceived(alert)) => (
                ErrorKind::Config,
                format!(
                    "TLS handshake with {shown} failed: the server ended it with the alert \
                     {alert:?} (it may not accept the client certificate, or need one: \
                     tls_cert, tls_key)"
                ),
            ),
            Some(tls) => (
                ErrorKind::Config,
                format!("TLS handshake with {shown} failed: {tls}"),
            ),
            // Under TLS 1.3 the client's handshake is over before the server checks the
            // client certificate: a refusal can reach the client as a closed socket when it
            // writes, before it reads the alert.
            None if endpoint.sends_client_cert()
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                (
                    ErrorKind::Connection,
                    format!(
                        "connecting to {shown}: {error}: the server closed the connection \
                         during the handshake, as it does under TLS 1.3 when it does not \
                         accept the client certificate (tls_cert, tls_key)"
                    ),
                )
            }
            None => (
                ErrorKind::Connection,
                format!("connecting to {shown}: {error}"),
            ),
        },
        lapin::Error::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            ) || amqp
                .get_message()
                .as_str()
                .contains("authentication mechanism") =>
        {
            (
                ErrorKind::Rejected,
                format!(
                    "authentication failed: {shown} refused the login {}: {}",
                    endpoint.login(),
                    amqp.get_message()
                ),
            )
        }
        _ => (kind_of(&error), format!("connecting to {shown}: {error}")),
    };
    Error::with_source(kind, message, error)
}

/// The bus error kind of a lapin error.
pub(crate) fn kind_of(error: &lapin::Error) -> ErrorKind {
    match error {
        lapin::Error::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => ErrorKind::NotFound,
            AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE) => ErrorKind::PayloadTooLarge,
            // RabbitMQ refuses a message over `max_message_size` with 406 and this text.
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
                if amqp
                    .get_message()
                    .as_str()
                    .contains("larger than configured max size") =>
            {
                ErrorKind::PayloadTooLarge
            }
            AMQPErrorKind::Soft(_) => ErrorKind::Rejected,
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED) => ErrorKind::Connection,
            AMQPErrorKind::Hard(AMQPHardError::FRAMEERROR) => ErrorKind::PayloadTooLarge,
            AMQPErrorKind::Hard(_) => ErrorKind::Connection,
        },
        lapin::Error::ParsingError(_) | lapin::Error::SerialisationError(_) => {
            ErrorKind::Serialization
        }
        lapin::Error::InvalidProtocolVersion(_) => ErrorKind::Config,
        _ => ErrorKind::Connection,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError;

    #[test]
    fn broker_refusals_map_to_kinds_and_keep_the_source() {
        let too_big = lapin::Error::ProtocolError(AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - message size 200 is larger than configured max size 100".into(),
        ));
        let err = map(too_big, "publishing");
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
        assert!(err
            .source_ref()
            .unwrap()
            .downcast_ref::<lapin::Error>()
            .is_some());
        let missing = lapin::Error::ProtocolError(AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no queue 'q'".into(),
        ));
        assert_eq!(kind_of(&missing), ErrorKind::NotFound);
        let io = lapin::Error::IOError(std::sync::Arc::new(std::io::Error::other("reset")));
        assert!(map(io, "x").is_retryable());
    }

    /// The server refusing the client certificate is `Rejected`, as on every adapter; the
    /// server's certificate refused here is `Config`.
    #[test]
    fn tls_refusals_map_by_side() {
        let config = crate::RabbitMqConfig::new("amqps://127.0.0.1/%2f");
        let endpoint = crate::endpoint::Endpoint::resolve(&config).unwrap();
        let tls =
            |e: rustls::Error| lapin::Error::IOError(std::sync::Arc::new(std::io::Error::other(e)));
        let refused = connecting(
            tls(rustls::Error::AlertReceived(
                rustls::AlertDescription::BadCertificate,
            )),
            &endpoint,
        );
        assert_eq!(refused.kind(), ErrorKind::Rejected, "{refused}");
        assert!(
            refused.message().contains("client certificate"),
            "{refused}"
        );
        let untrusted = connecting(
            tls(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
            &endpoint,
        );
        assert_eq!(untrusted.kind(), ErrorKind::Config, "{untrusted}");
        let other_alert = connecting(
            tls(rustls::Error::AlertReceived(
                rustls::AlertDescription::ProtocolVersion,
            )),
            &endpoint,
        );
        assert_eq!(other_alert.kind(), ErrorKind::Config, "{other_alert}");
    }
}
