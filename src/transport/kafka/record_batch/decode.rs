//! Decoding the record batches of a fetch answer.
//!
//! rskafka fails a whole fetch when one record's timestamp does not fit its date
//! type, and a reader then retries the same offset forever. Here timestamps stay
//! plain `i64`, each batch is decoded on its own, and a batch that cannot be read
//! (corrupt, an old message format, counts its bytes cannot hold) is skipped by its
//! offsets, counted and logged by the reader, so the partition moves on.
//!
//! Counts read from the bytes are checked against the bytes that hold them before
//! kafka-protocol's decoder (which reserves memory by them) sees a batch.
//!
//! Fetches are read committed (KIP-98), as librdkafka's and kafkajs's are by default and
//! a transactional pipeline's Java consumer is: the broker answers up to the last stable
//! offset, with the transactions aborted in the range it answers. The records of an
//! aborted transaction are dropped here, by [`Aborted`], and never reach a handler or a
//! waiting call; their offsets are passed all the same.

use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::records::{Compression as WireCompression, RecordBatchDecoder};

use crate::transport::kafka::inflate::{inflate, MAX_INFLATED};
use crate::transport::{ConsumedRecord, Header, Record};

/// Bytes of a v2 batch header after its length field (leader epoch through record
/// count), and of the whole header.
const BATCH_HEADER_AFTER_LENGTH: usize = 49;
const BATCH_HEADER: usize = 12 + BATCH_HEADER_AFTER_LENGTH;
/// A v2 record takes at least this many bytes (seven one-byte varints and the
/// attributes byte, minus the length prefix counted in them).
const MIN_RECORD: usize = 7;
/// Each header takes at least a key length and a value length.
const MIN_HEADER: usize = 2;

/// What one partition's fetched bytes held.
#[derive(Debug, Default)]
pub(crate) struct Fetched {
    /// Readable records at or after the fetch offset, in order.
    pub(crate) records: Vec<ConsumedRecord>,
    /// Batches skipped because they could not be decoded.
    pub(crate) unreadable: Vec<Unreadable>,
    /// Where the next fetch starts: after the last complete batch seen, and never
    /// before the fetch offset.
    pub(crate) next: i64,
    /// The end of the last complete batch, wherever it is: unlike `next`, below the
    /// fetch offset when every whole batch ended before it (an answer from further back,
    /// cut off by its size limit).
    pub(crate) whole_end: Option<i64>,
    /// Base offset of the first batch in the answer, skipped or not: above the fetch
    /// offset, the broker answered from a batch after the one holding it.
    pub(crate) first_base: Option<i64>,
}

impl Fetched {
    /// Holds what the answer says it passed to the log's end, `high_watermark`. Where an
    /// unreadable batch ends is read from its header, which nothing checks (its checksum
    /// failed, or was never reached): a corrupt last-offset delta claims offsets up to
    /// two billion past the end. Nothing lies past the high watermark, and the position
    /// built from `next` is what a server commits; past the end, the next fetch would be
    /// out of range and reset by the policy (re-reading the partition from its start, or
    /// skipping what was produced meanwhile). `high_watermark` is at or after the fetch
    /// offset, so `next` stays at or after it too.
    ///
    /// Read committed, the end is the last stable offset: a broker answers only up to it,
    /// and records past it (from a broker that ignores the isolation level) belong to a
    /// transaction not yet decided, which may still abort. They are dropped, and the
    /// position stops at the end, where the next fetch reads them once decided.
    pub(crate) fn within(&mut self, end: i64) {
        self.next = self.next.min(end);
        self.records.retain(|r| r.offset < end);
        for bad in &mut self.unreadable {
            bad.to = bad.to.min(end).max(bad.from);
        }
        self.unreadable.retain(|bad| bad.from < end);
    }
}

/// A skipped batch: offsets `from..to` and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unreadable {
    pub(crate) from: i64,
    pub(crate) to: i64,
    pub(crate) reason: String,
}

impl Unreadable {
    /// How many records the skipped stretch held, at least one.
    pub(crate) fn records(&self) -> u64 {
        u64::try_from(self.to.saturating_sub(self.from)).unwrap_or(0).max(1)
    }
}

/// A transaction the broker reports aborted in a read-committed fetch answer: the
/// producer that ran it and the offset of its first record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AbortedTransaction {
    pub(crate) producer_id: i64,
    pub(crate) first_offset: i64,
}

/// The type of a transaction marker (a control record's key is its version, then this).
const ABORT_MARKER: i16 = 0;

/// Which transactional batches of one fetch answer belong to aborted transactions, the
/// way Kafka's consumers tell (the Java client's `CompletedFetch`, librdkafka's
/// msgset reader): walking the batches in offset order, a producer's transaction is
/// aborted from the first offset the broker reported for it until that producer's
/// ABORT marker. The broker reports every aborted transaction overlapping the range it
/// answers, whatever offset the fetch started at, so no state outlives one answer, and
/// what is held is bounded by the answer's own list.
#[derive(Debug, Default)]
struct Aborted {
    /// The broker's list, by first offset, and how much of it the walk has reached.
    reported: Vec<AbortedTransaction>,
    reached: usize,
    /// Producers whose aborted transaction the walk is inside.
    open: std::collections::HashSet<i64>,
}

impl Aborted {
    fn new(reported: &[AbortedTransaction]) -> Self {
        let mut reported = reported.to_vec();
        reported.sort_by_key(|t| t.first_offset);
        Aborted { reported, ..Aborted::default() }
    }

    /// Takes in the aborted transactions that start at or before `last`, the last
    /// offset of the batch the walk is at.
    fn reach(&mut self, last: i64) {
        while let Some(t) = self.reported.get(self.reached).filter(|t| t.first_offset <= last) {
            self.open.insert(t.producer_id);
            self.reached += 1;
        }
    }

    /// Whether a decoded batch's records are dropped: control batches always (commit
    /// and abort markers are the broker's bookkeeping; an ABORT ends its producer's
    /// aborted transaction), and data batches of a producer inside an aborted one.
    fn drops(&mut self, records: &[Decoded]) -> bool {
        let Some((first, _)) = records.first() else { return false };
        if first.control {
            for (marker, _) in records {
                let kind = marker.key.as_deref().and_then(|k| k.get(2..4)).map(|t| i16::from_be_bytes([t[0], t[1]]));
                if kind == Some(ABORT_MARKER) {
                    self.open.remove(&marker.producer_id);
                }
            }
            return true;
        }
        first.transactional && self.open.contains(&first.producer_id)
    }
}

/// Decodes the record batches of one partition's fetch answer, keeping records at
/// or after `from` that are not in a transaction `aborted` lists (the broker's list for
/// the answer). Never panics and never reserves more than the bytes can hold.
pub(crate) fn decode_partition(partition: i32, mut data: Bytes, from: i64, aborted: &[AbortedTransaction]) -> Fetched {
    let mut out = Fetched { next: from, ..Fetched::default() };
    let mut aborted = Aborted::new(aborted);
    while data.len() >= 12 {
        let base = i64::from_be_bytes(array_at(&data, 0));
        out.first_base.get_or_insert(base);
        let length = i32::from_be_bytes(array_at(&data, 8));
        // Offsets the batch claims, when its header is there to say.
        let last_delta = (data.len() >= 27).then(|| i32::from_be_bytes(array_at(&data, 23)));
        let end = base.saturating_add(i64::from(last_delta.unwrap_or(0).max(0))).saturating_add(1);
        let length = match usize::try_from(length) {
            Ok(l) if l >= BATCH_HEADER_AFTER_LENGTH => l,
            _ => {
                // Without a usable length the next batch cannot be found: skip what
                // this one claims and let the next fetch start after it.
                out.unreadable.push(Unreadable { from: base, to: end, reason: format!("batch length {length}") });
                out.next = out.next.max(end);
                return out;
            }
        };
        if data.len() < 12 + length {
            // A batch cut off by the fetch size limit: the next fetch starts at it.
            break;
        }
        let batch = data.split_to(12 + length);
        out.next = out.next.max(end);
        out.whole_end = Some(end);
        aborted.reach(end - 1);
        if end <= from {
            // Before the reader's offset (an answer from further back), only an ABORT
            // marker matters: it ends an aborted transaction that may have started
            // before the offset, and the same producer's batches after it are not aborted.
            if is_control(&batch) {
                if let Ok(markers) = decode_batch(batch) {
                    aborted.drops(&markers);
                }
            }
            continue;
        }
        match decode_batch(batch) {
            Ok(records) => {
                if aborted.drops(&records) {
                    // Passed, not handed out: `next` is already past the batch.
                    continue;
                }
                for (r, headers) in records {
                    // Offsets only go up: a record at or before one already taken
                    // (tansu 0.6 repeats batches when asked for an offset inside
                    // one) is not handed out twice.
                    // Cannot overflow: `check_records` refused batches whose offsets reach i64::MAX.
                    let next = out.records.last().map_or(from, |last| last.offset + 1);
                    if r.offset >= next {
                        out.records.push(convert(partition, r, headers));
                    }
                }
            }
            Err(reason) => out.unreadable.push(Unreadable { from: base.max(from), to: end, reason }),
        }
    }
    out
}

/// Whether a whole batch's attributes mark it a control batch (transaction markers).
fn is_control(batch: &[u8]) -> bool {
    /// The attributes' control bit; the attributes are the two bytes at 21.
    const CONTROL: u8 = 0x20;
    batch.get(22).is_some_and(|a| a & CONTROL != 0)
}

fn array_at<const N: usize>(data: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = data.get(at..at + N) {
        a.copy_from_slice(s);
    }
    a
}

/// A decoded record with its headers as written. kafka-protocol keeps a record's headers
/// in a map, which holds one value of a name written twice (the last, where the first
/// stood); Kafka's headers are a list, and a name may repeat (`Headers.add`, Spring's
/// dead-letter headers), so `check_records` reads them instead.
type Decoded = (kafka_protocol::records::Record, Vec<Header>);

/// One whole batch (header included), its counts checked first.
fn decode_batch(mut batch: Bytes) -> Result<Vec<Decoded>, String> {
    if batch.len() < BATCH_HEADER {
        return Err("batch shorter than its header".into());
    }
    let magic = batch[16];
    if magic != 2 {
        return Err(format!("message format v{magic} is not supported"));
    }
    let count = i32::from_be_bytes(array_at(&batch, 57));
    let count = usize::try_from(count).map_err(|_| format!("record count {count}"))?;
    let bases = (i64::from_be_bytes(array_at(&batch, 0)), i64::from_be_bytes(array_at(&batch, 27)));
    let headers = std::cell::RefCell::new(Vec::new());
    let decompress = |raw: &mut Bytes, compression: WireCompression| -> anyhow::Result<Bytes> {
        let plain = match compression {
            WireCompression::None => raw.split_to(raw.len()),
            // Bounded: a small batch may claim gigabytes once inflated (see `inflate`).
            other => inflate(other, &raw.split_to(raw.len()), MAX_INFLATED).map_err(anyhow::Error::msg)?,
        };
        headers.borrow_mut().extend(check_records(&plain, count, bases)?);
        Ok(plain)
    };
    let set =
        RecordBatchDecoder::decode_with_custom_compression(&mut batch, Some(decompress)).map_err(|e| e.to_string())?;
    let headers = headers.into_inner();
    if headers.len() != set.records.len() {
        return Err(format!("{} records decoded, {} read", set.records.len(), headers.len()));
    }
    Ok(set.records.into_iter().zip(headers).collect())
}

/// Refuses record bytes whose counts promise more than the bytes hold, before the
/// decoder reserves memory by those counts, and records whose offset or timestamp
/// delta overflows the batch's base offset or first timestamp (`bases`): the decoder
/// adds them unchecked, which panics where overflow checks are on. A batch whose
/// offsets could reach `i64::MAX` is refused too, so that `offset + 1` (the next
/// position of every reader: sessions, tails, workers) never overflows. Returns each
/// record's headers, in order, their values sharing `plain`'s memory.
fn check_records(plain: &Bytes, count: usize, bases: (i64, i64)) -> anyhow::Result<Vec<Vec<Header>>> {
    let mut data = &plain[..];
    if count.saturating_mul(MIN_RECORD) > data.len() {
        anyhow::bail!("{count} records cannot fit in {} bytes", data.len());
    }
    // Offset deltas are 32-bit: any of them fits unless the base is that close to an end.
    // At the top, one more: every reader computes the offset after a record's (`offset
    // + 1`, where to fetch next), so no record may sit at `i64::MAX` itself.
    if bases.0.checked_add(i64::from(i32::MAX) + 1).is_none() || bases.0.checked_add(i64::from(i32::MIN)).is_none() {
        anyhow::bail!("base offset {} leaves no room for its records' offset deltas", bases.0);
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let size = length(&mut data)?.ok_or_else(|| anyhow::anyhow!("null record"))?;
        if size > data.len() {
            anyhow::bail!("record of {size} bytes in {} bytes", data.len());
        }
        let (mut record, rest) = data.split_at(size);
        data = rest;
        record = record.get(1..).unwrap_or_default(); // attributes
        if bases.1.checked_add(varint(&mut record)?).is_none() {
            anyhow::bail!("timestamp delta overflows the batch's first timestamp {}", bases.1);
        }
        varint32(&mut record)?; // offset delta
        field(&mut record)?; // key
        field(&mut record)?; // value
        let n = length(&mut record)?.unwrap_or(0);
        if n.saturating_mul(MIN_HEADER) > record.len() {
            anyhow::bail!("{n} headers cannot fit in {} bytes", record.len());
        }
        let mut list = Vec::with_capacity(n);
        for _ in 0..n {
            let key = field(&mut record)?.ok_or_else(|| anyhow::anyhow!("null header key"))?;
            let key = std::str::from_utf8(key).map_err(|_| anyhow::anyhow!("header key is not UTF-8"))?;
            // A null value reads as empty, as a `Header` holds bytes.
            let value = field(&mut record)?.map_or_else(Bytes::new, |v| plain.slice_ref(v));
            list.push(Header { key: crate::wire::names::read(key), value });
        }
        headers.push(list);
    }
    Ok(headers)
}

/// A length-prefixed field, `None` when null.
fn field<'a>(data: &mut &'a [u8]) -> anyhow::Result<Option<&'a [u8]>> {
    let Some(n) = length(data)? else { return Ok(None) };
    if n > data.len() {
        anyhow::bail!("field of {n} bytes in {}", data.len());
    }
    let (field, rest) = data.split_at(n);
    *data = rest;
    Ok(Some(field))
}

/// A zigzag varint (a record's timestamp delta), up to 64 bits.
fn varint(data: &mut &[u8]) -> anyhow::Result<i64> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let Some((&byte, rest)) = data.split_first() else { anyhow::bail!("truncated varint") };
        *data = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
        }
    }
    anyhow::bail!("varint longer than 64 bits")
}

/// A 32-bit zigzag varint (a record's lengths, offset delta and header count), read
/// exactly as kafka-protocol reads it: at most five bytes, bits past 32 dropped. Any
/// other reading could check a different count than the one the decoder then reserves
/// memory by (the fetched_batches fuzz target found one).
fn varint32(data: &mut &[u8]) -> anyhow::Result<i32> {
    let mut value: u32 = 0;
    for shift in (0..35).step_by(7) {
        let Some((&byte, rest)) = data.split_first() else { anyhow::bail!("truncated varint") };
        *data = rest;
        value |= u32::from(byte & 0x7f).wrapping_shl(shift);
        if byte & 0x80 == 0 {
            break;
        }
    }
    Ok((value >> 1) as i32 ^ -((value & 1) as i32))
}

/// A varint length: `None` for -1 (null), an error for other negatives.
pub(super) fn length(data: &mut &[u8]) -> anyhow::Result<Option<usize>> {
    match varint32(data)? {
        -1 => Ok(None),
        n => usize::try_from(n).map(Some).map_err(|_| anyhow::anyhow!("negative length {n}")),
    }
}

fn convert(partition: i32, r: kafka_protocol::records::Record, headers: Vec<Header>) -> ConsumedRecord {
    ConsumedRecord {
        partition,
        offset: r.offset,
        record: Arc::new(Record {
            key: r.key,
            value: r.value,
            headers,
            timestamp_ms: r.timestamp,
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::BytesMut;
    use indexmap::IndexMap;
    use kafka_protocol::records::{Record as WireRecord, RecordBatchEncoder, RecordEncodeOptions, TimestampType};

    /// One encoded record batch: `values` from offset `base`, all at `timestamp`.
    pub(crate) fn batch(base: i64, values: &[&str], timestamp: i64) -> Vec<u8> {
        let records: Vec<WireRecord> = values
            .iter()
            .enumerate()
            .map(|(i, v)| WireRecord {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: base + i as i64,
                // kafka-protocol starts a new batch wherever offset - sequence changes.
                sequence: i as i32 - 1,
                timestamp,
                key: None,
                value: Some(Bytes::copy_from_slice(v.as_bytes())),
                headers: IndexMap::new(),
            })
            .collect();
        let mut buf = BytesMut::new();
        let options = RecordEncodeOptions { version: 2, compression: WireCompression::None };
        RecordBatchEncoder::encode(&mut buf, &records, &options).expect("encodes");
        buf.to_vec()
    }

    /// A batch as `batch` writes it, of producer `producer_id`'s transaction.
    fn txn_batch(base: i64, values: &[&str], producer_id: i64) -> Vec<u8> {
        let mut records = kafka_protocol::records::RecordBatchDecoder::decode(&mut Bytes::from(batch(base, values, 0)))
            .expect("decodes")
            .records;
        for (i, r) in records.iter_mut().enumerate() {
            (r.transactional, r.producer_id, r.producer_epoch, r.sequence) = (true, producer_id, 0, i as i32);
        }
        let mut buf = BytesMut::new();
        let options = RecordEncodeOptions { version: 2, compression: WireCompression::None };
        RecordBatchEncoder::encode(&mut buf, &records, &options).expect("encodes");
        buf.to_vec()
    }

    /// Producer `producer_id`'s transaction marker at `offset`: COMMIT or ABORT.
    fn marker(offset: i64, producer_id: i64, commit: bool) -> Vec<u8> {
        let record = WireRecord {
            transactional: true,
            control: true,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id,
            producer_epoch: 0,
            timestamp_type: TimestampType::Creation,
            offset,
            sequence: -1,
            timestamp: 0,
            key: Some(Bytes::copy_from_slice(&[0, 0, 0, u8::from(commit)])),
            value: Some(Bytes::from_static(&[0, 0, 0, 0, 0, 0])),
            headers: IndexMap::new(),
        };
        let mut buf = BytesMut::new();
        let options = RecordEncodeOptions { version: 2, compression: WireCompression::None };
        RecordBatchEncoder::encode(&mut buf, &[record], &options).expect("encodes");
        buf.to_vec()
    }

    fn aborted(producer_id: i64, first_offset: i64) -> AbortedTransaction {
        AbortedTransaction { producer_id, first_offset }
    }

    #[test]
    fn an_aborted_transaction_is_dropped_up_to_its_abort_marker_and_its_offsets_passed() {
        // 0-1 txn of 7 (aborted), 2 plain, 3 txn of 8 (committed), 4 ABORT of 7,
        // 5 txn of 7 (its next transaction, committed), 6 COMMIT of 8, 7 COMMIT of 7.
        let data = [
            txn_batch(0, &["a1", "a2"], 7),
            batch(2, &["p"], 0),
            txn_batch(3, &["b"], 8),
            marker(4, 7, false),
            txn_batch(5, &["c"], 7),
            marker(6, 8, true),
            marker(7, 7, true),
        ]
        .concat();
        let f = decode_partition(0, Bytes::from(data), 0, &[aborted(7, 0)]);
        assert_eq!(values(&f), ["p", "b", "c"]);
        assert_eq!(f.next, 8, "past every batch, dropped or not");
        assert!(f.unreadable.is_empty());
    }

    #[test]
    fn an_abort_marker_before_the_fetch_offset_still_ends_the_aborted_transaction() {
        // An answer from further back (looking back for the batch holding 2): the
        // aborted transaction and its marker lie before the reader's offset.
        let data = [txn_batch(0, &["x"], 7), marker(1, 7, false), txn_batch(2, &["y", "z"], 7)].concat();
        let f = decode_partition(0, Bytes::from(data), 3, &[aborted(7, 0)]);
        assert_eq!(values(&f), ["z"]);
    }

    #[test]
    fn an_aborted_transaction_reported_from_a_later_offset_leaves_earlier_batches() {
        // The broker reports the transaction from 1: the batch at 0 is an earlier,
        // committed one of the same producer, and another producer is never dropped.
        let data = [txn_batch(0, &["kept"], 7), txn_batch(1, &["gone"], 7), txn_batch(2, &["other"], 9)].concat();
        let f = decode_partition(0, Bytes::from(data), 0, &[aborted(7, 1)]);
        assert_eq!(values(&f), ["kept", "other"]);
        assert_eq!(f.next, 3);
    }

    #[test]
    fn records_past_the_last_stable_offset_are_not_read_yet() {
        let data = [batch(0, &["a"], 0), txn_batch(1, &["open"], 7), batch(2, &["b"], 0)].concat();
        let mut f = decode_partition(0, Bytes::from(data), 0, &[]);
        f.within(1);
        assert_eq!(values(&f), ["a"]);
        assert_eq!(f.next, 1);
    }

    /// Rewrites the batch CRC after a test changed bytes it covers, so the change
    /// reaches the decoder rather than failing the checksum.
    fn fix_crc(batch: &mut [u8]) {
        let crc = crc32c::crc32c(&batch[21..]);
        batch[17..21].copy_from_slice(&crc.to_be_bytes());
    }

    fn values(f: &Fetched) -> Vec<String> {
        f.records
            .iter()
            .map(|r| String::from_utf8_lossy(r.record.value.as_deref().unwrap_or_default()).into_owned())
            .collect()
    }

    #[test]
    fn records_before_the_fetch_offset_or_repeated_are_dropped_and_timestamps_kept_whole() {
        let data = [batch(0, &["a", "b"], i64::MAX), batch(2, &["c"], -7), batch(2, &["c"], -7)].concat();
        let f = decode_partition(3, Bytes::from(data), 1, &[]);
        assert_eq!(values(&f), ["b", "c"]);
        assert_eq!(f.records[0].record.timestamp_ms, i64::MAX);
        assert_eq!(f.records[1].record.timestamp_ms, -7);
        assert_eq!((f.records[0].offset, f.records[0].partition), (1, 3));
        assert_eq!(f.next, 3);
        assert!(f.unreadable.is_empty());
    }

    #[test]
    fn transaction_markers_are_passed_over_not_handed_out() {
        let mut marker = batch(1, &["commit"], 0);
        marker[22] |= 0x30; // the attributes' transactional and control bits
        fix_crc(&mut marker);
        let data = [batch(0, &["a"], 0), marker, batch(2, &["b"], 0)].concat();
        let f = decode_partition(0, Bytes::from(data), 0, &[]);
        assert_eq!(values(&f), ["a", "b"]);
        assert_eq!(f.next, 3);
        assert!(f.unreadable.is_empty());
    }

    #[test]
    fn a_corrupt_batch_is_skipped_by_its_offsets_and_the_rest_is_read() {
        let mut bad = batch(2, &["x", "y"], 0);
        let last = bad.len() - 1;
        bad[last] ^= 0xff; // the checksum no longer matches
        let data = [batch(0, &["a", "b"], 0), bad, batch(4, &["f"], 0)].concat();
        let f = decode_partition(0, Bytes::from(data), 0, &[]);
        assert_eq!(values(&f), ["a", "b", "f"]);
        assert_eq!(f.unreadable.len(), 1);
        assert_eq!((f.unreadable[0].from, f.unreadable[0].to), (2, 4));
        assert_eq!(f.next, 5);
    }

    #[test]
    fn a_header_count_the_record_cannot_hold_is_refused_before_allocating() {
        let mut b = batch(0, &["v"], 0);
        // The record ends with its header count (a varint 0); make it 2^31 - 1.
        b.pop();
        b.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0x0f]);
        let len = (b.len() - 12) as i32;
        b[8..12].copy_from_slice(&len.to_be_bytes());
        // The record's own length prefix grows by the four added bytes.
        b[61] += 8;
        fix_crc(&mut b);
        let f = decode_partition(0, Bytes::from(b), 0, &[]);
        assert!(f.records.is_empty());
        assert_eq!(f.unreadable.len(), 1, "{f:?}");
        assert_eq!(f.next, 1);
    }

    #[test]
    fn a_record_count_the_batch_cannot_hold_is_refused_before_allocating() {
        let mut b = batch(0, &["v"], 0);
        b[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        fix_crc(&mut b);
        let f = decode_partition(0, Bytes::from(b), 0, &[]);
        assert!(f.records.is_empty());
        assert_eq!(f.unreadable.len(), 1);
    }

    #[test]
    fn a_batch_cut_off_by_the_size_limit_is_left_for_the_next_fetch() {
        let data = [batch(0, &["a"], 0), batch(1, &["b"], 0)].concat();
        let cut = data.len() - 3;
        let f = decode_partition(0, Bytes::copy_from_slice(&data[..cut]), 0, &[]);
        assert_eq!(values(&f), ["a"]);
        assert_eq!(f.next, 1);
        assert!(f.unreadable.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256), from in 0i64..4) {
            let f = decode_partition(0, Bytes::from(data.clone()), from, &[]);
            proptest::prop_assert!(f.records.len() * MIN_RECORD <= data.len());
        }

        #[test]
        fn arbitrary_aborted_lists_never_panic_nor_hand_out_more_than_was_sent(
            reported in proptest::collection::vec((0i64..4, -2i64..8), 0..6),
            from in 0i64..6,
        ) {
            let data = [
                txn_batch(0, &["a", "b"], 1),
                marker(2, 1, false),
                batch(3, &["c"], 0),
                txn_batch(4, &["d"], 2),
                marker(5, 2, true),
            ]
            .concat();
            let aborted: Vec<_> = reported.iter().map(|&(p, o)| aborted(p, o)).collect();
            let f = decode_partition(0, Bytes::from(data), from, &aborted);
            proptest::prop_assert!(f.records.iter().all(|r| r.offset >= from && r.offset < 6));
            proptest::prop_assert!(f.records.iter().any(|r| r.offset == 3) || from > 3, "a plain record is never dropped");
            proptest::prop_assert_eq!(f.next, 6.max(from));
        }

        #[test]
        fn any_byte_of_a_valid_batch_changed_never_panics(at in 12usize..200, byte in proptest::prelude::any::<u8>()) {
            let mut b = batch(0, &["alpha", "beta", "gamma"], 1_700_000_000_000);
            let at = at % b.len();
            b[at] = byte;
            if at >= 21 {
                fix_crc(&mut b);
            }
            let f = decode_partition(0, Bytes::from(b.clone()), 0, &[]);
            proptest::prop_assert!(f.records.len() <= 3 || f.records.len() * MIN_RECORD <= b.len());
        }
    }
}
