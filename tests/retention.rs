//! The embedded broker's retention bound is a bound on its memory: what a partition
//! holds after a produce is about its `retention_bytes`, however large the batch was.
//!
//! Memory is measured by a counting global allocator, per thread, around a produce on
//! a current-thread runtime (so the append and its evictions run on this thread).

use kafka_rpc::transport::embedded::EmbeddedBroker;
use kafka_rpc::transport::{Record, Transport};
use kafka_rpc_testkit::alloc::{live_bytes, Counting};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const RETENTION: usize = 64 << 10;

/// Produces the batch `make` builds into a fresh partition kept to [`RETENTION`] bytes;
/// returns how many records it kept and how many bytes it holds afterwards (the batch is
/// built after the first reading, so what the produce frees of it cancels out).
fn kept_and_held(make: impl FnOnce() -> Vec<Record>) -> (i64, usize) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let broker = EmbeddedBroker::builder().retention_bytes(RETENTION).build();
        broker.ensure_topic("t", 1).await.expect("create");
        let before = live_bytes();
        broker.produce("t", 0, make()).await.expect("produce");
        let held = (live_bytes() - before) as usize;
        let kept = broker.latest_offset("t", 0).await.expect("exists") - broker.log_start_offset("t", 0).expect("exists");
        (kept, held)
    })
}

#[test]
fn a_batch_larger_than_retention_is_not_kept_whole() {
    // 2 MB of small records, thirty times what the partition keeps.
    let (kept, held) = kept_and_held(|| (0..2_000).map(|i| Record::new(None::<Vec<u8>>, vec![i as u8; 1_000])).collect());
    assert!(kept < 100, "retention keeps the newest ~64 KiB of the batch, kept {kept} records");
    // The kept records, a packed buffer's worth of slack, and the log's slots.
    assert!(held < 3 * RETENTION, "the partition holds {held} bytes after the produce, retention is {RETENTION}");
}

#[test]
fn a_batch_of_many_small_records_leaves_no_slots_behind() {
    // 200,000 one-byte records: retention keeps a few hundred of them.
    let (kept, held) = kept_and_held(|| (0..200_000).map(|i| Record::new(None::<Vec<u8>>, vec![i as u8])).collect());
    assert!(kept < 1_000, "retention keeps the newest ~64 KiB of the batch, kept {kept} records");
    assert!(held < 3 * RETENTION, "the partition holds {held} bytes after the produce, retention is {RETENTION}");
}
