//! One partition tail: reads a partition in order from an offset, forever, on any
//! [`Transport`].
//!
//! The client's reply listeners and the server's partition workers both follow a
//! partition the same way, so the rules live here once:
//! - a fetch error is counted, logged and retried after a [`Backoff`] pause (reset by
//!   the next success), so an outage neither spins nor gives up;
//! - an offset below the log start (retention deleted records before they were read)
//!   moves to the log start;
//! - an offset above the high watermark (the broker lost data it had acknowledged)
//!   moves per the [`OffsetReset`] policy, with a warn line saying so;
//! - a stop signal ends the tail between fetches or during one;
//! - the position follows the reader's [`Fetch::next_offset`], so it passes offsets
//!   that hold nothing to hand out (transaction markers, unreadable batches) even when
//!   no record follows them: a server commits up to the log's end, and its lag is 0.
//!
//! How long the broker holds a fetch is the transport's business (the Kafka
//! transport's fetch session, the embedded broker's wake-on-append); the tail only
//! bounds how long one [`PartitionReader::read`] call may block.
//!
//! [`Tail::next`] is cancel safe between calls: the position only moves when it
//! returns, so a caller may keep the future across loop turns (as the partition worker
//! does) or drop it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::transport::{ConsumedRecord, Fetch, OffsetReset, PartitionReader, TopicPartition, Transport, TransportError};

/// Pauses after failed fetches or failed attempts to open the partition.
const RETRY: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
/// Longest one reader call blocks. Records end a call as soon as they arrive, and a
/// stop ends it at once, so this only bounds how long a quiet call lasts.
const MAX_WAIT: Duration = Duration::from_millis(500);

/// What [`Tail::next`] brings.
#[derive(Debug)]
pub(crate) enum Step {
    /// Records in offset order, [`position`](Tail::position) then one past the last,
    /// or further when offsets after it hold nothing to hand out. Empty when only such
    /// offsets were passed.
    Read(Vec<ConsumedRecord>),
    /// The tail jumped (to the log start after deleted records, or per the reset
    /// policy above the high watermark); [`position`](Tail::position) is where to.
    Jumped,
}

/// Follows one partition from an offset.
pub(crate) struct Tail {
    transport: Arc<dyn Transport>,
    tp: TopicPartition,
    reader: Option<Box<dyn PartitionReader>>,
    offset: i64,
    reset: OffsetReset,
    backoff: Backoff,
    stop: watch::Receiver<bool>,
    errors: Arc<AtomicU64>,
}

impl Tail {
    /// A tail of `tp` from `offset`. `reset` decides where to go when the offset is
    /// above the high watermark.
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        tp: TopicPartition,
        offset: i64,
        reset: OffsetReset,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Tail {
            transport,
            tp,
            reader: None,
            offset,
            reset,
            backoff: RETRY,
            stop,
            errors: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Uses an already opened reader (opened by a caller that wants a missing
    /// partition to fail at start-up rather than be retried).
    pub(crate) fn with_reader(mut self, reader: Box<dyn PartitionReader>) -> Self {
        self.reader = Some(reader);
        self
    }

    /// Counts failed fetches in `errors` (shared with the owner's statistics).
    pub(crate) fn count_errors_in(mut self, errors: Arc<AtomicU64>) -> Self {
        self.errors = errors;
        self
    }

    /// The next offset the tail will read.
    pub(crate) fn position(&self) -> i64 {
        self.offset
    }

    /// Reads from `offset` next (the server's partition worker rewinds to a record it
    /// could not answer).
    pub(crate) fn seek(&mut self, offset: i64) {
        self.offset = offset;
    }

    /// The next records, in offset order, or a jump; `None` once stop is requested.
    /// Its owner learns of a jump at once, not when the next record arrives: a server
    /// must commit that offset even though it is lower than what it committed before,
    /// or the partition's next owner would start from the stale offset and reset again
    /// over records already handled. It also learns at once that the position passed
    /// offsets without records ([`Step::Read`] of none), so it can commit past them
    /// when nothing else follows.
    pub(crate) async fn next(&mut self) -> Option<Step> {
        let mut stop = self.stop.clone();
        loop {
            if *stop.borrow() {
                return None;
            }
            let fetched = tokio::select! {
                biased;
                _ = crate::stop::requested(&mut stop) => return None,
                fetched = self.fetch() => fetched,
            };
            match fetched {
                Ok(Fetch { records, next_offset }) => {
                    self.backoff.reset();
                    // The reader never reports a position before one past its last
                    // record; the max keeps that promise here whatever a reader does.
                    // Cannot overflow: a consumed offset is below i64::MAX (`ConsumedRecord::offset`).
                    let after_last = records.last().map_or(self.offset, |last| last.offset + 1);
                    let next = next_offset.max(after_last);
                    if next > self.offset {
                        self.offset = next;
                        return Some(Step::Read(records));
                    }
                }
                Err(TransportError::OffsetOutOfRange { offset, earliest, .. }) if offset < earliest => {
                    tracing::warn!(tp = %self.tp, offset, earliest, "records were deleted before they were read; skipping ahead to the log start");
                    self.offset = earliest;
                    return Some(Step::Jumped);
                }
                Err(TransportError::OffsetOutOfRange { offset, earliest, latest, .. }) if offset > latest => {
                    let to = match self.reset {
                        OffsetReset::Earliest => earliest,
                        OffsetReset::Latest => latest,
                    };
                    tracing::warn!(
                        tp = %self.tp, offset, high_watermark = latest, reset = ?self.reset, to,
                        "offset is above the high watermark (the broker lost records it had acknowledged); resetting"
                    );
                    self.offset = to;
                    return Some(Step::Jumped);
                }
                // An out-of-range answer whose offset lies inside the log's ends lands here
                // on purpose: Apache Kafka names no ends in it, the reader looks them up
                // afterwards, and by then the log may hold the offset again (it grew, a
                // new leader caught up). Reading the same offset again after a pause is
                // right; resetting would re-read or skip records.
                Err(e) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    let pause = self.backoff.next_pause();
                    tracing::warn!(tp = %self.tp, offset = self.offset, error = %e, "fetch failed; retrying in {pause:?}");
                    tokio::select! {
                        _ = crate::stop::requested(&mut stop) => return None,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// One fetch, opening the reader first if needed.
    async fn fetch(&mut self) -> Result<Fetch, TransportError> {
        let reader = match &mut self.reader {
            Some(r) => r,
            None => self.reader.insert(self.transport.reader(&self.tp.topic, self.tp.partition).await?),
        };
        reader.read(self.offset, MAX_WAIT).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::embedded::EmbeddedBroker;
    use crate::transport::Record;

    fn rec(v: &str) -> Record {
        Record::new(None::<String>, v.to_string())
    }

    async fn broker_with(records: &[&str]) -> Arc<EmbeddedBroker> {
        let broker = Arc::new(EmbeddedBroker::new());
        broker.ensure_topic("t", 1).await.expect("create");
        if !records.is_empty() {
            broker.produce("t", 0, records.iter().map(|v| rec(v)).collect()).await.expect("produce");
        }
        broker
    }

    fn values(records: &[ConsumedRecord]) -> Vec<String> {
        records
            .iter()
            .map(|r| String::from_utf8_lossy(r.record.value.as_deref().unwrap_or_default()).into_owned())
            .collect()
    }

    fn tail(broker: &Arc<EmbeddedBroker>, offset: i64, reset: OffsetReset) -> (Tail, watch::Sender<bool>) {
        let (stop_tx, stop) = watch::channel(false);
        let transport: Arc<dyn Transport> = broker.clone();
        (Tail::new(transport, TopicPartition::new("t", 0), offset, reset, stop), stop_tx)
    }

    async fn step(t: &mut Tail) -> Step {
        tokio::time::timeout(Duration::from_secs(10), t.next())
            .await
            .expect("the tail should read within 10 s")
            .expect("not stopped")
    }

    async fn next(t: &mut Tail) -> Vec<ConsumedRecord> {
        match step(t).await {
            Step::Read(records) => records,
            Step::Jumped => panic!("records expected, the tail jumped"),
        }
    }

    async fn jumped(t: &mut Tail) -> bool {
        matches!(step(t).await, Step::Jumped)
    }

    #[tokio::test]
    async fn above_the_high_watermark_resets_to_the_earliest_offset() {
        let broker = broker_with(&["a", "b"]).await;
        let (mut t, _stop) = tail(&broker, 50, OffsetReset::Earliest);
        assert!(jumped(&mut t).await, "the jump is reported before any record");
        assert_eq!(t.position(), 0, "where it jumped to");
        assert_eq!(values(&next(&mut t).await), ["a", "b"]);
        assert_eq!(t.position(), 2);
    }

    #[tokio::test]
    async fn above_the_high_watermark_resets_to_the_latest_offset() {
        let broker = broker_with(&["a", "b"]).await;
        let (mut t, _stop) = tail(&broker, 50, OffsetReset::Latest);
        assert!(jumped(&mut t).await, "the jump is reported before any record");
        assert_eq!(t.position(), 2, "where it jumped to");
        // Nothing to read at the latest offset: paused, the clock reaches the limit only
        // once the tail (and the broker, in this runtime) had nothing left to do.
        tokio::time::pause();
        assert!(tokio::time::timeout(Duration::from_millis(300), t.next()).await.is_err());
        tokio::time::resume();
        broker.produce("t", 0, vec![rec("c")]).await.expect("produce");
        assert_eq!(values(&next(&mut t).await), ["c"]);
    }

    #[tokio::test]
    async fn a_stop_ends_a_waiting_tail() {
        let broker = broker_with(&[]).await;
        let (mut t, stop) = tail(&broker, 0, OffsetReset::Earliest);
        let waiting = tokio::spawn(async move { t.next().await.is_none() });
        stop.send_replace(true);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("stopped in time").expect("joined"));
    }

    #[tokio::test]
    async fn a_missing_partition_is_retried_until_it_appears() {
        let broker = Arc::new(EmbeddedBroker::new());
        let (mut t, _stop) = tail(&broker, 0, OffsetReset::Earliest);
        let errors = Arc::new(AtomicU64::new(0));
        t = t.count_errors_in(errors.clone());
        let reading = tokio::spawn(async move { next(&mut t).await });
        let failed_once = async {
            while errors.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), failed_once).await.expect("reading the missing partition failed within 10 s");
        broker.ensure_topic("t", 1).await.expect("create");
        broker.produce("t", 0, vec![rec("late")]).await.expect("produce");
        assert_eq!(values(&reading.await.expect("joined")), ["late"]);
    }
}
