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

use crate::db::Applied;
use crate::workload::Update;

/// A future that completes one update.
pub type Pending = Pin<Box<dyn Future<Output = Result<Applied, String>> + Send + 'static>>;

/// A way of applying updates.
pub trait Contender: Send + Sync {
    /// Starts applying `update`. Called while the store's sequence number is held, so
    /// whatever must happen in trigger order (kafka-rpc queues the request) happens
    /// here; the returned future does the rest.
    fn start(&self, update: Update) -> Pending;
}

/// Counters a run fills in; the lock ones stay 0 for contenders without that lock.
#[derive(Default, Debug)]
pub struct Counters {
    /// Updates that completed (applied or rejected by the fence).
    pub completed: AtomicU64,
    /// Updates that failed (error, timeout).
    pub failed: AtomicU64,
    /// Updates applied after a later sequence number of their store.
    pub order_violations: AtomicU64,
    /// Updates applied a second time.
    pub duplicates: AtomicU64,
    /// Stale updates the fencing check rejected.
    pub rejected: AtomicU64,
    /// Updates that had to wait for their lock at least once.
    pub lock_waits: AtomicU64,
    /// Failed lock attempts that were retried (Redis).
    pub lock_retries: AtomicU64,
    /// Critical sections that outlived their lock's expiry (Redis).
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

    /// Counts what an update did.
    pub fn record(&self, outcome: &Result<Applied, String>) {
        match outcome {
            Ok(applied) => {
                Counters::bump(&self.completed);
                match applied {
                    Applied::InOrder => {}
                    Applied::OutOfOrder => Counters::bump(&self.order_violations),
                    Applied::Duplicate => Counters::bump(&self.duplicates),
                    Applied::Rejected => Counters::bump(&self.rejected),
                }
            }
            Err(_) => Counters::bump(&self.failed),
        }
    }

    /// Counts a PostgreSQL error that is a lock timeout or a deadlock.
    pub fn classify(&self, e: &tokio_postgres::Error) {
        use tokio_postgres::error::SqlState;
        match e.code() {
            Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => Counters::bump(&self.lock_timeouts),
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => Counters::bump(&self.deadlocks),
            _ => {}
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
) -> Result<(Applied, std::time::Duration), String> {
    let mut conn = pool.get().await.map_err(|e| format!("no PostgreSQL connection: {e}"))?;
    let result = async {
        let tx = conn.transaction().await?;
        let done = crate::db::read_modify_write(&tx, update, lock_row, fence).await?;
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(done)
    }
    .await;
    result.map_err(|e| {
        counters.classify(&e);
        format!("update of store {} failed: {}", update.store_id, crate::db::describe(&e))
    })
}
