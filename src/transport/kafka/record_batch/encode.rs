//! Writing our records as one v2 record batch, the form a produce request carries.

use bytes::{Bytes, BytesMut};
use indexmap::IndexMap;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression as WireCompression, Record as WireRecord, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use crate::transport::kafka::Compression;
use crate::transport::{Record, TransportError};

/// Producer id, epoch and first sequence written into a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) producer_id: i64,
    pub(crate) epoch: i16,
    pub(crate) sequence: i32,
}

/// Kafka sequences count records and wrap from `i32::MAX` to 0.
pub(crate) fn sequence_after(sequence: i32, records: usize) -> i32 {
    ((i64::from(sequence) + records as i64) % (i64::from(i32::MAX) + 1)) as i32
}

/// How many records can follow `sequence` in one batch before Kafka's sequences wrap
/// from `i32::MAX` to 0.
pub(crate) fn sequences_before_wrap(sequence: i32) -> usize {
    usize::try_from(i64::from(i32::MAX) - i64::from(sequence.max(0)) + 1).unwrap_or(usize::MAX)
}

/// Most bytes of records (keys, values, headers) one batch carries. Kafka refuses a
/// batch over the topic's `max.message.bytes` (1 MiB by default), and a produce request
/// with more than one batch for a partition, so a produce call with more is sent as
/// several requests, each one batch well under the limit.
pub(crate) const BATCH_BYTES: usize = 512 * 1024;

/// Where the batch that starts at `records[start]` ends: at least one record, then
/// as many as fit in [`BATCH_BYTES`].
pub(crate) fn batch_end(records: &[Record], start: usize) -> usize {
    let Some(first) = records.get(start) else { return start };
    let mut bytes = record_bytes(first);
    let mut end = start + 1;
    while let Some(next) = records.get(end).map(record_bytes) {
        if bytes + next > BATCH_BYTES {
            break;
        }
        bytes += next;
        end += 1;
    }
    end
}

/// Our records as one v2 record batch, offsets relative to its first record. With a
/// stamp, it carries the producer id and epoch, and sequences from the stamp's (which
/// must not wrap inside it: see [`sequences_before_wrap`]).
///
/// Many records to a batch is what lets a broker keep up: tansu 0.6 stores every
/// batch as an object of its own and lists a partition's objects on every fetch, so
/// a batch per record made each RPC cost the broker two objects and its fetches
/// slower as the log grew. tansu answers a fetch from inside a batch with the
/// batches after it; readers look back for the batch that holds their offset
/// (`session.rs`), so a consumer resuming mid-batch loses nothing.
pub(crate) fn encode_batch(records: &[Record], compression: Compression, stamp: Option<Stamp>) -> Result<Bytes, TransportError> {
    let options = RecordEncodeOptions { version: 2, compression: wire_compression(compression) };
    let mut buf = BytesMut::new();
    let batch: Vec<WireRecord> =
        records.iter().enumerate().map(|(i, r)| wire_record(r, i, stamp.map(|s| (s, i)))).collect();
    // A record whose header names repeat lost values in its map (`wire_record`): the
    // records are then written by `encode_records`, through the encoder's compression
    // hook, and the encoder still writes each batch's header and checksum around them.
    let repeats = batch.iter().zip(records).any(|(w, r)| w.headers.len() < r.headers.len());
    let encoded = if repeats {
        let done = std::cell::Cell::new(0);
        let whole = |theirs: &mut BytesMut, out: &mut BytesMut, compression: WireCompression| {
            let first = done.get();
            let count = record_count(theirs)?;
            let ours = records.get(first..first + count).ok_or_else(|| anyhow::anyhow!("batch past the records"))?;
            done.set(first + count);
            compress(out, &encode_records(ours), compression)
        };
        RecordBatchEncoder::encode_with_custom_compression(&mut buf, &batch, &options, Some(whole))
    } else {
        RecordBatchEncoder::encode(&mut buf, &batch, &options)
    };
    encoded.map_err(|e| TransportError::broker(format!("encoding record batch: {e}")))?;
    Ok(buf.freeze())
}

/// How many records kafka-protocol encoded into `records` (each starts with its length).
fn record_count(mut records: &[u8]) -> anyhow::Result<usize> {
    let mut count = 0;
    while !records.is_empty() {
        let size = super::decode::length(&mut records)?.unwrap_or(0);
        records = records.get(size..).ok_or_else(|| anyhow::anyhow!("record of {size} bytes past the batch"))?;
        count += 1;
    }
    Ok(count)
}

/// The v2 records of one batch, numbered from the batch's first as `wire_record`
/// numbers them, with every header as it stands in the list.
fn encode_records(records: &[Record]) -> Vec<u8> {
    let base_timestamp = records.iter().map(|r| r.timestamp_ms).min().unwrap_or(0);
    let mut out = Vec::new();
    let mut body = Vec::new();
    for (i, r) in records.iter().enumerate() {
        body.clear();
        body.push(0); // attributes
        put_varint(&mut body, r.timestamp_ms - base_timestamp);
        put_varint(&mut body, i as i64);
        for field in [&r.key, &r.value] {
            match field {
                Some(bytes) => put_bytes(&mut body, bytes),
                None => put_varint(&mut body, -1),
            }
        }
        put_varint(&mut body, r.headers.len() as i64);
        for h in &r.headers {
            put_bytes(&mut body, h.key.as_bytes());
            put_bytes(&mut body, &h.value);
        }
        put_varint(&mut out, body.len() as i64);
        out.extend_from_slice(&body);
    }
    out
}

/// A zigzag varint, as Kafka writes a record's lengths, deltas and counts.
fn put_varint(out: &mut Vec<u8>, n: i64) {
    let mut v = ((n << 1) ^ (n >> 63)) as u64;
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as i64);
    out.extend_from_slice(bytes);
}

/// `records` into `out` as `compression` compresses them: kafka-protocol's codecs, the
/// ones its encoder picks when not hooked.
fn compress(out: &mut BytesMut, records: &[u8], compression: WireCompression) -> anyhow::Result<()> {
    use kafka_protocol::compression::{Compressor, Gzip, Lz4, None, Snappy, Zstd};
    let write = |buf: &mut BytesMut| {
        buf.extend_from_slice(records);
        Ok(())
    };
    match compression {
        WireCompression::None => None::compress(out, write),
        WireCompression::Gzip => Gzip::compress(out, write),
        WireCompression::Snappy => Snappy::compress(out, write),
        WireCompression::Lz4 => Lz4::compress(out, write),
        WireCompression::Zstd => Zstd::compress(out, write),
    }
}

/// What a record adds to its batch, near enough to keep batches under the limit.
fn record_bytes(r: &Record) -> usize {
    let headers: usize = r.headers.iter().map(|h| h.key.len() + h.value.len() + 10).sum();
    r.key.as_ref().map_or(0, |k| k.len()) + r.value.as_ref().map_or(0, |v| v.len()) + headers + 32
}

/// Record `r` at offset `at` of its batch; with a stamp, at `index` of the call.
///
/// kafka-protocol's encoder closes a batch where `offset - sequence` changes, and
/// takes the batch's base sequence from its first record. Without a stamp every
/// record gets `at - 1`, so the batch stays whole and its base sequence is -1 (no
/// producer id), as Kafka expects.
fn wire_record(r: &Record, at: usize, stamp: Option<(Stamp, usize)>) -> WireRecord {
    let mut headers = IndexMap::with_capacity(r.headers.len());
    for h in &r.headers {
        headers.insert(StrBytes::from_string(h.key.clone().into_owned()), Some(h.value.clone()));
    }
    let sequence = match stamp {
        Some((s, index)) => sequence_after(s.sequence, index),
        None => (at as i32).wrapping_sub(1),
    };
    WireRecord {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: stamp.map_or(-1, |(s, _)| s.producer_id),
        producer_epoch: stamp.map_or(-1, |(s, _)| s.epoch),
        timestamp_type: TimestampType::Creation,
        offset: at as i64,
        sequence,
        timestamp: r.timestamp_ms,
        key: r.key.clone(),
        value: r.value.clone(),
        headers,
    }
}

fn wire_compression(c: Compression) -> WireCompression {
    match c {
        Compression::NoCompression => WireCompression::None,
        Compression::Gzip => WireCompression::Gzip,
        Compression::Lz4 => WireCompression::Lz4,
        Compression::Snappy => WireCompression::Snappy,
        Compression::Zstd => WireCompression::Zstd,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::RecordBatchDecoder;

    fn records(n: usize) -> Vec<Record> {
        (0..n).map(|i| Record::new(Some("k"), format!("value {i}"))).collect()
    }

    #[test]
    fn a_produce_is_one_batch_without_producer_id_or_sequence() {
        let mut bytes = encode_batch(&records(5), Compression::NoCompression, None).expect("encodes");
        let batches = RecordBatchDecoder::decode_batch_info(&mut bytes).expect("decodes");
        assert_eq!(batches.len(), 1);
        assert_eq!((batches[0].record_count, batches[0].base_sequence, batches[0].producer_id), (5, -1, -1));
    }

    #[test]
    fn a_call_past_the_batch_size_is_cut_into_batches_of_whole_records() {
        let big = vec![b'x'; BATCH_BYTES / 3];
        let records: Vec<Record> = (0..7).map(|_| Record::new(Some("k"), big.clone())).collect();
        let mut ends = vec![];
        let mut start = 0;
        while start < records.len() {
            start = batch_end(&records, start);
            ends.push(start);
        }
        assert_eq!(ends, [2, 4, 6, 7]);
        let huge = [Record::new(Some("k"), vec![b'x'; 2 * BATCH_BYTES])];
        assert_eq!(batch_end(&huge, 0), 1, "a record over the size still travels, alone");
    }

    #[test]
    fn every_encoding_is_exactly_one_batch_whatever_its_size() {
        // Kafka refuses a produce request with two batches for one partition.
        let big = vec![b'x'; BATCH_BYTES / 3];
        let records: Vec<Record> = (0..7).map(|_| Record::new(Some("k"), big.clone())).collect();
        let stamp = Stamp { producer_id: 7, epoch: 3, sequence: 40 };
        for stamp in [None, Some(stamp)] {
            let mut bytes = encode_batch(&records, Compression::NoCompression, stamp).expect("encodes");
            let batches = RecordBatchDecoder::decode_batch_info(&mut bytes).expect("decodes");
            assert_eq!(batches.len(), 1, "{stamp:?}");
            assert_eq!(batches[0].record_count, 7);
        }
    }

    #[test]
    fn a_stamped_batch_carries_the_producer_and_its_first_sequence() {
        let stamp = Stamp { producer_id: 7, epoch: 3, sequence: i32::MAX - 2 };
        let mut bytes = encode_batch(&records(3), Compression::NoCompression, Some(stamp)).expect("encodes");
        let batches = RecordBatchDecoder::decode_batch_info(&mut bytes).expect("decodes");
        let b = &batches[0];
        assert_eq!((batches.len(), b.base_sequence, b.record_count, b.producer_id, b.producer_epoch), (1, i32::MAX - 2, 3, 7, 3));
    }

    /// A record's headers are a list, a name may repeat: written whole, stamped or not,
    /// by every codec (the broker round trip is `repeated_header_keys_are_kept_in_order_with_every_codec`).
    #[test]
    fn repeated_header_names_are_written_whole() {
        let header = |k: &'static str, v: &'static str| crate::transport::Header { key: k.into(), value: Bytes::from_static(v.as_bytes()) };
        let mut records = records(3);
        records[1].headers = vec![header("a", "1"), header("b", "2"), header("a", "3")];
        records[2].timestamp_ms -= 5;
        let stamp = Stamp { producer_id: 7, epoch: 3, sequence: 40 };
        for compression in [Compression::NoCompression, Compression::Zstd] {
            for stamp in [None, Some(stamp)] {
                let bytes = encode_batch(&records, compression, stamp).expect("encodes");
                let read = super::super::decode::decode_partition(0, bytes, 0, &[]);
                let read: Vec<Record> = read.records.iter().map(|c| (*c.record).clone()).collect();
                assert_eq!(read, records, "{compression:?}, {stamp:?}");
            }
        }
    }

    #[test]
    fn a_batch_ends_where_the_sequences_wrap() {
        assert_eq!(sequences_before_wrap(i32::MAX - 1), 2, "MAX - 1 and MAX; the next is 0");
        assert_eq!(sequences_before_wrap(i32::MAX), 1);
        assert_eq!(sequences_before_wrap(0), i32::MAX as usize + 1);
        assert_eq!(sequence_after(i32::MAX - 1, 2), 0);
    }
}
