use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};


#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.reduce", response = u32, key = store_id)]
struct ReduceRadius {
    store_id: u64,
    by_m: u32,
}

#[handler]
async fn reduce_radius(req: ReduceRadius) -> u32 {
    req.by_m
}

#[handler]
async fn no_return_type(req: ReduceRadius) {
    let _ = req;
}

fn main() {}
