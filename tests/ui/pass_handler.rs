//! Every handler shape and option the attribute accepts, next to plain functions.
use kafka_rpc::prelude::*;
use serde::{Deserialize, Serialize};

use kafka_rpc::server::handler::Handler;

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.reduce", response = u32, key = store_id)]
struct ReduceRadius {
    store_id: u64,
    by_m: u32,
}

#[derive(Clone)]
struct Limits {
    min_m: u32,
}

#[derive(Debug)]
enum RadiusError {
    TooSmall,
}

impl From<RadiusError> for RemoteError {
    fn from(_: RadiusError) -> Self {
        RemoteError::new("RADIUS_TOO_SMALL", "radius below the minimum")
    }
}

type RadiusResult<T> = Result<T, RadiusError>;

fn assert_handler<A, H: Handler<A>>(_: H) {}

#[handler]
async fn request_only(req: ReduceRadius) -> Result<u32, RemoteError> {
    Ok(req.by_m)
}

#[handler]
async fn with_context(req: ReduceRadius, ctx: Context) -> Result<u32, RemoteError> {
    Ok(req.by_m + ctx.partition() as u32)
}

#[handler]
async fn with_state(req: ReduceRadius, _ctx: Context, State(limits): State<Limits>) -> Result<u32, RadiusError> {
    if req.by_m < limits.min_m {
        return Err(RadiusError::TooSmall);
    }
    Ok(req.by_m)
}

/// Options, a custom error through an alias, and attributes meant for the function.
#[handler(type = "delivery.radius.reduce.v0", timeout_ms = 1_500)]
#[allow(clippy::unused_async)]
#[cfg_attr(not(test), allow(unused_variables))]
pub(crate) async fn with_options(req: ReduceRadius) -> RadiusResult<u32> {
    Ok(req.by_m)
}

#[handler]
async fn infallible(req: ReduceRadius) -> Result<u32, std::convert::Infallible> {
    Ok(req.by_m)
}

#[handler]
async fn std_paths(
    req: ReduceRadius,
    ctx: kafka_rpc::server::handler::Context,
    state: kafka_rpc::server::handler::State<Limits>,
) -> std::result::Result<u32, String> {
    let _ = ctx;
    Ok(req.by_m.max(state.0.min_m))
}

mod api {
    use super::*;

    /// A handler in another module, used from the parent.
    #[handler]
    pub async fn nested(req: ReduceRadius) -> Result<u32, &'static str> {
        // The function keeps its own name inside, so it can call itself.
        if req.by_m > 10 {
            return Box::pin(nested(ReduceRadius { store_id: req.store_id, by_m: req.by_m / 2 })).await;
        }
        Ok(req.by_m)
    }
}

// Handlers named like the bindings a careless expansion would use: their unit structs
// must not turn into patterns inside other handlers' generated code.
#[handler]
async fn r(req: ReduceRadius) -> Result<u32, RemoteError> {
    Ok(req.by_m)
}

#[handler]
async fn e(req: ReduceRadius) -> Result<u32, String> {
    Ok(req.by_m)
}

/// Only built where its `cfg` holds; the struct and impl follow the function.
#[handler]
#[cfg(any())]
async fn never_built(req: ReduceRadius) -> Result<u32, RemoteError> {
    Ok(req.by_m)
}

// Without the attribute: the blanket impls over plain functions still apply.
async fn plain(req: ReduceRadius) -> Result<u32, RemoteError> {
    Ok(req.by_m)
}

async fn plain_with_state(req: ReduceRadius, _ctx: Context, State(l): State<Limits>) -> Result<u32, RemoteError> {
    Ok(req.by_m.max(l.min_m))
}

fn main() {
    assert_handler(request_only);
    assert_handler(with_context);
    assert_handler(with_state);
    assert_handler(with_options);
    assert_handler(infallible);
    assert_handler(std_paths);
    assert_handler(api::nested);
    assert_handler(r);
    assert_handler(e);
    assert_handler(plain);
    assert_handler(plain_with_state);
}
