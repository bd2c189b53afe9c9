//! Which offset a partition may commit: the highest one below which every message is settled.

use std::collections::BTreeSet;

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
}

impl OffsetTracker {
    /// A tracker for a partition whose committed position is `start`.
    pub(crate) fn starting_at(start: Option<i64>) -> Self {
        Self {
            unsettled: BTreeSet::new(),
            next: start,
            committed: start,
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

    /// The committable offset if it moved since the last commit the broker confirmed
    /// ([`mark_committed`](Self::mark_committed)).
    pub(crate) fn to_commit(&self) -> Option<i64> {
        let offset = self.committable()?;
        (self.committed != Some(offset)).then_some(offset)
    }

    /// Records that the broker confirmed the commit of `offset`.
    pub(crate) fn mark_committed(&mut self, offset: i64) {
        self.committed = Some(self.committed.map_or(offset, |c| c.max(offset)));
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
        assert_eq!(t.to_commit(), None, "nothing new");
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
        assert_eq!(t.to_commit(), None);
        t.settle(14);
        assert_eq!(t.committable(), Some(13), "13 blocks 14");
        t.settle(13);
        assert_eq!(t.to_commit(), Some(15));
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

    #[test]
    fn a_start_whose_commit_failed_is_committed_next() {
        let t = OffsetTracker::starting_uncommitted(5);
        assert_eq!(t.to_commit(), Some(5));
        assert_eq!(OffsetTracker::starting_at(Some(5)).to_commit(), None);
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
