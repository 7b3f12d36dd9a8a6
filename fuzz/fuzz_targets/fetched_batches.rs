//! A partition's fetched record batches, decoded batch by batch (counts checked,
//! compressed batches inflated within a limit), and each codec's inflater on its own.
//! The first byte picks the fetch offset and the codec; the rest is the data.
#![no_main]

use bytes::Bytes;
use kafka_rpc::transport::kafka::untrusted;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [pick, rest @ ..] = data else { return };
    let fetched = untrusted::decode_fetched(Bytes::copy_from_slice(rest), i64::from(pick & 0x3));
    assert!(fetched.offsets.windows(2).all(|w| w[0] < w[1]), "offsets go up: {fetched:?}");
    if let Ok(n) = untrusted::inflate(pick >> 4, rest, 1 << 20) {
        assert!(n <= 1 << 20);
    }
});
