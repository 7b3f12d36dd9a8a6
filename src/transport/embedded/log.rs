//! One partition's append-only log: offsets, retention by bytes, and wake-ups for
//! waiting readers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::transport::{ConsumedRecord, Header, Record, TopicPartition, TransportError};

/// Bytes a retained record is counted as: its key, value and headers plus the
/// structures that hold them (the record, its `Arc`, its header vector's slots, spare
/// ones included, its slot in the log). Counting what the process keeps, not the
/// wire size, makes the retention bound a bound on the broker's memory; for the small
/// records of request-reply the overhead is most of it.
pub(crate) fn retained_size(record: &Record) -> usize {
    const FIXED: usize = std::mem::size_of::<Record>() + 2 * std::mem::size_of::<usize>() + std::mem::size_of::<Stored>();
    let slots = record.headers.capacity() * std::mem::size_of::<Header>();
    let headers: usize = record
        .headers
        .iter()
        .map(|h| {
            let owned_name = match &h.key {
                std::borrow::Cow::Owned(name) => name.len(),
                std::borrow::Cow::Borrowed(_) => 0,
            };
            owned_name + h.value.len()
        })
        .sum();
    FIXED + record.key.as_ref().map_or(0, |k| k.len()) + record.value.as_ref().map_or(0, |v| v.len()) + slots + headers
}

/// The records of one partition plus the signal that wakes readers waiting at its end.
///
/// Each partition has its own lock, so producers and fetchers of different partitions
/// never contend, and the lock is held only for pointer pushes and `Arc` clones.
#[derive(Debug)]
pub(crate) struct PartitionLog {
    tp: TopicPartition,
    /// Most bytes ([`retained_size`]) kept; the newest record is kept whatever its size.
    retention_bytes: usize,
    state: Mutex<LogState>,
    /// Fired after every append. Readers create their `Notified` before looking at the
    /// log, so an append that lands between their look and their wait still wakes them.
    appended: Notify,
}

#[derive(Debug)]
struct LogState {
    /// Offset of `records[0]`; moves forward when retention drops old records.
    start: i64,
    records: VecDeque<Stored>,
    /// Sum of the `bytes` of `records`.
    bytes: usize,
}

/// A retained record and the size it counts for.
#[derive(Debug)]
struct Stored {
    record: Arc<Record>,
    bytes: usize,
}

impl LogState {
    fn high_watermark(&self) -> i64 {
        self.start + self.records.len() as i64
    }
}

impl PartitionLog {
    /// An empty log for `tp` keeping at most `retention_bytes` bytes of records, and
    /// always at least the newest record.
    pub(crate) fn new(tp: TopicPartition, retention_bytes: usize) -> Self {
        PartitionLog {
            tp,
            retention_bytes,
            state: Mutex::new(LogState { start: 0, records: VecDeque::new(), bytes: 0 }),
            appended: Notify::new(),
        }
    }

    /// The partition this log belongs to.
    #[cfg(test)]
    pub(crate) fn topic_partition(&self) -> &TopicPartition {
        &self.tp
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        // Every mutation leaves the state consistent before anything that could panic,
        // so a poisoned lock still guards a valid log.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `records` atomically and returns the offset of the first one (the high
    /// watermark when `records` is empty).
    pub(crate) fn append(&self, mut records: Vec<Record>) -> i64 {
        // Pack, allocate the Arcs and size the records before taking the lock so
        // fetchers only wait for pointer pushes.
        pack(&mut records, self.retention_bytes);
        // Not `collect`: collecting in place into the records' own buffer shrinks it
        // with a `realloc` and a copy afterwards, which cost more than a fresh buffer.
        let mut batch: Vec<Stored> = Vec::with_capacity(records.len());
        batch.extend(records.into_iter().map(|record| Stored { bytes: retained_size(&record), record: Arc::new(record) }));
        if batch.is_empty() {
            return self.high_watermark();
        }
        let added: usize = batch.iter().map(|s| s.bytes).sum();
        let first = {
            let mut state = self.lock();
            let first = state.high_watermark();
            state.records.extend(batch.drain(..));
            state.bytes += added;
            // Oldest first, as Kafka deletes whole old segments; the newest record
            // stays even if it alone exceeds the bound, so a produce is always readable.
            let mut excess = 0;
            let mut bytes = state.bytes;
            for stored in state.records.iter().take(state.records.len() - 1) {
                if bytes <= self.retention_bytes {
                    break;
                }
                bytes -= stored.bytes;
                excess += 1;
            }
            if excess > 0 {
                // Park evicted records in the (now empty) batch vector so their payloads
                // are freed after the lock is released, without a new allocation.
                batch.extend(state.records.drain(..excess));
                state.bytes = bytes;
                state.start += excess as i64;
                // A batch of many records grew the slots far past what retention keeps
                // of them; a deque never shrinks, so give them back or they stay
                // allocated for the log's life. Rare: growth only doubles.
                let len = state.records.len();
                if state.records.capacity() > 4 * len.max(64) {
                    state.records.shrink_to(2 * len);
                }
            }
            first
        };
        drop(batch);
        self.appended.notify_waiters();
        first
    }

    /// The offset the next appended record will get.
    pub(crate) fn high_watermark(&self) -> i64 {
        self.lock().high_watermark()
    }

    /// The oldest retained offset.
    pub(crate) fn start_offset(&self) -> i64 {
        self.lock().start
    }

    /// Up to `max` records starting at `offset`. Empty when `offset` is the high
    /// watermark; `OffsetOutOfRange` when it is before the log start or past the end.
    pub(crate) fn read(&self, offset: i64, max: usize) -> Result<Vec<ConsumedRecord>, TransportError> {
        let state = self.lock();
        let end = state.high_watermark();
        if offset < state.start || offset > end {
            return Err(TransportError::OffsetOutOfRange {
                tp: self.tp.clone(),
                offset,
                earliest: state.start,
                latest: end,
            });
        }
        let from = (offset - state.start) as usize;
        let count = ((end - offset) as usize).min(max);
        let mut out = Vec::with_capacity(count);
        out.extend(state.records.range(from..from + count).enumerate().map(|(i, record)| ConsumedRecord {
            partition: self.tp.partition,
            offset: offset + i as i64,
            record: Arc::clone(&record.record),
        }));
        Ok(out)
    }

    /// The wake-up signal fired after each append.
    pub(crate) fn appended(&self) -> &Notify {
        &self.appended
    }
}

/// Largest key, value or header value [`pack`] copies; larger ones stay shared.
const PACK_MAX: usize = 4096;

/// Copies the small keys, values and header values of a batch into one buffer, so
/// each record's parts are slices of it instead of allocations of their own.
///
/// Why: retention drops a record long after it was written, when the log's tens of
/// MiB have pushed it out of the CPU caches. Freeing the five or six allocations of a
/// request record (key, value, correlation id, deadline...) one cache miss each, on
/// another thread than the one that made them, was 15 % of the embedded round trip
/// (perf, 3,000,000 requests). Copied here, the producer's buffers are freed at once
/// while still hot, and a dropped record touches one shared buffer.
///
/// Copied whether or not something else holds them: a part may be a slice of another
/// record's buffer (a reply echoes its request's key and correlation id, a dead
/// letter its request's parts), and kept as it is, it would hold that whole buffer —
/// every small part of the other batch — for as long as this record is retained,
/// memory the retention bound counts as a few bytes. Copying the parts that could
/// not pin anything as well (a static content type, a client's reply topic) costs
/// ~350 instructions of an embedded round trip (2.9 %): `Bytes` cannot tell them
/// apart, and the bound is worth more. Left as they are: parts larger than
/// [`PACK_MAX`], whose copy would cost more than their free (and which are never
/// slices of a packed buffer).
///
/// One buffer is freed only with the last of its records, so none holds more than
/// `most` bytes (the retention bound): a batch larger than what the partition keeps
/// is packed in parts, and the records retention drops at once are freed at once
/// rather than held by the few it keeps.
fn pack(records: &mut [Record], most: usize) {
    /// Calls `f` on every key, value and header value of `records`, in order. Plain
    /// loops: a `flat_map` chain over the three cost more than the copies.
    fn each_part(records: &mut [Record], mut f: impl FnMut(&mut Bytes)) {
        for r in records {
            if let Some(k) = &mut r.key {
                f(k);
            }
            if let Some(v) = &mut r.value {
                f(v);
            }
            for h in &mut r.headers {
                f(&mut h.value);
            }
        }
    }
    let small = |part: &Bytes| part.len() <= PACK_MAX;
    let mut size = 0;
    each_part(records, |part| {
        if small(part) {
            size += part.len();
        }
    });
    if size == 0 {
        return;
    }
    if size > most && records.len() > 1 {
        let (first, second) = records.split_at_mut(records.len() / 2);
        pack(first, most);
        pack(second, most);
        return;
    }
    // Exactly sized: spare capacity would be memory the retention bound does not count.
    let mut buf = Vec::with_capacity(size);
    each_part(records, |part| {
        if small(part) {
            buf.extend_from_slice(part);
        }
    });
    let buf = Bytes::from(buf);
    let mut at = 0;
    each_part(records, |part| {
        if small(part) {
            let n = part.len();
            *part = buf.slice(at..at + n);
            at += n;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log keeping about `records` of the one-byte records these tests append.
    fn log(records: usize) -> PartitionLog {
        PartitionLog::new(TopicPartition::new("t", 0), records * retained_size(&rec("0")))
    }

    fn rec(v: &str) -> Record {
        Record::new(None::<Vec<u8>>, v.as_bytes().to_vec())
    }

    fn values(records: &[ConsumedRecord]) -> Vec<String> {
        records
            .iter()
            .map(|r| String::from_utf8_lossy(r.record.value.as_deref().unwrap_or_default()).into_owned())
            .collect()
    }

    #[test]
    fn offsets_start_at_zero_and_batches_are_contiguous() {
        let log = log(100);
        assert_eq!(log.high_watermark(), 0);
        assert_eq!(log.append(vec![rec("a"), rec("b")]), 0);
        assert_eq!(log.append(vec![rec("c")]), 2);
        assert_eq!(log.append(vec![]), 3, "an empty batch reports the high watermark");
        assert_eq!(log.high_watermark(), 3);
        let read = log.read(0, 10).expect("offset 0 is retained");
        assert_eq!(values(&read), ["a", "b", "c"]);
        assert_eq!(read.iter().map(|r| r.offset).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(values(&log.read(1, 10).expect("offset 1 is retained")), ["b", "c"]);
    }

    #[test]
    fn read_is_capped_at_max_and_empty_at_high_watermark() {
        let log = log(100);
        log.append((0..10).map(|i| rec(&i.to_string())).collect());
        assert_eq!(values(&log.read(2, 3).expect("in range")), ["2", "3", "4"]);
        assert!(log.read(10, 3).expect("the high watermark is a valid position").is_empty());
        match log.read(11, 3) {
            Err(TransportError::OffsetOutOfRange { offset: 11, earliest: 0, latest: 10, .. }) => {}
            other => panic!("reading past the high watermark should be out of range, got {other:?}"),
        }
    }

    #[test]
    fn retention_drops_oldest_and_moves_log_start() {
        let log = log(3);
        for i in 0..5 {
            log.append(vec![rec(&i.to_string())]);
        }
        assert_eq!(log.start_offset(), 2);
        assert_eq!(log.high_watermark(), 5);
        assert_eq!(values(&log.read(2, 10).expect("log start is readable")), ["2", "3", "4"]);
        match log.read(1, 10) {
            Err(TransportError::OffsetOutOfRange { offset: 1, earliest: 2, latest: 5, tp }) => {
                assert_eq!(tp, TopicPartition::new("t", 0))
            }
            other => panic!("a dropped offset should be out of range with earliest 2, got {other:?}"),
        }
    }

    #[test]
    fn batch_larger_than_retention_keeps_the_newest() {
        let log = log(2);
        assert_eq!(log.append((0..5).map(|i| rec(&i.to_string())).collect()), 0);
        assert_eq!(log.start_offset(), 3);
        assert_eq!(values(&log.read(3, 10).expect("retained")), ["3", "4"]);
    }

    #[test]
    fn retention_counts_bytes_not_records() {
        let small = retained_size(&rec("s"));
        let log = PartitionLog::new(TopicPartition::new("t", 0), 10 * small);
        log.append((0..10).map(|_| rec("s")).collect());
        assert_eq!(log.start_offset(), 0, "ten small records fit");
        // A record one byte larger than four small ones pushes out five of them.
        let big = "b".repeat(3 * small + 2);
        assert_eq!(retained_size(&rec(&big)), 4 * small + 1);
        log.append(vec![rec(&big)]);
        assert_eq!(log.start_offset(), 5);
        assert_eq!(values(&log.read(5, 1).expect("retained")), ["s"]);

        // A record larger than the whole bound is still kept, alone.
        let huge = "h".repeat(20 * small);
        assert_eq!(log.append(vec![rec(&huge)]), 11);
        assert_eq!((log.start_offset(), log.high_watermark()), (11, 12));
        assert_eq!(values(&log.read(11, 10).expect("the newest record is always readable")), [huge]);
    }

    #[test]
    fn a_header_vectors_spare_room_is_counted() {
        let header = || Header { key: "k".into(), value: Bytes::from_static(b"v") };
        let mut exact = rec("x");
        exact.headers = vec![header()];
        let mut roomy = rec("x");
        roomy.headers = Vec::with_capacity(5);
        roomy.headers.push(header());
        assert_eq!(retained_size(&roomy) - retained_size(&exact), 4 * std::mem::size_of::<Header>());
    }

    #[test]
    fn large_payloads_are_shared_not_copied() {
        let log = log(10);
        let original = bytes::Bytes::from(vec![7u8; PACK_MAX + 1]);
        let ptr = original.as_ptr();
        log.append(vec![Record { value: Some(original), ..Record::default() }]);
        let read = log.read(0, 1).expect("retained");
        let value = read[0].record.value.as_ref().expect("value was set");
        assert_eq!(value.as_ptr(), ptr, "the stored payload should be the producer's buffer");
    }

    #[test]
    fn a_batch_keeps_every_part_of_every_record_when_packed() {
        let log = PartitionLog::new(TopicPartition::new("t", 0), 1 << 20);
        let big = vec![9u8; PACK_MAX + 1];
        let shared = Bytes::from(vec![4u8; 6]);
        // Built twice rather than cloned: a clone would share every part with `sent`.
        let batch = || -> Vec<Record> {
            (0..3u8)
                .map(|i| Record {
                    key: (i != 1).then(|| Bytes::from(vec![i; 3])),
                    value: Some(if i == 2 { Bytes::from(big.clone()) } else { Bytes::from(vec![i + 10; 5]) }),
                    headers: vec![
                        Header { key: "a".into(), value: Bytes::from_static(b"x") },
                        Header { key: "empty".into(), value: Bytes::new() },
                        Header { key: "b".into(), value: Bytes::from(vec![i; 2]) },
                        Header { key: "shared".into(), value: shared.clone() },
                    ],
                    timestamp_ms: i64::from(i),
                })
                .collect()
        };
        let sent = batch();
        log.append(batch());
        let read = log.read(0, 3).expect("retained");
        let got: Vec<Record> = read.iter().map(|c| (*c.record).clone()).collect();
        assert_eq!(got, sent, "packing must not change a byte of any record");
        let (k0, v0) = (read[0].record.key.as_ref().expect("key"), read[0].record.value.as_ref().expect("value"));
        assert_eq!(v0.as_ptr(), k0[k0.len()..].as_ptr(), "small parts should sit side by side in one buffer");
        let copied = read[0].record.header("shared").expect("header was sent");
        assert_ne!(copied.as_ptr(), shared.as_ptr(), "a part its producer still holds is copied too (it could be a slice of a larger buffer)");
    }

    #[test]
    fn a_reply_does_not_hold_its_evicted_request_s_buffer() {
        // A log keeping one record at a time: the next append evicts the request.
        let requests = PartitionLog::new(TopicPartition::new("requests", 0), 1);
        let mut request = Record::new(None::<Vec<u8>>, vec![7u8; 4000]);
        request.headers = vec![Header { key: "id".into(), value: Bytes::from(vec![1u8; 16]) }];
        requests.append(vec![request]);
        let consumed = requests.read(0, 1).expect("retained").remove(0);
        let request_buffer = consumed.record.value.as_ref().expect("value").as_ptr_range();
        // What a server's reply echoes: the request's correlation id, as read.
        let id = consumed.record.header("id").expect("header").clone();
        assert!(request_buffer.end == id.as_ptr(), "the request's parts share one packed buffer");
        let mut reply = Record::new(None::<Vec<u8>>, vec![1u8]);
        reply.headers = vec![Header { key: "id".into(), value: id }];
        let replies = PartitionLog::new(TopicPartition::new("replies", 0), 1 << 20);
        replies.append(vec![reply]);
        drop(consumed);
        requests.append(vec![rec("next")]);
        assert_eq!(requests.start_offset(), 1, "the request was evicted");
        let stored = replies.read(0, 1).expect("retained").remove(0);
        let echoed = stored.record.header("id").expect("header");
        assert_eq!(echoed.as_ref(), [1u8; 16]);
        assert!(
            !request_buffer.contains(&echoed.as_ptr()) && echoed.as_ptr() != request_buffer.end,
            "the retained reply must not keep the evicted request's 4,000-byte buffer alive"
        );
    }
}
