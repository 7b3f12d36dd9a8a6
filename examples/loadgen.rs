//! Load generator: request-reply latency at low load and throughput under load, with
//! hdrhistogram percentiles, on the embedded broker or a Kafka-protocol broker.
//!
//! ```text
//! cargo run --release --example loadgen                                  # embedded
//! cargo run --release --example loadgen -- --bootstrap 127.0.0.1:9092   # real broker
//! ```
//!
//! It reports how long a client takes to become ready (topic checks, reply-partition
//! positioning), the round-trip percentiles of requests sent one at a time, and the
//! throughput and percentiles with `--in-flight` requests outstanding.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use kafka_rpc::prelude::*;
use kafka_rpc::transport::kafka::{KafkaConfig, KafkaTransport};
use serde::{Deserialize, Serialize};

// The allocator is the application's choice; glibc's arena locks become the
// bottleneck once records are allocated on one thread and freed on another (see
// docs/benchmarks.md for both figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Serialize, Deserialize, Request)]
#[request(type = "loadgen.reduce", response = u32, key = store_id)]
struct Reduce {
    store_id: u64,
    radius_m: u32,
}

#[handler]
async fn reduce(req: Reduce) -> Result<u32, RemoteError> {
    Ok(req.radius_m)
}

#[derive(Parser, Debug)]
#[command(about = "Measure kafka-rpc round trips")]
struct Args {
    /// Kafka-protocol broker; the embedded broker when absent.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Requests sent one at a time for the low-load latency.
    #[arg(long, default_value_t = 2_000)]
    sequential: u64,
    /// Requests for the throughput run.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Requests outstanding during the throughput run.
    #[arg(long, default_value_t = 2_000)]
    in_flight: usize,
    /// Partitions of the request and reply topics.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Distinct keys.
    #[arg(long, default_value_t = 1_000)]
    keys: u64,
    /// Longest a single broker fetch waits, in ms (Kafka transport only). Brokers such
    /// as tansu hold every fetch this long, so it adds to latency.
    #[arg(long, default_value_t = 1)]
    fetch_wait_ms: u64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn report(label: &str, h: &Histogram<u64>) {
    println!(
        "{label}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.9)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
        h.len()
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let transport: Arc<dyn Transport> = match &args.bootstrap {
        None => Arc::new(EmbeddedBroker::new()),
        Some(b) => {
            let config = KafkaConfig::builder(b).fetch_max_wait(Duration::from_millis(args.fetch_wait_ms)).build();
            Arc::new(KafkaTransport::connect(config).await?)
        }
    };
    let topic = format!("loadgen.{}", uuid::Uuid::new_v4().simple());
    let server = RpcServer::builder(transport.clone(), &topic).partitions(args.partitions).handler(reduce).start().await?;

    let started = Instant::now();
    let client = ReplyingClient::builder(transport.clone(), &topic)
        .partitions(args.partitions)
        .max_in_flight(args.in_flight)
        .timeout(Duration::from_secs(30))
        .start()
        .await?;
    println!("broker: {}", args.bootstrap.as_deref().unwrap_or("embedded"));
    println!("client ready in {:.1} ms", started.elapsed().as_secs_f64() * 1000.0);

    // The server joins its group in the background; the first answer says it is serving.
    let first = Instant::now();
    client.request(Reduce { store_id: 0, radius_m: 1 }).await?;
    println!("first reply after {:.1} ms (includes the server's group join)", first.elapsed().as_secs_f64() * 1000.0);

    let mut low = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for i in 0..args.sequential {
        let t = Instant::now();
        client.request(Reduce { store_id: i % args.keys, radius_m: 2_000 }).await?;
        low.saturating_record(t.elapsed().as_micros() as u64);
    }
    report("low load (1 in flight)", &low);

    let mut loaded = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut pending = FuturesUnordered::new();
    let mut next = 0u64;
    let (mut ok, mut failed) = (0u64, 0u64);
    let t0 = Instant::now();
    while next < args.requests || !pending.is_empty() {
        while next < args.requests && pending.len() < args.in_flight {
            let t = Instant::now();
            let call = client.request(Reduce { store_id: next % args.keys, radius_m: 2_000 });
            pending.push(async move { (call.await, t.elapsed()) });
            next += 1;
        }
        if let Some((outcome, took)) = pending.next().await {
            loaded.saturating_record(took.as_micros() as u64);
            match outcome {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
    }
    let elapsed = t0.elapsed();
    println!(
        "loaded ({} in flight): {ok} answered, {failed} failed in {:.2} s",
        args.in_flight,
        elapsed.as_secs_f64()
    );
    println!("throughput: {:.0} req/s", ok as f64 / elapsed.as_secs_f64());
    report("loaded latency", &loaded);

    client.shutdown().await;
    server.shutdown().await?;
    Ok(())
}
