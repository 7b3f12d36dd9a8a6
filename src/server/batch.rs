//! Batch handlers: one call for the requests fetched together from one partition.
//!
//! A batch handler receives the requests of one type that one fetch returned for one
//! partition, in partition order, and returns one outcome per request. The server
//! answers each request on its own requester's reply address and commits past the
//! batch only after every reply of the batch was produced. A request that fails fails
//! alone (its own `Err` in the outcome list); returning `Err` for the whole call fails
//! every request of the batch with that error. Batches never mix partitions or types,
//! and are bounded by `RpcServerBuilder::max_batch` and by what one fetch returned.
//!
//! The point is amortising per-call costs that do not depend on the number of
//! requests, such as a database commit: apply the whole batch in one transaction.
//!
//! ```
//! use kafka_rpc::prelude::*;
//! use kafka_rpc::server::batch::Batch;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Request)]
//! #[request(type = "delivery.radius.set", response = u32, key = store_id)]
//! struct SetRadius { store_id: u64, radius_m: u32 }
//!
//! /// Applies a partition's fetched updates together; a radius below 300 m fails alone.
//! #[handler]
//! async fn set_radius(batch: Batch<SetRadius>) -> Result<Vec<Result<u32, RemoteError>>, RemoteError> {
//!     // e.g. BEGIN; one UPDATE per request, in order; COMMIT
//!     Ok(batch
//!         .requests()
//!         .map(|r| if r.radius_m < 300 { Err(RemoteError::new("BELOW_FLOOR", "under 300 m")) } else { Ok(r.radius_m) })
//!         .collect())
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = EmbeddedBroker::new();
//! let server = RpcServer::builder(broker.clone(), "radius").batch_handler(set_radius).max_batch(64).start().await?;
//! let client = ReplyingClient::builder(broker, "radius").start().await?;
//! assert_eq!(client.request(SetRadius { store_id: 1, radius_m: 900 }).await?, 900);
//! assert!(client.request(SetRadius { store_id: 1, radius_m: 100 }).await.is_err());
//! client.shutdown().await;
//! server.shutdown().await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::handler::{Context, State};
use crate::__private::{batch_state, into_outcomes, BatchResult, StateRequirement};
use crate::error::RemoteError;
use crate::request::Request;

/// The requests of one batch, in partition order, each with its [`Context`].
#[derive(Debug)]
pub struct Batch<R> {
    pub(crate) items: Vec<(R, Context)>,
}

impl<R> Batch<R> {
    /// A batch built by hand, for unit-testing a batch handler without a server.
    pub fn for_test(items: Vec<(R, Context)>) -> Self {
        Batch { items }
    }

    /// How many requests; the handler returns exactly this many outcomes.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch is empty (a server never calls a handler with one).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The requests, in partition order.
    pub fn requests(&self) -> impl Iterator<Item = &R> {
        self.items.iter().map(|(r, _)| r)
    }

    /// The requests with their contexts, in partition order.
    pub fn iter(&self) -> impl Iterator<Item = (&R, &Context)> {
        self.items.iter().map(|(r, c)| (r, c))
    }

    /// The requests, in partition order, without their contexts.
    pub fn into_requests(self) -> Vec<R> {
        self.items.into_iter().map(|(r, _)| r).collect()
    }

    /// Requests and contexts, in partition order.
    pub fn into_parts(self) -> Vec<(R, Context)> {
        self.items
    }

    pub(crate) fn state<S: Clone + Send + Sync + 'static>(&self) -> Option<S> {
        self.items.first().and_then(|(_, ctx)| ctx.state::<S>())
    }
}

/// Something the server can run for a batch of one request type.
///
/// Implemented for `async fn(Batch<Req>)` and `async fn(Batch<Req>, State<S>)`
/// returning `Result<Vec<Result<Req::Response, E>>, E>` with `E: Into<RemoteError>`,
/// and by `#[handler]` on such functions. Register with `RpcServerBuilder::batch_handler`.
pub trait BatchHandler<Args>: Send + Sync + 'static {
    /// The request type this handler serves.
    type Request: Request;

    /// Runs the handler on a non-empty batch.
    // Spelled out rather than aliased so the docs show what a batch handler returns.
    #[allow(clippy::type_complexity)]
    fn call(
        &self,
        batch: Batch<Self::Request>,
    ) -> BoxFuture<'static, Result<Vec<Result<<Self::Request as Request>::Response, RemoteError>>, RemoteError>>;

    /// The dispatch name; defaults to the request type's [`Request::TYPE`].
    fn request_type(&self) -> &'static str {
        <Self::Request as Request>::TYPE
    }

    /// How long one call may run before every request of the batch gets
    /// `HANDLER_TIMEOUT`; `None` uses the server's default handler timeout.
    fn timeout(&self) -> Option<Duration> {
        None
    }

    /// State the handler extracts, checked when the server is built. Implemented by
    /// the blanket impls and `#[handler]`; not meant to be called or overridden.
    #[doc(hidden)]
    fn state_requirement(&self) -> Option<StateRequirement> {
        None
    }
}

impl<F, Fut, R, E> BatchHandler<(Batch<R>,)> for F
where
    F: Fn(Batch<R>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Result<R::Response, E>>, E>> + Send + 'static,
    R: Request,
    E: Into<RemoteError> + 'static,
{
    type Request = R;

    fn call(&self, batch: Batch<R>) -> BoxFuture<'static, BatchResult<R>> {
        self(batch).map(into_outcomes).boxed()
    }
}

impl<F, Fut, R, E, S> BatchHandler<(Batch<R>, State<S>)> for F
where
    F: Fn(Batch<R>, State<S>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Result<R::Response, E>>, E>> + Send + 'static,
    R: Request,
    E: Into<RemoteError> + 'static,
    S: Clone + Send + Sync + 'static,
{
    type Request = R;

    fn call(&self, batch: Batch<R>) -> BoxFuture<'static, BatchResult<R>> {
        match batch_state::<R, S>(&batch) {
            Ok(state) => self(batch, state).map(into_outcomes).boxed(),
            // Unreachable through RpcServer, which checks requirements at build time.
            Err(e) => futures::future::ready(Err(e)).boxed(),
        }
    }

    fn state_requirement(&self) -> Option<StateRequirement> {
        Some(StateRequirement::of::<S>())
    }
}
