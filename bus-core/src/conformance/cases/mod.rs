//! The cases of the suite, one async function each, taking the [`Harness`](super::Harness).
//!
//! [`conformance_suite!`](crate::conformance_suite) turns each into a test; an adapter can also
//! call one directly from a test of its own. A case panics when the adapter fails it, and
//! prints `skipped: <case>: <reason>` and returns when the adapter's
//! [`Capabilities`](crate::Capabilities) say it cannot do what the case needs.

mod faults;
mod groups;
mod hostile;
mod leases;
mod lifecycle;
mod messages;
mod operations;
mod ordering;
mod requests;
mod runtime;
mod settlement;

pub use faults::{
    connection_reset_mid_stream_loses_nothing, reconnect_does_not_duplicate_acked,
    stall_then_recover,
};
pub use groups::{
    acked_messages_not_redelivered_after_resubscribe, concurrent_subscribe_close,
    fan_out_two_groups, group_members_share_work, per_key_order_across_members,
    per_key_order_single_subscriber, private_subscriptions_each_get_all, queue_competing_consumers,
    queue_keeps_messages_until_consumed, resubscribe_in_same_group_loses_nothing,
};
pub use hostile::undecodable_message_is_dead_lettered;
pub use leases::long_handler_is_not_redelivered;
pub use lifecycle::{
    broker_restart_loses_no_confirmed_message, oversize_payload_rejected,
    publish_after_close_fails_closed, subscription_close_ends_stream,
};
pub use messages::{
    binary_payload, correlation_and_causation_survive, empty_payload, many_headers,
    publish_batch_round_trip, round_trip_many, too_many_headers_rejected, topics_do_not_cross,
    trace_context_survives, typed_message_round_trip,
};
pub use operations::{backlog_counts_what_waits, delayed_publish_arrives_after_delay};
pub use ordering::{parked_key_dead_letters_and_moves_on, per_key_order_kept_across_retries};
pub use requests::{request_no_responders, request_reply_round_trip, request_timeout};
pub use runtime::{
    graceful_shutdown_loses_nothing, idempotency_under_injected_duplicates,
    per_key_order_under_concurrency_16, retry_then_dead_letter_exact_counts,
    trace_id_continuity_publish_to_process,
};
pub use settlement::{
    dropped_delivery_is_redelivered, nack_after_delay_waits, nack_now_redelivers,
    reject_dead_letters_from_queue, reject_dead_letters_from_topic,
};
