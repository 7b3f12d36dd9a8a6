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
//!
//! Requests of a type served by a batch handler are collected from one fetch, in order
//! and up to `max_batch`, and dispatched together; the batch settles as one unit, so
//! the position moves past it only when every one of its replies was produced.

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
use super::replier::{Ack, Address, Replier, Route};
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
    /// Most requests passed to one batch-handler call.
    pub(crate) max_batch: usize,
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
    let mut worker = Worker { shared, topic, tp, offset, position, acks: FuturesOrdered::new(), rewind: None, batch: Vec::new() };
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
            let offset = record.offset;
            match worker.prepare(record).await {
                Prepared::Ready(ready) if worker.shared.router.is_batch(ready.inbound.request_type.as_deref()) => {
                    let joins = worker.batch.first().is_none_or(|first| first.inbound.request_type == ready.inbound.request_type);
                    if !joins || worker.batch.len() >= worker.shared.settings.max_batch {
                        worker.flush_batch(&mut stop).await;
                    }
                    worker.batch.push(*ready);
                }
                prepared => {
                    // Records settle in offset order: a collected batch goes first.
                    worker.flush_batch(&mut stop).await;
                    let ack = match prepared {
                        Prepared::Done(ack) => ack,
                        Prepared::Ready(ready) => {
                            let outcome = match ready.earlier {
                                Some(earlier) => earlier,
                                None => worker.dispatch(&ready.inbound, ready.now, &mut stop).instrument(ready.span.clone()).await,
                            };
                            worker.finish(&ready.inbound, ready.address.as_ref(), &ready.span, outcome)
                        }
                    };
                    worker.acks.push_back(Settled { first: offset, offset, ack, more: Vec::new(), answered: true });
                    worker.offset = offset + 1;
                }
            }
        }
        if worker.rewind.is_none() && !*stop.borrow() {
            // A batch never spans fetches: what one fetch returned is what is at hand.
            worker.flush_batch(&mut stop).await;
        }
        // Collected but not dispatched (stop or rewind): those records are read again.
        worker.batch.clear();
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
    /// Requests collected for one batch-handler call: consecutive, of one type.
    batch: Vec<Ready>,
}

/// A record that passed decoding and the policies and waits for its handler.
struct Ready {
    inbound: Inbound,
    address: Option<Address>,
    span: tracing::Span,
    now: i64,
    /// The outcome of an earlier delivery, from the idempotency hook.
    earlier: Option<Result<Vec<u8>, RemoteError>>,
}

/// Where a record stands after the checks that come before its handler.
enum Prepared {
    /// Settled without a handler: its acknowledgement, or `None` when no reply is due.
    Done(Option<Ack>),
    /// Its handler is to run (boxed: it is many times the size of the other variant).
    Ready(Box<Ready>),
}

impl Worker {
    /// Applies a record's settlement: advances the position past it, or, when it was
    /// not answered, drops the later acknowledgements and rewinds to it. Returns
    /// whether the position advanced.
    fn settle(&mut self, (first, offset, answered): (i64, i64, bool)) -> bool {
        if answered {
            self.position.store(offset + 1, Ordering::Release);
            return true;
        }
        let offset = first;
        // Later records are read again too; their replies may arrive twice, which a
        // client ignores (it matches one reply per correlation id).
        self.acks = FuturesOrdered::new();
        self.rewind = Some(offset);
        false
    }

    /// Takes one record through the stages before its handler: decoding, deadline,
    /// reply-address policy, idempotency.
    async fn prepare(&self, consumed: ConsumedRecord) -> Prepared {
        let shared = &*self.shared;
        let counters = &shared.counters;
        let (partition, offset) = (consumed.partition, consumed.offset);
        let inbound = match Inbound::decode(consumed) {
            Ok(inbound) => inbound,
            Err(e) => {
                // Without trustworthy reply headers there is nowhere safe to answer.
                counters.unroutable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(topic = %self.topic, partition, offset, error = %excerpt(e.to_string(), MAX_ECHO), "skipping request with malformed headers");
                return Prepared::Done(None);
            }
        };
        let now = now_ms();
        if inbound.expired(now) {
            counters.expired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(offset, "skipping request past its deadline");
            return Prepared::Done(None);
        }
        let address = match &inbound.reply_to {
            Some(reply_to) => match shared.replier.route(&inbound, reply_to).await {
                Route::To(address) => Some(address),
                Route::Refused => return Prepared::Done(None),
                Route::Unknown => return Prepared::Done(Some(unanswered())),
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
        let earlier = idempotency_check(shared, &inbound).await;
        Prepared::Ready(Box::new(Ready { inbound, address, span, now, earlier }))
    }

    /// Answers a handled record; returns its acknowledgement, or `None` for an event.
    fn finish(&self, inbound: &Inbound, address: Option<&Address>, span: &tracing::Span, outcome: Result<Vec<u8>, RemoteError>) -> Option<Ack> {
        let Some(address) = address else {
            self.shared.counters.events.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = &outcome {
                tracing::warn!(parent: span, error = %excerpt(e.to_string(), MAX_ECHO), "event handler failed");
            }
            return None;
        };
        Some(self.shared.replier.send(inbound, address, outcome))
    }

    /// Runs the collected batch through its handler in one call, answers each request,
    /// and queues one settlement for the whole batch: the position passes it only when
    /// every reply was produced, and an unanswered one rewinds to the batch's start.
    async fn flush_batch(&mut self, stop: &mut watch::Receiver<bool>) {
        let batch = std::mem::take(&mut self.batch);
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else { return };
        let (first_offset, last_offset) = (first.inbound.offset, last.inbound.offset);
        let shared = Arc::clone(&self.shared);
        let request_type = first.inbound.request_type.clone().unwrap_or_default();
        let mut limit = shared.router.timeout(Some(&request_type), shared.settings.handler_timeout);
        for ready in &batch {
            if let Some(left) = ready.inbound.remaining(ready.now) {
                limit = limit.min(left);
            }
        }
        // Requests answered before (idempotency hook) keep that answer and skip the call.
        let cancellation = Cancellation::default();
        let to_run: Vec<usize> = batch.iter().enumerate().filter(|(_, r)| r.earlier.is_none()).map(|(i, _)| i).collect();
        // The call borrows the payloads; it ends before the batch is consumed below.
        let outcomes = {
            let items = to_run
                .iter()
                .map(|&i| {
                    let inbound = &batch[i].inbound;
                    (inbound.payload(), inbound.content_type, self.context(inbound, cancellation.clone()))
                })
                .collect();
            let dispatch = shared.router.dispatch_batch(&request_type, items, limit);
            tokio::pin!(dispatch);
            tokio::select! {
                outcomes = &mut dispatch => outcomes,
                _ = crate::stop::requested(stop) => {
                    cancellation.cancel();
                    dispatch.await
                }
            }
        };
        let mut outcomes = to_run.into_iter().zip(outcomes).peekable();
        let mut acks = Vec::with_capacity(batch.len());
        for (i, ready) in batch.into_iter().enumerate() {
            let outcome = match (ready.earlier, outcomes.peek()) {
                (Some(earlier), _) => earlier,
                (None, Some((j, _))) if *j == i => match outcomes.next() {
                    Some((_, outcome)) => {
                        shared.counters.record_outcome(&outcome);
                        outcome
                    }
                    None => Err(RemoteError::with_code(crate::error::ErrorCode::HandlerError, "batch outcome missing")),
                },
                (None, _) => Err(RemoteError::with_code(crate::error::ErrorCode::HandlerError, "batch outcome missing")),
            };
            if let Some(ack) = self.finish(&ready.inbound, ready.address.as_ref(), &ready.span, outcome) {
                acks.push(ack);
            }
        }
        let mut acks = acks.into_iter();
        let ack = acks.next();
        self.acks.push_back(Settled { first: first_offset, offset: last_offset, ack, more: acks.collect(), answered: true });
        self.offset = last_offset + 1;
    }

    /// The context a handler sees for `inbound`.
    fn context(&self, inbound: &Inbound, cancellation: Cancellation) -> Context {
        Context {
            topic: self.topic.clone(),
            partition: inbound.partition,
            offset: inbound.offset,
            record: inbound.record.clone(),
            correlation_id: inbound.correlation_id.clone().filter(|_| inbound.expects_reply()),
            deadline: inbound.deadline(),
            state: self.shared.state.clone(),
            cancellation,
        }
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
        let ctx = self.context(inbound, cancellation.clone());
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

/// Resolves to the offsets of a record (or of a batch, `first..=offset`) and whether
/// all of it was answered, once its replies were produced. A named future rather than
/// a boxed one: one is queued for every record.
struct Settled {
    first: i64,
    offset: i64,
    ack: Option<Ack>,
    /// The other replies of a batch; empty (no allocation) for a single record.
    more: Vec<Ack>,
    /// Whether every acknowledgement resolved so far said "produced"; starts true.
    answered: bool,
}

impl std::future::Future for Settled {
    type Output = (i64, i64, bool);

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<(i64, i64, bool)> {
        let this = self.get_mut();
        // A dropped acknowledgement means the reply was never produced. Each one is
        // taken once it resolved, so a later poll does not wait on it again.
        if let Some(ack) = this.ack.as_mut() {
            this.answered &= std::task::ready!(std::pin::Pin::new(ack).poll(cx)).unwrap_or(false);
            this.ack = None;
        }
        while let Some(ack) = this.more.last_mut() {
            this.answered &= std::task::ready!(std::pin::Pin::new(ack).poll(cx)).unwrap_or(false);
            this.more.pop();
        }
        std::task::Poll::Ready((this.first, this.offset, this.answered))
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
