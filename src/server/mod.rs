//! The serving side: [`RpcServer`] consumes a request topic as a consumer-group
//! member, dispatches each record by type, and replies to the requester.
//!
//! Records of one partition are handled strictly in order; partitions run
//! concurrently. Offsets are committed only past records that were answered: their
//! reply, or an error reply in its place, was acknowledged by the broker (the exact
//! rules are in `docs/guarantees.md`). Replies go only to allowed reply topics
//! ([`RpcServerBuilder::reply_topic`]), and every handler runs under a time limit.
//!
//! ```
//! use kafka_rpc::prelude::*;
//! use serde::{Deserialize, Serialize};
//! use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Count { by: u64 }
//! impl Request for Count {
//!     const TYPE: &'static str = "counter.add";
//!     type Response = u64;
//!     fn key(&self) -> Option<Vec<u8>> { Some(b"the-counter".to_vec()) }
//! }
//!
//! async fn add(req: Count, _ctx: Context, State(total): State<Arc<AtomicU64>>) -> Result<u64, RemoteError> {
//!     Ok(total.fetch_add(req.by, Ordering::SeqCst) + req.by)
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = EmbeddedBroker::new();
//! let server = RpcServer::builder(broker.clone(), "counters")
//!     .group("counter-service")
//!     .state(Arc::new(AtomicU64::new(0)))
//!     .handler(add)
//!     .start()
//!     .await?;
//! let client = ReplyingClient::builder(broker, "counters").start().await?;
//! assert_eq!(client.request(Count { by: 2 }).await?, 2);
//! assert_eq!(client.request(Count { by: 3 }).await?, 5);
//! client.shutdown().await;
//! server.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod batch;
pub mod handler;
pub mod idempotency;
mod group;
mod inbound;
mod partition_worker;
mod replier;
mod reply_policy;
mod router;
mod settlement;
mod stats;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{excerpt, ConfigError, MAX_ECHO};
use crate::producer::BatchConfig;
use crate::transport::{within_start_timeout, OffsetReset, TopicPartition, Transport, TransportError};
use group::{LoopSettings, Owned};
use handler::{Handler, HandlerOptions, StateMap};
use idempotency::{Dedup, IdempotencyStore};
use partition_worker::{Shared, WorkerSettings};
use replier::{DeadLetters, Replier, ReplySettings};
use reply_policy::ReplyPolicy;
use router::Router;
use stats::ServerCounters;
pub use handler::Cancellation;
pub use stats::ServerStats;

/// Why a server could not start, or why it stopped serving.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The broker failed, or the group membership failed for a reason retrying cannot fix.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The group membership ended without the server leaving it; the server stopped.
    #[error("the consumer group membership ended unexpectedly")]
    MembershipEnded,
    /// Shutting down, the server could not commit the offsets of the records it had
    /// finished. It still left its group, so the partitions move on, but their next
    /// owner reads those records again from the last commit that succeeded: they are
    /// handled twice unless an idempotency store recognises them.
    #[error("the final offset commit failed; finished records will be delivered again")]
    FinalCommit(#[source] TransportError),
    /// The server's serving task or one of its partition workers panicked (a bug in
    /// kafka-rpc, or in a custom transport): it serves nothing more. A dead serving task's
    /// partitions move on only once its group membership expires; after a dead worker,
    /// the server commits what was finished and leaves as on any failure.
    #[error("the serving task panicked: {0}")]
    Panicked(String),
    /// Shutting down, the server gave up waiting after its
    /// [shutdown timeout](RpcServerBuilder::shutdown_timeout): partition workers still
    /// running (a handler that ignores cancellation) or replies still being produced (a
    /// transport whose produce does not return) were abandoned. Their records were not
    /// committed, so their partitions' next owner reads them again. What was finished
    /// was committed and the server left its group.
    #[error("shutdown gave up after {timeout:?}: {abandoned}")]
    ShutdownTimedOut {
        /// The shutdown timeout that ran out.
        timeout: Duration,
        /// What was abandoned.
        abandoned: Abandoned,
    },
    /// The server could not start: a builder setting cannot work.
    #[error(transparent)]
    Config(#[from] crate::error::ConfigError),
    /// The server was built without handlers.
    #[error("no handlers registered")]
    NoHandlers,
    /// Two handlers claim the same request type.
    #[error("more than one handler for request type `{0}`")]
    DuplicateHandler(&'static str),
    /// A handler takes `State<S>` but no `S` was registered with `state`.
    #[error("handler for `{request_type}` needs state `{state}`; register it with `.state(...)`")]
    MissingState {
        /// The handler's request type.
        request_type: &'static str,
        /// The state's type name.
        state: &'static str,
    },
}

/// What a shutdown abandoned at its timeout; see [`ServerError::ShutdownTimedOut`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Abandoned {
    /// Request partitions whose worker was still running (a handler, or the wait for
    /// its reply's acknowledgement): its unfinished records are delivered again.
    pub workers: Vec<TopicPartition>,
    /// Reply partitions whose produce had not finished: replies queued there may never
    /// reach their callers, whose requests are delivered again (not committed).
    pub replies: Vec<TopicPartition>,
}

impl Abandoned {
    /// Nothing was abandoned.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty() && self.replies.is_empty()
    }
}

impl std::fmt::Display for Abandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |tps: &[TopicPartition]| tps.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        write!(f, "workers of [{}] and replies to [{}] abandoned", list(&self.workers), list(&self.replies))
    }
}

/// Whether a server is serving; see [`RpcServer::health`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Health {
    /// Serving its group's partitions (or waiting for some).
    Serving,
    /// Stopped serving because of this error; `shutdown` returns it too.
    Failed(ServerError),
    /// Shut down as asked.
    Stopped,
}

/// Configures and starts an [`RpcServer`].
pub struct RpcServerBuilder {
    transport: Arc<dyn Transport>,
    topic: String,
    group: Option<String>,
    partitions: i32,
    router: Router,
    state: StateMap,
    reset: OffsetReset,
    commit_interval: Duration,
    shutdown_timeout: Duration,
    handler_timeout: Duration,
    max_unacknowledged: usize,
    max_batch: usize,
    reply_topics: HashSet<String>,
    reply_prefixes: Vec<String>,
    dead_letter_topic: Option<String>,
    reply: ReplySettings,
    idempotency: Option<Arc<dyn IdempotencyStore>>,
}

impl RpcServerBuilder {
    /// Registers a handler under its request type (see [`handler`]).
    pub fn handler<A: 'static, H: Handler<A>>(self, handler: H) -> Self {
        self.handler_with(handler, HandlerOptions::new())
    }

    /// Registers a handler with options that override its own dispatch name or
    /// timeout (see [`HandlerOptions`]).
    pub fn handler_with<A: 'static, H: Handler<A>>(mut self, handler: H, options: HandlerOptions) -> Self {
        self.router.add(handler, options);
        self
    }

    /// Registers a handler that also serves requests on `topic` carrying no
    /// `kafka_rpc-type` header, as NestJS and Spring callers send them (they dispatch by
    /// topic). Without this, such a request goes to the handler whose type name equals
    /// its topic. `topic` must be the server's request topic, the only one it consumes:
    /// another is refused at start ([`ServerError::Config`]).
    pub fn topic_handler<A: 'static, H: Handler<A>>(mut self, topic: impl Into<String>, handler: H) -> Self {
        self.router.add_for_topic(topic.into(), handler, HandlerOptions::new());
        self
    }

    /// Answers every caller in `peer`'s conventions instead of the ones its request
    /// follows (see [`Peer`](crate::wire::Peer); by default each caller is answered in
    /// its own).
    pub fn peer(mut self, peer: crate::wire::Peer) -> Self {
        self.reply.peer = Some(peer);
        self
    }

    /// Registers a batch handler under its request type (see [`batch`]): requests of
    /// that type fetched together from one partition are handled in one call.
    pub fn batch_handler<A: 'static, H: batch::BatchHandler<A>>(self, handler: H) -> Self {
        self.batch_handler_with(handler, HandlerOptions::new())
    }

    /// Registers a batch handler with options that override its own dispatch name or
    /// timeout (see [`HandlerOptions`]).
    pub fn batch_handler_with<A: 'static, H: batch::BatchHandler<A>>(mut self, handler: H, options: HandlerOptions) -> Self {
        self.router.add_batch(handler, options);
        self
    }

    /// Most requests passed to one batch-handler call (default 500); a batch is also
    /// never larger than what one fetch returned. Zero is refused at start
    /// ([`ServerError::Config`]); `usize::MAX` means no bound beyond the fetch.
    pub fn max_batch(mut self, requests: usize) -> Self {
        self.max_batch = requests;
        self
    }

    /// Registers shared state that handlers receive through [`State<S>`](handler::State).
    pub fn state<S: Clone + Send + Sync + 'static>(mut self, state: S) -> Self {
        self.state.insert(state);
        self
    }

    /// Consumer group id; instances with the same id share the partitions. Defaults
    /// to `<topic>.server`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Partitions of the request topic when the server has to create it: 1 to
    /// [`MAX_PARTITIONS`](crate::transport::MAX_PARTITIONS), else `start` fails with
    /// [`TransportError::TopicCreation`].
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Where to start partitions with no committed offset (default earliest; requests
    /// past their deadline are skipped, not run).
    pub fn offset_reset(mut self, reset: OffsetReset) -> Self {
        self.reset = reset;
        self
    }

    /// How often finished offsets are committed (default 100 ms); they are also
    /// committed on revocation and shutdown. Zero is refused at start
    /// ([`ServerError::Config`]), as Spring refuses an `ackTime` of 0: commits are
    /// periodic, and no period is not one.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// How long shutdown and revocation wait for running handlers and the production of
    /// their replies (default 30 s). What is still running then is abandoned (its
    /// records are delivered again) and shutdown returns
    /// [`ServerError::ShutdownTimedOut`] naming it. The final offset commit and leaving
    /// the group are each bounded by it too, but given at least 5 s, so shutdown
    /// returns within about three times this (or 10 s), whatever the transport does.
    /// Zero means "do not wait for running handlers": a worker still running one is
    /// abandoned at once and reported (idle workers stop on the signal); what was
    /// finished is still committed.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Time limit for handlers that set none themselves (default 30 s). The request's
    /// deadline caps it; past it the caller gets `HANDLER_TIMEOUT` and the partition
    /// moves on. Zero is refused at start ([`ServerError::Config`]); for no limit give
    /// `Duration::MAX`.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = timeout;
        self
    }

    /// Allows replies to `topic` in addition to `<request topic>.replies` (and
    /// `<request topic>.reply`, NestJS's name for it). Requests
    /// naming any other reply topic are not run and not answered (see
    /// [`ServerStats::replies_refused`]).
    pub fn reply_topic(mut self, topic: impl Into<String>) -> Self {
        self.reply_topics.insert(topic.into());
        self
    }

    /// Allows replies to every topic whose name starts with `prefix`. An empty prefix
    /// allows every topic, which turns the reply-topic policy off: any producer to the
    /// request topic can then make this server write to any topic it can write to.
    pub fn reply_topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.reply_prefixes.push(prefix.into());
        self
    }

    /// Where a request goes when the broker refuses both its reply and the small error
    /// reply sent in its place (say the server may not write the caller's reply topic):
    /// the request's key, value and headers, plus Spring's `kafka_dlt-original-topic`,
    /// `-original-partition`, `-original-offset` and `-exception-message` headers, to
    /// the same partition number (modulo the topic's partitions). The request's offset is
    /// committed only once that write is acknowledged. Created at start if missing, with
    /// the request topic's partition count (Spring names such topics `<topic>.DLT`).
    /// Without one such a request is counted (`replies_dropped`), logged and committed,
    /// so that one request cannot block its partition.
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// Largest reply value (plus key) the server sends, in bytes (default 1,000,000,
    /// under Kafka's default 1 MiB record limit); a larger one is answered with
    /// `REPLY_TOO_LARGE` instead. Zero is refused at start ([`ServerError::Config`]).
    pub fn max_reply_bytes(mut self, bytes: usize) -> Self {
        self.reply.max_reply_bytes = bytes;
        self
    }

    /// Sends the panic message to callers in `HANDLER_PANICKED` replies (default off:
    /// panic messages may carry internals; they are always logged).
    pub fn send_panic_details(mut self, send: bool) -> Self {
        self.router.panic_details = send;
        self
    }

    /// Most records per partition handled but not yet acknowledged by the broker
    /// (default 10,000); reading the partition pauses at the bound. Zero is refused at
    /// start ([`ServerError::Config`]).
    pub fn max_unacknowledged(mut self, records: usize) -> Self {
        self.max_unacknowledged = records;
        self
    }

    /// How long a reply partition's produce path waits to fill a batch (default 0).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.reply.batch.linger = linger;
        self
    }

    /// Deduplicates requests by idempotency key through `store`: a request whose key
    /// the store holds gets the stored reply and its handler does not run (see
    /// [`idempotency`] for the key and the stores, `docs/guarantees.md` for the
    /// guarantee). Off by default.
    pub fn idempotency(mut self, store: impl IdempotencyStore) -> Self {
        self.idempotency = Some(Arc::new(store));
        self
    }

    /// Settings that would break serving later, refused before anything starts.
    fn check_settings(&self) -> Result<(), ConfigError> {
        // A zero limit times out every handler that does not finish on its first poll;
        // "no limit" is a long one (`Duration::MAX` works), so zero means no such thing.
        if self.handler_timeout.is_zero() {
            return Err(ConfigError::new("handler_timeout", "zero would time every handler out at once; give a limit (Duration::MAX for none)"));
        }
        if let Some(name) = self.router.timeouts().find_map(|(name, t)| t.is_zero().then_some(name)) {
            return Err(ConfigError::new(
                "HandlerOptions::timeout",
                format!("zero for `{name}` (its options', or its own `Handler::timeout`) would time it out at once; give a limit"),
            ));
        }
        // tokio's interval panics on zero (inside the serving task, unseen), and rounding
        // it up to some period would be a guess at what was meant.
        if self.commit_interval.is_zero() {
            return Err(ConfigError::new("commit_interval", "zero is no period; give how often to commit (e.g. 100 ms, the default)"));
        }
        // No record could be handled: its reply is unacknowledged until produced.
        if self.max_unacknowledged == 0 {
            return Err(ConfigError::new("max_unacknowledged", "no request could be handled (each is unacknowledged until its reply is produced); give at least 1"));
        }
        // No request fits a batch of none; taking it as 1 (or as "no limit", as 0 means
        // elsewhere) would be a guess.
        if self.max_batch == 0 {
            return Err(ConfigError::new("max_batch", "a batch of zero requests cannot be handled; give at least 1 (usize::MAX for no bound)"));
        }
        // Every reply has some bytes (at least the request's key), so zero would answer
        // every request REPLY_TOO_LARGE.
        if self.reply.max_reply_bytes == 0 {
            return Err(ConfigError::new("max_reply_bytes", "zero would answer every request REPLY_TOO_LARGE"));
        }
        // The server consumes its request topic only: a handler for another topic would
        // silently never run.
        if let Some(topic) = self.router.topics().find(|t| *t != self.topic) {
            return Err(ConfigError::new(
                "topic_handler",
                format!("this server consumes `{}` only; a handler for `{}` would never be called", self.topic, excerpt(topic, MAX_ECHO)),
            ));
        }
        Ok(())
    }

    /// Checks the handlers and settings, creates the request topic if missing, joins
    /// the group and starts serving. A setting that cannot work fails with
    /// [`ServerError::Config`] before anything is created. Each call it makes on the
    /// transport (creating topics, joining the group) waits at most the transport's
    /// [start timeout](Transport::start_timeout), else `start` fails with
    /// [`TransportError::TimedOut`].
    pub async fn start(self) -> Result<RpcServer, ServerError> {
        if self.router.is_empty() {
            return Err(ServerError::NoHandlers);
        }
        if let Some(name) = self.router.duplicates().first() {
            return Err(ServerError::DuplicateHandler(name));
        }
        if let Some((request_type, need)) = self.router.state_requirements().find(|(_, r)| !self.state.contains(r.id)) {
            return Err(ServerError::MissingState { request_type, state: need.name });
        }
        self.check_settings()?;
        let transport = self.transport;
        // Every transport call of a start is bounded (`Transport::start_timeout`): a
        // transport without limits of its own would otherwise hang the caller's start-up.
        within_start_timeout(&*transport, || format!("ensure_topic `{}`", self.topic), transport.ensure_topic(&self.topic, self.partitions))
            .await?;
        let dead_letters = match self.dead_letter_topic {
            Some(topic) => {
                let partitions =
                    within_start_timeout(&*transport, || format!("ensure_topic `{topic}`"), transport.ensure_topic(&topic, self.partitions))
                        .await?;
                Some(DeadLetters { topic, partitions })
            }
            None => None,
        };
        let group = self.group.unwrap_or_else(|| format!("{}.server", self.topic));
        let membership = within_start_timeout(
            &*transport,
            || format!("join_group `{group}`"),
            transport.join_group(&group, std::slice::from_ref(&self.topic), self.reset),
        )
        .await?;

        let counters = Arc::new(ServerCounters::new(&self.topic, self.router.names()));
        let mut reply_topics = self.reply_topics;
        reply_topics.insert(format!("{}.replies", self.topic));
        // NestJS's: its client names the reply topic of a pattern (= our topic) so.
        reply_topics.insert(format!("{}.reply", self.topic));
        let policy = ReplyPolicy::new(reply_topics, self.reply_prefixes);
        let shared = Arc::new(Shared {
            replier: Replier::new(transport.clone(), policy, self.reply, counters.clone(), dead_letters),
            transport,
            router: self.router,
            state: Arc::new(self.state),
            counters: counters.clone(),
            settings: WorkerSettings {
                reset: self.reset,
                handler_timeout: self.handler_timeout,
                max_unacknowledged: self.max_unacknowledged,
                max_batch: self.max_batch,
            },
            dedup: self.idempotency.map(Dedup::new),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let settings = LoopSettings { commit_interval: self.commit_interval, shutdown_timeout: self.shutdown_timeout };
        tracing::info!(topic = %self.topic, %group, "server started");
        let owned = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (health_tx, health) = watch::channel(Health::Serving);
        // Shared with the serving loop, which reports a failure as soon as serving ends;
        // every sender is dropped when the task ends, which `health` relies on.
        let health_tx = Arc::new(health_tx);
        let early = health_tx.clone();
        let failed = move |e: &ServerError| {
            let _ = early.send(Health::Failed(e.clone()));
        };
        let serving = group::serve(shared, membership, shutdown_rx, settings, owned.clone(), failed);
        let task = tokio::spawn(async move {
            let outcome = serving.await;
            let _ = health_tx.send(match &outcome {
                Ok(()) => Health::Stopped,
                Err(e) => Health::Failed(e.clone()),
            });
            outcome
        });
        Ok(RpcServer { shutdown, task: std::sync::Mutex::new(Some(task)), counters, owned, health })
    }
}

/// A running server. Dropping it asks it to stop; [`shutdown`](Self::shutdown) also
/// waits until in-flight requests are answered and offsets committed.
pub struct RpcServer {
    shutdown: watch::Sender<bool>,
    task: std::sync::Mutex<Option<JoinHandle<Result<(), ServerError>>>>,
    counters: Arc<ServerCounters>,
    owned: Owned,
    health: watch::Receiver<Health>,
}

impl RpcServer {
    /// Starts configuring a server for `topic` over `transport`.
    pub fn builder(transport: impl Transport, topic: impl Into<String>) -> RpcServerBuilder {
        let mut batch = BatchConfig::new();
        // A refused reply is retried before it is replaced by an error reply.
        batch.attempts = 5;
        RpcServerBuilder {
            transport: Arc::new(transport),
            topic: topic.into(),
            group: None,
            partitions: crate::defaults::PARTITIONS,
            router: Router::default(),
            state: StateMap::default(),
            reset: OffsetReset::Earliest,
            commit_interval: Duration::from_millis(100),
            shutdown_timeout: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(30),
            max_unacknowledged: 10_000,
            max_batch: 500,
            reply_topics: HashSet::new(),
            reply_prefixes: Vec::new(),
            dead_letter_topic: None,
            reply: ReplySettings { batch, max_reply_bytes: 1_000_000, peer: None },
            idempotency: None,
        }
    }

    /// Counters of this server.
    pub fn stats(&self) -> ServerStats {
        self.counters.snapshot()
    }

    /// Whether the server is serving, stopped, or failed (and why). A failure —
    /// the group membership ended without the server leaving it — also ends the
    /// server: [`shutdown`](Self::shutdown) returns the same error.
    pub fn health(&self) -> Health {
        // Whether the task has ended, asked before the state is read: a task that sends
        // its last word and ends between the two reads would otherwise be read as
        // `Serving` and ended, which looks like a panic.
        let ended = self.health.has_changed().is_err();
        let health = self.health.borrow().clone();
        match health {
            // The serving task reports how it ended; one that ended without a word panicked.
            Health::Serving if ended => Health::Failed(ServerError::Panicked(
                "the serving task ended without reporting why".into(),
            )),
            health => health,
        }
    }

    /// The request partitions this instance serves now; changes as group members come
    /// and go.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops taking new records, lets running handlers finish and produces their
    /// replies (both bounded by the shutdown timeout), commits offsets and leaves the
    /// group (each bounded by it too). Returns the error the server stopped with if it
    /// had already failed, [`ServerError::FinalCommit`] if the last commit was refused
    /// or did not answer (the server still leaves its group; what it finished since its
    /// last good commit is delivered again to the partitions' next owner), and
    /// [`ServerError::ShutdownTimedOut`] if handlers or replies were abandoned at the
    /// timeout.
    pub async fn shutdown(&self) -> Result<(), ServerError> {
        let _ = self.shutdown.send(true);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        match task {
            Some(task) => match task.await {
                Ok(outcome) => outcome,
                Err(e) if e.is_panic() => Err(ServerError::Panicked(crate::error::panic_message(e.into_panic().as_ref()))),
                // Cancelled: only a runtime shutting down does that.
                Err(_) => Ok(()),
            },
            // Another call took the serving task: wait until the task ended (its last
            // sender of health is dropped then), so that this one too returns only once
            // running requests were answered and committed.
            None => {
                let mut health = self.health.clone();
                while health.changed().await.is_ok() {}
                match self.health() {
                    Health::Failed(e) => Err(e),
                    _ => Ok(()),
                }
            }
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}
