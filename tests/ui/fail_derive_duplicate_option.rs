use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.reduce", response = u32)]
#[request(type = "delivery.radius.shrink")]
struct ReduceRadius {
    store_id: u64,
}

fn main() {}
