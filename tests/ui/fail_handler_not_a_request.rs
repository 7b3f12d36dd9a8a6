use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct ReduceRadius {
    by_m: u32,
}

#[handler]
async fn reduce_radius(req: ReduceRadius) -> Result<u32, RemoteError> {
    Ok(req.by_m)
}

fn main() {}
