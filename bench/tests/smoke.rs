//! A tiny sweep against real PostgreSQL, Redis and tansu, checking the correctness
//! counters rather than the speed (speed is for the full sweep, not the test suite).

use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;
use kafka_rpc_testkit::{TempPostgres, TempRedis};
use lock_vs_rpc::contender::RpcBroker;
use lock_vs_rpc::audit::audit;
use lock_vs_rpc::contender::{Contender, Counters, Pending};
use lock_vs_rpc::db::{self, Applied, FinalRow, WriteError};
use lock_vs_rpc::run::drive;
use lock_vs_rpc::sweep::{sweep, Kind, Level, Plan, Servers};
use lock_vs_rpc::workload::{Amount, Skew, Update, Workload};

const TRIGGERS: u64 = 400;

fn servers() -> (TempPostgres, TempRedis) {
    let pg = TempPostgres::start().unwrap_or_else(|e| panic!("the smoke test needs PostgreSQL: {e}"));
    let redis = TempRedis::start().unwrap_or_else(|e| panic!("the smoke test needs Redis: {e}"));
    (pg, redis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_sweep_finds_kafka_rpc_in_order_and_counts_what_locks_get_wrong() {
    let (pg, redis) = servers();
    let bootstrap = tokio::task::spawn_blocking(lock_vs_rpc::broker::tansu).await.expect("tansu launcher");
    let scratch = pg.dir().join("scratch");
    let plan = Plan {
        levels: vec![Level { stores: 4, concurrency: 16 }],
        kinds: vec![
            Kind::Pgbench,
            Kind::RowLock { fence: false },
            Kind::RowLock { fence: true },
            Kind::RedisLock { fence: false },
            Kind::RedisLock { fence: true },
            Kind::Rpc { broker: RpcBroker::Embedded },
            Kind::RpcBatched { broker: RpcBroker::Embedded },
            Kind::Rpc { broker: RpcBroker::Kafka(bootstrap.clone()) },
            Kind::RpcBatched { broker: RpcBroker::Kafka(bootstrap) },
        ],
        skew: Skew::Uniform,
        amount: Amount::Count(TRIGGERS),
        payload: 16,
        rate: 4_000.0,
        rounds: 1,
        scratch,
    };
    let servers = Servers { postgres: pg.connection_string(), pg_bin_dir: pg.bin_dir().to_path_buf(), redis: redis.url() };
    let cells = tokio::time::timeout(Duration::from_secs(120), sweep(&plan, &servers, &ProgressBar::hidden()))
        .await
        .expect("the tiny sweep finished")
        .unwrap_or_else(|e| panic!("sweep failed: {e}"));
    assert_eq!(cells.len(), plan.kinds.len());

    for c in &cells {
        let name = &c.contender;
        assert!(c.per_second > 0.0, "{name}: no throughput");
        if name == "pgbench" {
            assert_eq!(c.failed, 0, "pgbench transactions failed");
            assert_eq!(c.correctness, None, "pgbench's order and loss are not measured");
            continue;
        }
        assert_eq!(c.completed + c.failed, TRIGGERS, "{name}: every trigger has an outcome");
        assert!(c.p50_ms.is_some() && c.p99_ms >= c.p50_ms, "{name}: latency percentiles");
        let Some(k) = c.correctness else { panic!("{name}: correctness not measured") };
        // Whatever the contender, the rows agree with what callers were told, and
        // nothing wrote a row another update was writing.
        assert_eq!((k.audit.lost, k.audit.extra, k.conflicts), (0, 0, 0), "{name}: {c:?}");
        if name.starts_with("kafka-rpc") {
            assert_eq!(c.failed, 0, "{name}: failures, first: {:?}", c.first_error);
            // Requests are handled in call order, each once. (Trigger order is not
            // asserted: a trigger can lose a race to its call on a loaded machine.)
            assert_eq!((k.call_order, k.duplicates, k.rejected), (Some(0), 0, 0), "{name}: {c:?}");
        } else if c.fenced {
            // The fence turns every stale write into a rejection.
            assert_eq!((k.stale, k.duplicates, k.audit.stale_at_end), (0, 0, 0), "{name}: {c:?}");
        } else {
            // A store ends behind a written trigger only if a stale write landed after it.
            if k.audit.stale_at_end > 0 {
                assert!(k.stale > 0, "{name}: stale rows without stale writes: {c:?}");
            }
            assert_eq!(k.rejected, 0, "{name}: rejections without a fence");
        }
    }
}

#[tokio::test]
async fn the_update_counts_stale_and_repeated_writes_and_the_fence_rejects_them() {
    let (pg, _redis) = servers();
    let pool = db::pool(&pg.connection_string(), 1).unwrap_or_else(|e| panic!("{e}"));
    db::reset(&pool, 1).await.unwrap_or_else(|e| panic!("{e}"));
    let mut conn = pool.get().await.expect("a connection");
    let update = |seq| Update { store_id: 1, seq, radius_m: 1_000, payload: vec![1, 2] };
    let mut apply = async |seq, fence| {
        let tx = conn.transaction().await.expect("begin");
        let (applied, _) = db::read_modify_write(&tx, &update(seq), true, fence).await.expect("update");
        tx.commit().await.expect("commit");
        applied
    };
    assert_eq!(apply(1, false).await, Applied::InOrder);
    assert_eq!(apply(3, false).await, Applied::Ahead, "2 was skipped");
    assert_eq!(apply(2, true).await, Applied::Rejected);
    assert_eq!(apply(3, true).await, Applied::Rejected);
    assert_eq!(apply(3, false).await, Applied::Duplicate);
    assert_eq!(apply(2, false).await, Applied::Stale);
    drop(conn);
    let rows = db::final_rows(&pool, 1).await.expect("read back");
    assert_eq!(rows, vec![FinalRow { last_seq: 2, applied: 4, high_seq: 3 }], "every unfenced write is counted");
}

#[tokio::test]
async fn a_batch_judges_each_update_like_one_transaction_per_update_would() {
    let (pg, _redis) = servers();
    let pool = db::pool(&pg.connection_string(), 1).unwrap_or_else(|e| panic!("{e}"));
    let update = |store_id, seq| Update { store_id, seq, radius_m: 700 + seq as i32, payload: vec![seq as u8] };
    for (fence, want) in [
        // 3 follows 2 and 1, both written: in order, whatever the last write was.
        (false, vec![Applied::Ahead, Applied::Stale, Applied::Duplicate, Applied::InOrder, Applied::InOrder]),
        (true, vec![Applied::Ahead, Applied::Rejected, Applied::Rejected, Applied::InOrder, Applied::InOrder]),
    ] {
        db::reset(&pool, 2).await.unwrap_or_else(|e| panic!("{e}"));
        let batch = [update(1, 2), update(1, 1), update(1, 1), update(1, 3), update(2, 1)];
        let mut conn = pool.get().await.expect("a connection");
        let tx = conn.transaction().await.expect("begin");
        let got = db::apply_batch(&tx, &batch, fence).await.expect("batch");
        tx.commit().await.expect("commit");
        assert_eq!(got, want, "fence {fence}");
        let applied: i64 = conn.query_one("SELECT applied FROM stores WHERE id = 1", &[]).await.expect("applied").get(0);
        // The pool has one connection.
        drop(conn);
        let last: Vec<i64> = db::final_rows(&pool, 2).await.expect("read back").iter().map(|r| r.last_seq).collect();
        assert_eq!(last, vec![3, 1], "fence {fence}");
        assert_eq!(applied, want[..4].iter().filter(|a| **a != Applied::Rejected).count() as i64, "fence {fence}");
    }
}

#[tokio::test]
async fn a_write_over_a_row_changed_since_its_read_is_refused_as_a_conflict() {
    let (pg, _redis) = servers();
    let pool = db::pool(&pg.connection_string(), 2).unwrap_or_else(|e| panic!("{e}"));
    db::reset(&pool, 1).await.unwrap_or_else(|e| panic!("{e}"));
    let update = |seq| Update { store_id: 1, seq, radius_m: 1_000, payload: vec![] };
    // The first writer holds its written row uncommitted; the second, with no lock,
    // reads the committed row, then its write waits behind the first's.
    let mut first = pool.get().await.expect("a connection");
    let tx = first.transaction().await.expect("begin");
    db::read_modify_write(&tx, &update(1), false, false).await.expect("first write");
    let second = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut conn = pool.get().await.expect("a second connection");
            let tx = conn.transaction().await.expect("begin");
            db::read_modify_write(&tx, &update(2), false, false).await.map(|(applied, _)| applied)
        }
    });
    let admin = db::pool(&pg.connection_string(), 1).unwrap_or_else(|e| panic!("{e}"));
    let admin = admin.get().await.expect("an admin connection");
    // Wait until the second writer is blocked on the row, not merely started.
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE stores%'";
    while admin.query_one(waiting, &[]).await.expect("pg_stat_activity").get::<_, i64>(0) == 0 {
        tokio::task::yield_now().await;
    }
    tx.commit().await.expect("commit");
    let got = second.await.expect("second writer");
    assert!(matches!(got, Err(WriteError::Conflict)), "{got:?}");
}

/// Writes only odd sequence numbers and tells every caller its update was written.
struct Liar {
    pool: deadpool_postgres::Pool,
}

impl Contender for Liar {
    fn start(&self, update: Update) -> Pending {
        let pool = self.pool.clone();
        Box::pin(async move {
            if update.seq % 2 == 1 {
                let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                let tx = conn.transaction().await.map_err(|e| e.to_string())?;
                db::read_modify_write(&tx, &update, true, false).await.map_err(|e| e.to_string())?;
                tx.commit().await.map_err(|e| e.to_string())?;
            }
            Ok(Applied::InOrder)
        })
    }
}

#[tokio::test]
async fn the_audit_finds_updates_lost_although_their_callers_were_told_they_were_written() {
    let (pg, _redis) = servers();
    let pool = db::pool(&pg.connection_string(), 4).unwrap_or_else(|e| panic!("{e}"));
    db::reset(&pool, 2).await.unwrap_or_else(|e| panic!("{e}"));
    // One trigger at a time: each store's triggers arrive in order, so the skipped
    // even ones show only in the rows' counts.
    let workload = Workload { stores: 2, concurrency: 1, skew: Skew::Uniform, amount: Amount::Count(40), payload: 4, rate: 10_000.0 };
    let counters = Arc::new(Counters::default());
    let measured = drive(Arc::new(Liar { pool: pool.clone() }), &workload, Arc::clone(&counters), 7).await;
    assert_eq!(Counters::get(&counters.completed), 40, "every caller was told OK");
    let rows = db::final_rows(&pool, 2).await.expect("read back");
    let written: i64 = rows.iter().map(|r| r.applied).sum();
    let found = audit(&rows, &measured.told);
    assert_eq!((found.lost, found.extra), (40 - written as u64, 0), "{found:?}");
    assert!(found.lost >= 19, "every even trigger was skipped: {found:?}");
}

/// Applies every update twice through the row-lock contender, as a redelivered request
/// would be, and tells the caller the first outcome only.
struct Redelivered(lock_vs_rpc::contender::RowLock);

impl Contender for Redelivered {
    fn start(&self, update: Update) -> Pending {
        let first = self.0.start(update.clone());
        let again = self.0.start(update);
        Box::pin(async move {
            let told = first.await;
            let _ = again.await;
            told
        })
    }
}

#[tokio::test]
async fn a_second_write_of_a_trigger_is_counted_as_dup_even_when_its_caller_never_hears_of_it() {
    let (pg, _redis) = servers();
    let pool = db::pool(&pg.connection_string(), 4).unwrap_or_else(|e| panic!("{e}"));
    db::reset(&pool, 2).await.unwrap_or_else(|e| panic!("{e}"));
    let workload = Workload { stores: 2, concurrency: 1, skew: Skew::Uniform, amount: Amount::Count(20), payload: 4, rate: 10_000.0 };
    let counters = Arc::new(Counters::default());
    let contender = Redelivered(lock_vs_rpc::contender::RowLock::new(pool.clone(), Arc::clone(&counters), false));
    let measured = drive(Arc::new(contender), &workload, Arc::clone(&counters), 7).await;
    let rows = db::final_rows(&pool, 2).await.expect("read back");
    assert_eq!(rows.iter().map(|r| r.applied).sum::<i64>(), 40, "every trigger was written twice");
    assert_eq!(audit(&rows, &measured.told).extra, 20);
    // "dup" is what the writes found, not what callers were told: each second write
    // found its own trigger already in the row.
    assert_eq!(Counters::get(&counters.duplicates), 20, "{counters:?}");
}

#[tokio::test]
async fn a_write_is_judged_against_the_highest_trigger_written_not_the_last() {
    let (pg, _redis) = servers();
    let pool = db::pool(&pg.connection_string(), 1).unwrap_or_else(|e| panic!("{e}"));
    let update = |seq| Update { store_id: 1, seq, radius_m: 1_000, payload: vec![] };
    for (order, want) in [
        // 3 and 2 swap; 4 comes after all three and is in order.
        ([1, 3, 2, 4], [Applied::InOrder, Applied::Ahead, Applied::Stale, Applied::InOrder]),
        // 3 comes after 4 was written: stale, although it is one past the last write (2).
        ([1, 4, 2, 3], [Applied::InOrder, Applied::Ahead, Applied::Stale, Applied::Stale]),
    ] {
        db::reset(&pool, 1).await.unwrap_or_else(|e| panic!("{e}"));
        let mut conn = pool.get().await.expect("a connection");
        let mut got = Vec::new();
        for seq in order {
            let tx = conn.transaction().await.expect("begin");
            got.push(db::read_modify_write(&tx, &update(seq), true, false).await.expect("update").0);
            tx.commit().await.expect("commit");
        }
        assert_eq!(got, want, "triggers written in the order {order:?}");
        // The batch judges the same way.
        drop(conn);
        db::reset(&pool, 1).await.unwrap_or_else(|e| panic!("{e}"));
        let mut conn = pool.get().await.expect("a connection");
        let tx = conn.transaction().await.expect("begin");
        let batch: Vec<Update> = order.iter().map(|&seq| update(seq)).collect();
        assert_eq!(db::apply_batch(&tx, &batch, false).await.expect("batch"), want, "batch {order:?}");
        tx.commit().await.expect("commit");
    }
}

#[tokio::test]
async fn a_failure_known_to_have_written_nothing_does_not_excuse_an_extra_write() {
    let (pg, _redis) = servers();
    let pool = db::pool(&pg.connection_string(), 2).unwrap_or_else(|e| panic!("{e}"));
    db::reset(&pool, 1).await.unwrap_or_else(|e| panic!("{e}"));
    // Someone nobody asked writes store 1 and holds the row past the contender's
    // lock timeout, so the contender's one update fails before it writes anything.
    let intruder = db::pool(&pg.connection_string(), 1).unwrap_or_else(|e| panic!("{e}"));
    let mut intruder = intruder.get().await.expect("a connection");
    let tx = intruder.transaction().await.expect("begin");
    tx.execute("UPDATE stores SET applied = applied + 1 WHERE id = 1", &[]).await.expect("intruding write");
    let workload = Workload { stores: 1, concurrency: 1, skew: Skew::Uniform, amount: Amount::Count(1), payload: 4, rate: 1_000.0 };
    let counters = Arc::new(Counters::default());
    let contender = lock_vs_rpc::contender::RowLock::new(pool.clone(), Arc::clone(&counters), false);
    let measured = drive(Arc::new(contender), &workload, Arc::clone(&counters), 7).await;
    tx.commit().await.expect("commit");
    assert_eq!(Counters::get(&counters.lock_timeouts), 1, "{counters:?}");
    let rows = db::final_rows(&pool, 1).await.expect("read back");
    assert_eq!(rows[0].applied, 1);
    // The failed update timed out waiting for the row lock: it wrote nothing, so the
    // one write the row counts was asked for by no one.
    assert_eq!(audit(&rows, &measured.told).extra, 1, "{:?}", measured.first_error);
}
