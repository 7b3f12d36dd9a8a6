use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Request)]
#[request(response = u32, key = store_id)]
struct ReduceRadius {
    store_id: u64,
}

fn main() {}
