//! A topic that grows, on the embedded broker (which cannot add partitions): for tests of
//! what a client, server or window does when a topic is given more partitions.
#![allow(dead_code)]

use std::sync::atomic::{AtomicI32, Ordering};

use kafka_rpc::transport::embedded::EmbeddedBroker;
use kafka_rpc::transport::{GroupMembership, OffsetReset, PartitionReader, ProduceError, Record, Transport, TransportError};

/// The embedded broker, except that it reports `topic` with at most `reported`
/// partitions; raise `reported` to grow it.
pub struct Growing {
    pub inner: EmbeddedBroker,
    pub topic: String,
    pub reported: AtomicI32,
}

impl Growing {
    pub fn new(inner: EmbeddedBroker, topic: impl Into<String>, reported: i32) -> Self {
        Growing { inner, topic: topic.into(), reported: reported.into() }
    }

    /// Shows every partition the broker holds.
    pub fn grow(&self) {
        self.reported.store(i32::MAX, Ordering::SeqCst);
    }

    fn count(&self, topic: &str, real: i32) -> i32 {
        if topic == self.topic {
            real.min(self.reported.load(Ordering::SeqCst))
        } else {
            real
        }
    }
}

#[async_trait::async_trait]
impl Transport for Growing {
    async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<i32, TransportError> {
        let real = self.inner.ensure_topic(topic, partitions).await?;
        Ok(self.count(topic, real))
    }
    async fn partition_count(&self, topic: &str) -> Result<i32, TransportError> {
        let real = self.inner.partition_count(topic).await?;
        Ok(self.count(topic, real))
    }
    async fn produce(&self, topic: &str, partition: i32, records: Vec<Record>) -> Result<i64, ProduceError> {
        self.inner.produce(topic, partition, records).await
    }
    async fn latest_offset(&self, topic: &str, partition: i32) -> Result<i64, TransportError> {
        self.inner.latest_offset(topic, partition).await
    }
    async fn reader(&self, topic: &str, partition: i32) -> Result<Box<dyn PartitionReader>, TransportError> {
        self.inner.reader(topic, partition).await
    }
    async fn join_group(&self, group: &str, topics: &[String], reset: OffsetReset) -> Result<GroupMembership, TransportError> {
        self.inner.join_group(group, topics, reset).await
    }
}
