//! Handlers: the functions a server runs for each request type.
//!
//! Any `async fn` whose first argument is a [`Request`] type is a handler, optionally
//! followed by the [`Context`] and by shared [`State`]:
//!
//! ```
//! use kafka_rpc::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Ping { n: u32 }
//! impl Request for Ping {
//!     const TYPE: &'static str = "ping";
//!     type Response = u32;
//!     fn key(&self) -> Option<Vec<u8>> { None }
//! }
//!
//! async fn ping(req: Ping) -> Result<u32, RemoteError> { Ok(req.n + 1) }
//! async fn ping_with_context(req: Ping, ctx: Context) -> Result<u32, RemoteError> {
//!     Ok(req.n + ctx.offset() as u32)
//! }
//! async fn ping_with_state(req: Ping, _ctx: Context, State(base): State<u32>) -> Result<u32, RemoteError> {
//!     Ok(req.n + base)
//! }
//! # fn assert_handler<A, H: Handler<A>>(_: H) {}
//! # assert_handler(ping); assert_handler(ping_with_context); assert_handler(ping_with_state);
//! ```
//!
//! The `#[handler]` attribute produces the same trait implementation with extra options
//! (another dispatch name, a timeout); it is sugar, not a second mechanism.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::__private::{encode_response, missing_state, HandlerResult, StateRequirement};
use crate::codec::ContentType;
use crate::error::RemoteError;
use crate::request::Request;
use crate::transport::Record;

/// Everything about the record behind a request that a handler may want to know.
#[derive(Clone)]
pub struct Context {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) record: Arc<Record>,
    pub(crate) correlation_id: Option<Bytes>,
    pub(crate) deadline: Option<SystemTime>,
    pub(crate) state: Arc<StateMap>,
    pub(crate) cancellation: Cancellation,
}

impl Context {
    /// Builds a context by hand, for unit-testing a handler without a broker.
    pub fn for_test(record: Record) -> Self {
        Context {
            topic: Arc::from("test"),
            partition: 0,
            offset: 0,
            record: Arc::new(record),
            correlation_id: None,
            deadline: None,
            state: Arc::new(StateMap::default()),
            cancellation: Cancellation::default(),
        }
    }

    /// Adds shared state to a test context, so a handler taking `State<S>` can be
    /// unit-tested without a server.
    pub fn with_state<S: Clone + Send + Sync + 'static>(mut self, value: S) -> Self {
        let mut state = (*self.state).clone();
        state.insert(value);
        self.state = Arc::new(state);
        self
    }

    /// The request topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition the request was read from.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The request's offset in its partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The partition key the request was sent with.
    pub fn key(&self) -> Option<&[u8]> {
        self.record.key.as_deref()
    }

    /// The value of the last header named `name` (see [`Record::header`](crate::transport::Record::header)).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.record.header(name).map(|v| &v[..])
    }

    /// All headers of the request record.
    pub fn headers(&self) -> &[crate::transport::Header] {
        &self.record.headers
    }

    /// The correlation id, or `None` for an event (a record with no reply address).
    pub fn correlation_id(&self) -> Option<&[u8]> {
        self.correlation_id.as_deref()
    }

    /// The key the server deduplicates this request by: the `kafka_rpc-idempotency-key`
    /// header, else the correlation id (see [`idempotency`](super::idempotency)). Pass
    /// it to an inbox in the handler's own database to make its effect exactly-once.
    pub fn idempotency_key(&self) -> Option<&[u8]> {
        super::idempotency::key_of(&self.record).map(|k| &k[..])
    }

    /// When the caller stops waiting, if it said.
    pub fn deadline(&self) -> Option<SystemTime> {
        self.deadline
    }

    /// Whether a reply is expected (false for events).
    pub fn expects_reply(&self) -> bool {
        self.correlation_id.is_some()
    }

    /// Shared state of type `S` registered on the server.
    pub fn state<S: Clone + Send + Sync + 'static>(&self) -> Option<S> {
        self.state.get::<S>()
    }

    /// Resolves when the server gives up on this request: its time limit passed, or
    /// its partition is being revoked or the server shut down. On revocation and
    /// shutdown the handler is still awaited, so it can race its work against this to
    /// stop early; whatever it then returns is sent as its reply and the record is
    /// committed. At the time limit the handler's own future is dropped, so this
    /// reaches work the handler spawned with a clone of it.
    ///
    /// ```
    /// # use kafka_rpc::prelude::*;
    /// # async fn demo(ctx: Context) {
    /// tokio::select! {
    ///     _ = ctx.cancelled() => { /* stop, release what the work held */ }
    ///     _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => { /* the work */ }
    /// }
    /// # }
    /// ```
    pub async fn cancelled(&self) {
        self.cancellation.cancelled().await
    }

    /// A handle on this request's cancellation, to pass to spawned work.
    pub fn cancellation(&self) -> Cancellation {
        self.cancellation.clone()
    }
}

/// Tells a handler, and whatever it hands this to, that its request was given up.
/// Cheap to clone; every clone sees the same signal.
#[derive(Clone, Default)]
pub struct Cancellation(Arc<CancelState>);

#[derive(Default)]
struct CancelState {
    cancelled: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Cancellation {
    /// Signals every holder. Idempotent.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, std::sync::atomic::Ordering::Release);
        self.0.notify.notify_waiters();
    }

    /// Whether this can serve another request: no other handle exists (its handler
    /// kept none) and it was not fired. Sparing a fresh one per request saves an
    /// allocation on every request.
    pub(crate) fn reusable(&self) -> bool {
        Arc::strong_count(&self.0) == 1 && !self.is_cancelled()
    }

    /// Whether the request was given up.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once the request is given up (at once if it already was).
    pub async fn cancelled(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            // Registered before the flag is read, so a cancel in between is not missed.
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

impl std::fmt::Debug for Cancellation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Cancellation").field(&self.is_cancelled()).finish()
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// Values shared by handlers, one per type; registered with `RpcServerBuilder::state`.
#[derive(Default, Clone)]
pub(crate) struct StateMap {
    values: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl StateMap {
    pub(crate) fn insert<S: Clone + Send + Sync + 'static>(&mut self, value: S) {
        self.values.insert(TypeId::of::<S>(), Arc::new(value));
    }

    pub(crate) fn contains(&self, id: TypeId) -> bool {
        self.values.contains_key(&id)
    }

    fn get<S: Clone + Send + Sync + 'static>(&self) -> Option<S> {
        self.values.get(&TypeId::of::<S>()).and_then(|v| v.downcast_ref::<S>()).cloned()
    }
}

/// Handler argument that receives the server's shared state of type `S`
/// (registered with `RpcServerBuilder::state`).
#[derive(Debug, Clone, Copy, Default)]
pub struct State<S>(pub S);

/// Options given where a handler is registered, with
/// [`handler_with`](super::RpcServerBuilder::handler_with) or
/// [`batch_handler_with`](super::RpcServerBuilder::batch_handler_with). Each one set
/// here takes precedence over the handler's own (`#[handler(type = ..., timeout_ms = ...)]`
/// or the defaults), so one function can be registered with different settings per server.
///
/// ```
/// use kafka_rpc::prelude::*;
/// use kafka_rpc::server::handler::HandlerOptions;
/// use std::time::Duration;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize, Request)]
/// # #[request(type = "radius.reduce", response = u32)]
/// # struct ReduceRadius { by_m: u32 }
///
/// async fn reduce_radius(req: ReduceRadius) -> Result<u32, RemoteError> { Ok(req.by_m) }
///
/// let server = RpcServer::builder(EmbeddedBroker::new(), "radius")
///     // Also answer senders still using the old dispatch name, with a tighter limit.
///     .handler(reduce_radius)
///     .handler_with(reduce_radius, HandlerOptions::new().name("radius.reduce.v0").timeout(Duration::from_millis(250)));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandlerOptions {
    pub(crate) name: Option<&'static str>,
    pub(crate) timeout: Option<Duration>,
}

impl HandlerOptions {
    /// No overrides: the handler's own name and timeout.
    pub fn new() -> Self {
        HandlerOptions::default()
    }

    /// Serve this dispatch name instead of the handler's (its request type's
    /// [`Request::TYPE`], or the attribute's `type = ...`).
    pub fn name(mut self, name: &'static str) -> Self {
        self.name = Some(name);
        self
    }

    /// How long the handler may run before the caller gets `HANDLER_TIMEOUT`, instead
    /// of its own timeout or the server's default. The request's deadline still caps it.
    /// Zero is refused when the server starts
    /// ([`ServerError::Config`](crate::server::ServerError::Config)), as `#[handler(timeout_ms
    /// = 0)]` is refused at compile time.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// Something the server can run for one request type.
///
/// Implemented for `async fn(Req)`, `async fn(Req, Context)` and
/// `async fn(Req, Context, State<S>)` returning `Result<Req::Response, E>` with
/// `E: Into<RemoteError>`. `Args` only keeps those implementations apart.
pub trait Handler<Args>: Send + Sync + 'static {
    /// The request type this handler serves.
    type Request: Request;

    /// Runs the handler.
    fn call(&self, request: Self::Request, ctx: Context) -> BoxFuture<'static, Result<<Self::Request as Request>::Response, RemoteError>>;

    /// The dispatch name; defaults to the request type's [`Request::TYPE`].
    fn request_type(&self) -> &'static str {
        <Self::Request as Request>::TYPE
    }

    /// How long the handler may run before the caller gets `HANDLER_TIMEOUT`; `None`
    /// uses the server's default handler timeout. The request's deadline caps either.
    fn timeout(&self) -> Option<Duration> {
        None
    }

    /// State the handler extracts, checked when the server is built. Implemented by
    /// the blanket impls and `#[handler]`; not meant to be called or overridden.
    #[doc(hidden)]
    fn state_requirement(&self) -> Option<StateRequirement> {
        None
    }

    /// Runs the handler and encodes its response: what the server calls. The blanket
    /// impls and `#[handler]` override it to put the handler's future and the encoding
    /// in one allocation (this default wraps [`call`](Handler::call)'s box in a
    /// second); not meant to be called or overridden.
    #[doc(hidden)]
    fn call_encoded(
        &self,
        request: Self::Request,
        ctx: Context,
        content_type: ContentType,
    ) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
        encoded::<Self::Request, RemoteError>(self.call(request, ctx), content_type)
    }
}

/// `response`, its error converted and its answer encoded with `content_type`, in one
/// boxed future: what every `call_encoded` returns.
fn encoded<R: Request, E: Into<RemoteError>>(
    response: impl Future<Output = Result<R::Response, E>> + Send + 'static,
    content_type: ContentType,
) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
    async move { encode_response::<R>(content_type, response.await.map_err(Into::into)) }.boxed()
}

impl<F, Fut, R, E> Handler<(R,)> for F
where
    F: Fn(R) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R::Response, E>> + Send + 'static,
    R: Request,
    E: Into<RemoteError>,
{
    type Request = R;

    fn call(&self, request: R, _ctx: Context) -> BoxFuture<'static, HandlerResult<R>> {
        self(request).map(|r| r.map_err(Into::into)).boxed()
    }

    fn call_encoded(&self, request: R, _ctx: Context, content_type: ContentType) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
        encoded::<R, E>(self(request), content_type)
    }
}

impl<F, Fut, R, E> Handler<(R, Context)> for F
where
    F: Fn(R, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R::Response, E>> + Send + 'static,
    R: Request,
    E: Into<RemoteError>,
{
    type Request = R;

    fn call(&self, request: R, ctx: Context) -> BoxFuture<'static, HandlerResult<R>> {
        self(request, ctx).map(|r| r.map_err(Into::into)).boxed()
    }

    fn call_encoded(&self, request: R, ctx: Context, content_type: ContentType) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
        encoded::<R, E>(self(request, ctx), content_type)
    }
}

impl<F, Fut, R, E, S> Handler<(R, Context, State<S>)> for F
where
    F: Fn(R, Context, State<S>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R::Response, E>> + Send + 'static,
    R: Request,
    E: Into<RemoteError>,
    S: Clone + Send + Sync + 'static,
{
    type Request = R;

    fn call(&self, request: R, ctx: Context) -> BoxFuture<'static, HandlerResult<R>> {
        match ctx.state::<S>() {
            Some(state) => self(request, ctx, State(state)).map(|r| r.map_err(Into::into)).boxed(),
            // Unreachable through RpcServer, which checks requirements at build time.
            None => futures::future::ready(Err(missing_state::<S>())).boxed(),
        }
    }

    fn call_encoded(&self, request: R, ctx: Context, content_type: ContentType) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
        match ctx.state::<S>() {
            Some(state) => encoded::<R, E>(self(request, ctx, State(state)), content_type),
            None => futures::future::ready(Err(missing_state::<S>())).boxed(),
        }
    }

    fn state_requirement(&self) -> Option<StateRequirement> {
        Some(StateRequirement::of::<S>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Add(u32);
    impl Request for Add {
        const TYPE: &'static str = "add";
        type Response = u32;
        fn key(&self) -> Option<Vec<u8>> {
            None
        }
    }

    async fn add(req: Add, _ctx: Context, State(base): State<u32>) -> Result<u32, RemoteError> {
        Ok(base + req.0)
    }

    #[tokio::test]
    async fn stateful_handlers_can_be_tested_without_a_server() {
        let ctx = Context::for_test(Record::default()).with_state(40u32).with_state("other");
        assert_eq!(Handler::call(&add, Add(2), ctx).await.unwrap(), 42);
        let err = Handler::call(&add, Add(2), Context::for_test(Record::default())).await.unwrap_err();
        assert!(err.message.contains("u32"), "{err}");
    }

    /// A response serde refuses to encode.
    #[derive(Debug, serde::Deserialize)]
    struct Unencodable;
    impl serde::Serialize for Unencodable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("refused"))
        }
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Refused;
    impl Request for Refused {
        const TYPE: &'static str = "refused";
        type Response = Unencodable;
        fn key(&self) -> Option<Vec<u8>> {
            None
        }
    }

    /// Implements only `call`, as an application's own handler type would.
    struct ByHand;
    impl Handler<()> for ByHand {
        type Request = Add;
        fn call(&self, request: Add, _ctx: Context) -> BoxFuture<'static, HandlerResult<Add>> {
            futures::future::ready(Ok(request.0 * 2)).boxed()
        }
    }

    #[tokio::test]
    async fn every_handler_form_encodes_its_response_or_reports_why_not() {
        let json = ContentType::Json;
        let ctx = || Context::for_test(Record::default()).with_state(40u32);
        async fn plain(req: Add) -> Result<u32, RemoteError> {
            Ok(req.0)
        }
        async fn with_context(req: Add, ctx: Context) -> Result<u32, RemoteError> {
            Ok(req.0 + ctx.partition() as u32)
        }
        assert_eq!(plain.call_encoded(Add(1), ctx(), json).await.unwrap(), b"1");
        assert_eq!(with_context.call_encoded(Add(2), ctx(), json).await.unwrap(), b"2");
        assert_eq!(add.call_encoded(Add(3), ctx(), json).await.unwrap(), b"43");
        assert_eq!(ByHand.call_encoded(Add(4), ctx(), json).await.unwrap(), b"8", "the default wraps `call`");
        let missing = add.call_encoded(Add(3), Context::for_test(Record::default()), json).await.unwrap_err();
        assert!(missing.message.contains("u32"), "{missing}");

        async fn refuse(_: Refused) -> Result<Unencodable, RemoteError> {
            Ok(Unencodable)
        }
        let err = refuse.call_encoded(Refused, ctx(), json).await.unwrap_err();
        assert_eq!(err.code, crate::error::ErrorCode::HandlerError);
        assert!(err.message.starts_with("response: ") && err.message.contains("refused"), "{err}");
    }

    #[test]
    fn a_cancellation_is_reused_only_when_unshared_and_unfired() {
        let cancellation = Cancellation::default();
        assert!(cancellation.reusable());
        let kept = cancellation.clone();
        assert!(!cancellation.reusable(), "a handler still holds it: its cancel must not reach the next request");
        drop(kept);
        assert!(cancellation.reusable());
        cancellation.cancel();
        assert!(!cancellation.reusable(), "a fired one would cancel the next request at once");
    }

    #[tokio::test]
    async fn cancellation_reaches_every_clone() {
        let ctx = Context::for_test(Record::default());
        let spawned = ctx.cancellation();
        let waiter = tokio::spawn(async move { spawned.cancelled().await });
        tokio::task::yield_now().await;
        assert!(!ctx.cancellation().is_cancelled());
        ctx.cancellation.cancel();
        waiter.await.unwrap();
        ctx.cancelled().await;
    }
}
