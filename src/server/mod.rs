//! The serving side: [`RpcServer`] consumes a request topic as a consumer-group
//! member, dispatches each record by type, and replies to the requester.
//!
//! Records of one partition are handled strictly in order; partitions run
//! concurrently. Offsets are committed only past records whose reply was produced.
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

pub mod handler;
mod partition_worker;
mod router;
mod stats;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::client::DEFAULT_PARTITIONS;
use crate::producer::{BatchConfig, OrderedProducer};
use crate::transport::{GroupEvent, GroupHandle, GroupMembership, OffsetReset, TopicPartition, Transport, TransportError};
use handler::{Handler, StateMap};
use partition_worker::Shared;
use router::Router;
use stats::ServerCounters;
pub use stats::ServerStats;

/// Why a server could not start or stop cleanly.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServerError {
    /// The broker failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
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

/// Configures and starts an [`RpcServer`].
pub struct RpcServerBuilder {
    transport: Arc<dyn Transport>,
    topic: String,
    group: Option<String>,
    partitions: i32,
    router: Router,
    state: StateMap,
    fetch_wait: Duration,
    reset: OffsetReset,
    commit_interval: Duration,
    shutdown_timeout: Duration,
    batch: BatchConfig,
    peer: Option<crate::wire::Peer>,
}

impl RpcServerBuilder {
    /// Registers a handler under its request type (see [`handler`]).
    pub fn handler<A: 'static, H: Handler<A>>(mut self, handler: H) -> Self {
        self.router.add(handler);
        self
    }

    /// Registers a handler that also serves requests on `topic` carrying no
    /// `kafka_rpc-type` header, as NestJS and Spring callers send them (they dispatch by
    /// topic). Without this, such a request goes to the handler whose type name equals
    /// its topic.
    pub fn topic_handler<A: 'static, H: Handler<A>>(mut self, topic: impl Into<String>, handler: H) -> Self {
        self.router.add_for_topic(topic.into(), handler);
        self
    }

    /// Answers every caller in `peer`'s conventions instead of the ones its request
    /// follows (see [`Peer`](crate::wire::Peer); by default each caller is answered in
    /// its own).
    pub fn peer(mut self, peer: crate::wire::Peer) -> Self {
        self.peer = Some(peer);
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

    /// Partitions of the request topic when the server has to create it.
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

    /// Longest a request fetch waits for data (default 100 ms; ~1 ms for brokers that
    /// hold fetches until the wait expires).
    pub fn fetch_wait(mut self, wait: Duration) -> Self {
        self.fetch_wait = wait;
        self
    }

    /// How often finished offsets are committed (default 100 ms); they are also
    /// committed on revocation and shutdown.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// How long shutdown and revocation wait for running handlers (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// How long a reply partition's produce path waits to fill a batch (default 0).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.batch.linger = linger;
        self
    }

    /// Checks the handlers, creates the request topic if missing, joins the group and
    /// starts serving.
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
        let transport = self.transport;
        transport.ensure_topic(&self.topic, self.partitions).await?;
        let group = self.group.unwrap_or_else(|| format!("{}.server", self.topic));
        let membership = transport.join_group(&group, std::slice::from_ref(&self.topic), self.reset).await?;

        let counters = Arc::new(ServerCounters::default());
        let reply_counters = counters.clone();
        let replies = OrderedProducer::new(
            transport.clone(),
            self.batch,
            Arc::new(move |outcome: Result<i64, TransportError>, acks: Vec<oneshot::Sender<bool>>| {
                if outcome.is_err() {
                    // The caller times out; the offset still moves on, since the
                    // request ran and running it again would repeat its effects.
                    reply_counters.reply_failures.fetch_add(acks.len() as u64, Ordering::Relaxed);
                }
                for ack in acks {
                    let _ = ack.send(outcome.is_ok());
                }
            }),
            None,
        );
        let shared = Arc::new(Shared {
            transport,
            router: self.router,
            state: Arc::new(self.state),
            replies,
            counters: counters.clone(),
            fetch_wait: self.fetch_wait,
            reply_partition_counts: DashMap::new(),
            peer: self.peer,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let settings = LoopSettings { commit_interval: self.commit_interval, shutdown_timeout: self.shutdown_timeout };
        tracing::info!(topic = %self.topic, %group, "server started");
        let owned = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = tokio::spawn(serve(shared, membership, shutdown_rx, settings, owned.clone()));
        Ok(RpcServer { shutdown, task: std::sync::Mutex::new(Some(task)), counters, owned })
    }
}

/// A running server. Dropping it asks it to stop; [`shutdown`](Self::shutdown) also
/// waits until in-flight requests are answered and offsets committed.
pub struct RpcServer {
    shutdown: watch::Sender<bool>,
    task: std::sync::Mutex<Option<JoinHandle<Result<(), ServerError>>>>,
    counters: Arc<ServerCounters>,
    owned: Owned,
}

/// The partitions a server instance serves now, kept in order.
type Owned = Arc<std::sync::Mutex<Vec<TopicPartition>>>;

impl RpcServer {
    /// Starts configuring a server for `topic` over `transport`.
    pub fn builder(transport: impl Transport, topic: impl Into<String>) -> RpcServerBuilder {
        RpcServerBuilder {
            transport: Arc::new(transport),
            topic: topic.into(),
            group: None,
            partitions: DEFAULT_PARTITIONS,
            router: Router::default(),
            state: StateMap::default(),
            fetch_wait: Duration::from_millis(100),
            reset: OffsetReset::Earliest,
            commit_interval: Duration::from_millis(100),
            shutdown_timeout: Duration::from_secs(30),
            batch: BatchConfig { linger: Duration::ZERO, max_records: 1000 },
            peer: None,
        }
    }

    /// Counters of this server.
    pub fn stats(&self) -> ServerStats {
        self.counters.snapshot()
    }

    /// The request partitions this instance serves now; changes as group members come
    /// and go.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops taking new records, lets running handlers finish (bounded by the shutdown
    /// timeout), produces their replies, commits offsets and leaves the group.
    pub async fn shutdown(&self) -> Result<(), ServerError> {
        let _ = self.shutdown.send(true);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        match task {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

#[derive(Clone, Copy)]
struct LoopSettings {
    commit_interval: Duration,
    shutdown_timeout: Duration,
}

struct Worker {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    position: Arc<AtomicI64>,
    committed: i64,
}

/// Follows the group's assignment: a worker per owned partition, periodic commits,
/// and an orderly hand-over on revocation and shutdown.
async fn serve(
    shared: Arc<Shared>,
    membership: GroupMembership,
    mut shutdown: watch::Receiver<bool>,
    settings: LoopSettings,
    owned: Owned,
) -> Result<(), ServerError> {
    let publish = |workers: &HashMap<TopicPartition, Worker>| {
        let mut now: Vec<TopicPartition> = workers.keys().cloned().collect();
        now.sort();
        *owned.lock().unwrap_or_else(|p| p.into_inner()) = now;
    };
    let GroupMembership { mut events, handle } = membership;
    let mut workers: HashMap<TopicPartition, Worker> = HashMap::new();
    let mut tick = tokio::time::interval(settings.commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            _ = crate::stop::requested(&mut shutdown) => break,
            event = events.recv() => match event {
                Some(GroupEvent::Assigned(partitions)) => {
                    for assigned in partitions {
                        tracing::info!(tp = %assigned.tp, offset = assigned.offset, "partition assigned");
                        let worker = start_worker(&shared, assigned.tp.clone(), assigned.offset);
                        if let Some(old) = workers.insert(assigned.tp, worker) {
                            old.task.abort();
                        }
                    }
                    publish(&workers);
                }
                Some(GroupEvent::Revoked { partitions, done }) => {
                    let revoked: Vec<(TopicPartition, Worker)> =
                        partitions.iter().filter_map(|tp| workers.remove_entry(tp)).collect();
                    tracing::info!(count = revoked.len(), "partitions revoked");
                    publish(&workers);
                    stop_and_commit(&shared, handle.as_ref(), revoked, settings.shutdown_timeout).await;
                    let _ = done.send(());
                }
                None => {
                    tracing::warn!("group membership ended; stopping");
                    break;
                }
            },
            _ = tick.tick() => commit(&shared, handle.as_ref(), workers.iter_mut()).await,
        }
    }
    stop_and_commit(&shared, handle.as_ref(), workers.drain().collect(), settings.shutdown_timeout).await;
    publish(&workers);
    shared.replies.close().await;
    handle.leave().await?;
    tracing::info!("server stopped");
    Ok(())
}

fn start_worker(shared: &Arc<Shared>, tp: TopicPartition, offset: i64) -> Worker {
    let (stop, stop_rx) = watch::channel(false);
    let position = Arc::new(AtomicI64::new(offset));
    let task = tokio::spawn(partition_worker::run(shared.clone(), tp, offset, position.clone(), stop_rx));
    Worker { stop, task, position, committed: offset }
}

async fn stop_and_commit(
    shared: &Shared,
    handle: &dyn GroupHandle,
    mut workers: Vec<(TopicPartition, Worker)>,
    timeout: Duration,
) {
    for (_, worker) in &workers {
        let _ = worker.stop.send(true);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    for (tp, worker) in &mut workers {
        if tokio::time::timeout_at(deadline, &mut worker.task).await.is_err() {
            // Its in-flight work is abandoned; the uncommitted records are redelivered
            // to the next owner.
            tracing::warn!(%tp, "partition worker did not stop in time; abandoning it");
            worker.task.abort();
        }
    }
    commit(shared, handle, workers.iter_mut().map(|(tp, w)| (&*tp, w))).await;
}

async fn commit<'a>(shared: &Shared, handle: &dyn GroupHandle, workers: impl Iterator<Item = (&'a TopicPartition, &'a mut Worker)>) {
    let mut due = Vec::new();
    let mut committed = Vec::new();
    for (tp, worker) in workers {
        let position = worker.position.load(Ordering::Acquire);
        if position > worker.committed {
            due.push((tp.clone(), position));
            committed.push((worker, position));
        }
    }
    if due.is_empty() {
        return;
    }
    match handle.commit(&due).await {
        Ok(()) => {
            for (worker, position) in committed {
                worker.committed = position;
            }
        }
        Err(e) => {
            shared.counters.commit_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "offset commit failed; retrying on the next tick");
        }
    }
}
