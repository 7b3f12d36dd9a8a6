//! Throwaway database servers for tests and benchmarks, and a Kafka-aware proxy
//! ([`KafkaProxy`]) that counts broker requests per API key and injects faults.
//!
//! [`TempPostgres`] and [`TempRedis`] each start a real server on a free 127.0.0.1
//! port with its data in a fresh temporary directory, wait until it answers, and stop
//! it and delete the directory when dropped, also while a failing test unwinds. A
//! server started here also dies with the process that started it (a parent-death
//! signal), so a killed test run leaves no server behind; its directory is removed by
//! the next run.
//!
//! A missing binary is an error whose message says how to install it, so a test that
//! needs a server fails rather than skips.
//!
//! ```no_run
//! use kafka_rpc_testkit::{TempPostgres, TempRedis};
//!
//! let pg = TempPostgres::start().expect("PostgreSQL");
//! let redis = TempRedis::start().expect("Redis");
//! println!("{} and {}", pg.connection_string(), redis.url());
//! // Both servers stop and their directories go away here.
//! ```

pub mod alloc;
pub mod kafka_proxy;
mod postgres;
mod process;
mod redis;

pub use kafka_proxy::KafkaProxy;
pub use postgres::{TempPostgres, TempPostgresBuilder};
pub use process::TempDir;
pub use redis::TempRedis;

use std::fmt;

/// How to get the servers this crate starts, for error messages.
pub const HOW_TO_INSTALL: &str = "install them with `scripts/install-services.sh` (as root), \
     or `apt-get install postgresql redis-server` on Debian";

/// Why a server could not be started.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A binary the server needs was not found; the message says how to get it.
    Missing(String),
    /// The server was found but did not start or did not answer.
    Start(String),
    /// Preparing its directory or running a helper program failed.
    Io(String, std::io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Missing(what) => write!(f, "{what} not found: {HOW_TO_INSTALL}"),
            Error::Start(why) => f.write_str(why),
            Error::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(_, e) => Some(e),
            _ => None,
        }
    }
}

/// How many ports a server is tried on before giving up: one picked as free can be
/// taken by another process before the server binds it.
const PORT_ATTEMPTS: usize = 5;

/// Runs `start_on` with a free port, again with another one while the server failed
/// because its port was taken in the meantime (its log, in the error, says so).
fn on_a_free_port<T>(mut start_on: impl FnMut(u16) -> Result<T, Error>) -> Result<T, Error> {
    let mut attempt = 1;
    loop {
        match start_on(free_port()?) {
            Err(Error::Start(why)) if attempt < PORT_ATTEMPTS && why.contains("Address already in use") => attempt += 1,
            result => return result,
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Io("cannot find a free port on 127.0.0.1".into(), e))
}
