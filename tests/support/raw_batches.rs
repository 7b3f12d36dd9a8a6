//! Record batches a client library will not send, for tests that need them in a real
//! broker's log: the commit and abort markers a transaction coordinator writes (tansu
//! 0.6 has no EndTxn, so no transactional producer can make it write one), and batches
//! a reader cannot decode.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use indexmap::IndexMap;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse, ProducerId, RequestHeader,
    ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType};

/// Produce v3: the first that carries v2 record batches.
const PRODUCE_VERSION: i16 = 3;
/// Producer id and epoch of the pretend transactional producer.
const PRODUCER_ID: i64 = 4242;
const PRODUCER_EPOCH: i16 = 0;

fn record(value: Option<Bytes>, key: Option<Bytes>, transactional: bool, control: bool, sequence: i32) -> Record {
    Record {
        transactional,
        control,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: if transactional { PRODUCER_ID } else { -1 },
        producer_epoch: if transactional { PRODUCER_EPOCH } else { -1 },
        timestamp_type: TimestampType::Creation,
        // The broker assigns offsets; callers number a batch's records from 0.
        offset: 0,
        sequence,
        timestamp: 1_700_000_000_000,
        key,
        value,
        headers: IndexMap::new(),
    }
}

fn encode(records: &[Record]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let options = RecordEncodeOptions { version: 2, compression: Compression::None };
    if let Err(e) = RecordBatchEncoder::encode(&mut buf, records, &options) {
        panic!("cannot encode a record batch: {e}");
    }
    buf.to_vec()
}

/// A commit marker of the pretend producer's transaction: a control batch whose
/// one record's key is (version 0, type 1 = COMMIT) and value (version 0,
/// coordinator epoch 0), as Kafka's `EndTransactionMarker` writes it.
pub fn commit_marker() -> Vec<u8> {
    encode(&[marker_record(1)])
}

/// A transaction marker record of the pretend producer: `kind` 1 COMMIT, 0 ABORT.
fn marker_record(kind: u8) -> Record {
    let key = Bytes::copy_from_slice(&[0, 0, 0, kind]);
    let value = Bytes::from_static(&[0, 0, 0, 0, 0, 0]);
    // Control batches carry no sequence (-1), as the coordinator writes them.
    record(Some(value), Some(key), true, true, -1)
}

/// Sends `request` (API `key`, version `version`) to the broker at `addr` on a
/// connection of its own and decodes the answer.
fn call<Req: Encodable, Resp: Decodable>(addr: &str, key: ApiKey, version: i16, request: &Req) -> Resp {
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(1)
        .with_client_id(Some(StrBytes::from_static_str("raw-batches")));
    let mut body = BytesMut::new();
    if let Err(e) = header.encode(&mut body, key.request_header_version(version)).and_then(|_| request.encode(&mut body, version)) {
        panic!("cannot encode a {key:?} request: {e}");
    }
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    stream.write_all(&frame).unwrap_or_else(|e| panic!("send a {key:?} request to {addr}: {e}"));
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).unwrap_or_else(|e| panic!("read a {key:?} response from {addr}: {e}"));
    let mut answer = vec![0u8; i32::from_be_bytes(size).max(0) as usize];
    stream.read_exact(&mut answer).unwrap_or_else(|e| panic!("read a {key:?} response from {addr}: {e}"));
    let mut answer = Bytes::from(answer);
    let decoded = ResponseHeader::decode(&mut answer, key.response_header_version(version))
        .and_then(|_| Resp::decode(&mut answer, version));
    decoded.unwrap_or_else(|e| panic!("decode a {key:?} response: {e}"))
}

/// Appends the encoded batch `batch` to `topic`/`partition` of the broker at `addr`
/// and returns its base offset, or the broker's error code.
pub fn produce(addr: &str, topic: &str, partition: i32, batch: Vec<u8>) -> Result<i64, i16> {
    let request = ProduceRequest::default().with_acks(-1).with_timeout_ms(10_000).with_topic_data(vec![
        TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(partition)
                .with_records(Some(Bytes::from(batch)))]),
    ]);
    let response: ProduceResponse = call(addr, ApiKey::Produce, PRODUCE_VERSION, &request);
    let part = response
        .responses
        .first()
        .and_then(|t| t.partition_responses.first())
        .unwrap_or_else(|| panic!("a produce response without its partition"));
    if part.error_code != 0 {
        return Err(part.error_code);
    }
    Ok(part.base_offset)
}

/// A producer id and epoch the broker at `addr` hands out (InitProducerId): tansu
/// refuses data batches of a producer id it did not hand out (UNKNOWN_PRODUCER_ID).
pub fn producer(addr: &str) -> Producer {
    let request = InitProducerIdRequest::default().with_transaction_timeout_ms(60_000).with_producer_id(ProducerId(-1)).with_producer_epoch(-1);
    let response: InitProducerIdResponse = call(addr, ApiKey::InitProducerId, 3, &request);
    assert_eq!(response.error_code, 0, "InitProducerId refused");
    Producer { id: response.producer_id.0, epoch: response.producer_epoch, sequence: 0 }
}

/// A transactional producer's identity, and the sequence number of its next record.
pub struct Producer {
    pub id: i64,
    pub epoch: i16,
    sequence: i32,
}

impl Producer {
    /// One batch of `records` (each a header list and a value) in this producer's
    /// transaction, as a transactional producer (Spring Kafka's `executeInTransaction`)
    /// sends them.
    pub fn transactional(&mut self, records: &[(Vec<(String, Bytes)>, Bytes)]) -> Vec<u8> {
        let mut batch: Vec<Record> = Vec::new();
        for (i, (headers, value)) in records.iter().enumerate() {
            let mut r = record(Some(value.clone()), None, true, false, self.sequence);
            (r.producer_id, r.producer_epoch, r.offset) = (self.id, self.epoch, i as i64);
            r.headers = headers.iter().map(|(k, v)| (StrBytes::from_string(k.clone()), Some(v.clone()))).collect();
            self.sequence += 1;
            batch.push(r);
        }
        encode(&batch)
    }

    /// This producer's COMMIT (`commit`) or ABORT marker.
    pub fn marker(&self, commit: bool) -> Vec<u8> {
        let mut r = marker_record(u8::from(commit));
        (r.producer_id, r.producer_epoch) = (self.id, self.epoch);
        encode(&[r])
    }
}

/// A plain batch of `values`, as a producer without idempotence sends it.
fn plain(values: &[&str]) -> Vec<u8> {
    let records: Vec<Record> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            // kafka-protocol starts a new batch wherever offset - sequence changes: one
            // batch, whose base sequence is -1 (no idempotence).
            let mut r = record(Some(Bytes::copy_from_slice(v.as_bytes())), None, false, false, i as i32 - 1);
            r.offset = i as i64;
            r
        })
        .collect();
    encode(&records)
}

/// A plain batch of `values` whose checksum does not match its bytes, as a disk or a
/// broken proxy might leave it: no reader can decode it.
pub fn bad_checksum(values: &[&str]) -> Vec<u8> {
    let mut batch = plain(values);
    // Bytes 17..21 hold the CRC-32C of everything after them.
    batch[17] ^= 0xff;
    batch
}

/// A batch of `values` in message format v3, which no Kafka has: its layout is
/// unknown, so no reader can decode it. (The magic byte, 16, is outside the checksum.)
pub fn unknown_magic(values: &[&str]) -> Vec<u8> {
    let mut batch = plain(values);
    batch[16] = 3;
    batch
}
