//! What a server has done, counted: each event once, for [`ServerStats`] and for the
//! server's metrics (see [`crate::metrics`]) together.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{ErrorCode, RemoteError};
use crate::metrics::{self as m, Count, ServerMetrics, TypeMetrics};

/// Live counters, shared by the partition workers.
#[derive(Debug)]
pub(crate) struct ServerCounters {
    pub(crate) handled: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) unknown_type: AtomicU64,
    pub(crate) bad_request: AtomicU64,
    pub(crate) expired: Count,
    pub(crate) unroutable: Count,
    pub(crate) events: Count,
    pub(crate) reply_failures: Count,
    pub(crate) replies_dropped: Count,
    pub(crate) replies_dead_lettered: Count,
    pub(crate) replies_replaced: Count,
    pub(crate) replies_too_large: Count,
    pub(crate) replies_refused: Count,
    pub(crate) commit_failures: Count,
    pub(crate) duplicates: Count,
    pub(crate) idempotency_failures: Count,
    /// Metrics that are not plain counts: per-type outcomes, latency, lag, assignment.
    pub(crate) metrics: ServerMetrics,
}

impl ServerCounters {
    /// Counters of the server of request topic `topic` (the label of its metrics) whose
    /// handlers serve `types`.
    pub(crate) fn new(topic: &str, types: impl IntoIterator<Item = &'static str>) -> Self {
        let metrics = ServerMetrics::new(topic, types);
        let t = metrics.topic();
        let failed_reply = |reason| Count::new(m::SERVER_REPLIES_FAILED, t, &[("reason", reason)]);
        ServerCounters {
            handled: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            panicked: AtomicU64::new(0),
            unknown_type: AtomicU64::new(0),
            bad_request: AtomicU64::new(0),
            expired: Count::new(m::SERVER_EXPIRED, t, &[]),
            unroutable: Count::new(m::SERVER_SKIPPED, t, &[("reason", "unroutable")]),
            events: Count::new(m::SERVER_EVENTS, t, &[]),
            reply_failures: failed_reply("unreachable"),
            replies_dropped: failed_reply("dropped"),
            replies_dead_lettered: failed_reply("dead_lettered"),
            replies_replaced: failed_reply("replaced"),
            replies_too_large: failed_reply("too_large"),
            replies_refused: Count::new(m::SERVER_SKIPPED, t, &[("reason", "reply_refused")]),
            commit_failures: Count::new(m::SERVER_COMMIT_FAILURES, t, &[]),
            duplicates: Count::new(m::SERVER_DUPLICATES, t, &[]),
            idempotency_failures: Count::new(m::SERVER_IDEMPOTENCY_FAILURES, t, &[]),
            metrics,
        }
    }

    /// Counts a handler's outcome for `request_type` (a registered name, or `unknown`);
    /// `elapsed` is the handler call's duration, given once per call.
    pub(crate) fn record_outcome(&self, request_type: &'static str, elapsed: Option<Duration>, outcome: &Result<Vec<u8>, RemoteError>) {
        self.metrics.handled(request_type, elapsed, outcome);
        self.count_outcome(outcome);
    }

    /// [`record_outcome`](Self::record_outcome) with the type's metrics already looked up.
    pub(crate) fn record_outcome_as(&self, kept: &TypeMetrics, elapsed: Option<Duration>, outcome: &Result<Vec<u8>, RemoteError>) {
        self.metrics.handled_as(kept, elapsed, outcome);
        self.count_outcome(outcome);
    }

    /// The metrics of `request_type`, for [`record_outcome_as`](Self::record_outcome_as).
    pub(crate) fn type_metrics(&self, request_type: &'static str) -> TypeMetrics {
        self.metrics.type_metrics(request_type)
    }

    fn count_outcome(&self, outcome: &Result<Vec<u8>, RemoteError>) {
        self.handled.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = outcome {
            self.count_error(e);
        }
    }

    /// Counts an error answer in the [`ServerStats`] counter its code belongs to.
    fn count_error(&self, error: &RemoteError) {
        let counter = match error.code {
            ErrorCode::HandlerPanicked => &self.panicked,
            ErrorCode::UnknownType => &self.unknown_type,
            ErrorCode::BadRequest => &self.bad_request,
            _ => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request answered with `error` (a built-in code) without dispatch to
    /// its handler (`request_type`: a registered name, or `unknown`): in its
    /// [`ServerStats`] counter and in the failed-records metric, not as handled.
    pub(crate) fn refused(&self, request_type: &'static str, error: &RemoteError) {
        self.metrics.failed(request_type, error);
        self.count_error(error);
    }

    pub(crate) fn snapshot(&self) -> ServerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let count = |c: &Count| c.load(Ordering::Relaxed);
        ServerStats {
            handled: get(&self.handled),
            failed: get(&self.failed),
            panicked: get(&self.panicked),
            unknown_type: get(&self.unknown_type),
            bad_request: get(&self.bad_request),
            expired: count(&self.expired),
            unroutable: count(&self.unroutable),
            events: count(&self.events),
            reply_failures: count(&self.reply_failures),
            replies_dropped: count(&self.replies_dropped),
            replies_dead_lettered: count(&self.replies_dead_lettered),
            replies_replaced: count(&self.replies_replaced),
            replies_too_large: count(&self.replies_too_large),
            replies_refused: count(&self.replies_refused),
            commit_failures: count(&self.commit_failures),
            duplicates: count(&self.duplicates),
            idempotency_failures: count(&self.idempotency_failures),
        }
    }
}

/// A snapshot of a server's counters, read through its methods (so a new counter is not
/// a breaking change).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    handled: u64,
    failed: u64,
    panicked: u64,
    unknown_type: u64,
    bad_request: u64,
    expired: u64,
    unroutable: u64,
    events: u64,
    reply_failures: u64,
    replies_dropped: u64,
    replies_dead_lettered: u64,
    replies_replaced: u64,
    replies_too_large: u64,
    replies_refused: u64,
    commit_failures: u64,
    duplicates: u64,
    idempotency_failures: u64,
}

impl ServerStats {
    /// Records dispatched to the router (successful or not).
    pub fn handled(&self) -> u64 {
        self.handled
    }

    /// Handler errors and timeouts.
    pub fn failed(&self) -> u64 {
        self.failed
    }

    /// Handler panics (answered with `HANDLER_PANICKED`; the server kept running).
    pub fn panicked(&self) -> u64 {
        self.panicked
    }

    /// Requests naming a type with no handler.
    pub fn unknown_type(&self) -> u64 {
        self.unknown_type
    }

    /// Requests answered `BAD_REQUEST` by the server: their payload could not be
    /// decoded, their codec, deadline or type header could not be read, or (with
    /// deduplication on) their idempotency key is over 1,024 bytes or was first used
    /// with another codec.
    pub fn bad_request(&self) -> u64 {
        self.bad_request
    }

    /// Requests skipped because their deadline had passed.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// Records skipped because their headers were malformed (no safe reply address).
    pub fn unroutable(&self) -> u64 {
        self.unroutable
    }

    /// Records handled without a reply (no reply headers).
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Replies of which not even the error reply could be produced because the broker
    /// was unreachable: their records were not committed and are read again.
    pub fn reply_failures(&self) -> u64 {
        self.reply_failures
    }

    /// Replies of which the broker refused even the error reply (for example, the server
    /// may not write the reply topic): nothing more can be sent, so their records were
    /// committed unanswered rather than block the partition.
    pub fn replies_dropped(&self) -> u64 {
        self.replies_dropped
    }

    /// Requests whose reply and error reply the broker refused, written to the dead-letter
    /// topic (see [`RpcServerBuilder::dead_letter_topic`](super::RpcServerBuilder::dead_letter_topic))
    /// before their offsets were committed.
    pub fn replies_dead_lettered(&self) -> u64 {
        self.replies_dead_lettered
    }

    /// Replies the broker refused after retries, answered with `REPLY_FAILED` instead.
    pub fn replies_replaced(&self) -> u64 {
        self.replies_replaced
    }

    /// Replies over the server's maximum size, answered with `REPLY_TOO_LARGE` instead.
    pub fn replies_too_large(&self) -> u64 {
        self.replies_too_large
    }

    /// Requests whose reply address the reply-topic policy refused (not run, committed).
    pub fn replies_refused(&self) -> u64 {
        self.replies_refused
    }

    /// Offset commits that failed (retried on the next tick).
    pub fn commit_failures(&self) -> u64 {
        self.commit_failures
    }

    /// Requests answered from the idempotency store without running their handler.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Idempotency store lookups (request refused unrun) or records (request answered,
    /// but a redelivery would run again) that failed.
    pub fn idempotency_failures(&self) -> u64 {
        self.idempotency_failures
    }
}
