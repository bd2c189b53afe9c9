//! Which offset a partition may commit: the highest one below which every message is settled.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// How long a commit may stay unanswered before it is sent again. librdkafka answers every
/// asynchronous commit (a commit waiting for a coordinator fails after the session timeout),
/// so this only guards against an answer that never comes.
const PENDING_FOR: Duration = Duration::from_secs(30);

/// Tracks the messages of one partition handed out but not yet settled.
///
/// Kafka commits one offset per partition, meaning "everything before this is done". With
/// messages processed concurrently and settled in any order, the committable offset is the
/// lowest unsettled one, or one past the highest seen when all are settled.
#[derive(Debug, Default, Clone)]
pub(crate) struct OffsetTracker {
    unsettled: BTreeSet<i64>,
    /// One past the highest offset seen.
    next: Option<i64>,
    /// The last offset the broker confirmed committed (or that was found committed).
    committed: Option<i64>,
    /// A commit sent and not answered yet, and when it was sent: not sent again meanwhile.
    pending: Option<(i64, Instant)>,
}

impl OffsetTracker {
    /// A tracker for a partition whose committed position is `start`.
    pub(crate) fn starting_at(start: Option<i64>) -> Self {
        Self {
            unsettled: BTreeSet::new(),
            next: start,
            committed: start,
            pending: None,
        }
    }

    /// A tracker for a partition that starts at `start` but whose start is not committed yet
    /// (its first commit failed): `start` is committed with the next commit.
    pub(crate) fn starting_uncommitted(start: i64) -> Self {
        Self {
            committed: None,
            ..Self::starting_at(Some(start))
        }
    }

    /// One past the highest offset seen (the start if none was seen).
    pub(crate) fn next(&self) -> Option<i64> {
        self.next
    }

    /// Records that the message at `offset` was received and is not settled yet.
    pub(crate) fn track(&mut self, offset: i64) {
        self.unsettled.insert(offset);
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// Records that the message at `offset` is settled.
    pub(crate) fn settle(&mut self, offset: i64) {
        self.unsettled.remove(&offset);
    }

    /// Whether `offset` is tracked and unsettled.
    pub(crate) fn is_unsettled(&self, offset: i64) -> bool {
        self.unsettled.contains(&offset)
    }

    /// The offset to commit: every message below it is settled.
    pub(crate) fn committable(&self) -> Option<i64> {
        self.unsettled.first().copied().or(self.next)
    }

    /// The committable offset if it moved since the last confirmed commit
    /// ([`mark_committed`](Self::mark_committed)) and, unless `again` (a synchronous commit,
    /// which must not count on one in flight that may still fail), is not in flight already.
    pub(crate) fn to_commit(&self, again: bool) -> Option<i64> {
        let offset = self.committable()?;
        let in_flight = self
            .pending
            .is_some_and(|(o, sent)| o == offset && sent.elapsed() < PENDING_FOR);
        (self.committed != Some(offset) && (again || !in_flight)).then_some(offset)
    }

    /// Records that a commit of `offset` was sent and waits for the broker's answer.
    pub(crate) fn mark_pending(&mut self, offset: i64) {
        self.pending = Some((offset, Instant::now()));
    }

    /// Records that the commit of `offset` failed: it is sent again with the next commit.
    pub(crate) fn mark_failed(&mut self, offset: i64) {
        if self.pending.is_some_and(|(o, _)| o == offset) {
            self.pending = None;
        }
    }

    /// Records that the broker confirmed the commit of `offset`.
    pub(crate) fn mark_committed(&mut self, offset: i64) {
        self.committed = Some(self.committed.map_or(offset, |c| c.max(offset)));
        if self.pending.is_some_and(|(o, _)| o <= offset) {
            self.pending = None;
        }
    }

    /// How many messages are unsettled.
    #[cfg(test)]
    pub(crate) fn unsettled(&self) -> usize {
        self.unsettled.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_what_is_contiguous() {
        let mut t = OffsetTracker::starting_at(Some(10));
        assert_eq!(t.to_commit(false), None, "nothing new");
        for o in 10..15 {
            t.track(o);
        }
        assert_eq!(t.committable(), Some(10));
        t.settle(12);
        t.settle(11);
        assert_eq!(t.committable(), Some(10), "10 is still unsettled");
        t.settle(10);
        assert_eq!(t.committable(), Some(13));
        t.mark_committed(13);
        assert_eq!(t.to_commit(false), None);
        t.settle(14);
        assert_eq!(t.committable(), Some(13), "13 blocks 14");
        t.settle(13);
        assert_eq!(t.to_commit(false), Some(15));
        assert_eq!(t.unsettled(), 0);
    }

    #[test]
    fn reverse_order_settlement_commits_at_the_end() {
        let mut t = OffsetTracker::starting_at(None);
        assert_eq!(t.committable(), None);
        for o in 0..100 {
            t.track(o);
        }
        for o in (1..100).rev() {
            t.settle(o);
            assert_eq!(t.committable(), Some(0));
        }
        t.settle(0);
        assert_eq!(t.committable(), Some(100));
    }

    /// Before the fix an asynchronous commit counted as committed when it was sent, so one
    /// the broker never confirmed was never sent again.
    #[test]
    fn a_commit_counts_only_once_confirmed() {
        let mut t = OffsetTracker::starting_at(Some(0));
        t.track(0);
        t.settle(0);
        assert_eq!(t.to_commit(false), Some(1));
        t.mark_pending(1);
        assert_eq!(t.to_commit(false), None, "in flight: not sent twice");
        assert_eq!(t.to_commit(true), Some(1), "unless synchronously");
        t.mark_failed(1);
        assert_eq!(t.to_commit(false), Some(1), "failed: sent again");
        t.mark_pending(1);
        t.mark_committed(1);
        assert_eq!(t.to_commit(false), None);
        let t = OffsetTracker::starting_uncommitted(5);
        assert_eq!(
            t.to_commit(false),
            Some(5),
            "a start whose commit failed is committed"
        );
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compacted topics and transaction markers leave gaps.
        let mut t = OffsetTracker::starting_at(Some(0));
        t.track(3);
        t.track(7);
        assert!(t.is_unsettled(7));
        t.settle(3);
        assert_eq!(t.committable(), Some(7));
        t.settle(7);
        assert_eq!(t.committable(), Some(8));
    }
}
