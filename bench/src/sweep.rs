//! A sweep: every contender at every contention level, on the same servers, one
//! after another, with the table reset before each cell.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::contender::{Contender, Counters, RedisLock, Rpc, RpcBroker, RowLock};
use crate::audit::{audit, Audit};
use crate::db;
use crate::run::drive;
use crate::workload::{Amount, Skew, Workload};

/// One contention level: M stores, N concurrent triggers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level {
    /// Stores M.
    pub stores: u64,
    /// Concurrent triggers N.
    pub concurrency: usize,
}

impl Level {
    /// `M=8 N=256`, as reports and plots label it.
    pub fn label(&self) -> String {
        format!("M={} N={}", self.stores, self.concurrency)
    }
}

/// A contender as the sweep names it.
#[derive(Clone, Debug)]
pub enum Kind {
    /// Redis lock around a read–modify–write; `fence` rejects stale writes.
    RedisLock {
        /// Whether the fencing check is on.
        fence: bool,
    },
    /// PostgreSQL row lock; `fence` rejects stale writes.
    RowLock {
        /// Whether the fencing check is on.
        fence: bool,
    },
    /// kafka-rpc, one request at a time, on `broker`.
    Rpc {
        /// The broker carrying requests.
        broker: RpcBroker,
    },
    /// kafka-rpc with a batch handler: one transaction per fetched batch, on `broker`.
    RpcBatched {
        /// The broker carrying requests.
        broker: RpcBroker,
    },
    /// pgbench running the same hot-row transaction: the anchor.
    Pgbench,
}

impl Kind {
    /// The contender's name in reports.
    pub fn name(&self) -> String {
        match self {
            Kind::RedisLock { fence } => format!("redis-lock{}", if *fence { "+fence" } else { "" }),
            Kind::RowLock { fence } => format!("pg-row-lock{}", if *fence { "+fence" } else { "" }),
            Kind::Rpc { broker } => format!("kafka-rpc/{}", broker.name()),
            Kind::RpcBatched { broker } => format!("kafka-rpc-batched/{}", broker.name()),
            Kind::Pgbench => "pgbench".into(),
        }
    }

    fn fenced(&self) -> bool {
        matches!(self, Kind::RedisLock { fence: true } | Kind::RowLock { fence: true })
    }
}

/// Where the servers are.
#[derive(Clone, Debug)]
pub struct Servers {
    /// PostgreSQL connection string.
    pub postgres: String,
    /// The directory with `pgbench`.
    pub pg_bin_dir: PathBuf,
    /// Redis URL.
    pub redis: String,
}

/// What to sweep.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Contention levels, low to high.
    pub levels: Vec<Level>,
    /// Contenders run at every level.
    pub kinds: Vec<Kind>,
    /// Key skew.
    pub skew: Skew,
    /// Per cell.
    pub amount: Amount,
    /// Payload bytes per trigger.
    pub payload: usize,
    /// Offered triggers per second.
    pub rate: f64,
    /// How many times each cell runs.
    pub rounds: usize,
    /// Where pgbench's script is written.
    pub scratch: PathBuf,
}

/// One cell of the result table: one contender at one level, one round.
#[derive(Clone, Debug)]
pub struct Cell {
    /// Contender name.
    pub contender: String,
    /// Fencing check on.
    pub fenced: bool,
    /// Contention.
    pub level: Level,
    /// Key skew.
    pub skew: Skew,
    /// Which of the plan's rounds, from 1.
    pub round: usize,
    /// Offered triggers/s (0 for pgbench, which runs closed-loop).
    pub offered_rate: f64,
    /// Updates with an outcome: written or rejected by the fence.
    pub completed: u64,
    /// Failed updates.
    pub failed: u64,
    /// Updates written per second: rejected ones are not counted.
    pub per_second: f64,
    /// Updates the fence rejected per second.
    pub rejected_per_second: f64,
    /// Latency percentiles in ms (None for pgbench).
    pub p50_ms: Option<f64>,
    /// p99 in ms.
    pub p99_ms: Option<f64>,
    /// p99.9 in ms.
    pub p999_ms: Option<f64>,
    /// What was checked about order and loss; None where the harness cannot see it
    /// (pgbench runs its own transaction).
    pub correctness: Option<Correctness>,
    /// What the locks did.
    pub locks: LockStats,
    /// Triggers scheduled in a timed cell but never sent: the contender fell this far behind.
    pub backlog: u64,
    /// Why the first failed update failed.
    pub first_error: Option<String>,
}

/// What the locks of a cell (or of its rounds, summed) did; zeros for contenders
/// without that lock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockStats {
    /// Updates that had to wait for their lock.
    pub waits: u64,
    /// Redis lock retries.
    pub retries: u64,
    /// Redis locks that expired inside the critical section, or could not be released.
    pub expiries: u64,
    /// PostgreSQL lock timeouts.
    pub timeouts: u64,
    /// PostgreSQL deadlocks.
    pub deadlocks: u64,
}

impl LockStats {
    /// This and `other` added up.
    pub fn add(&self, other: &LockStats) -> LockStats {
        LockStats {
            waits: self.waits + other.waits,
            retries: self.retries + other.retries,
            expiries: self.expiries + other.expiries,
            timeouts: self.timeouts + other.timeouts,
            deadlocks: self.deadlocks + other.deadlocks,
        }
    }
}

/// What a cell found about order and loss: the writes' own judgement (each
/// transaction compares its trigger with the row it read) and the audit of the rows
/// against what callers were told.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Correctness {
    /// Updates written ahead of an earlier trigger of their store.
    pub ahead: u64,
    /// Updates written after a later trigger of their store.
    pub stale: u64,
    /// Updates written twice, seen by the write.
    pub duplicates: u64,
    /// Stale updates the fence rejected (their callers got "rejected", not "failed").
    pub rejected: u64,
    /// Writes that found their row changed since their read: mutual exclusion broke.
    pub conflicts: u64,
    /// kafka-rpc only: requests handled out of the order their calls were made, the
    /// library's own promise (the other columns judge trigger order, which a trigger
    /// can lose before its call).
    pub call_order: Option<u64>,
    /// The rows against the callers.
    pub audit: Audit,
}

impl Correctness {
    /// Order violations: updates written out of trigger order, either way.
    pub fn out_of_order(&self) -> u64 {
        self.ahead + self.stale
    }

    /// This and `other` added up.
    pub fn add(&self, other: &Correctness) -> Correctness {
        Correctness {
            ahead: self.ahead + other.ahead,
            stale: self.stale + other.stale,
            duplicates: self.duplicates + other.duplicates,
            rejected: self.rejected + other.rejected,
            conflicts: self.conflicts + other.conflicts,
            call_order: match (self.call_order, other.call_order) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            },
            audit: Audit {
                lost: self.audit.lost + other.audit.lost,
                extra: self.audit.extra + other.audit.extra,
                stale_at_end: self.audit.stale_at_end + other.audit.stale_at_end,
            },
        }
    }
}

/// Runs every cell of `plan`, advancing `progress` per cell.
pub async fn sweep(plan: &Plan, servers: &Servers, progress: &ProgressBar) -> Result<Vec<Cell>, String> {
    progress.set_length((plan.levels.len() * plan.kinds.len() * plan.rounds) as u64);
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let mut cells = Vec::new();
    for level in &plan.levels {
        // Rounds interleave the contenders, so a slow spell of the machine falls on
        // all of them rather than on whichever ran then.
        for round in 1..=plan.rounds {
            for kind in &plan.kinds {
                progress.set_message(format!("{} at {}, round {round}", kind.name(), level.label()));
                let mut cell = run_cell(plan, servers, *level, kind).await?;
                cell.round = round;
                progress.inc(1);
                cells.push(cell);
            }
        }
    }
    progress.finish_with_message("done");
    Ok(cells)
}

/// Runs one contender at one level on a freshly reset table.
pub async fn run_cell(plan: &Plan, servers: &Servers, level: Level, kind: &Kind) -> Result<Cell, String> {
    let admin = db::pool(&servers.postgres, 1)?;
    db::reset(&admin, level.stores).await?;
    if let Kind::Pgbench = kind {
        return pgbench(plan, servers, level).await;
    }
    let workload = Workload {
        stores: level.stores,
        concurrency: level.concurrency,
        skew: plan.skew,
        amount: plan.amount,
        payload: plan.payload,
        rate: plan.rate,
    };
    let counters = Arc::new(Counters::default());
    let mut rpc = None;
    let contender: Arc<dyn Contender> = match kind {
        // One connection per concurrent trigger: each may hold one while it waits.
        Kind::RowLock { fence } => Arc::new(RowLock::new(db::pool(&servers.postgres, level.concurrency)?, Arc::clone(&counters), *fence)),
        Kind::RedisLock { fence } => {
            let client = redis::Client::open(servers.redis.as_str()).map_err(|e| format!("bad Redis URL: {e}"))?;
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("cannot connect to Redis at {}: {e}", servers.redis))?;
            let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.map_err(|e| format!("Redis FLUSHALL: {e}"))?;
            let pool = db::pool(&servers.postgres, level.concurrency)?;
            Arc::new(RedisLock::new(conn, pool, Arc::clone(&counters), *fence))
        }
        Kind::Rpc { broker } | Kind::RpcBatched { broker } => {
            // One connection per partition worker: that is all that can run at once.
            let pool = db::pool(&servers.postgres, crate::contender::PARTITIONS as usize)?;
            let batched = matches!(kind, Kind::RpcBatched { .. });
            let started = Arc::new(Rpc::start(broker, pool, level.stores, Arc::clone(&counters), batched).await?);
            rpc = Some(Arc::clone(&started));
            started
        }
        Kind::Pgbench => unreachable!("handled above"),
    };
    let measured = drive(Arc::clone(&contender), &workload, Arc::clone(&counters), 0x5EED ^ level.stores).await;
    drop(contender);
    if let Some(rpc) = rpc {
        match Arc::try_unwrap(rpc) {
            Ok(rpc) => rpc.shutdown().await?,
            Err(_) => return Err("the kafka-rpc contender is still in use after its run".into()),
        }
    }
    let rows = db::final_rows(&admin, level.stores).await?;
    let ms = |q: f64| Some(measured.latency.value_at_quantile(q) as f64 / 1000.0);
    let get = Counters::get;
    let (completed, rejected) = (get(&counters.completed), get(&counters.rejected));
    let seconds = measured.elapsed.as_secs_f64().max(1e-9);
    Ok(Cell {
        contender: kind.name(),
        fenced: kind.fenced(),
        level,
        skew: plan.skew,
        round: 1,
        offered_rate: plan.rate,
        completed,
        failed: get(&counters.failed),
        per_second: completed.saturating_sub(rejected) as f64 / seconds,
        rejected_per_second: rejected as f64 / seconds,
        p50_ms: ms(0.50),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        correctness: Some(Correctness {
            ahead: get(&counters.ahead),
            stale: get(&counters.stale),
            duplicates: get(&counters.duplicates),
            rejected,
            conflicts: get(&counters.conflicts),
            call_order: matches!(kind, Kind::Rpc { .. } | Kind::RpcBatched { .. }).then(|| get(&counters.call_order)),
            audit: audit(&rows, &measured.told),
        }),
        locks: LockStats {
            waits: get(&counters.lock_waits),
            retries: get(&counters.lock_retries),
            expiries: get(&counters.lock_expiries),
            timeouts: get(&counters.lock_timeouts),
            deadlocks: get(&counters.deadlocks),
        },
        backlog: measured.backlog,
        first_error: measured.first_error,
    })
}

/// Runs pgbench with the same transaction, closed-loop with N clients, for the cell's
/// duration (or N clients sharing the cell's count).
async fn pgbench(plan: &Plan, servers: &Servers, level: Level) -> Result<Cell, String> {
    let script = plan.scratch.join(format!("pgbench-{}.sql", plan.skew.name()));
    std::fs::create_dir_all(&plan.scratch).map_err(|e| format!("cannot create {}: {e}", plan.scratch.display()))?;
    std::fs::write(&script, db::pgbench_script(plan.skew)).map_err(|e| format!("cannot write {}: {e}", script.display()))?;
    let config: tokio_postgres::Config = servers.postgres.parse().map_err(|e| format!("bad connection string: {e}"))?;
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let mut cmd = Command::new(servers.pg_bin_dir.join("pgbench"));
    cmd.args(["-n", "-h", "127.0.0.1", "-U", "postgres", "-j", "2"])
        .arg("-p")
        .arg(port.to_string())
        .arg("-c")
        .arg(level.concurrency.to_string())
        .arg("-D")
        .arg(format!("stores={}", level.stores))
        .arg("-D")
        .arg(format!("payload={}", plan.payload))
        .arg("-f")
        .arg(&script);
    match plan.amount {
        // pgbench 15's tps leaves out the time its connections took to open, so the
        // cell's own duration measures the same thing as the others'.
        Amount::Duration(d) => cmd.arg("-T").arg(d.as_secs().max(1).to_string()),
        Amount::Count(n) => cmd.arg("-t").arg((n / level.concurrency as u64).max(1).to_string()),
    };
    cmd.arg("postgres");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(|e| format!("pgbench task: {e}"))?
        .map_err(|e| format!("cannot run pgbench from {}: {e}", servers.pg_bin_dir.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("pgbench failed with {}:\n{stdout}{}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    let number_after = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    let tps = number_after("tps = ").ok_or_else(|| format!("no tps in pgbench's output:\n{stdout}"))?;
    let done = number_after("number of transactions actually processed: ").unwrap_or(0.0) as u64;
    let failed = number_after("number of failed transactions: ").unwrap_or(0.0) as u64;
    Ok(Cell {
        contender: Kind::Pgbench.name(),
        fenced: false,
        level,
        skew: plan.skew,
        round: 1,
        offered_rate: 0.0,
        completed: done,
        failed,
        per_second: tps,
        rejected_per_second: 0.0,
        p50_ms: None,
        p99_ms: None,
        p999_ms: None,
        correctness: None,
        locks: LockStats::default(),
        backlog: 0,
        first_error: None,
    })
}

/// Where results go: `target/bench` under the workspace.
pub fn default_out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench")
}

/// How long each cell of the default sweep runs.
pub const DEFAULT_CELL: Duration = Duration::from_secs(3);
