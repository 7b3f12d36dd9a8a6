//! Metrics of clients and servers, recorded through the [`metrics`] facade.
//!
//! kafka-rpc records; the application decides where the numbers go by installing a
//! recorder (for example `metrics-exporter-prometheus`). Without one, recording costs
//! a call into the facade's no-op recorder. Every metric carries the request `topic`
//! as a label; names follow Prometheus conventions (`_total` counters, `_seconds`
//! histograms) and are listed with their labels in `docs/observability.md`. Labels
//! stay low-cardinality: a server labels by the request type only when a handler is
//! registered for it (`unknown` otherwise), since the type header comes from the
//! caller.
//!
//! ```
//! use kafka_rpc::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Ping;
//! impl Request for Ping {
//!     const TYPE: &'static str = "ping";
//!     type Response = ();
//!     fn key(&self) -> Option<Vec<u8>> { None }
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Install a recorder first (here: none), then describe the metrics to it once.
//! kafka_rpc::metrics::describe();
//! let broker = EmbeddedBroker::new();
//! let server = RpcServer::builder(broker.clone(), "pings").handler(|_: Ping| async { Ok::<_, RemoteError>(()) }).start().await?;
//! let client = ReplyingClient::builder(broker, "pings").start().await?;
//! client.request(Ping).await?; // kafka_rpc_client_requests_sent_total{topic="pings",type="ping"} += 1, ...
//! # client.shutdown().await; server.shutdown().await?; Ok(()) }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use foldhash::HashMap;
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, SharedString, Unit};

use crate::error::{RemoteError, RpcError};
use crate::transport::{TopicPartition, Transport};

/// Requests a client queued for sending (counter; `topic`, `type`).
pub const CLIENT_REQUESTS_SENT: &str = "kafka_rpc_client_requests_sent_total";
/// Replies handed to their waiting request (counter; `topic`).
pub const CLIENT_REPLIES_DELIVERED: &str = "kafka_rpc_client_replies_delivered_total";
/// Replies no request here waited for: another client's, or late (counter; `topic`).
pub const CLIENT_REPLIES_IGNORED: &str = "kafka_rpc_client_replies_ignored_total";
/// Requests whose reply did not come in time (counter; `topic`, `type`).
pub const CLIENT_TIMEOUTS: &str = "kafka_rpc_client_timeouts_total";
/// Requests refused at once because the client was at its bound (counter; `topic`).
pub const CLIENT_BUSY: &str = "kafka_rpc_client_busy_rejections_total";
/// Requests waiting for their reply, sent or queued (gauge; `topic`).
pub const CLIENT_IN_FLIGHT: &str = "kafka_rpc_client_in_flight_requests";
/// From the call to its reply, successful or an error reply (histogram; `topic`, `type`).
pub const CLIENT_ROUND_TRIP: &str = "kafka_rpc_client_round_trip_seconds";

/// Records dispatched to a handler, whatever the outcome (counter; `topic`, `type`).
pub const SERVER_HANDLED: &str = "kafka_rpc_server_records_handled_total";
/// Records answered with an error (counter; `topic`, `type`, `code`).
pub const SERVER_FAILED: &str = "kafka_rpc_server_records_failed_total";
/// Requests skipped because their deadline had passed (counter; `topic`).
pub const SERVER_EXPIRED: &str = "kafka_rpc_server_records_expired_total";
/// Records skipped unrun: malformed headers, or a reply address the policy refused
/// (counter; `topic`, `reason` = `unroutable` | `reply_refused`).
pub const SERVER_SKIPPED: &str = "kafka_rpc_server_records_skipped_total";
/// Records handled that expected no reply (counter; `topic`).
pub const SERVER_EVENTS: &str = "kafka_rpc_server_events_total";
/// Requests answered from the idempotency store without running (counter; `topic`).
pub const SERVER_DUPLICATES: &str = "kafka_rpc_server_duplicates_total";
/// Handler (or batch-handler call) duration (histogram; `topic`, `type`).
pub const SERVER_HANDLER_DURATION: &str = "kafka_rpc_server_handler_seconds";
/// Records between a partition's committable position and its high watermark (gauge;
/// `topic`, `partition`).
pub const SERVER_PARTITION_LAG: &str = "kafka_rpc_server_partition_lag";
/// Request partitions this instance serves (gauge; `topic`).
pub const SERVER_ASSIGNED: &str = "kafka_rpc_server_assigned_partitions";
/// Replies that could not be sent as the handler gave them (counter; `topic`, `reason` =
/// `too_large` | `replaced` (refused, `REPLY_FAILED` sent) | `dead_lettered` (even the
/// error reply refused; the request went to the dead-letter topic) | `dropped` (even the
/// error reply refused, no dead-letter topic took it) | `unreachable` (nothing produced;
/// the record is read again)).
pub const SERVER_REPLIES_FAILED: &str = "kafka_rpc_server_replies_failed_total";
/// Offset commits that failed (counter; `topic`).
pub const SERVER_COMMIT_FAILURES: &str = "kafka_rpc_server_commit_failures_total";
/// Idempotency store lookups or records that failed (counter; `topic`).
pub const SERVER_IDEMPOTENCY_FAILURES: &str = "kafka_rpc_server_idempotency_failures_total";
/// Records the Kafka transport skipped because their batch could not be decoded
/// (corrupt, an old message format, a decompression bomb) (counter; `topic`).
pub const TRANSPORT_UNREADABLE: &str = "kafka_rpc_transport_unreadable_records_total";

/// Tells the installed recorder the unit and meaning of every kafka-rpc metric (an
/// exporter shows them, as Prometheus `# HELP` lines). Call it once after installing
/// the recorder; recording works without it.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(CLIENT_REQUESTS_SENT, Unit::Count, "Requests a client queued for sending.");
    describe_counter!(CLIENT_REPLIES_DELIVERED, Unit::Count, "Replies handed to their waiting request.");
    describe_counter!(CLIENT_REPLIES_IGNORED, Unit::Count, "Replies nobody here waited for (another client's, or late).");
    describe_counter!(CLIENT_TIMEOUTS, Unit::Count, "Requests whose reply did not come in time.");
    describe_counter!(CLIENT_BUSY, Unit::Count, "Requests refused at once: the client was at its in-flight bound.");
    describe_gauge!(CLIENT_IN_FLIGHT, Unit::Count, "Requests waiting for their reply, sent or queued.");
    describe_histogram!(CLIENT_ROUND_TRIP, Unit::Seconds, "From the call to its reply (including error replies).");
    describe_counter!(SERVER_HANDLED, Unit::Count, "Records dispatched to a handler, whatever the outcome.");
    describe_counter!(SERVER_FAILED, Unit::Count, "Records answered with an error, by error code.");
    describe_counter!(SERVER_EXPIRED, Unit::Count, "Requests skipped because their deadline had passed.");
    describe_counter!(SERVER_SKIPPED, Unit::Count, "Records skipped unrun (malformed headers, refused reply address).");
    describe_counter!(SERVER_EVENTS, Unit::Count, "Records handled that expected no reply.");
    describe_counter!(SERVER_DUPLICATES, Unit::Count, "Requests answered from the idempotency store without running.");
    describe_histogram!(SERVER_HANDLER_DURATION, Unit::Seconds, "Handler (or batch-handler call) duration.");
    describe_gauge!(SERVER_PARTITION_LAG, Unit::Count, "Records between the committable position and the high watermark.");
    describe_gauge!(SERVER_ASSIGNED, Unit::Count, "Request partitions this instance serves.");
    describe_counter!(SERVER_REPLIES_FAILED, Unit::Count, "Replies not sent as the handler gave them, by reason.");
    describe_counter!(SERVER_COMMIT_FAILURES, Unit::Count, "Offset commits that failed (retried).");
    describe_counter!(SERVER_IDEMPOTENCY_FAILURES, Unit::Count, "Idempotency store lookups or records that failed.");
    describe_counter!(TRANSPORT_UNREADABLE, Unit::Count, "Records skipped unread: their batch could not be decoded.");
}

/// Where kafka-rpc's metrics come from, for recorders that filter by target.
const METADATA: Metadata<'static> = Metadata::new("kafka_rpc", Level::INFO, Some(module_path!()));

// Handles are registered once, when a client or server is built (or a client first
// sends a type), and kept: recording is then an atomic update, not a registry lookup.
// This is why the recorder must be installed before clients and servers are built.

fn counter(name: &'static str, topic: &SharedString, extra: &[(&'static str, &'static str)]) -> Counter {
    let key = key(name, topic, extra);
    metrics::with_recorder(|r| r.register_counter(&key, &METADATA))
}

fn gauge(name: &'static str, topic: &SharedString, extra: &[(&'static str, &'static str)]) -> Gauge {
    let key = key(name, topic, extra);
    metrics::with_recorder(|r| r.register_gauge(&key, &METADATA))
}

fn histogram(name: &'static str, topic: &SharedString, extra: &[(&'static str, &'static str)]) -> Histogram {
    let key = key(name, topic, extra);
    metrics::with_recorder(|r| r.register_histogram(&key, &METADATA))
}

/// A key labelled by topic and `extra`.
fn key(name: &'static str, topic: &SharedString, extra: &[(&'static str, &'static str)]) -> Key {
    let mut labels = Vec::with_capacity(1 + extra.len());
    labels.push(Label::new("topic", topic.clone()));
    labels.extend(extra.iter().map(|&(k, v)| Label::from_static_parts(k, v)));
    Key::from_parts(name, labels)
}

fn topic_label(topic: &str) -> SharedString {
    SharedString::from(Arc::<str>::from(topic))
}

/// The metrics of one request type on a client.
struct ClientTyped {
    sent: Counter,
    timeouts: Counter,
    round_trip: Histogram,
}

/// The metrics of one call, by its request type.
pub(crate) struct CallMetrics(Arc<ClientTyped>);

impl CallMetrics {
    /// The request was queued for sending.
    pub(crate) fn sent(&self) {
        self.0.sent.increment(1);
    }

    /// The call ended: its round trip if a reply came, or a timeout. Other failures
    /// are not the server's answer and are not timed (`busy` counts refusals).
    pub(crate) fn finished<T>(&self, elapsed: Duration, outcome: &Result<T, RpcError>) {
        match outcome {
            Ok(_) | Err(RpcError::Remote(_)) => self.0.round_trip.record(elapsed.as_secs_f64()),
            Err(RpcError::Timeout(_)) => self.0.timeouts.increment(1),
            Err(_) => {}
        }
    }
}

/// The metrics of one client.
pub(crate) struct ClientMetrics {
    topic: SharedString,
    delivered: Counter,
    ignored: Counter,
    busy: Counter,
    in_flight: Gauge,
    /// Per request type, registered on the type's first call.
    typed: DashMap<&'static str, Arc<ClientTyped>, foldhash::fast::RandomState>,
    /// The first type's entry of `typed`, found by the address of its name: most
    /// clients send one type, and looking it up hashed the name on every call.
    first: OnceLock<(&'static str, Arc<ClientTyped>)>,
}

impl ClientMetrics {
    pub(crate) fn new(request_topic: &str) -> Self {
        let topic = topic_label(request_topic);
        ClientMetrics {
            delivered: counter(CLIENT_REPLIES_DELIVERED, &topic, &[]),
            ignored: counter(CLIENT_REPLIES_IGNORED, &topic, &[]),
            busy: counter(CLIENT_BUSY, &topic, &[]),
            in_flight: gauge(CLIENT_IN_FLIGHT, &topic, &[]),
            typed: DashMap::default(),
            first: OnceLock::new(),
            topic,
        }
    }

    /// The metrics of one call of `request_type`, looked up once for the whole call
    /// (registered on the type's first call).
    pub(crate) fn call(&self, request_type: &'static str) -> CallMetrics {
        // The same address and length is the same name; the same name at another
        // address (a copy of the literal) only misses this and finds the same entry below.
        if let Some((name, typed)) = self.first.get() {
            if std::ptr::eq(*name, request_type) {
                return CallMetrics(typed.clone());
            }
        }
        let typed = match self.typed.get(request_type) {
            Some(typed) => typed.clone(),
            None => {
                let labels = [("type", request_type)];
                let typed = ClientTyped {
                    sent: counter(CLIENT_REQUESTS_SENT, &self.topic, &labels),
                    timeouts: counter(CLIENT_TIMEOUTS, &self.topic, &labels),
                    round_trip: histogram(CLIENT_ROUND_TRIP, &self.topic, &labels),
                };
                self.typed.entry(request_type).or_insert_with(|| Arc::new(typed)).clone()
            }
        };
        if self.first.get().is_none() {
            let _ = self.first.set((request_type, typed.clone()));
        }
        CallMetrics(typed)
    }

    /// A call was refused at once: the client was at its bound.
    pub(crate) fn busy(&self) {
        self.busy.increment(1);
    }

    /// A reply was read: handed to its request, or ignored.
    pub(crate) fn reply(&self, delivered: bool) {
        if delivered { &self.delivered } else { &self.ignored }.increment(1);
    }

    /// The pending map grew (`+1`) or shrank (`-1`).
    pub(crate) fn in_flight(&self, delta: f64) {
        self.in_flight.increment(delta);
    }
}

/// A server counter: the number [`ServerStats`](crate::server::ServerStats) reads and
/// its metric, incremented together so they cannot disagree. Its `fetch_add` mirrors
/// `AtomicU64`'s, which is what the counting sites call.
pub(crate) struct Count {
    value: AtomicU64,
    metric: Counter,
}

impl std::fmt::Debug for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

impl Count {
    pub(crate) fn new(name: &'static str, topic: &SharedString, extra: &[(&'static str, &'static str)]) -> Self {
        Count { value: AtomicU64::new(0), metric: counter(name, topic, extra) }
    }

    /// Adds `n` to the count and its metric; returns the previous count.
    pub(crate) fn fetch_add(&self, n: u64, order: Ordering) -> u64 {
        self.metric.increment(n);
        self.value.fetch_add(n, order)
    }

    pub(crate) fn load(&self, order: Ordering) -> u64 {
        self.value.load(order)
    }
}

/// The metrics of one handler on a server.
#[derive(Clone)]
struct ServerTyped {
    handled: Counter,
    duration: Histogram,
}

/// The metrics of one request type on a server, looked up once
/// ([`ServerMetrics::type_metrics`]) and kept by a partition worker with the type's
/// route: the lookup hashed the type's name for every request.
#[derive(Clone)]
pub(crate) struct TypeMetrics {
    name: &'static str,
    typed: Option<ServerTyped>,
}

/// The metrics of one server that are not plain counts (see [`Count`]).
pub(crate) struct ServerMetrics {
    topic: SharedString,
    assigned: Gauge,
    /// Per registered handler name, and `unknown`: fixed when the server is built.
    typed: HashMap<&'static str, ServerTyped>,
}

impl std::fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerMetrics").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl ServerMetrics {
    /// The metrics of a server of `topic` whose handlers serve `types`.
    pub(crate) fn new(topic: &str, types: impl IntoIterator<Item = &'static str>) -> Self {
        let topic = topic_label(topic);
        let typed = types
            .into_iter()
            .chain([UNKNOWN_TYPE])
            .map(|name| {
                let labels = [("type", name)];
                let typed = ServerTyped {
                    handled: counter(SERVER_HANDLED, &topic, &labels),
                    duration: histogram(SERVER_HANDLER_DURATION, &topic, &labels),
                };
                (name, typed)
            })
            .collect();
        ServerMetrics { assigned: gauge(SERVER_ASSIGNED, &topic, &[]), typed, topic }
    }

    /// The label every metric of this server carries.
    pub(crate) fn topic(&self) -> &SharedString {
        &self.topic
    }

    /// A handler ran for `request_type` (a registered name, or `unknown`) and gave
    /// `outcome`; `elapsed` is `Some` once per handler call (a batch's requests share one).
    pub(crate) fn handled(&self, request_type: &'static str, elapsed: Option<Duration>, outcome: &Result<Vec<u8>, RemoteError>) {
        let (request_type, typed) = self.typed_for(request_type);
        self.count_handled(request_type, typed, elapsed, outcome);
    }

    /// The metrics of `request_type`, looked up once for a caller that keeps them
    /// ([`handled_as`](Self::handled_as)).
    pub(crate) fn type_metrics(&self, request_type: &'static str) -> TypeMetrics {
        let (name, typed) = self.typed_for(request_type);
        TypeMetrics { name, typed: typed.cloned() }
    }

    /// [`handled`](Self::handled) with the type's metrics already looked up.
    pub(crate) fn handled_as(&self, kept: &TypeMetrics, elapsed: Option<Duration>, outcome: &Result<Vec<u8>, RemoteError>) {
        self.count_handled(kept.name, kept.typed.as_ref(), elapsed, outcome);
    }

    /// The registered name and metrics of `request_type`; a name not registered here
    /// counts as `unknown`. One lookup.
    fn typed_for(&self, request_type: &'static str) -> (&'static str, Option<&ServerTyped>) {
        match self.typed.get_key_value(request_type) {
            Some((name, typed)) => (*name, Some(typed)),
            None => (UNKNOWN_TYPE, self.typed.get(UNKNOWN_TYPE)),
        }
    }

    fn count_handled(&self, request_type: &'static str, typed: Option<&ServerTyped>, elapsed: Option<Duration>, outcome: &Result<Vec<u8>, RemoteError>) {
        if let Some(typed) = typed {
            typed.handled.increment(1);
            if let Some(elapsed) = elapsed {
                typed.duration.record(elapsed.as_secs_f64());
            }
        }
        if let Err(e) = outcome {
            self.failed_as(request_type, e);
        }
    }

    /// A record of `request_type` was answered with `error`, whether its handler ran
    /// ([`handled`](Self::handled)) or the server refused it before dispatch.
    pub(crate) fn failed(&self, request_type: &'static str, error: &RemoteError) {
        self.failed_as(self.typed.get_key_value(request_type).map_or(UNKNOWN_TYPE, |(name, _)| *name), error);
    }

    /// [`failed`](Self::failed) for a name already resolved to a registered one or `unknown`.
    fn failed_as(&self, request_type: &'static str, error: &RemoteError) {
        // Built-in codes and the application's own: a caller cannot add values.
        // Failures are rarer than successes: this handle is looked up each time.
        let code = error.code.as_str().to_owned();
        let labels =
            vec![Label::new("topic", self.topic.clone()), Label::from_static_parts("type", request_type), Label::new("code", code)];
        metrics::with_recorder(|r| r.register_counter(&Key::from_parts(SERVER_FAILED, labels), &METADATA)).increment(1);
    }

    /// The instance now serves `partitions` request partitions.
    pub(crate) fn assigned(&self, partitions: usize) {
        self.assigned.set(partitions as f64);
    }

    /// Sets the lag of each `(partition, position)` served here: its high watermark
    /// (one broker request per partition, made concurrently) minus the position.
    /// A partition whose high watermark cannot be read keeps its last value.
    pub(crate) async fn sample_lag(&self, transport: &dyn Transport, positions: Vec<(TopicPartition, i64)>) {
        let reads = positions.iter().map(|(tp, _)| transport.latest_offset(&tp.topic, tp.partition));
        let latest = futures::future::join_all(reads).await;
        for ((tp, position), latest) in positions.iter().zip(latest) {
            if let Ok(latest) = latest {
                self.lag_gauge(tp.partition).set(latest.saturating_sub(*position).max(0) as f64);
            }
        }
    }

    /// `partition` is no longer served here: its lag is its new owner's to report, so
    /// this instance's series drops to 0.
    pub(crate) fn forget(&self, partition: i32) {
        self.lag_gauge(partition).set(0.0);
    }

    fn lag_gauge(&self, partition: i32) -> Gauge {
        let labels = vec![Label::new("topic", self.topic.clone()), Label::new("partition", partition.to_string())];
        metrics::with_recorder(|r| r.register_gauge(&Key::from_parts(SERVER_PARTITION_LAG, labels), &METADATA))
    }
}

/// The `type` label of records no registered handler serves.
pub(crate) const UNKNOWN_TYPE: &str = "unknown";
