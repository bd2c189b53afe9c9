//! The OpenTelemetry messaging semantic-convention names `bus` emits, and its own few.
//!
//! Span and metric attributes follow the
//! [messaging semantic conventions](https://opentelemetry.io/docs/specs/semconv/messaging/)
//! (still in development upstream: the names below are the ones in force when this was
//! written). Attributes that the conventions do not define carry the `bus.` prefix.

use std::borrow::Cow;

/// `messaging.system`: the messaging system, e.g. `kafka`, `rabbitmq`, `aws_sqs`, `nats`.
pub const MESSAGING_SYSTEM: &str = "messaging.system";
/// `messaging.destination.name`: the topic or queue.
pub const MESSAGING_DESTINATION_NAME: &str = "messaging.destination.name";
/// `messaging.operation.type`: `publish` on the producer side, `process` on the consumer side.
pub const MESSAGING_OPERATION_TYPE: &str = "messaging.operation.type";
/// `messaging.operation.name`: the operation's name (`publish`, `process`).
pub const MESSAGING_OPERATION_NAME: &str = "messaging.operation.name";
/// `messaging.message.id`: the envelope's id.
pub const MESSAGING_MESSAGE_ID: &str = "messaging.message.id";
/// `messaging.message.conversation_id`: the envelope's correlation id.
pub const MESSAGING_MESSAGE_CONVERSATION_ID: &str = "messaging.message.conversation_id";
/// `messaging.message.body.size`: the payload's length in bytes.
pub const MESSAGING_MESSAGE_BODY_SIZE: &str = "messaging.message.body.size";
/// `messaging.batch.message_count`: how many messages a batch publish carried.
pub const MESSAGING_BATCH_MESSAGE_COUNT: &str = "messaging.batch.message_count";
/// `messaging.consumer.group.name`: the consumer group a message was received in.
pub const MESSAGING_CONSUMER_GROUP_NAME: &str = "messaging.consumer.group.name";
/// `error.type`: the class of error an operation ended with: the
/// [`ErrorKind`](crate::ErrorKind) name, e.g. `timeout`.
pub const ERROR_TYPE: &str = "error.type";

/// `bus.delivery.attempt`: which delivery of the message this is (1 on the first).
pub const BUS_DELIVERY_ATTEMPT: &str = "bus.delivery.attempt";
/// `bus.outcome`: what the handler decided: `ack`, `retry` or `reject`
/// ([`Outcome::as_str`](crate::runtime::Outcome::as_str)).
pub const BUS_OUTCOME: &str = "bus.outcome";

/// `messaging.operation.type` value of producer spans and metrics.
pub const OPERATION_PUBLISH: &str = "publish";
/// `messaging.operation.type` value of consumer spans and metrics.
pub const OPERATION_PROCESS: &str = "process";

/// The `messaging.system` value for an adapter name
/// ([`Capabilities::name`](crate::Capabilities::name)): the conventions' well-known value where
/// it differs (`sqs` is `aws_sqs`), the adapter's name otherwise.
///
/// ```
/// use bus_core::middleware::tracing::semconv::messaging_system;
/// assert_eq!(messaging_system("sqs"), "aws_sqs");
/// assert_eq!(messaging_system("kafka"), "kafka");
/// ```
#[must_use]
pub fn messaging_system(adapter: &str) -> Cow<'static, str> {
    match adapter {
        "sqs" => Cow::Borrowed("aws_sqs"),
        "kafka" => Cow::Borrowed("kafka"),
        "rabbitmq" => Cow::Borrowed("rabbitmq"),
        "nats" => Cow::Borrowed("nats"),
        "memory" => Cow::Borrowed("memory"),
        other => Cow::Owned(other.to_owned()),
    }
}
