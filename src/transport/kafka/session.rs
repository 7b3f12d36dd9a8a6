//! One fetch request per broker for every partition this transport's readers read,
//! as the Java client and librdkafka do.
//!
//! A reader [registers](Session::register) its partition; one task per broker then
//! sends a single Fetch carrying every registered partition at the position its
//! reader asked for, and routes each partition's answer to its reader. Before this,
//! every reader polled on a connection of its own, so a server with eight partitions
//! and its client sent nine fetches per fetch wait where one does.
//!
//! Rules that keep the reader's guarantees:
//! - The reader owns its position. It asks for an offset; an answer fetched from any
//!   other offset (the reader seeked meanwhile) is thrown away, so a reader that
//!   went away or moved loses nothing: its next fetch asks from its own offset.
//! - Each reader holds at most [`MAX_BUFFERED`] answers it has not taken; its partition
//!   is left out of fetches until it takes one, so a slow reader bounds memory and
//!   does not slow the others. A failed answer stops its partition's fetching until
//!   the reader has seen the error (and backed off, in [`Tail`](crate::tail::Tail)).
//! - The broker's max-wait and min-bytes are the transport's: `fetch_max_wait` from
//!   [`KafkaConfig`](super::KafkaConfig), min-bytes 1. A partition whose answer held
//!   only records past its last stable offset (from a broker that ignores the isolation
//!   level) is not fetched again until `fetch_max_wait` has passed since it was asked
//!   for, as Apache Kafka would have held that fetch: the records are there, so such a
//!   broker answers at once, and asking again at once would loop for as long as the
//!   transaction stays open.
//! - A reader never misses the rest of a batch it resumes inside. Kafka answers a
//!   fetch with the batch that holds its offset; tansu 0.6 answers with the batches
//!   *after* it. An answer that starts past the reader's offset therefore sends the
//!   partition [looking back](Probe): fetches from further back, up to the log start,
//!   until an answer starts at or before the offset (the records before it are
//!   dropped) or a known batch boundary shows the offsets in between hold nothing
//!   (a compacted gap, on Kafka). Only a reader that resumes mid-batch pays for it.
//! - The task holds its transport weakly and ends soon after the transport is dropped.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{BrokerId, FetchRequest, FetchResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::connection::{CallError, Connection};
use super::record_batch::decode::{decode_partition, AbortedTransaction, Fetched};
use super::Inner;
use crate::transport::TopicPartition;

/// Fetch v5: the first version whose answer carries the log start offset, so an
/// out-of-range answer names both ends of the log without another request.
const FETCH_VERSION: i16 = 5;
const OFFSET_OUT_OF_RANGE: i16 = 1;
/// Fetch's isolation level that answers up to the last stable offset, with the
/// aborted transactions in the range answered.
const READ_COMMITTED: i8 = 1;

/// Answers a reader may leave untaken before its partition is left out of fetches.
/// Two lets the next fetch run while the reader works through the previous answer.
pub(super) const MAX_BUFFERED: usize = 2;
/// Largest share of one fetch answer a partition may take.
const PARTITION_MAX_BYTES: i32 = 1024 * 1024;
/// How often an idle session checks whether its transport still exists.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// What one fetch brought a reader.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Records (possibly none, when only unreadable batches were skipped).
    Fetched(Fetched),
    /// The offset is outside the log `earliest..latest`; an end is `None` when the
    /// broker did not say (Apache Kafka answers OFFSET_OUT_OF_RANGE with -1 for both:
    /// it reads nothing from the log for an error answer).
    OutOfRange { earliest: Option<i64>, latest: Option<i64> },
    /// The fetch failed; `reroute` when the partition's leader may have moved.
    Failed { error: CallError, reroute: bool },
}

/// An answer for a reader, fetched from offset `from`.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) from: i64,
    pub(super) outcome: Outcome,
}

/// The fetch task of one broker. Cheap to clone.
#[derive(Clone)]
pub(super) struct Session {
    shared: Arc<Shared>,
}

struct Shared {
    addr: String,
    slots: Mutex<Vec<Weak<Slot>>>,
    /// A partition became fetchable (registered, seeked, or its answer taken).
    wake: Notify,
}

struct Slot {
    tp: TopicPartition,
    state: Mutex<SlotState>,
    /// An answer was queued for the reader.
    ready: Notify,
}

struct SlotState {
    /// Where the next fetch for this reader starts.
    position: i64,
    /// Bumped by every seek, so a fetch in flight from the old position is dropped.
    epoch: u64,
    answers: VecDeque<Answer>,
    /// A failure is queued: fetching stops until the reader has taken it.
    failed: bool,
    /// Broker answers for the current position so far, including empty ones.
    rounds: u64,
    /// Looking back for the batch that holds `position`.
    probe: Option<Probe>,
    /// The reader's wait ran out before any broker answer: wake it on the next
    /// answer, even an empty one.
    awaiting_round: bool,
    /// The last answer held only records past the last stable offset: not fetched
    /// again before this instant (see the module docs).
    held_until: Option<Instant>,
}

/// Where a partition looking back for the batch holding its reader's offset fetches
/// from next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probe {
    at: i64,
    /// `at` is known to start a batch (the end of one seen, or the log start): an
    /// answer from it that starts past the reader's offset is a real gap.
    boundary: bool,
}

/// How far before the reader's offset the first look back starts; each further one
/// goes twice as far.
const FIRST_LOOK_BACK: i64 = 64;

impl SlotState {
    /// The offset the reader is expected to ask for next.
    fn expected(&self) -> i64 {
        self.answers.front().map_or(self.position, |a| a.from)
    }

    fn fetchable(&self) -> bool {
        !self.failed && self.answers.len() < MAX_BUFFERED
    }

    /// Until when the partition is held, if it is at `now`.
    fn held(&self, now: Instant) -> Option<Instant> {
        self.held_until.filter(|&until| until > now)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state whole, so a poisoned lock is usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    /// Starts the fetch task for the broker at `addr`.
    pub(super) fn start(addr: String, inner: Weak<Inner>) -> Self {
        let shared = Arc::new(Shared { addr, slots: Mutex::new(Vec::new()), wake: Notify::new() });
        tokio::spawn(run(shared.clone(), inner));
        Session { shared }
    }

    /// Adds `tp` to this broker's fetches, from `offset`.
    pub(super) fn register(&self, tp: TopicPartition, offset: i64) -> Registration {
        let slot = Arc::new(Slot {
            tp,
            state: Mutex::new(SlotState {
                position: offset,
                epoch: 0,
                answers: VecDeque::new(),
                failed: false,
                rounds: 0,
                awaiting_round: false,
                probe: None,
                held_until: None,
            }),
            ready: Notify::new(),
        });
        lock(&self.shared.slots).push(Arc::downgrade(&slot));
        self.shared.wake.notify_one();
        Registration { slot, shared: self.shared.clone() }
    }
}

/// A reader's place in its broker's fetches; dropping it leaves them.
pub(super) struct Registration {
    slot: Arc<Slot>,
    shared: Arc<Shared>,
}

impl Registration {
    /// The next answer for a reader at `offset`, or `None` when none came by
    /// `deadline`. Waits past `deadline` for the broker's first answer since the call
    /// (bounded by the session's request timeout), so a call always reports what the
    /// broker said: an offset out of range surfaces even with a short wait. Cancel
    /// safe: an answer is only taken when this returns it.
    pub(super) async fn next(&self, offset: i64, deadline: Instant) -> Option<Answer> {
        let mut start: Option<u64> = None;
        loop {
            let past = Instant::now() >= deadline;
            {
                let mut st = lock(&self.slot.state);
                if st.expected() != offset {
                    // The reader moved: what was fetched for the old position is not
                    // for it, and fetching restarts where it now is.
                    st.answers.clear();
                    st.failed = false;
                    st.position = offset;
                    st.probe = None;
                    st.held_until = None;
                    st.epoch = st.epoch.wrapping_add(1);
                    self.shared.wake.notify_one();
                }
                if let Some(answer) = st.answers.pop_front() {
                    if !matches!(answer.outcome, Outcome::Fetched(_)) {
                        st.failed = false;
                    }
                    st.awaiting_round = false;
                    self.shared.wake.notify_one();
                    return Some(answer);
                }
                let start = *start.get_or_insert(st.rounds);
                if past && st.rounds != start {
                    st.awaiting_round = false;
                    return None;
                }
                st.awaiting_round = past;
            }
            if past {
                self.slot.ready.notified().await;
                continue;
            }
            // One reader per slot, and `notify_one` keeps a permit when nobody waits,
            // so an answer queued between the check above and this wait still wakes it.
            if tokio::time::timeout_at(deadline, self.slot.ready.notified()).await.is_err() {
                return None;
            }
        }
    }
}

/// A partition in one fetch: its reader's slot, and the position and epoch the
/// answer must still match to be queued.
struct Wanted {
    slot: Arc<Slot>,
    offset: i64,
    epoch: u64,
    /// Where the fetch starts: `offset`, or before it when looking back.
    probe: Option<Probe>,
}

impl Wanted {
    fn fetch_at(&self) -> i64 {
        self.probe.map_or(self.offset, |p| p.at)
    }
}

impl Shared {
    /// The registered partitions to fetch now, starting at a different slot each
    /// turn so that two readers of one partition take turns, and when the first one
    /// held (see the module docs) may be fetched again. Drops slots whose readers are gone.
    fn wanted(&self, turn: usize) -> (Vec<Wanted>, Option<Instant>) {
        let now = Instant::now();
        let mut slots = lock(&self.slots);
        slots.retain(|s| s.strong_count() > 0);
        let n = slots.len();
        let mut seen = HashSet::new();
        let mut wanted = Vec::new();
        let mut held: Option<Instant> = None;
        for i in 0..n {
            let Some(slot) = slots[(turn + i) % n].upgrade() else { continue };
            let (offset, epoch, probe) = {
                let st = lock(&slot.state);
                if !st.fetchable() {
                    continue;
                }
                if let Some(until) = st.held(now) {
                    held = Some(held.map_or(until, |h| h.min(until)));
                    continue;
                }
                (st.position, st.epoch, st.probe)
            };
            // A fetch names each partition once.
            if seen.insert(slot.tp.clone()) {
                wanted.push(Wanted { slot, offset, epoch, probe });
            }
        }
        (wanted, held)
    }
}

impl Wanted {
    /// Queues what was fetched for the reader, unless it started past the reader's
    /// offset and the partition must look further back first (see the module docs).
    /// `earliest` and `latest` are the log start and high watermark the broker reported.
    /// `hold`: until when to leave the partition out of fetches if the answer has
    /// nothing for the reader.
    fn deliver_fetched(self, fetched: Fetched, earliest: i64, latest: i64, hold: Option<Instant>) {
        match look_back(self.offset, self.probe, &fetched, earliest, latest) {
            None => self.deliver_or_hold(Outcome::Fetched(fetched), hold),
            Some(probe) => {
                if let Some(st) = self.current() {
                    self.again(st, Some(probe));
                }
            }
        }
    }

    /// Queues `outcome` for the reader if it still waits at the fetched position.
    fn deliver(self, outcome: Outcome) {
        self.deliver_or_hold(outcome, None)
    }

    /// [`deliver`](Self::deliver); an answer with nothing for the reader holds the
    /// partition until `hold`, if given.
    fn deliver_or_hold(self, outcome: Outcome, hold: Option<Instant>) {
        let Some(mut st) = self.current() else { return };
        match &outcome {
            Outcome::Fetched(f) => {
                // Cannot overflow: `check_records` refuses batches whose offsets reach i64::MAX.
                let after_last = f.records.last().map_or(self.offset, |r| r.offset + 1);
                let next = f.next.max(after_last);
                if next <= self.offset && f.unreadable.is_empty() {
                    st.held_until = hold;
                    self.again(st, None);
                    return;
                }
                st.position = next;
            }
            Outcome::OutOfRange { .. } | Outcome::Failed { .. } => st.failed = true,
        }
        st.probe = None;
        st.answers.push_back(Answer { from: self.offset, outcome });
        drop(st);
        self.slot.ready.notify_one();
    }

    /// The reader's state, with this broker answer counted, if the reader still waits at
    /// the position fetched for.
    fn current(&self) -> Option<MutexGuard<'_, SlotState>> {
        let mut st = lock(&self.slot.state);
        if st.epoch != self.epoch || st.position != self.offset {
            return None;
        }
        st.rounds = st.rounds.wrapping_add(1);
        Some(st)
    }

    /// Nothing for the reader this round: fetch again (from `probe` when looking back),
    /// waking only a reader whose wait ran out before this answer.
    fn again(&self, mut st: MutexGuard<'_, SlotState>, probe: Option<Probe>) {
        st.probe = probe;
        if st.awaiting_round {
            drop(st);
            self.slot.ready.notify_one();
        }
    }
}

/// Where to fetch next for a reader at `offset` whose fetch from `probe` (or from
/// `offset` itself) brought `fetched`; `None` when the answer is the reader's.
/// `earliest` and `latest` are the partition's log start and high watermark.
fn look_back(offset: i64, probe: Option<Probe>, fetched: &Fetched, earliest: i64, latest: i64) -> Option<Probe> {
    let at = probe.map_or(offset, |p| p.at);
    let earliest = earliest.max(0);
    // The answer starts past the offset: nothing in it holds the offsets between. An
    // empty answer below the high watermark is the same case at the log's end: the
    // offset is inside the last batch, and tansu answers with the batches after it.
    // (Kafka answers empty there when other partitions used up the response's bytes;
    // looking back then costs a fetch and reads the same records.)
    let past = match fetched.first_base {
        Some(base) => base > offset,
        None => (earliest..latest).contains(&offset),
    };
    match fetched.first_base {
        _ if past => {
            let boundary = probe.is_some_and(|p| p.boundary) || at <= earliest;
            if boundary {
                return None;
            }
            let back = (offset - at).saturating_mul(2).max(FIRST_LOOK_BACK);
            let at = offset.saturating_sub(back).max(earliest);
            Some(Probe { at, boundary: at <= earliest })
        }
        // Looking back, and every batch of the answer ended before the offset (the
        // answer was cut off by its size limit): go on from the end of the last one.
        Some(_) if probe.is_some() && fetched.records.is_empty() && fetched.unreadable.is_empty() => {
            fetched.whole_end.filter(|&end| end <= offset && end > at).map(|end| Probe { at: end, boundary: true })
        }
        _ => None,
    }
}

/// The fetch loop of one broker.
async fn run(shared: Arc<Shared>, inner: Weak<Inner>) {
    let mut conn: Option<Connection> = None;
    let mut turn = 0usize;
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let (wanted, held) = shared.wanted(turn);
        turn = turn.wrapping_add(1);
        if wanted.is_empty() {
            drop(inner);
            // A held partition is fetched again when its hold ends, with no other wake.
            let idle = held.map_or(IDLE_CHECK, |until| until.saturating_duration_since(Instant::now()).min(IDLE_CHECK));
            let _ = tokio::time::timeout(idle, shared.wake.notified()).await;
            continue;
        }
        let config = &inner.config;
        let request = request(&wanted, config.fetch_max_wait, config.fetch_max_bytes);
        // Apache Kafka holds a fetch with nothing to answer for its max-wait from here.
        let held_until = crate::clock::instant_after(Instant::now(), config.fetch_max_wait);
        let answer = match conn.as_mut() {
            Some(c) => c.send(&request, FETCH_VERSION, config.fetch_max_wait).await,
            None => match Connection::connect(&shared.addr, config).await {
                Ok(c) => conn.insert(c).send(&request, FETCH_VERSION, config.fetch_max_wait).await,
                Err(e) => Err(e),
            },
        };
        drop(inner);
        match answer {
            Ok(resp) if resp.error_code != 0 => {
                let error = CallError::Kafka(resp.error_code, "fetch".into());
                fail_all(wanted, &error, false);
            }
            Ok(resp) => route(resp, wanted, held_until),
            Err(e) => {
                // The stream position is unknown after a failed exchange, and the
                // broker may no longer lead these partitions: readers look up their
                // leader again.
                conn = None;
                fail_all(wanted, &e, true);
            }
        }
    }
}

fn fail_all(wanted: Vec<Wanted>, error: &CallError, reroute: bool) {
    for w in wanted {
        w.deliver(Outcome::Failed { error: error.clone(), reroute });
    }
}

fn request(wanted: &[Wanted], max_wait: Duration, max_bytes: i32) -> FetchRequest {
    let mut topics: Vec<FetchTopic> = Vec::new();
    for w in wanted {
        let partition = FetchPartition::default()
            .with_partition(w.slot.tp.partition)
            .with_fetch_offset(w.fetch_at())
            .with_log_start_offset(-1)
            .with_partition_max_bytes(PARTITION_MAX_BYTES.min(max_bytes));
        match topics.iter_mut().find(|t| t.topic.0.as_str() == w.slot.tp.topic) {
            Some(t) => t.partitions.push(partition),
            None => topics.push(
                FetchTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(w.slot.tp.topic.clone())))
                    .with_partitions(vec![partition]),
            ),
        }
    }
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(i32::try_from(max_wait.as_millis()).unwrap_or(i32::MAX))
        .with_min_bytes(1)
        .with_max_bytes(max_bytes)
        // Read committed: a request or reply a transactional producer wrote is read once
        // its transaction commits, and never if it aborts (see the `fetch` module).
        .with_isolation_level(READ_COMMITTED)
        .with_topics(topics)
}

/// Where a partition ends, as a read-committed fetch answer names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ends {
    /// Where a read-committed reader stops for now: the last stable offset (the first
    /// offset of the oldest open transaction, or the high watermark when none is open),
    /// or the high watermark from a broker that names no last stable offset.
    pub(super) stable: i64,
    /// The log's end for an out-of-range check: an offset up to it is in the log, even
    /// past `stable`, where a reader may have been started by a read-uncommitted commit.
    pub(super) high_watermark: i64,
}

/// Where `tp` ends ([`Ends`]). Asks with a fetch from `at`, an offset in the log, that
/// waits for nothing and takes at most one batch; `None` when the broker answers `at`
/// is out of range. The answer's records are never decoded (kafka-protocol keeps them
/// as bytes), so no record in them can fail or panic the look-up, as rskafka's decoding
/// could: it added each record's offset delta to its batch's base offset unchecked.
pub(super) async fn stable_end(conn: &mut Connection, tp: &TopicPartition, at: i64) -> Result<Option<Ends>, CallError> {
    let partition = FetchPartition::default()
        .with_partition(tp.partition)
        .with_fetch_offset(at)
        .with_log_start_offset(-1)
        .with_partition_max_bytes(1);
    let request = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(0)
        .with_min_bytes(0)
        .with_max_bytes(1)
        .with_isolation_level(READ_COMMITTED)
        .with_topics(vec![FetchTopic::default()
            .with_topic(TopicName(StrBytes::from_string(tp.topic.clone())))
            .with_partitions(vec![partition])]);
    let resp = conn.send(&request, FETCH_VERSION, Duration::ZERO).await?;
    if resp.error_code != 0 {
        return Err(CallError::Kafka(resp.error_code, format!("fetch the end of {tp}")));
    }
    let part = resp
        .responses
        .iter()
        .filter(|t| t.topic.0.as_str() == tp.topic)
        .flat_map(|t| t.partitions.iter())
        .find(|p| p.partition_index == tp.partition)
        .ok_or_else(|| CallError::Protocol(format!("fetch response without {tp}")))?;
    match part.error_code {
        0 => {
            let (stable, high_watermark) = (known(part.last_stable_offset), known(part.high_watermark));
            Ok(stable.or(high_watermark).map(|stable| Ends { stable, high_watermark: high_watermark.unwrap_or(stable).max(stable) }))
        }
        OFFSET_OUT_OF_RANGE => Ok(None),
        code => Err(CallError::Kafka(code, format!("fetch the end of {tp}"))),
    }
}

/// Hands each partition's part of `resp` to its reader. A partition whose part held
/// only records past its last stable offset is held until `held_until`.
fn route(resp: FetchResponse, wanted: Vec<Wanted>, held_until: Instant) {
    let mut parts = Vec::new();
    for topic in resp.responses {
        let name = topic.topic.0;
        for p in topic.partitions {
            parts.push((name.clone(), p));
        }
    }
    for w in wanted {
        let tp = &w.slot.tp;
        let Some(at) = parts.iter().position(|(t, p)| t.as_str() == tp.topic && p.partition_index == tp.partition)
        else {
            let error = CallError::Protocol(format!("fetch response without {tp}"));
            w.deliver(Outcome::Failed { error, reroute: false });
            continue;
        };
        let (_, part) = parts.swap_remove(at);
        let outcome = match part.error_code {
            0 => {
                // Kafka answers a fetch beyond the log end with OFFSET_OUT_OF_RANGE,
                // tansu with nothing; the watermarks tell both apart the same way.
                let (earliest, latest) = (part.log_start_offset, part.high_watermark);
                if latest >= 0 && (w.offset > latest || (earliest > 0 && w.offset < earliest)) {
                    Outcome::OutOfRange { earliest: known(earliest), latest: Some(latest) }
                } else {
                    let data = part.records.unwrap_or_default();
                    let aborted: Vec<AbortedTransaction> = part
                        .aborted_transactions
                        .unwrap_or_default()
                        .iter()
                        .map(|t| AbortedTransaction { producer_id: t.producer_id.0, first_offset: t.first_offset })
                        .collect();
                    let mut fetched = decode_partition(tp.partition, data, w.offset, &aborted);
                    // Read committed, nothing at or past the last stable offset is read yet
                    // (the broker's "unknown", -1, leaves the high watermark the end). Past
                    // the check above, `latest` is unknown (negative) or at or after the
                    // fetch offset. A reader already past the last stable offset (started
                    // at an offset committed by a read-uncommitted consumer) waits where it
                    // is: its position never goes back.
                    let stable = match part.last_stable_offset {
                        lso if lso >= 0 && latest >= 0 => lso.min(latest).max(w.offset),
                        lso if lso >= 0 => lso.max(w.offset),
                        _ => latest,
                    };
                    // Records past the stable end came: a broker that sends them answers
                    // at once, where Kafka would have held the fetch (the module docs).
                    let past_stable = stable >= 0 && fetched.next > stable;
                    if stable >= 0 {
                        fetched.within(stable);
                    }
                    w.deliver_fetched(fetched, earliest, stable, past_stable.then_some(held_until));
                    continue;
                }
            }
            OFFSET_OUT_OF_RANGE => {
                Outcome::OutOfRange { earliest: known(part.log_start_offset), latest: known(part.high_watermark) }
            }
            code => Outcome::Failed { error: CallError::Kafka(code, format!("fetch {tp}")), reroute: true },
        };
        w.deliver(outcome);
    }
}

/// An offset the broker sent, or `None` for its "unknown" (negative, -1 on the
/// wire). Taking it as 0 would name a log start or high watermark the log may not
/// have, and a reader resetting to it would be out of range again.
fn known(offset: i64) -> Option<i64> {
    (offset >= 0).then_some(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer whose first batch starts at `base` and whose batches end at `next`,
    /// with `records` readable records at or after the reader's offset.
    fn answer(base: i64, next: i64, records: usize) -> Fetched {
        let record = |offset| crate::transport::ConsumedRecord {
            partition: 0,
            offset,
            record: Arc::new(crate::transport::Record::new(None::<String>, Vec::new())),
        };
        Fetched {
            records: (0..records as i64).map(|i| record(next - records as i64 + i)).collect(),
            unreadable: Vec::new(),
            next,
            whole_end: Some(next),
            first_base: Some(base),
        }
    }

    #[test]
    fn an_answer_from_the_offset_or_before_it_is_the_readers() {
        assert_eq!(look_back(100, None, &answer(100, 160, 60), 0, 200), None);
        assert_eq!(look_back(100, None, &answer(90, 160, 60), 0, 200), None);
        assert_eq!(look_back(100, None, &Fetched { next: 100, ..Fetched::default() }, 0, 100), None, "an empty answer at the high watermark: nothing yet");
    }

    #[test]
    fn an_answer_past_the_offset_looks_back_further_each_time_down_to_the_log_start() {
        let first = look_back(100, None, &answer(130, 160, 30), 0, 200);
        assert_eq!(first, Some(Probe { at: 36, boundary: false }));
        let second = look_back(100, first, &answer(130, 160, 30), 0, 200);
        assert_eq!(second, Some(Probe { at: 0, boundary: true }), "128 back reaches the log start");
        assert_eq!(look_back(100, second, &answer(130, 160, 30), 0, 200), None, "nothing before 130 holds 100: a gap");
        assert_eq!(look_back(100, None, &answer(130, 160, 30), 80, 200), Some(Probe { at: 80, boundary: true }));
    }

    #[test]
    fn looking_back_goes_on_from_a_batch_that_ends_before_the_offset() {
        let probe = Some(Probe { at: 36, boundary: false });
        // Decoded for a reader at 100: `next` never falls below it; the whole batches end at 70.
        let cut_off = Fetched { next: 100, whole_end: Some(70), first_base: Some(36), ..Fetched::default() };
        let next = look_back(100, probe, &cut_off, 0, 200);
        assert_eq!(next, Some(Probe { at: 70, boundary: true }));
        assert_eq!(look_back(100, next, &answer(130, 160, 30), 0, 200), None, "a boundary answer past the offset is a gap");
        assert_eq!(look_back(100, next, &answer(70, 160, 60), 0, 200), None, "found the batch holding 100");
    }

    #[test]
    fn an_empty_answer_below_the_high_watermark_looks_back() {
        // The offset is inside the last batch: tansu answers with the batches after it, none.
        let empty = Fetched { next: 105, ..Fetched::default() };
        assert_eq!(look_back(105, None, &empty, 100, 110), Some(Probe { at: 100, boundary: true }));
        assert_eq!(look_back(105, None, &empty, 0, 110), Some(Probe { at: 41, boundary: false }));
        assert_eq!(look_back(110, None, &Fetched { next: 110, ..Fetched::default() }, 0, 110), None, "at the end: nothing yet");
    }

    #[test]
    fn a_cut_off_look_back_goes_on_from_its_last_whole_batch() {
        let batch = |base: i64, n: usize| crate::transport::kafka::record_batch::decode::tests::batch(base, &vec!["v"; n], 0);
        // Looking back from 36 for 100: two whole batches (36..50, 50..70), then the one
        // holding 100 cut off by the size limit.
        let mut data = [batch(36, 14), batch(50, 20)].concat();
        let third = batch(70, 40);
        data.extend_from_slice(&third[..third.len() / 2]);
        let fetched = decode_partition(0, bytes::Bytes::from(data), 100, &[]);
        let next = look_back(100, Some(Probe { at: 36, boundary: false }), &fetched, 0, 200);
        assert_eq!(next, Some(Probe { at: 70, boundary: true }), "not from 100 itself, which would skip 70..100's batch");
    }
}
