//! Runs the lock-vs-rpc sweep on throwaway servers and writes the CSV, the markdown
//! table and the plots.
//!
//! ```text
//! cargo run --release -p lock-vs-rpc
//! cargo run --release -p lock-vs-rpc -- --seconds 2 --levels 8x256 --skew one-hot
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use indicatif::ProgressBar;
use kafka_rpc_testkit::{TempPostgres, TempRedis};
use lock_vs_rpc::contender::RpcBroker;
use lock_vs_rpc::sweep::{default_out_dir, sweep, Kind, Level, Plan, Servers, DEFAULT_CELL};
use lock_vs_rpc::workload::{Amount, Skew};

#[derive(Parser, Debug)]
#[command(about = "Benchmark kafka-rpc against Redis and PostgreSQL locks on real servers")]
struct Args {
    /// Contention levels as STORESxTRIGGERS, low to high.
    #[arg(long, value_delimiter = ',', default_value = "10000x64,1000x128,100x256,8x256")]
    levels: Vec<String>,
    /// Key skew.
    #[arg(long, value_enum, default_value_t = Skew::Uniform)]
    skew: Skew,
    /// Seconds per cell.
    #[arg(long, default_value_t = DEFAULT_CELL.as_secs_f64())]
    seconds: f64,
    /// How many times each cell runs; the table gives the median and the range.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
    /// Triggers per cell instead of a duration.
    #[arg(long)]
    count: Option<u64>,
    /// Payload bytes per trigger.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Offered triggers per second (open loop).
    #[arg(long, default_value_t = 50_000.0)]
    rate: f64,
    /// Leave out the tansu contenders.
    #[arg(long)]
    no_tansu: bool,
    /// Output directory (default: target/bench of the workspace).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn parse_level(s: &str) -> Result<Level, String> {
    let (m, n) = s.split_once('x').ok_or_else(|| format!("level {s:?} is not STORESxTRIGGERS"))?;
    let stores = m.trim().parse().map_err(|_| format!("bad store count in {s:?}"))?;
    let concurrency = n.trim().parse().map_err(|_| format!("bad trigger count in {s:?}"))?;
    if stores == 0 || concurrency == 0 {
        return Err(format!("level {s:?} needs at least one store and one trigger"));
    }
    Ok(Level { stores, concurrency })
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lock-vs-rpc: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let levels = args.levels.iter().map(|s| parse_level(s)).collect::<Result<Vec<_>, _>>()?;
    let out = args.out.unwrap_or_else(default_out_dir);
    let postgres = TempPostgres::start().map_err(|e| e.to_string())?;
    let redis = TempRedis::start().map_err(|e| e.to_string())?;
    let mut kinds = vec![
        Kind::Pgbench,
        Kind::RowLock { fence: false },
        Kind::RowLock { fence: true },
        Kind::RedisLock { fence: false },
        Kind::RedisLock { fence: true },
        Kind::Rpc { broker: RpcBroker::Embedded },
        Kind::RpcBatched { broker: RpcBroker::Embedded },
    ];
    if !args.no_tansu {
        let bootstrap = tokio::task::spawn_blocking(lock_vs_rpc::broker::tansu).await.map_err(|e| format!("tansu: {e}"))?;
        kinds.push(Kind::Rpc { broker: RpcBroker::Kafka(bootstrap.clone()) });
        kinds.push(Kind::RpcBatched { broker: RpcBroker::Kafka(bootstrap) });
    }
    let plan = Plan {
        levels,
        kinds,
        skew: args.skew,
        amount: match args.count {
            Some(n) => Amount::Count(n),
            None => Amount::Duration(Duration::from_secs_f64(args.seconds)),
        },
        payload: args.payload,
        rate: args.rate,
        rounds: usize::from(args.rounds),
        scratch: out.clone(),
    };
    let servers = Servers {
        postgres: postgres.connection_string(),
        pg_bin_dir: postgres.bin_dir().to_path_buf(),
        redis: redis.url(),
    };
    eprintln!(
        "PostgreSQL {} (fsync=on, synchronous_commit=on), Redis {}, {} cells",
        servers.postgres,
        servers.redis,
        plan.levels.len() * plan.kinds.len() * plan.rounds
    );
    let cells = sweep(&plan, &servers, &ProgressBar::new(0)).await?;
    let written = lock_vs_rpc::report::write_all(&cells, &out)?;
    println!("{}", lock_vs_rpc::report::markdown(&lock_vs_rpc::report::summarize(&cells)));
    for c in cells.iter().filter(|c| c.first_error.is_some()) {
        eprintln!("{} at {}: first failure: {}", c.contender, c.level.label(), c.first_error.as_deref().unwrap_or_default());
    }
    for path in written {
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
