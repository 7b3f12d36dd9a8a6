//! Payload codecs (`kafka_rpc::codec`): bincode and JSON decoding of arbitrary bytes
//! into the shapes handlers take.
#![no_main]

use std::collections::BTreeMap;

use kafka_rpc::codec::{Bincode, Codec, ContentType, Json};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

#[derive(Deserialize, Debug)]
#[allow(dead_code)]
enum Shape {
    Unit,
    Pair(u32, String),
    Bytes(Vec<u8>),
    Nested { items: Vec<Vec<u64>>, map: BTreeMap<String, Vec<u8>>, next: Option<Box<Shape>> },
}

fn all<C: Codec>(bytes: &[u8]) {
    let _ = C::decode::<u64>(bytes);
    let _ = C::decode::<String>(bytes);
    let _ = C::decode::<Vec<u8>>(bytes);
    let _ = C::decode::<Vec<String>>(bytes);
    let _ = C::decode::<BTreeMap<String, Vec<u8>>>(bytes);
    let _ = C::decode::<Shape>(bytes);
    let _ = C::decode::<Vec<Shape>>(bytes);
    let _ = C::decode::<serde_json::Value>(bytes);
}

fuzz_target!(|data: &[u8]| {
    all::<Bincode>(data);
    all::<Json>(data);
    let _ = ContentType::parse(data);
});
