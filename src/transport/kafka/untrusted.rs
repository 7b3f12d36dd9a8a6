//! The Kafka transport's decoders of untrusted bytes, reachable from outside the
//! crate for its property tests (`tests/decoders.rs`) and fuzz targets (`fuzz/`).
//!
//! Not part of the API: hidden from the documentation and free to change in any
//! release. Each function runs the same code the transport runs on bytes from the
//! network or from other group members, and returns a summary of what it decoded.

use bytes::Bytes;

/// A broker response body (after its header) to API `key` at `version`, checked
/// and decoded as a connection does. `Ok` carries the decoded message's debug text
/// length, so callers can tell what was decoded without naming its type.
pub fn decode_response(key: i16, version: i16, body: Bytes) -> Result<usize, String> {
    super::guard::decode(key, version, body).map(|m| format!("{m:?}").len())
}

/// The API keys and versions whose responses [`decode_response`] decodes.
pub fn described_responses() -> Vec<(i16, i16)> {
    super::guard::described()
}

/// A well-formed response body to API `key` at `version`, with arrays of two
/// elements and every known tagged field: a seed for mutation.
pub fn sample_response(key: i16, version: i16) -> Option<Vec<u8>> {
    super::guard::sample(key, version).map(|(bytes, _)| bytes)
}

/// Another member's subscription (consumer protocol), as the group leader decodes
/// it: the topics it names.
pub fn decode_subscription(data: Bytes) -> Result<Vec<String>, String> {
    super::group::decode_subscription(data).map_err(|e| e.to_string())
}

/// An assignment from the group leader, as a member decodes it.
pub fn decode_assignment(data: Bytes) -> Result<Vec<(String, i32)>, String> {
    super::group::decode_assignment(data).map_err(|e| e.to_string())
}

/// What [`decode_fetched`] found in a partition's fetched bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedSummary {
    /// Offsets of the readable records, in order.
    pub offsets: Vec<i64>,
    /// Each skipped batch: its offsets `from..to` and why it was skipped.
    pub unreadable: Vec<(i64, i64, String)>,
    /// Where the next fetch starts.
    pub next: i64,
}

/// One partition's record batches from a fetch answer, decoded from offset `from`.
pub fn decode_fetched(data: Bytes, from: i64) -> FetchedSummary {
    decode_fetched_read_committed(data, from, &[])
}

/// [`decode_fetched`] as a read-committed reader decodes an answer that lists `aborted`
/// transactions, each as (producer id, first offset): their records are dropped.
pub fn decode_fetched_read_committed(data: Bytes, from: i64, aborted: &[(i64, i64)]) -> FetchedSummary {
    let aborted: Vec<_> = aborted
        .iter()
        .map(|&(producer_id, first_offset)| super::record_batch::decode::AbortedTransaction { producer_id, first_offset })
        .collect();
    let f = super::record_batch::decode::decode_partition(0, data, from, &aborted);
    FetchedSummary {
        offsets: f.records.iter().map(|r| r.offset).collect(),
        unreadable: f.unreadable.into_iter().map(|u| (u.from, u.to, u.reason)).collect(),
        next: f.next,
    }
}

/// The most bytes a fetched batch may inflate to before it is skipped as unreadable.
pub const MAX_INFLATED: usize = super::inflate::MAX_INFLATED;

/// Inflates `data` as a batch compressed with Kafka codec `codec` (the low three bits
/// of a batch's attributes: 0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd), refusing more
/// than `limit` bytes. `Ok` carries the inflated length.
pub fn inflate(codec: u8, data: &[u8], limit: usize) -> Result<usize, String> {
    use kafka_protocol::records::Compression;
    let compression = match codec & 0x7 {
        0 => Compression::None,
        1 => Compression::Gzip,
        2 => Compression::Snappy,
        3 => Compression::Lz4,
        4 => Compression::Zstd,
        other => return Err(format!("unknown compression {other}")),
    };
    super::inflate::inflate(compression, data, limit).map(|b| b.len())
}
