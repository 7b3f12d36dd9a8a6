//! The request topic's partition count, looked up again as Kafka's producers refresh
//! their metadata (`metadata.max.age.ms`, 5 minutes by default).
//!
//! A key's partition is `murmur2(key) % partitions`. When a topic grows, a Java or Node
//! producer sends a key to its new partition within that time; a client that kept its
//! start-up count would send it to the old one for good, and the updates of one key
//! from two services would land on two partitions, out of order with each other.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::transport::Transport;

/// How old the count may get: Kafka's default `metadata.max.age.ms`.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(5 * 60);

/// Looks `topic`'s partition count up every [`MAX_AGE`] into `count`, until stop. A
/// failed look-up, or a count below 1 (a topic being recreated), keeps the last count.
pub(crate) async fn refresh(transport: Arc<dyn Transport>, topic: String, count: Arc<AtomicI32>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            biased;
            () = crate::stop::requested(&mut stop) => return,
            () = tokio::time::sleep(MAX_AGE) => {}
        }
        // Stop ends a look-up too: a broker that does not answer must not hold `shutdown`.
        let looked_up = tokio::select! {
            biased;
            () = crate::stop::requested(&mut stop) => return,
            looked_up = transport.partition_count(&topic) => looked_up,
        };
        match looked_up {
            Ok(now) if now > 0 => {
                let before = count.swap(now, Ordering::Relaxed);
                if before != now {
                    tracing::info!(%topic, before, now, "the request topic's partition count changed; keys follow it");
                }
            }
            Ok(now) => tracing::warn!(%topic, now, "the request topic lists no partitions; keeping the last count"),
            Err(e) => tracing::debug!(%topic, error = %e, "partition count look-up failed; keeping the last count"),
        }
    }
}
