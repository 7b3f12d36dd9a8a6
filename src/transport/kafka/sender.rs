//! A pipelined produce connection to a broker.
//!
//! What the Java client and librdkafka do: partitions led by a broker share a
//! connection to it (the `produce` module opens a few per broker), and whatever callers queued while earlier requests were in
//! flight goes out together as the next produce request, one batch per partition.
//! Up to [`MAX_IN_FLIGHT`] requests are outstanding on the connection at once; the
//! broker answers a connection's requests in order, so responses are matched to
//! requests by position (and checked by correlation id).
//!
//! Per-partition order is not this module's job: the caller (the `produce` module)
//! never has more than one batch of a partition queued or in flight, which is how
//! the Java client keeps order when it "mutes" a partition with a batch in flight.
//! This module only guarantees that each queued batch gets exactly one answer: the
//! partition's result from the broker, or an error when the connection failed
//! (then the batch may or may not have been appended).

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ProduceRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::connection::{Connection, RequestWriter, ResponseReader};
use super::connection::CallError;
use super::KafkaConfig;

/// Produce API version: v3+ carries record batches v2 (needed for producer ids and
/// sequences), v7 is what tansu and every Kafka since 2.1 accept.
pub(crate) const PRODUCE_VERSION: i16 = 7;

/// Requests outstanding on one connection, the Java client's default
/// `max.in.flight.requests.per.connection`.
const MAX_IN_FLIGHT: usize = 5;

/// Batches stop being added to a request once it holds this many bytes (the Java
/// client's default `max.request.size`). A single larger batch still goes alone, so
/// the broker, not this client, decides whether it is too large.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// The answer for one partition's batch: its base offset, or why not.
pub(crate) type Outcome = Result<i64, CallError>;

/// Whoever waits for each batch of one produce request: its topic, partition and answer.
type Waiters = Vec<(Arc<str>, i32, oneshot::Sender<Outcome>)>;

/// One partition's batch waiting for a request.
pub(crate) struct Batch {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    /// Encoded record batches (v2).
    pub(crate) records: Bytes,
    /// Where the outcome goes. A caller that stopped waiting closes it, and the batch
    /// is then dropped unsent if it has not gone out yet.
    pub(crate) reply: oneshot::Sender<Outcome>,
}

/// Handle on a broker's sender task. Dropping it ends the task once the batches
/// already queued are answered.
pub(crate) struct BrokerSender {
    tx: mpsc::UnboundedSender<Batch>,
}

impl BrokerSender {
    /// Starts the sender for the broker at `addr`. It connects on the first batch and
    /// again after any connection failure.
    pub(crate) fn spawn(addr: String, config: KafkaConfig) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(addr, config, rx));
        BrokerSender { tx }
    }

    /// Queues `batch`; hands it back when the task has ended (it never does while
    /// this handle lives, short of a panic, but the caller must not hang on it).
    pub(crate) fn send(&self, batch: Batch) -> Result<(), Batch> {
        self.tx.send(batch).map_err(|mpsc::error::SendError(b)| b)
    }
}

/// A request on the wire, waiting for its response.
struct InFlight {
    correlation: i32,
    deadline: Instant,
    batches: Waiters,
    /// Held until answered: frees one of the connection's in-flight slots.
    _slot: OwnedSemaphorePermit,
}

/// The live connection: the write half here, the read half in its reader task.
struct Link {
    writer: RequestWriter,
    in_flight: mpsc::UnboundedSender<InFlight>,
    slots: Arc<Semaphore>,
}

async fn run(addr: String, config: KafkaConfig, mut rx: mpsc::UnboundedReceiver<Batch>) {
    let mut queued: VecDeque<Batch> = VecDeque::new();
    let mut link: Option<Link> = None;
    loop {
        if queued.is_empty() {
            match rx.recv().await {
                Some(b) => queued.push_back(b),
                None => return,
            }
        }
        // A reader that stopped means the connection failed; what it held was failed
        // by dropping the replies.
        if link.as_ref().is_some_and(|l| l.in_flight.is_closed()) {
            link = None;
        }
        let l = match &mut link {
            Some(l) => l,
            None => match Connection::connect(&addr, &config).await {
                Ok(conn) => link.insert(open(conn)),
                Err(e) => {
                    // Fail what is queued now rather than retry here: the callers own
                    // retries and their deadlines.
                    while rx.try_recv().map(|b| queued.push_back(b)).is_ok() {}
                    for b in queued.drain(..) {
                        let _ = b.reply.send(Err(e.clone()));
                    }
                    continue;
                }
            },
        };
        let slot = match Arc::clone(&l.slots).acquire_owned().await {
            Ok(slot) => slot,
            Err(_) => {
                link = None;
                continue;
            }
        };
        // The reader may have stopped while this waited: a request written now could be
        // appended with nobody left to read its answer.
        if l.in_flight.is_closed() {
            link = None;
            continue;
        }
        // Everything queued while waiting for the slot joins this request.
        while rx.try_recv().map(|b| queued.push_back(b)).is_ok() {}
        queued.retain(|b| !b.reply.is_closed());
        let (request, batches) = take_request(&mut queued, &config);
        if batches.is_empty() {
            continue;
        }
        let write = tokio::time::timeout(config.request_timeout, l.writer.write(&request, PRODUCE_VERSION));
        let correlation = match write.await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                fail(batches, e);
                link = None;
                continue;
            }
            Err(_) => {
                fail(batches, CallError::Io(format!("{addr}: produce request not written within {:?}", config.request_timeout)));
                link = None;
                continue;
            }
        };
        let deadline = crate::clock::instant_after(Instant::now(), config.request_timeout);
        let flight = InFlight { correlation, deadline, batches, _slot: slot };
        if let Err(mpsc::error::SendError(flight)) = l.in_flight.send(flight) {
            fail(flight.batches, CallError::Io(format!("{addr}: connection lost")));
            link = None;
        }
    }
}

/// Splits a fresh connection and starts its reader.
fn open(conn: Connection) -> Link {
    let (writer, reader) = conn.split();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(read_responses(reader, rx));
    Link { writer, in_flight: tx, slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)) }
}

/// Answers requests in the order they were written. On the first failure it stops,
/// dropping every waiting reply (its caller sees a lost connection) and the read half.
async fn read_responses(mut reader: ResponseReader, mut rx: mpsc::UnboundedReceiver<InFlight>) {
    while let Some(flight) = rx.recv().await {
        let read = tokio::time::timeout_at(flight.deadline, reader.read::<ProduceRequest>(flight.correlation, PRODUCE_VERSION));
        let response = match read.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return fail(flight.batches, e),
            Err(_) => return fail(flight.batches, CallError::Io(format!("{}: no produce response in time", reader.addr()))),
        };
        for (topic, partition, reply) in flight.batches {
            let part = response
                .responses
                .iter()
                .filter(|t| t.name.0.as_str() == &*topic)
                .flat_map(|t| t.partition_responses.iter())
                .find(|p| p.index == partition);
            let outcome = match part {
                None => Err(CallError::Protocol(format!("produce response without {topic}-{partition}"))),
                Some(p) if p.error_code != 0 => {
                    let msg = p.error_message.as_ref().map(|m| format!(" ({})", m.as_str())).unwrap_or_default();
                    Err(CallError::Kafka(p.error_code, format!("produce to {topic}-{partition}{msg}")))
                }
                Some(p) => Ok(p.base_offset),
            };
            let _ = reply.send(outcome);
        }
    }
}

fn fail(batches: Waiters, e: CallError) {
    for (_, _, reply) in batches {
        let _ = reply.send(Err(e.clone()));
    }
}

/// Takes batches from the front of `queued` into one request: in queue order, at
/// most one per partition (a second batch of a partition waits for the next
/// request, behind the first), up to [`MAX_REQUEST_BYTES`] but always at least one.
fn take_request(
    queued: &mut VecDeque<Batch>,
    config: &KafkaConfig,
) -> (ProduceRequest, Waiters) {
    let mut topics: Vec<TopicProduceData> = Vec::new();
    let mut batches = Vec::new();
    let mut bytes = 0usize;
    let mut left = VecDeque::new();
    while let Some(b) = queued.pop_front() {
        let taken = batches.iter().any(|(t, p, _): &(Arc<str>, i32, _)| *t == b.topic && *p == b.partition);
        if taken || (!batches.is_empty() && bytes + b.records.len() > MAX_REQUEST_BYTES) {
            left.push_back(b);
            continue;
        }
        bytes += b.records.len();
        let data = PartitionProduceData::default().with_index(b.partition).with_records(Some(b.records));
        match topics.iter_mut().find(|t| t.name.0.as_str() == &*b.topic) {
            Some(t) => t.partition_data.push(data),
            None => topics.push(
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_string(b.topic.to_string())))
                    .with_partition_data(vec![data]),
            ),
        }
        batches.push((b.topic, b.partition, b.reply));
    }
    *queued = left;
    let request = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(i32::try_from(config.request_timeout.as_millis()).unwrap_or(i32::MAX))
        .with_topic_data(topics);
    (request, batches)
}
