//! The contenders: ways of applying one [`Update`] to its store's row.
//!
//! Every contender runs [`db::read_modify_write`](crate::db::read_modify_write) on the
//! same table; they differ only in what keeps two updates of one store apart.

mod redis_lock;
mod row_lock;
mod rpc;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

pub use redis_lock::RedisLock;
pub use row_lock::RowLock;
pub use rpc::{Rpc, RpcBroker, PARTITIONS};

use crate::db::{Applied, WriteError};
use crate::workload::Update;

/// A future that completes one update.
pub type Pending = Pin<Box<dyn Future<Output = Result<Applied, Failure>> + Send + 'static>>;

/// Why an update failed, and whether it may have been written all the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong.
    pub message: String,
    /// False only when the update is known to have written nothing (it failed before
    /// its transaction's commit was sent, which rolls it back); true when nobody can
    /// tell (a commit whose answer was lost, a request that timed out).
    pub maybe_written: bool,
}

impl Failure {
    /// A failure known to have written nothing.
    pub fn unwritten(message: impl Into<String>) -> Failure {
        Failure { message: message.into(), maybe_written: false }
    }

    /// A failure after which the update may or may not have been written.
    pub fn unknown(message: impl Into<String>) -> Failure {
        Failure { message: message.into(), maybe_written: true }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A bare message: nobody can tell whether the update was written.
impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::unknown(message)
    }
}

/// A way of applying updates.
pub trait Contender: Send + Sync {
    /// Starts applying `update`, called right after its sequence number was issued and
    /// with nothing held: every contender gets its triggers the same way, and what
    /// keeps their order (a queued request, a lock acquired) is the contender's own.
    /// The returned future does the rest.
    fn start(&self, update: Update) -> Pending;
}

/// Counters a run fills in; the lock ones stay 0 for contenders without that lock.
#[derive(Default, Debug)]
pub struct Counters {
    /// Updates that completed (applied or rejected by the fence).
    pub completed: AtomicU64,
    /// Updates that failed (error, timeout).
    pub failed: AtomicU64,
    /// Writes committed ahead of an earlier trigger of their store not yet applied,
    /// counted by the write ([`Counters::judged`]), not from what its caller was told.
    pub ahead: AtomicU64,
    /// Writes committed after a later trigger of their store (counted by the write).
    pub stale: AtomicU64,
    /// Writes of a trigger the row already held (counted by the write).
    pub duplicates: AtomicU64,
    /// Stale updates the fencing check rejected.
    pub rejected: AtomicU64,
    /// kafka-rpc requests handled out of the order their calls were made.
    pub call_order: AtomicU64,
    /// Writes that found their row changed since their read ([`db::CONFLICT`](crate::db::CONFLICT)).
    pub conflicts: AtomicU64,
    /// Updates that had to wait for their lock at least once.
    pub lock_waits: AtomicU64,
    /// Failed lock attempts that were retried (Redis).
    pub lock_retries: AtomicU64,
    /// Critical sections that outlived their lock's expiry, or whose lock could not be released (Redis).
    pub lock_expiries: AtomicU64,
    /// Lock waits PostgreSQL ended with `lock_not_available`.
    pub lock_timeouts: AtomicU64,
    /// Transactions PostgreSQL aborted as deadlocked.
    pub deadlocks: AtomicU64,
}

impl Counters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts what an update's caller was told: completed, rejected or failed.
    pub fn record(&self, outcome: &Result<Applied, Failure>) {
        match outcome {
            Ok(applied) => {
                Counters::bump(&self.completed);
                if *applied == Applied::Rejected {
                    Counters::bump(&self.rejected);
                }
            }
            Err(_) => Counters::bump(&self.failed),
        }
    }

    /// Counts what a committed write found (ahead, stale, duplicate), whether or not
    /// its caller ever hears of it: a request handled twice answers its caller once,
    /// and a caller that timed out hears nothing of a write that still committed.
    pub fn judged(&self, applied: Applied) {
        match applied {
            Applied::InOrder | Applied::Rejected => {}
            Applied::Ahead => Counters::bump(&self.ahead),
            Applied::Stale => Counters::bump(&self.stale),
            Applied::Duplicate => Counters::bump(&self.duplicates),
        }
    }

    /// Counts a failed write that is a conflict, a lock timeout or a deadlock.
    pub fn classify(&self, e: &WriteError) {
        use tokio_postgres::error::SqlState;
        match e {
            WriteError::Conflict => Counters::bump(&self.conflicts),
            WriteError::Db(e) => match e.code() {
                Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => Counters::bump(&self.lock_timeouts),
                Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => Counters::bump(&self.deadlocks),
                _ => {}
            },
        }
    }

    /// The current value of `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Runs `read_modify_write` in a transaction of its own on a pooled connection,
/// counting lock timeouts and deadlocks; returns the outcome and the read's duration.
async fn in_transaction(
    pool: &deadpool_postgres::Pool,
    counters: &Counters,
    update: &Update,
    lock_row: bool,
    fence: bool,
) -> Result<(Applied, std::time::Duration), Failure> {
    let mut conn = pool.get().await.map_err(|e| Failure::unwritten(format!("no PostgreSQL connection: {e}")))?;
    let failed = |e: WriteError, maybe_written: bool| {
        counters.classify(&e);
        Failure { message: format!("update of store {} failed: {e}", update.store_id), maybe_written }
    };
    // Until the commit is sent, a failure rolls the transaction back: nothing written.
    let tx = conn.transaction().await.map_err(|e| failed(e.into(), false))?;
    let done = crate::db::read_modify_write(&tx, update, lock_row, fence).await.map_err(|e| failed(e, false))?;
    // A failed commit may have committed (its answer lost): nobody can tell.
    tx.commit().await.map_err(|e| failed(e.into(), true))?;
    counters.judged(done.0);
    Ok(done)
}
