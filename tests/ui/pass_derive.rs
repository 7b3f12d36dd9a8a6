//! Every request shape the derive accepts.
use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct RadiusReduced {
    radius_m: u32,
}

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.reduce", response = RadiusReduced, key = store_id)]
struct ReduceRadius {
    store_id: u64,
    by_m: u32,
}

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.get", response = Option<u32>, key = store)]
#[request(/* options may be split over several attributes */)]
struct GetRadius {
    store: String,
}

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.zone.get", response = Vec<String>, key = zone)]
struct GetZone {
    zone: Option<String>,
}

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.blob", response = (), key = bytes)]
struct Blob {
    bytes: Vec<u8>,
}

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.ping", response = i32, key = 0)]
struct Ping(i32, String);

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.stats", response = u64)]
struct Stats;

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.event", response = ())]
enum StoreEvent {
    Opened { store_id: u64 },
    Closed,
}

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.wrapped", response = T, key = id)]
#[serde(bound = "T: Serialize + serde::de::DeserializeOwned")]
struct Wrapped<T: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static> {
    id: i64,
    value: T,
}

fn assert_request<R: Request>() {}

fn main() {
    assert_request::<ReduceRadius>();
    assert_request::<GetRadius>();
    assert_request::<GetZone>();
    assert_request::<Blob>();
    assert_request::<Ping>();
    assert_request::<Stats>();
    assert_request::<StoreEvent>();
    assert_request::<Wrapped<String>>();
}
