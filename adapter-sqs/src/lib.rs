//! The SQS adapter of `bus`, over `aws-sdk-sqs` (and `aws-sdk-sns` for topics).
//!
//! [`SqsBroker`] implements every `bus` pattern on Amazon SQS and SNS, or on a server that
//! speaks their APIs (moto, ministack):
//!
//! - **Topics** are SNS topics. Each consumer group is an SQS queue subscribed to its topic
//!   with raw message delivery and a queue policy letting the topic send; both are created
//!   idempotently on first use. A group keeps what is published after it first subscribed,
//!   whether or not a member is polling. A subscription without a group gets a private queue,
//!   unsubscribed and deleted when it closes.
//! - **Work queues** are SQS queues of the same (encoded) name, created on first use.
//! - **Receiving**: concurrent long-polling loops per subscription (`WaitTimeSeconds`), each
//!   receiving only as many messages as the subscription's buffer has room for; the buffer
//!   lives inside the subscription, so a dropped `next()` future loses nothing.
//! - **Settlement**: `ack` deletes (batched with `DeleteMessageBatch`); `nack(Now)` sets the
//!   visibility to 0; `nack(After(d))` sets it to `d` rounded up to whole seconds, at most
//!   SQS's 12 hours; `in_progress` extends it by the configured visibility timeout; a delivery
//!   dropped unsettled is made visible again at once. The attempt is SQS's
//!   `ApproximateReceiveCount`. `reject` sends the message, with the dead-letter headers, to
//!   the queue `<topic or queue>.dlq` and deletes it; with
//!   [`SqsConfig::max_receive_count`] queues also get a native redrive policy to that queue.
//! - **Order**: with [`SqsConfig::fifo`], queues and topics are FIFO: `MessageGroupId` is the
//!   key, `MessageDeduplicationId` the envelope id, and per-key order holds across the members
//!   of a group. Standard queues keep no order.
//! - **Delayed publish** (standard queues; FIFO queues take no per-message delay): a queue's
//!   message gets SQS `DelaySeconds` up to 15 minutes; beyond that, and through SNS, which has
//!   no delay, it carries when it is due (`bus-not-before`), and a receive loop that gets it
//!   earlier sends a copy back with `DelaySeconds` (15 minutes at most per hop) and deletes
//!   it: the message never leaves SQS, early receives are no attempt, and a consumer is never
//!   held up by it. No limit on the delay (each hop is a new message).
//! - **Backlog**: SQS's approximate visible (`waiting`), not visible (`in_flight`) and delayed
//!   counts of the group's or the work queue; no age of the oldest message (SQS does not tell).
//! - **Request-reply**: a request queue per topic, shared by its responders, and a reply queue
//!   per requester; the reply is matched by the request's id.
//! - **On the wire**: the body is the payload (base64 when it is not text) and the envelope
//!   travels in at most 10 message attributes named after CloudEvents (`ce-id`, `ce-type`, …),
//!   headers beyond the limit packed into one JSON attribute (see docs/adapters/sqs.md).
//!
//! See docs/adapters/sqs.md for the whole mapping, the capabilities and the limits.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod broker;
mod config;
#[doc(hidden)]
pub mod cost;
mod delay;
mod error;
mod names;
mod publisher;
mod requests;
mod source;
mod subscriber;
mod tls;
mod wire;

pub use broker::SqsBroker;
pub use config::{
    CredentialsSource, LoaderHook, SqsConfig, SqsConfigHook, SQS_MAX_MESSAGE_BYTES,
    SQS_MAX_VISIBILITY_SECS, SQS_MIN_MESSAGE_BYTES,
};

/// Re-exported so the escape hatches and downcasts of error sources use the same SDK crates
/// as the adapter.
pub use aws_config;
/// Re-exported, see [`aws_config`].
pub use aws_sdk_sns;
/// Re-exported, see [`aws_config`].
pub use aws_sdk_sqs;

/// The names of the message attributes `bus` writes (CloudEvents HTTP binary-mode names).
pub mod attributes {
    pub use crate::wire::{
        BODY_ENCODING, CAUSATION_ID, CE_ID, CE_SOURCE, CE_SPECVERSION, CE_TIME, CE_TYPE,
        CONTENT_TYPE, CORRELATION_ID, DEAD_LETTER_ID, NOT_BEFORE, PACKED, PARTITION_KEY, REPLY_TO,
    };
}

/// Connects to the SQS an `sqs://` URL names, with the default configuration otherwise.
///
/// # Errors
/// As [`SqsBroker::connect`].
pub async fn connect(url: &str) -> bus_core::Result<SqsBroker> {
    SqsBroker::connect(url).await
}

const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<SqsBroker>();
    send_sync::<SqsConfig>();
};
