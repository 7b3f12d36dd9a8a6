//! Rewriting a broker's answers in the Kafka proxy, for tests that need an answer tansu
//! cannot give (Apache Kafka's out-of-range ends, aborted transactions, hostile batches).
//! Apart from `kafka.rs` because the lock benchmark's crate includes that one and has no
//! kafka-protocol.
#![allow(dead_code)]

/// Decodes a request and its response (each without its size prefix) of API `key`,
/// lets `change` edit the response and encodes it again: the rewrite a
/// [`KafkaProxy`](kafka_rpc_testkit::KafkaProxy) relays in place of the broker's.
/// `None` (relay unchanged) for a version kafka-protocol cannot read.
pub fn rewrite<Req, Resp>(
    key: kafka_protocol::messages::ApiKey,
    request: &[u8],
    response: &[u8],
    change: impl FnOnce(&Req, &mut Resp),
) -> Option<Vec<u8>>
where
    Req: kafka_protocol::protocol::Decodable,
    Resp: kafka_protocol::protocol::Decodable + kafka_protocol::protocol::Encodable,
{
    use bytes::{Bytes, BytesMut};
    use kafka_protocol::messages::{RequestHeader, ResponseHeader};
    use kafka_protocol::protocol::{Decodable, Encodable};
    // The request header starts with the API key, then its version.
    let version = i16::from_be_bytes([*request.get(2)?, *request.get(3)?]);
    let mut req = Bytes::copy_from_slice(request);
    RequestHeader::decode(&mut req, key.request_header_version(version)).ok()?;
    let req = Req::decode(&mut req, version).ok()?;
    let header_version = key.response_header_version(version);
    let mut resp = Bytes::copy_from_slice(response);
    let header = ResponseHeader::decode(&mut resp, header_version).ok()?;
    let mut resp = Resp::decode(&mut resp, version).ok()?;
    change(&req, &mut resp);
    let mut out = BytesMut::new();
    header.encode(&mut out, header_version).ok()?;
    resp.encode(&mut out, version).ok()?;
    Some(out.to_vec())
}
