//! The seam between kafka-rpc and a log broker.
//!
//! Client and server code speak only [`Transport`]; the [`embedded`] broker and the
//! Kafka transport both sit behind it, so the same request-reply code runs in a unit
//! test and against a real cluster.
//!
//! ```
//! use kafka_rpc::transport::{embedded::EmbeddedBroker, Record, Transport};
//! use std::time::Duration;
//!
//! # #[tokio::main] async fn main() -> Result<(), kafka_rpc::transport::TransportError> {
//! let broker = EmbeddedBroker::new();
//! broker.ensure_topic("orders", 3).await?;
//! let first = broker.produce("orders", 1, vec![Record::new(Some("store-7"), b"hello".to_vec())]).await?;
//! let mut reader = broker.reader("orders", 1).await?;
//! let fetched = reader.fetch(first, Duration::from_millis(10)).await?;
//! assert_eq!(fetched[0].record.value.as_deref(), Some(&b"hello"[..]));
//! # Ok(()) }
//! ```

pub mod embedded;
pub mod kafka;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// One record header: a name and raw bytes, as Kafka carries them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Header name. Borrowed for the fixed names kafka-rpc writes, so a record's
    /// headers cost no allocation for their names.
    pub key: Cow<'static, str>,
    /// Header value, uninterpreted.
    pub value: Bytes,
}

/// A record to append to, or read from, a partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// Partition key; `None` for keyless records.
    pub key: Option<Bytes>,
    /// Payload; `None` is a Kafka "null" value.
    pub value: Option<Bytes>,
    /// Headers in the order they were added.
    pub headers: Vec<Header>,
    /// Creation time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

impl Record {
    /// A record with the given key and value, no headers, stamped with the current time.
    pub fn new(key: Option<impl Into<Bytes>>, value: impl Into<Bytes>) -> Self {
        Record {
            key: key.map(Into::into),
            value: Some(value.into()),
            headers: Vec::new(),
            timestamp_ms: crate::clock::now_ms(),
        }
    }

    /// The value of the last header named `name`, as Kafka's `Headers.lastHeader` reads
    /// it: a forwarded record may carry an inherited header before its own (Spring's
    /// `ReplyingKafkaTemplate` appends its correlation id to the headers it is given).
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().rev().find(|h| h.key == name).map(|h| &h.value)
    }
}

/// A record as read back from a partition, with its position.
#[derive(Clone, Debug)]
pub struct ConsumedRecord {
    /// Partition the record was read from.
    pub partition: i32,
    /// The record's offset in that partition. Below `i64::MAX`, so `offset + 1`, where
    /// a reader goes on, always exists: the Kafka transport refuses a batch whose
    /// offsets could reach it (`record_batch::decode::check_records`), and the embedded broker's
    /// offsets count its appended records. A [`PartitionReader`] of another transport
    /// must keep this too.
    pub offset: i64,
    /// The record itself; shared so that fan-out to waiters does not copy it.
    pub record: Arc<Record>,
}

/// A topic name and partition number.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
}

impl TopicPartition {
    /// Names partition `partition` of `topic`.
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        TopicPartition { topic: topic.into(), partition }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.topic, self.partition)
    }
}

/// Where a group member starts a partition that has no committed offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OffsetReset {
    /// From the oldest retained record. The server default: requests sent before the
    /// server started are still served (their deadlines filter out stale ones).
    #[default]
    Earliest,
    /// From the next record appended.
    Latest,
}

/// A partition handed to a group member, with the offset to resume from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssignedPartition {
    /// The partition.
    pub tp: TopicPartition,
    /// Next offset to read: the committed offset, or the reset position.
    pub offset: i64,
}

/// A change of partition ownership, delivered to a group member in order.
#[derive(Debug)]
#[non_exhaustive]
pub enum GroupEvent {
    /// The member now owns these partitions (in addition to any it still holds).
    Assigned(Vec<AssignedPartition>),
    /// The member must stop reading these partitions, commit what it finished, and
    /// then send on `done`. The group waits for it (bounded by the rebalance timeout)
    /// so that two members never process one partition at the same time.
    Revoked {
        /// Partitions taken away.
        partitions: Vec<TopicPartition>,
        /// Completed by the member when it has stopped and committed.
        done: oneshot::Sender<()>,
    },
    /// The membership ended for a reason retrying cannot fix; no further events follow.
    Failed(TransportError),
}

/// A member's handle on its group: offset commits and leaving.
#[async_trait]
pub trait GroupHandle: Send + Sync {
    /// Records `offset` (the next offset to read, Kafka's convention) as committed for
    /// each partition.
    async fn commit(&self, offsets: &[(TopicPartition, i64)]) -> Result<(), TransportError>;
    /// Leaves the group so its partitions move to the remaining members at once.
    async fn leave(&self) -> Result<(), TransportError>;
}

/// Membership in a consumer group: a stream of ownership changes plus a handle.
pub struct GroupMembership {
    /// Assignment and revocation events, in order. Closed when the membership ends.
    pub events: mpsc::Receiver<GroupEvent>,
    /// Commits offsets and leaves the group.
    pub handle: Arc<dyn GroupHandle>,
}

impl std::fmt::Debug for GroupMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupMembership").finish_non_exhaustive()
    }
}

/// Reads one partition from a given offset. Each reader may hold its own broker
/// connection so that a long-polling fetch never delays produces or other partitions.
///
/// A reader that follows a partition asks next from [`Fetch::next_offset`], not from
/// one past its last record: offsets may hold nothing a reader hands out (a
/// transactional producer's commit and abort markers, batches that cannot be decoded),
/// and only the reader knows where they end. Kafka's own consumers move their position
/// past them the same way (KIP-98), so a committed offset can reach the log's end.
#[async_trait]
pub trait PartitionReader: Send {
    /// Records at or after `offset`, in offset order, and where the next read starts,
    /// waiting up to `max_wait` for at least one record. Returns without records once
    /// the offsets from `offset` held nothing to hand out (`next_offset` then past
    /// them), or when nothing arrived in time (`next_offset` then `offset`).
    async fn read(&mut self, offset: i64, max_wait: Duration) -> Result<Fetch, TransportError>;

    /// [`read`](Self::read)'s records alone, for a caller that asks for each record
    /// once. One that goes on from one past its last record may wait at offsets that
    /// hold no record for ever; a caller that follows a partition uses `read`.
    async fn fetch(&mut self, offset: i64, max_wait: Duration) -> Result<Vec<ConsumedRecord>, TransportError> {
        Ok(self.read(offset, max_wait).await?.records)
    }
}

/// What one [`PartitionReader::read`] found.
#[derive(Debug, Clone, Default)]
pub struct Fetch {
    /// Records at or after the offset read from, in offset order.
    pub records: Vec<ConsumedRecord>,
    /// Where the next read starts: one past the last record, or further when the
    /// offsets after it hold nothing to hand out; the offset read from when nothing
    /// was found. Never past a record not in `records`.
    pub next_offset: i64,
}

/// A broker that kafka-rpc can run on: topics of partitioned, append-only logs,
/// plus consumer groups.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Makes sure `topic` exists, creating it with `partitions` partitions when it is
    /// missing, and returns its actual partition count. A count below 1 or above
    /// [`MAX_PARTITIONS`] is refused with [`TransportError::TopicCreation`] when the
    /// topic has to be created (an existing topic's count is returned whatever it is).
    async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<i32, TransportError>;

    /// Number of partitions of an existing topic.
    async fn partition_count(&self, topic: &str) -> Result<i32, TransportError>;

    /// Appends `records` to one partition, in order, and returns the offset of the first.
    /// On failure the records come back inside the error, so a caller that retries
    /// does not have to keep a copy of every batch it sends.
    async fn produce(&self, topic: &str, partition: i32, records: Vec<Record>) -> Result<i64, ProduceError>;

    /// Where the partition ends for this transport's readers: the offset the next
    /// appended record will get (the high watermark), except on a transport that reads
    /// committed while a transaction is open in the partition, where it is the last
    /// stable offset (the first offset of the oldest open transaction), which readers
    /// do not pass until that transaction ends. Lag is measured against it.
    async fn latest_offset(&self, topic: &str, partition: i32) -> Result<i64, TransportError>;

    /// Opens a reader on one partition.
    async fn reader(&self, topic: &str, partition: i32) -> Result<Box<dyn PartitionReader>, TransportError>;

    /// Joins consumer group `group_id` for `topics`.
    async fn join_group(
        &self,
        group_id: &str,
        topics: &[String],
        reset: OffsetReset,
    ) -> Result<GroupMembership, TransportError>;

    /// How long a partition whose records queue up faster than it produces waits to
    /// fill its next batch. What a batch costs is the broker's business, so the
    /// transport says; the default, zero, sends at once.
    fn busy_linger(&self) -> Duration {
        Duration::ZERO
    }

    /// How long a client's or server's `start` waits for each call it makes on this
    /// transport (creating topics, reading where the reply partitions end, joining the
    /// group) before failing with [`TransportError::TimedOut`], so that a broker that
    /// went silent behind a transport without limits of its own cannot hang a service's
    /// start-up. The default is [`DEFAULT_START_TIMEOUT`]; a transport whose own calls
    /// are bounded should return at least its own bound, so that its more telling
    /// error comes first.
    fn start_timeout(&self) -> Duration {
        DEFAULT_START_TIMEOUT
    }
}

/// The default [`Transport::start_timeout`]: 60 s, Kafka's `default.api.timeout.ms`,
/// how long its Java clients' blocking calls (the admin client's, a consumer's first
/// position look-up) wait, and so what a Spring application waits at start-up.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits for `call`, made by a client's or server's `start`, at most `transport`'s
/// [start timeout](Transport::start_timeout); `operation` names it in the error.
pub(crate) async fn within_start_timeout<T>(
    transport: &dyn Transport,
    operation: impl FnOnce() -> String,
    call: impl std::future::Future<Output = Result<T, TransportError>>,
) -> Result<T, TransportError> {
    let timeout = transport.start_timeout();
    match tokio::time::timeout(timeout, call).await {
        Ok(outcome) => outcome,
        Err(_) => Err(TransportError::TimedOut { operation: operation(), timeout }),
    }
}

/// Most partitions a transport creates a topic with: Kafka's own bound on one
/// CreateTopics request (its controller refuses more with `POLICY_VIOLATION`,
/// "excessively large number of partitions per request"). Far beyond what a
/// request-reply topic needs, and it keeps a mistyped count from exhausting memory: the
/// embedded broker allocates a log per partition, and clients and servers keep state
/// per partition.
pub const MAX_PARTITIONS: i32 = 10_000;

/// Refuses a partition count a topic cannot be created with (below 1, above
/// [`MAX_PARTITIONS`]) before anything is allocated or sent.
pub(crate) fn check_partition_count(topic: &str, partitions: i32) -> Result<(), TransportError> {
    let reason = if partitions < 1 {
        format!("partition count must be positive, got {partitions}")
    } else if partitions > MAX_PARTITIONS {
        format!("partition count must be at most {MAX_PARTITIONS} (Kafka's bound on one request), got {partitions}")
    } else {
        return Ok(());
    };
    Err(TransportError::TopicCreation { topic: topic.to_owned(), reason })
}

/// Failures of the broker layer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The topic does not exist (and was not created).
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    /// The partition is outside the topic's partition count.
    #[error("unknown partition {partition} of topic `{topic}`")]
    UnknownPartition {
        /// Topic name.
        topic: String,
        /// The partition asked for.
        partition: i32,
    },
    /// The fetch offset is no longer, or not yet, in the log: below its start
    /// (deleted by retention) or above its high watermark (the broker lost data).
    #[error("offset {offset} out of range for {tp} (log holds {earliest}..{latest})")]
    OffsetOutOfRange {
        /// The partition.
        tp: TopicPartition,
        /// The offset asked for.
        offset: i64,
        /// The oldest retained offset, where a reader may resume.
        earliest: i64,
        /// The high watermark: the offset the next appended record will get.
        latest: i64,
    },
    /// The broker refused to create a topic.
    #[error("cannot create topic `{topic}`: {reason}")]
    TopicCreation {
        /// Topic name.
        topic: String,
        /// What the broker said.
        reason: String,
    },
    /// A consumer-group operation failed.
    #[error("consumer group `{group}`: {reason}{}", then(.source))]
    Group {
        /// Group id.
        group: String,
        /// What went wrong.
        reason: String,
        /// The error underneath (the coordinator's error code, a protocol error), if any.
        #[source]
        source: Option<ErrorSource>,
    },
    /// A commit named a partition this member does not own in the group's current
    /// generation: it was revoked, or assigned in an older generation. Refused
    /// before reaching the broker, so a late commit cannot overwrite the progress
    /// of the partition's new owner.
    #[error("consumer group `{group}`: {tp} is not assigned to this member in generation {generation}")]
    NotAssigned {
        /// Group id.
        group: String,
        /// The partition committed.
        tp: TopicPartition,
        /// The member's current generation (-1 while it is in none, and on brokers
        /// without generations such as the embedded one).
        generation: i32,
    },
    /// The connection to the broker failed or was lost.
    #[error("broker connection: {context}{}", then(.source))]
    Connection {
        /// What was being attempted, and where.
        context: String,
        /// The error underneath (I/O, TLS, the broker client's), if any.
        #[source]
        source: Option<ErrorSource>,
    },
    /// The broker answered with an error.
    #[error("broker error: {context}{}", then(.source))]
    Broker {
        /// What was being attempted.
        context: String,
        /// The error underneath (the broker's error code, an undecodable response), if any.
        #[source]
        source: Option<ErrorSource>,
    },
    /// A call made while a client or server started got no answer within the
    /// transport's [start timeout](Transport::start_timeout); the start was given up.
    #[error("{operation}: no answer within {timeout:?}")]
    TimedOut {
        /// The call, and what it was about (the topic, the group).
        operation: String,
        /// The start timeout that ran out.
        timeout: Duration,
    },
    /// The transport was shut down.
    #[error("transport closed")]
    Closed,
    /// The transport could not be built: a setting cannot work.
    #[error(transparent)]
    Config(#[from] crate::error::ConfigError),
    /// The idempotent producer's id was taken over by another producer (a newer
    /// epoch from InitProducerId), so the broker refuses this one's batches. Retrying
    /// cannot help; the transport produces nothing more. Connect a new transport.
    #[error("producer fenced: {0}")]
    ProducerFenced(String),
}

/// A failed [`Transport::produce`]: why, and the records that were to be appended,
/// handed back for a retry.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
#[non_exhaustive]
pub struct ProduceError {
    /// Why the produce failed.
    #[source]
    pub error: TransportError,
    /// The records, unchanged and in order. Whether they were appended is unknown
    /// when `error` is a [`TransportError::Connection`] error (no answer came).
    pub records: Vec<Record>,
}

impl ProduceError {
    /// Pairs a failure with the records it concerned.
    pub fn new(error: TransportError, records: Vec<Record>) -> Self {
        ProduceError { error, records }
    }
}

impl From<ProduceError> for TransportError {
    fn from(e: ProduceError) -> Self {
        e.error
    }
}

/// The error underneath a [`TransportError`], kept for inspection (downcast it to
/// `std::io::Error`, rskafka's errors, ...). Shared, so that `TransportError` stays `Clone`.
pub type ErrorSource = Arc<dyn std::error::Error + Send + Sync + 'static>;

impl TransportError {
    /// A [`Connection`](Self::Connection) error: `context` says what was being attempted.
    pub fn connection(context: impl Into<String>) -> Self {
        TransportError::Connection { context: context.into(), source: None }
    }

    /// A [`Broker`](Self::Broker) error: `context` says what was being attempted.
    pub fn broker(context: impl Into<String>) -> Self {
        TransportError::Broker { context: context.into(), source: None }
    }

    /// A [`Group`](Self::Group) error of consumer group `group`.
    pub fn group(group: impl Into<String>, reason: impl Into<String>) -> Self {
        TransportError::Group { group: group.into(), reason: reason.into(), source: None }
    }

    /// Keeps `source` as the error underneath this one (on the variants that carry
    /// one: `Connection`, `Broker`, `Group`; others are returned unchanged).
    pub fn caused_by(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        if let TransportError::Connection { source: slot, .. }
        | TransportError::Broker { source: slot, .. }
        | TransportError::Group { source: slot, .. } = &mut self
        {
            *slot = Some(Arc::new(source));
        }
        self
    }
}

/// `": <source>"`, or nothing: a transport error's message ends with its source's, so a
/// log line that prints only the top error still says what went wrong underneath
/// (`source()` returns the same error, typed, for code that inspects it).
fn then(source: &Option<ErrorSource>) -> String {
    source.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
}

/// Shares one transport between clients and servers: `Arc<EmbeddedBroker>` or an
/// `Arc<dyn Transport>` chosen at run time work wherever a transport is expected.
#[async_trait]
impl<T: Transport + ?Sized> Transport for Arc<T> {
    async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<i32, TransportError> {
        (**self).ensure_topic(topic, partitions).await
    }

    async fn partition_count(&self, topic: &str) -> Result<i32, TransportError> {
        (**self).partition_count(topic).await
    }

    async fn produce(&self, topic: &str, partition: i32, records: Vec<Record>) -> Result<i64, ProduceError> {
        (**self).produce(topic, partition, records).await
    }

    async fn latest_offset(&self, topic: &str, partition: i32) -> Result<i64, TransportError> {
        (**self).latest_offset(topic, partition).await
    }

    async fn reader(&self, topic: &str, partition: i32) -> Result<Box<dyn PartitionReader>, TransportError> {
        (**self).reader(topic, partition).await
    }

    async fn join_group(
        &self,
        group_id: &str,
        topics: &[String],
        reset: OffsetReset,
    ) -> Result<GroupMembership, TransportError> {
        (**self).join_group(group_id, topics, reset).await
    }

    fn busy_linger(&self) -> Duration {
        (**self).busy_linger()
    }

    fn start_timeout(&self) -> Duration {
        (**self).start_timeout()
    }
}
