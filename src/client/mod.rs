//! The requesting side: [`ReplyingClient`] sends typed requests and awaits their replies.
//!
//! Each request is tagged with a fresh correlation id and the client's reply address,
//! keyed by its partition key, and queued on the ordered produce path of its
//! partition. One listener per client reads the client's pinned reply partition and
//! completes the matching pending request.
//!
//! ```
//! use kafka_rpc::prelude::*;
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Echo(String);
//! impl Request for Echo {
//!     const TYPE: &'static str = "echo";
//!     type Response = String;
//!     fn key(&self) -> Option<Vec<u8>> { Some(self.0.key_bytes()) }
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = EmbeddedBroker::new();
//! let server = RpcServer::builder(broker.clone(), "echo")
//!     .handler(|Echo(s): Echo| async move { Ok::<_, RemoteError>(s) })
//!     .start().await?;
//! let client = ReplyingClient::builder(broker, "echo").timeout(Duration::from_secs(2)).start().await?;
//!
//! let reply = client.request(Echo("hi".into())).await?;
//! assert_eq!(reply, "hi");
//! let custom = client.request_with(Echo("x".into()), RequestOptions::new().timeout(Duration::from_millis(500))).await?;
//! assert_eq!(custom, "x");
//! assert_eq!(client.in_flight(), 0);
//! # client.shutdown().await; server.shutdown().await?; Ok(()) }
//! ```

mod builder;
mod call;
mod expiry;
mod in_flight;
mod partition_count;
mod reply_listener;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::codec::ContentType;
use crate::error::RpcError;
use crate::metrics::ClientMetrics;
use crate::partitioner::partition_for_key;
use crate::producer::OrderedProducer;
use crate::request::Request;
use crate::clock::now_ms;
use crate::transport::{Header, Record, Transport};
use crate::wire::ReplyHeaders;

pub use builder::{Backpressure, ReplyPartitions, ReplyingClientBuilder};
use call::Call;
use in_flight::InFlight;
use reply_listener::ReplyCounters;

/// Per-call settings for [`ReplyingClient::request_with`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RequestOptions {
    timeout: Option<Duration>,
    key: Option<Vec<u8>>,
    headers: Vec<Header>,
    idempotency_key: Option<Bytes>,
}

impl RequestOptions {
    /// Options that change nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long to wait for the reply (the client default otherwise). It is also sent
    /// as the request's deadline, so a server does not run a request nobody awaits.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Partition key to use instead of the request's own.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Makes this call one operation however often it is sent: a server with
    /// idempotency on answers every call carrying `key` with the first call's reply and
    /// runs the handler once (within its window; see `server::idempotency`). Sent as
    /// the `kafka_rpc-idempotency-key` header. A request without a partition key is
    /// partitioned by `key`, so that every retry reaches the same partition's window.
    pub fn idempotency_key(mut self, key: impl Into<Bytes>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// An extra header for the request record (tracing ids, tenant, ...). One named
    /// like a header the client writes itself (correlation id, reply address, type,
    /// content type, deadline) is left out: a server reads the last header of a name,
    /// so it would send the reply somewhere this call does not wait.
    pub fn header(mut self, name: impl Into<std::borrow::Cow<'static, str>>, value: impl Into<Bytes>) -> Self {
        self.headers.push(Header { key: name.into(), value: value.into() });
        self
    }
}

struct Inner {
    request_topic: String,
    /// Looked up again every few minutes (`partition_count`).
    request_partitions: Arc<std::sync::atomic::AtomicI32>,
    reply_topic: String,
    reply_partition: i32,
    reply_headers: ReplyHeaders,
    timeout: Duration,
    content_type: ContentType,
    max_in_flight: usize,
    round_robin: AtomicU32,
    in_flight: Arc<InFlight>,
    counters: Arc<ReplyCounters>,
    metrics: Arc<ClientMetrics>,
    producer: OrderedProducer<u128>,
    stop: watch::Sender<bool>,
    /// The reply listeners and the deadline sweeper; all end when the client closes.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping the last handle must not orphan callers (Spring's `stop()` does).
        self.in_flight.close();
        let _ = self.stop.send(true);
    }
}

/// Sends typed requests and awaits their typed replies. Cheap to clone; clones share
/// one reply listener and one pending map.
#[derive(Clone)]
pub struct ReplyingClient {
    inner: Arc<Inner>,
}

/// A snapshot of a client's counters, read through its methods (so a new counter is not
/// a breaking change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientStats {
    in_flight: usize,
    sent_unanswered: usize,
    replies_delivered: u64,
    replies_ignored: u64,
    fetch_errors: u64,
}

impl ClientStats {
    /// Requests waiting for a reply now, sent or still queued for a slot.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Requests sent and not yet answered (at most `max_in_flight`).
    pub fn sent_unanswered(&self) -> usize {
        self.sent_unanswered
    }

    /// Replies handed to their waiting request.
    pub fn replies_delivered(&self) -> u64 {
        self.replies_delivered
    }

    /// Replies ignored: foreign (another client's) or late (after a timeout).
    pub fn replies_ignored(&self) -> u64 {
        self.replies_ignored
    }

    /// Reply fetches that failed (the listener retries).
    pub fn fetch_errors(&self) -> u64 {
        self.fetch_errors
    }
}

impl ReplyingClient {
    /// Starts configuring a client that sends to `request_topic` over `transport`.
    pub fn builder(transport: impl Transport, request_topic: impl Into<String>) -> ReplyingClientBuilder {
        ReplyingClientBuilder::new(Arc::new(transport), request_topic.into())
    }

    /// Sends `request` and waits for its reply, with the client's default options.
    ///
    /// The request is queued on its partition's produce path when this is called, not
    /// when the future is first polled, so requests for one key reach their partition
    /// in call order even when the futures are spawned or polled out of order, and even
    /// while calls wait for an in-flight slot: the wait happens inside that ordered
    /// queue. The timeout counts from the call, queueing included.
    pub fn request<R: Request>(
        &self,
        request: R,
    ) -> impl std::future::Future<Output = Result<R::Response, RpcError>> + Send + 'static {
        self.request_with(request, RequestOptions::default())
    }

    /// Like [`request`](Self::request), with per-call options.
    pub fn request_with<R: Request>(
        &self,
        request: R,
        options: RequestOptions,
    ) -> impl std::future::Future<Output = Result<R::Response, RpcError>> + Send + 'static {
        let outgoing = self.inner.content_type.encode(&request).map(|payload| Outgoing {
            request_type: std::borrow::Cow::Borrowed(R::TYPE),
            key: request.key(),
            payload,
        });
        self.call(outgoing, options)
    }

    /// Sends a request whose type is named at run time rather than by a [`Request`]
    /// impl, as a command-line tool or a gateway does: `body` is encoded with the
    /// client's codec and the reply decoded as `T`. The request has no partition key
    /// unless `options` gives one. With [`ContentType::Json`] and `serde_json::Value`
    /// for `body` and `T`, it calls any server without its Rust types (a server
    /// answers in the codec it was asked in).
    ///
    /// ```
    /// use kafka_rpc::prelude::*;
    /// use serde_json::{json, Value};
    ///
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Add { a: i64, b: i64 }
    /// # impl Request for Add { const TYPE: &'static str = "math.add"; type Response = i64; fn key(&self) -> Option<Vec<u8>> { None } }
    /// let broker = EmbeddedBroker::new();
    /// let server = RpcServer::builder(broker.clone(), "math")
    ///     .handler(|r: Add| async move { Ok::<_, RemoteError>(r.a + r.b) })
    ///     .start().await?;
    /// let client = ReplyingClient::builder(broker, "math").content_type(ContentType::Json).start().await?;
    /// let sum: Value = client.request_named("math.add", &json!({"a": 2, "b": 3}), RequestOptions::new().key("k")).await?;
    /// assert_eq!(sum, json!(5));
    /// # client.shutdown().await; server.shutdown().await?; Ok(()) }
    /// ```
    pub fn request_named<B, T>(
        &self,
        request_type: impl Into<std::borrow::Cow<'static, str>>,
        body: &B,
        options: RequestOptions,
    ) -> impl std::future::Future<Output = Result<T, RpcError>> + Send + 'static
    where
        B: serde::Serialize + ?Sized,
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        let outgoing = self.inner.content_type.encode(body).map(|payload| Outgoing {
            request_type: request_type.into(),
            key: None,
            payload,
        });
        self.call(outgoing, options)
    }

    /// The one send path of typed and named requests.
    fn call<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        outgoing: Result<Outgoing, crate::codec::CodecError>,
        options: RequestOptions,
    ) -> impl std::future::Future<Output = Result<T, RpcError>> + Send + 'static {
        let inner = &self.inner;
        // One clock read for the call's deadline and for its round-trip metric.
        let started = tokio::time::Instant::now();
        let metrics = inner.metrics.call(outgoing.as_ref().map(|o| o.type_label()).unwrap_or(Outgoing::NAMED_LABEL));
        // With `Backpressure::Fail` the map refuses past `max_in_flight` (see `start`).
        let sent = outgoing.map_err(RpcError::from).and_then(|outgoing| send(inner, outgoing, options, started));
        if let Err(RpcError::Busy(_)) = &sent {
            inner.metrics.busy();
        }
        // The future holds no reference to the client, so dropping the last handle
        // closes it and fails this call instead of keeping it alive.
        Call::new(sent, inner.content_type, metrics, started)
    }

    /// Requests waiting for a reply now. Returns to 0 after any mix of replies,
    /// timeouts and cancelled calls.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.len()
    }

    /// Counters of this client.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        ClientStats {
            in_flight: self.inner.in_flight.len(),
            sent_unanswered: self.inner.max_in_flight.saturating_sub(self.inner.in_flight.free_slots()),
            replies_delivered: c.delivered.load(Ordering::Relaxed),
            replies_ignored: c.ignored.load(Ordering::Relaxed),
            fetch_errors: c.fetch_errors.load(Ordering::Relaxed),
        }
    }

    /// The reply topic and partition this client advertises.
    pub fn reply_address(&self) -> (&str, i32) {
        (&self.inner.reply_topic, self.inner.reply_partition)
    }

    /// Fails every pending request with [`RpcError::Closed`], refuses new ones and
    /// stops the reply listener. Requests still waiting for an in-flight slot are
    /// dropped unsent; those already handed to the broker finish sending, so a caller
    /// told `Closed` cannot know whether its request will run.
    ///
    /// Finishing those sends is bounded by the client's default
    /// [timeout](ReplyingClientBuilder::timeout) (at most [`SHUTDOWN_LIMIT`]): a send
    /// still unanswered then (a transport whose produce does not return) is abandoned
    /// and logged. Nothing waits on it any more: its caller was already told `Closed`,
    /// and a request sent that late would reach the server past its deadline.
    pub async fn shutdown(&self) {
        self.inner.in_flight.close();
        let _ = self.inner.stop.send(true);
        let bound = self.inner.timeout.min(SHUTDOWN_LIMIT);
        let abandoned = self.inner.producer.close_within(bound).await;
        if !abandoned.is_empty() {
            tracing::warn!(partitions = ?abandoned, ?bound, "request sends did not finish in time; abandoning them");
        }
        let tasks = std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// The longest [`ReplyingClient::shutdown`] waits for requests already handed to the
/// transport to finish sending, whatever the client's default timeout.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(30);

/// A request encoded and ready to send, whether it came typed or named.
struct Outgoing {
    request_type: std::borrow::Cow<'static, str>,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

impl Outgoing {
    /// The metrics label of requests whose type is named at run time: such names
    /// come from the caller's input, so they must not each become a time series.
    const NAMED_LABEL: &'static str = "named";

    /// The request-type label for metrics: the type's own name when it is compiled in.
    fn type_label(&self) -> &'static str {
        match &self.request_type {
            std::borrow::Cow::Borrowed(name) => name,
            std::borrow::Cow::Owned(_) => Self::NAMED_LABEL,
        }
    }
}

/// Registers and queues a request; returns its pending reply and its span.
fn send(
    inner: &Arc<Inner>,
    request: Outgoing,
    options: RequestOptions,
    started: tokio::time::Instant,
) -> Result<(in_flight::PendingReply, tracing::Span), RpcError> {
    let timeout = options.timeout.unwrap_or(inner.timeout);
    let Outgoing { request_type, key, payload } = request;
    let key = options.key.or(key).or_else(|| options.idempotency_key.as_ref().map(|k| k.to_vec()));
    let partitions = inner.request_partitions.load(Ordering::Relaxed);
    let partition = match &key {
        Some(key) => partition_for_key(key, partitions),
        None => (inner.round_robin.fetch_add(1, Ordering::Relaxed) % partitions.max(1) as u32) as i32,
    };
    let id = uuid::Uuid::new_v4();
    let span = tracing::debug_span!("rpc.request", correlation_id = %id, request_type = &*request_type, partition);
    let pending = inner.in_flight.register(id.as_u128(), started, timeout)?;

    // One clock read for the record's timestamp and its deadline, so the deadline is
    // exactly `timeout` after the timestamp (two reads could straddle a millisecond).
    let sent_ms = now_ms();
    let deadline_ms = crate::clock::ms_after(sent_ms, timeout);
    // A `&'static` type name goes into the header without a copy.
    let request_type = match request_type {
        std::borrow::Cow::Borrowed(name) => Bytes::from_static(name.as_bytes()),
        std::borrow::Cow::Owned(name) => Bytes::from(name),
    };
    let mut headers = inner.reply_headers.request(request_type, id.as_u128(), deadline_ms);
    // Exactly: the headers live in the broker's log until retention drops them, and
    // spare room would be memory held there for nothing.
    headers.reserve_exact(options.headers.len());
    let written = headers.len();
    for header in options.headers {
        if !headers[..written].iter().any(|own| own.key == header.key) {
            headers.push(header);
        }
    }
    crate::trace::inject(&span, &mut headers);
    if let Some(idempotency_key) = options.idempotency_key {
        headers.push(Header { key: crate::server::idempotency::KEY_HEADER.into(), value: idempotency_key });
    }
    let record = Record { key: key.map(Bytes::from), value: inner.reply_headers.value(payload), headers, timestamp_ms: sent_ms };
    inner.producer.send(&inner.request_topic, partition, record, id.as_u128()).map_err(|_| RpcError::Closed)?;
    Ok((pending, span))
}
