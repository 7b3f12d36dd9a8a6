//! Request and reply header decoding (`kafka_rpc::wire`) on records whose headers come
//! from the input: `[name length u8][name][value length u8][value]` repeated, the
//! rest the value.
#![no_main]

use bytes::Bytes;
use kafka_rpc::transport::{Header, Record};
use kafka_rpc::wire::{self, names};
use libfuzzer_sys::fuzz_target;

/// Names the decoders react to, picked by a name length byte above 0xF0.
const NAMES: [&str; 9] = [
    names::CORRELATION_ID,
    names::REPLY_TOPIC,
    names::REPLY_PARTITION,
    names::TYPE,
    names::CONTENT_TYPE,
    names::DEADLINE,
    names::ERROR_CODE,
    names::ERROR_MESSAGE,
    names::NEST_ERROR,
];

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut headers = Vec::new();
    while let Some((&n, tail)) = rest.split_first() {
        let (name, tail) = if n >= 0xF0 {
            (NAMES[usize::from(n - 0xF0) % NAMES.len()].to_string(), tail)
        } else {
            let n = usize::from(n).min(tail.len());
            (String::from_utf8_lossy(&tail[..n]).into_owned(), &tail[n..])
        };
        let Some((&v, tail)) = tail.split_first() else { break };
        let v = usize::from(v).min(tail.len());
        headers.push(Header { key: name.into(), value: Bytes::copy_from_slice(&tail[..v]) });
        rest = &tail[v..];
        if headers.len() >= 32 {
            break;
        }
    }
    let record = Record {
        key: None,
        value: Some(Bytes::copy_from_slice(rest)),
        headers,
        timestamp_ms: 0,
    };
    let _ = wire::decode_request(&record);
    let _ = wire::decode_reply(&record);
    let _ = wire::reply_correlation_id(&record);
});
