use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct StoreId {
    region: String,
    number: u32,
}

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.reduce", response = u32, key = store)]
struct ReduceRadius {
    store: StoreId,
    by_m: u32,
}

fn main() {}
