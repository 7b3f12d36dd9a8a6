use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};


#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.reduce", response = u32, key = store_id)]
struct ReduceRadius {
    store_id: u64,
    by_m: u32,
}

#[handler(timeout_ms = 0)]
async fn reduce_radius(req: ReduceRadius) -> Result<u32, RemoteError> {
    Ok(req.by_m)
}

fn main() {}
