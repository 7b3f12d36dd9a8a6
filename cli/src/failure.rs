//! What a command can fail with, and the exit code of each kind of failure.

use std::fmt;
use std::time::Duration;

use kafka_rpc::error::{RemoteError, RpcError};
use kafka_rpc::server::ServerError;
use kafka_rpc::transport::TransportError;

/// Why a command failed. Each kind has its own exit code (listed in `--help`).
#[derive(Debug)]
pub enum Failure {
    /// The service answered with an error.
    Remote(RemoteError),
    /// The command line or its input (say, the JSON body) is invalid.
    Usage(String),
    /// No reply arrived in time.
    Timeout(Duration),
    /// The broker cannot be reached.
    Unreachable(String),
    /// The topic does not exist (the broker's words).
    UnknownTopic(String),
    /// Anything else: a broker error, an undecodable reply, a failed benchmark.
    Other(String),
}

impl Failure {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Remote(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Timeout(_) => 3,
            Failure::Unreachable(_) => 4,
            Failure::UnknownTopic(_) => 5,
            Failure::Other(_) => 6,
        }
    }
}

/// Writes `text` to standard output. `Ok(false)` when the reader went away (`| head`),
/// which ends a command's output normally: `print!` would panic there, since Rust
/// ignores the broken-pipe signal. Any other write error is a failure.
pub fn write_stdout(text: &str) -> Result<bool, Failure> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(Failure::Other(format!("cannot write to stdout: {e}"))),
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = match self {
            Failure::Remote(e) => format!("the service answered with error {}: {}", e.code, e.message),
            Failure::Usage(m) => m.clone(),
            Failure::Timeout(d) => format!("no reply within {d:?}"),
            Failure::Unreachable(m) => format!("cannot reach the broker: {m}"),
            Failure::UnknownTopic(m) => m.clone(),
            Failure::Other(m) => m.clone(),
        };
        f.write_str(&one_line(&line))
    }
}

/// `text` on one line: broker and library messages may span several. Control
/// characters left after that are escaped: a service's error code and message come
/// from the network, and an escape sequence in them must not reach the terminal.
pub fn one_line(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if !line.chars().any(char::is_control) {
        return line;
    }
    line.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

impl From<TransportError> for Failure {
    fn from(e: TransportError) -> Self {
        match e {
            // Matched by kind with `{ .. }`, whatever fields the variants carry.
            e @ TransportError::UnknownTopic { .. } => Failure::UnknownTopic(e.to_string()),
            e @ TransportError::Connection { .. } => Failure::Unreachable(e.to_string()),
            other => Failure::Other(other.to_string()),
        }
    }
}

impl From<RpcError> for Failure {
    fn from(e: RpcError) -> Self {
        match e {
            RpcError::Remote(remote) => Failure::Remote(remote),
            RpcError::Timeout(after) => Failure::Timeout(after),
            RpcError::Transport(transport) => transport.into(),
            other => Failure::Other(other.to_string()),
        }
    }
}

impl From<ServerError> for Failure {
    fn from(e: ServerError) -> Self {
        match e {
            ServerError::Transport(transport) => transport.into(),
            other => Failure::Other(format!("benchmark server: {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_cannot_drive_the_terminal_through_its_error() {
        // The code and message come from the reply's headers, written by whoever answered.
        let remote = RemoteError::new("E\u{1b}[2J", "boom\u{1b}]0;owned\u{7}\u{9b}31m\r\nover two lines");
        let line = Failure::Remote(remote).to_string();
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("\\u{1b}]0;owned"), "{line:?}");
        assert!(line.contains("over two lines"), "{line:?}");
    }
}
