//! One ordered, batching produce path per partition.
//!
//! Every (topic, partition) gets a queue and a task that sends whatever has
//! accumulated as one produce request, one request at a time. That gives the two
//! properties request-reply over Kafka needs: records sent to a partition arrive in
//! the order they were queued (no reordering by concurrent batches or retries), and
//! concurrent callers share produce requests, which is what makes throughput (one
//! record per request caps a broker connection at a few thousand records/s).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::transport::{Record, Transport, TransportError};

/// Called once per produce request with its outcome and the tags of its records, in order.
pub(crate) type OnBatch<M> = Arc<dyn Fn(Result<i64, TransportError>, Vec<M>) + Send + Sync>;

/// Decides when queued records may be sent: the client's in-flight bound. Records
/// stay in their partition's queue until admitted, so admission never reorders them.
pub(crate) trait Gate<M>: Send + Sync + 'static {
    /// Drops entries nobody waits for any more, waits until at least one of the rest
    /// may go, and returns how many from the front may be sent now (0 when none are left).
    fn admit<'a>(&'a self, batch: &'a mut Vec<(Record, M)>) -> futures::future::BoxFuture<'a, usize>;
}

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchConfig {
    /// How long a queue waits for more records after the first one of a batch.
    /// Zero sends at once; batches still form while the previous request is in flight.
    pub linger: Duration,
    /// Most records in one produce request.
    pub max_records: usize,
}

/// Topic → partition → queue.
type Queues<M> = HashMap<Arc<str>, HashMap<i32, Queue<M>>>;

struct Queue<M> {
    tx: mpsc::UnboundedSender<(Record, M)>,
    task: tokio::task::JoinHandle<()>,
}

/// Ordered, batching producer. Each record carries a tag `M` handed back to the
/// `on_batch` callback so the owner can settle whoever waits on it.
pub(crate) struct OrderedProducer<M: Send + 'static> {
    transport: Arc<dyn Transport>,
    config: BatchConfig,
    on_batch: OnBatch<M>,
    gate: Option<Arc<dyn Gate<M>>>,
    // Keyed by `Arc<str>` so lookups borrow a `&str` instead of allocating a key per record.
    queues: Mutex<Queues<M>>,
}

impl<M: Send + 'static> OrderedProducer<M> {
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        config: BatchConfig,
        on_batch: OnBatch<M>,
        gate: Option<Arc<dyn Gate<M>>>,
    ) -> Self {
        OrderedProducer { transport, config, on_batch, gate, queues: Mutex::new(HashMap::new()) }
    }

    /// Queues `record` for `topic`/`partition`. Returns the record's tag when the
    /// producer has shut down so the caller can fail it.
    pub(crate) fn send(&self, topic: &str, partition: i32, record: Record, tag: M) -> Result<(), M> {
        let mut queues = self.queues.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let per_topic = match get_mut(&mut queues, topic) {
            Some(per_topic) => per_topic,
            None => queues.entry(Arc::from(topic)).or_default(),
        };
        let queue = per_topic.entry(partition).or_insert_with(|| self.spawn_queue(topic, partition));
        queue.tx.send((record, tag)).map_err(|mpsc::error::SendError((_, tag))| tag)
    }

    fn spawn_queue(&self, topic: &str, partition: i32) -> Queue<M> {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(drain(
            self.transport.clone(),
            topic.to_owned(),
            partition,
            rx,
            self.config,
            self.on_batch.clone(),
            self.gate.clone(),
        ));
        Queue { tx, task }
    }

    /// Stops taking records; queued ones are still sent. Resolves when every queue has
    /// sent what it held.
    pub(crate) async fn close(&self) {
        let queues: Vec<Queue<M>> = {
            let mut map = self.queues.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            map.drain().flat_map(|(_, per_topic)| per_topic.into_values()).collect()
        };
        for Queue { tx, task } in queues {
            // Dropping the sender lets the task finish the records it holds and exit.
            drop(tx);
            let _ = task.await;
        }
    }
}

fn get_mut<'a, K: Borrow<str> + Hash + Eq, V>(map: &'a mut HashMap<K, V>, key: &str) -> Option<&'a mut V> {
    map.get_mut(key)
}

async fn drain<M: Send + 'static>(
    transport: Arc<dyn Transport>,
    topic: String,
    partition: i32,
    mut rx: mpsc::UnboundedReceiver<(Record, M)>,
    config: BatchConfig,
    on_batch: OnBatch<M>,
    gate: Option<Arc<dyn Gate<M>>>,
) {
    let max = config.max_records.max(1);
    // Records not yet admitted by the gate stay at the front, ahead of newer ones.
    let mut batch = Vec::with_capacity(max);
    loop {
        if batch.is_empty() {
            if rx.recv_many(&mut batch, max).await == 0 {
                break;
            }
            if !config.linger.is_zero() {
                linger(&mut rx, &mut batch, max, config.linger).await;
            }
        } else {
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
        }
        let admitted = match &gate {
            Some(gate) => gate.admit(&mut batch).await.min(batch.len()),
            None => batch.len(),
        };
        if admitted == 0 {
            continue;
        }
        let (records, tags): (Vec<Record>, Vec<M>) = batch.drain(..admitted).unzip();
        let outcome = transport.produce(&topic, partition, records).await;
        if let Err(e) = &outcome {
            tracing::warn!(%topic, partition, error = %e, "produce failed");
        }
        on_batch(outcome, tags);
    }
}

/// Waits up to `linger` for the batch to fill.
async fn linger<M>(rx: &mut mpsc::UnboundedReceiver<(Record, M)>, batch: &mut Vec<(Record, M)>, max: usize, linger: Duration) {
    let deadline = tokio::time::sleep(linger);
    tokio::pin!(deadline);
    while batch.len() < max {
        let room = max - batch.len();
        tokio::select! {
            _ = &mut deadline => break,
            n = rx.recv_many(batch, room) => if n == 0 { break },
        }
    }
}
