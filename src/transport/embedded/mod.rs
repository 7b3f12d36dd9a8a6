//! An in-process broker with Kafka's semantics: the default [`Transport`], and a test
//! broker that needs no cluster (like Spring's `EmbeddedKafka`).
//!
//! Topics are split into partitions; each partition is an append-only log whose
//! offsets start at 0. Readers long-poll: a fetch at the end of the log waits until a
//! record is appended or its `max_wait` runs out. Each partition keeps a bounded
//! number of bytes of records (see [`EmbeddedBrokerBuilder::retention_bytes`]); reading
//! before the log start fails with
//! [`OffsetOutOfRange`](TransportError::OffsetOutOfRange), which names where to resume.
//!
//! Consumer groups follow Kafka's classic eager protocol with range assignment: when a
//! member joins or leaves, every member is sent
//! [`Revoked`](crate::transport::GroupEvent::Revoked) and must stop, commit and answer
//! before anyone gets the new [`Assigned`](crate::transport::GroupEvent::Assigned)
//! partitions. Dropping a membership's event receiver counts as leaving; dropping a
//! `done` sender unanswered counts as answering; a member that does neither within
//! the [rebalance timeout](EmbeddedBrokerBuilder::rebalance_timeout) is expelled: its
//! partitions go to the others at once, and once it answers (or one more rebalance
//! timeout later, when its `done` closes) it rejoins under a new member id on the same
//! event stream, as a Kafka consumer the broker expelled rejoins. A member may commit
//! only partitions it owns or is being asked to give up, and commits from a member that
//! left, or was expelled and has not rejoined, fail with [`TransportError::Group`], so a
//! stalled server cannot overwrite its successor's progress.
//!
//! ```
//! use kafka_rpc::transport::embedded::EmbeddedBroker;
//! use kafka_rpc::transport::{GroupEvent, OffsetReset, Record, TopicPartition, Transport};
//! use std::time::Duration;
//!
//! # #[tokio::main] async fn main() -> Result<(), kafka_rpc::transport::TransportError> {
//! let broker = EmbeddedBroker::new();
//! broker.ensure_topic("jobs", 2).await?;
//!
//! // A batch is appended atomically; the first record of an empty log gets offset 0.
//! let first = broker.produce("jobs", 0, vec![Record::new(Some("k"), "a"), Record::new(Some("k"), "b")]).await?;
//! assert_eq!(first, 0);
//!
//! // A group member learns which partitions it owns and where to resume each one.
//! let mut member = broker.join_group("workers", &["jobs".to_string()], OffsetReset::Earliest).await?;
//! let Some(GroupEvent::Assigned(owned)) = member.events.recv().await else { panic!("expected an assignment") };
//! assert_eq!(owned.len(), 2);
//! assert_eq!((owned[0].tp.partition, owned[0].offset), (0, 0));
//!
//! let mut reader = broker.reader("jobs", 0).await?;
//! let records = reader.fetch(owned[0].offset, Duration::from_secs(1)).await?;
//! assert_eq!(records.len(), 2);
//!
//! // Commit the next offset to read; the partition's next owner starts there.
//! member.handle.commit(&[(TopicPartition::new("jobs", 0), 2)]).await?;
//! assert_eq!(broker.committed_offset("workers", &TopicPartition::new("jobs", 0)), Some(2));
//! # Ok(()) }
//! ```

mod assign;
mod builder;
mod group;
mod log;
mod reader;
mod topics;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

pub use builder::{EmbeddedBrokerBuilder, DEFAULT_RETENTION_BYTES};
use group::Group;
use reader::EmbeddedReader;
use topics::TopicRegistry;

use crate::transport::{
    GroupMembership, OffsetReset, PartitionReader, ProduceError, Record, TopicPartition, Transport, TransportError,
};

/// An in-process broker. Clones share the same topics and groups, so hand a clone to
/// every client and server that should talk to each other.
#[derive(Clone)]
pub struct EmbeddedBroker {
    inner: Arc<Inner>,
}

struct Inner {
    topics: Arc<TopicRegistry>,
    /// Touched only when joining and inspecting, never on produce or fetch.
    groups: Mutex<HashMap<String, Arc<Group>>>,
    max_fetch_records: usize,
    rebalance_timeout: Duration,
    /// Kept to refuse zero when a topic is created (see `ensure_topic`).
    retention_bytes: usize,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("max_fetch_records", &self.inner.max_fetch_records)
            .field("rebalance_timeout", &self.inner.rebalance_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for EmbeddedBroker {
    fn default() -> Self {
        EmbeddedBroker::new()
    }
}

impl EmbeddedBroker {
    /// A broker with default settings: [`DEFAULT_RETENTION_BYTES`] (4 MiB) retained per
    /// partition, up to 1024 records per fetch, and a 10 s rebalance timeout.
    pub fn new() -> Self {
        EmbeddedBrokerBuilder::default().build()
    }

    /// Starts configuring a broker with non-default settings.
    pub fn builder() -> EmbeddedBrokerBuilder {
        EmbeddedBrokerBuilder::default()
    }

    fn from_builder(config: EmbeddedBrokerBuilder) -> Self {
        EmbeddedBroker {
            inner: Arc::new(Inner {
                topics: Arc::new(TopicRegistry::new(config.retention_bytes)),
                groups: Mutex::new(HashMap::new()),
                max_fetch_records: config.max_fetch_records,
                rebalance_timeout: config.rebalance_timeout,
                retention_bytes: config.retention_bytes,
            }),
        }
    }

    /// The oldest offset still retained in a partition; reads below it fail.
    pub fn log_start_offset(&self, topic: &str, partition: i32) -> Result<i64, TransportError> {
        self.inner.topics.with_log(topic, partition, |log| log.start_offset())
    }

    /// The offset group `group` committed for `tp`, or `None` if it never committed one
    /// (or the group does not exist).
    pub fn committed_offset(&self, group: &str, tp: &TopicPartition) -> Option<i64> {
        self.group(group)?.committed(tp)
    }

    /// Member ids of group `group`, in id order (the order range assignment follows);
    /// empty if the group does not exist. Ids sort in join order.
    pub fn group_members(&self, group: &str) -> Vec<String> {
        self.group(group).map(|g| g.members()).unwrap_or_default()
    }

    fn group(&self, group: &str) -> Option<Arc<Group>> {
        self.inner.groups.lock().unwrap_or_else(PoisonError::into_inner).get(group).cloned()
    }
}

#[async_trait]
impl Transport for EmbeddedBroker {
    async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<i32, TransportError> {
        // Refused here, where topics begin, since building the broker cannot fail: a log
        // keeping no bytes drops each record as soon as the next one arrives (the newest
        // is always kept), so a reader one record behind loses it and requests and
        // replies vanish under any concurrency.
        if self.inner.retention_bytes == 0 {
            return Err(crate::error::ConfigError::new(
                "retention_bytes",
                "zero would drop every record as soon as the next one arrives; give the bytes a partition keeps",
            )
            .into());
        }
        self.inner.topics.ensure(topic, partitions)
    }

    async fn partition_count(&self, topic: &str) -> Result<i32, TransportError> {
        self.inner.topics.partition_count(topic)
    }

    async fn produce(&self, topic: &str, partition: i32, records: Vec<Record>) -> Result<i64, ProduceError> {
        // `with_log` fails only before calling the closure, so the records are still here.
        let mut records = Some(records);
        self.inner
            .topics
            .with_log(topic, partition, |log| log.append(records.take().unwrap_or_default()))
            .map_err(|e| ProduceError::new(e, records.take().unwrap_or_default()))
    }

    async fn latest_offset(&self, topic: &str, partition: i32) -> Result<i64, TransportError> {
        self.inner.topics.with_log(topic, partition, |log| log.high_watermark())
    }

    async fn reader(&self, topic: &str, partition: i32) -> Result<Box<dyn PartitionReader>, TransportError> {
        let log = self.inner.topics.log(topic, partition)?;
        Ok(Box::new(EmbeddedReader::new(log, self.inner.max_fetch_records)))
    }

    async fn join_group(
        &self,
        group_id: &str,
        topics: &[String],
        reset: OffsetReset,
    ) -> Result<GroupMembership, TransportError> {
        if group_id.is_empty() {
            return Err(TransportError::group("", "empty group id"));
        }
        // Refused here, the first use, since building the broker cannot fail: a member
        // cannot stop its work and commit in no time, so every revocation would expel it.
        if self.inner.rebalance_timeout.is_zero() {
            return Err(crate::error::ConfigError::new(
                "rebalance_timeout",
                "zero would expel every member at its first revocation; give the time a member needs to hand partitions over",
            )
            .into());
        }
        for topic in topics {
            self.inner.topics.partition_count(topic)?;
        }
        let group =
            {
                let mut groups = self.inner.groups.lock().unwrap_or_else(PoisonError::into_inner);
                Arc::clone(groups.entry(group_id.to_owned()).or_insert_with(|| {
                    Group::new(group_id, Arc::clone(&self.inner.topics), self.inner.rebalance_timeout)
                }))
            };
        group.join(topics, reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{timeout, Instant};

    const PATIENCE: Duration = Duration::from_secs(5);

    fn rec(value: &str) -> Record {
        Record::new(None::<Vec<u8>>, value.as_bytes().to_vec())
    }

    fn value(r: &crate::transport::ConsumedRecord) -> &[u8] {
        r.record.value.as_deref().unwrap_or_default()
    }

    #[tokio::test]
    async fn ensure_topic_is_idempotent() {
        let broker = EmbeddedBroker::new();
        assert_eq!(broker.ensure_topic("t", 3).await.expect("create"), 3);
        assert_eq!(broker.ensure_topic("t", 5).await.expect("exists"), 3, "the existing count wins");
        assert_eq!(broker.partition_count("t").await.expect("exists"), 3);
        let clone = broker.clone();
        assert_eq!(clone.partition_count("t").await.expect("clones share topics"), 3);
    }

    #[tokio::test]
    async fn partitions_have_independent_ordered_offsets() {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", 2).await.expect("create");
        assert_eq!(broker.produce("t", 0, vec![rec("a"), rec("b")]).await.expect("produce"), 0);
        assert_eq!(broker.produce("t", 1, vec![rec("x")]).await.expect("produce"), 0);
        assert_eq!(broker.produce("t", 0, vec![rec("c")]).await.expect("produce"), 2);
        assert_eq!(broker.latest_offset("t", 0).await.expect("exists"), 3);
        assert_eq!(broker.latest_offset("t", 1).await.expect("exists"), 1);
        assert_eq!(broker.log_start_offset("t", 0).expect("exists"), 0);

        let mut reader = broker.reader("t", 0).await.expect("reader");
        let got = reader.fetch(0, Duration::ZERO).await.expect("fetch");
        assert_eq!(got.iter().map(value).collect::<Vec<_>>(), [b"a", b"b", b"c"]);
        assert_eq!(got.iter().map(|r| (r.partition, r.offset)).collect::<Vec<_>>(), [(0, 0), (0, 1), (0, 2)]);
    }

    #[tokio::test]
    async fn unknown_topic_and_partition_are_errors() {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", 2).await.expect("create");
        assert!(
            matches!(broker.produce("nope", 0, vec![rec("a")]).await.map_err(TransportError::from), Err(TransportError::UnknownTopic(t)) if t == "nope")
        );
        assert!(matches!(broker.reader("nope", 0).await, Err(TransportError::UnknownTopic(_))));
        assert!(matches!(broker.latest_offset("nope", 0).await, Err(TransportError::UnknownTopic(_))));
        assert!(matches!(broker.partition_count("nope").await, Err(TransportError::UnknownTopic(_))));
        assert!(matches!(broker.log_start_offset("nope", 0), Err(TransportError::UnknownTopic(_))));
        assert!(matches!(
            broker.join_group("g", &["nope".to_owned()], OffsetReset::Earliest).await,
            Err(TransportError::UnknownTopic(_))
        ));
        for bad in [-1, 2] {
            assert!(matches!(
                broker.produce("t", bad, vec![rec("a")]).await.map_err(TransportError::from),
                Err(TransportError::UnknownPartition { partition, .. }) if partition == bad
            ));
            assert!(matches!(broker.reader("t", bad).await, Err(TransportError::UnknownPartition { .. })));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fetch_wakes_when_a_record_is_produced() {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", 1).await.expect("create");
        let mut reader = broker.reader("t", 0).await.expect("reader");
        let start = Instant::now();
        let waiting = tokio::spawn(async move { reader.fetch(0, Duration::from_secs(30)).await });
        // On this single-threaded runtime, yielding lets the fetch run until it parks.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the fetch should be waiting on an empty log");

        broker.produce("t", 0, vec![rec("hi")]).await.expect("produce");
        let got = timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the produce should wake the waiting fetch well before its 30 s max_wait")
            .expect("fetch task panicked")
            .expect("fetch failed");
        assert_eq!(got.iter().map(value).collect::<Vec<_>>(), [b"hi"]);
        assert!(start.elapsed() < Duration::from_secs(1), "woken without waiting out any timer");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wake_up_is_lost_between_threads() {
        const ROUNDS: i64 = 1_000;
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", 1).await.expect("create");
        let mut reader = broker.reader("t", 0).await.expect("reader");
        let (seen_tx, mut seen) = tokio::sync::mpsc::channel(1);
        // Ping-pong: each record is produced only after the previous one was read, so the
        // reader is at the end of the log, about to wait, whenever a produce races with it.
        let consumer = tokio::spawn(async move {
            for expected in 0..ROUNDS {
                let got = reader.fetch(expected, Duration::from_secs(30)).await?;
                assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), [expected]);
                if seen_tx.send(expected).await.is_err() {
                    break;
                }
            }
            Ok::<(), TransportError>(())
        });
        let run = async {
            for i in 0..ROUNDS {
                broker.produce("t", 0, vec![rec(&i.to_string())]).await.expect("produce");
                assert_eq!(seen.recv().await, Some(i), "consumer stopped early");
            }
        };
        // A lost wake-up would leave the consumer parked for its 30 s max_wait.
        timeout(Duration::from_secs(10), run).await.expect("consumer stalled: a wake-up was lost");
        timeout(PATIENCE, consumer)
            .await
            .expect("consumer did not finish")
            .expect("consumer panicked")
            .expect("fetch failed");
    }

    #[tokio::test(start_paused = true)]
    async fn fetch_returns_empty_after_max_wait() {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", 1).await.expect("create");
        broker.produce("t", 0, vec![rec("a")]).await.expect("produce");
        let mut reader = broker.reader("t", 0).await.expect("reader");
        let start = Instant::now();
        let got = timeout(Duration::from_secs(5), reader.fetch(1, Duration::from_millis(200)))
            .await
            .expect("fetch should give up after its max_wait")
            .expect("fetching at the high watermark is valid");
        assert!(got.is_empty(), "nothing was produced, got {got:?}");
        assert!(start.elapsed() >= Duration::from_millis(200), "returned before max_wait: {:?}", start.elapsed());
        assert!(reader.fetch(1, Duration::ZERO).await.expect("valid").is_empty());
    }

    #[tokio::test]
    async fn fetch_is_capped_at_max_fetch_records() {
        let broker = EmbeddedBroker::builder().max_fetch_records(2).build();
        broker.ensure_topic("t", 1).await.expect("create");
        broker.produce("t", 0, (0..5).map(|i| rec(&i.to_string())).collect()).await.expect("produce");
        let mut reader = broker.reader("t", 0).await.expect("reader");
        assert_eq!(reader.fetch(0, Duration::ZERO).await.expect("fetch").len(), 2);
        assert_eq!(reader.fetch(4, Duration::ZERO).await.expect("fetch").len(), 1);
    }

    #[tokio::test]
    async fn retention_moves_log_start_and_old_offsets_are_out_of_range() {
        // Room for three of the one-byte records below.
        let broker = EmbeddedBroker::builder().retention_bytes(3 * log::retained_size(&rec("0"))).build();
        broker.ensure_topic("t", 1).await.expect("create");
        for i in 0..5 {
            broker.produce("t", 0, vec![rec(&i.to_string())]).await.expect("produce");
        }
        assert_eq!(broker.log_start_offset("t", 0).expect("exists"), 2);
        assert_eq!(broker.latest_offset("t", 0).await.expect("exists"), 5);
        let mut reader = broker.reader("t", 0).await.expect("reader");
        match reader.fetch(0, Duration::ZERO).await {
            Err(TransportError::OffsetOutOfRange { tp, offset: 0, earliest: 2, latest: 5 }) => {
                assert_eq!(tp, TopicPartition::new("t", 0))
            }
            other => {
                panic!("offset 0 was dropped by retention; expected OffsetOutOfRange with earliest 2, got {other:?}")
            }
        }
        match reader.fetch(6, Duration::from_secs(30)).await {
            Err(TransportError::OffsetOutOfRange { offset: 6, earliest: 2, .. }) => {}
            other => panic!("offset 6 is past the high watermark 5, got {other:?}"),
        }
        let got = reader.fetch(2, Duration::ZERO).await.expect("log start is readable");
        assert_eq!(got.iter().map(value).collect::<Vec<_>>(), [b"2", b"3", b"4"]);
    }

    #[tokio::test]
    async fn keyed_records_land_on_the_partitioners_choice() {
        use crate::partitioner::partition_for_key;
        let broker = EmbeddedBroker::new();
        let partitions = broker.ensure_topic("t", 6).await.expect("create");
        for key in ["store-1", "store-2", "store-42"] {
            let p = partition_for_key(key.as_bytes(), partitions);
            let offset = broker.produce("t", p, vec![Record::new(Some(key), "v")]).await.expect("produce");
            let mut reader = broker.reader("t", p).await.expect("reader");
            let got = reader.fetch(offset, Duration::ZERO).await.expect("fetch");
            assert_eq!(got[0].record.key.as_deref(), Some(key.as_bytes()), "key {key} on partition {p}");
        }
    }
}
