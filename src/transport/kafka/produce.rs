//! Produce requests on connections of our own.
//!
//! rskafka leaves Nagle's algorithm on and writes a request's size prefix and body
//! separately, so a produce request of a few kilobytes waits for the broker's
//! delayed ACK: ~45 ms per 100-record batch on loopback. Here every request is one
//! write on a `TCP_NODELAY` socket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use indexmap::IndexMap;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{MetadataRequest, ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression as WireCompression, Record as WireRecord, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use super::connection::Connection;
use crate::backoff::Backoff;
use super::group::GroupError;
use super::{Compression, KafkaConfig};
use crate::transport::{Record, TransportError};

const METADATA_VERSION: i16 = 4;
const PRODUCE_VERSION: i16 = 7;

const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const LEADER_NOT_AVAILABLE: i16 = 5;
const NOT_LEADER_OR_FOLLOWER: i16 = 6;

/// Where produces for one partition go, and the connection they use. One
/// connection per partition: requests on a connection are answered in order, so
/// partitions never wait on each other.
struct PartitionRoute {
    leader: String,
    conn: tokio::sync::Mutex<Option<Connection>>,
}

/// Sends produce requests to partition leaders.
pub(crate) struct Producer {
    config: KafkaConfig,
    routes: Mutex<HashMap<(String, i32), Arc<PartitionRoute>>>,
    metadata: tokio::sync::Mutex<Option<Connection>>,
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
        Producer { config, routes: Mutex::new(HashMap::new()), metadata: tokio::sync::Mutex::new(None) }
    }

    /// Appends `records` as one batch and returns the first offset. Leadership
    /// changes and broken connections are retried within the request timeout.
    pub(crate) async fn produce(&self, topic: &str, partition: i32, records: Vec<Record>) -> Result<i64, ProduceError> {
        let batch = encode_batch(records, self.config.compression).map_err(ProduceError::Other)?;
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500));
        loop {
            let err = match self.try_produce(topic, partition, batch.clone()).await {
                Ok(offset) => return Ok(offset),
                Err(e) => e,
            };
            self.forget(topic, partition);
            let retriable = match &err {
                GroupError::Io(_) => true,
                GroupError::Kafka(code, _) => matches!(*code, LEADER_NOT_AVAILABLE | NOT_LEADER_OR_FOLLOWER),
                GroupError::Protocol(_) | GroupError::Unsupported(_) => false,
            };
            if let GroupError::Kafka(UNKNOWN_TOPIC_OR_PARTITION, _) = err {
                return Err(ProduceError::Unknown);
            }
            match backoff.next_pause_before(deadline) {
                Some(pause) if retriable => tokio::time::sleep(pause).await,
                _ => return Err(ProduceError::Other(to_transport(err))),
            }
        }
    }

    async fn try_produce(&self, topic: &str, partition: i32, batch: Bytes) -> Result<i64, GroupError> {
        let route = self.route(topic, partition).await?;
        let mut slot = route.conn.lock().await;
        let mut conn = match slot.take() {
            Some(c) => c,
            None => Connection::connect(&route.leader, &self.config).await?,
        };
        let req = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(i32::try_from(self.config.request_timeout.as_millis()).unwrap_or(i32::MAX))
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(batch))])]);
        let resp = conn.send(&req, PRODUCE_VERSION, Duration::ZERO).await?;
        // Only a connection that completed its exchange is reused.
        *slot = Some(conn);
        let part = resp
            .responses
            .iter()
            .flat_map(|t| t.partition_responses.iter())
            .find(|p| p.index == partition)
            .ok_or_else(|| GroupError::Protocol(format!("produce response without {topic}-{partition}")))?;
        if part.error_code != 0 {
            let msg = part.error_message.as_ref().map(|m| format!(" ({})", m.as_str())).unwrap_or_default();
            return Err(GroupError::Kafka(part.error_code, format!("produce to {topic}-{partition}{msg}")));
        }
        Ok(part.base_offset)
    }

    fn forget(&self, topic: &str, partition: i32) {
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&(topic.to_string(), partition));
    }

    async fn route(&self, topic: &str, partition: i32) -> Result<Arc<PartitionRoute>, GroupError> {
        let key = (topic.to_string(), partition);
        if let Some(r) = self.routes.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(Arc::clone(r));
        }
        let leader = self.leader(topic, partition).await?;
        let route = Arc::new(PartitionRoute { leader, conn: tokio::sync::Mutex::new(None) });
        Ok(Arc::clone(self.routes.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_insert(route)))
    }

    /// The partition leader's address, from a metadata request that never creates
    /// the topic.
    pub(crate) async fn leader(&self, topic: &str, partition: i32) -> Result<String, GroupError> {
        let mut slot = self.metadata.lock().await;
        let mut conn = match slot.take() {
            Some(c) => c,
            None => self.connect_bootstrap().await?,
        };
        let req = MetadataRequest::default()
            .with_topics(Some(vec![MetadataRequestTopic::default()
                .with_name(Some(TopicName(StrBytes::from_string(topic.to_string()))))]))
            .with_allow_auto_topic_creation(false);
        let resp = conn.send(&req, METADATA_VERSION, Duration::ZERO).await?;
        *slot = Some(conn);
        let t = resp
            .topics
            .iter()
            .find(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some(topic))
            .ok_or(GroupError::Kafka(UNKNOWN_TOPIC_OR_PARTITION, format!("metadata of {topic}")))?;
        if t.error_code != 0 {
            return Err(GroupError::Kafka(t.error_code, format!("metadata of {topic}")));
        }
        let p = t
            .partitions
            .iter()
            .find(|p| p.partition_index == partition)
            .ok_or(GroupError::Kafka(UNKNOWN_TOPIC_OR_PARTITION, format!("metadata of {topic}-{partition}")))?;
        if p.error_code != 0 && p.error_code != LEADER_NOT_AVAILABLE {
            return Err(GroupError::Kafka(p.error_code, format!("metadata of {topic}-{partition}")));
        }
        resp.brokers
            .iter()
            .find(|b| b.node_id == p.leader_id)
            .map(|b| format!("{}:{}", b.host.as_str(), b.port))
            .ok_or(GroupError::Kafka(LEADER_NOT_AVAILABLE, format!("leader of {topic}-{partition}")))
    }

    async fn connect_bootstrap(&self) -> Result<Connection, GroupError> {
        let mut last = GroupError::Io("no bootstrap servers configured".into());
        for addr in self.config.bootstrap() {
            match Connection::connect(addr, &self.config).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

fn to_transport(e: GroupError) -> TransportError {
    match e {
        GroupError::Io(m) => TransportError::Connection(format!("produce: {m}")),
        other => TransportError::Broker(other.to_string()),
    }
}

/// Our records as one v2 record batch, offsets relative to the batch start.
fn encode_batch(records: Vec<Record>, compression: Compression) -> Result<Bytes, TransportError> {
    let wire: Vec<WireRecord> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut headers = IndexMap::with_capacity(r.headers.len());
            for h in r.headers {
                headers.insert(StrBytes::from_string(h.key.into_owned()), Some(h.value));
            }
            WireRecord {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                // With a constant sequence kafka-protocol's encoder starts a new batch
                // at every record (it splits wherever offset minus sequence changes).
                // Kept on purpose: tansu 0.6 answers a fetch from inside a
                // multi-record batch with copies of the next batch, so a consumer
                // resuming from a committed offset mid-batch would lose records.
                sequence: -1,
                timestamp: r.timestamp_ms,
                key: r.key,
                value: r.value,
                headers,
            }
        })
        .collect();
    let options = RecordEncodeOptions { version: 2, compression: wire_compression(compression) };
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(&mut buf, &wire, &options)
        .map_err(|e| TransportError::Broker(format!("encoding record batch: {e}")))?;
    Ok(buf.freeze())
}

fn wire_compression(c: Compression) -> WireCompression {
    match c {
        Compression::NoCompression => WireCompression::None,
        Compression::Gzip => WireCompression::Gzip,
        Compression::Lz4 => WireCompression::Lz4,
        Compression::Snappy => WireCompression::Snappy,
        Compression::Zstd => WireCompression::Zstd,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::RecordBatchDecoder;

    #[test]
    fn each_record_is_a_batch_of_its_own_so_any_offset_is_a_batch_start() {
        let records: Vec<Record> = (0..5).map(|i| Record::new(Some("k"), format!("value {i}"))).collect();
        let mut bytes = encode_batch(records, Compression::NoCompression).expect("encodes");
        let batches = RecordBatchDecoder::decode_batch_info(&mut bytes).expect("decodes");
        let bases: Vec<i64> = batches.iter().map(|b| b.min_offset).collect();
        assert_eq!(bases, [0, 1, 2, 3, 4]);
        assert!(batches.iter().all(|b| b.record_count == 1 && b.base_sequence == -1 && b.producer_id == -1));
    }
}
