use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.reduce", response = u32, key = shop_id)]
struct ReduceRadius {
    store_id: u64,
    by_m: u32,
}

fn main() {}
