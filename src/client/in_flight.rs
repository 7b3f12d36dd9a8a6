//! Requests waiting for their reply: correlation id → completion, with deadlines and
//! the in-flight bound.
//!
//! An entry leaves the map on exactly one of: its reply arrives, its deadline passes,
//! its caller drops the future, its produce fails, or the client closes. The
//! [`PendingReply`] guard removes it on drop, which is what makes `request`
//! cancel-safe and keeps [`InFlight::len`] honest.
//!
//! Deadlines are kept in the entries and enforced by one sweeper per client
//! ([`super::expiry`]), not by a timer per request: registering and cancelling a
//! runtime timer for every call was 6 % of the embedded round trip's instructions, for
//! timers that almost never fire.
//!
//! A request is registered when it is called but sent only once a slot is free
//! (`max_in_flight`): the map is the gate of the client's produce queues, so waiting
//! for a slot never changes the order in which a partition's requests go out. The map
//! itself is bounded too (`max_pending`): past it a call fails at once with
//! [`RpcError::Busy`] instead of queueing without limit.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::time::Instant;

use crate::error::RpcError;
use crate::metrics::ClientMetrics;
use crate::producer::Gate;
use crate::transport::{ConsumedRecord, Record, TransportError};

type Completion = oneshot::Sender<Result<ConsumedRecord, RpcError>>;

/// Correlation ids are random v4 UUIDs: their bits are already uniform, so hashing
/// them again (SipHash, the default) only costs time on every request and reply.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if the key type changes; stay correct, if slower.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u128(&mut self, id: u128) {
        // Folding the halves keeps the randomness of both: a v4 UUID's fixed version
        // and variant bits sit at different positions in each half.
        self.0 = (id as u64) ^ ((id >> 64) as u64);
    }
}

struct Entry {
    completion: Completion,
    /// Whether the request holds a slot (it was admitted to be sent).
    sent: bool,
    /// When the request fails with `Timeout(timeout)` if no reply came.
    deadline: Instant,
    timeout: Duration,
}

/// The pending-reply map of one client.
pub(crate) struct InFlight {
    pending: DashMap<u128, Entry, std::hash::BuildHasherDefault<IdHasher>>,
    slots: Semaphore,
    /// Requests registered and not yet removed: counted at register and at removal (a
    /// counter that cannot drift, unlike comparing with `len()` first). Nobody waits
    /// for room, so a counter does what a semaphore would without its lock on release.
    /// A request removed before it was sent is still counted until the gate drops its
    /// record from the partition's queue: that record holds memory until then.
    registered: AtomicUsize,
    max_pending: usize,
    closed: AtomicBool,
    /// Reports the map's size as the in-flight gauge, when set.
    metrics: Option<Arc<ClientMetrics>>,
    /// What deadlines are measured from, so one can be kept in an atomic.
    epoch: Instant,
    /// The deadline the sweeper sleeps until, in µs since `epoch` (`u64::MAX`: none).
    /// A registration with an earlier deadline lowers it and wakes the sweeper.
    next_sweep: AtomicU64,
    /// Wakes the sweeper to plan again: an earlier deadline, or `close`.
    replan: Notify,
}

impl InFlight {
    /// A map that lets at most `max_sent` requests be sent and unanswered at once, and
    /// at most `max_pending` (sent or queued) be registered.
    pub(crate) fn new(max_sent: usize, max_pending: usize) -> Self {
        let max_pending = max_pending.max(max_sent).min(Semaphore::MAX_PERMITS);
        InFlight {
            pending: DashMap::default(),
            slots: Semaphore::new(max_sent),
            registered: AtomicUsize::new(0),
            max_pending,
            closed: AtomicBool::new(false),
            metrics: None,
            epoch: Instant::now(),
            next_sweep: AtomicU64::new(u64::MAX),
            replan: Notify::new(),
        }
    }

    /// Reports every change of the map's size to `metrics`' in-flight gauge.
    pub(crate) fn reporting_to(mut self, metrics: Arc<ClientMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn report(&self, delta: f64) {
        if let Some(metrics) = &self.metrics {
            metrics.in_flight(delta);
        }
    }

    /// Registers a request called at `started` that waits `timeout` for its reply;
    /// `Busy` when `max_pending` requests are registered already.
    pub(crate) fn register(self: &Arc<Self>, id: u128, started: Instant, timeout: Duration) -> Result<PendingReply, RpcError> {
        // Reserved by compare-and-swap, not added and taken back: a count briefly over
        // the bound would refuse a concurrent caller while there is room.
        let reserved = self.registered.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max_pending).then_some(n + 1));
        if reserved.is_err() {
            // A closed map no longer discards records, so its count may stay full.
            return Err(if self.is_closed() { RpcError::Closed } else { RpcError::Busy(self.max_pending) });
        }
        let (completion, rx) = oneshot::channel();
        let deadline = crate::clock::instant_after(started, timeout);
        self.pending.insert(id, Entry { completion, sent: false, deadline, timeout });
        self.report(1.0);
        // Only a deadline earlier than the sweeper's plan wakes it; with one timeout
        // for every call (the usual case) deadlines come in order and none does.
        let at = self.micros(deadline);
        if at < self.next_sweep.load(Ordering::Acquire) {
            self.next_sweep.fetch_min(at, Ordering::AcqRel);
            self.replan.notify_one();
        }
        // Checked after the insert so that a concurrent `close` either sees this entry
        // or we see its flag: no request can slip in after the drain and hang.
        // From here on, dropping the registration takes the entry out again.
        let registration = Registration { id, map: self.clone(), in_map: true };
        if self.closed.load(Ordering::Acquire) {
            return Err(RpcError::Closed);
        }
        Ok(PendingReply { registration, reply: rx })
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// Fails every request whose deadline is at or before `now` with `Timeout`, and
    /// plans the next sweep at the earliest deadline left ([`InFlight::planned_sweep`]).
    ///
    /// Visits every entry: cheaper than keeping deadlines sorted, which costs on
    /// every request, when sweeps are rare ([`super::expiry`] bounds how often).
    pub(crate) fn sweep(&self, now: Instant) {
        // Cleared first, so a request registered while we scan lowers the plan itself
        // (and wakes the sweeper) whether or not the scan sees it.
        self.next_sweep.store(u64::MAX, Ordering::Release);
        let mut overdue = Vec::new();
        let mut earliest: Option<Instant> = None;
        for entry in self.pending.iter() {
            if entry.deadline <= now {
                overdue.push(*entry.key());
            } else if earliest.is_none_or(|e| entry.deadline < e) {
                earliest = Some(entry.deadline);
            }
        }
        for id in overdue {
            // Gone meanwhile means answered or dropped: then there is nothing to fail.
            if let Some((completion, timeout)) = self.take(id) {
                let _ = completion.send(Err(RpcError::Timeout(timeout)));
            }
        }
        if let Some(at) = earliest {
            self.next_sweep.fetch_min(self.micros(at), Ordering::AcqRel);
        }
    }

    /// The deadline the sweeper should sleep until now; earlier than planned when a
    /// registration brought one forward.
    pub(crate) fn planned_sweep(&self) -> Option<Instant> {
        match self.next_sweep.load(Ordering::Acquire) {
            u64::MAX => None,
            at => Some(self.epoch + Duration::from_micros(at)),
        }
    }

    /// Resolves when a registration brings the next deadline forward, or on `close`.
    pub(crate) async fn replanned(&self) {
        self.replan.notified().await
    }

    /// Whether `close` was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Removes `id`, giving its slot and its room back if it was sent; its completion
    /// and timeout. An unsent request's room comes back when the gate drops its record
    /// ([`InFlight::discard`]).
    fn take(&self, id: u128) -> Option<(Completion, Duration)> {
        let (_, entry) = self.pending.remove(&id)?;
        self.report(-1.0);
        if entry.sent {
            self.registered.fetch_sub(1, Ordering::AcqRel);
            self.slots.add_permits(1);
        }
        Some((entry.completion, entry.timeout))
    }

    /// The gate dropped the record of a request removed before it was sent.
    fn discard(&self) {
        self.registered.fetch_sub(1, Ordering::AcqRel);
    }

    /// Hands a reply to its waiter. False when nobody waits for `id`: a foreign reply,
    /// or a late one whose caller timed out or gave up.
    pub(crate) fn complete(&self, id: u128, reply: ConsumedRecord) -> bool {
        match self.take(id) {
            Some((completion, _)) => completion.send(Ok(reply)).is_ok(),
            None => false,
        }
    }

    /// Fails one request, e.g. because its produce failed.
    pub(crate) fn fail(&self, id: u128, error: TransportError) {
        if let Some((completion, _)) = self.take(id) {
            let _ = completion.send(Err(RpcError::Transport(error)));
        }
    }

    /// Fails every pending request with `Closed` and refuses new ones.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.slots.close();
        // The sweeper sees the flag and ends.
        self.replan.notify_one();
        let ids: Vec<u128> = self.pending.iter().map(|e| *e.key()).collect();
        for id in ids {
            if let Some((completion, _)) = self.take(id) {
                let _ = completion.send(Err(RpcError::Closed));
            }
        }
    }

    /// Requests waiting for a reply, sent or still queued for a slot.
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Slots free for sending.
    pub(crate) fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }

    /// Marks `id` as sent; false when its caller is gone.
    fn mark_sent(&self, id: u128) -> bool {
        match self.pending.get_mut(&id) {
            Some(mut entry) => {
                entry.sent = true;
                true
            }
            None => false,
        }
    }
}

impl Gate<u128> for InFlight {
    fn admit<'a>(&'a self, batch: &'a mut Vec<(Record, u128)>) -> BoxFuture<'a, usize> {
        async move {
            let take_free = |granted: &mut usize, wanted: usize| {
                while *granted < wanted {
                    match self.slots.try_acquire() {
                        Ok(permit) => {
                            permit.forget();
                            *granted += 1;
                        }
                        Err(_) => break,
                    }
                }
            };
            let mut granted = 0;
            take_free(&mut granted, batch.len());
            if granted == 0 {
                // About to wait for a slot: requests whose callers gave up while queued
                // are never sent and must not be waited for. (With slots free, the
                // marking below finds them; looking each up here too cost a lookup per
                // request.)
                batch.retain(|(_, id)| {
                    let waited_for = self.pending.contains_key(id);
                    if !waited_for {
                        self.discard();
                    }
                    waited_for
                });
                if batch.is_empty() {
                    return 0;
                }
                let Ok(first) = self.slots.acquire().await else {
                    batch.clear();
                    return 0;
                };
                first.forget();
                granted = 1;
                take_free(&mut granted, batch.len());
            }
            // A caller may have left while we waited; its slot goes back at once.
            let mut admitted = 0;
            for _ in 0..granted {
                if self.mark_sent(batch[admitted].1) {
                    admitted += 1;
                } else {
                    batch.remove(admitted);
                    self.slots.add_permits(1);
                    self.discard();
                }
            }
            admitted
        }
        .boxed()
    }
}

/// A request's place in the map, given up on drop unless already gone.
struct Registration {
    id: u128,
    map: Arc<InFlight>,
    /// False once the reply channel resolved: whoever resolved it took the entry
    /// first, so a second removal would only find nothing (a shard lock and a probe
    /// per request).
    in_map: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.in_map {
            self.map.take(self.id);
        }
    }
}

/// A registered request: resolves to its reply record, or `Timeout` at its deadline
/// (sent by the sweeper), or `Closed`; unregisters on drop.
pub(crate) struct PendingReply {
    /// Held for its `Drop`.
    registration: Registration,
    reply: oneshot::Receiver<Result<ConsumedRecord, RpcError>>,
}

impl Future for PendingReply {
    type Output = Result<ConsumedRecord, RpcError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let outcome = ready!(Pin::new(&mut self.reply).poll(cx));
        // Every path that sends on (or drops) the completion removed the entry first.
        self.registration.in_map = false;
        Poll::Ready(match outcome {
            Ok(outcome) => outcome,
            // The sender is only dropped by `close`, which sends first; treat it the same.
            Err(_) => Err(RpcError::Closed),
        })
    }
}

/// Closes the map when dropped, for the tasks without which no pending call can end:
/// the sweeper (no call would time out) and each reply listener (no reply would come).
/// A task that ends, is dropped with its runtime or unwinds from a panic (a custom
/// transport's reader, say) then fails every call with `Closed` and refuses new ones,
/// instead of leaving them to wait out their timeouts, or for ever.
pub(crate) struct CloseOnDrop(pub(crate) Arc<InFlight>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.0.is_closed() {
            tracing::error!("a task the client's calls depend on panicked; failing every call with Closed");
        }
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply() -> ConsumedRecord {
        ConsumedRecord { partition: 0, offset: 0, record: Arc::new(Record::default()) }
    }

    fn soon() -> Duration {
        Duration::from_secs(5)
    }

    #[tokio::test]
    async fn reply_completes_and_unregisters() {
        let map = Arc::new(InFlight::new(10, 100));
        let pending = map.register(1, Instant::now(), soon()).unwrap();
        assert_eq!(map.len(), 1);
        assert!(map.complete(1, reply()));
        assert!(pending.await.is_ok());
        assert_eq!(map.len(), 0);
        assert!(!map.complete(1, reply()), "a second reply for the same id is foreign");
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_unregisters() {
        let map = Arc::new(InFlight::new(10, 100));
        tokio::spawn(super::super::expiry::run(map.clone()));
        let pending = map.register(2, Instant::now(), Duration::from_millis(50)).unwrap();
        let err = pending.await.unwrap_err();
        assert!(matches!(err, RpcError::Timeout(_)), "{err}");
        assert_eq!(map.len(), 0);
        assert!(!map.complete(2, reply()), "a late reply is ignored");
    }

    #[tokio::test]
    async fn dropping_the_waiter_unregisters() {
        let map = Arc::new(InFlight::new(10, 100));
        drop(map.register(3, Instant::now(), soon()).unwrap());
        assert_eq!(map.len(), 0);
    }

    #[tokio::test]
    async fn registrations_are_bounded_and_fail_fast() {
        let map = Arc::new(InFlight::new(1, 3));
        let held: Vec<_> = (0..3).map(|id| map.register(id, Instant::now(), soon()).unwrap()).collect();
        assert!(matches!(map.register(9, Instant::now(), soon()), Err(RpcError::Busy(3))));
        assert_eq!(map.len(), 3);
        // Every way out of the map gives the room back, once the gate has dropped the
        // records the three left queued.
        assert!(map.complete(0, reply()));
        map.fail(1, TransportError::Closed);
        drop(held);
        assert!(matches!(map.register(9, Instant::now(), soon()), Err(RpcError::Busy(3))), "their records are still queued");
        let mut queued: Vec<(Record, u128)> = [0, 1, 2].map(|id| (Record::default(), id)).into();
        while !queued.is_empty() {
            assert_eq!(map.admit(&mut queued).await, 0, "nobody waits for them");
        }
        let again: Vec<_> = (10..13).map(|id| map.register(id, Instant::now(), soon()).unwrap()).collect();
        assert!(matches!(map.register(13, Instant::now(), soon()), Err(RpcError::Busy(3))));
        map.close();
        assert!(matches!(map.register(14, Instant::now(), soon()), Err(RpcError::Closed)));
        drop(again);
        assert_eq!(map.len(), 0);
    }

    #[tokio::test]
    async fn close_fails_pending_and_refuses_new() {
        let map = Arc::new(InFlight::new(10, 100));
        let pending = map.register(4, Instant::now(), soon()).unwrap();
        map.close();
        assert!(matches!(pending.await, Err(RpcError::Closed)));
        assert!(matches!(map.register(5, Instant::now(), Duration::ZERO), Err(RpcError::Closed)));
        assert_eq!(map.len(), 0);
    }

    #[tokio::test]
    async fn gate_admits_up_to_the_bound_in_order_and_skips_cancelled() {
        let map = Arc::new(InFlight::new(2, 100));
        let a = map.register(10, Instant::now(), soon()).unwrap();
        let b = map.register(11, Instant::now(), soon()).unwrap();
        let cancelled = map.register(12, Instant::now(), soon()).unwrap();
        let _d = map.register(13, Instant::now(), soon()).unwrap();
        drop(cancelled);
        let mut batch: Vec<(Record, u128)> = [10, 11, 12, 13].map(|id| (Record::default(), id)).into();
        assert_eq!(map.admit(&mut batch).await, 2, "two slots");
        assert_eq!(batch[..2].iter().map(|(_, id)| *id).collect::<Vec<_>>(), [10, 11], "admitted in order");
        assert_eq!(map.free_slots(), 0);
        batch.drain(..2);

        // The next admission waits until a sent request settles.
        let waiting = tokio::spawn({
            let map = map.clone();
            async move {
                let mut rest = batch;
                let n = map.admit(&mut rest).await;
                (n, rest)
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no slot is free yet");
        assert!(map.complete(10, reply()));
        drop(a);
        let (n, rest) = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert_eq!((n, rest[0].1), (1, 13), "the cancelled one is dropped, not sent, and takes no slot");
        drop(b);
    }

    #[tokio::test]
    async fn a_request_cancelled_while_slots_are_free_is_dropped_without_taking_one() {
        let map = Arc::new(InFlight::new(3, 100));
        let a = map.register(1, Instant::now(), soon()).unwrap();
        drop(map.register(2, Instant::now(), soon()).unwrap());
        let c = map.register(3, Instant::now(), soon()).unwrap();
        let mut batch: Vec<(Record, u128)> = [1, 2, 3].map(|id| (Record::default(), id)).into();
        assert_eq!(map.admit(&mut batch).await, 2);
        assert_eq!(batch.iter().map(|(_, id)| *id).collect::<Vec<_>>(), [1, 3], "order kept");
        assert_eq!(map.free_slots(), 1, "the cancelled request's slot went back");
        drop((a, c));
    }
}
