//! Contender 2: PostgreSQL's row lock, `SELECT ... FOR UPDATE` then `UPDATE` in one
//! transaction.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;

use super::{in_transaction, Contender, Counters, Pending};
use crate::workload::Update;

/// A `FOR UPDATE` read that takes longer than this waited for the lock: an
/// uncontended primary-key read on loopback takes well under a tenth of it, and a
/// holder's commit (an fsync) takes longer.
pub const LOCK_WAIT_THRESHOLD: Duration = Duration::from_millis(1);

/// Each update is a transaction that locks its store's row.
pub struct RowLock {
    pool: Pool,
    counters: Arc<Counters>,
    fence: bool,
}

impl RowLock {
    /// A contender using `pool` (one connection per concurrent trigger).
    pub fn new(pool: Pool, counters: Arc<Counters>, fence: bool) -> RowLock {
        RowLock { pool, counters, fence }
    }
}

impl Contender for RowLock {
    fn start(&self, update: Update) -> Pending {
        let (pool, counters, fence) = (self.pool.clone(), Arc::clone(&self.counters), self.fence);
        Box::pin(async move {
            let (applied, read_took) = in_transaction(&pool, &counters, &update, true, fence).await?;
            if read_took > LOCK_WAIT_THRESHOLD {
                Counters::bump(&counters.lock_waits);
            }
            Ok(applied)
        })
    }
}
