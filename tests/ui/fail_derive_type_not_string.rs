use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Request)]
#[request(type = delivery.radius.reduce, response = u32)]
struct ReduceRadius {
    store_id: u64,
}

fn main() {}
