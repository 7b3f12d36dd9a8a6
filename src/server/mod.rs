//! Server (stub).
pub mod handler;
/// Server.
pub struct RpcServer;
