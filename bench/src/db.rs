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

/// What one update did to its row, judged inside its transaction against the row it
/// read: the store's triggers are numbered 1, 2, 3, … in the order they happened, so
/// an update in trigger order is exactly one past the highest trigger already written
/// (`high_seq`). Against the highest, not the last written (`last_seq`): without a
/// fence a stale write moves `last_seq` back, and judged against it, after 1, 3, 2 the
/// trigger 4 would count as ahead and after 1, 4, 2 the trigger 3 as in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Applied right after the store's highest trigger written (`seq == high_seq + 1`).
    InOrder,
    /// Applied ahead of an earlier trigger of its store that had not been applied
    /// (`seq > high_seq + 1`): that one will come later (stale), failed, or was lost.
    Ahead,
    /// Applied although a later trigger was already written (`seq < high_seq`): the
    /// store now shows an older radius than its latest trigger asked for.
    Stale,
    /// Applied although the row already held this very trigger (`seq == last_seq` or
    /// `seq == high_seq`): a duplicate.
    Duplicate,
    /// Not applied: the fencing check found a trigger at this sequence number or later
    /// already written (`seq <= high_seq`).
    Rejected,
}

impl Applied {
    /// Whether the update was written.
    pub fn written(self) -> bool {
        self != Applied::Rejected
    }
}

/// A write found the row changed since its transaction read it: two updates of one
/// store ran at once, which whatever keeps them apart (a lock, partition ownership)
/// must prevent. The write is not made and the transaction fails.
pub const CONFLICT: &str = "concurrent write: the row changed after this update read it";

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
                 high_seq bigint NOT NULL,
                 applied bigint NOT NULL,
                 payload bytea NOT NULL
             );
             INSERT INTO stores SELECT g, {FULL_RADIUS_M}, 0, 0, 0, ''::bytea FROM generate_series(1, {stores}) g;"
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

/// What a store's row holds after a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FinalRow {
    /// The sequence number of the last update written.
    pub last_seq: i64,
    /// How many updates were written to the row, counted by the writes themselves.
    pub applied: i64,
    /// The highest sequence number ever written.
    pub high_seq: i64,
}

/// Each store's row after a run, index `id - 1`.
pub async fn final_rows(pool: &Pool, stores: u64) -> Result<Vec<FinalRow>, String> {
    let client = pool.get().await.map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
    let rows = client
        .query("SELECT id, last_seq, applied, high_seq FROM stores ORDER BY id", &[])
        .await
        .map_err(|e| format!("cannot read the stores table: {}", describe(&e)))?;
    let mut last = vec![FinalRow::default(); stores as usize];
    for row in rows {
        let id: i64 = row.get(0);
        if let Some(slot) = usize::try_from(id - 1).ok().and_then(|i| last.get_mut(i)) {
            *slot = FinalRow { last_seq: row.get(1), applied: row.get(2), high_seq: row.get(3) };
        }
    }
    Ok(last)
}

/// Reads the store's row (`FOR UPDATE` when `lock_row`), judges the update against
/// it, and writes the update unless `fence` rejects a stale one. The write is a
/// compare-and-set on the row's `applied` count, which every write increments: if
/// another transaction wrote the row after this one read it, nothing is written and
/// the error says [`CONFLICT`], so a broken mutual exclusion shows instead of one
/// update silently overwriting another. Runs inside the caller's transaction; returns
/// what happened and how long the read took (a row-lock wait shows up there).
pub async fn read_modify_write(
    tx: &impl GenericClient,
    u: &Update,
    lock_row: bool,
    fence: bool,
) -> Result<(Applied, Duration), WriteError> {
    let read = if lock_row {
        "SELECT radius_m, last_seq, applied, high_seq FROM stores WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT radius_m, last_seq, applied, high_seq FROM stores WHERE id = $1"
    };
    let read = tx.prepare_cached(read).await?;
    let started = Instant::now();
    let row = tx.query_one(&read, &[&u.store_id]).await?;
    let read_took = started.elapsed();
    let applied = judge(u.seq, row.get(1), row.get(3), fence);
    if !applied.written() {
        return Ok((applied, read_took));
    }
    let seen: i64 = row.get(2);
    let write = tx
        .prepare_cached(
            "UPDATE stores SET radius_m = $2, last_seq = $3, high_seq = GREATEST(high_seq, $3), applied = applied + 1, payload = $4 \
             WHERE id = $1 AND applied = $5",
        )
        .await?;
    if tx.execute(&write, &[&u.store_id, &u.radius_m, &u.seq, &u.payload, &seen]).await? != 1 {
        return Err(WriteError::Conflict);
    }
    Ok((applied, read_took))
}

/// Why an update could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// PostgreSQL refused a statement.
    #[error("{}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    /// Another transaction wrote the row between this one's read and write.
    #[error("{CONFLICT}")]
    Conflict,
}

/// What an update with sequence number `seq` does to a row whose last applied one is
/// `last_seq` and highest applied one `high_seq`: the one comparison every contender
/// makes (see [`Applied`]).
pub fn judge(seq: i64, last_seq: i64, high_seq: i64, fence: bool) -> Applied {
    if seq > high_seq {
        return if seq == high_seq + 1 { Applied::InOrder } else { Applied::Ahead };
    }
    if fence {
        Applied::Rejected
    } else if seq == last_seq || seq == high_seq {
        Applied::Duplicate
    } else {
        Applied::Stale
    }
}

/// Applies `updates` (one partition's batch, in order) inside the caller's transaction
/// with two statements: one read of every store the batch touches and one write of
/// each store's final state. Each update is judged in order against the state the
/// earlier ones left, exactly as one read–modify–write per update would; only the
/// intermediate row versions are never written, because nothing else can see them
/// before the commit. Per-update locking cannot do this: its updates of a store are
/// separate transactions.
pub async fn apply_batch(tx: &impl GenericClient, updates: &[Update], fence: bool) -> Result<Vec<Applied>, WriteError> {
    let mut ids: Vec<i64> = updates.iter().map(|u| u.store_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let read = tx.prepare_cached("SELECT id, last_seq, applied, high_seq FROM stores WHERE id = ANY($1)").await?;
    let mut rows: std::collections::HashMap<i64, RowState> = std::collections::HashMap::with_capacity(ids.len());
    for row in tx.query(&read, &[&ids]).await? {
        let state = RowState {
            last_seq: row.get(1),
            high_seq: row.get(3),
            seen: row.get(2),
            radius_m: FULL_RADIUS_M,
            written: 0,
            payload: Vec::new(),
        };
        rows.insert(row.get(0), state);
    }
    let mut outcomes = Vec::with_capacity(updates.len());
    for u in updates {
        let Some(row) = rows.get_mut(&u.store_id) else {
            // No such store: like an UPDATE of a missing row, nothing to apply.
            outcomes.push(Applied::Rejected);
            continue;
        };
        let applied = judge(u.seq, row.last_seq, row.high_seq, fence);
        if applied.written() {
            row.last_seq = u.seq;
            row.high_seq = row.high_seq.max(u.seq);
            row.radius_m = u.radius_m;
            row.written += 1;
            row.payload.clone_from(&u.payload);
        }
        outcomes.push(applied);
    }
    let changed: Vec<(&i64, &RowState)> = rows.iter().filter(|(_, r)| r.written > 0).collect();
    if !changed.is_empty() {
        // Compare-and-set per row on the `applied` count read above, as in
        // `read_modify_write`.
        let write = tx
            .prepare_cached(
                "UPDATE stores s SET radius_m = u.radius_m, last_seq = u.last_seq, high_seq = u.high_seq, applied = s.applied + u.n, \
                 payload = u.payload \
                 FROM unnest($1::bigint[], $2::int[], $3::bigint[], $4::bigint[], $5::bytea[], $6::bigint[], $7::bigint[]) \
                 AS u(id, radius_m, last_seq, n, payload, seen, high_seq) \
                 WHERE s.id = u.id AND s.applied = u.seen",
            )
            .await?;
        let id: Vec<i64> = changed.iter().map(|(id, _)| **id).collect();
        let radius: Vec<i32> = changed.iter().map(|(_, r)| r.radius_m).collect();
        let last: Vec<i64> = changed.iter().map(|(_, r)| r.last_seq).collect();
        let n: Vec<i64> = changed.iter().map(|(_, r)| r.written).collect();
        let payload: Vec<&[u8]> = changed.iter().map(|(_, r)| r.payload.as_slice()).collect();
        let seen: Vec<i64> = changed.iter().map(|(_, r)| r.seen).collect();
        let high: Vec<i64> = changed.iter().map(|(_, r)| r.high_seq).collect();
        if tx.execute(&write, &[&id, &radius, &last, &n, &payload, &seen, &high]).await? != changed.len() as u64 {
            return Err(WriteError::Conflict);
        }
    }
    Ok(outcomes)
}

/// A store's row while a batch is applied.
struct RowState {
    /// The last sequence number written, by this batch or before it.
    last_seq: i64,
    /// The highest sequence number written, by this batch or before it.
    high_seq: i64,
    /// The row's `applied` count when the batch read it: the compare-and-set's expectation.
    seen: i64,
    /// The radius to write.
    radius_m: i32,
    /// Updates this batch writes to the row.
    written: i64,
    /// The payload to write.
    payload: Vec<u8>,
}

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
UPDATE stores SET radius_m = :radius, last_seq = last_seq + 1, high_seq = high_seq + 1, applied = applied + 1, payload = decode(repeat('00', :payload), 'hex') WHERE id = :id;
END;
"
    )
}
