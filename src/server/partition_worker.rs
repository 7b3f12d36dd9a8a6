//! One task per owned partition: reads it in order, runs each request to completion
//! before the next, and sends replies.
//!
//! Strict per-partition order is the property that replaces locks: all requests for
//! one key are handled one after another by one worker. Replies are produced without
//! holding up the next record; the committable position advances only past records
//! whose reply (if any) the broker has acknowledged.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use dashmap::DashMap;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use super::handler::{Context, StateMap};
use super::router::Router;
use super::stats::ServerCounters;
use crate::partitioner::partition_for_key;
use crate::producer::OrderedProducer;
use crate::transport::{now_ms, ConsumedRecord, PartitionReader, TopicPartition, Transport, TransportError};
use crate::wire;

/// What every worker of one server shares.
pub(crate) struct Shared {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) router: Router,
    pub(crate) state: Arc<StateMap>,
    pub(crate) replies: OrderedProducer<oneshot::Sender<bool>>,
    pub(crate) counters: Arc<ServerCounters>,
    pub(crate) fetch_wait: Duration,
    pub(crate) reply_partition_counts: DashMap<String, i32>,
    /// Reply conventions forced by the builder; `None` answers each caller in its own.
    pub(crate) peer: Option<wire::Peer>,
}

type Fetch = BoxFuture<'static, (Box<dyn PartitionReader>, Result<Vec<ConsumedRecord>, TransportError>)>;

fn fetch(mut reader: Box<dyn PartitionReader>, offset: i64, wait: Duration) -> Fetch {
    async move {
        let fetched = reader.fetch(offset, wait).await;
        (reader, fetched)
    }
    .boxed()
}

/// Runs partition `tp` from `offset` until `stop` turns true, then waits for the
/// replies it sent and returns. `position` always holds the next offset to commit.
pub(crate) async fn run(
    shared: Arc<Shared>,
    tp: TopicPartition,
    mut offset: i64,
    position: Arc<AtomicI64>,
    mut stop: watch::Receiver<bool>,
) {
    let topic: Arc<str> = Arc::from(tp.topic.as_str());
    let reader = loop {
        match shared.transport.reader(&tp.topic, tp.partition).await {
            Ok(reader) => break reader,
            Err(e) => {
                tracing::warn!(%tp, error = %e, "cannot open partition; retrying");
                tokio::select! {
                    _ = crate::stop::requested(&mut stop) => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    };
    // The fetch future owns the reader and survives loop turns, so a completed reply
    // acknowledgement never cancels a fetch in flight.
    let mut pending_fetch = fetch(reader, offset, shared.fetch_wait);
    let mut acks: FuturesOrdered<Settled> = FuturesOrdered::new();
    let mut backoff = Duration::from_millis(10);

    loop {
        let (reader, fetched) = tokio::select! {
            biased;
            _ = crate::stop::requested(&mut stop) => break,
            Some(next) = acks.next() => {
                position.store(next, Ordering::Release);
                continue;
            }
            done = &mut pending_fetch => done,
        };
        let records = match fetched {
            Ok(records) => {
                backoff = Duration::from_millis(10);
                records
            }
            Err(TransportError::OffsetOutOfRange { earliest, .. }) if earliest > offset => {
                tracing::warn!(%tp, offset, earliest, "requests were deleted before they were read; skipping ahead");
                offset = earliest;
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(%tp, error = %e, "fetch failed; retrying in {backoff:?}");
                tokio::select! {
                    _ = crate::stop::requested(&mut stop) => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                Vec::new()
            }
        };
        for record in records {
            // Stop taking new records; the one being handled is finished first.
            if *stop.borrow() {
                break;
            }
            let next = record.offset + 1;
            let reply = handle(&shared, &topic, record).await;
            acks.push_back(Settled { next, reply });
            offset = next;
        }
        pending_fetch = fetch(reader, offset, shared.fetch_wait);
    }
    // Graceful stop: the replies of handled records are produced before the final
    // position is published for the commit.
    while let Some(next) = acks.next().await {
        position.store(next, Ordering::Release);
    }
}

/// Resolves to the offset after a record once its reply, if it has one, was produced.
/// A named future rather than a boxed one: one is queued for every record.
struct Settled {
    next: i64,
    reply: Option<oneshot::Receiver<bool>>,
}

impl std::future::Future for Settled {
    type Output = i64;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<i64> {
        let this = self.get_mut();
        if let Some(reply) = this.reply.as_mut() {
            // Produced or failed, the record is settled either way (failures are counted
            // where the batch outcome is known).
            let _ = std::task::ready!(std::pin::Pin::new(reply).poll(cx));
        }
        std::task::Poll::Ready(this.next)
    }
}

/// Handles one record; returns a receiver that resolves when its reply was produced,
/// or `None` when no reply is due (event, expired, unroutable).
async fn handle(shared: &Shared, topic: &Arc<str>, consumed: ConsumedRecord) -> Option<oneshot::Receiver<bool>> {
    let counters = &shared.counters;
    let meta = match wire::decode_request(&consumed.record) {
        Ok(meta) => meta,
        Err(e) => {
            // Without trustworthy reply headers there is nowhere safe to answer.
            counters.unroutable.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%topic, partition = consumed.partition, offset = consumed.offset, error = %e, "skipping request with malformed headers");
            return None;
        }
    };
    if let Some(deadline) = meta.deadline_ms {
        if now_ms() > deadline {
            counters.expired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(offset = consumed.offset, "skipping request past its deadline");
            return None;
        }
    }
    let reply_to = meta.reply_to.filter(|_| meta.correlation_id.is_some());
    let span = tracing::debug_span!(
        "rpc.handle",
        correlation_id = %CorrelationId(meta.correlation_id.as_deref()),
        request_type = meta.request_type.as_deref().unwrap_or(""),
        partition = consumed.partition,
        offset = consumed.offset,
    );
    let ctx = Context {
        topic: topic.clone(),
        partition: consumed.partition,
        offset: consumed.offset,
        record: consumed.record.clone(),
        correlation_id: reply_to.as_ref().and(meta.correlation_id.clone()),
        deadline: meta.deadline_ms.and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms.max(0) as u64))),
        state: shared.state.clone(),
    };
    let payload = consumed.record.value.as_deref().unwrap_or_default();
    let outcome = shared
        .router
        .dispatch(meta.request_type.as_deref(), topic, payload, meta.content_type, ctx)
        .instrument(span.clone())
        .await;
    counters.record_outcome(&outcome);

    let (Some(reply_to), Some(correlation_id)) = (reply_to, meta.correlation_id) else {
        counters.events.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &outcome {
            tracing::warn!(parent: &span, error = %e, "event handler failed");
        }
        return None;
    };
    let key = consumed.record.key.clone();
    let partition = match reply_to.partition {
        Some(p) => p,
        None => reply_partition(shared, &reply_to.topic, key.as_deref()).await,
    };
    let reply = wire::reply_record(shared.peer.unwrap_or(meta.peer), key, correlation_id, meta.content_type, outcome);
    let (ack, acked) = oneshot::channel();
    if shared.replies.send(&reply_to.topic, partition, reply, ack).is_err() {
        return None;
    }
    Some(acked)
}

/// The partition for a reply whose requester did not pin one: by key, as a Kafka
/// producer would choose it.
async fn reply_partition(shared: &Shared, topic: &str, key: Option<&[u8]>) -> i32 {
    let count = match shared.reply_partition_counts.get(topic).map(|c| *c) {
        Some(count) => count,
        None => {
            let count = shared.transport.partition_count(topic).await.unwrap_or(1);
            shared.reply_partition_counts.insert(topic.to_owned(), count);
            count
        }
    };
    key.map(|k| partition_for_key(k, count)).unwrap_or(0)
}

/// Shows a correlation id as a UUID when it is 16 bytes, else as hex.
struct CorrelationId<'a>(Option<&'a [u8]>);

impl std::fmt::Display for CorrelationId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("-"),
            Some(id) => match <[u8; 16]>::try_from(id) {
                Ok(bytes) => write!(f, "{}", uuid::Uuid::from_bytes(bytes)),
                Err(_) => id.iter().try_for_each(|b| write!(f, "{b:02x}")),
            },
        }
    }
}

