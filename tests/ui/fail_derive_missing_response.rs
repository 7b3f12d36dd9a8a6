use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.reduce", key = store_id)]
struct ReduceRadius {
    store_id: u64,
}

fn main() {}
