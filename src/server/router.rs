//! Dispatch: the `kafka_rpc-type` header picks the handler; a request without one (a
//! NestJS or Spring caller, which dispatch by topic) goes to the handler mapped to its
//! topic, or else to the handler whose type name is the topic.
//!
//! The router owns every registered handler behind one object-safe shape
//! (bytes in, bytes or a [`RemoteError`] out), so decoding, panics and timeouts are
//! handled once here rather than in each handler.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::handler::{Context, Handler, StateRequirement};
use crate::codec::ContentType;
use crate::error::{ErrorCode, RemoteError};

/// A handler with its request type erased.
trait ErasedHandler: Send + Sync {
    fn call(&self, payload: &[u8], content_type: ContentType, ctx: Context) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>>;
    fn timeout(&self) -> Option<Duration>;
    fn state_requirement(&self) -> Option<StateRequirement>;
}

struct Typed<H, A> {
    handler: H,
    _args: PhantomData<fn() -> A>,
}

impl<H, A> ErasedHandler for Typed<H, A>
where
    H: Handler<A>,
    A: 'static,
{
    fn call(&self, payload: &[u8], content_type: ContentType, ctx: Context) -> BoxFuture<'static, Result<Vec<u8>, RemoteError>> {
        let request = match content_type.decode::<H::Request>(payload) {
            Ok(request) => request,
            Err(e) => return futures::future::ready(Err(RemoteError::with_code(ErrorCode::BadRequest, e.to_string()))).boxed(),
        };
        let response = self.handler.call(request, ctx);
        async move {
            let response = response.await?;
            content_type
                .encode(&response)
                .map_err(|e| RemoteError::with_code(ErrorCode::HandlerError, format!("response: {e}")))
        }
        .boxed()
    }

    fn timeout(&self) -> Option<Duration> {
        self.handler.timeout()
    }

    fn state_requirement(&self) -> Option<StateRequirement> {
        self.handler.state_requirement()
    }
}

/// Handlers by dispatch name, and topics mapped to dispatch names.
#[derive(Default, Clone)]
pub(crate) struct Router {
    routes: HashMap<&'static str, Arc<dyn ErasedHandler>>,
    topics: HashMap<String, &'static str>,
    duplicates: Vec<&'static str>,
}

impl Router {
    pub(crate) fn add<A: 'static, H: Handler<A>>(&mut self, handler: H) {
        let name = handler.request_type();
        let erased: Arc<dyn ErasedHandler> = Arc::new(Typed { handler, _args: PhantomData });
        if self.routes.insert(name, erased).is_some() {
            self.duplicates.push(name);
        }
    }

    /// Registers `handler` and makes it serve requests on `topic` that name no type.
    pub(crate) fn add_for_topic<A: 'static, H: Handler<A>>(&mut self, topic: String, handler: H) {
        self.topics.insert(topic, handler.request_type());
        self.add(handler);
    }

    /// The dispatch name of a request: its type header, else the name mapped to its
    /// topic, else the topic itself.
    fn resolve<'a>(&'a self, request_type: Option<&'a str>, topic: &'a str) -> &'a str {
        request_type.or_else(|| self.topics.get(topic).copied()).unwrap_or(topic)
    }

    /// Names registered more than once (a startup error).
    pub(crate) fn duplicates(&self) -> &[&'static str] {
        &self.duplicates
    }

    /// State types the handlers need, with the handler's name.
    pub(crate) fn state_requirements(&self) -> impl Iterator<Item = (&'static str, StateRequirement)> + '_ {
        self.routes.iter().filter_map(|(name, h)| h.state_requirement().map(|r| (*name, r)))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Runs the handler for `request_type`, or for `topic` when the request names no
    /// type. Every failure — no such handler, bad payload, handler error, panic,
    /// timeout — comes back as a [`RemoteError`]; none escapes to the caller's task.
    pub(crate) async fn dispatch(
        &self,
        request_type: Option<&str>,
        topic: &str,
        payload: &[u8],
        content_type: ContentType,
        ctx: Context,
    ) -> Result<Vec<u8>, RemoteError> {
        let name = self.resolve(request_type, topic);
        let Some(handler) = self.routes.get(name) else {
            let message = match request_type {
                Some(name) => format!("no handler for request type `{name}`"),
                None => format!("no handler for topic `{topic}` (the request has no `kafka_rpc-type` header)"),
            };
            return Err(RemoteError::with_code(ErrorCode::UnknownType, message));
        };
        // The handler may panic while building its future as well as while running it.
        let future = match std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(payload, content_type, ctx))) {
            Ok(future) => AssertUnwindSafe(future).catch_unwind(),
            Err(panic) => return Err(panicked(name, panic)),
        };
        let outcome = match handler.timeout() {
            Some(limit) => match tokio::time::timeout(limit, future).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    return Err(RemoteError::with_code(
                        ErrorCode::HandlerTimeout,
                        format!("handler for `{name}` exceeded {limit:?}"),
                    ))
                }
            },
            None => future.await,
        };
        outcome.unwrap_or_else(|panic| Err(panicked(name, panic)))
    }
}

fn panicked(name: &str, panic: Box<dyn std::any::Any + Send>) -> RemoteError {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into());
    tracing::error!(request_type = name, panic = %detail, "handler panicked");
    RemoteError::with_code(ErrorCode::HandlerPanic, format!("handler for `{name}` panicked: {detail}"))
}
