use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.store", response = (), key = store_id)]
enum StoreEvent {
    Opened { store_id: u64 },
    Closed { store_id: u64 },
}

fn main() {}
