//! `kafka-rpc bench`: round-trip latency and throughput against a server it starts
//! itself, on a broker or on the embedded one.
//!
//! Written on the public API alone, so it measures what an application gets; the
//! crate's `examples/loadgen.rs` measures the same round trip with more knobs
//! (sequential latency, fetch waits) for the figures in docs/benchmarks.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

use crate::failure::Failure;

/// What the benchmark sends: a keyed request the server echoes a number from.
#[derive(Serialize, Deserialize, Request)]
#[request(type = "kafka-rpc.bench.echo", response = u64, key = key)]
struct Echo {
    key: u64,
    n: u64,
}

#[handler]
async fn echo(req: Echo) -> Result<u64, RemoteError> {
    Ok(req.n)
}

/// The broker to run on: one of `--bootstrap` and `--embedded`.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct Target {
    /// Bootstrap servers, `host:port[,host:port...]`.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Run on the in-process embedded broker.
    #[arg(long)]
    embedded: bool,
}

/// Arguments of `kafka-rpc bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// How long the broker may take to answer at all.
    #[arg(long, default_value = "5s", value_parser = crate::duration::parse)]
    connect_timeout: Duration,
    /// Requests to send.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Requests outstanding at once.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Partitions of the benchmark's request and reply topics.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Distinct partition keys.
    #[arg(long, default_value_t = 1_000)]
    keys: u64,
}

/// Runs the benchmark on a fresh topic and prints throughput and percentiles.
pub async fn run(args: Args) -> Result<(), Failure> {
    if args.requests == 0 || args.in_flight == 0 || args.keys == 0 || args.partitions <= 0 {
        return Err(Failure::Usage("--requests, --in-flight, --keys and --partitions must be positive".into()));
    }
    let (transport, broker): (Arc<dyn Transport>, String) = match &args.target.bootstrap {
        Some(bootstrap) => (Arc::new(crate::broker::connect(bootstrap, args.connect_timeout).await?), bootstrap.clone()),
        None => (Arc::new(EmbeddedBroker::new()), "embedded".into()),
    };
    let topic = format!("kafka-rpc-bench.{}", uuid::Uuid::new_v4().simple());
    let server = RpcServer::builder(transport.clone(), &topic).partitions(args.partitions).handler(echo).start().await?;
    let client = ReplyingClient::builder(transport, &topic)
        .partitions(args.partitions)
        .max_in_flight(args.in_flight)
        .timeout(Duration::from_secs(30))
        .start()
        .await?;
    println!("broker: {broker}, topic: {topic}");

    // The server joins its group in the background; its first answer says it serves.
    let first = Instant::now();
    client.request(Echo { key: 0, n: 0 }).await?;
    println!("first reply after {:.1} ms (includes the server joining its group)", ms(first.elapsed()));

    let outcome = measure(&client, &args).await;
    client.shutdown().await;
    let server_stopped = server.shutdown().await;
    let summary = outcome?;
    server_stopped?;
    summary.print(args.in_flight);
    match summary.first_error {
        Some(e) => Err(Failure::Other(format!("{} of {} requests failed; the first: {e}", summary.failed, args.requests))),
        None => Ok(()),
    }
}

/// What a run measured.
struct Summary {
    latency: Histogram<u64>,
    answered: u64,
    failed: u64,
    first_error: Option<RpcError>,
    elapsed: Duration,
}

impl Summary {
    fn print(&self, in_flight: usize) {
        let h = &self.latency;
        let at = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{} answered, {} failed in {:.2} s with {in_flight} in flight: {:.0} req/s",
            self.answered,
            self.failed,
            self.elapsed.as_secs_f64(),
            self.answered as f64 / self.elapsed.as_secs_f64().max(1e-9)
        );
        println!(
            "latency: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            at(0.5),
            at(0.9),
            at(0.99),
            at(0.999),
            h.max() as f64 / 1000.0
        );
    }
}

/// Sends `args.requests` requests keeping `args.in_flight` outstanding, recording each
/// round trip in microseconds.
async fn measure(client: &ReplyingClient, args: &Args) -> Result<Summary, Failure> {
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| Failure::Other(format!("histogram: {e}")))?;
    let progress = ProgressBar::new(args.requests);
    // The template is a constant; a typo in it would show as the default bar.
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} requests, {per_sec}, eta {eta}") {
        progress.set_style(style);
    }
    let mut pending = FuturesUnordered::new();
    let (mut next, mut answered, mut failed, mut first_error) = (0u64, 0u64, 0u64, None);
    let started = Instant::now();
    while next < args.requests || !pending.is_empty() {
        while next < args.requests && pending.len() < args.in_flight {
            let sent = Instant::now();
            let call = client.request(Echo { key: next % args.keys, n: next });
            pending.push(async move { (call.await, sent.elapsed()) });
            next += 1;
        }
        if let Some((outcome, took)) = pending.next().await {
            latency.saturating_record(took.as_micros() as u64);
            match outcome {
                Ok(_) => answered += 1,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    Ok(Summary { latency, answered, failed, first_error, elapsed: started.elapsed() })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
