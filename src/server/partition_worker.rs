//! One task per owned partition: reads it in order, runs each request to completion
//! before the next, and hands replies to the [`Replier`].
//!
//! Strict per-partition order is the property that replaces locks: all requests for
//! one key are handled one after another by one worker. Each record goes through the
//! same stages: decode ([`Inbound`]) → deadline and reply-address policy → idempotency
//! hook → dispatch with a time limit → reply → acknowledgement. Replies are produced
//! without holding up the next record; the committable position advances only past
//! records that were answered (or needed no answer). If a reply cannot be produced at
//! all, the worker rewinds to that record and reads it again, so nothing is skipped.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tracing::Instrument;

use super::handler::{Cancellation, Context, StateMap};
use super::inbound::Inbound;
use super::replier::{Ack, Replier, Route};
use super::router::Router;
use super::stats::ServerCounters;
use crate::error::{excerpt, RemoteError, MAX_ECHO};
use crate::transport::{now_ms, ConsumedRecord, PartitionReader, TopicPartition, Transport, TransportError};

/// Settings every worker of one server follows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerSettings {
    pub(crate) fetch_wait: Duration,
    /// Limit for handlers that set none of their own.
    pub(crate) handler_timeout: Duration,
    /// Most records handled but not yet acknowledged; reading pauses at the bound.
    pub(crate) max_unacknowledged: usize,
}

/// What every worker of one server shares.
pub(crate) struct Shared {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) router: Router,
    pub(crate) state: Arc<StateMap>,
    pub(crate) replier: Replier,
    pub(crate) counters: Arc<ServerCounters>,
    pub(crate) settings: WorkerSettings,
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
    offset: i64,
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
    let mut worker = Worker { shared, topic, tp, offset, position, acks: FuturesOrdered::new(), rewind: None };
    // The fetch future owns the reader and survives loop turns, so a completed reply
    // acknowledgement never cancels a fetch in flight.
    let mut pending_fetch = fetch(reader, offset, worker.shared.settings.fetch_wait);
    let mut backoff = Duration::from_millis(10);

    'serve: loop {
        let (reader, fetched) = tokio::select! {
            biased;
            _ = crate::stop::requested(&mut stop) => break,
            Some(settled) = worker.acks.next() => {
                worker.settle(settled);
                continue;
            }
            done = &mut pending_fetch => done,
        };
        let records = match fetched {
            _ if worker.rewind.is_some() => Vec::new(),
            Ok(records) => {
                backoff = Duration::from_millis(10);
                records
            }
            Err(TransportError::OffsetOutOfRange { earliest, .. }) if earliest > worker.offset => {
                tracing::warn!(tp = %worker.tp, offset = worker.offset, earliest, "requests were deleted before they were read; skipping ahead");
                worker.offset = earliest;
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(tp = %worker.tp, error = %e, "fetch failed; retrying in {backoff:?}");
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
                break 'serve;
            }
            // Bounded memory: read no further while too many replies are unacknowledged.
            while worker.acks.len() >= worker.shared.settings.max_unacknowledged && worker.rewind.is_none() {
                tokio::select! {
                    _ = crate::stop::requested(&mut stop) => break 'serve,
                    Some(settled) = worker.acks.next() => { worker.settle(settled); }
                }
            }
            if worker.rewind.is_some() {
                break;
            }
            let next = record.offset + 1;
            let ack = worker.handle(record, &mut stop).await;
            worker.acks.push_back(Settled { offset: next - 1, ack });
            worker.offset = next;
        }
        if let Some(at) = worker.rewind.take() {
            // Nothing was produced for the record at `at` (the broker is unreachable):
            // read it again after a pause rather than move past it.
            tracing::warn!(tp = %worker.tp, offset = at, "reply could not be produced; reading the record again");
            worker.offset = at;
            tokio::select! {
                _ = crate::stop::requested(&mut stop) => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        pending_fetch = fetch(reader, worker.offset, worker.shared.settings.fetch_wait);
    }
    // Graceful stop: the replies of handled records are produced before the final
    // position is published for the commit; an unanswered one ends the advance.
    while let Some(settled) = worker.acks.next().await {
        if !worker.settle(settled) {
            break;
        }
    }
}

/// The state of one partition's worker.
struct Worker {
    shared: Arc<Shared>,
    topic: Arc<str>,
    tp: TopicPartition,
    /// Next offset to read.
    offset: i64,
    /// Next offset to commit, read by the commit loop.
    position: Arc<AtomicI64>,
    acks: FuturesOrdered<Settled>,
    /// The offset to read again, set when a record could not be answered.
    rewind: Option<i64>,
}

impl Worker {
    /// Applies a record's settlement: advances the position past it, or, when it was
    /// not answered, drops the later acknowledgements and rewinds to it. Returns
    /// whether the position advanced.
    fn settle(&mut self, (offset, answered): (i64, bool)) -> bool {
        if answered {
            self.position.store(offset + 1, Ordering::Release);
            return true;
        }
        // Later records are read again too; their replies may arrive twice, which a
        // client ignores (it matches one reply per correlation id).
        self.acks = FuturesOrdered::new();
        self.rewind = Some(offset);
        false
    }

    /// Takes one record through the stages; returns its acknowledgement, or `None`
    /// when it needs no reply (event, expired, refused, unreadable).
    async fn handle(&self, consumed: ConsumedRecord, stop: &mut watch::Receiver<bool>) -> Option<Ack> {
        let shared = &*self.shared;
        let counters = &shared.counters;
        let (partition, offset) = (consumed.partition, consumed.offset);
        let inbound = match Inbound::decode(consumed) {
            Ok(inbound) => inbound,
            Err(e) => {
                // Without trustworthy reply headers there is nowhere safe to answer.
                counters.unroutable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(topic = %self.topic, partition, offset, error = %excerpt(e.to_string(), MAX_ECHO), "skipping request with malformed headers");
                return None;
            }
        };
        let now = now_ms();
        if inbound.expired(now) {
            counters.expired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(offset, "skipping request past its deadline");
            return None;
        }
        let address = match &inbound.reply_to {
            Some(reply_to) => match shared.replier.route(&inbound, reply_to).await {
                Route::To(address) => Some(address),
                Route::Refused => return None,
                Route::Unknown => return Some(unanswered()),
            },
            None => None,
        };

        let span = tracing::debug_span!(
            "rpc.handle",
            correlation_id = %CorrelationId(inbound.correlation_id.as_deref()),
            request_type = %excerpt(inbound.request_type.as_deref().unwrap_or(""), MAX_ECHO),
            partition,
            offset,
        );
        let outcome = match idempotency_check(shared, &inbound).await {
            Some(earlier) => earlier,
            None => self.dispatch(&inbound, now, stop).instrument(span.clone()).await,
        };

        let Some(address) = address else {
            counters.events.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = &outcome {
                tracing::warn!(parent: &span, error = %excerpt(e.to_string(), MAX_ECHO), "event handler failed");
            }
            return None;
        };
        Some(shared.replier.send(&inbound, &address, outcome))
    }

    /// Runs the handler, limited by its timeout (the server default unless it set one)
    /// and by what is left of the request's deadline. Stopping the worker (revocation,
    /// shutdown) fires the handler's cancellation; the handler is still awaited, and
    /// the group loop bounds that wait.
    async fn dispatch(&self, inbound: &Inbound, now: i64, stop: &mut watch::Receiver<bool>) -> Result<Vec<u8>, RemoteError> {
        let shared = &*self.shared;
        let request_type = inbound.request_type.as_deref();
        let mut limit = shared.router.timeout(request_type, shared.settings.handler_timeout);
        if let Some(left) = inbound.remaining(now) {
            limit = limit.min(left);
        }
        let cancellation = Cancellation::default();
        let ctx = Context {
            topic: self.topic.clone(),
            partition: inbound.partition,
            offset: inbound.offset,
            record: inbound.record.clone(),
            correlation_id: inbound.correlation_id.clone().filter(|_| inbound.expects_reply()),
            deadline: inbound.deadline(),
            state: shared.state.clone(),
            cancellation: cancellation.clone(),
        };
        let dispatch = shared.router.dispatch(request_type, inbound.payload(), inbound.content_type, ctx, limit);
        tokio::pin!(dispatch);
        let outcome = tokio::select! {
            outcome = &mut dispatch => outcome,
            _ = crate::stop::requested(stop) => {
                cancellation.cancel();
                dispatch.await
            }
        };
        shared.counters.record_outcome(&outcome);
        outcome
    }
}

/// An acknowledgement that reports the record unanswered, so the worker reads it again.
fn unanswered() -> Ack {
    let (ack, acked) = tokio::sync::oneshot::channel();
    let _ = ack.send(false);
    acked
}

/// IDEMPOTENCY HOOK: where a request that was already answered is recognised and its
/// first outcome returned instead of running the handler again. `None` runs the
/// handler. The dedup store plugs in here (and records outcomes next to
/// [`Replier::send`]); until then every delivery runs.
async fn idempotency_check(_shared: &Shared, _inbound: &Inbound) -> Option<Result<Vec<u8>, RemoteError>> {
    None
}

/// Resolves to a record's offset and whether it was answered, once its reply (if it
/// has one) was produced. A named future rather than a boxed one: one is queued for
/// every record.
struct Settled {
    offset: i64,
    ack: Option<Ack>,
}

impl std::future::Future for Settled {
    type Output = (i64, bool);

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<(i64, bool)> {
        let this = self.get_mut();
        let answered = match this.ack.as_mut() {
            // A dropped acknowledgement means the reply was never produced.
            Some(ack) => std::task::ready!(std::pin::Pin::new(ack).poll(cx)).unwrap_or(false),
            None => true,
        };
        std::task::Poll::Ready((this.offset, answered))
    }
}

/// Shows a correlation id as a UUID when it is 16 bytes, else as (bounded) hex.
struct CorrelationId<'a>(Option<&'a [u8]>);

impl std::fmt::Display for CorrelationId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("-"),
            Some(id) => match <[u8; 16]>::try_from(id) {
                Ok(bytes) => write!(f, "{}", uuid::Uuid::from_bytes(bytes)),
                Err(_) => {
                    id.iter().take(MAX_ECHO / 2).try_for_each(|b| write!(f, "{b:02x}"))?;
                    if id.len() > MAX_ECHO / 2 {
                        f.write_str("…")?;
                    }
                    Ok(())
                }
            },
        }
    }
}
