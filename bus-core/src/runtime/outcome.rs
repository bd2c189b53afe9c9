//! What a handler decided about one delivery.

use std::time::Duration;

use crate::{Error, Redeliver, Settlement};

/// What a [`Handler`](crate::runtime::Handler) decided about one delivery; the
/// [`Consumer`](crate::runtime::Consumer) settles the delivery accordingly.
///
/// | outcome | settlement |
/// |---|---|
/// | [`Ack`](Outcome::Ack) | [`Delivery::ack`](crate::Delivery::ack) |
/// | [`Retry`](Outcome::Retry) `{ after: None, .. }` | [`Delivery::nack`](crate::Delivery::nack)`(Redeliver::Now)` |
/// | [`Retry`](Outcome::Retry) `{ after: Some(d), .. }` | [`Delivery::nack`](crate::Delivery::nack)`(Redeliver::After(d))` |
/// | [`Reject`](Outcome::Reject) | [`Delivery::reject`](crate::Delivery::reject) with the error's text as reason |
///
/// A handler written with `?` returns `Result<(), Error>`, which converts: `Ok` is an ack, a
/// [retryable](Error::is_retryable) error a retry, any other error a rejection.
///
/// ```
/// use bus_core::{Error, ErrorKind, runtime::Outcome};
/// assert!(Outcome::from(Ok(())).is_ack());
/// let timeout = Outcome::from(Err(Error::timeout("database")));
/// assert!(timeout.is_retry());
/// let bad = Outcome::from(Err(Error::new(ErrorKind::Serialization, "not JSON")));
/// assert!(bad.is_reject());
/// ```
#[derive(Debug)]
#[non_exhaustive]
#[must_use = "an outcome settles a delivery only when returned to the consumer"]
pub enum Outcome {
    /// Processed: acknowledge the delivery.
    Ack,
    /// Not processed this time: the broker delivers it again, as the next attempt.
    Retry {
        /// Redeliver no sooner than this; `None` redelivers as soon as the broker can.
        after: Option<Duration>,
        /// Why the attempt failed.
        error: Error,
    },
    /// Never processable: move the message to the dead-letter queue.
    Reject {
        /// Why; its text becomes the dead letter's reason.
        error: Error,
    },
}

impl Outcome {
    /// Retry as soon as the broker can, because of `error`.
    pub fn retry(error: Error) -> Self {
        Outcome::Retry { after: None, error }
    }

    /// Retry no sooner than `after`, because of `error`.
    pub fn retry_after(after: Duration, error: Error) -> Self {
        Outcome::Retry {
            after: Some(after),
            error,
        }
    }

    /// Dead-letter the message, because of `error`.
    pub fn reject(error: Error) -> Self {
        Outcome::Reject { error }
    }

    /// Whether this is [`Outcome::Ack`].
    #[must_use]
    pub fn is_ack(&self) -> bool {
        matches!(self, Outcome::Ack)
    }

    /// Whether this is [`Outcome::Retry`].
    #[must_use]
    pub fn is_retry(&self) -> bool {
        matches!(self, Outcome::Retry { .. })
    }

    /// Whether this is [`Outcome::Reject`].
    #[must_use]
    pub fn is_reject(&self) -> bool {
        matches!(self, Outcome::Reject { .. })
    }

    /// The error of a failed attempt; `None` for [`Outcome::Ack`].
    #[must_use]
    pub fn error(&self) -> Option<&Error> {
        match self {
            Outcome::Ack => None,
            Outcome::Retry { error, .. } | Outcome::Reject { error } => Some(error),
        }
    }

    /// A short, stable, lower-case name for logs and metrics: `ack`, `retry` or `reject`.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Retry { .. } => "retry",
            Outcome::Reject { .. } => "reject",
        }
    }

    /// The settlement this outcome asks for, for a delivery tried `attempts` times.
    pub(crate) fn to_settlement(&self, attempts: u32) -> Settlement {
        match self {
            Outcome::Ack => Settlement::Ack,
            Outcome::Retry { after: None, .. } => Settlement::Nack(Redeliver::Now),
            Outcome::Retry {
                after: Some(after), ..
            } => Settlement::Nack(Redeliver::After(*after)),
            Outcome::Reject { error } => Settlement::Reject {
                reason: error.to_string(),
                attempts,
            },
        }
    }
}

impl From<Result<(), Error>> for Outcome {
    /// `Ok` acknowledges; an error retries when it [is retryable](Error::is_retryable) and
    /// rejects otherwise.
    fn from(result: Result<(), Error>) -> Self {
        match result {
            Ok(()) => Outcome::Ack,
            Err(error) if error.is_retryable() => Outcome::retry(error),
            Err(error) => Outcome::reject(error),
        }
    }
}

impl From<()> for Outcome {
    /// A handler that returns nothing has processed the message: [`Outcome::Ack`].
    fn from((): ()) -> Self {
        Outcome::Ack
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn result_converts_by_retryability() {
        assert!(Outcome::from(Ok(())).is_ack());
        assert!(Outcome::from(()).is_ack());
        let retry = Outcome::from(Err(Error::new(ErrorKind::Handler, "flaky")));
        assert!(matches!(retry, Outcome::Retry { after: None, .. }));
        let reject = Outcome::from(Err(Error::new(ErrorKind::Serialization, "bad")));
        assert_eq!(reject.error().unwrap().kind(), ErrorKind::Serialization);
        assert!(reject.is_reject());
    }

    #[test]
    fn outcome_maps_to_settlement() {
        let err = || Error::new(ErrorKind::Handler, "no");
        assert_eq!(Outcome::Ack.to_settlement(1), Settlement::Ack);
        assert_eq!(
            Outcome::retry(err()).to_settlement(1),
            Settlement::Nack(Redeliver::Now)
        );
        assert_eq!(
            Outcome::retry_after(Duration::from_secs(5), err()).to_settlement(1),
            Settlement::Nack(Redeliver::After(Duration::from_secs(5)))
        );
        assert_eq!(
            Outcome::reject(err()).to_settlement(1),
            Settlement::Reject {
                reason: "handler: no".into(),
                attempts: 1
            }
        );
    }
}
