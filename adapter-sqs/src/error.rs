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
    let mut kind = kind_of(&error);
    let (code, detail) = match (error.code(), error.message()) {
        (Some(code), Some(message)) => (Some(code.to_owned()), format!("{code}: {message}")),
        (Some(code), None) => (Some(code.to_owned()), code.to_owned()),
        _ => match (before_the_server(&error), unparsed_error(&error)) {
            (Some((refused, detail)), _) => {
                kind = refused;
                (None, detail)
            }
            (None, Some((code, message))) => {
                let detail = format!("{code}: {message}");
                (Some(code), detail)
            }
            (None, None) => (None, error.to_string()),
        },
    };
    let refused_login = if code.as_deref().is_some_and(is_authentication_failure) {
        "authentication failed: "
    } else {
        ""
    };
    Error::with_source(kind, format!("{doing}: {refused_login}{detail}"), error)
}

/// Whether an AWS error code says the request's credentials were refused (unknown or expired
/// key, wrong secret, bad signature): [`ErrorKind::Rejected`], as a refused login is on every
/// adapter.
fn is_authentication_failure(code: &str) -> bool {
    matches!(
        code,
        "InvalidClientTokenId"
            | "UnrecognizedClientException"
            | "SignatureDoesNotMatch"
            | "InvalidSignatureException"
            | "IncompleteSignature"
            | "InvalidAccessKeyId"
            | "ExpiredToken"
            | "ExpiredTokenException"
            | "InvalidSecurity"
            | "MissingAuthenticationToken"
    )
}

/// The bus error kind of an SDK error.
pub(crate) fn kind_of<E: ProvideErrorMetadata, R: 'static>(error: &SdkError<E, R>) -> ErrorKind {
    match error {
        SdkError::ConstructionFailure(_) => ErrorKind::Config,
        SdkError::TimeoutError(_) => ErrorKind::Timeout,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => ErrorKind::Connection,
        SdkError::ServiceError(_) => match error.code() {
            Some(code) => kind_of_code(code),
            None => kind_of_code(&unparsed_error(error).unwrap_or_default().0),
        },
        _ => ErrorKind::Other,
    }
}

/// The code and message of an error response the SDK could not parse: one in another
/// protocol's format than the service's (moto answers authentication failures of the JSON
/// protocol SQS speaks in XML, and SNS's in SQS's XML layout), read from the body
/// (`<Code>`, `<Message>`) so that the error still says what the server said.
fn unparsed_error<E, R: 'static>(error: &SdkError<E, R>) -> Option<(String, String)> {
    let raw: &dyn std::any::Any = error.raw_response()?;
    let raw = raw.downcast_ref::<aws_sdk_sqs::config::http::HttpResponse>()?;
    let body = std::str::from_utf8(raw.body().bytes()?).ok()?;
    let element = |tag: &str| {
        let open = format!("<{tag}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{tag}>"))? + start;
        Some(body[start..end].trim().to_owned())
    };
    let code = element("Code")?;
    let message = element("Message").unwrap_or_else(|| format!("HTTP {}", raw.status()));
    Some((code, message))
}

/// A request that failed before the server could answer because of a setting rather than the
/// network: the endpoint's certificate refused, or no credentials found. Both are
/// [`ErrorKind::Config`] (trying again does not help), with what to check; `None` otherwise.
fn before_the_server<E, R>(error: &SdkError<E, R>) -> Option<(ErrorKind, String)>
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let SdkError::DispatchFailure(failure) = error else {
        return None;
    };
    let source: &(dyn std::error::Error + 'static) = failure.as_connector_error()?;
    if let Some(tls) = find::<rustls::Error>(source) {
        let hint = match tls {
            rustls::Error::InvalidCertificate(_) => {
                "the endpoint's TLS certificate was refused; check `tls_ca` (the CA that \
                 signed it; without it, the system's roots) and `tls_server_name` (a name it \
                 is valid for)"
            }
            _ => "the TLS handshake with the endpoint failed",
        };
        return Some((ErrorKind::Config, format!("{hint} ({tls})")));
    }
    if let Some(credentials) =
        find::<aws_credential_types::provider::error::CredentialsError>(source)
    {
        let reason = match find::<
            SdkError<
                aws_sdk_sts::operation::assume_role::AssumeRoleError,
                aws_sdk_sqs::config::http::HttpResponse,
            >,
        >(source)
        {
            // What STS said, rather than the SDK's "service error".
            Some(sts) => match (sts.code(), sts.message(), unparsed_error(sts)) {
                (Some(code), message, _) => {
                    format!(": AssumeRole: {code}: {}", message.unwrap_or_default())
                }
                (None, _, Some((code, message))) => format!(": AssumeRole: {code}: {message}"),
                _ => format!(": AssumeRole: {sts}"),
            },
            None => find_source(credentials).map_or_else(String::new, |e| format!(": {e}")),
        };
        return Some((
            ErrorKind::Config,
            format!(
                "no usable AWS credentials ({credentials}{reason}); check the keys, `profile`, \
                 `role_arn` or the environment"
            ),
        ));
    }
    None
}

/// The first error of type `T` in `error`'s chain, looking inside I/O errors too (whose
/// `source` skips the error they wrap).
fn find<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<T>() {
            return Some(found);
        }
        if let Some(inner) = current
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            let inner: &(dyn std::error::Error + 'static) = inner;
            if let Some(found) = find::<T>(inner) {
                return Some(found);
            }
        }
        next = current.source();
    }
    None
}

/// The source of a credentials error, which says why (a missing profile, a refused
/// `AssumeRole`).
fn find_source(
    error: &aws_credential_types::provider::error::CredentialsError,
) -> Option<&(dyn std::error::Error + 'static)> {
    std::error::Error::source(error)
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
        code if is_authentication_failure(code) => ErrorKind::Rejected,
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
        assert_eq!(kind_of_code("SignatureDoesNotMatch"), ErrorKind::Rejected);
        assert!(is_authentication_failure("InvalidClientTokenId"));
        assert!(!is_authentication_failure("AccessDenied"));
    }
}
