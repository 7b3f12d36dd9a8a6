//! Dispatch: the `kafka_rpc-type` header picks the handler; a request without one (a
//! NestJS or Spring caller, which dispatch by topic) goes to the handler mapped to its
//! topic, or else to the handler whose type name is the topic.
//!
//! The router owns every registered handler behind one object-safe shape
//! (bytes in, bytes or a [`RemoteError`] out), so decoding, panics and timeouts are
//! handled once here rather than in each handler. Text taken from the request (its
//! type name, decoder messages) is repeated in error replies only as a bounded excerpt.

use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use foldhash::HashMap;
use futures::future::{ready, BoxFuture, Either};
use futures::FutureExt;

use super::batch::{Batch, BatchHandler};
use super::handler::{Context, Handler, HandlerOptions};
use crate::__private::{encode_response, StateRequirement};
use crate::codec::ContentType;
use crate::error::{excerpt, ErrorCode, RemoteError, MAX_ECHO};
use crate::lazy_timeout::LazyTimeout;

/// A handler with its request type erased.
trait ErasedHandler: Send + Sync {
    fn call(&self, payload: &[u8], content_type: ContentType, ctx: Context) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>>;
    fn timeout(&self) -> Option<Duration>;
    fn state_requirement(&self) -> Option<StateRequirement>;
}

struct Typed<H, A> {
    handler: H,
    /// The registration's timeout, else the handler's own: resolved once, when added.
    timeout: Option<Duration>,
    _args: PhantomData<fn() -> A>,
}

impl<H, A> ErasedHandler for Typed<H, A>
where
    H: Handler<A>,
    A: 'static,
{
    fn call(&self, payload: &[u8], content_type: ContentType, ctx: Context) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
        let request = match content_type.decode_value::<H::Request>((!payload.is_empty()).then_some(payload)) {
            Ok(request) => request,
            Err(e) => {
                // Decoder messages can quote the payload; repeat only a bounded excerpt.
                let message = excerpt(e.to_string(), MAX_ECHO);
                return futures::future::ready(Err(RemoteError::with_code(ErrorCode::BadRequest, message))).boxed();
            }
        };
        self.handler.call_encoded(request, ctx, content_type)
    }

    fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    fn state_requirement(&self) -> Option<StateRequirement> {
        self.handler.state_requirement()
    }
}

/// A batch handler with its request type erased: decodes each payload (an undecodable
/// one fails alone with `BAD_REQUEST`), calls the handler once for the rest, and
/// encodes each outcome. Returns one outcome per item, in order.
trait ErasedBatch: Send + Sync {
    fn call(&self, items: Vec<(&[u8], ContentType, Context)>) -> BoxFuture<'static, Vec<Result<Vec<u8>, RemoteError>>>;
    fn timeout(&self) -> Option<Duration>;
    fn state_requirement(&self) -> Option<StateRequirement>;
}

impl<H, A> ErasedBatch for Typed<H, A>
where
    H: BatchHandler<A>,
    A: 'static,
{
    fn call(&self, items: Vec<(&[u8], ContentType, Context)>) -> BoxFuture<'static, Vec<Result<Vec<u8>, RemoteError>>> {
        let mut outcomes: Vec<Option<Result<Vec<u8>, RemoteError>>> = Vec::with_capacity(items.len());
        let mut decoded = Vec::with_capacity(items.len());
        let mut content_types = Vec::with_capacity(items.len());
        for (payload, content_type, ctx) in items {
            match content_type.decode_value::<H::Request>((!payload.is_empty()).then_some(payload)) {
                Ok(request) => {
                    outcomes.push(None);
                    content_types.push(content_type);
                    decoded.push((request, ctx));
                }
                Err(e) => outcomes.push(Some(Err(RemoteError::with_code(ErrorCode::BadRequest, excerpt(e.to_string(), MAX_ECHO))))),
            }
        }
        let called = decoded.len();
        let response = (!decoded.is_empty()).then(|| self.handler.call(Batch { items: decoded }));
        async move {
            let mut results: Vec<Result<Vec<u8>, RemoteError>> = match response {
                None => Vec::new(),
                Some(response) => match response.await {
                    Ok(each) if each.len() == called => each
                        .into_iter()
                        .zip(content_types)
                        .map(|(outcome, content_type)| {
                            encode_response::<H::Request>(content_type, outcome)
                        })
                        .collect(),
                    Ok(each) => {
                        let wrong = RemoteError::with_code(
                            ErrorCode::HandlerError,
                            format!("batch handler returned {} outcomes for {called} requests", each.len()),
                        );
                        vec![Err(wrong); called]
                    }
                    Err(all) => vec![Err(all); called],
                },
            }
            .into_iter()
            .rev()
            .collect();
            // Decoding failures keep their place; the handler's outcomes fill the rest in order.
            outcomes.into_iter().map(|o| o.unwrap_or_else(|| results.pop().unwrap_or_else(|| Err(lost_outcome())))).collect()
        }
        .boxed()
    }

    fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    fn state_requirement(&self) -> Option<StateRequirement> {
        self.handler.state_requirement()
    }
}

/// A handler's future whose drop cannot unwind into the partition worker. At the time
/// limit the future is dropped unfinished, and with it whatever the handler held; a value
/// that panics when dropped there (a blocking runtime, say) would otherwise end the
/// worker, leaving the timed-out request unanswered and its partition unserved.
struct DropGuarded<T>(Option<BoxFuture<'static, T>>);

impl<T> Future for DropGuarded<T> {
    type Output = T;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        match self.get_mut().0.as_mut() {
            Some(future) => future.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        }
    }
}

impl<T> Drop for DropGuarded<T> {
    fn drop(&mut self) {
        if let Some(future) = self.0.take() {
            if std::panic::catch_unwind(AssertUnwindSafe(move || drop(future))).is_err() {
                tracing::error!("a handler's future panicked when it was dropped unfinished");
            }
        }
    }
}

/// Only reachable if the bookkeeping above were wrong; an error beats a panic.
fn lost_outcome() -> RemoteError {
    RemoteError::with_code(ErrorCode::HandlerError, "batch outcome missing")
}

/// What a request resolved to ([`Router::route`]): one lookup serves its time limit,
/// its dispatch and its metrics.
pub(crate) struct Route<'a> {
    request_type: Option<&'a str>,
    topic: &'a str,
    /// The dispatch name: the type header, else the topic's mapping, else the topic.
    name: &'a str,
    /// `None` when no single-request handler serves `name`.
    handler: Option<&'a Arc<dyn ErasedHandler>>,
    /// The handler's own limit, if it set one.
    pub(crate) timeout: Option<Duration>,
    /// The registered name, or `unknown`: a metrics label whose values the caller, who
    /// writes the type header, cannot add to.
    pub(crate) label: &'static str,
}

impl Route<'_> {
    /// This route, kept for the next request that names the same type.
    pub(crate) fn keep(&self) -> KeptRoute {
        KeptRoute { handler: self.handler.cloned(), timeout: self.timeout, label: self.label }
    }
}

/// The route of a request type, kept by a partition worker for the next request of
/// that type: handlers are fixed once the server starts, so a type's route never
/// changes, and looking it up again hashed the type's name for every request.
pub(crate) struct KeptRoute {
    handler: Option<Arc<dyn ErasedHandler>>,
    timeout: Option<Duration>,
    label: &'static str,
}

impl KeptRoute {
    /// The route of a request naming `request_type` (the type this was kept for), read
    /// from `topic`: what [`Router::route`] returns for it.
    pub(crate) fn route<'a>(&'a self, request_type: &'a str, topic: &'a str) -> Route<'a> {
        let KeptRoute { handler, timeout, label } = self;
        // A named type is its own dispatch name (`Router::resolve`).
        Route { request_type: Some(request_type), topic, name: request_type, handler: handler.as_ref(), timeout: *timeout, label }
    }
}

/// Longest request type name repeated in an `UNKNOWN_TYPE` reply.
const MAX_TYPE_ECHO: usize = 128;

/// Handlers by dispatch name, and topics mapped to dispatch names.
#[derive(Default, Clone)]
pub(crate) struct Router {
    routes: HashMap<&'static str, Arc<dyn ErasedHandler>>,
    topics: HashMap<String, &'static str>,
    batch_routes: HashMap<&'static str, Arc<dyn ErasedBatch>>,
    duplicates: Vec<&'static str>,
    /// Whether panic messages go to callers (they may carry internals; off by default).
    pub(crate) panic_details: bool,
}

impl Router {
    /// Registers `handler` under `options.name`, else its own request type; returns
    /// the name it serves.
    pub(crate) fn add<A: 'static, H: Handler<A>>(&mut self, handler: H, options: HandlerOptions) -> &'static str {
        let name = options.name.unwrap_or_else(|| handler.request_type());
        let timeout = options.timeout.or_else(|| handler.timeout());
        let erased: Arc<dyn ErasedHandler> = Arc::new(Typed { handler, timeout, _args: PhantomData });
        if self.routes.insert(name, erased).is_some() || self.batch_routes.contains_key(name) {
            self.duplicates.push(name);
        }
        name
    }

    /// Registers `handler` and makes it serve requests on `topic` that name no type.
    pub(crate) fn add_for_topic<A: 'static, H: Handler<A>>(&mut self, topic: String, handler: H, options: HandlerOptions) {
        let name = self.add(handler, options);
        self.topics.insert(topic, name);
    }

    /// The dispatch name of a request: its type header, else the name mapped to its
    /// topic, else the topic itself.
    pub(crate) fn resolve<'a>(&'a self, request_type: Option<&'a str>, topic: &'a str) -> &'a str {
        request_type.or_else(|| self.topics.get(topic).copied()).unwrap_or(topic)
    }

    /// Looks a request up once: the handler that serves `request_type` (or `topic`, when
    /// the request names no type), its time limit and its metrics label.
    pub(crate) fn route<'a>(&'a self, request_type: Option<&'a str>, topic: &'a str) -> Route<'a> {
        let name = self.resolve(request_type, topic);
        let (label, handler, timeout) = match self.routes.get_key_value(name) {
            Some((label, handler)) => (*label, Some(handler), handler.timeout()),
            // A batch handler's type sent to the single path still gets its label and limit.
            None => match self.batch_routes.get_key_value(name) {
                Some((label, batch)) => (*label, None, batch.timeout()),
                None => (crate::metrics::UNKNOWN_TYPE, None, None),
            },
        };
        Route { request_type, topic, name, handler, timeout, label }
    }

    /// Every registered request type name.
    /// The time limits handlers were registered with (their own or their options'),
    /// with their names.
    pub(crate) fn timeouts(&self) -> impl Iterator<Item = (&'static str, Duration)> + '_ {
        let single = self.routes.iter().filter_map(|(name, h)| h.timeout().map(|t| (*name, t)));
        single.chain(self.batch_routes.iter().filter_map(|(name, h)| h.timeout().map(|t| (*name, t))))
    }

    /// The topics given to `topic_handler`.
    pub(crate) fn topics(&self) -> impl Iterator<Item = &str> + '_ {
        self.topics.keys().map(String::as_str)
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.routes.keys().chain(self.batch_routes.keys()).copied()
    }

    /// Registers a batch handler under `options.name`, else its own request type.
    pub(crate) fn add_batch<A: 'static, H: BatchHandler<A>>(&mut self, handler: H, options: HandlerOptions) {
        let name = options.name.unwrap_or_else(|| handler.request_type());
        let timeout = options.timeout.or_else(|| handler.timeout());
        let erased: Arc<dyn ErasedBatch> = Arc::new(Typed { handler, timeout, _args: PhantomData });
        if self.batch_routes.insert(name, erased).is_some() || self.routes.contains_key(name) {
            self.duplicates.push(name);
        }
    }

    /// Whether a request of `request_type` read from `topic` is served by a batch
    /// handler; one without a type header is dispatched by its topic, as on the single path.
    pub(crate) fn is_batch(&self, request_type: Option<&str>, topic: &str) -> bool {
        !self.batch_routes.is_empty() && self.batch_routes.contains_key(self.resolve(request_type, topic))
    }

    /// Names registered more than once (a startup error).
    pub(crate) fn duplicates(&self) -> &[&'static str] {
        &self.duplicates
    }

    /// State types the handlers need, with the handler's name.
    pub(crate) fn state_requirements(&self) -> impl Iterator<Item = (&'static str, StateRequirement)> + '_ {
        let single = self.routes.iter().filter_map(|(name, h)| h.state_requirement().map(|r| (*name, r)));
        single.chain(self.batch_routes.iter().filter_map(|(name, h)| h.state_requirement().map(|r| (*name, r))))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.batch_routes.is_empty()
    }

    /// Runs the batch handler for `request_type` once for `items` (all of that type,
    /// from one partition, in order), for at most `limit`; returns one outcome per
    /// item. A panic or the time limit fails every item of the batch.
    ///
    /// Like [`dispatch`](Self::dispatch), the lookup and the handler call happen here
    /// and the future only waits.
    pub(crate) fn dispatch_batch<'a>(
        &'a self,
        request_type: &'a str,
        items: Vec<(&[u8], ContentType, Context)>,
        limit: Duration,
    ) -> impl Future<Output = Vec<Result<Vec<u8>, RemoteError>>> + Send + 'a {
        let n = items.len();
        let Some(handler) = self.batch_routes.get(request_type) else {
            let unknown = RemoteError::with_code(
                ErrorCode::UnknownType,
                format!("no batch handler for request type `{}`", excerpt(request_type, MAX_TYPE_ECHO)),
            );
            return Either::Left(ready(vec![Err(unknown); n]));
        };
        let cancel = items.first().map(|(_, _, ctx)| ctx.cancellation.clone());
        let future = match std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(items))) {
            Ok(future) => AssertUnwindSafe(DropGuarded(Some(future))).catch_unwind(),
            Err(panic) => return Either::Left(ready(vec![Err(self.panicked(request_type, panic)); n])),
        };
        Either::Right(LazyTimeout::new(future, limit).map(move |outcome| match outcome {
            Ok(Ok(outcomes)) => outcomes,
            Ok(Err(panic)) => vec![Err(self.panicked(request_type, panic)); n],
            Err(_) => {
                if let Some(cancel) = cancel {
                    cancel.cancel();
                }
                let timeout = RemoteError::with_code(
                    ErrorCode::HandlerTimeout,
                    format!("batch handler for `{request_type}` exceeded {limit:?}"),
                );
                vec![Err(timeout); n]
            }
        }))
    }

    /// Runs the handler `route` found, for at most `limit`. Every failure — no such
    /// handler, bad payload, handler error, panic, timeout — comes back as a
    /// [`RemoteError`]; none escapes to the caller's task. At the limit the handler's
    /// future is dropped and its context's cancellation fires, for work it spawned.
    ///
    /// Not an `async fn`: the handler is called here, so the returned future holds only
    /// the handler's future and what the outcome needs, instead of every argument twice
    /// (488 bytes, moved for each request).
    pub(crate) fn dispatch<'a>(
        &'a self,
        route: &Route<'a>,
        payload: &[u8],
        content_type: ContentType,
        ctx: Context,
        limit: Duration,
    ) -> impl Future<Output = Result<Vec<u8>, RemoteError>> + Send + 'a {
        let (name, topic) = (route.name, route.topic);
        let Some(handler) = route.handler else {
            let message = match route.request_type {
                Some(name) => format!("no handler for request type `{}`", excerpt(name, MAX_TYPE_ECHO)),
                None => format!(
                    "no handler for topic `{}` (the request has no `kafka_rpc-type` header)",
                    excerpt(topic, MAX_TYPE_ECHO)
                ),
            };
            return Either::Left(ready(Err(RemoteError::with_code(ErrorCode::UnknownType, message))));
        };
        let cancel = ctx.cancellation.clone();
        // The handler may panic while building its future as well as while running it.
        let future = match std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(payload, content_type, ctx))) {
            Ok(future) => AssertUnwindSafe(DropGuarded(Some(future))).catch_unwind(),
            Err(panic) => return Either::Left(ready(Err(self.panicked(name, panic)))),
        };
        Either::Right(LazyTimeout::new(future, limit).map(move |outcome| match outcome {
            Ok(outcome) => outcome.unwrap_or_else(|panic| Err(self.panicked(name, panic))),
            Err(_) => {
                cancel.cancel();
                Err(RemoteError::with_code(ErrorCode::HandlerTimeout, format!("handler for `{name}` exceeded {limit:?}")))
            }
        }))
    }

    /// The reply to a panic: generic unless the server opted in to sending details.
    /// The details are always logged, bounded.
    fn panicked(&self, name: &str, panic: Box<dyn std::any::Any + Send>) -> RemoteError {
        let detail = excerpt(crate::error::panic_message(panic.as_ref()), MAX_ECHO);
        tracing::error!(request_type = name, panic = %detail, "handler panicked");
        let message = if self.panic_details {
            format!("handler for `{name}` panicked: {detail}")
        } else {
            format!("handler for `{name}` panicked")
        };
        RemoteError::with_code(ErrorCode::HandlerPanicked, message)
    }
}
