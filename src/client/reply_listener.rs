//! The reply side of a client: reads its reply partition and hands each reply to
//! the request waiting for it.
//!
//! Many clients may share a reply topic, and even a partition; a reply whose
//! correlation id is not pending here is someone else's (or arrived after its caller
//! gave up). It is counted and ignored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::in_flight::InFlight;
use crate::tail::Tail;
use crate::transport::ConsumedRecord;
use crate::wire;

/// Counters of the reply side.
#[derive(Debug, Default)]
pub(crate) struct ReplyCounters {
    pub(crate) delivered: AtomicU64,
    pub(crate) ignored: AtomicU64,
    /// Shared with the tails, which count their failed fetches here.
    pub(crate) fetch_errors: Arc<AtomicU64>,
}

/// Hands every reply `tail` reads to its waiting request, until the tail stops.
/// Fetch errors are the tail's to retry; pending requests fail at their own
/// deadlines meanwhile.
pub(crate) async fn run(mut tail: Tail, in_flight: Arc<InFlight>, counters: Arc<ReplyCounters>) {
    while let Some(replies) = tail.next().await {
        for reply in replies {
            deliver(reply, &in_flight, &counters);
        }
    }
}

fn deliver(reply: ConsumedRecord, in_flight: &InFlight, counters: &ReplyCounters) {
    let id = wire::reply_correlation_id(&reply.record).and_then(|id| <[u8; 16]>::try_from(id.as_ref()).ok());
    let delivered = match id {
        Some(id) => in_flight.complete(u128::from_be_bytes(id), reply),
        None => false,
    };
    if delivered {
        counters.delivered.fetch_add(1, Ordering::Relaxed);
    } else {
        counters.ignored.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(?id, "ignoring a reply that no request here is waiting for");
    }
}
