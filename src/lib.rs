//! # kafka-rpc
//!
//! Typed request-reply RPC over Apache Kafka.
//!
//! A [`ReplyingClient`](client::ReplyingClient) sends a typed request keyed by a
//! partition key and awaits the typed reply; an [`RpcServer`](server::RpcServer)
//! consumes the request topic, dispatches by request type, and answers on the
//! requester's reply topic and partition. Requests with the same key are handled one
//! after another in the order they were sent, which is what lets a service replace
//! per-entity locks with a keyed topic.
//!
//! The broker is a [`Transport`](transport::Transport): the in-process
//! [`EmbeddedBroker`](transport::embedded::EmbeddedBroker) (the default, and a test
//! utility) or a real Kafka-protocol broker.
//!
//! ```
//! use kafka_rpc::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Add { a: i64, b: i64 }
//! impl Request for Add {
//!     const TYPE: &'static str = "math.add";
//!     type Response = i64;
//!     fn key(&self) -> Option<Vec<u8>> { None }
//! }
//!
//! async fn add(req: Add) -> Result<i64, RemoteError> { Ok(req.a + req.b) }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = EmbeddedBroker::new();
//! let server = RpcServer::builder(broker.clone(), "math").handler(add).start().await?;
//! let client = ReplyingClient::builder(broker, "math").start().await?;
//! assert_eq!(client.request(Add { a: 2, b: 3 }).await?, 5);
//! client.shutdown().await;
//! server.shutdown().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod backoff;
mod clock;
pub mod client;
pub mod codec;
pub mod defaults;
pub mod error;
mod inbox;
mod lazy_timeout;
mod nesting;
pub mod metrics;
pub mod partitioner;
mod producer;
mod stop;
mod tail;
mod trace;
pub mod request;
pub mod server;
pub mod transport;

// The record format. Its encoders and decoders are the crate's own: `wire` shows the
// stable part (header names, peers, errors) and lends the rest to the crate; this
// crate's tests, benchmarks and CLI reach the rest through `__private::wire`.
#[path = "wire.rs"]
mod envelope;

/// The record format of requests and replies: header names, peer conventions, and the
/// error for headers that cannot be read. The layout, byte for byte, is in
/// `docs/wire-format.md`.
///
/// ```
/// use kafka_rpc::wire::{names, Peer};
/// use kafka_rpc::codec::ContentType;
///
/// // A tool reading a topic can tell a kafka-rpc request by its headers.
/// assert_eq!(names::TYPE, "kafka_rpc-type");
/// assert_eq!(Peer::Nest.default_content_type(), ContentType::Json);
/// ```
pub mod wire {
    pub(crate) use crate::envelope::*;
    pub use crate::envelope::{names, Peer, WireError, NEST_ERROR_CODE};
}

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use kafka_rpc_macros::{handler, Request};

/// The names most applications need, in one import.
pub mod prelude {
    pub use crate::client::{ReplyingClient, RequestOptions};
    pub use crate::codec::ContentType;
    pub use crate::error::{ErrorCode, RemoteError, RpcError};
    pub use crate::request::{PartitionKey, Request};
    pub use crate::server::handler::{Context, Handler, HandlerOptions, State};
    pub use crate::server::RpcServer;
    pub use crate::transport::embedded::EmbeddedBroker;
    pub use crate::transport::Transport;
    pub use kafka_rpc_macros::{handler, Request};
}

/// Compiles and runs the README's quick start as a doctest, so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeQuickStart;

/// Compiles and runs every code block of the guide (`docs/guide.md`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../docs/guide.md")]
pub struct Guide;

/// Compiles docs/observability.md's examples as doctests (they need the `otel` feature).
#[cfg(all(doctest, feature = "otel"))]
#[doc = include_str!("../docs/observability.md")]
pub struct ObservabilityDoc;
