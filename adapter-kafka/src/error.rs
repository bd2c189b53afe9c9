//! rdkafka errors as `bus` errors, the rdkafka error kept as the typed source.

use bus_core::{Error, ErrorKind};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

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
