//! Cost of the wire envelope: request headers + payload encoding, and their decoding
//! on the server; reply construction and decoding on the client.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kafka_rpc::codec::ContentType;
use kafka_rpc::transport::Record;
use kafka_rpc::__private::wire::{self, ReplyAddress, RequestMeta};
use kafka_rpc::wire::Peer;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone)]
struct ReduceDeliveryRadius {
    store_id: u64,
    trigger: u8,
    radius_m: u32,
    seq: u64,
}

fn meta() -> RequestMeta<'static> {
    RequestMeta {
        request_type: Some("delivery.radius.reduce".into()),
        correlation_id: Some(Bytes::copy_from_slice(uuid::Uuid::new_v4().as_bytes())),
        reply_to: Some(ReplyAddress { topic: "delivery.radius.replies".into(), partition: Some(3) }),
        content_type: ContentType::Bincode,
        deadline_ms: Some(1_800_000_000_000),
        ..RequestMeta::default()
    }
}

fn bench(c: &mut Criterion) {
    let req = ReduceDeliveryRadius { store_id: 42, trigger: 1, radius_m: 2_500, seq: 17 };
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Elements(1));

    for ct in [ContentType::Bincode, ContentType::Json] {
        let name = if ct == ContentType::Bincode { "bincode" } else { "json" };
        let m = RequestMeta { content_type: ct, ..meta() };
        group.bench_function(format!("encode_request/{name}"), |b| {
            b.iter(|| {
                let value = ct.encode(black_box(&req)).unwrap();
                Record { key: Some(Bytes::from_static(b"42")), value: Some(value.into()), headers: wire::request_headers(&m), timestamp_ms: 0 }
            })
        });
        let record = Record {
            key: Some(Bytes::from_static(b"42")),
            value: Some(ct.encode(&req).unwrap().into()),
            headers: wire::request_headers(&m),
            timestamp_ms: 0,
        };
        group.bench_function(format!("decode_request/{name}"), |b| {
            b.iter(|| {
                let meta = wire::decode_request(black_box(&record)).unwrap();
                let value: ReduceDeliveryRadius = meta.content_type.decode(record.value.as_deref().unwrap()).unwrap();
                black_box((meta, value))
            })
        });
    }

    let correlation = Bytes::copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    group.bench_function("reply_round_trip/bincode", |b| {
        b.iter(|| {
            let body = ContentType::Bincode.encode(&(42u64, 2_500u32)).unwrap();
            let reply = wire::reply_record(Peer::Native, None, correlation.clone(), ContentType::Bincode, Ok(body), 0);
            let id = wire::reply_correlation_id(&reply).cloned();
            let meta = wire::decode_reply(&reply);
            let value: (u64, u32) = meta.content_type.unwrap().decode(reply.value.as_deref().unwrap()).unwrap();
            black_box((id, value))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
