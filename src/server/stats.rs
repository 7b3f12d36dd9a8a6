//! What a server has done, counted.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{ErrorCode, RemoteError};

/// Live counters, shared by the partition workers.
#[derive(Debug, Default)]
pub(crate) struct ServerCounters {
    pub(crate) handled: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) unknown_type: AtomicU64,
    pub(crate) bad_request: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) unroutable: AtomicU64,
    pub(crate) events: AtomicU64,
    pub(crate) reply_failures: AtomicU64,
    pub(crate) replies_dropped: AtomicU64,
    pub(crate) replies_replaced: AtomicU64,
    pub(crate) replies_too_large: AtomicU64,
    pub(crate) replies_refused: AtomicU64,
    pub(crate) commit_failures: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) idempotency_failures: AtomicU64,
}

impl ServerCounters {
    pub(crate) fn record_outcome(&self, outcome: &Result<Vec<u8>, RemoteError>) {
        self.handled.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = outcome {
            let counter = match e.code {
                ErrorCode::HandlerPanicked => &self.panicked,
                ErrorCode::UnknownType => &self.unknown_type,
                ErrorCode::BadRequest => &self.bad_request,
                _ => &self.failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> ServerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServerStats {
            handled: get(&self.handled),
            failed: get(&self.failed),
            panicked: get(&self.panicked),
            unknown_type: get(&self.unknown_type),
            bad_request: get(&self.bad_request),
            expired: get(&self.expired),
            unroutable: get(&self.unroutable),
            events: get(&self.events),
            reply_failures: get(&self.reply_failures),
            replies_dropped: get(&self.replies_dropped),
            replies_replaced: get(&self.replies_replaced),
            replies_too_large: get(&self.replies_too_large),
            replies_refused: get(&self.replies_refused),
            commit_failures: get(&self.commit_failures),
            duplicates: get(&self.duplicates),
            idempotency_failures: get(&self.idempotency_failures),
        }
    }
}

/// A snapshot of a server's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Records dispatched to the router (successful or not).
    pub handled: u64,
    /// Handler errors and timeouts.
    pub failed: u64,
    /// Handler panics (answered with `HANDLER_PANICKED`; the server kept running).
    pub panicked: u64,
    /// Requests naming a type with no handler.
    pub unknown_type: u64,
    /// Requests whose payload could not be decoded.
    pub bad_request: u64,
    /// Requests skipped because their deadline had passed.
    pub expired: u64,
    /// Records skipped because their headers were malformed (no safe reply address).
    pub unroutable: u64,
    /// Records handled without a reply (no reply headers).
    pub events: u64,
    /// Replies of which not even the error reply could be produced because the broker
    /// was unreachable: their records were not committed and are read again.
    pub reply_failures: u64,
    /// Replies of which the broker refused even the error reply (for example, the server
    /// may not write the reply topic): nothing more can be sent, so their records were
    /// committed unanswered rather than block the partition.
    pub replies_dropped: u64,
    /// Replies the broker refused after retries, answered with `REPLY_FAILED` instead.
    pub replies_replaced: u64,
    /// Replies over the server's maximum size, answered with `REPLY_TOO_LARGE` instead.
    pub replies_too_large: u64,
    /// Requests whose reply address the reply-topic policy refused (not run, committed).
    pub replies_refused: u64,
    /// Offset commits that failed (retried on the next tick).
    pub commit_failures: u64,
    /// Requests answered from the idempotency store without running their handler.
    pub duplicates: u64,
    /// Idempotency store lookups (request refused unrun) or records (request answered,
    /// but a redelivery would run again) that failed.
    pub idempotency_failures: u64,
}
