//! Dispatch by request type: the `kafka_rpc-type` header picks the handler.
//!
//! The router owns every registered handler behind one object-safe shape
//! (bytes in, bytes or a [`RemoteError`] out), so decoding, panics and timeouts are
//! handled once here rather than in each handler. Text taken from the request (its
//! type name, decoder messages) is repeated in error replies only as a bounded excerpt.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::handler::{Context, Handler, StateRequirement};
use crate::codec::ContentType;
use crate::error::{excerpt, ErrorCode, RemoteError, MAX_ECHO};

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
            Err(e) => {
                // Decoder messages can quote the payload; repeat only a bounded excerpt.
                let message = excerpt(e.to_string(), MAX_ECHO);
                return futures::future::ready(Err(RemoteError::with_code(ErrorCode::BadRequest, message))).boxed();
            }
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

/// Longest request type name repeated in an `UNKNOWN_TYPE` reply.
const MAX_TYPE_ECHO: usize = 128;

/// Handlers by dispatch name.
#[derive(Default, Clone)]
pub(crate) struct Router {
    routes: HashMap<&'static str, Arc<dyn ErasedHandler>>,
    duplicates: Vec<&'static str>,
    /// Whether panic messages go to callers (they may carry internals; off by default).
    pub(crate) panic_details: bool,
}

impl Router {
    pub(crate) fn add<A: 'static, H: Handler<A>>(&mut self, handler: H) {
        let name = handler.request_type();
        let erased: Arc<dyn ErasedHandler> = Arc::new(Typed { handler, _args: PhantomData });
        if self.routes.insert(name, erased).is_some() {
            self.duplicates.push(name);
        }
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

    /// The time limit of `request_type`'s handler: its own timeout, else `default`.
    pub(crate) fn timeout(&self, request_type: Option<&str>, default: Duration) -> Duration {
        request_type.and_then(|name| self.routes.get(name)).and_then(|h| h.timeout()).unwrap_or(default)
    }

    /// Runs the handler for `request_type`, for at most `limit`. Every failure — no
    /// such handler, bad payload, handler error, panic, timeout — comes back as a
    /// [`RemoteError`]; none escapes to the caller's task. At the limit the handler's
    /// future is dropped and its context's cancellation fires, for work it spawned.
    pub(crate) async fn dispatch(
        &self,
        request_type: Option<&str>,
        payload: &[u8],
        content_type: ContentType,
        ctx: Context,
        limit: Duration,
    ) -> Result<Vec<u8>, RemoteError> {
        let Some(name) = request_type else {
            return Err(RemoteError::with_code(ErrorCode::UnknownType, "request has no `kafka_rpc-type` header"));
        };
        let Some(handler) = self.routes.get(name) else {
            return Err(RemoteError::with_code(
                ErrorCode::UnknownType,
                format!("no handler for request type `{}`", excerpt(name, MAX_TYPE_ECHO)),
            ));
        };
        let cancel = ctx.cancellation.clone();
        // The handler may panic while building its future as well as while running it.
        let future = match std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(payload, content_type, ctx))) {
            Ok(future) => AssertUnwindSafe(future).catch_unwind(),
            Err(panic) => return Err(self.panicked(name, panic)),
        };
        match tokio::time::timeout(limit, future).await {
            Ok(outcome) => outcome.unwrap_or_else(|panic| Err(self.panicked(name, panic))),
            Err(_) => {
                cancel.cancel();
                Err(RemoteError::with_code(ErrorCode::HandlerTimeout, format!("handler for `{name}` exceeded {limit:?}")))
            }
        }
    }

    /// The reply to a panic: generic unless the server opted in to sending details.
    /// The details are always logged, bounded.
    fn panicked(&self, name: &str, panic: Box<dyn std::any::Any + Send>) -> RemoteError {
        let detail = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        let detail = excerpt(&detail, MAX_ECHO);
        tracing::error!(request_type = name, panic = %detail, "handler panicked");
        let message = if self.panic_details {
            format!("handler for `{name}` panicked: {detail}")
        } else {
            format!("handler for `{name}` panicked")
        };
        RemoteError::with_code(ErrorCode::HandlerPanicked, message)
    }
}
