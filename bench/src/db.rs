//! The delivery-radius table every contender updates, and the one read–modify–write
//! they all run on it.

use std::time::{Duration, Instant};

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::{Deserialize, Serialize};

use crate::workload::Update;

/// The radius a store starts with.
pub const FULL_RADIUS_M: i32 = 5_000;

/// How long a transaction waits for a row lock before PostgreSQL gives up with
/// `lock_not_available` (counted as a lock timeout).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// What one update did to its row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Applied after every earlier sequence number of its store.
    InOrder,
    /// Applied although the row already held a later sequence number: an order violation.
    OutOfOrder,
    /// Applied although the row already held this very sequence number: a duplicate.
    Duplicate,
    /// Not applied: the fencing check found the row already at this sequence number or later.
    Rejected,
}

/// A pool of `size` connections to `conninfo`, each with [`LOCK_TIMEOUT`] set.
pub fn pool(conninfo: &str, size: usize) -> Result<Pool, String> {
    let mut config: tokio_postgres::Config = conninfo.parse().map_err(|e| format!("bad connection string {conninfo:?}: {e}"))?;
    config.options(format!("-c lock_timeout={}", LOCK_TIMEOUT.as_millis()));
    let manager = Manager::from_config(config, tokio_postgres::NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager).max_size(size.max(1)).build().map_err(|e| format!("cannot build a pool: {e}"))
}

/// Recreates the table with stores `1..=stores` at full radius and sequence 0.
pub async fn reset(pool: &Pool, stores: u64) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS stores;
             CREATE TABLE stores (
                 id bigint PRIMARY KEY,
                 radius_m integer NOT NULL,
                 last_seq bigint NOT NULL,
                 applied bigint NOT NULL,
                 payload bytea NOT NULL
             );
             INSERT INTO stores SELECT g, {FULL_RADIUS_M}, 0, 0, ''::bytea FROM generate_series(1, {stores}) g;"
        ))
        .await
        .map_err(|e| format!("cannot create the stores table: {}", describe(&e)))?;
    // On its own: VACUUM cannot run inside the implicit transaction of a multi-statement batch.
    client.batch_execute("VACUUM ANALYZE stores").await.map_err(|e| format!("cannot vacuum the stores table: {}", describe(&e)))
}

/// The server's message for a database error (tokio-postgres shows only "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Each store's `last_seq` after a run, index `id - 1`.
pub async fn final_sequences(pool: &Pool, stores: u64) -> Result<Vec<i64>, String> {
    let client = pool.get().await.map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
    let rows = client
        .query("SELECT id, last_seq FROM stores ORDER BY id", &[])
        .await
        .map_err(|e| format!("cannot read the stores table: {}", describe(&e)))?;
    let mut last = vec![0; stores as usize];
    for row in rows {
        let (id, seq): (i64, i64) = (row.get(0), row.get(1));
        if let Some(slot) = usize::try_from(id - 1).ok().and_then(|i| last.get_mut(i)) {
            *slot = seq;
        }
    }
    Ok(last)
}

/// Reads the store's row (`FOR UPDATE` when `lock_row`), compares its last applied
/// sequence number with the update's, and writes the update unless `fence` rejects a
/// stale one. Runs inside the caller's transaction; returns what happened and how long
/// the read took (a row-lock wait shows up there).
pub async fn read_modify_write(
    tx: &impl GenericClient,
    u: &Update,
    lock_row: bool,
    fence: bool,
) -> Result<(Applied, Duration), tokio_postgres::Error> {
    let read = if lock_row {
        "SELECT radius_m, last_seq FROM stores WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT radius_m, last_seq FROM stores WHERE id = $1"
    };
    let read = tx.prepare_cached(read).await?;
    let started = Instant::now();
    let row = tx.query_one(&read, &[&u.store_id]).await?;
    let read_took = started.elapsed();
    let applied = judge(u.seq, row.get(1), fence);
    if applied == Applied::Rejected {
        return Ok((applied, read_took));
    }
    let write = tx
        .prepare_cached("UPDATE stores SET radius_m = $2, last_seq = $3, applied = applied + 1, payload = $4 WHERE id = $1")
        .await?;
    tx.execute(&write, &[&u.store_id, &u.radius_m, &u.seq, &u.payload]).await?;
    Ok((applied, read_took))
}

/// What an update with sequence number `seq` does to a row whose last applied one is
/// `last_seq`: the one comparison every contender makes.
pub fn judge(seq: i64, last_seq: i64, fence: bool) -> Applied {
    match seq.cmp(&last_seq) {
        std::cmp::Ordering::Greater => Applied::InOrder,
        _ if fence => Applied::Rejected,
        std::cmp::Ordering::Equal => Applied::Duplicate,
        std::cmp::Ordering::Less => Applied::OutOfOrder,
    }
}

/// Applies `updates` (one partition's batch, in order) inside the caller's transaction
/// with two statements: one read of every store the batch touches and one write of
/// each store's final state. Each update is judged in order against the state the
/// earlier ones left, exactly as one read–modify–write per update would; only the
/// intermediate row versions are never written, because nothing else can see them
/// before the commit. Per-update locking cannot do this: its updates of a store are
/// separate transactions.
pub async fn apply_batch(tx: &impl GenericClient, updates: &[Update], fence: bool) -> Result<Vec<Applied>, tokio_postgres::Error> {
    let mut ids: Vec<i64> = updates.iter().map(|u| u.store_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let read = tx.prepare_cached("SELECT id, last_seq FROM stores WHERE id = ANY($1)").await?;
    let mut rows: std::collections::HashMap<i64, RowState> = std::collections::HashMap::with_capacity(ids.len());
    for row in tx.query(&read, &[&ids]).await? {
        rows.insert(row.get(0), (row.get(1), FULL_RADIUS_M, 0, Vec::new()));
    }
    let mut outcomes = Vec::with_capacity(updates.len());
    for u in updates {
        let Some(row) = rows.get_mut(&u.store_id) else {
            // No such store: like an UPDATE of a missing row, nothing to apply.
            outcomes.push(Applied::Rejected);
            continue;
        };
        let applied = judge(u.seq, row.0, fence);
        if applied != Applied::Rejected {
            *row = (u.seq, u.radius_m, row.2 + 1, u.payload.clone());
        }
        outcomes.push(applied);
    }
    let changed: Vec<(&i64, &RowState)> = rows.iter().filter(|(_, r)| r.2 > 0).collect();
    if !changed.is_empty() {
        let write = tx
            .prepare_cached(
                "UPDATE stores s SET radius_m = u.radius_m, last_seq = u.last_seq, applied = s.applied + u.n, payload = u.payload \
                 FROM unnest($1::bigint[], $2::int[], $3::bigint[], $4::bigint[], $5::bytea[]) AS u(id, radius_m, last_seq, n, payload) \
                 WHERE s.id = u.id",
            )
            .await?;
        let id: Vec<i64> = changed.iter().map(|(id, _)| **id).collect();
        let radius: Vec<i32> = changed.iter().map(|(_, r)| r.1).collect();
        let last: Vec<i64> = changed.iter().map(|(_, r)| r.0).collect();
        let n: Vec<i64> = changed.iter().map(|(_, r)| r.2).collect();
        let payload: Vec<&[u8]> = changed.iter().map(|(_, r)| r.3.as_slice()).collect();
        tx.execute(&write, &[&id, &radius, &last, &n, &payload]).await?;
    }
    Ok(outcomes)
}

/// A store's row while a batch is applied: (last_seq, radius_m, updates applied in
/// this batch, payload).
type RowState = (i64, i32, i64, Vec<u8>);

/// pgbench's version of the same hot-row transaction, with the store drawn like the
/// workload's skew draws it.
pub fn pgbench_script(skew: crate::workload::Skew) -> String {
    use crate::workload::{Skew, ZIPF_EXPONENT};
    let pick = match skew {
        Skew::Uniform => "\\set id random(1, :stores)".to_string(),
        Skew::Zipf => format!("\\set id random_zipfian(1, :stores, {ZIPF_EXPONENT})"),
        Skew::OneHot => "\\set id 1".to_string(),
    };
    format!(
        "{pick}
\\set radius random(500, 3000)
BEGIN;
SELECT radius_m, last_seq FROM stores WHERE id = :id FOR UPDATE;
UPDATE stores SET radius_m = :radius, last_seq = last_seq + 1, applied = applied + 1, payload = decode(repeat('00', :payload), 'hex') WHERE id = :id;
END;
"
    )
}
