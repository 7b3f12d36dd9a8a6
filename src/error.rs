//! Errors a caller sees, and the error a handler sends back.
//!
//! Each layer has its own enum ([`CodecError`], [`TransportError`],
//! [`WireError`](crate::wire::WireError)); [`RpcError`] is what `request` returns and
//! wraps them at the seam. [`RemoteError`] is the failure a server sends back: a stable
//! code plus a message.

use std::time::Duration;

use crate::codec::CodecError;
use crate::transport::TransportError;

/// Stable codes carried in the `kafka_rpc-error-code` header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The handler returned an error (the default for handler errors).
    HandlerError,
    /// The handler panicked; the server caught it and kept running. The message is
    /// generic unless the server opted in to sending panic details.
    HandlerPanicked,
    /// The handler exceeded its timeout (its own, the server default, or what was left
    /// of the request's deadline).
    HandlerTimeout,
    /// No handler is registered for the request's type.
    UnknownType,
    /// The payload or its headers could not be decoded.
    BadRequest,
    /// The handler answered, but its reply could not be produced (refused by the broker
    /// after bounded retries); this small error reply was sent in its place.
    ReplyFailed,
    /// The handler's reply exceeded the server's maximum reply size.
    ReplyTooLarge,
    /// A code chosen by the application (or sent by a foreign peer).
    Custom(String),
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::HandlerError => "HANDLER_ERROR",
            ErrorCode::HandlerPanicked => "HANDLER_PANICKED",
            ErrorCode::HandlerTimeout => "HANDLER_TIMEOUT",
            ErrorCode::UnknownType => "UNKNOWN_TYPE",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::ReplyFailed => "REPLY_FAILED",
            ErrorCode::ReplyTooLarge => "REPLY_TOO_LARGE",
            ErrorCode::Custom(code) => code,
        }
    }

    /// Parses a wire code; unknown codes become [`ErrorCode::Custom`]. `HANDLER_PANIC`,
    /// the name older servers send, reads as [`ErrorCode::HandlerPanicked`].
    pub fn parse(code: &str) -> Self {
        match code {
            "HANDLER_ERROR" => ErrorCode::HandlerError,
            "HANDLER_PANICKED" | "HANDLER_PANIC" => ErrorCode::HandlerPanicked,
            "HANDLER_TIMEOUT" => ErrorCode::HandlerTimeout,
            "UNKNOWN_TYPE" => ErrorCode::UnknownType,
            "BAD_REQUEST" => ErrorCode::BadRequest,
            "REPLY_FAILED" => ErrorCode::ReplyFailed,
            "REPLY_TOO_LARGE" => ErrorCode::ReplyTooLarge,
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

/// A builder setting that cannot work, refused when the client, server or transport
/// starts (as Spring refuses invalid container properties) instead of breaking
/// requests later: a zero handler or call timeout, a handler for a topic the server
/// does not consume, group timings the coordinator cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{setting}`: {reason}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The builder method that was given the value, e.g. `handler_timeout`.
    pub setting: &'static str,
    /// Why the value cannot work.
    pub reason: String,
}

impl ConfigError {
    /// Refuses `setting` for `reason`.
    pub(crate) fn new(setting: &'static str, reason: impl Into<String>) -> Self {
        ConfigError { setting, reason: reason.into() }
    }
}

/// What [`ReplyingClient::request`](crate::client::ReplyingClient::request) can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
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
    /// The client is at a limit: `max_in_flight` sent and unanswered with
    /// [`Backpressure::Fail`](crate::client::Backpressure::Fail), or its bound on calls
    /// queued and not yet sent. The number is the limit reached: `max_in_flight`, or
    /// for the queue bound the calls a client holds at most, `max_in_flight +
    /// max_queued`.
    #[error("too many requests in flight ({0})")]
    Busy(usize),
    /// The broker failed the send, or the client could not start. Failed reply
    /// fetches are retried, not reported: a call whose reply cannot be read ends in
    /// [`RpcError::Timeout`].
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The request could not be encoded, or the reply could not be decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The client could not start: a builder setting cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
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

/// Most bytes of request-supplied text (type names, decode errors) an error reply or a
/// log line repeats.
pub(crate) const MAX_ECHO: usize = 256;

/// Most bytes of an error message sent in a reply, whatever produced it.
pub(crate) const MAX_ERROR_MESSAGE: usize = 1024;

/// The message a panic was raised with (`panic!` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Text from an untrusted source made safe to log or echo: at most `max` bytes (cut at
/// a character boundary, marked with `…`), control characters escaped so it stays on
/// one line. Bytes that are not UTF-8 are shown as replacement characters.
///
/// The one helper for this: every log line or error reply that repeats a header
/// value, a payload excerpt or a message derived from them goes through it.
pub(crate) fn excerpt(text: impl AsRef<[u8]>, max: usize) -> String {
    let bytes = text.as_ref();
    // Decode only a little more than will be shown; multi-KB values cost nothing extra.
    let head = &bytes[..bytes.len().min(max.saturating_add(4))];
    let lossy = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(max.min(lossy.len()) + 4);
    let mut cut = bytes.len() > head.len();
    for c in lossy.chars() {
        let escaped: Option<String> = c.is_control().then(|| c.escape_default().collect());
        let len = escaped.as_ref().map_or(c.len_utf8(), String::len);
        if out.len() + len > max {
            cut = true;
            break;
        }
        match escaped {
            Some(e) => out.push_str(&e),
            None => out.push(c),
        }
    }
    if cut {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_bounded_single_lines() {
        assert_eq!(excerpt("plain", 10), "plain");
        assert_eq!(excerpt("a\nb\r\u{1b}[31m", 64), "a\\nb\\r\\u{1b}[31m");
        let long = "é".repeat(5000);
        let cut = excerpt(&long, 101);
        assert!(cut.len() <= 101 + '…'.len_utf8() && cut.ends_with('…'), "{}", cut.len());
        assert!(!excerpt(&[0xff, b'\n', 0x00][..], 16).contains('\n'));
    }

    #[test]
    fn old_panic_code_still_parses() {
        assert_eq!(ErrorCode::parse("HANDLER_PANIC"), ErrorCode::HandlerPanicked);
        assert_eq!(ErrorCode::HandlerPanicked.as_str(), "HANDLER_PANICKED");
        for code in [ErrorCode::ReplyFailed, ErrorCode::ReplyTooLarge, ErrorCode::HandlerTimeout] {
            assert_eq!(ErrorCode::parse(code.as_str()), code);
        }
    }
}
