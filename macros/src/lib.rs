//! Macros for [kafka-rpc](https://docs.rs/kafka-rpc): `#[derive(Request)]` for request
//! types and `#[handler]` for handler functions.
//!
//! Depend on `kafka-rpc` and use them from there (`kafka_rpc::{Request, handler}` or the
//! prelude): the generated code names `::kafka_rpc` paths, so this crate is not meant to
//! be used on its own.

#![warn(missing_docs)]

use proc_macro::TokenStream;
use syn::{parse_macro_input, DeriveInput, ItemFn};

mod handler;
mod request;

/// Implements `kafka_rpc::request::Request` from a `#[request(...)]` attribute.
///
/// - `type = "delivery.radius.reduce"` (required): the dispatch name, sent in the
///   `kafka_rpc-type` header; servers pick the handler registered under it.
/// - `response = RadiusReduced` (required): what the handler answers with.
/// - `key = store_id` (optional): the field whose value is the partition key, so requests
///   for one store are handled in order. Any `PartitionKey` type works (strings, integers,
///   UUIDs, byte vectors); an `Option<K>` field means "keyed when `Some`". Tuple structs
///   name the field by position, `key = 0`. Without `key` requests go round-robin.
///
/// The type still needs `Serialize` and `Deserialize`: the codec sends it.
///
/// ```
/// use kafka_rpc::prelude::*;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct RadiusReduced { radius_m: u32 }
///
/// #[derive(Serialize, Deserialize, Request)]
/// #[request(type = "delivery.radius.reduce", response = RadiusReduced, key = store_id)]
/// struct ReduceRadius { store_id: u64, by_m: u32 }
///
/// #[derive(Serialize, Deserialize, Request)]
/// #[request(type = "delivery.stats", response = u64)]
/// struct Stats;
///
/// let req = ReduceRadius { store_id: 7, by_m: 100 };
/// assert_eq!(ReduceRadius::TYPE, "delivery.radius.reduce");
/// assert_eq!(req.key(), Some(7u64.to_be_bytes().to_vec()));
/// assert_eq!(Stats.key(), None);
/// ```
///
/// Mistakes are reported at the attribute, e.g. a key that names no field:
///
/// ```compile_fail
/// use kafka_rpc::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize, Request)]
/// #[request(type = "delivery.radius.reduce", response = u32, key = shop_id)]
/// struct ReduceRadius { store_id: u64 }
/// ```
#[proc_macro_derive(Request, attributes(request))]
pub fn derive_request(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    request::expand(input).unwrap_or_else(syn::Error::into_compile_error).into()
}

/// Makes an `async fn` a handler that a server registers with `.handler(name)`.
///
/// The function takes the request, optionally followed by `Context` and then
/// `State<S>` (the same shapes a plain `async fn` handler may have), and returns
/// `Result<Req::Response, E>` with `E: Into<RemoteError>`. The name becomes a unit
/// struct implementing `kafka_rpc::server::handler::Handler` (carrying the options), and
/// the struct still calls like the function: `reduce_radius(req, ctx).await` runs it
/// directly and returns exactly what it returns, which is how unit tests call it.
/// `Handler::call` runs it as the server does (errors converted to `RemoteError`).
///
/// Options:
/// - `type = "other.name"`: serve that dispatch name instead of the request's
///   `Request::TYPE` (for example an old name kept for senders not yet upgraded).
/// - `timeout_ms = 250`: how long the handler may run before the caller gets a
///   `HANDLER_TIMEOUT` error.
///
/// Both can also be given, or overridden, where the handler is registered:
/// `RpcServerBuilder::handler_with(reduce_radius, HandlerOptions::new().timeout(...))`.
///
/// ```
/// use kafka_rpc::prelude::*;
/// use kafka_rpc::transport::Record;
/// use serde::{Deserialize, Serialize};
/// use std::time::Duration;
///
/// #[derive(Serialize, Deserialize, Request)]
/// #[request(type = "delivery.radius.reduce", response = u32, key = store_id)]
/// struct ReduceRadius { store_id: u64, radius_m: u32, by_m: u32 }
///
/// /// Shrinks a store's delivery radius, never below 500 m.
/// #[handler(timeout_ms = 250)]
/// async fn reduce_radius(req: ReduceRadius, ctx: Context) -> Result<u32, RemoteError> {
///     if ctx.expects_reply() {
///         // a caller waits for the answer; events (no reply address) get none
///     }
///     Ok(req.radius_m.saturating_sub(req.by_m).max(500))
/// }
///
/// assert_eq!(reduce_radius.request_type(), "delivery.radius.reduce");
/// assert_eq!(reduce_radius.timeout(), Some(Duration::from_millis(250)));
///
/// # futures::executor::block_on(async {
/// // Called directly, as a plain async fn:
/// let req = ReduceRadius { store_id: 7, radius_m: 3000, by_m: 1000 };
/// assert_eq!(reduce_radius(req, Context::for_test(Record::default())).await, Ok(2000));
/// // Or as the server calls it:
/// let req = ReduceRadius { store_id: 7, radius_m: 600, by_m: 1000 };
/// assert_eq!(reduce_radius.call(req, Context::for_test(Record::default())).await, Ok(500));
/// # });
/// ```
///
/// A handler whose success type is not the request's response type is rejected where the
/// return type is written:
///
/// ```compile_fail,E0277
/// use kafka_rpc::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize, Request)]
/// #[request(type = "delivery.radius.reduce", response = u32)]
/// struct ReduceRadius { by_m: u32 }
///
/// #[handler]
/// async fn reduce_radius(req: ReduceRadius) -> Result<String, RemoteError> {
///     Ok(req.by_m.to_string())
/// }
/// ```
#[proc_macro_attribute]
pub fn handler(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = parse_macro_input!(item as ItemFn);
    match handler::expand(attr.into(), item.clone()) {
        Ok(tokens) => tokens.into(),
        // Keeping the function means the error above is the only one, instead of being
        // followed by "cannot find value" wherever the handler is used.
        Err(e) => {
            let mut tokens = e.into_compile_error();
            quote::ToTokens::to_tokens(&item, &mut tokens);
            tokens.into()
        }
    }
}
