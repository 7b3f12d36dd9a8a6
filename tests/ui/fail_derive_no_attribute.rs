use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Request)]
struct ReduceRadius {
    store_id: u64,
}

fn main() {}
