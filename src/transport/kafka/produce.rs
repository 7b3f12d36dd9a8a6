//! Produce requests on connections of our own.
//!
//! rskafka leaves Nagle's algorithm on and writes a request's size prefix and body
//! separately, so a produce request of a few kilobytes waits for the broker's
//! delayed ACK: ~45 ms per 100-record batch on loopback. Here every request is one
//! write on a `TCP_NODELAY` socket, and all partitions led by one broker share a few
//! pipelined connections to it (the `sender` module), much as in the Java client.
//!
//! Order and retries are decided here, per partition, in a *lane*: a call holds its
//! partition's lane (an async mutex, which queues callers first come, first served)
//! from its first attempt until its outcome is known, so a partition never has two
//! batches queued or in flight and a retry can never let a later batch land before
//! an earlier one. That is the Java client's "one in flight per partition" rule for
//! ordering; the connection still carries up to five requests for other partitions.
//!
//! With the idempotent producer on, each batch carries the producer id and epoch
//! from InitProducerId and per-partition sequence numbers, and a resend keeps its
//! sequence, so the broker drops a copy it already appended (answering
//! DUPLICATE_SEQUENCE_NUMBER) instead of appending it twice. A lane whose last batch
//! ended in doubt (no answer, and its caller gave up or went away) cannot know the
//! broker's next sequence, so the next batch first takes a new producer id, under
//! which every partition's sequences start over. (Kafka 2.5+ could renew the epoch of
//! the same id instead, KIP-360; tansu 0.6 answers that with UNKNOWN_SERVER_ERROR.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{InitProducerIdRequest, MetadataRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::connection::{CallError, Connection, Kept};
use super::record_batch::encode::{batch_end, encode_batch, sequence_after, sequences_before_wrap, Stamp};
use super::sender::{Batch, BrokerSender};
use super::KafkaConfig;
use crate::backoff::Backoff;
use crate::transport::{Record, TransportError};

const METADATA_VERSION: i16 = 4;
/// tansu 0.6 answers InitProducerId from v3 on (Kafka 2.5); versions 0 to 2 get
/// UNKNOWN_SERVER_ERROR.
const INIT_PRODUCER_ID_VERSION: i16 = 3;

const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const LEADER_NOT_AVAILABLE: i16 = 5;
const NOT_LEADER_OR_FOLLOWER: i16 = 6;
const REQUEST_TIMED_OUT: i16 = 7;
const NOT_ENOUGH_REPLICAS: i16 = 19;
const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i16 = 20;
const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
const DUPLICATE_SEQUENCE_NUMBER: i16 = 46;
const INVALID_PRODUCER_EPOCH: i16 = 47;
const UNKNOWN_PRODUCER_ID: i16 = 59;
const PRODUCER_FENCED: i16 = 90;

/// Produce connections per broker. The Java client uses one; tansu 0.6 serves each
/// connection's requests one after another, and with one connection `examples/loadgen`
/// through it reached 0.70 to 0.86 of the per-partition connections it replaced, with
/// four 0.95 (same runs; docs/benchmarks.md, "Produce path"). Each connection still
/// carries the batches of many partitions.
const CONNECTIONS_PER_BROKER: usize = 4;

/// Topic → partition → lane.
type Lanes = HashMap<String, HashMap<i32, Arc<tokio::sync::Mutex<Lane>>>>;

/// Sends produce requests to partition leaders.
pub(crate) struct Producer {
    config: KafkaConfig,
    /// Topic → partition → leader address.
    leaders: Mutex<HashMap<String, HashMap<i32, String>>>,
    /// (Broker address, connection number) → a pipelined sender.
    senders: Mutex<HashMap<(String, usize), BrokerSender>>,
    lanes: Mutex<Lanes>,
    metadata: Kept,
    /// The idempotent producer's identity; untouched when idempotence is off.
    identity: tokio::sync::Mutex<Identity>,
}

/// One partition's produce state, held by the call producing to it.
#[derive(Debug)]
struct Lane {
    /// Producer id and epoch `next` counts in; another means sequences start over.
    producer: Option<ProducerId>,
    /// Sequence of the next record.
    next: i32,
    /// The last batch got no answer and nobody retried it: it may or may not be in
    /// the log, so `next` cannot be trusted.
    in_doubt: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProducerId {
    id: i64,
    epoch: i16,
}

#[derive(Debug)]
enum Identity {
    /// InitProducerId not sent yet.
    None,
    Live(ProducerId),
    /// Another producer took over the id: nothing more can be produced with it.
    Fenced(ProducerId),
    /// The broker refused InitProducerId and the application left idempotence at its
    /// default: produce without producer ids.
    Unsupported,
}

/// Why a produce failed, as far as the caller must tell.
pub(crate) enum ProduceError {
    /// The broker does not know the topic or partition.
    Unknown,
    /// Anything else, already typed.
    Other(TransportError),
}

impl Producer {
    pub(crate) fn new(config: KafkaConfig) -> Self {
        Producer {
            config,
            leaders: Mutex::new(HashMap::new()),
            senders: Mutex::new(HashMap::new()),
            lanes: Mutex::new(HashMap::new()),
            metadata: Kept::default(),
            identity: tokio::sync::Mutex::new(Identity::None),
        }
    }

    /// Appends `records` to a partition after every batch an earlier call queued for
    /// it, and returns the first offset (-1 when an idempotent resend found the batch
    /// already appended and the broker no longer knows where). Leadership changes and
    /// broken connections are retried within the request timeout.
    ///
    /// Cancel safety: dropping the future gives the partition to the next caller;
    /// a batch already sent may still be appended, and with idempotence on the next
    /// batch of the partition takes a new producer id because its sequence is in doubt.
    pub(crate) async fn produce(&self, topic: &str, partition: i32, records: &[Record]) -> Result<i64, ProduceError> {
        let lane = self.lane(topic, partition);
        let mut lane = lane.lock().await;
        let deadline = crate::clock::instant_after(Instant::now(), self.config.request_timeout);
        let topic: Arc<str> = Arc::from(topic);
        // Kafka takes exactly one batch per partition in a produce request (v3 on), and
        // a batch under the topic's size limit, so a larger call is several requests,
        // one after another in the lane; earlier ones stay appended if a later fails.
        let mut first = None;
        let mut start = 0;
        loop {
            let end = batch_end(records, start);
            let (offset, sent) = self.produce_batch(&mut lane, &topic, partition, &records[start..end], deadline).await?;
            first.get_or_insert(offset);
            start += sent;
            if start >= records.len() {
                return Ok(first.unwrap_or(-1));
            }
        }
    }

    /// Sends the first records of `records` as one batch, retrying within `deadline`,
    /// and returns its first offset and how many records it carried: all of them, or
    /// fewer where the lane's sequence wraps (a batch's sequences cannot).
    async fn produce_batch(
        &self,
        lane: &mut Lane,
        topic: &Arc<str>,
        partition: i32,
        records: &[Record],
        deadline: Instant,
    ) -> Result<(i64, usize), ProduceError> {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500));
        // A lane left in doubt by an earlier call needs a new producer id. This call's
        // own resends keep the stamp of its first attempt (even if another partition
        // took a new id meanwhile), which is what lets the broker drop duplicates;
        // only a broker refusal of the stamp makes a new one.
        let mut new_id = lane.in_doubt;
        let mut restamp = true;
        let mut stamp = None;
        let mut encoded: Option<Bytes> = None;
        let mut count = records.len();
        loop {
            if restamp && self.config.idempotent != Some(false) {
                stamp = match self.stamp(lane, new_id).await {
                    Ok(stamp) => stamp,
                    // No answer to InitProducerId (the broker closes idle connections,
                    // and the metadata connection may sit idle for long): retried like
                    // a produce that got none.
                    Err(e @ TransportError::Connection { .. }) => match backoff.next_pause_before(deadline) {
                        Some(pause) => {
                            tokio::time::sleep(pause).await;
                            continue;
                        }
                        None => return Err(ProduceError::Other(e)),
                    },
                    Err(e) => return Err(ProduceError::Other(e)),
                };
                count = stamp.map_or(records.len(), |s| records.len().min(sequences_before_wrap(s.sequence)));
                encoded = None;
            }
            (new_id, restamp) = (false, false);
            let batch = match &encoded {
                Some(bytes) => bytes.clone(),
                None => encoded
                    .insert(encode_batch(&records[..count], self.config.compression, stamp).map_err(ProduceError::Other)?)
                    .clone(),
            };
            lane.in_doubt = true;
            let err = match self.send(topic, partition, batch, deadline).await {
                Ok(offset) => {
                    lane.appended(count);
                    return Ok((offset, count));
                }
                Err(e) => e,
            };
            let retriable = match &err {
                CallError::Kafka(DUPLICATE_SEQUENCE_NUMBER, _) if stamp.is_some() => {
                    // An earlier attempt of this very batch was appended and its
                    // answer lost; the Java client reports offset -1 here too.
                    lane.appended(count);
                    return Ok((-1, count));
                }
                CallError::Kafka(INVALID_PRODUCER_EPOCH | PRODUCER_FENCED, _) if stamp.is_some() => {
                    lane.in_doubt = false;
                    let stale = stamp.map(|s| ProducerId { id: s.producer_id, epoch: s.epoch });
                    if let Some(e) = self.fenced_unless_replaced(stale).await {
                        return Err(ProduceError::Other(e));
                    }
                    // This transport took a new producer id meanwhile: resend under it.
                    restamp = true;
                    true
                }
                CallError::Kafka(OUT_OF_ORDER_SEQUENCE_NUMBER | UNKNOWN_PRODUCER_ID, _) if stamp.is_some() => {
                    // Refused, so not appended; the broker's idea of our sequence
                    // differs from ours (it lost its producer state, say). A new producer
                    // id starts both at zero.
                    lane.in_doubt = false;
                    (new_id, restamp) = (true, true);
                    true
                }
                CallError::Kafka(UNKNOWN_TOPIC_OR_PARTITION, _) => {
                    lane.in_doubt = false;
                    return Err(ProduceError::Unknown);
                }
                CallError::Kafka(
                    LEADER_NOT_AVAILABLE | NOT_LEADER_OR_FOLLOWER | NOT_ENOUGH_REPLICAS | REQUEST_TIMED_OUT
                    | NOT_ENOUGH_REPLICAS_AFTER_APPEND,
                    _,
                ) => {
                    self.forget(topic, partition);
                    true
                }
                // No answer: the batch may be in the log. It stays in doubt until a
                // resend is answered.
                CallError::Io(_) => {
                    self.forget(topic, partition);
                    true
                }
                _ => {
                    lane.in_doubt = false;
                    false
                }
            };
            match backoff.next_pause_before(deadline) {
                Some(pause) if retriable => tokio::time::sleep(pause).await,
                _ => return Err(ProduceError::Other(to_transport(err))),
            }
        }
    }

    /// Queues one batch on its leader's connection and waits for its answer.
    async fn send(&self, topic: &Arc<str>, partition: i32, records: Bytes, deadline: Instant) -> Result<i64, CallError> {
        let leader = match tokio::time::timeout_at(deadline, self.leader_of(topic, partition)).await {
            Ok(leader) => leader?,
            Err(_) => return Err(CallError::Io(format!("no leader found for {topic}-{partition} in time"))),
        };
        let (reply, answer) = oneshot::channel();
        let batch = Batch { topic: Arc::clone(topic), partition, records, reply };
        // A partition always uses the same of its leader's connections; the lane, not
        // the connection, keeps its order.
        let key = (leader.clone(), partition.unsigned_abs() as usize % CONNECTIONS_PER_BROKER);
        let queued = {
            let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
            let sender = senders
                .entry(key.clone())
                .or_insert_with(|| BrokerSender::spawn(leader.clone(), self.config.clone()));
            sender.send(batch).is_ok()
        };
        if !queued {
            // Only a panicked sender task refuses; start a fresh one for the retry.
            self.senders.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
            return Err(CallError::Io(format!("{leader}: produce sender stopped")));
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(CallError::Io(format!("{leader}: connection lost before the produce was answered"))),
            Err(_) => Err(CallError::Io(format!("{leader}: produce not answered within the request timeout"))),
        }
    }

    fn lane(&self, topic: &str, partition: i32) -> Arc<tokio::sync::Mutex<Lane>> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let per_topic = match lanes.get_mut(topic) {
            Some(per_topic) => per_topic,
            None => lanes.entry(topic.to_string()).or_default(),
        };
        let lane = per_topic
            .entry(partition)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(Lane { producer: None, next: 0, in_doubt: false })));
        Arc::clone(lane)
    }

    /// Producer id, epoch and sequence for the lane's next batch; a new producer id
    /// first when `new_id` and nobody took one since the lane's.
    /// `None` when the broker has no idempotent producer for us and the application
    /// left the choice to the transport.
    async fn stamp(&self, lane: &mut Lane, new_id: bool) -> Result<Option<Stamp>, TransportError> {
        let id = {
            let mut identity = self.identity.lock().await;
            match *identity {
                Identity::Unsupported => return Ok(None),
                Identity::Fenced(id) => return Err(fenced(id)),
                Identity::Live(id) if !(new_id && Some(id) == lane.producer) => id,
                // First use, or this lane's producer id must be left behind.
                _ => match self.init_producer_id().await {
                    Ok(id) => {
                        *identity = Identity::Live(id);
                        id
                    }
                    // Only a broker's refusal of the first id means "not supported
                    // here"; a lost connection is retried like any produce failure.
                    Err(CallError::Kafka(code, _))
                        if self.config.idempotent.is_none() && matches!(*identity, Identity::None) =>
                    {
                        tracing::warn!(
                            error_code = code,
                            "the broker refused InitProducerId: producing without the idempotent producer, so a retried batch whose acknowledgement was lost can be appended twice"
                        );
                        *identity = Identity::Unsupported;
                        return Ok(None);
                    }
                    Err(e) => return Err(to_transport(e)),
                },
            }
        };
        if lane.producer != Some(id) {
            lane.producer = Some(id);
            lane.next = 0;
        }
        Ok(Some(Stamp { producer_id: id.id, epoch: id.epoch, sequence: lane.next }))
    }

    /// After the broker refused the epoch of `stale`: `None` when this producer has
    /// taken a new id since (resend under it), else the fencing error, remembered so
    /// later produces fail at once. Only the broker can fence a non-transactional
    /// producer's id, and Kafka treats that as fatal for the producer too.
    async fn fenced_unless_replaced(&self, stale: Option<ProducerId>) -> Option<TransportError> {
        let mut identity = self.identity.lock().await;
        match *identity {
            Identity::Live(id) if Some(id) != stale => None,
            Identity::Live(id) | Identity::Fenced(id) => {
                *identity = Identity::Fenced(id);
                Some(fenced(id))
            }
            Identity::None | Identity::Unsupported => {
                Some(TransportError::broker("producer epoch refused before one was assigned"))
            }
        }
    }

    /// A new producer id and epoch (no transactional id: one of our own).
    async fn init_producer_id(&self) -> Result<ProducerId, CallError> {
        let req = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(i32::try_from(self.config.request_timeout.as_millis()).unwrap_or(i32::MAX));
        let resp = self.on_metadata_connection(|conn| {
            let req = req.clone();
            Box::pin(async move { conn.send(&req, INIT_PRODUCER_ID_VERSION, Duration::ZERO).await })
        }).await?;
        if resp.error_code != 0 {
            return Err(CallError::Kafka(resp.error_code, "InitProducerId".into()));
        }
        let id = ProducerId { id: resp.producer_id.0, epoch: resp.producer_epoch };
        tracing::debug!(producer_id = id.id, epoch = id.epoch, "idempotent producer initialised");
        Ok(id)
    }

    /// Drops the cached leader of a partition, so the next look-up asks the cluster.
    pub(crate) fn forget(&self, topic: &str, partition: i32) {
        if let Some(per_topic) = self.leaders.lock().unwrap_or_else(|p| p.into_inner()).get_mut(topic) {
            per_topic.remove(&partition);
        }
    }

    /// The partition leader's address, cached until [`forget`](Self::forget).
    pub(crate) async fn leader_of(&self, topic: &str, partition: i32) -> Result<String, CallError> {
        let cached = self
            .leaders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
            .and_then(|per_topic| per_topic.get(&partition).cloned());
        if let Some(leader) = cached {
            return Ok(leader);
        }
        let leader = self.leader(topic, partition).await?;
        let mut leaders = self.leaders.lock().unwrap_or_else(|p| p.into_inner());
        leaders.entry(topic.to_string()).or_default().insert(partition, leader.clone());
        Ok(leader)
    }

    /// The partition leader's address, from a metadata request that never creates
    /// the topic.
    pub(crate) async fn leader(&self, topic: &str, partition: i32) -> Result<String, CallError> {
        let req = MetadataRequest::default()
            .with_topics(Some(vec![MetadataRequestTopic::default()
                .with_name(Some(TopicName(StrBytes::from_string(topic.to_string()))))]))
            .with_allow_auto_topic_creation(false);
        let resp = self.on_metadata_connection(|conn| {
            let req = req.clone();
            Box::pin(async move { conn.send(&req, METADATA_VERSION, Duration::ZERO).await })
        }).await?;
        let t = resp
            .topics
            .iter()
            .find(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some(topic))
            .ok_or(CallError::Kafka(UNKNOWN_TOPIC_OR_PARTITION, format!("metadata of {topic}")))?;
        if t.error_code != 0 {
            return Err(CallError::Kafka(t.error_code, format!("metadata of {topic}")));
        }
        let p = t
            .partitions
            .iter()
            .find(|p| p.partition_index == partition)
            .ok_or(CallError::Kafka(UNKNOWN_TOPIC_OR_PARTITION, format!("metadata of {topic}-{partition}")))?;
        if p.error_code != 0 && p.error_code != LEADER_NOT_AVAILABLE {
            return Err(CallError::Kafka(p.error_code, format!("metadata of {topic}-{partition}")));
        }
        resp.brokers
            .iter()
            .find(|b| b.node_id == p.leader_id)
            .map(|b| format!("{}:{}", b.host.as_str(), b.port))
            .ok_or(CallError::Kafka(LEADER_NOT_AVAILABLE, format!("leader of {topic}-{partition}")))
    }

    /// Runs one exchange on the kept bootstrap connection ([`Kept`]).
    async fn on_metadata_connection<T>(
        &self,
        exchange: impl for<'c> Fn(&'c mut Connection) -> futures::future::BoxFuture<'c, Result<T, CallError>>,
    ) -> Result<T, CallError> {
        self.metadata.exchange(self.config.request_timeout, || self.connect_bootstrap(), exchange).await
    }

    async fn connect_bootstrap(&self) -> Result<Connection, CallError> {
        let mut last = CallError::Io("no bootstrap servers configured".into());
        for addr in self.config.bootstrap() {
            match Connection::connect(addr, &self.config).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

impl Lane {
    /// The batch of `records` is in the log: the next one follows it.
    fn appended(&mut self, records: usize) {
        self.in_doubt = false;
        self.next = sequence_after(self.next, records);
    }
}

fn fenced(id: ProducerId) -> TransportError {
    TransportError::ProducerFenced(format!(
        "the broker refuses producer id {} epoch {} as stale (another producer took it over)",
        id.id, id.epoch
    ))
}

fn to_transport(e: CallError) -> TransportError {
    match e {
        e @ CallError::Io(_) => TransportError::connection("produce").caused_by(e),
        other => TransportError::broker("produce").caused_by(other),
    }
}
