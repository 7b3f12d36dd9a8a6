use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};


#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.reduce", response = u32, key = store_id)]
struct ReduceRadius {
    store_id: u64,
    by_m: u32,
}

#[derive(Clone)]
struct Limits {
    min_m: u32,
}

#[handler]
async fn reduce_radius(
    req: ReduceRadius,
    _ctx: Context,
    State(limits): State<Limits>,
    State(extra): State<u32>,
) -> Result<u32, RemoteError> {
    Ok(req.by_m.max(limits.min_m) + extra)
}

fn main() {}
