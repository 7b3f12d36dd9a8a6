//! Property tests for the public decoders of untrusted bytes: request and reply
//! headers ([`kafka_rpc::wire`]) and payload codecs ([`kafka_rpc::codec`]). For any
//! input each returns a value or a typed error, never panics, and allocates no more
//! than its input justifies: a forged length prefix must not buy a large allocation.
//!
//! Allocation is measured by a counting global allocator, per thread, around each
//! decode. Serde caps what a sequence pre-allocates from a length it has not yet seen
//! the elements of at 1 MiB (`serde::de::size_hint::cautious`); within that cap an
//! allocation is allowed per level of nesting, which is what the bound below states.
//!
//! The Kafka transport's decoders (broker responses, group metadata from other members,
//! fetched record batches and their decompression) are reached through its hidden
//! `untrusted` module, the same entry points the fuzz targets in `fuzz/` use.

use std::collections::BTreeMap;

use bytes::Bytes;
use kafka_rpc::codec::{Bincode, Codec, ContentType, Json};
use kafka_rpc::transport::{Header, Record};
use kafka_rpc::__private::wire::{self, ReplyAddress, RequestMeta};
use kafka_rpc::wire::names;
use kafka_rpc_testkit::alloc::{peak_during, Counting};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What decoding `input` bytes may hold at once: a small constant, a few copies of the
/// input, and serde's 1 MiB pre-allocation cap per level of nesting.
fn allowed(input: usize, nesting: usize) -> usize {
    16 * 1024 + 8 * input + nesting * (1 << 20)
}

/// Header names a decoder reacts to, plus arbitrary ones.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(names::CORRELATION_ID.to_string()),
        Just(names::REPLY_TOPIC.to_string()),
        Just(names::REPLY_PARTITION.to_string()),
        Just(names::TYPE.to_string()),
        Just(names::CONTENT_TYPE.to_string()),
        Just(names::DEADLINE.to_string()),
        Just(names::ERROR_CODE.to_string()),
        Just(names::ERROR_MESSAGE.to_string()),
        Just(names::NEST_ERROR.to_string()),
        ".{0,24}",
    ]
}

/// Header values: arbitrary bytes, and the shapes decoders parse (4 and 8 bytes,
/// ASCII digits, content types).
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<i32>().prop_map(|v| v.to_be_bytes().to_vec()),
        any::<i64>().prop_map(|v| v.to_be_bytes().to_vec()),
        "[0-9 +-]{0,24}".prop_map(String::into_bytes),
        Just(b"application/json; charset=utf-8".to_vec()),
        Just(b"application/x-bincode".to_vec()),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    (
        proptest::collection::vec((header_name(), header_value()), 0..12),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        any::<i64>(),
    )
        .prop_map(|(headers, key, value, timestamp_ms)| Record {
            key: key.map(Bytes::from),
            value: value.map(Bytes::from),
            headers: headers.into_iter().map(|(k, v)| Header { key: k.into(), value: Bytes::from(v) }).collect(),
            timestamp_ms,
        })
}

fn record_size(r: &Record) -> usize {
    r.headers.iter().map(|h| h.key.len() + h.value.len()).sum::<usize>()
        + r.key.as_ref().map_or(0, Bytes::len)
        + r.value.as_ref().map_or(0, Bytes::len)
}

proptest! {
    #[test]
    fn request_headers_decode_to_a_value_or_a_typed_error(record in record()) {
        let (decoded, peak) = peak_during(|| wire::decode_request(&record).map(|m| format!("{m:?}").len()));
        prop_assert!(peak <= allowed(record_size(&record), 0), "decode_request held {peak} B for {} B", record_size(&record));
        if let Ok(meta) = wire::decode_request(&record) {
            if let Some(reply) = &meta.reply_to {
                prop_assert!(reply.partition.is_none_or(|p| p >= 0));
            }
        }
        let _ = decoded;
    }

    #[test]
    fn reply_headers_decode_without_panicking(record in record()) {
        let (meta, peak) = peak_during(|| wire::decode_reply(&record));
        prop_assert!(peak <= allowed(record_size(&record), 0), "decode_reply held {peak} B for {} B", record_size(&record));
        // An error code header always marks an error reply.
        if record.header(names::ERROR_CODE).is_some() {
            prop_assert!(meta.error.is_some());
        }
        let _ = wire::reply_correlation_id(&record);
    }

    #[test]
    fn encoded_request_headers_decode_to_what_was_encoded(
        request_type in proptest::option::of(".{0,32}"),
        correlation_id in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        reply in proptest::option::of((".{0,32}", proptest::option::of(0..i32::MAX))),
        json in any::<bool>(),
        deadline_ms in proptest::option::of(any::<i64>()),
    ) {
        let meta = RequestMeta {
            request_type: request_type.map(Into::into),
            correlation_id: correlation_id.map(Bytes::from),
            reply_to: reply.map(|(topic, partition)| ReplyAddress { topic: topic.into(), partition }),
            content_type: if json { ContentType::Json } else { ContentType::Bincode },
            deadline_ms,
            // What the content-type header, always written, marks a request as.
            peer: kafka_rpc::wire::Peer::Native,
        };
        let record = Record { headers: wire::request_headers(&meta), ..Record::default() };
        prop_assert_eq!(wire::decode_request(&record), Ok(meta));
    }

    #[test]
    fn content_types_parse_to_a_value_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = ContentType::parse(&bytes);
    }
}

/// Shapes a handler might take: sequences, maps, strings, enums, options, nesting.
#[derive(Serialize, Deserialize, Debug)]
enum Shape {
    Unit,
    Pair(u32, String),
    Bytes(Vec<u8>),
    Nested { items: Vec<Vec<u64>>, map: BTreeMap<String, Vec<u8>>, next: Option<Box<Shape>> },
}

/// Decodes `bytes` as several types with codec `C`; returns the deepest nesting of
/// sequences among them (for the allocation bound).
fn decode_all<C: Codec>(bytes: &[u8]) -> usize {
    let _ = C::decode::<u64>(bytes);
    let _ = C::decode::<String>(bytes);
    let _ = C::decode::<Vec<u8>>(bytes);
    let _ = C::decode::<Vec<u64>>(bytes);
    let _ = C::decode::<Vec<String>>(bytes);
    let _ = C::decode::<BTreeMap<String, Vec<u8>>>(bytes);
    let _ = C::decode::<Shape>(bytes);
    let _ = C::decode::<Vec<Shape>>(bytes);
    let _ = C::decode::<serde_json::Value>(bytes);
    // Vec<Shape> -> Nested.items -> Vec<u64>: three sequences deep.
    3
}

/// Bincode inputs that start with a forged length: varint markers for u16, u32, u64
/// (0xFB, 0xFC, 0xFD) followed by a large value, then a few real bytes. The u32 range
/// spans the codec's 16 MiB decode limit: lengths under it pass the limit check.
fn forged_bincode() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            (1u64 << 10..1 << 16).prop_map(|n| { let mut v = vec![0xFB]; v.extend_from_slice(&(n as u16).to_le_bytes()); v }),
            (1u64 << 16..1 << 25).prop_map(|n| { let mut v = vec![0xFC]; v.extend_from_slice(&(n as u32).to_le_bytes()); v }),
            any::<u64>().prop_map(|n| { let mut v = vec![0xFD]; v.extend_from_slice(&n.to_le_bytes()); v }),
        ],
        0usize..4,
        proptest::collection::vec(any::<u8>(), 0..24),
    )
        .prop_map(|(prefix, variant, tail)| {
            // Optionally behind an enum variant index, so the length lands inside `Shape`.
            let mut bytes = if variant > 0 { vec![variant as u8] } else { Vec::new() };
            bytes.extend(prefix);
            bytes.extend(tail);
            bytes
        })
}

proptest! {
    #[test]
    fn bincode_decodes_arbitrary_bytes_to_a_value_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let (nesting, peak) = peak_during(|| decode_all::<Bincode>(&bytes));
        prop_assert!(peak <= allowed(bytes.len(), nesting), "bincode held {peak} B decoding {} B", bytes.len());
    }

    #[test]
    fn bincode_forged_lengths_do_not_buy_allocations(bytes in forged_bincode()) {
        let (nesting, peak) = peak_during(|| decode_all::<Bincode>(&bytes));
        prop_assert!(peak <= allowed(bytes.len(), nesting), "bincode held {peak} B decoding {} B: {bytes:02x?}", bytes.len());
    }

    #[test]
    fn json_decodes_arbitrary_bytes_to_a_value_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let (nesting, peak) = peak_during(|| decode_all::<Json>(&bytes));
        prop_assert!(peak <= allowed(bytes.len(), nesting), "json held {peak} B decoding {} B", bytes.len());
    }

    #[test]
    fn json_shaped_input_decodes_to_a_value_or_a_typed_error(text in r#"[\[\]{}",:0-9a-z\\ -]{0,256}"#) {
        let (nesting, peak) = peak_during(|| decode_all::<Json>(text.as_bytes()));
        prop_assert!(peak <= allowed(text.len(), nesting), "json held {peak} B decoding {} B", text.len());
    }
}

/// A string that claims 15 MiB (under the codec's 16 MiB decode limit) and carries
/// three bytes must fail without reserving the 15 MiB.
#[test]
fn a_forged_string_length_under_the_limit_does_not_allocate_it() {
    let mut forged = vec![0xFC];
    forged.extend_from_slice(&(15u32 << 20).to_le_bytes());
    forged.extend_from_slice(b"abc");
    let (decoded, peak) = peak_during(|| Bincode::decode::<String>(&forged));
    assert!(decoded.is_err());
    assert!(peak <= allowed(forged.len(), 1), "decoding {} B held {peak} B", forged.len());
    let (decoded, peak) = peak_during(|| Bincode::decode::<Vec<u8>>(&forged));
    assert!(decoded.is_err());
    assert!(peak <= allowed(forged.len(), 1), "decoding {} B as bytes held {peak} B", forged.len());
}

// Broker responses and fetched batches: the Kafka transport's decoders of bytes from
// the network (`kafka_rpc::transport::kafka::untrusted`, hidden from the docs).

use kafka_rpc::transport::kafka::untrusted;

/// What decoding a broker response of `input` bytes may hold at once: a decoded
/// element is at most this many times the one wire byte an array count may claim
/// per byte that follows it, so a response costs what an honest one of its length
/// costs, never what its counts claim.
fn allowed_response(input: usize) -> usize {
    16 * 1024 + 256 * input
}

/// Writes `forged` over `sample` at `at` (clipped to the sample).
fn forge(sample: &[u8], at: usize, forged: &[u8]) -> Vec<u8> {
    let mut out = sample.to_vec();
    for (i, b) in forged.iter().enumerate() {
        if let Some(slot) = out.get_mut(at + i) {
            *slot = *b;
        }
    }
    out
}

/// Every response the transport decodes, at every version it describes, with a count
/// of two billion written at every position (as an `i32` and as a compact varint):
/// each is refused or decoded within the bound, never reserving what it claims.
#[test]
fn forged_counts_in_broker_responses_do_not_buy_allocations() {
    let described = untrusted::described_responses();
    let mut refused = 0usize;
    for (key, version) in described {
        let sample = untrusted::sample_response(key, version).expect("described");
        let (honest, peak) = peak_during(|| untrusted::decode_response(key, version, Bytes::from(sample.clone())));
        assert!(honest.is_ok(), "key {key} v{version}: {honest:?}");
        assert!(peak <= allowed_response(sample.len()), "key {key} v{version}: honest sample held {peak} B");
        for at in 0..sample.len() {
            for forged in [&i32::MAX.to_be_bytes()[..], &[0xff, 0xff, 0xff, 0xff, 0x07][..]] {
                let input = forge(&sample, at, forged);
                let (decoded, peak) = peak_during(|| untrusted::decode_response(key, version, Bytes::from(input.clone())));
                refused += usize::from(decoded.is_err());
                assert!(
                    peak <= allowed_response(input.len()),
                    "key {key} v{version}: forged count at {at} held {peak} B for {} B",
                    input.len()
                );
            }
        }
    }
    assert!(refused > 1000, "only {refused} forged responses refused");
}

/// A Metadata v4 response claiming two billion brokers in 10 bytes is refused with a
/// typed error naming the count.
#[test]
fn a_metadata_response_claiming_two_billion_brokers_is_refused() {
    let mut body = 0i32.to_be_bytes().to_vec(); // throttle time
    body.extend(i32::MAX.to_be_bytes()); // broker count
    body.extend([0, 0]);
    let (decoded, peak) = peak_during(|| untrusted::decode_response(3, 4, Bytes::from(body)));
    let err = decoded.expect_err("refused");
    assert!(err.contains("2147483647 array elements in 2 bytes"), "{err}");
    assert!(peak < 16 * 1024, "{peak}");
}

proptest! {
    #[test]
    fn mutated_broker_responses_decode_within_the_bound(
        pick in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let described = untrusted::described_responses();
        let (key, version) = described[pick.index(described.len())];
        let mut input = untrusted::sample_response(key, version).expect("described");
        for (at, byte) in edits {
            let i = at.index(input.len());
            input[i] = byte;
        }
        input.truncate(cut.index(input.len() + 1).max(input.len() / 2));
        let (_, peak) = peak_during(|| untrusted::decode_response(key, version, Bytes::from(input.clone())));
        prop_assert!(peak <= allowed_response(input.len()), "key {key} v{version}: {peak} B for {} B", input.len());
    }

    #[test]
    fn arbitrary_group_metadata_decodes_within_the_bound(data in proptest::collection::vec(any::<u8>(), 0..128)) {
        let (_, peak) = peak_during(|| untrusted::decode_subscription(Bytes::from(data.clone())));
        prop_assert!(peak <= allowed(data.len(), 0), "subscription: {peak} B for {} B", data.len());
        let (_, peak) = peak_during(|| untrusted::decode_assignment(Bytes::from(data.clone())));
        prop_assert!(peak <= allowed(data.len(), 0), "assignment: {peak} B for {} B", data.len());
    }
}

/// A v2 record batch at `base` holding one record with `value`, compressed with
/// `compression` the way kafka-protocol's encoder writes it.
fn batch(base: i64, value: Vec<u8>, compression: kafka_protocol::records::Compression) -> Vec<u8> {
    use kafka_protocol::records::{Record as WireRecord, RecordBatchEncoder, RecordEncodeOptions, TimestampType};
    let record = WireRecord {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: base,
        sequence: -1,
        timestamp: 1_700_000_000_000,
        key: None,
        value: Some(Bytes::from(value)),
        headers: Default::default(),
    };
    let mut buf = bytes::BytesMut::new();
    let options = RecordEncodeOptions { version: 2, compression };
    RecordBatchEncoder::encode(&mut buf, [record].iter(), &options).expect("encodes");
    buf.to_vec()
}

/// A batch that inflates past the limit (a decompression bomb: 80 MiB of zeros, a few
/// KiB compressed) is skipped by its offsets and the partition moves on to the record
/// after it; memory stays within the limit, not the 80 MiB the bomb holds.
#[test]
fn a_decompression_bomb_in_a_fetch_is_skipped_within_the_limit() {
    use kafka_protocol::records::Compression;
    for compression in [Compression::Zstd, Compression::Lz4, Compression::Gzip] {
        let bomb = batch(1, vec![0u8; 80 << 20], compression);
        assert!(bomb.len() < 4 << 20, "{compression:?} bomb is {} B", bomb.len());
        let data = [batch(0, b"before".to_vec(), compression), bomb, batch(2, b"after".to_vec(), compression)].concat();
        let (fetched, peak) = peak_during(|| untrusted::decode_fetched(Bytes::from(data.clone()), 0));
        assert_eq!(fetched.offsets, [0, 2], "{compression:?}: {fetched:?}");
        assert_eq!(fetched.unreadable.len(), 1, "{compression:?}: {fetched:?}");
        let (from, to, reason) = &fetched.unreadable[0];
        assert_eq!((*from, *to), (1, 2));
        assert!(reason.contains("inflates to more than"), "{compression:?}: {reason}");
        assert_eq!(fetched.next, 3);
        assert!(
            peak <= untrusted::MAX_INFLATED + (1 << 20) + 8 * data.len(),
            "{compression:?}: decoding a {} B fetch held {peak} B",
            data.len()
        );
    }
}

/// What the `broker_responses` fuzz target found in 1.6 s with the response check
/// removed (`fuzz/`, input `08 61 5f 00 00 5d`): a Produce v6 response whose topic
/// count's first byte became 0x5d claims 1.5 billion topics, and kafka-protocol asked
/// for ~150 GB. With the check it is refused and costs nothing.
#[test]
fn the_fuzzers_find_a_produce_response_claiming_a_billion_topics_is_refused() {
    let mut input = untrusted::sample_response(0, 6).expect("Produce v6 is described");
    input[0] = 0x5d;
    let (decoded, peak) = peak_during(|| untrusted::decode_response(0, 6, Bytes::from(input.clone())));
    let err = decoded.expect_err("refused");
    assert!(err.contains("array elements in"), "{err}");
    assert!(peak <= allowed_response(input.len()), "{peak}");
}

/// Found by the `fetched_batches` fuzz target: a batch whose first timestamp is near
/// `i64::MAX` and a record whose timestamp delta pushes past it. kafka-protocol adds
/// the two unchecked, which panicked wherever overflow checks are on (debug builds:
/// the reader task died). The batch is now skipped like any unreadable one; so is a
/// base offset too close to `i64::MAX` for its records' offset deltas.
#[test]
fn a_timestamp_or_offset_delta_past_i64_is_skipped_not_a_panic() {
    use kafka_protocol::records::Compression;
    let fix_crc = |b: &mut Vec<u8>| {
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
    };
    // The first timestamp (bytes 27..35) becomes i64::MAX and the record's timestamp
    // delta (byte 63: after the record's length and attributes) becomes 1.
    let mut late = batch(1, b"late".to_vec(), Compression::None);
    late[27..35].copy_from_slice(&i64::MAX.to_be_bytes());
    late[35..43].copy_from_slice(&i64::MAX.to_be_bytes());
    assert_eq!(late[63], 0, "the record's timestamp delta");
    late[63] = 2; // zigzag for 1
    fix_crc(&mut late);
    let data = [batch(0, b"before".to_vec(), Compression::None), late, batch(2, b"after".to_vec(), Compression::None)].concat();
    let fetched = untrusted::decode_fetched(Bytes::from(data), 0);
    assert_eq!(fetched.offsets, [0, 2], "{fetched:?}");
    assert_eq!(fetched.unreadable.len(), 1, "{fetched:?}");
    assert!(fetched.unreadable[0].2.contains("timestamp delta overflows"), "{fetched:?}");

    let mut high = batch(i64::MAX - 10, b"high".to_vec(), Compression::None);
    fix_crc(&mut high);
    let fetched = untrusted::decode_fetched(Bytes::from(high), 0);
    assert!(fetched.offsets.is_empty(), "{fetched:?}");
    assert_eq!(fetched.unreadable.len(), 1, "{fetched:?}");
    assert!(fetched.unreadable[0].2.contains("leaves no room"), "{fetched:?}");
}

/// Found by the `fetched_batches` fuzz target (its input, minus the first byte that
/// picks the mode, with the batch checksum recomputed as the target does): a record
/// with a varint of more than five bytes. kafka-protocol reads a 32-bit varint as at
/// most five bytes, the count check read up to ten, so the two read the header count
/// at different places and kafka-protocol reserved 4.8 GB for headers (29 GB in a
/// debug build). The check now reads every varint as kafka-protocol does.
#[test]
fn a_header_count_read_where_kafka_protocol_reads_it_is_bounded() {
    #[rustfmt::skip]
    let mut data = vec![
        0x60, 0x54, 0xd5, 0x00, 0x00, 0x00, 0x4e, 0x41, 0x00, 0x00, 0x00, 0x51, 0x50, 0x05, 0x00,
        0x09, 0x02, 0x50, 0x50, 0x4e, 0x50, 0x50, 0x50, 0x50, 0x50, 0x3f, 0x69, 0x41, 0x50, 0x50, 0x82, 0x53, 0x4e,
        0x41, 0x00, 0x59, 0x50, 0x50, 0x40, 0x00, 0x00, 0x50, 0x50, 0x50, 0x10, 0x50, 0x50, 0x10, 0xff, 0xff, 0xfb,
        0x21, 0x28, 0xef, 0xfc, 0x00, 0x5b, 0x00, 0x00, 0x00, 0x01, 0x2e, 0x04, 0x04, 0x84, 0xff, 0xff, 0xff, 0xff,
        0x04, 0x04, 0x0c, 0x04, 0x00, 0x00, 0xd6, 0xff, 0xff, 0xff, 0x42, 0x0a, 0x00, 0x04, 0x04, 0x04, 0x04, 0x00,
        0x00, 0x00, 0x51, 0x50, 0x05, 0x00, 0x09, 0x02, 0x50, 0x50, 0x40, 0x50, 0x68, 0x68, 0x68, 0x68, 0x68, 0x68,
        0x68, 0x68,
    ];
    let end = (12 + i32::from_be_bytes([data[8], data[9], data[10], data[11]]) as usize).min(data.len());
    let crc = crc32c::crc32c(&data[21..end]);
    data[17..21].copy_from_slice(&crc.to_be_bytes());
    let (fetched, peak) = peak_during(|| untrusted::decode_fetched(Bytes::from(data.clone()), 1));
    assert!(fetched.offsets.is_empty(), "{fetched:?}");
    assert!(peak <= 16 * 1024 + 8 * data.len(), "decoding {} B held {peak} B", data.len());
}

/// One batch at `base` of producer `producer`: a transactional record, or (`abort`) its
/// ABORT marker, as a transaction coordinator writes it.
fn transactional_batch(base: i64, producer: i64, abort: bool) -> Vec<u8> {
    use kafka_protocol::records::{Compression, Record as WireRecord, RecordBatchEncoder, RecordEncodeOptions, TimestampType};
    let (key, value) = if abort {
        // Version 0, type 0 (ABORT); version 0, coordinator epoch 0.
        (Some(Bytes::from_static(&[0, 0, 0, 0])), Some(Bytes::from_static(&[0, 0, 0, 0, 0, 0])))
    } else {
        (None, Some(Bytes::from_static(b"in a transaction")))
    };
    let record = WireRecord {
        transactional: true,
        control: abort,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: producer,
        producer_epoch: 0,
        timestamp_type: TimestampType::Creation,
        offset: base,
        sequence: if abort { -1 } else { 0 },
        timestamp: 1_700_000_000_000,
        key,
        value,
        headers: Default::default(),
    };
    let mut buf = bytes::BytesMut::new();
    let options = RecordEncodeOptions { version: 2, compression: Compression::None };
    RecordBatchEncoder::encode(&mut buf, [record].iter(), &options).expect("encodes");
    buf.to_vec()
}

/// The read-committed decode the `fetched_batches` fuzz target drives with an aborted
/// list taken from its input: a transaction the answer lists as aborted is dropped up
/// to its producer's ABORT marker, and that producer's later transaction is kept; the
/// markers are never handed out, and the position moves past all of it as far as the
/// plain decode's.
#[test]
fn a_transaction_listed_as_aborted_is_dropped_up_to_its_marker() {
    use kafka_protocol::records::Compression;
    let data = [
        transactional_batch(0, 7, false),
        batch(1, b"plain".to_vec(), Compression::None),
        transactional_batch(2, 7, true),
        transactional_batch(3, 7, false),
    ]
    .concat();
    let plain = untrusted::decode_fetched(Bytes::from(data.clone()), 0);
    assert_eq!(plain.offsets, [0, 1, 3], "{plain:?}");
    let committed = untrusted::decode_fetched_read_committed(Bytes::from(data), 0, &[(7, 0)]);
    assert_eq!(committed.offsets, [1, 3], "{committed:?}");
    assert_eq!((committed.next, committed.unreadable), (plain.next, plain.unreadable));
}
