//! What the database says happened, against what each update's caller was told.
//!
//! A contender's own report of an update (applied, rejected, failed) cannot show an
//! update that was lost after its caller was told it was applied, nor one applied
//! again after its caller got an answer. The rows can: every write increments its
//! row's `applied`, so after a run each store's count is compared with the updates
//! its callers were told were written.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::contender::Failure;
use crate::db::{Applied, FinalRow};

/// What callers of each store's updates were told, filled in as outcomes arrive.
pub struct Told {
    stores: Vec<StoreTold>,
}

#[derive(Default)]
struct StoreTold {
    /// Updates whose caller was told they were written.
    written: AtomicI64,
    /// Updates whose caller was told they failed in a way that may have written them:
    /// written or not, nobody knows. Failures known to have written nothing are not
    /// counted here, so they cannot excuse a write nobody asked for.
    failed: AtomicI64,
    /// The highest sequence number a caller was told was written.
    highest_written: AtomicI64,
}

impl Told {
    /// Nothing told yet, for stores `1..=stores`.
    pub fn new(stores: u64) -> Told {
        Told { stores: (0..stores.max(1)).map(|_| StoreTold::default()).collect() }
    }

    /// Records what the caller of `store_id`'s update `seq` was told.
    pub fn record(&self, store_id: i64, seq: i64, outcome: &Result<Applied, Failure>) {
        let Some(store) = usize::try_from(store_id - 1).ok().and_then(|i| self.stores.get(i)) else { return };
        match outcome {
            Ok(applied) if applied.written() => {
                store.written.fetch_add(1, Ordering::Relaxed);
                store.highest_written.fetch_max(seq, Ordering::Relaxed);
            }
            Ok(_) | Err(Failure { maybe_written: false, .. }) => {}
            Err(Failure { maybe_written: true, .. }) => {
                store.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A copy of what has been told so far.
    pub fn snapshot(&self) -> Told {
        let copy = |a: &AtomicI64| AtomicI64::new(a.load(Ordering::Relaxed));
        Told {
            stores: self
                .stores
                .iter()
                .map(|s| StoreTold { written: copy(&s.written), failed: copy(&s.failed), highest_written: copy(&s.highest_written) })
                .collect(),
        }
    }
}

/// The discrepancies between the rows and what callers were told.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// Updates callers were told were written that the rows do not count.
    pub lost: u64,
    /// Writes the rows count beyond every update told written or failed in a way that
    /// may have written it (not one known to have written nothing): an update
    /// applied twice, or applied although nobody asked.
    pub extra: u64,
    /// Stores whose row ends on an older trigger than one already written: a stale
    /// write landed last, so the store shows a radius nobody wants any more.
    pub stale_at_end: u64,
}

/// Compares the rows after a run (index `store_id - 1`) with what was told.
pub fn audit(rows: &[FinalRow], told: &Told) -> Audit {
    let mut found = Audit::default();
    for (row, store) in rows.iter().zip(&told.stores) {
        let written = store.written.load(Ordering::Relaxed);
        let failed = store.failed.load(Ordering::Relaxed);
        found.lost += (written - row.applied).max(0) as u64;
        found.extra += (row.applied - written - failed).max(0) as u64;
        // The row's own highest write, which also sees a trigger whose caller was told
        // it failed but which was written; and what callers were told, which also sees
        // a write the row lost.
        if row.last_seq < row.high_seq.max(store.highest_written.load(Ordering::Relaxed)) {
            found.stale_at_end += 1;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn told(outcomes: &[(i64, Result<Applied, Failure>)]) -> Told {
        let t = Told::new(1);
        for (seq, outcome) in outcomes {
            t.record(1, *seq, outcome);
        }
        t
    }

    #[test]
    fn an_update_told_written_but_missing_from_the_row_is_lost() {
        let t = told(&[(1, Ok(Applied::InOrder)), (2, Ok(Applied::InOrder)), (3, Ok(Applied::InOrder))]);
        // The row ends on 3, as it should, but counts two writes.
        let found = audit(&[FinalRow { last_seq: 3, applied: 2, high_seq: 3 }], &t);
        assert_eq!(found, Audit { lost: 1, extra: 0, stale_at_end: 0 });
    }

    #[test]
    fn a_write_nobody_was_told_of_is_extra_unless_a_caller_saw_a_failure() {
        let t = told(&[(1, Ok(Applied::InOrder)), (2, Ok(Applied::InOrder))]);
        assert_eq!(audit(&[FinalRow { last_seq: 2, applied: 3, high_seq: 2 }], &t).extra, 1);
        let t = told(&[(1, Ok(Applied::InOrder)), (2, Err(Failure::unknown("timed out")))]);
        // A failed caller's update may have been written: no one can tell.
        assert_eq!(audit(&[FinalRow { last_seq: 2, applied: 2, high_seq: 2 }], &t), Audit::default());
        // Unless it is known to have written nothing.
        let t = told(&[(1, Ok(Applied::InOrder)), (2, Err(Failure::unwritten("lock timeout")))]);
        assert_eq!(audit(&[FinalRow { last_seq: 2, applied: 2, high_seq: 2 }], &t).extra, 1);
    }

    #[test]
    fn a_row_ending_below_a_written_trigger_is_stale_and_rejections_count_as_unwritten() {
        let t = told(&[(2, Ok(Applied::Ahead)), (1, Ok(Applied::Stale)), (3, Ok(Applied::Rejected))]);
        let found = audit(&[FinalRow { last_seq: 1, applied: 2, high_seq: 2 }], &t);
        assert_eq!(found, Audit { lost: 0, extra: 0, stale_at_end: 1 });
    }

    #[test]
    fn a_row_ending_below_a_trigger_its_caller_thought_failed_is_stale() {
        // Trigger 2's caller timed out, but 2 was written, and then the stale 1.
        let t = told(&[(2, Err(Failure::unknown("timed out"))), (1, Ok(Applied::Stale))]);
        let found = audit(&[FinalRow { last_seq: 1, applied: 2, high_seq: 2 }], &t);
        assert_eq!(found.stale_at_end, 1);
    }
}
