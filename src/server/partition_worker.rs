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

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tracing::Instrument;

use super::handler::{Cancellation, Context, StateMap};
use super::idempotency::{Dedup, Durable, Verdict};
use super::inbound::{Inbound, RecentNames};
use super::replier::{Ack, Address, LastReplyQueue, Replier, Route};
use super::settlement::{InOrder, Settled};
use super::reply_policy::LastAllowed;
use super::router::{KeptRoute, Router};
use super::stats::ServerCounters;
use crate::metrics::TypeMetrics;
use crate::error::{excerpt, ErrorCode, RemoteError, MAX_ECHO};
use crate::backoff::Backoff;
use crate::tail::{Step, Tail};
use crate::clock::{ms_after, now_ms};
use crate::transport::{ConsumedRecord, OffsetReset, TopicPartition, Transport};

/// Settings every worker of one server follows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerSettings {
    /// Where to go when the offset is above the high watermark (the broker lost records).
    pub(crate) reset: OffsetReset,
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
    pub(crate) dedup: Option<Dedup>,
}

type Fetch = BoxFuture<'static, (Tail, Option<Step>)>;

/// The next records of `tail`, as a future that owns it and so survives loop turns: a
/// completed reply acknowledgement never cancels a fetch in flight.
fn fetch(mut tail: Tail) -> Fetch {
    async move {
        let fetched = tail.next().await;
        (tail, fetched)
    }
    .boxed()
}

/// What a worker shows the serving loop (`group`), which reads it at commit ticks and
/// when it stops the worker.
#[derive(Debug)]
pub(crate) struct Progress {
    /// The next offset to commit.
    pub(crate) position: AtomicI64,
    /// The worker holds no record it took and has not settled: no handler runs and no
    /// reply is awaited. Stopped now, it abandons nothing. Once stop is signalled an
    /// idle worker stays idle, since it checks the signal before taking each record
    /// and clears this before that check.
    pub(crate) idle: AtomicBool,
}

impl Progress {
    pub(crate) fn new(offset: i64) -> Self {
        Progress { position: AtomicI64::new(offset), idle: AtomicBool::new(true) }
    }
}

/// Runs partition `tp` from `offset` until `stop` turns true, then waits for the
/// replies it sent and returns, keeping `progress` up to date.
pub(crate) async fn run(
    shared: Arc<Shared>,
    tp: TopicPartition,
    offset: i64,
    progress: Arc<Progress>,
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
    let tail_from = |offset| Tail::new(transport.clone(), tp.clone(), offset, settings.reset, tail_stop.clone());
    let mut pending_fetch = fetch(tail_from(offset));
    let mut worker = Worker {
        shared,
        topic,
        tp: tp.clone(),
        progress,
        acks: InOrder::default(),
        rewind: None,
        batch: Vec::new(),
        names: RecentNames::default(),
        last_allowed: LastAllowed::default(),
        last_reply_queue: LastReplyQueue::default(),
        cancellation: Cancellation::default(),
        last_route: None,
    };
    let mut rewinds = REWIND;
    // For the wait on acknowledgements below, which has no fetch to end it. Created
    // once: a fresh wait on the flag at every turn cost more than the rest of the turn.
    let stopped = crate::stop::requested_owned(stop.clone());
    tokio::pin!(stopped);

    'serve: loop {
        // Idle once every record taken has settled (a turn follows each settlement); it
        // turns busy only below, as records are taken.
        if worker.acks.is_empty() {
            worker.progress.idle.store(true, Ordering::Release);
        }
        // The flag is read, not waited on, at each turn: polling the wait here cost
        // ~200 instructions a turn, and the loop turns once per record. A stop that
        // comes while the turn waits still ends it: the fetch in flight watches the
        // same flag and resolves with nothing (`Tail::next`).
        if *stop.borrow() {
            break;
        }
        let (mut tail, fetched) = tokio::select! {
            biased;
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
        // Where the tail passed offsets without records after this read's last record.
        let mut passed = None;
        let records = match fetched {
            None => break,
            Some(Step::Read(records)) => {
                // Before the stop check that precedes taking each record: a worker seen
                // idle after stop was signalled never takes one (`Progress::idle`).
                if !records.is_empty() {
                    worker.progress.idle.store(false, Ordering::SeqCst);
                }
                let after_last = records.last().map_or(i64::MIN, |r| r.offset + 1);
                passed = (tail.position() > after_last).then(|| tail.position());
                records
            }
            Some(Step::Jumped) => {
                // The log under the partition changed (the broker lost records, or
                // deleted them unread). Acknowledgements still pending are for offsets
                // of the old log, so they are forgotten, and the committed offset
                // follows the tail to where it now reads, even downwards, at once (a
                // hand-over may come any moment).
                worker.acks.clear();
                worker.rewind = None;
                worker.progress.position.store(tail.position(), Ordering::Release);
                Vec::new()
            }
        };
        for record in records {
            // Stop taking new records; the one being handled is finished first.
            if *stop.borrow() {
                break 'serve;
            }
            // Bounded memory: read no further while too many replies are unacknowledged.
            while worker.acks.len() >= settings.max_unacknowledged && worker.rewind.is_none() {
                tokio::select! {
                    biased;
                    _ = &mut stopped => break 'serve,
                    Some(settled) = worker.acks.next() => { worker.settle(settled); }
                }
            }
            if worker.rewind.is_some() {
                break;
            }
            let offset = record.offset;
            let mut prepared = worker.prepare(record).await;
            // Whether a batch ran since this record was prepared (and its clock read).
            let mut waited = false;
            if let Prepared::Ready(ready) = &mut prepared {
                // A key run by a collected batch is not in the window until the batch ran:
                // run the batch first, then ask the window again.
                if worker.batch_runs_key(&ready.verdict) {
                    waited = worker.flush_batch(&mut stop).await;
                    if let Some(dedup) = &worker.shared.dedup {
                        let label = || worker.shared.router.route(ready.inbound.request_type.as_deref(), &worker.topic).label;
                        ready.verdict =
                            dedup.check(&worker.tp, &ready.inbound.record, ready.inbound.content_type, label, &worker.shared.counters).await;
                    }
                }
            }
            // A batch request joins the collected batch if it is of the same type and
            // there is room; anything else runs after it (records settle in offset order).
            let (batched, joins) = match &prepared {
                Prepared::Ready(ready) if worker.shared.router.is_batch(ready.inbound.request_type.as_deref(), &worker.topic) => {
                    let same = worker.batch.first().is_none_or(|first| first.inbound.request_type == ready.inbound.request_type);
                    (true, same && worker.batch.len() < settings.max_batch)
                }
                _ => (false, false),
            };
            // Checked here, not only inside: for the usual request (no batch collected)
            // making and dropping the call's future was ~55 instructions a record.
            if !joins && !worker.batch.is_empty() {
                waited |= worker.flush_batch(&mut stop).await;
            }
            if let Prepared::Ready(ready) = &mut prepared {
                // A batch just ran: nothing is collected, and this record settles alone.
                if waited && worker.expired_after_batch(ready) {
                    prepared = Prepared::Done(None);
                }
            }
            match prepared {
                Prepared::Ready(ready) if batched => worker.batch.push(*ready),
                prepared => {
                    let (ack, durable) = match prepared {
                        // Nothing after this record may run before it: read again from here.
                        Prepared::Retry => {
                            worker.rewind = Some(offset);
                            break;
                        }
                        Prepared::Done(ack) => (ack, None),
                        Prepared::Ready(ready) => {
                            let ran = matches!(ready.verdict, Verdict::Run(_));
                            let (outcome, durable, took) = match ready.verdict {
                                Verdict::Answer(earlier) => (earlier, None, Duration::ZERO),
                                Verdict::Run(key) => {
                                    let dispatch = worker.dispatch(&ready.inbound, ready.now, &mut stop);
                                    // A span no subscriber wants is not entered around every
                                    // poll: that wrapper and its move were 1.5 % of a round trip.
                                    let (outcome, took) = if ready.span.is_disabled() {
                                        dispatch.await
                                    } else {
                                        dispatch.instrument(ready.span.clone()).await
                                    };
                                    let (outcome, durable) = worker.record(&ready.inbound, key, outcome);
                                    (outcome, durable, took)
                                }
                            };
                            // Pickup time plus the handler's: saves a clock read and is
                            // well under a millisecond from one.
                            let at_ms = ms_after(ready.now, took);
                            (worker.finish(&ready.inbound, ready.address.as_ref(), &ready.span, outcome, at_ms, ran), durable)
                        }
                    };
                    worker.acks.push_back(Settled::one(offset, ack, durable));
                }
            }
        }
        if worker.rewind.is_none() && !*stop.borrow() {
            // A batch never spans fetches: what one fetch returned is what is at hand.
            worker.flush_batch(&mut stop).await;
            // Every record read was taken, and the tail passed offsets after them that
            // hold nothing to answer (a transactional peer's commit marker, a batch that
            // cannot be decoded). The position may pass them too, but only once every
            // record before them settled (`pass_to`). Without it the committed offset
            // stopped at a trailing marker, and the lag gauge showed 1 for ever.
            if let (None, Some(to)) = (worker.rewind, passed) {
                worker.acks.pass_to(to - 1);
            }
        }
        // Collected but not dispatched (stop or rewind): those records are read again.
        worker.batch.clear();
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
    /// Next offset to commit and whether the worker is idle, read by the serving loop.
    progress: Arc<Progress>,
    acks: InOrder,
    /// The offset to read again, set when a record could not be answered.
    rewind: Option<i64>,
    /// Requests collected for one batch-handler call: consecutive, of one type.
    batch: Vec<Ready>,
    /// The names the last request carried, shared with the next that repeats them.
    names: RecentNames,
    /// The reply topic the last request was allowed to name, with its partition count.
    last_allowed: LastAllowed,
    /// The reply queue the last reply went to.
    last_reply_queue: LastReplyQueue,
    /// The last handler's cancellation, handed to the next while it is reusable.
    cancellation: Cancellation,
    /// The route and metrics of the request type the last request named (the `Arc`
    /// from `names`).
    last_route: Option<(Arc<str>, KeptRoute, TypeMetrics)>,
}

/// A record that passed decoding and the policies and waits for its handler.
struct Ready {
    inbound: Inbound,
    address: Option<Address>,
    span: tracing::Span,
    now: i64,
    /// The idempotency hook's decision: run (and record under a key) or answer.
    verdict: Verdict,
}

/// Where a record stands after the checks that come before its handler.
enum Prepared {
    /// Settled without a handler: its acknowledgement, or `None` when no reply is due.
    Done(Option<Ack>),
    /// Its reply address could not be checked (broker unreachable): read it again.
    Retry,
    /// Its handler is to run (boxed: it is many times the size of the other variant).
    Ready(Box<Ready>),
}

impl Worker {
    /// Applies a record's settlement: advances the position past it, or, when it was
    /// not answered, drops the later acknowledgements and rewinds to it. Returns
    /// whether the position advanced.
    fn settle(&mut self, (first, offset, answered): (i64, i64, bool)) -> bool {
        if answered {
            // Cannot overflow: a consumed offset is below i64::MAX (`ConsumedRecord::offset`).
            self.progress.position.store(offset + 1, Ordering::Release);
            return true;
        }
        // A batch is read again from its first record.
        let offset = first;
        // Later records are read again too; their replies may arrive twice, which a
        // client ignores (it matches one reply per correlation id).
        self.acks.clear();
        self.rewind = Some(offset);
        false
    }

    /// Takes one record through the stages before its handler: decoding, deadline,
    /// reply-address policy, idempotency.
    async fn prepare(&mut self, consumed: ConsumedRecord) -> Prepared {
        let shared = &*self.shared;
        let counters = &shared.counters;
        let (partition, offset) = (consumed.partition, consumed.offset);
        let inbound = match Inbound::decode(consumed, &mut self.names) {
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
            Some(reply_to) => match shared.replier.route(&inbound, reply_to, now, &mut self.last_allowed).await {
                Route::To(address) => Some(address),
                Route::Refused => return Prepared::Done(None),
                Route::Unknown => return Prepared::Retry,
            },
            None => None,
        };
        if let Some(e) = &inbound.unreadable {
            let reason = excerpt(e.to_string(), MAX_ECHO);
            tracing::warn!(topic = %self.topic, partition, offset, error = %reason, "not running a request with unreadable headers");
            if address.is_none() {
                // An event: nobody to tell.
                counters.unroutable.fetch_add(1, Ordering::Relaxed);
                return Prepared::Done(None);
            }
            let error = RemoteError::with_code(ErrorCode::BadRequest, reason);
            counters.refused(shared.router.route(inbound.request_type.as_deref(), &self.topic).label, &error);
            let verdict = Verdict::Answer(Err(error));
            let span = tracing::Span::none();
            return Prepared::Ready(Box::new(Ready { inbound, address, span, now, verdict }));
        }

        let span = tracing::debug_span!(
            "rpc.handle",
            correlation_id = %CorrelationId(inbound.correlation_id.as_deref()),
            request_type = %excerpt(inbound.request_type.as_deref().unwrap_or(""), MAX_ECHO),
            partition,
            offset,
        );
        crate::trace::extract(&inbound.record, &span);
        // IDEMPOTENCY HOOK (server/idempotency.rs): a duplicate is answered with its
        // first outcome and not run; a first run's outcome is recorded (`record`), and
        // the offset is committed only once that record is durable (`Settled` waits for it).
        let verdict = match &shared.dedup {
            Some(dedup) => {
                let label = || shared.router.route(inbound.request_type.as_deref(), &self.topic).label;
                dedup.check(&self.tp, &inbound.record, inbound.content_type, label, counters).await
            }
            None => Verdict::Run(None),
        };
        Prepared::Ready(Box::new(Ready { inbound, address, span, now, verdict }))
    }

    /// Whether a collected batch item runs under the key `verdict` would run under.
    fn batch_runs_key(&self, verdict: &Verdict) -> bool {
        let Verdict::Run(Some(key)) = verdict else { return false };
        self.batch.iter().any(|r| matches!(&r.verdict, Verdict::Run(Some(k)) if k == key))
    }

    /// With idempotency, records a first run's outcome; returns the outcome to answer
    /// with and what resolves once the record is durable. A request's outcome is
    /// recorded as its reply will carry it (`Replier::as_sent`): an oversized response
    /// or error text the caller never gets would only swell the window, and a
    /// `KafkaWindow` record past the broker's size limit is refused.
    fn record(
        &self,
        inbound: &Inbound,
        key: Option<bytes::Bytes>,
        outcome: Result<Vec<u8>, RemoteError>,
    ) -> (Result<Vec<u8>, RemoteError>, Option<Durable>) {
        match (&self.shared.dedup, key) {
            (Some(dedup), Some(key)) => {
                let outcome = match inbound.expects_reply() {
                    true => self.shared.replier.as_sent(inbound, outcome),
                    false => outcome,
                };
                let handler = self.shared.router.route(inbound.request_type.as_deref(), &self.topic).label;
                let durable = dedup.record(&self.tp, key, handler, inbound.content_type, &outcome, &self.shared.counters);
                (outcome, durable)
            }
            _ => (outcome, None),
        }
    }

    /// Answers a record with `outcome` in a reply stamped `at_ms`; returns its
    /// acknowledgement, or `None` for an event (no reply due; counted when its handler
    /// `ran`, as a request is counted in `handled` only then, not as a duplicate).
    fn finish(
        &mut self,
        inbound: &Inbound,
        address: Option<&Address>,
        span: &tracing::Span,
        outcome: Result<Vec<u8>, RemoteError>,
        at_ms: i64,
        ran: bool,
    ) -> Option<Ack> {
        let Some(address) = address else {
            if ran {
                self.shared.counters.events.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = &outcome {
                tracing::warn!(parent: span, error = %excerpt(e.to_string(), MAX_ECHO), "event handler failed");
            }
            return None;
        };
        Some(self.shared.replier.send(&self.topic, inbound, address, outcome, at_ms, &mut self.last_reply_queue))
    }

    /// A record prepared before a batch ran, its clock read again: the batch may have
    /// taken up to its time limit, so the record's deadline may have passed meanwhile,
    /// and its own limit is counted from now. True when it expired (counted, not run).
    fn expired_after_batch(&self, ready: &mut Ready) -> bool {
        ready.now = now_ms();
        let expired = ready.inbound.expired(ready.now);
        if expired {
            self.shared.counters.expired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(offset = ready.inbound.offset, "skipping request whose deadline passed while a batch ran");
        }
        expired
    }

    /// Runs the collected batch through its handler in one call, answers each request,
    /// and queues one settlement for the whole batch: the position passes it only when
    /// every reply was produced (and, with idempotency, recorded), and an unanswered one
    /// rewinds to the batch's start. Returns whether there was a batch to run.
    async fn flush_batch(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        let batch = std::mem::take(&mut self.batch);
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else { return false };
        let (first_offset, last_offset) = (first.inbound.offset, last.inbound.offset);
        let cancellation = self.next_cancellation();
        let shared = Arc::clone(&self.shared);
        // Without a type header a request is dispatched by its topic (`Router::resolve`).
        let request_type = match &first.inbound.request_type {
            Some(request_type) => request_type.clone(),
            None => Arc::from(shared.router.resolve(None, &self.topic)),
        };
        let route = shared.router.route(Some(&request_type), &self.topic);
        let mut limit = route.timeout.unwrap_or(shared.settings.handler_timeout);
        for ready in &batch {
            if let Some(left) = ready.inbound.remaining(ready.now) {
                limit = limit.min(left);
            }
        }
        // Requests answered before (idempotency hook) keep that answer and skip the call.
        let to_run: Vec<usize> =
            batch.iter().enumerate().filter(|(_, r)| matches!(r.verdict, Verdict::Run(_))).map(|(i, _)| i).collect();
        let started = std::time::Instant::now();
        // The call borrows the payloads; it ends before the batch is consumed below.
        let outcomes = {
            let items = to_run
                .iter()
                .map(|&i| {
                    let inbound = &batch[i].inbound;
                    (inbound.payload(), inbound.content_type, self.context(inbound, cancellation.clone()))
                })
                .collect();
            let dispatch = std::pin::pin!(shared.router.dispatch_batch(&request_type, items, limit));
            crate::stop::finish_or_cancel(dispatch, stop, || cancellation.cancel()).await
        };
        // One handler call: its duration is recorded once, with the first outcome.
        let took = started.elapsed();
        let (label, mut elapsed) = (route.label, Some(took));
        let mut outcomes = to_run.into_iter().zip(outcomes).peekable();
        let mut settled = Settled::batch(first_offset, last_offset);
        for (i, ready) in batch.into_iter().enumerate() {
            let ran = matches!(ready.verdict, Verdict::Run(_));
            let (outcome, durable, took) = match ready.verdict {
                Verdict::Answer(earlier) => (earlier, None, Duration::ZERO),
                Verdict::Run(key) => {
                    let outcome = match outcomes.next_if(|(j, _)| *j == i) {
                        Some((_, outcome)) => outcome,
                        None => Err(RemoteError::with_code(crate::error::ErrorCode::HandlerError, "batch outcome missing")),
                    };
                    shared.counters.record_outcome(label, elapsed.take(), &outcome);
                    let (outcome, durable) = self.record(&ready.inbound, key, outcome);
                    (outcome, durable, took)
                }
            };
            let at_ms = ms_after(ready.now, took);
            if let Some(ack) = self.finish(&ready.inbound, ready.address.as_ref(), &ready.span, outcome, at_ms, ran) {
                settled.add_ack(ack);
            }
            if let Some(durable) = durable {
                settled.add_durable(durable);
            }
        }
        self.acks.push_back(settled);
        true
    }

    /// A cancellation for the next handler call: the last one again if its handler kept
    /// no handle and it was not fired, else a fresh one.
    fn next_cancellation(&mut self) -> Cancellation {
        if !self.cancellation.reusable() {
            self.cancellation = Cancellation::default();
        }
        self.cancellation.clone()
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
    /// the group loop bounds that wait. Returns the outcome and how long the handler took.
    async fn dispatch(
        &mut self,
        inbound: &Inbound,
        now: i64,
        stop: &mut watch::Receiver<bool>,
    ) -> (Result<Vec<u8>, RemoteError>, Duration) {
        let cancellation = self.next_cancellation();
        // Requests of one type share one name (`RecentNames`), so the route is kept by
        // that name's pointer; the `Arc` kept with it cannot be freed and reused.
        if let Some(request_type) = &inbound.request_type {
            if !self.last_route.as_ref().is_some_and(|(kept, ..)| Arc::ptr_eq(kept, request_type)) {
                let route = self.shared.router.route(Some(request_type), &self.topic);
                let metrics = self.shared.counters.type_metrics(route.label);
                self.last_route = Some((request_type.clone(), route.keep(), metrics));
            }
        }
        let shared = &*self.shared;
        let (route, metrics) = match (&self.last_route, &inbound.request_type) {
            (Some((kept, route, metrics)), Some(request_type)) if Arc::ptr_eq(kept, request_type) => {
                (route.route(request_type, &self.topic), Some(metrics))
            }
            _ => (shared.router.route(inbound.request_type.as_deref(), &self.topic), None),
        };
        let mut limit = route.timeout.unwrap_or(shared.settings.handler_timeout);
        if let Some(left) = inbound.remaining(now) {
            limit = limit.min(left);
        }
        let ctx = self.context(inbound, cancellation.clone());
        let started = std::time::Instant::now();
        let dispatch = std::pin::pin!(shared.router.dispatch(&route, inbound.payload(), inbound.content_type, ctx, limit));
        let outcome = crate::stop::finish_or_cancel(dispatch, stop, || cancellation.cancel()).await;
        let took = started.elapsed();
        match metrics {
            Some(metrics) => shared.counters.record_outcome_as(metrics, Some(took), &outcome),
            None => shared.counters.record_outcome(route.label, Some(took), &outcome),
        }
        (outcome, took)
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
