//! A partition's fetched record batches, decoded batch by batch (counts checked,
//! compressed batches inflated within a limit), and each codec's inflater on its own.
//! The first byte picks the fetch offset, the codec, and whether the first batch's
//! checksum is recomputed (so mutations get past it to the decoder); the rest is the
//! data.
#![no_main]

use bytes::Bytes;
use kafka_rpc::transport::kafka::untrusted;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [pick, rest @ ..] = data else { return };
    let mut rest = rest.to_vec();
    if pick & 0x4 != 0 && rest.len() >= 21 {
        // A v2 batch: base offset (8), length (4), leader epoch (4), magic (1), CRC (4)
        // over the rest of the batch.
        let len = i32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
        let end = usize::try_from(len).map_or(rest.len(), |l| (12 + l).min(rest.len()));
        if end > 21 {
            let crc = crc32c::crc32c(&rest[21..end]);
            rest[17..21].copy_from_slice(&crc.to_be_bytes());
        }
    }
    let fetched = untrusted::decode_fetched(Bytes::copy_from_slice(&rest), i64::from(pick & 0x3));
    assert!(fetched.offsets.windows(2).all(|w| w[0] < w[1]), "offsets go up: {fetched:?}");
    if let Ok(n) = untrusted::inflate(pick >> 4, &rest, 1 << 20) {
        assert!(n <= 1 << 20);
    }
});
