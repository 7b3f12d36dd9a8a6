//! What deduplication costs per request, on the embedded broker: the same burst of
//! requests against a server without idempotency (the anchor), with a `MemoryWindow`,
//! and with a `KafkaWindow` (each first reply also written to the window topic, and
//! the offset held until that write is acknowledged). Every request is new, so this is
//! the price of looking up and recording, not of answering duplicates.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::future::join_all;
use kafka_rpc::prelude::*;
use kafka_rpc::server::idempotency::{KafkaWindow, MemoryWindow};
use serde::{Deserialize, Serialize};

// As in benches/roundtrip.rs: keep glibc's arena locks out of the measurement.
#[global_allocator]
static ALLOCATOR: kafka_rpc_testkit::alloc::PlainMiMalloc = kafka_rpc_testkit::alloc::PlainMiMalloc;

#[derive(Serialize, Deserialize)]
struct Reduce {
    store_id: u64,
    radius_m: u32,
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

const BURST: u64 = 10_000;

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut group = c.benchmark_group("idempotency_embedded");
    group.sample_size(20).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(BURST));
    for store in ["none", "memory", "kafka"] {
        let (client, server) = runtime.block_on(async {
            let broker = EmbeddedBroker::new();
            let builder = RpcServer::builder(broker.clone(), "bench").partitions(8).handler(reduce);
            let builder = match store {
                "memory" => builder.idempotency(MemoryWindow::new()),
                "kafka" => builder.idempotency(KafkaWindow::new(broker.clone(), "bench.idempotency")),
                _ => builder,
            };
            let server = builder.start().await.unwrap();
            let client = ReplyingClient::builder(broker, "bench")
                .partitions(8)
                .max_in_flight(20_000)
                .timeout(Duration::from_secs(30))
                .start()
                .await
                .unwrap();
            (client, server)
        });
        group.bench_with_input(BenchmarkId::new("burst_10000", store), &store, |b, _| {
            b.to_async(&runtime).iter(|| {
                let calls: Vec<_> = (0..BURST).map(|i| client.request(Reduce { store_id: i % 500, radius_m: 2_000 })).collect();
                async move {
                    for reply in join_all(calls).await {
                        reply.unwrap();
                    }
                }
            })
        });
        runtime.block_on(async {
            client.shutdown().await;
            server.shutdown().await.unwrap();
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
