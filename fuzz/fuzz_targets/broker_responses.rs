//! Broker responses as a Kafka connection decodes them: checked against their
//! message's shape, then decoded by kafka-protocol. The first two bytes pick the
//! message and version; the third picks the mode: even, the rest is the body; odd,
//! the rest is `(position u16, byte)` edits applied to a well-formed sample, so
//! mutations reach deep into valid structure.
#![no_main]

use bytes::Bytes;
use kafka_rpc::transport::kafka::untrusted;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [a, b, mode, rest @ ..] = data else { return };
    let described = untrusted::described_responses();
    let (key, version) = described[usize::from(u16::from_be_bytes([*a, *b])) % described.len()];
    let body = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let Some(mut sample) = untrusted::sample_response(key, version) else { return };
        for edit in rest.chunks_exact(3) {
            let at = usize::from(u16::from_be_bytes([edit[0], edit[1]]));
            if sample.is_empty() {
                break;
            }
            let len = sample.len();
            sample[at % len] = edit[2];
        }
        sample
    };
    let _ = untrusted::decode_response(key, version, Bytes::from(body));
});
