use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};


#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.reduce", response = u32, key = store_id)]
struct ReduceRadius {
    store_id: u64,
    by_m: u32,
}

use std::rc::Rc;

async fn audit() {}

#[handler]
async fn reduce_radius(req: ReduceRadius) -> Result<u32, RemoteError> {
    let by_m = Rc::new(req.by_m);
    audit().await;
    Ok(*by_m)
}

fn main() {}
