//! The one error type of `bus`.

use std::borrow::Cow;
use std::fmt;

/// A boxed error as kept as an [`Error`]'s source ([`Error::source_ref`]): typed, so callers can downcast it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of every fallible `bus` operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarsely: match on it, or better, ask the predicates on [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The connection to the broker failed or was lost. Retryable.
    Connection,
    /// An operation did not complete in time (a request without reply, a publish not
    /// confirmed). Retryable.
    Timeout,
    /// A request found nobody serving its topic.
    NoResponders,
    /// A topic, queue or other named resource does not exist.
    NotFound,
    /// The payload (or the whole message) is larger than the broker accepts.
    PayloadTooLarge,
    /// The message carries more headers, or larger headers, than the broker accepts.
    HeadersTooLarge,
    /// A message could not be encoded or decoded.
    Serialization,
    /// The broker refused the operation (not routable, access denied, …).
    Rejected,
    /// The adapter cannot do this; its [`Capabilities`](crate::Capabilities) say so.
    Unsupported,
    /// The bus, subscription or delivery was closed before or during the operation.
    Closed,
    /// Configuration is invalid or names an adapter that is not available.
    Config,
    /// The broker (or in-process buffer) is full and the caller should slow down. Retryable.
    Backpressure,
    /// A message handler failed.
    Handler,
    /// Anything else, with the source kept.
    Other,
}

impl ErrorKind {
    /// A short, stable, lower-case name for logs and metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connection => "connection",
            ErrorKind::Timeout => "timeout",
            ErrorKind::NoResponders => "no_responders",
            ErrorKind::NotFound => "not_found",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::HeadersTooLarge => "headers_too_large",
            ErrorKind::Serialization => "serialization",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Closed => "closed",
            ErrorKind::Config => "config",
            ErrorKind::Backpressure => "backpressure",
            ErrorKind::Handler => "handler",
            ErrorKind::Other => "other",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every `bus` operation: a [`ErrorKind`], a message, and the typed cause.
///
/// The cause is kept as the original error value, so a caller can downcast it to the
/// client library's own error (`rdkafka`, `lapin`, the AWS SDK, …):
///
/// ```
/// use bus_core::{Error, ErrorKind};
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
/// let err = Error::with_source(ErrorKind::Connection, "connecting to the broker", io);
/// assert!(err.is_retryable());
/// let cause = err.source_ref().unwrap().downcast_ref::<std::io::Error>().unwrap();
/// assert_eq!(cause.kind(), std::io::ErrorKind::ConnectionRefused);
/// ```
pub struct Error {
    kind: ErrorKind,
    message: Cow<'static, str>,
    source: Option<BoxError>,
}

impl Error {
    /// An error of `kind` described by `message`.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An error of `kind` described by `message`, caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<Cow<'static, str>>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// What kind of error this is.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the cause.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The typed cause, for downcasting to the client library's error.
    #[must_use]
    pub fn source_ref(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }

    /// Takes the typed cause out of the error.
    #[must_use]
    pub fn into_source(self) -> Option<BoxError> {
        self.source
    }

    /// Whether trying the same operation again later may succeed: connection loss, timeouts,
    /// backpressure, and handler failures (which the retry middleware treats as transient
    /// unless told otherwise).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Connection
                | ErrorKind::Timeout
                | ErrorKind::Backpressure
                | ErrorKind::Handler
        )
    }

    /// Whether this is a [`ErrorKind::Timeout`].
    #[must_use]
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }

    /// Whether this is a [`ErrorKind::Closed`].
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.kind == ErrorKind::Closed
    }

    /// Whether this is a [`ErrorKind::Unsupported`].
    #[must_use]
    pub fn is_unsupported(&self) -> bool {
        self.kind == ErrorKind::Unsupported
    }

    /// Shorthand for an [`ErrorKind::Closed`] error.
    pub fn closed(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Closed, message)
    }

    /// Shorthand for an [`ErrorKind::Config`] error.
    pub fn config(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    /// Shorthand for an [`ErrorKind::Unsupported`] error.
    pub fn unsupported(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for an [`ErrorKind::Timeout`] error.
    pub fn timeout(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<serde_json::Error> for Error {
    fn from(error: serde_json::Error) -> Self {
        Error::with_source(
            ErrorKind::Serialization,
            format!("JSON codec failed: {error}"),
            error,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_kind_and_message() {
        let err = Error::new(ErrorKind::NotFound, "queue `orders` does not exist");
        assert_eq!(err.to_string(), "not_found: queue `orders` does not exist");
        assert!(!err.is_retryable());
    }

    #[test]
    fn std_source_chain_is_kept() {
        let io = std::io::Error::other("boom");
        let err = Error::with_source(ErrorKind::Other, "wrapped", io);
        let source = std::error::Error::source(&err).unwrap();
        assert_eq!(source.to_string(), "boom");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
    }
}
