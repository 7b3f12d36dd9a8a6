//! A tiny sweep against real PostgreSQL, Redis and tansu, checking the correctness
//! counters rather than the speed (speed is for the full sweep, not the test suite).

use std::time::Duration;

use indicatif::ProgressBar;
use kafka_rpc_testkit::{TempPostgres, TempRedis};
use lock_vs_rpc::contender::RpcBroker;
use lock_vs_rpc::db::{self, Applied};
use lock_vs_rpc::sweep::{sweep, Kind, Level, Plan, Servers};
use lock_vs_rpc::workload::{Amount, Skew, Update};

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
            continue;
        }
        assert_eq!(c.completed + c.failed, TRIGGERS, "{name}: every trigger has an outcome");
        assert!(c.p50_ms.is_some() && c.p99_ms >= c.p50_ms, "{name}: latency percentiles");
        if name.starts_with("kafka-rpc") {
            assert_eq!(c.failed, 0, "{name}: failures, first: {:?}", c.first_error);
            assert_eq!((c.order_violations, c.lost_updates, c.duplicates, c.rejected), (0, 0, 0, 0), "{name}: {c:?}");
        } else if c.fenced {
            // The fence turns every stale write into a rejection.
            assert_eq!((c.order_violations, c.duplicates), (0, 0), "{name}: {c:?}");
        } else {
            // A store ends behind its last trigger only if a stale write landed after
            // it, which is an order violation (or the last trigger failed).
            assert!(c.lost_updates <= plan.levels[0].stores, "{name}: {c:?}");
            if c.failed == 0 && c.lost_updates > 0 {
                assert!(c.order_violations > 0, "{name}: lost updates without violations: {c:?}");
            }
            assert_eq!(c.rejected, 0, "{name}: rejections without a fence");
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
    assert_eq!(apply(2, false).await, Applied::InOrder);
    assert_eq!(apply(1, true).await, Applied::Rejected);
    assert_eq!(apply(2, true).await, Applied::Rejected);
    assert_eq!(apply(2, false).await, Applied::Duplicate);
    assert_eq!(apply(1, false).await, Applied::OutOfOrder);
    drop(conn);
    assert_eq!(db::final_sequences(&pool, 1).await.expect("read back"), vec![1], "unfenced stale write went through");
}

#[tokio::test]
async fn a_batch_judges_each_update_like_one_transaction_per_update_would() {
    let (pg, _redis) = servers();
    let pool = db::pool(&pg.connection_string(), 1).unwrap_or_else(|e| panic!("{e}"));
    let update = |store_id, seq| Update { store_id, seq, radius_m: 700 + seq as i32, payload: vec![seq as u8] };
    for (fence, want) in [
        (false, vec![Applied::InOrder, Applied::OutOfOrder, Applied::Duplicate, Applied::InOrder, Applied::InOrder]),
        (true, vec![Applied::InOrder, Applied::Rejected, Applied::Rejected, Applied::InOrder, Applied::InOrder]),
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
        assert_eq!(db::final_sequences(&pool, 2).await.expect("read back"), vec![3, 1], "fence {fence}");
        assert_eq!(applied, want[..4].iter().filter(|a| **a != Applied::Rejected).count() as i64, "fence {fence}");
    }
}
