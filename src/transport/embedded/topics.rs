//! The broker's topics: names mapped to their partition logs.

use std::sync::Arc;

use dashmap::DashMap;

use super::log::PartitionLog;
use crate::transport::{TopicPartition, TransportError};

/// All topics of one broker. Shared by the broker and its group coordinators, which
/// need partition counts and log bounds to build assignments.
#[derive(Debug)]
pub(crate) struct TopicRegistry {
    /// Sharded so that produces to different topics do not serialise on one lock;
    /// only topic creation takes a write lock.
    topics: DashMap<String, Box<[Arc<PartitionLog>]>>,
    /// Bytes each partition keeps.
    retention_bytes: usize,
}

impl TopicRegistry {
    /// An empty registry whose partitions keep `retention_bytes` bytes each.
    pub(crate) fn new(retention_bytes: usize) -> Self {
        TopicRegistry { topics: DashMap::new(), retention_bytes }
    }

    /// Creates `topic` with `partitions` partitions unless it exists; returns the
    /// actual partition count.
    pub(crate) fn ensure(&self, topic: &str, partitions: i32) -> Result<i32, TransportError> {
        if let Some(existing) = self.topics.get(topic) {
            return Ok(existing.len() as i32);
        }
        if topic.is_empty() {
            return Err(TransportError::TopicCreation { topic: topic.to_owned(), reason: "empty topic name".into() });
        }
        // A huge count would allocate a log per partition and abort the process.
        crate::transport::check_partition_count(topic, partitions)?;
        // The entry API makes a concurrent creation of the same topic keep one winner.
        let entry = self.topics.entry(topic.to_owned()).or_insert_with(|| {
            (0..partitions)
                .map(|p| Arc::new(PartitionLog::new(TopicPartition::new(topic, p), self.retention_bytes)))
                .collect()
        });
        Ok(entry.len() as i32)
    }

    /// Partition count of an existing topic.
    pub(crate) fn partition_count(&self, topic: &str) -> Result<i32, TransportError> {
        self.topics.get(topic).map(|t| t.len() as i32).ok_or_else(|| TransportError::UnknownTopic(topic.to_owned()))
    }

    /// Runs `f` on one partition's log without cloning its `Arc` (the produce path).
    pub(crate) fn with_log<R>(
        &self,
        topic: &str,
        partition: i32,
        f: impl FnOnce(&Arc<PartitionLog>) -> R,
    ) -> Result<R, TransportError> {
        let partitions = self.topics.get(topic).ok_or_else(|| TransportError::UnknownTopic(topic.to_owned()))?;
        let log = usize::try_from(partition)
            .ok()
            .and_then(|p| partitions.get(p))
            .ok_or_else(|| TransportError::UnknownPartition { topic: topic.to_owned(), partition })?;
        Ok(f(log))
    }

    /// A shared handle on one partition's log, for readers that keep it.
    pub(crate) fn log(&self, topic: &str, partition: i32) -> Result<Arc<PartitionLog>, TransportError> {
        self.with_log(topic, partition, Arc::clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_creates_once_and_reports_the_existing_count() {
        let registry = TopicRegistry::new(10);
        assert_eq!(registry.ensure("a", 3).expect("create"), 3);
        assert_eq!(registry.ensure("a", 7).expect("exists"), 3);
        assert_eq!(registry.partition_count("a").expect("exists"), 3);
    }

    #[test]
    fn invalid_creations_are_refused() {
        let registry = TopicRegistry::new(10);
        assert!(matches!(registry.ensure("a", 0), Err(TransportError::TopicCreation { .. })));
        assert!(matches!(registry.ensure("a", i32::MAX), Err(TransportError::TopicCreation { .. })));
        assert!(matches!(registry.ensure("", 1), Err(TransportError::TopicCreation { .. })));
        assert!(matches!(registry.partition_count("a"), Err(TransportError::UnknownTopic(t)) if t == "a"));
    }

    #[test]
    fn lookups_check_topic_and_partition() {
        let registry = TopicRegistry::new(10);
        registry.ensure("a", 2).expect("create");
        assert_eq!(registry.log("a", 1).expect("exists").topic_partition(), &TopicPartition::new("a", 1));
        assert!(matches!(registry.log("b", 0), Err(TransportError::UnknownTopic(_))));
        for bad in [-1, 2] {
            match registry.log("a", bad) {
                Err(TransportError::UnknownPartition { topic, partition }) => {
                    assert_eq!((topic.as_str(), partition), ("a", bad))
                }
                other => panic!("partition {bad} should be unknown, got {other:?}"),
            }
        }
    }
}
