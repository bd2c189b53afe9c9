//! From `async-nats` errors to `bus` errors: the kind chosen from the client's error kind, the
//! client's error kept as the typed source (downcast it to e.g.
//! `async_nats::jetstream::context::PublishError` to see everything the client said).

use std::time::Duration;

use async_nats::jetstream::context::{CreateStreamError, CreateStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
use async_nats::{rustls, ConnectErrorKind, RequestErrorKind};
use bus_core::{Error, ErrorKind};

/// A failed connect, with what went wrong in words a user can act on. The server's refusal
/// of the credentials is [`ErrorKind::Rejected`]; TLS settings that cannot work (a server
/// certificate the configured CA did not sign or that names another host, unreadable files)
/// are [`ErrorKind::Config`]; neither is retryable.
pub(crate) fn connect(error: async_nats::ConnectError, url: &str) -> Error {
    let (kind, why) = match error.kind() {
        ConnectErrorKind::ServerParse => (ErrorKind::Config, "the address is not valid".into()),
        ConnectErrorKind::Tls => (ErrorKind::Config, "the TLS settings cannot be used".into()),
        // Raised by the client before anything is sent: the seed cannot sign the nonce.
        ConnectErrorKind::Authentication => (
            ErrorKind::Config,
            "the NKey seed or credentials file cannot sign the server's nonce".into(),
        ),
        ConnectErrorKind::AuthorizationViolation => (
            ErrorKind::Rejected,
            "authentication failed: the server refused the credentials (authorization \
             violation)"
                .into(),
        ),
        ConnectErrorKind::TimedOut => (ErrorKind::Timeout, "no TCP connection in time".into()),
        _ => match tls_failure(&error) {
            Some(rustls::Error::InvalidCertificate(reason)) => (
                ErrorKind::Config,
                format!(
                    "TLS: the server's certificate is not accepted ({reason:?}): check tls_ca \
                     (the CA that signed it) and tls_server_name"
                ),
            ),
            Some(rustls::Error::AlertReceived(alert)) => (
                ErrorKind::Rejected,
                format!(
                    "TLS: the server refused the handshake ({alert:?}): it requires a client \
                     certificate (tls_cert, tls_key) signed by a CA it trusts"
                ),
            ),
            Some(other) => (ErrorKind::Connection, format!("TLS: {other}")),
            None => (ErrorKind::Connection, error.kind().to_string()),
        },
    };
    Error::with_source(kind, format!("connecting to NATS at {url}: {why}"), error)
}

/// The rustls error somewhere in `error`'s chain. `io::Error` hides the error it wraps from
/// `source()`, so each one is opened with `get_ref`.
fn tls_failure<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if let Some(found) = io.get_ref().and_then(|inner| tls_failure(inner)) {
                return Some(found);
            }
        }
        next = current.source();
    }
    None
}

pub(crate) fn publish(error: async_nats::jetstream::context::PublishError, subject: &str) -> Error {
    let kind = match error.kind() {
        PublishErrorKind::TimedOut => ErrorKind::Timeout,
        PublishErrorKind::BrokenPipe => ErrorKind::Connection,
        PublishErrorKind::StreamNotFound => ErrorKind::NotFound,
        PublishErrorKind::MaxAckPending => ErrorKind::Backpressure,
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            ErrorKind::Rejected
        }
        _ => ErrorKind::Connection,
    };
    Error::with_source(
        kind,
        format!("publishing to JetStream subject `{subject}`"),
        error,
    )
}

pub(crate) fn core_publish(error: async_nats::PublishError, subject: &str) -> Error {
    Error::with_source(
        ErrorKind::Connection,
        format!("publishing to NATS subject `{subject}`"),
        error,
    )
}

pub(crate) fn flush(error: async_nats::client::FlushError, subject: &str) -> Error {
    Error::with_source(
        ErrorKind::Connection,
        format!("flushing the publish to NATS subject `{subject}`"),
        error,
    )
}

pub(crate) fn subscribe(error: async_nats::SubscribeError, subject: &str) -> Error {
    Error::with_source(
        ErrorKind::Connection,
        format!("subscribing to NATS subject `{subject}`"),
        error,
    )
}

/// The server did not answer the round trip that confirms a subscription.
pub(crate) fn confirm_subscription(error: async_nats::RequestError, subject: &str) -> Error {
    let kind = match error.kind() {
        RequestErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Connection,
    };
    Error::with_source(
        kind,
        format!("confirming the subscription to NATS subject `{subject}` with the server"),
        error,
    )
}

pub(crate) fn stream(error: CreateStreamError, stream: &str) -> Error {
    let kind = match error.kind() {
        CreateStreamErrorKind::TimedOut => ErrorKind::Timeout,
        CreateStreamErrorKind::JetStreamUnavailable => ErrorKind::Unsupported,
        CreateStreamErrorKind::EmptyStreamName | CreateStreamErrorKind::InvalidStreamName => {
            ErrorKind::Config
        }
        // e.g. a stream whose storage differs from the configuration cannot be updated.
        CreateStreamErrorKind::JetStream(_) => ErrorKind::Rejected,
        _ => ErrorKind::Connection,
    };
    Error::with_source(
        kind,
        format!("creating or updating JetStream stream `{stream}`"),
        error,
    )
}

pub(crate) fn consumer(error: ConsumerError, consumer: &str, stream: &str) -> Error {
    let kind = match error.kind() {
        ConsumerErrorKind::TimedOut => ErrorKind::Timeout,
        ConsumerErrorKind::InvalidName | ConsumerErrorKind::InvalidConsumerType => {
            ErrorKind::Config
        }
        ConsumerErrorKind::JetStream(_) => ErrorKind::Rejected,
        _ => ErrorKind::Connection,
    };
    Error::with_source(
        kind,
        format!("creating JetStream consumer `{consumer}` on stream `{stream}`"),
        error,
    )
}

pub(crate) fn request(error: async_nats::RequestError, topic: &str, timeout: Duration) -> Error {
    match error.kind() {
        RequestErrorKind::TimedOut => Error::with_source(
            ErrorKind::Timeout,
            format!("no reply from `{topic}` within {timeout:?}"),
            error,
        ),
        RequestErrorKind::NoResponders => Error::with_source(
            ErrorKind::NoResponders,
            format!("nobody serves requests on `{topic}`"),
            error,
        ),
        _ => Error::with_source(
            ErrorKind::Connection,
            format!("sending a request to `{topic}`"),
            error,
        ),
    }
}

/// An acknowledgement (ack, nak, term, progress) the client could not send.
pub(crate) fn settle(error: async_nats::PublishError, what: &str) -> Error {
    Error::with_source(
        ErrorKind::Connection,
        format!("sending the {what} to JetStream"),
        error,
    )
}

pub(crate) fn closed() -> Error {
    Error::closed("the NATS connection of this bus was closed")
}

/// A stream looked up to count a backlog that the server could not give:
/// [`ErrorKind::NotFound`] if it does not exist.
pub(crate) fn get_stream(
    error: async_nats::jetstream::context::GetStreamError,
    stream: &str,
) -> Error {
    use async_nats::jetstream::context::GetStreamErrorKind;
    use async_nats::jetstream::ErrorCode;
    let kind = match error.kind() {
        GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND => {
            ErrorKind::NotFound
        }
        GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => ErrorKind::Config,
        GetStreamErrorKind::JetStream(_) => ErrorKind::Rejected,
        _ => ErrorKind::Connection,
    };
    Error::with_source(kind, format!("reading JetStream stream `{stream}`"), error)
}

/// A consumer's information the server could not give: [`ErrorKind::NotFound`] if the
/// consumer (or its stream) does not exist.
pub(crate) fn consumer_info(
    error: async_nats::jetstream::context::ConsumerInfoError,
    consumer: &str,
    stream: &str,
) -> Error {
    use async_nats::jetstream::context::ConsumerInfoErrorKind;
    use async_nats::jetstream::ErrorCode;
    let kind = match error.kind() {
        ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound => {
            ErrorKind::NotFound
        }
        ConsumerInfoErrorKind::JetStream(e)
            if e.error_code() == ErrorCode::CONSUMER_NOT_FOUND
                || e.error_code() == ErrorCode::STREAM_NOT_FOUND =>
        {
            ErrorKind::NotFound
        }
        ConsumerInfoErrorKind::TimedOut => ErrorKind::Timeout,
        ConsumerInfoErrorKind::InvalidName => ErrorKind::Config,
        ConsumerInfoErrorKind::JetStream(_) => ErrorKind::Rejected,
        _ => ErrorKind::Connection,
    };
    Error::with_source(
        kind,
        format!("reading JetStream consumer `{consumer}` of stream `{stream}`"),
        error,
    )
}

/// A stream's information (counts per subject) the server could not give.
pub(crate) fn stream_info(error: async_nats::jetstream::stream::InfoError, stream: &str) -> Error {
    use async_nats::jetstream::context::RequestErrorKind;
    let kind = match error.kind() {
        RequestErrorKind::TimedOut => ErrorKind::Timeout,
        RequestErrorKind::NoResponders => ErrorKind::Unsupported,
        _ => ErrorKind::Connection,
    };
    Error::with_source(kind, format!("reading JetStream stream `{stream}`"), error)
}
