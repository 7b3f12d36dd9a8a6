//! One ordered, batching produce path per partition.
//!
//! Every (topic, partition) gets a queue and a task that sends whatever has
//! accumulated as one produce request, one request at a time. That gives the two
//! properties request-reply over Kafka needs: records sent to a partition arrive in
//! the order they were queued (no reordering by concurrent batches or retries), and
//! concurrent callers share produce requests, which is what makes throughput (one
//! record per request caps a broker connection at a few thousand records/s).
//!
//! A failed produce is retried a bounded number of times with backoff. A batch the
//! broker rejects as a whole (one oversized record makes Kafka refuse all of them) is
//! split in halves until the record at fault stands alone, so it fails alone; its tag
//! may then offer a smaller replacement (the server's error reply) that is sent in its
//! place. A queue that stays idle retires its task, so queues for partitions no longer
//! written to do not accumulate.
//!
//! A queue whose last produce carried more than one record is busy: before its next
//! produce it waits the transport's [`busy_linger`](Transport::busy_linger) for more,
//! so load makes batches larger (a fetched burst of replies becomes one batch rather
//! than a lone first record and then the rest), while a partition sending one record
//! at a time sends each at once. A batch of one ends the busy spell.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foldhash::HashMap;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::inbox;
use crate::transport::{ProduceError, Record, TopicPartition, Transport, TransportError};

/// Called with the outcome of each record group sent and the tags of its records, in
/// order. Every queued tag is handed back exactly once.
pub(crate) type OnBatch<M> = Arc<dyn Fn(Result<i64, TransportError>, Vec<M>) + Send + Sync>;

/// What a record's owner attaches to it.
pub(crate) trait Tag: Send + 'static {
    /// A record to send in place of this tag's record, `failed`, once that record
    /// failed for good (retries spent, or refused alone); `None` reports the failure
    /// instead.
    fn fallback(&mut self, _failed: &Record, _error: &TransportError) -> Option<Record> {
        None
    }
}

/// The client's tag: a correlation id, failed to its caller without replacement.
impl Tag for u128 {}

/// Decides when queued records may be sent: the client's in-flight bound. Records
/// stay in their partition's queue until admitted, so admission never reorders them.
pub(crate) trait Gate<M>: Send + Sync + 'static {
    /// Drops entries nobody waits for any more, waits until at least one of the rest
    /// may go, and returns how many from the front may be sent now (0 when none are left).
    fn admit<'a>(&'a self, batch: &'a mut Vec<(Record, M)>) -> futures::future::BoxFuture<'a, usize>;
}

/// Batching and retry settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchConfig {
    /// How long a queue waits for more records after the first one of a batch.
    /// Zero sends at once; batches still form while the previous request is in flight.
    pub linger: Duration,
    /// Most records in one produce request.
    pub max_records: usize,
    /// Produce attempts per record group (1 = no retry).
    pub attempts: u32,
    /// How long a queue may stay empty before its task retires.
    pub idle: Duration,
}

impl BatchConfig {
    /// Settings with no linger, 1,000 records per request, no retry.
    pub(crate) fn new() -> Self {
        BatchConfig { linger: Duration::ZERO, max_records: 1000, attempts: 1, idle: Duration::from_secs(60) }
    }
}

/// Topic → partition → queue.
type Queues<M> = HashMap<Arc<str>, HashMap<i32, Queue<M>>>;

struct Queue<M> {
    tx: Inbox<M>,
    task: JoinHandle<()>,
}

struct Queued<M> {
    queues: Queues<M>,
    closed: bool,
}

/// Ordered, batching producer. Each record carries a tag `M` handed back to the
/// `on_batch` callback so the owner can settle whoever waits on it.
pub(crate) struct OrderedProducer<M: Tag> {
    transport: Arc<dyn Transport>,
    config: BatchConfig,
    on_batch: OnBatch<M>,
    gate: Option<Arc<dyn Gate<M>>>,
    // Keyed by `Arc<str>` so lookups borrow a `&str` instead of allocating a key per record.
    queued: Mutex<Queued<M>>,
    /// Set once by [`flush`](Self::flush): from then on no queue lingers.
    flushing: tokio::sync::watch::Sender<bool>,
}

impl<M: Tag> OrderedProducer<M> {
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        config: BatchConfig,
        on_batch: OnBatch<M>,
        gate: Option<Arc<dyn Gate<M>>>,
    ) -> Self {
        OrderedProducer {
            transport,
            config,
            on_batch,
            gate,
            queued: Mutex::new(Queued { queues: HashMap::default(), closed: false }),
            flushing: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Sends what the queues hold at once, and everything queued from now on without
    /// lingering, as Kafka's producer `flush()` and `close()` make buffered records
    /// sendable at once: an owner winding down waits for its records' outcomes, and a
    /// long linger would hold it that long (or past its bound).
    pub(crate) fn flush(&self) {
        self.flushing.send_replace(true);
    }

    /// Queues `record` for `topic`/`partition`. Returns the record's tag when the
    /// producer has shut down so the caller can fail it.
    pub(crate) fn send(&self, topic: &str, partition: i32, record: Record, tag: M) -> Result<(), M> {
        self.enqueue(topic, partition, record, tag, |_| ())
    }

    /// [`send`](Self::send) for a caller that sends runs of records to one partition:
    /// while `topic` is the very `Arc` and `partition` the one `last` remembers, the
    /// record goes straight to that queue, without the producer's lock and its two
    /// lookups (~270 instructions of an embedded round trip, for the server's replies).
    /// A queue that retired or a producer that closed refuses it, and the record takes
    /// the usual path, which keeps the partition's order.
    pub(crate) fn send_remembering(&self, last: &mut LastQueue<M>, topic: &Arc<str>, partition: i32, record: Record, tag: M) -> Result<(), M> {
        let (record, tag) = match &last.0 {
            Some((t, p, tx)) if Arc::ptr_eq(t, topic) && *p == partition => match tx.send((record, tag)) {
                Ok(()) => return Ok(()),
                Err(item) => item,
            },
            _ => (record, tag),
        };
        last.0 = None;
        let tx = self.enqueue(topic, partition, record, tag, inbox::Sender::clone)?;
        last.0 = Some((topic.clone(), partition, tx));
        Ok(())
    }

    /// Queues `record` and returns what `keep` takes from the sender of the queue it
    /// went to.
    fn enqueue<K>(&self, topic: &str, partition: i32, record: Record, tag: M, keep: impl FnOnce(&Inbox<M>) -> K) -> Result<K, M> {
        let mut queued = self.queued.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if queued.closed {
            return Err(tag);
        }
        let per_topic = match get_mut(&mut queued.queues, topic) {
            Some(per_topic) => per_topic,
            None => {
                reap(&mut queued.queues);
                queued.queues.entry(Arc::from(topic)).or_default()
            }
        };
        let queue = per_topic.entry(partition).or_insert_with(|| self.spawn_queue(topic, partition, None));
        match queue.tx.send((record, tag)) {
            Ok(()) => Ok(keep(&queue.tx)),
            Err(item) => {
                // The queue retired after idling. Its successor starts once the retiring
                // task has sent what it still held, so order survives the hand-over.
                let previous = std::mem::replace(&mut queue.task, tokio::spawn(async {}));
                *queue = self.spawn_queue(topic, partition, Some(previous));
                queue.tx.send(item).map(|()| keep(&queue.tx)).map_err(|(_, tag)| tag)
            }
        }
    }

    /// Queues currently holding a task (for the bound on them).
    #[cfg(test)]
    pub(crate) fn queue_count(&self) -> usize {
        let queued = self.queued.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        queued.queues.values().flat_map(|p| p.values()).filter(|q| !q.task.is_finished()).count()
    }

    fn spawn_queue(&self, topic: &str, partition: i32, after: Option<JoinHandle<()>>) -> Queue<M> {
        let (tx, rx) = inbox::channel();
        let path = Path {
            busy_linger: self.transport.busy_linger(),
            transport: self.transport.clone(),
            topic: topic.to_owned(),
            partition,
            config: self.config,
            on_batch: self.on_batch.clone(),
        };
        let gate = self.gate.clone();
        let flushing = self.flushing.subscribe();
        let task = tokio::spawn(async move {
            if let Some(previous) = after {
                let _ = previous.await;
            }
            drain(path, rx, gate, flushing).await
        });
        Queue { tx, task }
    }

    /// Stops taking records; queued ones are still sent (with their bounded retries).
    /// Resolves when every queue has sent what it held.
    #[cfg(test)]
    pub(crate) async fn close(&self) {
        self.close_within(Duration::MAX).await;
    }

    /// Stops taking records; queued ones are still sent (with their bounded retries)
    /// for up to `timeout`. A queue still sending then is abandoned: its task is
    /// aborted, and whoever waits on its records is never told how they ended (a
    /// transport whose produce never returns would otherwise hold the caller forever).
    /// Returns the partitions of the queues abandoned, in order.
    pub(crate) async fn close_within(&self, timeout: Duration) -> Vec<TopicPartition> {
        self.flush();
        let deadline = crate::clock::instant_after(tokio::time::Instant::now(), timeout);
        let queues: Vec<(TopicPartition, Queue<M>)> = {
            let mut queued = self.queued.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            queued.closed = true;
            queued
                .queues
                .drain()
                .flat_map(|(topic, per_topic)| {
                    per_topic.into_iter().map(move |(partition, queue)| (TopicPartition::new(&*topic, partition), queue))
                })
                .collect()
        };
        // Closed all at once, so every queue starts on its last records now and not
        // after the ones waited for before it.
        let mut tasks = Vec::with_capacity(queues.len());
        for (tp, Queue { tx, task }) in queues {
            // Closing lets the task finish the records it holds and exit, even while a
            // `LastQueue` somewhere still holds a sender (which now fails, and then
            // finds the producer closed).
            tx.close();
            drop(tx);
            tasks.push((tp, task));
        }
        let mut abandoned = Vec::new();
        for (tp, mut task) in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                abandoned.push(tp);
            }
        }
        abandoned.sort();
        abandoned
    }
}

/// Forgets queues whose task retired, so partitions no longer written to cost nothing.
fn reap<M>(queues: &mut Queues<M>) {
    for per_topic in queues.values_mut() {
        per_topic.retain(|_, q| !(q.tx.is_closed() && q.task.is_finished()));
    }
    queues.retain(|_, per_topic| !per_topic.is_empty());
}

fn get_mut<'a, K: Borrow<str> + Hash + Eq, V>(map: &'a mut HashMap<K, V>, key: &str) -> Option<&'a mut V> {
    map.get_mut(key)
}

/// What a queue's inbox carries: each record with its tag.
type Inbox<M> = inbox::Sender<(Record, M)>;

/// The queue a caller of [`OrderedProducer::send_remembering`] sent to last: its
/// topic (the caller's own `Arc`), partition and inbox.
pub(crate) struct LastQueue<M>(Option<(Arc<str>, i32, Inbox<M>)>);

impl<M> Default for LastQueue<M> {
    fn default() -> Self {
        LastQueue(None)
    }
}

/// Where one queue sends, and to whom it reports.
struct Path<M> {
    /// The transport's [`busy_linger`](Transport::busy_linger).
    busy_linger: Duration,
    transport: Arc<dyn Transport>,
    topic: String,
    partition: i32,
    config: BatchConfig,
    on_batch: OnBatch<M>,
}

/// Most records a produce path reserves room for before any arrive (the default
/// batch of 1,000 fits).
const PREALLOCATED_BATCH: usize = 1024;

async fn drain<M: Tag>(
    path: Path<M>,
    mut rx: inbox::Receiver<(Record, M)>,
    gate: Option<Arc<dyn Gate<M>>>,
    mut flushing: tokio::sync::watch::Receiver<bool>,
) {
    let max = path.config.max_records.max(1);
    // Records not yet admitted by the gate stay at the front, ahead of newer ones.
    // Room for `max` only up to a bound: `max` is the user's (`max_batch`, where
    // `usize::MAX` means no limit), and reserving it up front panicked this task with a
    // capacity overflow, or held gigabytes per partition for a large one. The batch
    // grows as records come.
    let mut batch = Vec::with_capacity(max.min(PREALLOCATED_BATCH));
    let mut busy = false;
    loop {
        if batch.is_empty() {
            match tokio::time::timeout(path.config.idle, rx.recv_many(&mut batch, max)).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => {
                    // Idle: refuse new records, then send any that raced in before that.
                    rx.close();
                    if rx.recv_many(&mut batch, max).await == 0 {
                        break;
                    }
                }
            }
            let wait = if busy { path.config.linger.max(path.busy_linger) } else { path.config.linger };
            if !wait.is_zero() {
                linger(&mut rx, &mut batch, max, wait, &mut flushing).await;
            }
        } else {
            let room = max.saturating_sub(batch.len());
            rx.try_recv_many(&mut batch, room);
        }
        let admitted = match &gate {
            Some(gate) => gate.admit(&mut batch).await.min(batch.len()),
            None => batch.len(),
        };
        if admitted == 0 {
            continue;
        }
        let (records, tags): (Vec<Record>, Vec<M>) = batch.drain(..admitted).unzip();
        busy = records.len() > 1;
        deliver(&path, records, tags).await;
    }
}

/// Sends one admitted batch: retried, split when rejected as a whole, failed records
/// replaced by their fallback. Every tag reaches `on_batch` once, in queue order
/// except that replacements follow the records sent before them.
async fn deliver<M: Tag>(path: &Path<M>, records: Vec<Record>, tags: Vec<M>) {
    // A stack instead of recursion; the first half is pushed last so it goes first.
    // `split`: a half of a refused batch. Its refusal is not retried: the batch's own
    // retries ruled out a passing cause, a record at fault is refused every time, and
    // a retried half at every level of the split would hold the partition up for
    // every record the batch held.
    let mut work = vec![(records, tags, false, false)];
    while let Some((records, tags, replacement, split)) = work.pop() {
        let (error, records) = match produce(path, records, !split).await {
            Ok(offset) => {
                (path.on_batch)(Ok(offset), tags);
                continue;
            }
            Err(ProduceError { error, records, .. }) => (error, records),
        };
        if records.len() > 1 && records.len() == tags.len() && matches!(error, TransportError::Broker { .. }) {
            // The broker refused the batch as a whole, which one bad record can cause.
            // Split only what came back whole: halves of a short hand-back would pair
            // tags with other records' outcomes.
            let (mut first, mut first_tags) = (records, tags);
            let mid = first.len() / 2;
            let (second, second_tags) = (first.split_off(mid), first_tags.split_off(mid));
            work.push((second, second_tags, replacement, true));
            work.push((first, first_tags, replacement, true));
            continue;
        }
        tracing::warn!(topic = %path.topic, partition = path.partition, records = records.len(), error = %error, "produce failed");
        if replacement {
            (path.on_batch)(Err(error), tags);
            continue;
        }
        let (mut replacements, mut replaced, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        // The transport hands back the records of a failed produce in their order,
        // which is the tags' order. A tag without its record (a transport breaking
        // that promise) is reported failed, not lost.
        for (i, mut tag) in tags.into_iter().enumerate() {
            match records.get(i).and_then(|failed_record| tag.fallback(failed_record, &error)) {
                Some(record) => {
                    replacements.push(record);
                    replaced.push(tag);
                }
                None => failed.push(tag),
            }
        }
        if !failed.is_empty() {
            (path.on_batch)(Err(error), failed);
        }
        if !replacements.is_empty() {
            work.push((replacements, replaced, true, false));
        }
    }
}

/// One produce with up to `attempts` tries, backing off between them; a refusal
/// (a broker error) is retried only if `retry_refusal`. The transport hands the
/// records back with a failure, so nothing is copied for a retry.
async fn produce<M>(path: &Path<M>, mut records: Vec<Record>, retry_refusal: bool) -> Result<i64, ProduceError> {
    let attempts = path.config.attempts.max(1);
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut attempt = 1;
    let sent = records.len();
    loop {
        match path.transport.produce(&path.topic, path.partition, records).await {
            // Only the records it was given: a transport that handed back fewer (against
            // `ProduceError`'s promise) would have the retry append a subset, or nothing
            // and succeed, and the missing records' tags be reported produced.
            Err(e)
                if attempt < attempts
                    && e.records.len() == sent
                    && (matches!(e.error, TransportError::Connection { .. })
                        || (retry_refusal && matches!(e.error, TransportError::Broker { .. }))) =>
            {
                records = e.records;
                let pause = backoff.next_pause();
                tracing::debug!(topic = %path.topic, partition = path.partition, attempt, "produce failed; retrying in {pause:?}");
                tokio::time::sleep(pause).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Waits up to `linger` for the batch to fill, unless the producer is flushing (see
/// [`OrderedProducer::flush`]), then or now.
async fn linger<M>(
    rx: &mut inbox::Receiver<(Record, M)>,
    batch: &mut Vec<(Record, M)>,
    max: usize,
    linger: Duration,
    flushing: &mut tokio::sync::watch::Receiver<bool>,
) {
    let deadline = tokio::time::sleep(linger);
    tokio::pin!(deadline);
    // Ends at once when flushing, and when the producer is gone (it is closing too).
    let flushed = flushing.wait_for(|flushing| *flushing);
    tokio::pin!(flushed);
    while batch.len() < max {
        let room = max - batch.len();
        tokio::select! {
            biased;
            _ = &mut flushed => break,
            _ = &mut deadline => break,
            n = rx.recv_many(batch, room) => if n == 0 { break },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use crate::transport::embedded::EmbeddedBroker;
    use crate::transport::{GroupMembership, OffsetReset, PartitionReader};
    use async_trait::async_trait;

    /// The embedded broker, refusing any produce that carries a record larger than
    /// `max` bytes, as Kafka refuses a whole batch with MESSAGE_TOO_LARGE; with a busy
    /// linger of `busy`; noting the size of every produce in `sizes`.
    struct SizeLimited {
        inner: EmbeddedBroker,
        max: usize,
        busy: Duration,
        sizes: Arc<Mutex<Vec<usize>>>,
        /// How many records a refusal hands back; fewer than it was given breaks
        /// `ProduceError`'s promise.
        hands_back: usize,
        /// How many produces still fail as if the broker were unreachable.
        unreachable: std::sync::atomic::AtomicUsize,
    }

    impl SizeLimited {
        fn new(inner: EmbeddedBroker) -> Self {
            SizeLimited {
                inner,
                max: usize::MAX,
                busy: Duration::ZERO,
                sizes: Arc::default(),
                hands_back: usize::MAX,
                unreachable: std::sync::atomic::AtomicUsize::new(0),
            }
        }
    }

    #[async_trait]
    impl Transport for SizeLimited {
        async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<i32, TransportError> {
            self.inner.ensure_topic(topic, partitions).await
        }
        async fn partition_count(&self, topic: &str) -> Result<i32, TransportError> {
            self.inner.partition_count(topic).await
        }
        async fn produce(&self, topic: &str, partition: i32, records: Vec<Record>) -> Result<i64, ProduceError> {
            use std::sync::atomic::Ordering::SeqCst;
            if self.unreachable.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(ProduceError::new(TransportError::connection("broker unreachable (test)"), records));
            }
            if records.iter().any(|r| r.value.as_ref().map_or(0, |v| v.len()) > self.max) {
                let records = records.into_iter().take(self.hands_back).collect();
                return Err(ProduceError::new(TransportError::broker("MESSAGE_TOO_LARGE"), records));
            }
            self.sizes.lock().unwrap().push(records.len());
            self.inner.produce(topic, partition, records).await
        }
        async fn latest_offset(&self, topic: &str, partition: i32) -> Result<i64, TransportError> {
            self.inner.latest_offset(topic, partition).await
        }
        async fn reader(&self, topic: &str, partition: i32) -> Result<Box<dyn PartitionReader>, TransportError> {
            self.inner.reader(topic, partition).await
        }
        async fn join_group(&self, g: &str, t: &[String], r: OffsetReset) -> Result<GroupMembership, TransportError> {
            self.inner.join_group(g, t, r).await
        }
        fn busy_linger(&self) -> Duration {
            self.busy
        }
    }

    /// A tag whose record is replaced by a 1-byte one when it fails.
    struct Small(u32);
    impl Tag for Small {
        fn fallback(&mut self, _failed: &Record, _error: &TransportError) -> Option<Record> {
            Some(Record::new(None::<Vec<u8>>, vec![0u8]))
        }
    }

    #[tokio::test]
    async fn one_oversized_record_fails_alone_and_is_replaced() {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", 1).await.unwrap();
        let transport: Arc<dyn Transport> = Arc::new(SizeLimited { max: 100, ..SizeLimited::new(broker.clone()) });
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let seen = outcomes.clone();
        let mut config = BatchConfig::new();
        config.linger = Duration::from_millis(50);
        let producer = OrderedProducer::new(
            transport,
            config,
            Arc::new(move |outcome: Result<i64, TransportError>, tags: Vec<Small>| {
                seen.lock().unwrap().extend(tags.into_iter().map(|t| (t.0, outcome.is_ok())));
            }),
            None,
        );
        for n in 0..9u32 {
            let size = if n == 4 { 1000 } else { 10 };
            producer.send("t", 0, Record::new(None::<Vec<u8>>, vec![n as u8; size]), Small(n)).map_err(|_| ()).unwrap();
        }
        producer.close().await;
        let mut got = outcomes.lock().unwrap().clone();
        got.sort();
        assert_eq!(got, (0..9).map(|n| (n, true)).collect::<Vec<_>>(), "every record or its replacement was produced");
        let mut reader = broker.reader("t", 0).await.unwrap();
        let records = reader.fetch(0, Duration::from_millis(10)).await.unwrap();
        let sizes: Vec<usize> = records.iter().map(|r| r.record.value.as_ref().unwrap().len()).collect();
        assert_eq!(sizes, vec![10, 10, 10, 10, 1, 10, 10, 10, 10], "order kept, the big one replaced in place");
    }

    /// A broker with topic `t` of `partitions`, and a producer to it whose queues
    /// retire after one idle second.
    async fn retiring_after_a_second(partitions: i32) -> (EmbeddedBroker, OrderedProducer<u128>) {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", partitions).await.unwrap();
        let mut config = BatchConfig::new();
        config.idle = Duration::from_secs(1);
        let producer = OrderedProducer::new(Arc::new(broker.clone()), config, Arc::new(|_, _| {}), None);
        (broker, producer)
    }

    #[tokio::test]
    async fn a_refused_record_the_transport_did_not_hand_back_is_reported_not_lost() {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", 1).await.unwrap();
        let transport: Arc<dyn Transport> = Arc::new(SizeLimited { max: 100, hands_back: 0, ..SizeLimited::new(broker) });
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let seen = outcomes.clone();
        let producer = OrderedProducer::new(
            transport,
            BatchConfig::new(),
            Arc::new(move |outcome: Result<i64, TransportError>, tags: Vec<Small>| {
                seen.lock().unwrap().extend(tags.into_iter().map(|t| (t.0, outcome.is_ok())));
            }),
            None,
        );
        producer.send("t", 0, Record::new(None::<Vec<u8>>, vec![1u8; 1000]), Small(7)).map_err(|_| ()).unwrap();
        producer.close().await;
        assert_eq!(*outcomes.lock().unwrap(), [(7, false)], "no record to replace: the tag fails");
    }

    /// Every tag's outcome, in report order: (tag, produced).
    type Outcomes = Arc<Mutex<Vec<(u128, bool)>>>;

    /// A producer over `transport` that lists every tag's outcome.
    fn recording(transport: Arc<dyn Transport>, config: BatchConfig) -> (OrderedProducer<u128>, Outcomes) {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let seen = outcomes.clone();
        let producer = OrderedProducer::new(
            transport,
            config,
            Arc::new(move |outcome: Result<i64, TransportError>, tags: Vec<u128>| {
                seen.lock().unwrap().extend(tags.into_iter().map(|t| (t, outcome.is_ok())));
            }),
            None,
        );
        (producer, outcomes)
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_never_sends_fewer_records_than_it_has_tags_for() {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", 1).await.unwrap();
        let transport: Arc<dyn Transport> = Arc::new(SizeLimited { max: 100, hands_back: 0, ..SizeLimited::new(broker.clone()) });
        let mut config = BatchConfig::new();
        config.attempts = 3;
        let (producer, outcomes) = recording(transport, config);
        producer.send("t", 0, Record::new(None::<Vec<u8>>, vec![1u8; 1000]), 7).unwrap();
        producer.close().await;
        assert_eq!(broker.latest_offset("t", 0).await.unwrap(), 0, "nothing was appended");
        assert_eq!(*outcomes.lock().unwrap(), [(7, false)], "a record that was never appended is not reported produced");
    }

    /// Splitting a refused batch finds the records at fault; retrying each half as
    /// well only holds the partition up (the server retries five times: 750 ms a call).
    #[tokio::test(start_paused = true)]
    async fn the_halves_of_a_refused_batch_are_not_retried_for_the_refusal() {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", 1).await.unwrap();
        // Every record too large: each is refused, alone or in any batch.
        let transport: Arc<dyn Transport> = Arc::new(SizeLimited { max: 0, ..SizeLimited::new(broker) });
        let mut config = BatchConfig::new();
        config.attempts = 5;
        config.linger = Duration::from_millis(1);
        let (producer, outcomes) = recording(transport, config);
        for n in 0..64u128 {
            producer.send("t", 0, Record::new(None::<Vec<u8>>, vec![1u8]), n).unwrap();
        }
        let start = tokio::time::Instant::now();
        producer.close().await;
        assert_eq!(outcomes.lock().unwrap().len(), 64, "every record reported");
        assert!(outcomes.lock().unwrap().iter().all(|(_, ok)| !ok), "every record refused");
        // The batch's own four pauses (50 + 100 + 200 + 400 ms) and the linger.
        assert!(start.elapsed() < Duration::from_secs(1), "64 refused records held the partition for {:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_split_never_pairs_a_tag_with_another_record() {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", 1).await.unwrap();
        // Refused as a whole for its first record, with all but the last handed back.
        let transport: Arc<dyn Transport> = Arc::new(SizeLimited { max: 100, hands_back: 3, ..SizeLimited::new(broker.clone()) });
        let mut config = BatchConfig::new();
        config.linger = Duration::from_millis(50);
        let (producer, outcomes) = recording(transport, config);
        for n in 0..4u8 {
            let size = if n == 0 { 1000 } else { 10 };
            producer.send("t", 0, Record::new(None::<Vec<u8>>, vec![n; size]), u128::from(n)).unwrap();
        }
        producer.close().await;
        let appended = broker.latest_offset("t", 0).await.unwrap();
        let reported = outcomes.lock().unwrap().iter().filter(|(_, ok)| *ok).count() as i64;
        assert_eq!(reported, appended, "as many records reported produced as were appended: {:?}", outcomes.lock().unwrap());
    }

    /// "A retry never reorders a partition": a batch whose produce fails once (the
    /// broker unreachable) is retried whole and in its order, and the records queued
    /// behind it while it waits go after it; every tag is reported in queue order.
    #[tokio::test(start_paused = true)]
    async fn a_retried_batch_keeps_its_order_and_its_place_in_the_partition() {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", 1).await.unwrap();
        let transport = SizeLimited::new(broker.clone());
        transport.unreachable.store(1, std::sync::atomic::Ordering::SeqCst);
        let transport = Arc::new(transport);
        let mut config = BatchConfig::new();
        config.attempts = 5;
        config.max_records = 4;
        let (producer, outcomes) = recording(transport.clone(), config);
        // Four records queued before the queue's task first runs: one batch of four.
        for n in 0..4u8 {
            producer.send("t", 0, Record::new(None::<Vec<u8>>, vec![n]), u128::from(n)).unwrap();
        }
        // Queued while that batch fails and backs off.
        tokio::task::yield_now().await;
        for n in 4..8u8 {
            producer.send("t", 0, Record::new(None::<Vec<u8>>, vec![n]), u128::from(n)).unwrap();
        }
        producer.close().await;
        assert_eq!(transport.unreachable.load(std::sync::atomic::Ordering::SeqCst), 0, "the first attempt failed");
        assert_eq!(transport.sizes.lock().unwrap()[0], 4, "the retried batch went whole");
        let mut reader = broker.reader("t", 0).await.unwrap();
        let values: Vec<u8> = reader.fetch(0, Duration::ZERO).await.unwrap().iter().map(|r| r.record.value.as_ref().unwrap()[0]).collect();
        assert_eq!(values, (0..8).collect::<Vec<u8>>(), "appended once each, in queue order");
        assert_eq!(*outcomes.lock().unwrap(), (0..8u128).map(|n| (n, true)).collect::<Vec<_>>(), "reported in queue order");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_queues_retire_and_come_back_in_order() {
        let (broker, producer) = retiring_after_a_second(8).await;
        for p in 0..8 {
            producer.send("t", p, Record::new(None::<Vec<u8>>, vec![1]), 0).unwrap();
        }
        assert_eq!(producer.queue_count(), 8);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(producer.queue_count(), 0, "idle queues retire their tasks");
        producer.send("t", 0, Record::new(None::<Vec<u8>>, vec![2]), 0).unwrap();
        producer.close().await;
        let mut reader = broker.reader("t", 0).await.unwrap();
        let values: Vec<u8> = reader.fetch(0, Duration::ZERO).await.unwrap().iter().map(|r| r.record.value.as_ref().unwrap()[0]).collect();
        assert_eq!(values, vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_remembered_queue_keeps_order_across_retirement() {
        let (broker, producer) = retiring_after_a_second(2).await;
        let topic: Arc<str> = Arc::from("t");
        let record = |v: u8| Record::new(None::<Vec<u8>>, vec![v]);
        let mut last = LastQueue::default();
        producer.send_remembering(&mut last, &topic, 0, record(1), 0).unwrap();
        producer.send("t", 0, record(2), 0).unwrap();
        producer.send_remembering(&mut last, &topic, 0, record(3), 0).unwrap();
        producer.send_remembering(&mut last, &topic, 1, record(9), 0).unwrap();
        producer.send_remembering(&mut last, &topic, 0, record(4), 0).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(producer.queue_count(), 0, "idle queues retire although a sender is remembered");
        producer.send_remembering(&mut last, &topic, 0, record(5), 0).unwrap();
        producer.close().await;
        assert_eq!(producer.send_remembering(&mut last, &topic, 0, record(6), 7), Err(7), "a closed producer refuses");
        let mut reader = broker.reader("t", 0).await.unwrap();
        let values: Vec<u8> = reader.fetch(0, Duration::ZERO).await.unwrap().iter().map(|r| r.record.value.as_ref().unwrap()[0]).collect();
        assert_eq!(values, vec![1, 2, 3, 4, 5], "one order for remembered and plain sends, across the retirement");
    }

    #[tokio::test(start_paused = true)]
    async fn close_does_not_wait_for_a_remembered_sender() {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", 1).await.unwrap();
        // Idle retirement (60 s) would end the queue too; close must not need it.
        let producer: OrderedProducer<u128> = OrderedProducer::new(Arc::new(broker.clone()), BatchConfig::new(), Arc::new(|_, _| {}), None);
        let mut last = LastQueue::default();
        producer.send_remembering(&mut last, &Arc::from("t"), 0, Record::new(None::<Vec<u8>>, vec![1]), 0).unwrap();
        tokio::time::timeout(Duration::from_secs(10), producer.close()).await.expect("closed while a sender is remembered");
        assert_eq!(broker.latest_offset("t", 0).await.unwrap(), 1, "what was queued was produced");
    }

    /// Sends `n` records to `t`-0 at once and returns how long (paused time) until
    /// every one was produced.
    async fn burst(producer: &OrderedProducer<u128>, produced: &mut mpsc::UnboundedReceiver<usize>, n: usize) -> Duration {
        let start = tokio::time::Instant::now();
        for _ in 0..n {
            producer.send("t", 0, Record::new(None::<Vec<u8>>, vec![1]), 0).unwrap();
        }
        let mut got = 0;
        while got < n {
            got += produced.recv().await.unwrap();
        }
        start.elapsed()
    }

    /// A quiet partition sends at once; one whose last batch held several records waits
    /// the busy linger and sends what came meanwhile as one batch.
    #[tokio::test(start_paused = true)]
    async fn only_a_busy_partition_lingers() {
        const BUSY: Duration = Duration::from_millis(20);
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("t", 1).await.unwrap();
        let transport = Arc::new(SizeLimited { busy: BUSY, ..SizeLimited::new(broker) });
        let sizes = transport.sizes.clone();
        let (done, mut produced) = mpsc::unbounded_channel();
        let producer = Arc::new(OrderedProducer::new(
            transport,
            BatchConfig::new(),
            Arc::new(move |_: Result<i64, TransportError>, tags: Vec<u128>| {
                let _ = done.send(tags.len());
            }),
            None,
        ));
        assert_eq!(burst(&producer, &mut produced, 1).await, Duration::ZERO, "quiet: sent at once");
        assert_eq!(burst(&producer, &mut produced, 2).await, Duration::ZERO, "a burst's first batch goes at once");
        // Busy now: the next record waits, and two arriving 5 ms later join its batch.
        let late = producer.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            for _ in 0..2 {
                late.send("t", 0, Record::new(None::<Vec<u8>>, vec![1]), 0).unwrap();
            }
        });
        assert_eq!(burst(&producer, &mut produced, 1).await, BUSY, "waited the busy linger");
        assert_eq!(burst(&producer, &mut produced, 1).await, BUSY, "still busy after a batch of three");
        assert_eq!(burst(&producer, &mut produced, 1).await, Duration::ZERO, "a batch of one: quiet again");
        assert_eq!(*sizes.lock().unwrap(), vec![1, 2, 3, 1, 1]);
    }
}
