//! Backlog counts from JetStream's own bookkeeping: a group's durable consumer (pending and
//! ack-pending), a queue's work-queue stream, and the delayed stream's count per subject.

use std::time::{Duration, SystemTime};

use bus_core::{Backlog, BacklogOf, Error, Result};

use crate::broker::{Inner, Kind};
use crate::names::{self, QUEUE_CONSUMER};
use crate::{delayed, error};

/// The backlog of `of` (see [`NatsBroker`](crate::NatsBroker)'s `Broker::backlog`).
pub(crate) async fn count(inner: &Inner, of: &BacklogOf) -> Result<Backlog> {
    inner.check()?;
    match of {
        BacklogOf::Group { topic, group } => {
            if !inner.config.durable {
                return Err(Error::unsupported(
                    "a group on core NATS (durable=false) has no backlog: the server keeps \
                     nothing for it",
                ));
            }
            let consumer = names::group_consumer(group);
            let mut backlog = of_consumer(inner, Kind::Topic, topic, &consumer, false).await?;
            backlog.delayed = Some(delayed::waiting_for(inner, Kind::Topic, topic).await?);
            Ok(backlog)
        }
        BacklogOf::Queue(queue) => {
            let mut backlog = of_consumer(inner, Kind::Queue, queue, QUEUE_CONSUMER, true).await?;
            backlog.delayed = Some(delayed::waiting_for(inner, Kind::Queue, queue).await?);
            Ok(backlog)
        }
        other => Err(Error::unsupported(format!(
            "the NATS adapter cannot count the backlog of {other}"
        ))),
    }
}

/// Counts from `consumer` on the stream of `name`; for a queue (`queue`) whose shared
/// consumer does not exist yet, from the work-queue stream itself, which keeps exactly what
/// was not acked.
async fn of_consumer(
    inner: &Inner,
    kind: Kind,
    name: &str,
    consumer: &str,
    queue: bool,
) -> Result<Backlog> {
    let stream_name = match kind {
        Kind::Topic => inner.names.topic_stream(name),
        Kind::Queue => inner.names.queue_stream(name),
    };
    let stream = inner
        .jetstream
        .get_stream(&stream_name)
        .await
        .map_err(|e| error::get_stream(e, &stream_name))?;
    let state = stream.cached_info().state.clone();
    let mut backlog = Backlog::default();
    let info = match stream.consumer_info(consumer).await {
        Ok(info) => info,
        Err(e) => {
            let e = error::consumer_info(e, consumer, &stream_name);
            if queue && e.kind() == bus_core::ErrorKind::NotFound {
                // Nobody consumed yet: everything the queue holds waits.
                backlog.waiting = state.messages;
                backlog.in_flight = Some(0);
                if state.messages > 0 {
                    backlog.oldest_age = Some(age(state.first_timestamp.unix_timestamp_nanos()));
                }
                return Ok(backlog);
            }
            return Err(e);
        }
    };
    // Messages nacked with a delay sit in the consumer's pending acknowledgements until
    // redelivered: they count as in flight.
    backlog.waiting = info.num_pending;
    backlog.in_flight = Some(info.num_ack_pending as u64);
    if backlog.waiting + info.num_ack_pending as u64 > 0 {
        // The oldest message not settled is the one after the ack floor (or the stream's
        // first, if limits removed older ones).
        let sequence = (info.ack_floor.stream_sequence + 1).max(state.first_sequence);
        if let Ok(message) = stream.get_raw_message(sequence).await {
            backlog.oldest_age = Some(age(message.time.unix_timestamp_nanos()));
        }
    }
    Ok(backlog)
}

/// How long ago the server's time stamp `nanos` (since 1970) was; zero for one ahead of this
/// clock.
fn age(nanos: i128) -> Duration {
    let then = u64::try_from(nanos)
        .ok()
        .and_then(|n| SystemTime::UNIX_EPOCH.checked_add(Duration::from_nanos(n)));
    then.and_then(|then| SystemTime::now().duration_since(then).ok())
        .unwrap_or(Duration::ZERO)
}
