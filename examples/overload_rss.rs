//! Overload memory probe: a client offers more requests per second than a slow server
//! can answer, for a fixed time, while the process samples its resident memory. The
//! figure to watch is the peak (VmHWM): under overload every queue between the
//! caller and the handler must stay bounded, so the peak levels off instead of
//! growing with the run time.
//!
//! ```text
//! cargo run --release --example overload_rss                        # 10 minutes, embedded broker
//! cargo run --release --example overload_rss -- --duration-secs 20  # a short try
//! cargo run --release --example overload_rss -- --bootstrap 127.0.0.1:9092
//! ```
//!
//! The client and the server run in this one process, so the peak covers both. The
//! embedded broker keeps at most its retention (`--retention-bytes`, 4 MiB per
//! partition by default) and is counted too: a small retention shows what the client
//! and server hold. Calls are open-loop: a call is started every tick
//! whether or not earlier ones finished, and each ends by its timeout at the latest,
//! so the application's own pending calls are bounded by rate × timeout.
//! It uses the system allocator, as an application that chose none would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use kafka_rpc::client::Backpressure;
use kafka_rpc::prelude::*;
use kafka_rpc::transport::kafka::{KafkaConfig, KafkaTransport};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Request)]
#[request(type = "overload.work", response = u64, key = key)]
struct Work {
    key: u64,
    /// Padding, so that queued requests cost what small real ones do.
    body: Vec<u8>,
    work_us: u64,
}

#[handler]
async fn work(req: Work) -> Result<u64, RemoteError> {
    tokio::time::sleep(Duration::from_micros(req.work_us)).await;
    Ok(req.key)
}

#[derive(Parser, Debug)]
#[command(about = "Peak RSS of a client and server under sustained overload")]
struct Args {
    /// Kafka-protocol broker; the embedded broker when absent.
    #[arg(long)]
    bootstrap: Option<String>,
    /// How long to overload, in seconds.
    #[arg(long, default_value_t = 600)]
    duration_secs: u64,
    /// Requests offered per second (open loop).
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Time the handler takes per request, in microseconds; with `partitions`
    /// partitions the server answers at most about partitions × 1e6 / work_us per second.
    #[arg(long, default_value_t = 1_000)]
    work_us: u64,
    /// Partitions of the request and reply topics.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Call timeout in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    timeout_ms: u64,
    /// The client's in-flight limit.
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,
    /// Fail calls at the in-flight limit (`RpcError::Busy`) instead of queueing them.
    #[arg(long)]
    fail_fast: bool,
    /// Bytes of padding per request.
    #[arg(long, default_value_t = 100)]
    body: usize,
    /// Bytes the embedded broker keeps per partition (its memory is counted too).
    #[arg(long, default_value_t = kafka_rpc::transport::embedded::DEFAULT_RETENTION_BYTES)]
    retention_bytes: usize,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 10)]
    report_secs: u64,
}

/// `VmRSS` and `VmHWM` of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[derive(Default)]
struct Counts {
    offered: AtomicU64,
    ok: AtomicU64,
    timeout: AtomicU64,
    busy: AtomicU64,
    remote: AtomicU64,
    other: AtomicU64,
}

impl Counts {
    fn line(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "offered {} ok {} timeout {} busy {} remote error {} other {}",
            get(&self.offered),
            get(&self.ok),
            get(&self.timeout),
            get(&self.busy),
            get(&self.remote),
            get(&self.other)
        )
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let transport: Arc<dyn Transport> = match &args.bootstrap {
        Some(b) => Arc::new(KafkaTransport::connect(KafkaConfig::builder(b).build()).await?),
        None => Arc::new(EmbeddedBroker::builder().retention_bytes(args.retention_bytes).build()),
    };
    let topic = format!("overload-{}", uuid::Uuid::new_v4().simple());
    let server = RpcServer::builder(transport.clone(), &topic).partitions(args.partitions).handler(work).start().await?;
    let client = ReplyingClient::builder(transport, &topic)
        .partitions(args.partitions)
        .timeout(Duration::from_millis(args.timeout_ms))
        .max_in_flight(args.max_in_flight)
        .backpressure(if args.fail_fast { Backpressure::Fail } else { Backpressure::Wait })
        .start()
        .await?;
    let (rss0, _) = memory_kib();
    println!("{args:?}");
    println!("started: RSS {} MiB", rss0 / 1024);

    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let end = started + Duration::from_secs(args.duration_secs);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut next_report = started + Duration::from_secs(args.report_secs);
    let per_tick = (args.rate / 100).max(1);
    let mut key = 0u64;
    let mut peak_rss = 0;
    while Instant::now() < end {
        tick.tick().await;
        for _ in 0..per_tick {
            key = key.wrapping_add(1);
            let call = client.request(Work { key: key % 10_000, body: vec![0; args.body], work_us: args.work_us });
            counts.offered.fetch_add(1, Ordering::Relaxed);
            let counts = counts.clone();
            tokio::spawn(async move {
                let slot = match call.await {
                    Ok(_) => &counts.ok,
                    Err(RpcError::Timeout(_)) => &counts.timeout,
                    Err(RpcError::Busy(_)) => &counts.busy,
                    Err(RpcError::Remote(_)) => &counts.remote,
                    Err(_) => &counts.other,
                };
                slot.fetch_add(1, Ordering::Relaxed);
            });
        }
        let (rss, _) = memory_kib();
        peak_rss = peak_rss.max(rss);
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(args.report_secs);
            let (rss, hwm) = memory_kib();
            println!(
                "{:>5}s: {}; in flight {}; RSS {} MiB, peak {} MiB",
                started.elapsed().as_secs(),
                counts.line(),
                client.in_flight(),
                rss / 1024,
                hwm / 1024
            );
        }
    }
    // Let every call end by its deadline before the final count.
    tokio::time::sleep(Duration::from_millis(args.timeout_ms + 500)).await;
    let (rss, hwm) = memory_kib();
    println!(
        "done after {:?}: {}; in flight {}; server {:?}",
        started.elapsed(),
        counts.line(),
        client.in_flight(),
        server.stats()
    );
    println!("peak RSS (VmHWM) {} MiB; RSS at the end {} MiB; largest sampled RSS {} MiB", hwm / 1024, rss / 1024, peak_rss / 1024);
    client.shutdown().await;
    server.shutdown().await?;
    Ok(())
}
