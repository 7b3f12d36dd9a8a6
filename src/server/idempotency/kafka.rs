//! A window that survives restarts: written through to a topic, reloaded on assignment.
//!
//! The window topic is co-partitioned with the request topic, as Kafka Streams keeps a
//! state store's changelog: the replies of request partition `p` go to window partition
//! `p`, so whichever member owns `p` reads exactly its window, and only that member
//! writes it. Records are keyed by idempotency key and never null (a null value is a
//! tombstone in a compacted topic); see [`window_record`] for the layout.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{oneshot, OnceCell};

use super::memory::MemoryWindow;
use super::{IdempotencyStore, StoreError, StoredReply};
use crate::backoff::Backoff;
use crate::producer::{BatchConfig, OrderedProducer, Tag};
use crate::clock::now_ms;
use crate::transport::{Record, TopicPartition, Transport, TransportError};
use crate::wire;

/// Produce attempts per window write (the producer retries with backoff, and splits a
/// batch the broker refuses as a whole).
const WRITE_ATTEMPTS: u32 = 4;
/// Pauses between rounds of attempts while the window's broker is unreachable.
const UNREACHABLE: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
/// Consecutive empty fetches tolerated below the high watermark while loading.
const LOAD_EMPTY_FETCHES: u32 = 50;

/// A [`MemoryWindow`] written through to a Kafka topic, so that a restarted server, or
/// the member a partition moves to, still answers the keys it holds.
///
/// - On assignment of request partition `p`, the server reads window partition `p` —
///   its last `capacity` records, skipping those older than `max_age` — before serving
///   any request of `p`. Loading costs one read of at most `capacity` records.
/// - Each first reply is in the in-memory window at once and written to the topic; the
///   request's offset is committed only after the broker acknowledged that write.
/// - The topic is created (with the request topic's partition count) when missing. Only
///   the [`Transport`] is used, so topic settings cannot be passed: on a production
///   cluster create it yourself with `cleanup.policy=compact,delete` and `retention.ms`
///   above `max_age`, so the log stays small. Without compaction (the embedded broker,
///   tansu) the window is still correct, because loading reads only the last
///   `capacity` offsets; the topic just keeps what its retention keeps.
pub struct KafkaWindow {
    transport: Arc<dyn Transport>,
    topic: String,
    window: MemoryWindow,
    /// Shared with the writes still waiting to be made durable, which send again.
    writes: Arc<OrderedProducer<WindowWrite>>,
    partitions: OnceCell<i32>,
}

impl KafkaWindow {
    /// A window kept in `topic` (for example `<request topic>.idempotency`), with the
    /// default bounds of [`MemoryWindow::new`].
    pub fn new(transport: impl Transport, topic: impl Into<String>) -> Self {
        let transport: Arc<dyn Transport> = Arc::new(transport);
        let writes = Arc::new(OrderedProducer::new(
            transport.clone(),
            BatchConfig { attempts: WRITE_ATTEMPTS, ..BatchConfig::new() },
            Arc::new(|outcome: Result<i64, TransportError>, writes: Vec<WindowWrite>| {
                // As for replies: only a broker that answered has refused for good.
                let written = match outcome {
                    Ok(_) => Written::Yes,
                    Err(TransportError::Connection { .. } | TransportError::Closed) => Written::Unreachable,
                    Err(_) => Written::Refused,
                };
                for WindowWrite(ack) in writes {
                    let _ = ack.send(written);
                }
            }),
            None,
        ));
        KafkaWindow { transport, topic: topic.into(), window: MemoryWindow::new(), writes, partitions: OnceCell::new() }
    }

    /// How many replies each partition keeps, and reads back on assignment.
    pub fn capacity(mut self, replies: usize) -> Self {
        self.window = self.window.capacity(replies);
        self
    }

    /// How long a reply stays in the window.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.window = self.window.max_age(age);
        self
    }

    /// The window topic's partition count, creating the topic with as many partitions as
    /// the request topic has when it is missing.
    async fn window_partitions(&self, request_topic: &str) -> Result<i32, StoreError> {
        let count = self
            .partitions
            .get_or_try_init(|| async {
                let wanted = self.transport.partition_count(request_topic).await?;
                self.transport.ensure_topic(&self.topic, wanted).await
            })
            .await?;
        Ok(*count)
    }
}

#[async_trait]
impl IdempotencyStore for KafkaWindow {
    async fn load(&self, tp: &TopicPartition) -> Result<(), StoreError> {
        let mut partitions = self.window_partitions(&tp.topic).await?;
        if tp.partition >= partitions {
            // The count kept is from the first load: ask again before refusing, or the
            // remedy (more window partitions; the request topic's may have grown) would
            // never take without a restart, however often the load is retried.
            partitions = self.transport.partition_count(&self.topic).await?;
        }
        if tp.partition >= partitions {
            // In i64: the partition is the group leader's (any client may lead) or the
            // caller's to name, and one more than `i32::MAX` overflows an i32.
            return Err(StoreError::Misconfigured(format!(
                "window topic `{}` has {partitions} partitions; request partition {tp} needs at least {}",
                self.topic,
                i64::from(tp.partition) + 1
            )));
        }
        // A window from an earlier ownership may miss what another member wrote since.
        self.window.forget(tp);
        let end = self.transport.latest_offset(&self.topic, tp.partition).await?;
        let capacity = i64::try_from(self.window.capacity_per_partition()).unwrap_or(i64::MAX);
        let mut offset = end.saturating_sub(capacity).max(0);
        let mut reader = self.transport.reader(&self.topic, tp.partition).await?;
        let oldest = now_ms().saturating_sub(self.window.max_age_ms());
        let (mut loaded, mut empty) = (0u64, 0u32);
        while offset < end {
            let fetch = match reader.read(offset, Duration::from_millis(100)).await {
                Ok(fetch) => fetch,
                // Retention removed the start of the range: what is left is all there is.
                Err(TransportError::OffsetOutOfRange { earliest, .. }) if earliest > offset => {
                    offset = earliest;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            // Past offsets holding nothing to read too (markers, unreadable batches): a
            // read that passed only those is progress, not an empty fetch.
            let (records, moved) = (fetch.records, fetch.next_offset > offset);
            if records.is_empty() && moved {
                offset = fetch.next_offset;
                continue;
            }
            if records.is_empty() {
                empty += 1;
                if empty >= LOAD_EMPTY_FETCHES {
                    // Below the high watermark yet nothing comes (e.g. aborted
                    // transactional data): serve with what was read rather than never.
                    tracing::warn!(%tp, offset, end, "idempotency window stopped short of its end; serving with what was read");
                    break;
                }
                continue;
            }
            empty = 0;
            for consumed in records {
                // Cannot overflow: a consumed offset is below i64::MAX (`ConsumedRecord::offset`).
                offset = consumed.offset + 1;
                if consumed.offset >= end || consumed.record.timestamp_ms < oldest {
                    continue;
                }
                match read_window_record(&consumed.record) {
                    Some((key, reply)) => {
                        self.window.insert(tp, key, reply, consumed.record.timestamp_ms);
                        loaded += 1;
                    }
                    None => tracing::warn!(%tp, offset = consumed.offset, "skipping an unreadable idempotency window record"),
                }
            }
            offset = offset.max(fetch.next_offset);
        }
        tracing::info!(%tp, window = %self.topic, loaded, "idempotency window loaded");
        Ok(())
    }

    async fn lookup(&self, partition: &TopicPartition, key: &[u8]) -> Result<Option<StoredReply>, StoreError> {
        Ok(self.window.get(partition, key))
    }

    fn record(&self, tp: &TopicPartition, key: Bytes, reply: StoredReply) -> BoxFuture<'static, Result<(), StoreError>> {
        let record = window_record(key.clone(), &reply);
        self.window.insert(tp, key, reply, record.timestamp_ms);
        let (writes, topic, partition) = (self.writes.clone(), self.topic.clone(), tp.partition);
        async move {
            let mut pauses = UNREACHABLE;
            loop {
                let (ack, acked) = oneshot::channel();
                if writes.send(&topic, partition, record.clone(), WindowWrite(ack)).is_err() {
                    return Err(StoreError::Transport(TransportError::Closed));
                }
                match acked.await {
                    Ok(Written::Yes) => return Ok(()),
                    // The offset waits for this record, as it waits for a reply while
                    // the broker is unreachable: given up, the record's request would be
                    // committed without it and a copy of it run again after a hand-over.
                    Ok(Written::Unreachable) => tokio::time::sleep(pauses.next_pause()).await,
                    // The producer logged the broker's error when it gave up.
                    _ => {
                        return Err(StoreError::Transport(TransportError::broker(format!(
                            "window record for partition {partition} of `{topic}` refused after {WRITE_ATTEMPTS} attempts"
                        ))))
                    }
                }
            }
        }
        .boxed()
    }

    fn release(&self, tp: &TopicPartition) {
        // Reloaded from the topic if the partition comes back; meanwhile its owner
        // writes records this copy would not see.
        self.window.forget(tp);
    }
}

/// A window write in the producer's queue: settled with how its produce ended.
struct WindowWrite(oneshot::Sender<Written>);

/// How a window write's produce ended.
#[derive(Clone, Copy)]
enum Written {
    /// The broker acknowledged it.
    Yes,
    /// The broker could not be reached: it is sent again.
    Unreachable,
    /// The broker refused it: retrying cannot help.
    Refused,
}

/// Failed window writes are reported, not replaced by something smaller.
impl Tag for WindowWrite {}

/// A window record: key = idempotency key, headers as on a reply (codec, error code and
/// message) and the answering handler's name as a request's type header, value = the
/// encoded response, or empty for an error (never null).
fn window_record(key: Bytes, reply: &StoredReply) -> Record {
    let outcome = reply.outcome.clone().map(|bytes| bytes.to_vec());
    let mut record = wire::reply_record(wire::Peer::Native, Some(key.clone()), key, reply.content_type, outcome, now_ms());
    record.value.get_or_insert_with(Bytes::new);
    if let Some(handler) = &reply.handler {
        record.headers.push(wire::header(wire::names::TYPE, handler.clone()));
    }
    record
}

/// Reads a window record back; `None` when it is not one.
fn read_window_record(record: &Record) -> Option<(Bytes, StoredReply)> {
    let key = record.key.clone()?;
    let meta = wire::decode_reply(record);
    let outcome = match meta.error {
        Some(error) => Err(error),
        None => Ok(record.value.clone()?),
    };
    // The window's own records always name a codec this build knows.
    let mut reply = StoredReply::new(meta.content_type.unwrap_or_default(), outcome);
    // Records written before the handler was kept have none: not checked. A copy, as
    // the key of a first run is: kept for `max_age`, a slice would hold its fetch's buffer.
    reply.handler = record.header(wire::names::TYPE).map(|name| Bytes::copy_from_slice(name));
    Some((key, reply))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::ContentType;
    use crate::error::{ErrorCode, RemoteError};

    #[test]
    fn window_records_round_trip_and_are_never_tombstones() {
        for (outcome, handler) in [
            (Ok(Bytes::from_static(b"\x01\x02")), Some(Bytes::from_static(b"payments.pay"))),
            (Ok(Bytes::new()), None),
            (Err(RemoteError::with_code(ErrorCode::HandlerError, "no")), Some(Bytes::from_static(b"payments.refund"))),
        ] {
            let mut reply = StoredReply::new(ContentType::Json, outcome);
            reply.handler = handler;
            let record = window_record(Bytes::from_static(b"key-1"), &reply);
            assert!(record.value.is_some(), "a null value would be deleted by compaction");
            assert_eq!(read_window_record(&record), Some((Bytes::from_static(b"key-1"), reply)));
        }
    }

    #[test]
    fn a_record_without_a_key_is_not_a_window_record() {
        assert_eq!(read_window_record(&Record::new(None::<Vec<u8>>, b"x".to_vec())), None);
    }
}
