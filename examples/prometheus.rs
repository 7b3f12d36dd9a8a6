//! Serves kafka-rpc's metrics to Prometheus while a client and a server exchange
//! requests on the embedded broker.
//!
//! ```text
//! cargo run --example prometheus -- --listen 127.0.0.1:9000 --seconds 60
//! curl -s http://127.0.0.1:9000/metrics | grep kafka_rpc_
//! ```
//!
//! kafka-rpc only records through the `metrics` facade; installing an exporter, as
//! here, is the application's choice. The metric names are in docs/observability.md.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use kafka_rpc::prelude::*;
use metrics_exporter_prometheus::PrometheusBuilder;
use serde::{Deserialize, Serialize};

#[derive(Parser)]
struct Args {
    /// Address of the `/metrics` endpoint.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// How long to send requests before exiting.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

#[derive(Serialize, Deserialize)]
struct Reserve {
    sku: String,
    quantity: u32,
}

impl Request for Reserve {
    const TYPE: &'static str = "stock.reserve";
    type Response = u32;
    fn key(&self) -> Option<Vec<u8>> {
        Some(self.sku.key_bytes())
    }
}

/// Refuses every tenth reservation, so the failure counters have something to show.
async fn reserve(req: Reserve) -> Result<u32, RemoteError> {
    if req.quantity % 10 == 0 {
        return Err(RemoteError::with_code(ErrorCode::Custom("OUT_OF_STOCK".into()), format!("no {} left", req.sku)));
    }
    Ok(req.quantity)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // The recorder first: metrics recorded before it is installed go nowhere.
    PrometheusBuilder::new().with_http_listener(args.listen).install()?;
    kafka_rpc::metrics::describe();

    let broker = EmbeddedBroker::new();
    let server = RpcServer::builder(broker.clone(), "stock").handler(reserve).start().await?;
    let client = ReplyingClient::builder(broker, "stock").start().await?;
    println!("metrics on http://{}/metrics for {} s", args.listen, args.seconds);

    let until = tokio::time::Instant::now() + Duration::from_secs(args.seconds);
    let (mut ok, mut refused) = (0u64, 0u64);
    let mut quantity = 0u32;
    while tokio::time::Instant::now() < until {
        quantity = quantity.wrapping_add(1);
        let sku = format!("sku-{}", quantity % 16);
        match client.request(Reserve { sku, quantity }).await {
            Ok(_) => ok += 1,
            Err(RpcError::Remote(_)) => refused += 1,
            Err(e) => return Err(e.into()),
        }
        // A steady trickle, so a dashboard shows rates rather than one burst.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("{ok} reserved, {refused} refused");
    client.shutdown().await;
    server.shutdown().await?;
    Ok(())
}
