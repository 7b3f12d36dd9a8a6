//! Same-run comparison of request-reply between kafka-rpc and a real NestJS service
//! (`tests/peers/nestjs`), in all four pairings, on one broker:
//!
//! ```text
//! cargo run --release --example interop_bench                       # starts tansu (TANSU_BIN)
//! cargo run --release --example interop_bench -- --requests 5000 --in-flight 100
//! ```
//!
//! Each pairing runs the same calls (`{a, b}` → `{sum}`, JSON) with the same number in
//! flight, after a warm-up. The Rust side records latencies in an hdrhistogram; the
//! NestJS client measures its own calls (`lastValueFrom(send(...))`) and reports the
//! same figures. Needs Node.js and npm (the peer's packages are installed on first use).

#[path = "../tests/support/kafka.rs"]
mod kafka;
#[path = "../tests/support/nestjs.rs"]
mod nestjs;

use std::time::{Duration, Instant};

use clap::Parser;
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use kafka_rpc::prelude::*;
use kafka_rpc::wire::Peer;
use nestjs::{Mode, NestPeer};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Sum {
    a: u64,
    b: u64,
}

#[derive(Serialize, Deserialize)]
struct SumReply {
    sum: u64,
}

impl Request for Sum {
    const TYPE: &'static str = "bench.sum";
    type Response = SumReply;
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

async fn sum(Sum { a, b }: Sum) -> Result<SumReply, RemoteError> {
    Ok(SumReply { sum: a + b })
}

#[derive(Parser, Debug)]
#[command(about = "Compare kafka-rpc and NestJS request-reply on one broker")]
struct Args {
    /// Measured requests per pairing.
    #[arg(long, default_value_t = 5_000)]
    requests: u64,
    /// Requests outstanding at once, on both sides.
    #[arg(long, default_value_t = 100)]
    in_flight: usize,
    /// Warm-up requests per pairing (not measured).
    #[arg(long, default_value_t = 500)]
    warmup: u64,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
}

/// One row of the table.
struct Row {
    pairing: &'static str,
    answered: u64,
    failed: u64,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Prints the table; the first row is the anchor the others are compared with.
fn print(rows: &[Row]) {
    let anchor = rows.first().map_or(f64::NAN, |r| r.per_second);
    println!("| caller → server | req/s | × first row | p50 ms | p99 ms | answered | failed |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.1} | {:.1} | {} | {} |",
            r.pairing,
            r.per_second,
            r.per_second / anchor,
            r.p50_ms,
            r.p99_ms,
            r.answered,
            r.failed
        );
    }
}

/// Runs `total` calls through `client` with `in_flight` outstanding.
async fn rust_load(client: &ReplyingClient, total: u64, in_flight: usize) -> (Histogram<u64>, u64, Duration) {
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds");
    let mut pending = FuturesUnordered::new();
    let (mut next, mut failed) = (0u64, 0u64);
    let t0 = Instant::now();
    while next < total || !pending.is_empty() {
        while next < total && pending.len() < in_flight {
            let t = Instant::now();
            let call = client.request(Sum { a: next, b: 1 });
            pending.push(async move { (call.await, t.elapsed()) });
            next += 1;
        }
        if let Some((outcome, took)) = pending.next().await {
            match outcome {
                Ok(_) => latencies.saturating_record(took.as_micros() as u64),
                Err(_) => failed += 1,
            }
        }
    }
    (latencies, failed, t0.elapsed())
}

async fn rust_row(pairing: &'static str, client: &ReplyingClient, args: &Args) -> Row {
    rust_load(client, args.warmup, args.in_flight).await;
    let (h, failed, took) = rust_load(client, args.requests, args.in_flight).await;
    Row {
        pairing,
        answered: h.len(),
        failed,
        per_second: h.len() as f64 / took.as_secs_f64(),
        p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
    }
}

async fn nest_row(pairing: &'static str, nest: &mut NestPeer, pattern: &str, args: &Args) -> Row {
    let within = Duration::from_secs(600);
    nest.command(&format!("load {pattern} {} {}", args.warmup, args.in_flight)).await;
    nest.expect("LOAD", within).await;
    nest.command(&format!("load {pattern} {} {}", args.requests, args.in_flight)).await;
    let line = nest.expect("LOAD", within).await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("LOAD {line}: {e}"));
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Row {
        pairing,
        answered: f("answered") as u64,
        failed: f("failed") as u64,
        per_second: f("per_second"),
        p50_ms: f("p50_ms"),
        p99_ms: f("p99_ms"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let bootstrap = kafka::bootstrap();
    let transport = kafka::transport().await;
    let prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let nest_sum = format!("{prefix}.nest.sum");
    let rust_sum = format!("{prefix}.rust.sum");
    for t in [&nest_sum, &rust_sum] {
        transport.ensure_topic(t, args.partitions).await?;
        transport.ensure_topic(&format!("{t}.reply"), args.partitions).await?;
    }
    transport.ensure_topic(&format!("{prefix}.nest.fail"), args.partitions).await?;
    transport.ensure_topic(&format!("{prefix}.nest.events"), args.partitions).await?;

    let server = RpcServer::builder(transport.clone(), &rust_sum)
        .partitions(args.partitions)
        .topic_handler(&rust_sum, sum)
        .start()
        .await?;
    let nest_server = NestPeer::start(Mode::Server, &bootstrap, &prefix, &[]).await;
    let mut nest_client = NestPeer::start(Mode::Client, &bootstrap, &prefix, &[&nest_sum, &rust_sum]).await;
    let client = |topic: &str, peer: Peer| {
        ReplyingClient::builder(transport.clone(), topic)
            .peer(peer)
            .content_type(ContentType::Json)
            .reply_topic(format!("{topic}.reply"))
            .partitions(args.partitions)
            .max_in_flight(args.in_flight)
            .timeout(Duration::from_secs(120))
            .start()
    };
    let to_nest = client(&nest_sum, Peer::Nest).await?;
    let to_rust = client(&rust_sum, Peer::Native).await?;

    println!("broker {bootstrap}; {} requests per pairing, {} in flight, JSON payloads", args.requests, args.in_flight);
    let rows = vec![
        nest_row("NestJS → NestJS", &mut nest_client, &nest_sum, &args).await,
        rust_row("kafka-rpc → NestJS", &to_nest, &args).await,
        nest_row("NestJS → kafka-rpc", &mut nest_client, &rust_sum, &args).await,
        rust_row("kafka-rpc → kafka-rpc", &to_rust, &args).await,
    ];
    print(&rows);

    to_nest.shutdown().await;
    to_rust.shutdown().await;
    nest_client.stop().await;
    nest_server.stop().await;
    server.shutdown().await?;
    Ok(())
}
