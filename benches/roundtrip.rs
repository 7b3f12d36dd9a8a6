//! End-to-end request-reply throughput on the embedded broker: a client with many
//! requests in flight against a server with 8 partitions, all in one process.
//!
//! Each iteration sends a burst of requests concurrently and waits for every reply;
//! criterion reports the burst's time and elements (requests) per second.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::future::join_all;
use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

// As in examples/loadgen.rs: glibc's arena locks, not kafka-rpc, dominate a long
// run once the broker's retention frees records on other threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Serialize, Deserialize)]
struct Reduce {
    store_id: u64,
    radius_m: u32,
    seq: u64,
}

impl Request for Reduce {
    const TYPE: &'static str = "delivery.radius.reduce";
    type Response = u32;
    fn key(&self) -> Option<Vec<u8>> {
        Some(self.store_id.key_bytes())
    }
}

async fn reduce(req: Reduce) -> Result<u32, RemoteError> {
    Ok(req.radius_m)
}

fn bench(c: &mut Criterion) {
    bursts(c, "roundtrip_embedded");
}

/// The same bursts with a Prometheus exporter installed as in examples/prometheus.rs
/// (its listener, on a spare port, and its upkeep run on a thread of their own). It
/// runs after `bench` in the same process, which had no recorder, so the two groups
/// are the with/without pair of one run.
fn bench_with_recorder(c: &mut Criterion) {
    let exporter = metrics_exporter_prometheus::PrometheusBuilder::new().with_http_listener(([127, 0, 0, 1], 0));
    if let Err(e) = exporter.install() {
        panic!("cannot install the Prometheus recorder: {e}");
    }
    kafka_rpc::metrics::describe();
    bursts(c, "roundtrip_embedded_prometheus");
}

fn bursts(c: &mut Criterion, name: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (client, server) = runtime.block_on(async {
        let broker = EmbeddedBroker::new();
        let server = RpcServer::builder(broker.clone(), "bench").partitions(8).handler(reduce).start().await.unwrap();
        let client = ReplyingClient::builder(broker, "bench")
            .partitions(8)
            .max_in_flight(20_000)
            .timeout(Duration::from_secs(30))
            .start()
            .await
            .unwrap();
        (client, server)
    });

    let mut group = c.benchmark_group(name);
    group.sample_size(20).measurement_time(Duration::from_secs(10));
    for burst in [1u64, 1_000, 10_000] {
        group.throughput(Throughput::Elements(burst));
        group.bench_with_input(BenchmarkId::new("burst", burst), &burst, |b, &burst| {
            b.to_async(&runtime).iter(|| {
                let calls: Vec<_> =
                    (0..burst).map(|i| client.request(Reduce { store_id: i % 500, radius_m: 2_000, seq: i })).collect();
                async move {
                    for reply in join_all(calls).await {
                        reply.unwrap();
                    }
                }
            })
        });
    }
    group.finish();
    runtime.block_on(async {
        client.shutdown().await;
        server.shutdown().await.unwrap();
    });
}

criterion_group!(benches, bench, bench_with_recorder);
criterion_main!(benches);
