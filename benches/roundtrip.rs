//! End-to-end request-reply throughput on the embedded broker: a client with many
//! requests in flight against a server with 8 partitions, all in one process.
//!
//! Each iteration sends a burst of requests concurrently and waits for every reply;
//! criterion reports the burst's time and elements (requests) per second.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::future::join_all;
use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

// As in examples/loadgen.rs: glibc's arena locks, not kafka-rpc, dominate a long
// run once the broker's retention frees records on other threads.
#[global_allocator]
static ALLOCATOR: kafka_rpc_testkit::alloc::PlainMiMalloc = kafka_rpc_testkit::alloc::PlainMiMalloc;

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

/// Runs the bursts without a recorder, with a Prometheus recorder, and without again.
/// A recorder cannot be uninstalled, so the installed one is a switch: kafka-rpc
/// registers its metric handles when a client or server is built, and while the switch
/// is off it hands out no-op handles, which cost what the facade's no-op recorder costs.
/// The second anchor shows how much of a difference is only the order of the groups.
fn bench(c: &mut Criterion) {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = prometheus.handle();
    // The exporter's upkeep (draining histograms into summaries) runs beside the
    // traffic, as it would behind a scraped endpoint; a real scrape adds rendering.
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5));
        handle.run_upkeep();
    });
    let switch: &'static Switch = Box::leak(Box::new(Switch { on: AtomicBool::new(false), prometheus }));
    if let Err(e) = metrics::set_global_recorder(switch) {
        panic!("cannot install the recorder: {e}");
    }
    kafka_rpc::metrics::describe();
    bursts(c, "roundtrip_embedded");
    switch.on.store(true, Ordering::SeqCst);
    bursts(c, "roundtrip_embedded_prometheus");
    switch.on.store(false, Ordering::SeqCst);
    bursts(c, "roundtrip_embedded_again");
}

/// The Prometheus recorder while `on`; the facade's no-op handles otherwise.
struct Switch {
    on: AtomicBool,
    prometheus: metrics_exporter_prometheus::PrometheusRecorder,
}

impl metrics::Recorder for Switch {
    fn describe_counter(&self, key: metrics::KeyName, unit: Option<metrics::Unit>, description: metrics::SharedString) {
        self.prometheus.describe_counter(key, unit, description)
    }

    fn describe_gauge(&self, key: metrics::KeyName, unit: Option<metrics::Unit>, description: metrics::SharedString) {
        self.prometheus.describe_gauge(key, unit, description)
    }

    fn describe_histogram(&self, key: metrics::KeyName, unit: Option<metrics::Unit>, description: metrics::SharedString) {
        self.prometheus.describe_histogram(key, unit, description)
    }

    fn register_counter(&self, key: &metrics::Key, metadata: &metrics::Metadata<'_>) -> metrics::Counter {
        if self.on.load(Ordering::SeqCst) { self.prometheus.register_counter(key, metadata) } else { metrics::Counter::noop() }
    }

    fn register_gauge(&self, key: &metrics::Key, metadata: &metrics::Metadata<'_>) -> metrics::Gauge {
        if self.on.load(Ordering::SeqCst) { self.prometheus.register_gauge(key, metadata) } else { metrics::Gauge::noop() }
    }

    fn register_histogram(&self, key: &metrics::Key, metadata: &metrics::Metadata<'_>) -> metrics::Histogram {
        if self.on.load(Ordering::SeqCst) { self.prometheus.register_histogram(key, metadata) } else { metrics::Histogram::noop() }
    }
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

criterion_group!(benches, bench);
criterion_main!(benches);
