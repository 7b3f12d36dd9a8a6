//! The reply side of a client: reads its reply partition and hands each reply to
//! the request waiting for it.
//!
//! Many clients may share a reply topic, and even a partition; a reply whose
//! correlation id is not pending here is someone else's (or arrived after its caller
//! gave up). It is counted and ignored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::in_flight::{CloseOnDrop, InFlight};
use crate::metrics::ClientMetrics;
use crate::tail::{Step, Tail};
use crate::transport::ConsumedRecord;
use crate::wire;

/// Counters of the reply side.
pub(crate) struct ReplyCounters {
    pub(crate) delivered: AtomicU64,
    pub(crate) ignored: AtomicU64,
    /// Shared with the tails, which count their failed fetches here.
    pub(crate) fetch_errors: Arc<AtomicU64>,
    metrics: Arc<ClientMetrics>,
}

impl ReplyCounters {
    pub(crate) fn new(metrics: Arc<ClientMetrics>) -> Self {
        ReplyCounters { delivered: AtomicU64::new(0), ignored: AtomicU64::new(0), fetch_errors: Arc::default(), metrics }
    }

    /// Counts a reply read, for the client's stats and its metrics at once.
    fn reply(&self, delivered: bool) {
        self.metrics.reply(delivered);
        let counter = if delivered { &self.delivered } else { &self.ignored };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Hands every reply `tail` reads to its waiting request, until the tail stops.
/// Fetch errors are the tail's to retry; pending requests fail at their own
/// deadlines meanwhile. When this task ends, for whatever reason, the client's calls
/// can get no reply, so the map is closed ([`CloseOnDrop`]).
pub(crate) async fn run(mut tail: Tail, in_flight: Arc<InFlight>, counters: Arc<ReplyCounters>) {
    let in_flight = CloseOnDrop(in_flight);
    let in_flight = &in_flight.0;
    while let Some(step) = tail.next().await {
        // A jump needs nothing here: the listener commits nothing, and a reply the
        // broker lost is the request's timeout to report.
        if let Step::Read(replies) = step {
            for reply in replies {
                deliver(reply, in_flight, &counters);
            }
        }
    }
}

fn deliver(reply: ConsumedRecord, in_flight: &InFlight, counters: &ReplyCounters) {
    let id = wire::reply_correlation_id(&reply.record).and_then(|id| wire::correlation_key(id));
    let delivered = match id {
        Some(id) => in_flight.complete(id, reply),
        None => false,
    };
    counters.reply(delivered);
    if !delivered {
        tracing::debug!(?id, "ignoring a reply that no request here is waiting for");
    }
}
