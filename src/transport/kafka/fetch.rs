//! A partition reader over the transport's per-broker fetch
//! [session](super::session). The answer's batches are decoded by
//! [`record_batch`](super::record_batch); what cannot be read is counted and logged here
//! and skipped, so the partition moves on.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;

use super::connection::CallError;
use super::session::{Outcome, Registration};
use super::KafkaTransport;
use crate::transport::{Fetch, PartitionReader, TopicPartition, Transport, TransportError};

const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;

/// Reads one partition through the fetch session of its leader.
pub(super) struct KafkaReader {
    transport: KafkaTransport,
    tp: TopicPartition,
    /// Registered with the leader's session at the first fetch; dropped when the
    /// leader may have moved, so the next fetch looks it up again.
    registration: Option<Registration>,
    /// The end (exclusive) of the last stretch of offsets found to hold nothing
    /// readable, and its start: a fetch from inside it starts after it, so an
    /// unreadable batch is skipped and counted once. Forgotten when an out-of-range
    /// answer makes the caller jump: what it says is of a log that may be gone.
    skipped: Option<(i64, i64)>,
}

impl KafkaReader {
    pub(super) fn new(transport: KafkaTransport, tp: TopicPartition) -> Self {
        KafkaReader { transport, tp, registration: None, skipped: None }
    }

    async fn registration(&mut self, offset: i64) -> Result<&Registration, TransportError> {
        if self.registration.is_none() {
            let leader = match self.transport.inner.producer.leader(&self.tp.topic, self.tp.partition).await {
                Ok(l) => l,
                Err(e) => return Err(to_transport(&self.transport, &self.tp, e).await),
            };
            let registered = self.transport.session(&leader).register(self.tp.clone(), offset);
            self.registration = Some(registered);
        }
        self.registration.as_ref().ok_or(TransportError::Closed)
    }
}

/// A fetch failure as the seam's error, telling an unknown topic from an unknown
/// partition (the broker uses one code for both).
pub(super) async fn to_transport(transport: &KafkaTransport, tp: &TopicPartition, e: CallError) -> TransportError {
    match e {
        CallError::Kafka(UNKNOWN_TOPIC_OR_PARTITION, _) => match transport.partition_count(&tp.topic).await {
            Ok(_) => TransportError::UnknownPartition { topic: tp.topic.clone(), partition: tp.partition },
            Err(e) => e,
        },
        e @ CallError::Io(_) => TransportError::connection(format!("fetch {tp}")).caused_by(e),
        other => TransportError::broker(format!("fetch {tp}")).caused_by(other),
    }
}

#[async_trait]
impl PartitionReader for KafkaReader {
    async fn read(&mut self, offset: i64, max_wait: Duration) -> Result<Fetch, TransportError> {
        let mut offset = offset;
        if let Some((from, to)) = self.skipped {
            if (from..to).contains(&offset) {
                offset = to;
            }
        }
        let deadline = crate::clock::instant_after(tokio::time::Instant::now(), max_wait);
        let Some(answer) = self.registration(offset).await?.next(offset, deadline).await else {
            return Ok(Fetch { records: Vec::new(), next_offset: offset });
        };
        let fetched = match answer.outcome {
            Outcome::Fetched(f) => f,
            Outcome::OutOfRange { earliest, latest } => {
                let (earliest, latest) = match (earliest, latest) {
                    (Some(earliest), Some(latest)) => (earliest, latest),
                    // Apache Kafka does not name the log's ends in an out-of-range
                    // answer; the caller resumes from them, so they are looked up (as
                    // the Java consumer does), and a failed look-up is the error.
                    _ => self.transport.log_ends(&self.tp.topic, self.tp.partition).await?,
                };
                if !(earliest..=latest).contains(&offset) {
                    // The caller jumps (`Tail::next`). Below the log start the stretch
                    // was deleted anyway; above the end the broker lost records, and the
                    // offsets found unreadable may hold readable records of a new log.
                    self.skipped = None;
                }
                return Err(TransportError::OffsetOutOfRange { tp: self.tp.clone(), offset, earliest, latest });
            }
            Outcome::Failed { error, reroute } => {
                if reroute {
                    self.registration = None;
                }
                return Err(to_transport(&self.transport, &self.tp, error).await);
            }
        };
        for bad in &fetched.unreadable {
            self.transport.inner.unreadable.fetch_add(bad.records(), Ordering::Relaxed);
            metrics::counter!(crate::metrics::TRANSPORT_UNREADABLE, "topic" => self.tp.topic.clone()).increment(bad.records());
            tracing::warn!(
                tp = %self.tp, from = bad.from, to = bad.to, reason = %bad.reason,
                "skipping a record batch that cannot be decoded"
            );
            self.skipped = Some((bad.from, bad.to));
        }
        // Past the last record and past whatever came after it that is not handed out
        // (transaction markers, unreadable batches), as the session's position already
        // is: the caller's next read asks from where the session fetches next. Without
        // this a partition ending in a commit marker was never read to its end.
        let after_last = fetched.records.last().map_or(offset, |last| last.offset + 1);
        let next_offset = fetched.next.max(after_last);
        if fetched.records.is_empty() && next_offset > offset {
            // Only offsets that hold nothing to hand out: a caller that still asks from
            // `offset` (through `fetch`) is moved past them rather than reading them again.
            self.skipped = Some((offset, next_offset));
        }
        Ok(Fetch { records: fetched.records, next_offset })
    }
}
