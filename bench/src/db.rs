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
    let last_seq: i64 = row.get(1);
    let applied = match u.seq.cmp(&last_seq) {
        std::cmp::Ordering::Greater => Applied::InOrder,
        _ if fence => return Ok((Applied::Rejected, read_took)),
        std::cmp::Ordering::Equal => Applied::Duplicate,
        std::cmp::Ordering::Less => Applied::OutOfOrder,
    };
    let write = tx
        .prepare_cached("UPDATE stores SET radius_m = $2, last_seq = $3, applied = applied + 1, payload = $4 WHERE id = $1")
        .await?;
    tx.execute(&write, &[&u.store_id, &u.radius_m, &u.seq, &u.payload]).await?;
    Ok((applied, read_took))
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
UPDATE stores SET radius_m = :radius, last_seq = last_seq + 1, applied = applied + 1, payload = decode(repeat('00', :payload), 'hex') WHERE id = :id;
END;
"
    )
}
