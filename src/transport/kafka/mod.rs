//! [`Transport`] over a real Kafka-protocol cluster (Apache Kafka, Redpanda, tansu).
//!
//! Fetches, offsets, metadata and topic creation go through rskafka. Produce
//! requests and consumer groups (which rskafka lacks) speak the Kafka protocol
//! directly with `kafka-protocol` messages: produces because rskafka's sockets leave
//! Nagle's algorithm on, groups with the standard `consumer` protocol type and range assignment so
//! that Kafka's own tools can read and manage the groups.
//!
//! Connections are split by job because a broker answers one connection's requests
//! in order: produces to all partitions a broker leads share a few pipelined
//! connections to it, fetches for all the partitions this transport's
//! [readers](Transport::reader) read on a broker share one fetch connection and one
//! fetch request (the `session` module), and each group member has its own
//! coordinator connections.

mod config;
mod connection;
mod convert;
mod fetch;
mod group;
mod guard;
mod inflate;
mod produce;
mod record_batch;
mod sender;
mod session;
#[doc(hidden)]
pub mod untrusted;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rskafka::client::error::ProtocolError;
use rskafka::client::partition::{OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::BackoffConfig;

pub use config::{Compression, Credentials, KafkaConfig, KafkaConfigBuilder, SaslConfig};

use super::{
    GroupMembership, OffsetReset, PartitionReader, ProduceError, Record, TopicPartition, Transport,
    TransportError,
};
use crate::backoff::Backoff;
use convert::{map_error, protocol_error};

/// A [`Transport`] backed by a Kafka-protocol cluster. Cheap to clone; clones share
/// connections.
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

struct Inner {
    config: KafkaConfig,
    /// Shared by metadata and offset look-ups; never used for long polls.
    client: Client,
    /// Produces go on connections of their own (see the `produce` module).
    producer: produce::Producer,
    /// False when the configured SASL mechanism is one only rskafka speaks; then
    /// produces go through rskafka, slower but authenticated.
    own_produce: bool,
    /// rskafka's partition clients find and follow the partition leader; caching them
    /// saves a metadata round trip per produce.
    partitions: Mutex<HashMap<(String, i32), Arc<PartitionClient>>>,
    /// Records readers skipped because their batch could not be decoded.
    unreadable: AtomicU64,
    /// One fetch session per broker address, shared by every reader of a partition
    /// that broker leads.
    sessions: Mutex<HashMap<String, session::Session>>,
    /// One connection per broker address for reading where its partitions end (a fetch
    /// that waits for nothing), kept between look-ups: lag sampling asks for every
    /// owned partition each second.
    end_connections: Mutex<HashMap<String, EndConnection>>,
}

/// A broker's kept connection for end look-ups.
type EndConnection = Arc<connection::Kept>;

impl KafkaTransport {
    /// Connects to the cluster described by `config`. Fails with
    /// [`TransportError::Connection`] when no bootstrap broker answers within the
    /// connect timeout, and with [`TransportError::Config`] before connecting when a
    /// timing cannot work (see [`KafkaConfigBuilder::heartbeat_interval`]).
    pub async fn connect(config: KafkaConfig) -> Result<Self, TransportError> {
        config.check()?;
        let own_produce = !matches!(&config.sasl, Some(s) if !matches!(s, SaslConfig::Plain(_)));
        let mut config = config;
        if !own_produce {
            if config.idempotent == Some(true) {
                return Err(TransportError::connection(
                    "the idempotent producer needs SASL PLAIN or no SASL: other mechanisms produce through rskafka, which has no producer ids",
                ));
            }
            config.idempotent = Some(false);
        }
        let client = build_client(&config).await?;
        Ok(KafkaTransport {
            inner: Arc::new(Inner {
                producer: produce::Producer::new(config.clone()),
                own_produce,
                config,
                client,
                partitions: Mutex::new(HashMap::new()),
                unreadable: AtomicU64::new(0),
                sessions: Mutex::new(HashMap::new()),
                end_connections: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Records that readers of this transport moved past because their record batch
    /// could not be decoded (corrupt, an unsupported message format, or counts its
    /// bytes cannot hold). Each is also logged at warn with its offsets.
    pub fn unreadable_records(&self) -> u64 {
        self.inner.unreadable.load(Ordering::Relaxed)
    }

    /// The configuration this transport was built from.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// The fetch session of the broker at `addr`, started on first use.
    fn session(&self, addr: &str) -> session::Session {
        // Inserts are atomic, so a poisoned lock still holds a consistent map.
        let mut sessions = self.inner.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .entry(addr.to_string())
            .or_insert_with(|| session::Session::start(addr.to_string(), Arc::downgrade(&self.inner)))
            .clone()
    }

    async fn partition_client(&self, topic: &str, partition: i32) -> Result<Arc<PartitionClient>, TransportError> {
        let key = (topic.to_string(), partition);
        if let Some(pc) = self.lock_partitions().get(&key) {
            return Ok(Arc::clone(pc));
        }
        let pc = self
            .bounded("partition lookup", async {
                self.inner.client.partition_client(topic, partition, UnknownTopicHandling::Error).await
            })
            .await;
        let pc = match pc {
            Ok(pc) => Arc::new(pc),
            Err(e) => return Err(self.classify(topic, partition, "partition lookup", e).await),
        };
        Ok(Arc::clone(self.lock_partitions().entry(key).or_insert(pc)))
    }

    fn lock_partitions(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Arc<PartitionClient>>> {
        // A panic elsewhere cannot leave the cache inconsistent (inserts are atomic),
        // so a poisoned lock is still usable.
        self.inner.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs an rskafka call under the request timeout so that a dead broker surfaces
    /// as an error rather than a hang.
    async fn bounded<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, rskafka::client::error::Error>>,
    ) -> Result<T, rskafka::client::error::Error> {
        bounded(self.inner.config.request_timeout, what, fut).await
    }

    /// Turns an rskafka error into a transport error, telling an unknown topic from
    /// an unknown partition (the broker uses one code for both).
    async fn classify(&self, topic: &str, partition: i32, what: &str, e: rskafka::client::error::Error) -> TransportError {
        let unknown = matches!(protocol_error(&e), Some(ProtocolError::UnknownTopicOrPartition))
            // rskafka reports a partition missing from metadata as an invalid
            // response rather than a broker error.
            || matches!(&e, rskafka::client::error::Error::InvalidResponse(m) if m.to_ascii_lowercase().contains("partition"));
        if !unknown {
            return map_error(what, e);
        }
        match self.partition_count(topic).await {
            Ok(_) => TransportError::UnknownPartition { topic: topic.to_string(), partition },
            Err(TransportError::UnknownTopic(t)) => TransportError::UnknownTopic(t),
            Err(_) => map_error(what, e),
        }
    }

    /// Partition counts of `topics` in one metadata round trip; missing topics are
    /// absent from the map.
    pub(crate) async fn partition_counts(&self, topics: &[String]) -> Result<HashMap<String, i32>, TransportError> {
        let listed = self
            .bounded("metadata", self.inner.client.list_topics())
            .await
            .map_err(|e| map_error("metadata", e))?;
        Ok(listed
            .into_iter()
            .filter(|t| topics.iter().any(|n| n == &t.name))
            .map(|t| (t.name, t.partitions.len() as i32))
            .collect())
    }

    /// Offset where a member starts a partition without a committed offset.
    pub(crate) async fn reset_offset(&self, topic: &str, partition: i32, reset: OffsetReset) -> Result<i64, TransportError> {
        let pc = self.partition_client(topic, partition).await?;
        match reset {
            OffsetReset::Earliest => self.log_start(&pc, topic, partition).await,
            OffsetReset::Latest => Ok(self.ends(&pc, topic, partition).await?.stable),
        }
    }

    /// The log start offset and the high watermark of a partition, for an
    /// out-of-range fetch answer that did not name them. The start is listed first:
    /// both only grow, so the pair never has the start past the watermark. The high
    /// watermark, not the last stable offset: the caller takes an offset past it for
    /// records the broker lost and resets, and a reader started from a read-uncommitted
    /// commit may sit past the last stable offset, inside the log.
    pub(super) async fn log_ends(&self, topic: &str, partition: i32) -> Result<(i64, i64), TransportError> {
        let pc = self.partition_client(topic, partition).await?;
        let earliest = self.log_start(&pc, topic, partition).await?;
        let latest = self.ends(&pc, topic, partition).await?.high_watermark;
        Ok((earliest, latest))
    }

    /// The log start offset: the first offset retention (or DeleteRecords) kept.
    async fn log_start(&self, pc: &PartitionClient, topic: &str, partition: i32) -> Result<i64, TransportError> {
        match self.bounded("list offsets", pc.get_offset(OffsetAt::Earliest)).await {
            Ok(o) => Ok(o),
            Err(e) => Err(self.classify(topic, partition, "list offsets", e).await),
        }
    }

    async fn produce_via_rskafka(&self, topic: &str, partition: i32, records: &[Record]) -> Result<i64, TransportError> {
        let pc = self.partition_client(topic, partition).await?;
        let records: Vec<_> = records.iter().map(convert::to_rskafka).collect();
        match self.bounded("produce", pc.produce(records, self.inner.config.compression)).await {
            Ok(offsets) => offsets
                .first()
                .copied()
                .ok_or_else(|| TransportError::broker("produce: broker returned no offsets")),
            Err(e) => Err(self.classify(topic, partition, "produce", e).await),
        }
    }

    /// Where a partition ends for this transport's readers, which read committed: the
    /// last stable offset, which is the high watermark unless a transaction is open
    /// (Apache Kafka answers ListOffsets(latest) read committed with it too, as the Java
    /// consumer's `seekToEnd` and lag under read_committed use it). A reader stops
    /// there until the transaction ends, so lag measured against the high watermark
    /// would count offsets no reader can pass yet.
    ///
    /// ListOffsets alone is not enough: tansu 0.6 answers it with the last batch's base
    /// offset + 1, so a zero-wait read-committed fetch from there reads the end from the
    /// fetch answer (tansu names the high watermark as the last stable offset).
    ///
    /// The high watermark comes with it, for [`log_ends`](Self::log_ends).
    async fn ends(&self, pc: &PartitionClient, topic: &str, partition: i32) -> Result<session::Ends, TransportError> {
        let listed = match self.bounded("list offsets", pc.get_offset(OffsetAt::Latest)).await {
            Ok(o) => o,
            Err(e) => return Err(self.classify(topic, partition, "list offsets", e).await),
        };
        if !self.inner.own_produce {
            // Our connections speak SASL PLAIN only, and rskafka, which speaks the
            // configured mechanism, decodes the fetched records unchecked (see
            // `session::stable_end`). The listed offset is exact on Apache Kafka
            // (read uncommitted: an open transaction is then counted as lag); only
            // tansu's batches of several records make it fall short. (rskafka lists
            // read committed: on Apache Kafka with a transaction open, the high
            // watermark here is the last stable offset too, so `log_ends` is low.)
            return Ok(session::Ends { stable: listed, high_watermark: listed });
        }
        let tp = TopicPartition::new(topic, partition);
        match self.stable_end(&tp, listed).await {
            Ok(end) => Ok(end.map_or(session::Ends { stable: listed, high_watermark: listed }, |end| session::Ends {
                stable: end.stable.max(listed),
                high_watermark: end.high_watermark.max(listed),
            })),
            Err(e) => Err(fetch::to_transport(self, &tp, e).await),
        }
    }

    /// [`session::stable_end`] on the leader's look-up connection (opened when there is
    /// none). The leader is the producer's cached one, forgotten when the look-up fails
    /// (it may have moved).
    async fn stable_end(&self, tp: &TopicPartition, at: i64) -> Result<Option<session::Ends>, connection::CallError> {
        let answer = self.stable_end_from_leader(tp, at).await;
        if answer.is_err() {
            self.inner.producer.forget(&tp.topic, tp.partition);
        }
        answer
    }

    async fn stable_end_from_leader(&self, tp: &TopicPartition, at: i64) -> Result<Option<session::Ends>, connection::CallError> {
        let leader = self.inner.producer.leader_of(&tp.topic, tp.partition).await?;
        let kept = {
            // Inserts are atomic, so a poisoned lock still holds a consistent map.
            let mut connections = self.inner.end_connections.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(connections.entry(leader.clone()).or_default())
        };
        let connect = || connection::Connection::connect(&leader, &self.inner.config);
        kept.exchange(self.inner.config.request_timeout, connect, |conn| {
            let tp = tp.clone();
            Box::pin(async move { session::stable_end(conn, &tp, at).await })
        })
        .await
    }
}

async fn bounded<T>(
    timeout: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, rskafka::client::error::Error>>,
) -> Result<T, rskafka::client::error::Error> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => {
            tracing::debug!(what, ?timeout, "kafka request timed out");
            Err(rskafka::client::error::Error::Timeout)
        }
    }
}

/// An rskafka client on its own connections.
async fn build_client(config: &KafkaConfig) -> Result<Client, TransportError> {
    if config.bootstrap.is_empty() {
        return Err(TransportError::connection("no bootstrap servers configured"));
    }
    // rskafka retries broken connections forever by default; the deadline turns
    // an unreachable cluster into an error.
    let backoff = BackoffConfig {
        init_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_secs(1),
        base: 2.0,
        deadline: Some(config.request_timeout),
    };
    let mut builder = ClientBuilder::new(config.bootstrap.clone())
        .client_id(config.client_id.as_str())
        .backoff_config(backoff);
    if let Some(sasl) = &config.sasl {
        builder = builder.sasl_config(sasl.clone());
    }
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(Arc::clone(tls));
    }
    match tokio::time::timeout(config.connect_timeout, builder.build()).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => {
            Err(TransportError::connection(format!("cannot reach bootstrap servers {:?}", config.bootstrap)).caused_by(e))
        }
        Err(_) => {
            let error = TransportError::connection(format!(
                "no bootstrap server of {:?} answered within {:?}",
                config.bootstrap, config.connect_timeout
            ));
            Err(match why_unreachable(&config.bootstrap).await {
                Some(cause) => error.caused_by(cause),
                None => error,
            })
        }
    }
}

/// Why no bootstrap server can be reached, if a plain TCP connect says: rskafka retries
/// until its own deadline and keeps the failure to itself, so with the default timeouts
/// (connect 10 s, requests 30 s) a caller would otherwise get no cause at all. The
/// servers are tried at once, each bounded, so the probe adds at most one bound to the
/// error, however long the bootstrap list.
async fn why_unreachable(bootstrap: &[String]) -> Option<std::io::Error> {
    const PROBE: Duration = Duration::from_secs(1);
    let tries = bootstrap.iter().map(|addr| async move {
        match tokio::time::timeout(PROBE, tokio::net::TcpStream::connect(addr.as_str())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{addr}: no TCP answer within {PROBE:?}"))),
        }
    });
    let outcomes = futures::future::join_all(tries).await;
    // One that accepts connections means the Kafka handshake is what did not finish.
    if outcomes.iter().any(Result::is_ok) {
        return None;
    }
    outcomes.into_iter().find_map(Result::err)
}

#[async_trait]
impl Transport for KafkaTransport {
    async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<i32, TransportError> {
        // Listed without partitions (being created elsewhere, or broken): not usable
        // yet; creating it is then refused as existing, and the wait below is bounded.
        if let Some(n) = self.partition_counts(&[topic.to_string()]).await?.get(topic).filter(|n| **n > 0) {
            return Ok(*n);
        }
        // Refused here rather than by the broker: not every Kafka-protocol broker
        // enforces Kafka's bound, and one that tries to honour the count may fall over.
        crate::transport::check_partition_count(topic, partitions)?;
        let controller = self
            .inner
            .client
            .controller_client()
            .map_err(|e| map_error("controller lookup", e))?;
        let timeout_ms = i32::try_from(self.inner.config.request_timeout.as_millis()).unwrap_or(i32::MAX);
        let created = self
            .bounded("create topic", controller.create_topic(topic, partitions, 1, timeout_ms))
            .await;
        match created {
            Ok(()) => {}
            Err(e) if matches!(protocol_error(&e), Some(ProtocolError::TopicAlreadyExists)) => {}
            Err(e @ rskafka::client::error::Error::ServerError { .. }) => {
                return Err(TransportError::TopicCreation { topic: topic.to_string(), reason: e.to_string() })
            }
            Err(e) => return Err(map_error("create topic", e)),
        }
        // Metadata propagates asynchronously after creation on a real cluster; poll
        // (bounded) so callers can use the topic as soon as this returns.
        let deadline = crate::clock::instant_after(tokio::time::Instant::now(), self.inner.config.request_timeout);
        let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(200));
        loop {
            if let Some(n) = self.partition_counts(&[topic.to_string()]).await?.get(topic) {
                if *n > 0 {
                    return Ok(*n);
                }
            }
            let Some(pause) = backoff.next_pause_before(deadline) else {
                return Err(TransportError::TopicCreation {
                    topic: topic.to_string(),
                    reason: "created, but it did not appear in metadata in time".into(),
                });
            };
            tokio::time::sleep(pause).await;
        }
    }

    async fn partition_count(&self, topic: &str) -> Result<i32, TransportError> {
        self.partition_counts(&[topic.to_string()])
            .await?
            .get(topic)
            .copied()
            .ok_or_else(|| TransportError::UnknownTopic(topic.to_string()))
    }

    async fn produce(&self, topic: &str, partition: i32, records: Vec<Record>) -> Result<i64, ProduceError> {
        let outcome = if records.is_empty() {
            self.latest_offset(topic, partition).await
        } else if !self.inner.own_produce {
            self.produce_via_rskafka(topic, partition, &records).await
        } else {
            match self.inner.producer.produce(topic, partition, &records).await {
                Ok(offset) => Ok(offset),
                Err(produce::ProduceError::Other(e)) => Err(e),
                Err(produce::ProduceError::Unknown) => Err(match self.partition_count(topic).await {
                    Ok(_) => TransportError::UnknownPartition { topic: topic.to_string(), partition },
                    Err(e) => e,
                }),
            }
        };
        outcome.map_err(|e| ProduceError::new(e, records))
    }

    async fn latest_offset(&self, topic: &str, partition: i32) -> Result<i64, TransportError> {
        let pc = self.partition_client(topic, partition).await?;
        Ok(self.ends(&pc, topic, partition).await?.stable)
    }

    async fn reader(&self, topic: &str, partition: i32) -> Result<Box<dyn PartitionReader>, TransportError> {
        // Fails now, rather than at the first fetch, for a partition that does not exist.
        if partition < 0 || partition >= self.partition_count(topic).await? {
            return Err(TransportError::UnknownPartition { topic: topic.to_string(), partition });
        }
        // Its fetches ride on the leader's fetch session, on a connection of their
        // own: they never queue behind produces.
        Ok(Box::new(fetch::KafkaReader::new(self.clone(), TopicPartition::new(topic, partition))))
    }

    async fn join_group(
        &self,
        group_id: &str,
        topics: &[String],
        reset: OffsetReset,
    ) -> Result<GroupMembership, TransportError> {
        group::join(self.clone(), group_id, topics, reset).await
    }

    fn busy_linger(&self) -> Duration {
        self.inner.config.busy_linger
    }

    /// Past this transport's own bounds, so that its more telling errors come first:
    /// the longest call of a start, `ensure_topic`, may connect, then look up metadata,
    /// create the topic and wait for it to appear, each within the request timeout.
    fn start_timeout(&self) -> Duration {
        let config = &self.inner.config;
        config.connect_timeout.saturating_add(config.request_timeout.saturating_mul(3))
    }
}
