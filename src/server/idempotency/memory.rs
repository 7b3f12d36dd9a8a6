//! The window itself: recent replies per partition, bounded by count and age, in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use super::{IdempotencyStore, StoreError, StoredReply};
use crate::clock::now_ms;
use crate::transport::TopicPartition;

/// Default number of replies kept per partition.
const DEFAULT_CAPACITY: usize = 10_000;
/// Default age after which a reply leaves the window.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);

/// The replies of the last [`capacity`](Self::capacity) requests per partition that
/// are younger than [`max_age`](Self::max_age), in this process's memory.
///
/// Not restart-safe: a server that restarts starts with an empty window, so records
/// redelivered after a crash run again. Use [`KafkaWindow`](super::KafkaWindow) for a
/// window that survives restarts. Memory is bounded by `capacity` × the partitions
/// this server has served × the size of a reply.
pub struct MemoryWindow {
    capacity: usize,
    max_age_ms: i64,
    partitions: Mutex<HashMap<TopicPartition, Partition>>,
}

/// One partition's window: keys in the order they were recorded, oldest first.
#[derive(Default)]
struct Partition {
    replies: HashMap<Bytes, (StoredReply, i64)>,
    order: VecDeque<(Bytes, i64)>,
}

impl Default for MemoryWindow {
    fn default() -> Self {
        MemoryWindow::new()
    }
}

impl MemoryWindow {
    /// A window of 10,000 replies per partition, an hour old at most.
    pub fn new() -> Self {
        MemoryWindow {
            capacity: DEFAULT_CAPACITY,
            max_age_ms: DEFAULT_MAX_AGE.as_millis() as i64,
            partitions: Mutex::new(HashMap::new()),
        }
    }

    /// How many replies each partition keeps (at least 1); the oldest leaves first.
    pub fn capacity(mut self, replies: usize) -> Self {
        self.capacity = replies.max(1);
        self
    }

    /// How long a reply stays in the window.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        self
    }

    pub(crate) fn capacity_per_partition(&self) -> usize {
        self.capacity
    }

    pub(crate) fn max_age_ms(&self) -> i64 {
        self.max_age_ms
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, Partition>> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reply for `key`, unless it is older than the window.
    pub(crate) fn get(&self, tp: &TopicPartition, key: &[u8]) -> Option<StoredReply> {
        self.get_at(tp, key, now_ms())
    }

    fn get_at(&self, tp: &TopicPartition, key: &[u8], now: i64) -> Option<StoredReply> {
        let partitions = self.locked();
        let (reply, at) = partitions.get(tp)?.replies.get(key)?;
        (now.saturating_sub(*at) <= self.max_age_ms).then(|| reply.clone())
    }

    /// Adds `key` recorded at `at_ms`, unless it is already there (the first reply
    /// wins), and drops what the bounds push out.
    pub(crate) fn insert(&self, tp: &TopicPartition, key: Bytes, reply: StoredReply, at_ms: i64) {
        self.insert_at(tp, key, reply, at_ms, now_ms())
    }

    fn insert_at(&self, tp: &TopicPartition, key: Bytes, reply: StoredReply, at_ms: i64, now: i64) {
        if now.saturating_sub(at_ms) > self.max_age_ms {
            return;
        }
        let mut partitions = self.locked();
        let partition = match partitions.get_mut(tp) {
            Some(p) => p,
            None => partitions.entry(tp.clone()).or_default(),
        };
        if let Some((_, at)) = partition.replies.get(&key) {
            if now.saturating_sub(*at) <= self.max_age_ms {
                return;
            }
            // Aged out but not yet evicted: the request ran again, and this is its reply.
            partition.replies.remove(&key);
            partition.order.retain(|(k, _)| *k != key);
        }
        partition.replies.insert(key.clone(), (reply, at_ms));
        partition.order.push_back((key, at_ms));
        while let Some((oldest, at)) = partition.order.front() {
            let too_many = partition.order.len() > self.capacity;
            let too_old = now.saturating_sub(*at) > self.max_age_ms;
            if !too_many && !too_old {
                break;
            }
            partition.replies.remove(oldest);
            partition.order.pop_front();
        }
    }

    /// Drops the window of `tp`.
    pub(crate) fn forget(&self, tp: &TopicPartition) {
        self.locked().remove(tp);
    }

    /// Replies held for `tp`.
    #[cfg(test)]
    fn len(&self, tp: &TopicPartition) -> usize {
        self.locked().get(tp).map_or(0, |p| p.replies.len())
    }
}

#[async_trait]
impl IdempotencyStore for MemoryWindow {
    async fn lookup(&self, partition: &TopicPartition, key: &[u8]) -> Result<Option<StoredReply>, StoreError> {
        Ok(self.get(partition, key))
    }

    fn record(&self, partition: &TopicPartition, key: Bytes, reply: StoredReply) -> BoxFuture<'static, Result<(), StoreError>> {
        self.insert(partition, key, reply, now_ms());
        futures::future::ready(Ok(())).boxed()
    }

    // `release` keeps the window: it is still true if the partition comes back, and
    // the capacity bounds it.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::ContentType;

    fn reply(n: u8) -> StoredReply {
        StoredReply::new(ContentType::Bincode, Ok(Bytes::from(vec![n])))
    }

    fn tp() -> TopicPartition {
        TopicPartition::new("t", 0)
    }

    #[test]
    fn the_oldest_key_leaves_when_the_window_is_full() {
        let w = MemoryWindow::new().capacity(2);
        for (k, n) in [(&b"a"[..], 1), (b"b", 2), (b"c", 3)] {
            w.insert(&tp(), Bytes::copy_from_slice(k), reply(n), now_ms());
        }
        assert_eq!(w.get(&tp(), b"a"), None, "pushed out by c");
        assert_eq!(w.get(&tp(), b"b"), Some(reply(2)));
        assert_eq!(w.get(&tp(), b"c"), Some(reply(3)));
        assert_eq!(w.len(&tp()), 2);
    }

    #[test]
    fn replies_older_than_the_window_are_not_answered_or_kept() {
        let w = MemoryWindow::new().max_age(Duration::from_secs(60));
        let t0 = 1_000_000;
        w.insert_at(&tp(), Bytes::from_static(b"old"), reply(1), t0 - 60_001, t0);
        assert_eq!(w.len(&tp()), 0, "a reply already too old is not stored");
        w.insert_at(&tp(), Bytes::from_static(b"aging"), reply(2), t0, t0);
        assert_eq!(w.get_at(&tp(), b"aging", t0 + 60_000), Some(reply(2)), "still inside the window");
        // Ages out while it sits there: a lookup no longer answers it, the next insert drops it.
        assert_eq!(w.get_at(&tp(), b"aging", t0 + 60_001), None);
        w.insert_at(&tp(), Bytes::from_static(b"new"), reply(3), t0 + 60_001, t0 + 60_001);
        assert_eq!(w.len(&tp()), 1);
    }

    /// A key that aged out but was not yet evicted (nothing was inserted on the
    /// partition since it expired) runs again, as documented; its new reply must then
    /// be recorded, or a redelivery of that second run runs a third time.
    #[test]
    fn a_key_that_runs_again_after_expiring_is_recorded_again() {
        let w = MemoryWindow::new().max_age(Duration::from_secs(60));
        let t0 = 1_000_000;
        w.insert_at(&tp(), Bytes::from_static(b"k"), reply(1), t0, t0);
        let t1 = t0 + 60_001;
        assert_eq!(w.get_at(&tp(), b"k", t1), None, "aged out: the request runs again");
        // Its (second) first run is recorded...
        w.insert_at(&tp(), Bytes::from_static(b"k"), reply(2), t1, t1);
        // ...and a redelivery of it a moment later must be answered from the window.
        assert_eq!(w.get_at(&tp(), b"k", t1 + 1), Some(reply(2)), "the re-run's reply must be in the window");
    }

    #[test]
    fn the_first_reply_wins_and_partitions_are_separate() {
        let w = MemoryWindow::new();
        w.insert(&tp(), Bytes::from_static(b"k"), reply(1), now_ms());
        w.insert(&tp(), Bytes::from_static(b"k"), reply(2), now_ms());
        assert_eq!(w.get(&tp(), b"k"), Some(reply(1)));
        assert_eq!(w.get(&TopicPartition::new("t", 1), b"k"), None);
        w.forget(&tp());
        assert_eq!(w.get(&tp(), b"k"), None);
    }
}
