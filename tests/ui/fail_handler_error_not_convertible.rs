use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};


#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.reduce", response = u32, key = store_id)]
struct ReduceRadius {
    store_id: u64,
    by_m: u32,
}

#[derive(Debug)]
struct RadiusTooSmall;

#[handler]
async fn reduce_radius(req: ReduceRadius) -> Result<u32, RadiusTooSmall> {
    if req.by_m > 1000 {
        return Err(RadiusTooSmall);
    }
    Ok(req.by_m)
}

fn main() {}
