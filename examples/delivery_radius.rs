//! Delivery-radius reduction, the scenario kafka-rpc was built for.
//!
//! Riders run short, the weather turns, a system fails: each trigger asks to shrink a
//! store's delivery radius, and many hit the same stores at once. Instead of locking
//! the store row, every trigger is a request keyed by store id, so one partition and
//! one worker see all of a store's triggers in the order they were sent, and the
//! caller learns whether each one was applied.
//!
//! Runs on the embedded broker by default; `--bootstrap 127.0.0.1:9092` runs the same
//! code against a Kafka-protocol broker. It exits non-zero unless every trigger was
//! applied exactly once and in order: each store's triggers are numbered 1, 2, 3... as
//! sent, and the handler counts any other number as a violation; each reply must be its
//! caller's and name the radius the trigger before it set; and each store must end on
//! its last trigger having applied as many as were sent.
//!
//! ```text
//! cargo run --release --example delivery_radius
//! cargo run --release --example delivery_radius -- --stores 500 --triggers 100000
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use dashmap::DashMap;
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use kafka_rpc::prelude::*;
use kafka_rpc::transport::kafka::{KafkaConfig, KafkaTransport};
use serde::{Deserialize, Serialize};

/// Why a store's radius is being reduced.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    RiderShortage,
    BadWeather,
    SystemFailure,
}

/// Shrink one store's delivery radius to `radius_m`.
#[derive(Serialize, Deserialize, Debug, Clone, Request)]
#[request(type = "delivery.radius.reduce", response = RadiusReduced, key = store_id)]
struct ReduceDeliveryRadius {
    store_id: u64,
    trigger: Trigger,
    radius_m: u32,
    /// Position of this trigger among the store's triggers, from 1.
    seq: u64,
}

/// What the store's radius became.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct RadiusReduced {
    store_id: u64,
    previous_m: u32,
    radius_m: u32,
    seq: u64,
}

/// One store's current radius and the last trigger applied to it.
#[derive(Debug, Clone, Copy)]
struct StoreRadius {
    radius_m: u32,
    last_seq: u64,
    /// Triggers applied to this store, to compare with how many were sent.
    applied: u64,
}

/// The service's state: no locks beyond the map's own shard, because all of a store's
/// triggers are handled one after another by the worker of its partition.
#[derive(Clone, Default)]
struct Stores {
    radius: Arc<DashMap<u64, StoreRadius>>,
    order_violations: Arc<AtomicU64>,
}

/// Reasons a reduction is refused.
#[derive(Debug, thiserror::Error)]
enum RadiusError {
    #[error("radius {0} m is below the 300 m floor")]
    BelowFloor(u32),
}

impl From<RadiusError> for RemoteError {
    fn from(e: RadiusError) -> Self {
        RemoteError::new("RADIUS_BELOW_FLOOR", e.to_string())
    }
}

const FULL_RADIUS_M: u32 = 5_000;

#[handler]
async fn reduce_delivery_radius(
    req: ReduceDeliveryRadius,
    _ctx: Context,
    State(stores): State<Stores>,
) -> Result<RadiusReduced, RadiusError> {
    if req.radius_m < 300 {
        return Err(RadiusError::BelowFloor(req.radius_m));
    }
    let mut entry = stores.radius.entry(req.store_id).or_insert(StoreRadius { radius_m: FULL_RADIUS_M, last_seq: 0, applied: 0 });
    if req.seq != entry.last_seq + 1 {
        // Each store's triggers are numbered 1, 2, 3... as they were sent: anything but
        // the next one is an update out of order, applied twice, or one before it lost.
        // With per-key ordering this never happens; count it if it does.
        stores.order_violations.fetch_add(1, Ordering::Relaxed);
    }
    let previous_m = entry.radius_m;
    *entry = StoreRadius { radius_m: req.radius_m, last_seq: req.seq, applied: entry.applied + 1 };
    Ok(RadiusReduced { store_id: req.store_id, previous_m, radius_m: req.radius_m, seq: req.seq })
}

#[derive(Parser, Debug)]
#[command(about = "Fire concurrent delivery-radius triggers at a kafka-rpc service and check their order")]
struct Args {
    /// Kafka-protocol broker to use instead of the embedded one, e.g. 127.0.0.1:9092.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Number of stores.
    #[arg(long, default_value_t = 300)]
    stores: u64,
    /// Number of triggers, fired concurrently.
    #[arg(long, default_value_t = 50_000)]
    triggers: u64,
    /// Partitions of the request topic.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
}

/// A small deterministic generator, so every run fires the same triggers.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    let (transport, broker): (Arc<dyn Transport>, String) = match &args.bootstrap {
        None => (Arc::new(EmbeddedBroker::new()), "embedded".into()),
        Some(bootstrap) => {
            let kafka = KafkaTransport::connect(KafkaConfig::builder(bootstrap).build()).await?;
            (Arc::new(kafka), format!("kafka at {bootstrap}"))
        }
    };
    let topic = format!("delivery.radius.{}", uuid::Uuid::new_v4().simple());
    let stores = Stores::default();
    let server = RpcServer::builder(transport.clone(), &topic)
        .partitions(args.partitions)
        .state(stores.clone())
        .handler(reduce_delivery_radius)
        .start()
        .await?;
    let client = ReplyingClient::builder(transport, &topic)
        .partitions(args.partitions)
        .timeout(Duration::from_secs(60))
        .start()
        .await?;

    // Triggers hit random stores; each store's triggers get increasing sequence numbers.
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut next_seq: HashMap<u64, u64> = HashMap::new();
    let mut last_radius: HashMap<u64, u32> = HashMap::new();
    let mut triggers = Vec::with_capacity(args.triggers as usize);
    for _ in 0..args.triggers {
        let store_id = rng.next() % args.stores.max(1);
        let (trigger, radius_m) = match rng.next() % 3 {
            0 => (Trigger::RiderShortage, 3_000),
            1 => (Trigger::BadWeather, 2_000),
            _ => (Trigger::SystemFailure, 1_000),
        };
        let radius_m = radius_m - (rng.next() % 500) as u32;
        let seq = next_seq.entry(store_id).or_insert(0);
        *seq += 1;
        // The radius this trigger replaces: what its reply must report as previous.
        let previous_m = last_radius.insert(store_id, radius_m).unwrap_or(FULL_RADIUS_M);
        triggers.push((ReduceDeliveryRadius { store_id, trigger, radius_m, seq: *seq }, previous_m));
    }

    println!("broker: {broker}; {} triggers over {} stores, {} partitions", args.triggers, last_radius.len(), args.partitions);
    let started = Instant::now();
    // Every call is queued when it is made, so a store's triggers go out in seq order
    // even though all of them are in flight together.
    let mut calls: FuturesUnordered<_> = triggers
        .into_iter()
        .map(|(t, previous_m)| {
            let sent = Instant::now();
            let expected = RadiusReduced { store_id: t.store_id, previous_m, radius_m: t.radius_m, seq: t.seq };
            let call = client.request(t);
            async move { (call.await, sent.elapsed(), expected) }
        })
        .collect();

    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let (mut answered, mut failed, mut wrong_replies) = (0u64, 0u64, 0u64);
    while let Some((outcome, took, expected)) = calls.next().await {
        latency.saturating_record(took.as_micros() as u64);
        match outcome {
            // Replies complete in any order; the order that matters is the one the
            // server applied, which it checks per store. Each reply must be this
            // caller's, and report the radius the trigger before it left.
            Ok(reply) => {
                answered += 1;
                if reply != expected {
                    wrong_replies += 1;
                    if wrong_replies <= 5 {
                        eprintln!("store {}: reply {reply:?}, expected {expected:?}", expected.store_id);
                    }
                }
            }
            Err(e) => {
                failed += 1;
                if failed <= 5 {
                    eprintln!("request failed: {e}");
                }
            }
        }
    }
    let elapsed = started.elapsed();

    let mut wrong_final = 0u64;
    for (store, radius_m) in &last_radius {
        let state = stores.radius.get(store).map(|s| (s.radius_m, s.applied));
        let sent = next_seq.get(store).copied().unwrap_or(0);
        if state != Some((*radius_m, sent)) {
            wrong_final += 1;
            if wrong_final <= 5 {
                eprintln!("store {store}: (final radius, triggers applied) {state:?}, expected ({radius_m}, {sent})");
            }
        }
    }
    let violations = stores.order_violations.load(Ordering::Relaxed);
    let stats = server.stats();
    client.shutdown().await;
    server.shutdown().await?;

    let ms = |us: u64| us as f64 / 1000.0;
    println!("requests sent: {}", args.triggers);
    println!("requests answered: {answered}");
    println!("requests failed: {failed}");
    println!("elapsed: {:.3} s", elapsed.as_secs_f64());
    println!("throughput: {:.0} req/s", answered as f64 / elapsed.as_secs_f64());
    println!(
        "latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(latency.value_at_quantile(0.50)),
        ms(latency.value_at_quantile(0.99)),
        ms(latency.max())
    );
    println!("server: handled {}, failed {}, expired {}", stats.handled(), stats.failed(), stats.expired());
    println!("order violations: {violations}");
    println!("wrong replies: {wrong_replies}");
    println!("stores not ending on their last trigger after all of them: {wrong_final}");

    let ok = failed == 0
        && answered == args.triggers
        && stats.handled() == args.triggers
        && violations == 0
        && wrong_replies == 0
        && wrong_final == 0;
    println!("{}", if ok { "result: OK" } else { "result: FAILED" });
    Ok(ok)
}
