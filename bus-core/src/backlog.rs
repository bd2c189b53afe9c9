//! How much waits for a consumer: the backlog of a group on a topic or of a queue, as
//! [`Broker::backlog`](crate::Broker::backlog) reports it.

use std::time::Duration;

/// What to measure: the messages a consumer group has yet to settle on a topic, or those
/// waiting in a queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BacklogOf {
    /// The named consumer group `group` on `topic` (the group must have subscribed once:
    /// before that, it has no position to measure from).
    Group {
        /// The topic.
        topic: String,
        /// The consumer group.
        group: String,
    },
    /// The queue of that name ([`Queue::send`](crate::Queue::send)); also a dead-letter queue
    /// such as `orders.dlq`.
    Queue(String),
}

impl BacklogOf {
    /// The backlog of `group` on `topic`.
    #[must_use]
    pub fn group(topic: impl Into<String>, group: impl Into<String>) -> Self {
        Self::Group {
            topic: topic.into(),
            group: group.into(),
        }
    }

    /// The backlog of the queue `name`.
    #[must_use]
    pub fn queue(name: impl Into<String>) -> Self {
        Self::Queue(name.into())
    }
}

impl std::fmt::Display for BacklogOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Group { topic, group } => write!(f, "topic {topic} group {group}"),
            Self::Queue(name) => write!(f, "queue {name}"),
        }
    }
}

/// The backlog of a group or a queue at one moment.
///
/// `waiting` is what the broker would hand out next; what has been handed out and not yet
/// settled is `in_flight`, where the broker tells it apart. A message is counted once: it is
/// in `waiting`, `in_flight` or `delayed`, never in two.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backlog {
    /// Messages ready to be delivered.
    pub waiting: u64,
    /// Messages delivered and not yet settled, where the broker reports them apart (`None`
    /// where it cannot: they are then in `waiting`, or not counted, as the adapter's docs say).
    pub in_flight: Option<u64>,
    /// Messages not deliverable yet: published with a delay, or nacked with one, where the
    /// broker reports them (`None` where it cannot).
    pub delayed: Option<u64>,
    /// How long the oldest waiting message has waited, where the broker can say.
    pub oldest_age: Option<Duration>,
    /// Whether the counts are the broker's estimate (SQS's `Approximate…` attributes) rather
    /// than exact at the moment they were read.
    pub approximate: bool,
    /// Per partition, where the broker has partitions (Kafka); empty elsewhere.
    pub partitions: Vec<PartitionBacklog>,
}

impl Backlog {
    /// Everything not yet settled: `waiting` plus `in_flight` and `delayed` where known.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.waiting + self.in_flight.unwrap_or(0) + self.delayed.unwrap_or(0)
    }
}

/// The backlog of one partition of a topic for one group (Kafka).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionBacklog {
    /// The partition.
    pub partition: i32,
    /// The offset the next published message will get (the high watermark).
    pub end_offset: i64,
    /// The group's committed offset, `None` if it has committed none on this partition.
    pub committed: Option<i64>,
    /// Messages after the committed offset (or after the partition's start, if none):
    /// `end_offset − committed`.
    pub lag: u64,
}

impl PartitionBacklog {
    /// The backlog of `partition`: `end_offset`, the group's `committed` offset and their
    /// difference as `lag` (from `start_offset`, the oldest offset still kept, when nothing
    /// was committed).
    #[must_use]
    pub fn new(partition: i32, start_offset: i64, end_offset: i64, committed: Option<i64>) -> Self {
        let from = committed.unwrap_or(start_offset).max(start_offset);
        Self {
            partition,
            end_offset,
            committed,
            lag: u64::try_from(end_offset - from).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_lag_counts_from_the_commit_or_the_start() {
        assert_eq!(PartitionBacklog::new(0, 0, 10, Some(4)).lag, 6);
        assert_eq!(PartitionBacklog::new(0, 3, 10, None).lag, 7);
        // A commit below what the log still keeps counts from what is kept.
        assert_eq!(PartitionBacklog::new(0, 5, 10, Some(2)).lag, 5);
        // Never negative, whatever the broker says.
        assert_eq!(PartitionBacklog::new(0, 0, 3, Some(7)).lag, 0);
    }

    #[test]
    fn total_adds_what_is_known() {
        let backlog = Backlog {
            waiting: 3,
            in_flight: Some(2),
            delayed: None,
            ..Backlog::default()
        };
        assert_eq!(backlog.total(), 5);
        assert_eq!(
            BacklogOf::group("orders", "billing").to_string(),
            "topic orders group billing"
        );
    }
}
