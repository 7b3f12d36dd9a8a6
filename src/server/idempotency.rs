//! Deduplication: a request seen before gets its first reply, without running its
//! handler again.
//!
//! Kafka delivers at least once: a server that crashes before committing an offset, a
//! producer whose acknowledgement was lost, a client that re-sends — each hands the
//! server a record it may already have handled. With
//! [`RpcServerBuilder::idempotency`](super::RpcServerBuilder::idempotency) the server
//! looks every request's *idempotency key* up in an [`IdempotencyStore`] before
//! dispatch; a hit is answered with the stored reply and counted in
//! [`ServerStats::duplicates`](super::ServerStats::duplicates), a miss runs the handler
//! and records its reply before the request's offset is committed.
//!
//! The key is the `kafka_rpc-idempotency-key` header ([`KEY_HEADER`]) when the request
//! carries one (set it with
//! [`RequestOptions::idempotency_key`](crate::client::RequestOptions::idempotency_key)
//! to make a retry, which has a new correlation id, count as the same request), else the
//! correlation id — which is what a redelivered or re-appended record repeats.
//!
//! Stores:
//! - [`MemoryWindow`]: the last N replies per partition, younger than an age. Fast, but
//!   lost on restart.
//! - [`KafkaWindow`]: the same window, written through to a topic and reloaded when a
//!   partition is assigned, so a restarted (or another) server still knows the keys.
//! - With the `postgres` feature, `postgres::Inbox`: not a window but the handler's own
//!   table, written in the transaction of its effect — the only exactly-once option.
//!
//! The exact guarantee is in `docs/guarantees.md`, "Deduplication".
//!
//! ```
//! use kafka_rpc::prelude::*;
//! use kafka_rpc::server::idempotency::MemoryWindow;
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Pay { cents: u64 }
//! impl Request for Pay {
//!     const TYPE: &'static str = "payments.pay";
//!     type Response = u64;
//!     fn key(&self) -> Option<Vec<u8>> { None }
//! }
//! async fn pay(req: Pay) -> Result<u64, RemoteError> { Ok(req.cents) }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = EmbeddedBroker::new();
//! let server = RpcServer::builder(broker.clone(), "payments")
//!     .idempotency(MemoryWindow::new().capacity(10_000).max_age(Duration::from_secs(600)))
//!     .handler(pay)
//!     .start()
//!     .await?;
//! let client = ReplyingClient::builder(broker, "payments").start().await?;
//! // Two calls carrying the same key: the second gets the first's reply, the handler ran once.
//! let once = RequestOptions::new().idempotency_key("order-42");
//! assert_eq!(client.request_with(Pay { cents: 500 }, once.clone()).await?, 500);
//! assert_eq!(client.request_with(Pay { cents: 999 }, once).await?, 500);
//! assert_eq!(server.stats().duplicates(), 1);
//! # client.shutdown().await; server.shutdown().await?; Ok(()) }
//! ```

mod kafka;
mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::watch;

use super::stats::ServerCounters;
use crate::backoff::Backoff;
use crate::codec::ContentType;
use crate::error::{ErrorCode, RemoteError};
use crate::transport::{Record, TopicPartition, TransportError};
use crate::wire;

pub use kafka::KafkaWindow;
pub use memory::MemoryWindow;

/// Header naming a request's idempotency key; when absent, the correlation id is the key.
pub const KEY_HEADER: &str = "kafka_rpc-idempotency-key";

/// Longest idempotency key accepted, in bytes. Keys come from the network and are kept
/// in memory, so a longer one is refused (`BAD_REQUEST`) rather than stored.
pub const MAX_KEY_LEN: usize = 1024;

/// Error code of the reply a request gets when the store cannot be asked whether it is
/// a duplicate. The handler did not run, so sending the request again is safe.
///
/// A handler may answer with it too, when its own idempotency store failed and nothing
/// was applied (`postgres::InboxError::into_remote` does): an outcome with this code is
/// never recorded, so a retry under the same key runs rather than getting it back.
pub const STORE_UNAVAILABLE: &str = "IDEMPOTENCY_STORE_UNAVAILABLE";

/// The idempotency key of a request record: the [`KEY_HEADER`] value, else the
/// correlation id. The one rule, shared by the server and `Context::idempotency_key`.
/// An empty value is no key: every such request would otherwise be one operation.
pub(crate) fn key_of(record: &Record) -> Option<&Bytes> {
    let non_empty = |name| record.header(name).filter(|v| !v.is_empty());
    non_empty(KEY_HEADER).or_else(|| non_empty(wire::names::CORRELATION_ID))
}

/// What a duplicate needs to be answered as the first request was.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredReply {
    /// Codec the response was encoded with.
    pub content_type: ContentType,
    /// The encoded response, or the error the first request got.
    pub outcome: Result<Bytes, RemoteError>,
    /// The registered name of the handler that answered, `None` when unknown (no
    /// handler served the type, or a store that does not keep it). A key reused for
    /// another handler's request is refused rather than answered with this outcome.
    pub(crate) handler: Option<Bytes>,
}

impl StoredReply {
    /// A stored reply with this codec and outcome.
    pub fn new(content_type: ContentType, outcome: Result<Bytes, RemoteError>) -> Self {
        StoredReply { content_type, outcome, handler: None }
    }

    /// Bytes held in memory for this reply, for sizing a window.
    pub fn size(&self) -> usize {
        match &self.outcome {
            Ok(bytes) => bytes.len(),
            Err(e) => e.message.len() + e.code.as_str().len(),
        }
    }
}

/// Why a store could not answer or record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The broker holding the window failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The store is set up in a way that cannot work (e.g. too few window partitions).
    #[error("idempotency store misconfigured: {0}")]
    Misconfigured(String),
    /// Any other failure of a store implemented outside this crate.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
    /// The store panicked, with this message. The server treats it as the store
    /// failing: a look-up refuses the request unrun, a load is retried.
    #[error("idempotency store panicked: {0}")]
    Panicked(String),
}

impl StoreError {
    fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        StoreError::Panicked(crate::error::panic_message(payload))
    }
}

/// A store future's outcome, its panic being the store's failure. The store is the
/// application's code, called with keys from the network: its panic must not end the
/// partition worker, which nothing would restart.
async fn guarded<T>(store_call: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    AssertUnwindSafe(store_call).catch_unwind().await.unwrap_or_else(|panic| Err(StoreError::panicked(panic.as_ref())))
}

/// Where a server keeps the replies of recent requests by idempotency key.
///
/// Windows are per request partition: a duplicate is recognised when it arrives on the
/// partition of the first request (same record key, same partition count), as every
/// redelivery and producer retry does.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Called when the server is assigned `partition`, before it serves any record of
    /// it; a store that keeps its window elsewhere loads it here. An error is retried.
    async fn load(&self, partition: &TopicPartition) -> Result<(), StoreError> {
        let _ = partition;
        Ok(())
    }

    /// The reply recorded for `key` on `partition`, if it is still in the window.
    async fn lookup(&self, partition: &TopicPartition, key: &[u8]) -> Result<Option<StoredReply>, StoreError>;

    /// Records the first reply to `key`. A later `lookup` must see it as soon as this
    /// returns (the next record of the partition may be the duplicate); the returned
    /// future resolves once the record would survive a restart, and the server commits
    /// the request's offset only after that. A key already recorded keeps its reply.
    fn record(&self, partition: &TopicPartition, key: Bytes, reply: StoredReply) -> BoxFuture<'static, Result<(), StoreError>>;

    /// The server no longer serves `partition`; a store may free what it holds for it.
    fn release(&self, partition: &TopicPartition) {
        let _ = partition;
    }
}

#[async_trait]
impl<T: IdempotencyStore + ?Sized> IdempotencyStore for Arc<T> {
    async fn load(&self, partition: &TopicPartition) -> Result<(), StoreError> {
        (**self).load(partition).await
    }

    async fn lookup(&self, partition: &TopicPartition, key: &[u8]) -> Result<Option<StoredReply>, StoreError> {
        (**self).lookup(partition, key).await
    }

    fn record(&self, partition: &TopicPartition, key: Bytes, reply: StoredReply) -> BoxFuture<'static, Result<(), StoreError>> {
        (**self).record(partition, key, reply)
    }

    fn release(&self, partition: &TopicPartition) {
        (**self).release(partition)
    }
}

/// What the server does with a request, decided before dispatch.
pub(crate) enum Verdict {
    /// Run the handler, then [`Dedup::record`] its outcome under this key (if any).
    Run(Option<Bytes>),
    /// Do not run the handler; answer with this: the first reply of a duplicate, or an
    /// error when the store cannot tell or the key is unacceptable.
    Answer(Result<Vec<u8>, RemoteError>),
}

/// The server's side of deduplication: one store, the key rule, and the counters.
pub(crate) struct Dedup {
    store: Arc<dyn IdempotencyStore>,
}

impl Dedup {
    pub(crate) fn new(store: Arc<dyn IdempotencyStore>) -> Self {
        Dedup { store }
    }

    /// Loads the window of a newly assigned partition, retrying until it succeeds or
    /// `stop` is set: serving before it is loaded would re-run what it holds. Returns
    /// false when stopped first.
    pub(crate) async fn load(&self, tp: &TopicPartition, stop: &mut watch::Receiver<bool>) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            let pause = backoff.next_pause();
            match guarded(self.store.load(tp)).await {
                Ok(()) => return true,
                Err(e) => tracing::warn!(%tp, error = %e, "cannot load the idempotency window; retrying in {pause:?}"),
            }
            tokio::select! {
                _ = crate::stop::requested(stop) => return false,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    pub(crate) fn release(&self, tp: &TopicPartition) {
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| self.store.release(tp))) {
            tracing::warn!(%tp, error = %StoreError::panicked(panic.as_ref()), "idempotency store failed to release a partition");
        }
    }

    /// Looks the request up before dispatch. `content_type` is the codec the reply
    /// will be labelled with: the request's; `label` gives its handler's metrics label,
    /// looked up only for a refusal.
    pub(crate) async fn check(
        &self,
        tp: &TopicPartition,
        record: &Record,
        content_type: ContentType,
        label: impl FnOnce() -> &'static str,
        counters: &ServerCounters,
    ) -> Verdict {
        let Some(key) = key_of(record) else { return Verdict::Run(None) };
        if key.len() > MAX_KEY_LEN {
            let error = RemoteError::with_code(
                ErrorCode::BadRequest,
                format!("idempotency key of {} bytes; at most {MAX_KEY_LEN} are accepted", key.len()),
            );
            counters.refused(label(), &error);
            return Verdict::Answer(Err(error));
        }
        // A store that panics on a key from the network fails this request alone.
        match guarded(self.store.lookup(tp, key)).await {
            Ok(Some(stored)) => {
                counters.duplicates.fetch_add(1, Ordering::Relaxed);
                let label = label();
                match stored.outcome {
                    // Another handler's outcome is no answer to this request: a refund
                    // reusing its payment's key was told the payment's result, and
                    // never ran.
                    _ if stored.handler.as_ref().is_some_and(|first| first.as_ref() != label.as_bytes()) => {
                        let first = String::from_utf8_lossy(stored.handler.as_deref().unwrap_or_default()).into_owned();
                        let error = RemoteError::with_code(
                            ErrorCode::BadRequest,
                            format!("idempotency key was first used for `{first}`; use another key for another operation"),
                        );
                        counters.refused(label, &error);
                        Verdict::Answer(Err(error))
                    }
                    // The stored bytes are in the first request's codec; a reply labelled
                    // with another would not decode.
                    Ok(_) if stored.content_type != content_type => {
                        let error = RemoteError::with_code(
                            ErrorCode::BadRequest,
                            format!("idempotency key was first used with {}; send it again with that codec", stored.content_type.as_str()),
                        );
                        // Refused by the server, like any BAD_REQUEST: counted as one.
                        counters.refused(label, &error);
                        Verdict::Answer(Err(error))
                    }
                    outcome => Verdict::Answer(outcome.map(|bytes| bytes.to_vec())),
                }
            }
            // A copy: the window keeps the key long after the request, and the request's
            // header may be a slice of a larger buffer (the embedded broker packs a
            // batch's small parts into one), which a kept slice would hold whole.
            Ok(None) => Verdict::Run(Some(Bytes::copy_from_slice(key))),
            Err(e) => {
                counters.idempotency_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%tp, error = %e, "idempotency store lookup failed; refusing the request unrun");
                let error = RemoteError::new(
                    STORE_UNAVAILABLE,
                    "the server cannot tell whether this request is a duplicate; it was not run",
                );
                // An error answer like any other, so `records_failed_total` counts it; in
                // `ServerStats` it is an idempotency failure (counted above), not a
                // handler's failure: its handler never ran.
                counters.metrics.failed(label(), &error);
                Verdict::Answer(Err(error))
            }
        }
    }

    /// Records the first reply to `key`, given by the handler registered as `handler`
    /// (its metrics label). Returns what to wait for before the offset may
    /// be committed: nothing when the store is durable at once (the memory window), else
    /// a task that ends when the record is durable. A failure is counted and logged:
    /// the request ran and is answered either way.
    ///
    /// A [`STORE_UNAVAILABLE`] answer is not recorded: it says nothing was applied (an
    /// inbox whose transaction rolled back), and kept as the key's outcome it would turn
    /// a passing database failure into the answer to every retry for `max_age`.
    pub(crate) fn record(
        &self,
        tp: &TopicPartition,
        key: Bytes,
        handler: &'static str,
        content_type: ContentType,
        outcome: &Result<Vec<u8>, RemoteError>,
        counters: &Arc<ServerCounters>,
    ) -> Option<Durable> {
        let outcome = match outcome {
            Ok(bytes) => Ok(Bytes::copy_from_slice(bytes)),
            Err(e) if e.code.as_str() == STORE_UNAVAILABLE => return None,
            Err(e) => Err(e.clone()),
        };
        let counters = counters.clone();
        let tp = tp.clone();
        let mut reply = StoredReply::new(content_type, outcome);
        // No handler served an unknown type: its answer is replayed to whatever comes
        // under the key (a retry after the handler was deployed still gets it).
        reply.handler = (handler != crate::metrics::UNKNOWN_TYPE).then(|| Bytes::from_static(handler.as_bytes()));
        let durable = match std::panic::catch_unwind(AssertUnwindSafe(|| self.store.record(&tp, key, reply))) {
            Ok(durable) => guarded(durable).boxed(),
            Err(panic) => futures::future::ready(Err(StoreError::panicked(panic.as_ref()))).boxed(),
        };
        let settle = async move {
            if let Err(e) = durable.await {
                counters.idempotency_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%tp, error = %e, "could not make an idempotency record durable; a redelivery of it would run again");
            }
        };
        // Most records of a memory window are settled here, without a task. The others
        // run as a task because the worker's queue of pending records must be `Sync`,
        // which a store's future need not be.
        let mut settle = settle.boxed();
        match (&mut settle).now_or_never() {
            Some(()) => None,
            None => Some(Durable(tokio::spawn(settle))),
        }
    }
}

/// Ends when a recorded outcome is durable. Dropped before that, it stops the task:
/// only its partition's worker waits for it (the record is not committed without it),
/// and a Kafka window write retried while its broker is unreachable would otherwise go
/// on for as long as the broker stays away, after the worker and the server stopped.
pub(crate) struct Durable(tokio::task::JoinHandle<()>);

impl Drop for Durable {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::future::Future for Durable {
    type Output = Result<(), tokio::task::JoinError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Header;

    fn record(headers: &[(&'static str, &'static [u8])]) -> Record {
        let headers = headers.iter().map(|(k, v)| Header { key: (*k).into(), value: Bytes::from_static(v) }).collect();
        Record { headers, ..Record::default() }
    }

    #[tokio::test]
    async fn a_first_run_s_key_is_a_copy_not_a_slice_of_the_request() {
        let dedup = Dedup::new(Arc::new(MemoryWindow::new()));
        let request = record(&[(KEY_HEADER, b"order-42")]);
        let counters = crate::server::stats::ServerCounters::new("t", []);
        let Verdict::Run(Some(key)) = dedup.check(&TopicPartition::new("t", 0), &request, ContentType::Json, || "t", &counters).await else {
            panic!("a key not seen before runs, under its key");
        };
        assert_eq!(key.as_ref(), b"order-42");
        let header = request.header(KEY_HEADER).expect("header");
        assert_ne!(key.as_ptr(), header.as_ptr(), "the window must not keep the request's buffer");
    }

    #[test]
    fn the_key_header_wins_over_the_correlation_id_and_empty_values_are_no_key() {
        let id = wire::names::CORRELATION_ID;
        assert_eq!(key_of(&record(&[(id, b"corr"), (KEY_HEADER, b"order-42")])).unwrap().as_ref(), b"order-42");
        assert_eq!(key_of(&record(&[(id, b"corr")])).unwrap().as_ref(), b"corr");
        assert_eq!(key_of(&record(&[(id, b"corr"), (KEY_HEADER, b"")])).unwrap().as_ref(), b"corr");
        assert_eq!(key_of(&record(&[(id, b"")])), None);
        assert_eq!(key_of(&record(&[])), None);
    }
}
