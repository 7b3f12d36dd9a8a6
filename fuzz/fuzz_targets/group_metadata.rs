//! Consumer-protocol group metadata from other members: subscriptions (decoded by the
//! group leader) and assignments (decoded by each member).
#![no_main]

use bytes::Bytes;
use kafka_rpc::transport::kafka::untrusted;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = untrusted::decode_subscription(Bytes::copy_from_slice(data));
    let _ = untrusted::decode_assignment(Bytes::copy_from_slice(data));
});
