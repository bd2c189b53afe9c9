//! The AWS SDK's errors as bus errors, with the SDK's error kept as the typed source.

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use bus_core::{Error, ErrorKind};

/// Maps an SQS or SNS SDK error met while `doing` something to a bus [`Error`]. The source is
/// the SDK's own [`SdkError`] (downcast to `SdkError<E, R>` for the operation's `E`).
pub(crate) fn map<E, R>(error: SdkError<E, R>, doing: &str) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let kind = kind_of(&error);
    let detail = match (error.code(), error.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => error.to_string(),
    };
    Error::with_source(kind, format!("{doing}: {detail}"), error)
}

/// The bus error kind of an SDK error.
pub(crate) fn kind_of<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> ErrorKind {
    match error {
        SdkError::ConstructionFailure(_) => ErrorKind::Config,
        SdkError::TimeoutError(_) => ErrorKind::Timeout,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => ErrorKind::Connection,
        SdkError::ServiceError(_) => kind_of_code(error.code().unwrap_or_default()),
        _ => ErrorKind::Other,
    }
}

/// The bus error kind of an AWS error code (SQS's JSON and query protocols, and SNS).
pub(crate) fn kind_of_code(code: &str) -> ErrorKind {
    match code {
        "AWS.SimpleQueueService.NonExistentQueue"
        | "QueueDoesNotExist"
        | "NotFound"
        | "NotFoundException"
        | "ResourceNotFoundException" => ErrorKind::NotFound,
        "AccessDenied" | "AccessDeniedException" | "AuthorizationError" => ErrorKind::Rejected,
        "InvalidClientTokenId"
        | "UnrecognizedClientException"
        | "SignatureDoesNotMatch"
        | "InvalidSecurity"
        | "MissingAuthenticationToken" => ErrorKind::Config,
        "RequestThrottled"
        | "ThrottlingException"
        | "Throttling"
        | "OverLimit"
        | "KmsThrottled" => ErrorKind::Backpressure,
        "ServiceUnavailable" | "InternalError" | "InternalFailure" | "InternalErrorException" => {
            ErrorKind::Connection
        }
        "QueueDeletedRecently" | "AWS.SimpleQueueService.QueueDeletedRecently" => {
            ErrorKind::Backpressure
        }
        _ if code.contains("TooLong") || code.contains("TooLarge") => ErrorKind::PayloadTooLarge,
        _ => ErrorKind::Rejected,
    }
}

/// An error from a batch entry that failed while the call as a whole succeeded.
pub(crate) fn batch_entry(code: &str, message: Option<&str>, doing: &str) -> Error {
    Error::new(
        kind_of_code(code),
        format!("{doing}: {code}: {}", message.unwrap_or("")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds() {
        assert_eq!(
            kind_of_code("AWS.SimpleQueueService.NonExistentQueue"),
            ErrorKind::NotFound
        );
        assert_eq!(kind_of_code("QueueDoesNotExist"), ErrorKind::NotFound);
        assert_eq!(kind_of_code("MessageTooLong"), ErrorKind::PayloadTooLarge);
        assert_eq!(kind_of_code("RequestThrottled"), ErrorKind::Backpressure);
        assert_eq!(kind_of_code("InvalidParameterValue"), ErrorKind::Rejected);
    }
}
