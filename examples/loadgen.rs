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
//! throughput and percentiles with `--in-flight` requests outstanding (for
//! `--requests` requests, or for `--duration-secs` seconds).
//!
//! On a Kafka-protocol broker it first measures the broker's one-way latency the way
//! an RPC leg meets it (`--one-way-samples`): one record produced through the same
//! transport to a reader that is already waiting for it, so the round-trip p50 can be
//! read as a ratio of two legs measured in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use hdrhistogram::Histogram;
use kafka_rpc::prelude::*;
use kafka_rpc::transport::kafka::{KafkaConfig, KafkaTransport};
use kafka_rpc::transport::Record;
use serde::{Deserialize, Serialize};

// The allocator is the application's choice; glibc's arena locks become the
// bottleneck once records are allocated on one thread and freed on another (see
// docs/benchmarks.md for both figures).
#[global_allocator]
static ALLOCATOR: kafka_rpc_testkit::alloc::PlainMiMalloc = kafka_rpc_testkit::alloc::PlainMiMalloc;


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
    /// How long a busy partition waits to fill a produce batch, in ms (Kafka transport
    /// only; `KafkaConfigBuilder::busy_linger`, default 5).
    #[arg(long, default_value_t = 5)]
    busy_linger_ms: u64,
    /// Give the server a Kafka transport of its own (its own connections and fetch
    /// session), as a server in another process has; by default client and server
    /// share one.
    #[arg(long)]
    separate_server: bool,
    /// Run the throughput phase for this many seconds instead of `--requests` requests.
    #[arg(long)]
    duration_secs: Option<u64>,
    /// Records for the broker's one-way latency (Kafka transport only; 0 skips it).
    #[arg(long, default_value_t = 500)]
    one_way_samples: u64,
}

/// The broker's one-way latency as an RPC leg meets it: a record produced through
/// `transport` to a reader already waiting for it, one at a time.
async fn one_way(transport: &Arc<dyn Transport>, samples: u64) -> Result<Histogram<u64>, Box<dyn std::error::Error>> {
    let topic = format!("loadgen.one-way.{}", uuid::Uuid::new_v4().simple());
    transport.ensure_topic(&topic, 1).await?;
    let mut reader = transport.reader(&topic, 0).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let waiting = tokio::spawn(async move {
        let mut next = 0;
        loop {
            match reader.fetch(next, Duration::from_millis(500)).await {
                Ok(got) => {
                    if let Some(last) = got.last() {
                        next = last.offset + 1;
                        if tx.send(Instant::now()).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    eprintln!("one-way reader: {e}");
                    return;
                }
            }
        }
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let payload = Bytes::from(vec![b'x'; 100]);
    for _ in 0..samples {
        // The reader is back to waiting before the next record is sent.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let sent = Instant::now();
        transport.produce(&topic, 0, vec![Record::new(Some("k"), payload.clone())]).await?;
        let Some(arrived) = rx.recv().await else { return Err("the one-way reader stopped".into()) };
        hist.saturating_record(arrived.duration_since(sent).as_micros() as u64);
    }
    waiting.abort();
    Ok(hist)
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
    let kafka = |bootstrap: &str| {
        let config = KafkaConfig::builder(bootstrap)
            .fetch_max_wait(Duration::from_millis(args.fetch_wait_ms))
            .busy_linger(Duration::from_millis(args.busy_linger_ms))
            .build();
        KafkaTransport::connect(config)
    };
    let transport: Arc<dyn Transport> = match &args.bootstrap {
        None => Arc::new(EmbeddedBroker::new()),
        Some(b) => Arc::new(kafka(b).await?),
    };
    let server_transport: Arc<dyn Transport> = match &args.bootstrap {
        Some(b) if args.separate_server => Arc::new(kafka(b).await?),
        _ => transport.clone(),
    };
    let broker_one_way = match (&args.bootstrap, args.one_way_samples) {
        (Some(_), n) if n > 0 => {
            let h = one_way(&transport, n).await?;
            report("broker one-way (produce -> waiting reader, same transport)", &h);
            Some(h.value_at_quantile(0.5))
        }
        _ => None,
    };
    let topic = format!("loadgen.{}", uuid::Uuid::new_v4().simple());
    let server = RpcServer::builder(server_transport, &topic).partitions(args.partitions).handler(reduce).start().await?;

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
    if let Some(leg) = broker_one_way {
        println!(
            "low-load round trip p50 / broker one-way p50 = {:.2} (target <= 2)",
            low.value_at_quantile(0.5) as f64 / leg.max(1) as f64
        );
    }

    let mut loaded = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut pending = FuturesUnordered::new();
    let mut next = 0u64;
    let (mut ok, mut failed) = (0u64, 0u64);
    let t0 = Instant::now();
    let until = args.duration_secs.map(|s| t0 + Duration::from_secs(s));
    let more = |next: u64| match until {
        Some(until) => Instant::now() < until,
        None => next < args.requests,
    };
    let mut sending = true;
    while sending || !pending.is_empty() {
        sending = sending && more(next);
        while sending && pending.len() < args.in_flight {
            let t = Instant::now();
            // `map`, not an `async` block: a block holding `call` would be twice its size
            // (the captured future and its awaited copy), and a future over 1 KiB takes
            // the allocator's slow path when `FuturesUnordered` boxes it.
            let call = client.request(Reduce { store_id: next % args.keys, radius_m: 2_000 });
            pending.push(call.map(move |outcome| (outcome, t.elapsed())));
            next += 1;
            sending = more(next);
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
