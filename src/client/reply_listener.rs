//! The reply side of a client: reads its reply partition and hands each reply to
//! the request waiting for it.
//!
//! Many clients may share a reply topic, and even a partition; a reply whose
//! correlation id is not pending here is someone else's (or arrived after its caller
//! gave up). It is counted and ignored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::in_flight::InFlight;
use crate::transport::{ConsumedRecord, PartitionReader, TransportError};
use crate::wire;

/// Counters of the reply side.
#[derive(Debug, Default)]
pub(crate) struct ReplyCounters {
    pub(crate) delivered: AtomicU64,
    pub(crate) ignored: AtomicU64,
    pub(crate) fetch_errors: AtomicU64,
}

/// Reads `reader` from `offset` until `stop` turns true.
pub(crate) async fn run(
    mut reader: Box<dyn PartitionReader>,
    mut offset: i64,
    max_wait: Duration,
    in_flight: Arc<InFlight>,
    counters: Arc<ReplyCounters>,
    mut stop: watch::Receiver<bool>,
) {
    // Back off after fetch errors so an outage does not spin; pending requests fail
    // at their own deadlines meanwhile.
    let mut backoff = Duration::from_millis(10);
    loop {
        let fetched = tokio::select! {
            biased;
            _ = crate::stop::requested(&mut stop) => return,
            fetched = reader.fetch(offset, max_wait) => fetched,
        };
        match fetched {
            Ok(records) => {
                backoff = Duration::from_millis(10);
                for reply in records {
                    offset = reply.offset + 1;
                    deliver(reply, &in_flight, &counters);
                }
            }
            Err(TransportError::OffsetOutOfRange { earliest, .. }) if earliest > offset => {
                tracing::warn!(offset, earliest, "reply offsets were deleted before they were read; skipping ahead");
                offset = earliest;
            }
            Err(e) => {
                counters.fetch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "reply fetch failed; retrying in {backoff:?}");
                tokio::select! {
                    _ = crate::stop::requested(&mut stop) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
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
    if delivered {
        counters.delivered.fetch_add(1, Ordering::Relaxed);
    } else {
        counters.ignored.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(?id, "ignoring a reply that no request here is waiting for");
    }
}
