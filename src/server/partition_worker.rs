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
use super::idempotency::{Dedup, Durable, Verdict};
use super::inbound::Inbound;
use super::replier::{Ack, Replier, Route};
use super::router::Router;
use super::stats::ServerCounters;
use crate::error::{excerpt, RemoteError, MAX_ECHO};
use crate::backoff::Backoff;
use crate::tail::Tail;
use crate::transport::{now_ms, ConsumedRecord, OffsetReset, TopicPartition, Transport};

/// Settings every worker of one server follows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerSettings {
    pub(crate) fetch_wait: Duration,
    /// Where to go when the offset is above the high watermark (the broker lost records).
    pub(crate) reset: OffsetReset,
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
    pub(crate) dedup: Option<Dedup>,
}

type Fetch = BoxFuture<'static, (Tail, Option<Vec<ConsumedRecord>>)>;

/// The next records of `tail`, as a future that owns it and so survives loop turns: a
/// completed reply acknowledgement never cancels a fetch in flight.
fn fetch(mut tail: Tail) -> Fetch {
    async move {
        let fetched = tail.next().await;
        (tail, fetched)
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
    // IDEMPOTENCY HOOK (server/idempotency.rs): the partition's window is loaded before
    // its first record is served.
    if let Some(dedup) = &shared.dedup {
        if !dedup.load(&tp, &mut stop).await {
            return;
        }
    }
    let settings = shared.settings;
    // The tail owns fetch retries, log-start and high-watermark resets (one mechanism
    // for every partition reader); this loop owns what happens to each record.
    let (transport, tail_stop) = (shared.transport.clone(), stop.clone());
    let tail_from = |offset| Tail::new(transport.clone(), tp.clone(), offset, settings.reset, settings.fetch_wait, tail_stop.clone());
    let mut pending_fetch = fetch(tail_from(offset));
    let mut worker = Worker { shared, topic, tp: tp.clone(), position, acks: FuturesOrdered::new(), rewind: None };
    let mut rewinds = REWIND;

    'serve: loop {
        let (mut tail, fetched) = tokio::select! {
            biased;
            _ = crate::stop::requested(&mut stop) => break,
            Some(settled) = worker.acks.next() => {
                if worker.settle(settled) {
                    rewinds.reset();
                } else if let Some(at) = worker.rewind.take() {
                    // The fetch in flight may wait for records that never come; read
                    // from the unanswered record with a fresh tail instead.
                    if !pause_before_rewind(&worker.tp, at, &mut rewinds, &mut stop).await {
                        break;
                    }
                    pending_fetch = fetch(tail_from(at));
                }
                continue;
            }
            done = &mut pending_fetch => done,
        };
        let Some(records) = fetched else { break };
        for record in records {
            // Stop taking new records; the one being handled is finished first.
            if *stop.borrow() {
                break 'serve;
            }
            // Bounded memory: read no further while too many replies are unacknowledged.
            while worker.acks.len() >= settings.max_unacknowledged && worker.rewind.is_none() {
                tokio::select! {
                    _ = crate::stop::requested(&mut stop) => break 'serve,
                    Some(settled) = worker.acks.next() => { worker.settle(settled); }
                }
            }
            if worker.rewind.is_some() {
                break;
            }
            let offset = record.offset;
            let mut durable = None;
            let ack = worker.handle(record, &mut stop, &mut durable).await;
            worker.acks.push_back(Settled { offset, ack, durable, answered: true });
        }
        if let Some(at) = worker.rewind.take() {
            if !pause_before_rewind(&worker.tp, at, &mut rewinds, &mut stop).await {
                break;
            }
            tail.seek(at);
        }
        pending_fetch = fetch(tail);
    }
    // Graceful stop: the replies of handled records are produced before the final
    // position is published for the commit; an unanswered one ends the advance.
    while let Some(settled) = worker.acks.next().await {
        if !worker.settle(settled) {
            break;
        }
    }
    if let Some(dedup) = &worker.shared.dedup {
        dedup.release(&worker.tp);
    }
}

/// Pauses before reading an unanswered record again.
const REWIND: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));

/// Nothing was produced for the record at `at` (the broker is unreachable): it is read
/// again after a pause rather than moved past. False when stop came first.
async fn pause_before_rewind(tp: &TopicPartition, at: i64, rewinds: &mut Backoff, stop: &mut watch::Receiver<bool>) -> bool {
    let pause = rewinds.next_pause();
    tracing::warn!(%tp, offset = at, "reply could not be produced; reading the record again in {pause:?}");
    tokio::select! {
        _ = crate::stop::requested(stop) => false,
        _ = tokio::time::sleep(pause) => true,
    }
}

/// The state of one partition's worker.
struct Worker {
    shared: Arc<Shared>,
    topic: Arc<str>,
    tp: TopicPartition,
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
    /// when it needs no reply (event, expired, refused, unreadable). With idempotency,
    /// `durable` receives what resolves once its outcome is recorded durably.
    async fn handle(&self, consumed: ConsumedRecord, stop: &mut watch::Receiver<bool>, durable: &mut Option<Durable>) -> Option<Ack> {
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
        // IDEMPOTENCY HOOK (server/idempotency.rs): a duplicate is answered with its
        // first outcome and not run; a first run's outcome is recorded, and the offset
        // is committed only once that record is durable (`Settled` waits for it).
        let verdict = match &shared.dedup {
            Some(dedup) => dedup.check(&self.tp, &inbound.record, inbound.content_type, counters).await,
            None => Verdict::Run(None),
        };
        let outcome = match verdict {
            Verdict::Answer(earlier) => earlier,
            Verdict::Run(key) => {
                let outcome = self.dispatch(&inbound, now, stop).instrument(span.clone()).await;
                if let (Some(dedup), Some(key)) = (&shared.dedup, key) {
                    *durable = dedup.record(&self.tp, key, inbound.content_type, &outcome, &shared.counters);
                }
                outcome
            }
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
        let mut limit = shared.router.timeout(request_type, &self.topic, shared.settings.handler_timeout);
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
        let dispatch = shared.router.dispatch(request_type, &self.topic, inbound.payload(), inbound.content_type, ctx, limit);
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

/// Resolves to a record's offset and whether it was answered, once its reply (if it
/// has one) was produced. A named future rather than a boxed one: one is queued for
/// every record.
struct Settled {
    offset: i64,
    ack: Option<Ack>,
    /// With idempotency: the record of the outcome becoming durable.
    durable: Option<Durable>,
    /// What `ack` said, kept while `durable` is still pending.
    answered: bool,
}

impl std::future::Future for Settled {
    type Output = (i64, bool);

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<(i64, bool)> {
        let this = self.get_mut();
        if let Some(ack) = this.ack.as_mut() {
            // A dropped acknowledgement means the reply was never produced.
            this.answered = std::task::ready!(std::pin::Pin::new(ack).poll(cx)).unwrap_or(false);
            this.ack = None;
        }
        if let Some(durable) = this.durable.as_mut() {
            // The task only counts and logs; a panic in it is no reason to hold the offset.
            let _ = std::task::ready!(std::pin::Pin::new(durable).poll(cx));
            this.durable = None;
        }
        std::task::Poll::Ready((this.offset, this.answered))
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
