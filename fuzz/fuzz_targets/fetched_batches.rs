//! A partition's fetched record batches, decoded batch by batch (counts checked,
//! compressed batches inflated within a limit), and each codec's inflater on its own.
//! The first byte picks the fetch offset, the codec, and whether each whole batch's
//! checksum is recomputed (so mutations get past it to the decoder). The second byte
//! picks which batches the answer lists as aborted transactions (their producer id and
//! base offset, read from the batches themselves so that they match what the data
//! holds): the read-committed decode, which drops those transactions' records, must
//! hand out offsets in order from the fetch offset and move the position exactly as far
//! as the plain decode, skipping the same unreadable batches. The rest is the data.
#![no_main]

use bytes::Bytes;
use kafka_rpc::transport::kafka::untrusted;
use libfuzzer_sys::fuzz_target;

/// A v2 batch header: base offset (8), length (4), leader epoch (4), magic (1), CRC (4)
/// over the rest of the batch, attributes (2), last offset delta (4), first and max
/// timestamps (8 each), producer id (8).
const CRC_AT: usize = 17;
const CRC_FROM: usize = 21;
const PRODUCER_ID_AT: usize = 43;

/// Where each batch of `data` starts and ends (cut at the data's end), by its length.
fn batches(data: &[u8]) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(len) = data.get(at + 8..at + 12) {
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        let Ok(len) = usize::try_from(len) else { break };
        let end = at.saturating_add(12).saturating_add(len).min(data.len());
        found.push((at, end));
        if end >= data.len() {
            break;
        }
        at = end;
    }
    found
}

fn be_i64(bytes: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

fuzz_target!(|data: &[u8]| {
    let [pick, abort, rest @ ..] = data else { return };
    let mut rest = rest.to_vec();
    let whole = batches(&rest);
    if pick & 0x4 != 0 {
        for &(at, end) in &whole {
            if end > at + CRC_FROM {
                let crc = crc32c::crc32c(&rest[at + CRC_FROM..end]);
                rest[at + CRC_AT..at + CRC_FROM].copy_from_slice(&crc.to_be_bytes());
            }
        }
    }
    // Bit i (of 8, repeating) lists the transaction of batch i as aborted.
    let aborted: Vec<(i64, i64)> = whole
        .iter()
        .enumerate()
        .filter(|(i, _)| abort & (1 << (i % 8)) != 0)
        .filter_map(|(_, &(at, end))| {
            let batch = &rest[at..end];
            Some((be_i64(batch.get(PRODUCER_ID_AT..)?)?, be_i64(batch)?))
        })
        .collect();
    let from = i64::from(pick & 0x3);
    let fetched = untrusted::decode_fetched(Bytes::copy_from_slice(&rest), from);
    assert!(fetched.offsets.windows(2).all(|w| w[0] < w[1]), "offsets go up: {fetched:?}");
    let committed = untrusted::decode_fetched_read_committed(Bytes::copy_from_slice(&rest), from, &aborted);
    assert!(committed.offsets.windows(2).all(|w| w[0] < w[1]), "offsets go up: {committed:?}");
    assert!(committed.offsets.first().is_none_or(|&o| o >= from), "nothing before the fetch offset: {committed:?}");
    // Not "a subset of the plain decode's records": in an answer whose offsets go down
    // (tansu repeats batches), a record the plain decode skips as already passed may
    // be the first after a dropped transaction.
    assert_eq!((committed.next, &committed.unreadable), (fetched.next, &fetched.unreadable), "dropping aborted records moves the position as far");
    if let Ok(n) = untrusted::inflate(pick >> 4, &rest, 1 << 20) {
        assert!(n <= 1 << 20);
    }
});
