//! Errors a caller sees, and the error a handler sends back.
//!
//! Each layer has its own enum ([`CodecError`](crate::codec::CodecError),
//! [`TransportError`](crate::transport::TransportError),
//! [`WireError`](crate::wire::WireError)); [`RpcError`] is what `request` returns and
//! wraps them at the seam. [`RemoteError`] is the failure a server sends back: a stable
//! code plus a message.

use std::time::Duration;

use crate::codec::CodecError;
use crate::transport::TransportError;

/// Stable codes carried in the `kafka_rpc-error-code` header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The handler returned an error (the default for handler errors).
    HandlerError,
    /// The handler panicked; the server caught it and kept running.
    HandlerPanic,
    /// The handler exceeded its timeout.
    HandlerTimeout,
    /// No handler is registered for the request's type.
    UnknownType,
    /// The payload or its headers could not be decoded.
    BadRequest,
    /// A code chosen by the application (or sent by a foreign peer).
    Custom(String),
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::HandlerError => "HANDLER_ERROR",
            ErrorCode::HandlerPanic => "HANDLER_PANIC",
            ErrorCode::HandlerTimeout => "HANDLER_TIMEOUT",
            ErrorCode::UnknownType => "UNKNOWN_TYPE",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::Custom(code) => code,
        }
    }

    /// Parses a wire code; unknown codes become [`ErrorCode::Custom`].
    pub fn parse(code: &str) -> Self {
        match code {
            "HANDLER_ERROR" => ErrorCode::HandlerError,
            "HANDLER_PANIC" => ErrorCode::HandlerPanic,
            "HANDLER_TIMEOUT" => ErrorCode::HandlerTimeout,
            "UNKNOWN_TYPE" => ErrorCode::UnknownType,
            "BAD_REQUEST" => ErrorCode::BadRequest,
            other => ErrorCode::Custom(other.to_owned()),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure reported by the server instead of a response.
///
/// Handlers return `Result<Response, E>` with `E: Into<RemoteError>`; implement
/// `From<YourError> for RemoteError` to pick codes, or return `RemoteError::new` directly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RemoteError {
    /// Stable, machine-readable code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl RemoteError {
    /// An error with an application-chosen code.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        RemoteError { code: ErrorCode::parse(&code.into()), message: message.into() }
    }

    /// An error with one of the built-in codes.
    pub fn with_code(code: ErrorCode, message: impl Into<String>) -> Self {
        RemoteError { code, message: message.into() }
    }
}

impl From<String> for RemoteError {
    fn from(message: String) -> Self {
        RemoteError::with_code(ErrorCode::HandlerError, message)
    }
}

impl From<&str> for RemoteError {
    fn from(message: &str) -> Self {
        RemoteError::with_code(ErrorCode::HandlerError, message)
    }
}

impl From<std::convert::Infallible> for RemoteError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// What [`ReplyingClient::request`](crate::client::ReplyingClient::request) can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// No reply arrived before the deadline. The request may still be executed.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The server answered with an error.
    #[error("remote error {0}")]
    Remote(#[from] RemoteError),
    /// The client was shut down (or dropped) while the request was pending.
    #[error("client closed")]
    Closed,
    /// The in-flight limit was reached and the client is configured not to wait.
    #[error("too many requests in flight ({0})")]
    Busy(usize),
    /// The broker failed the send or the reply fetch.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The request could not be encoded, or the reply could not be decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl RpcError {
    /// The server-side error code, when the server answered with an error.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            RpcError::Remote(e) => Some(&e.code),
            _ => None,
        }
    }
}
