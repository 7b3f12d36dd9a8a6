//! A throwaway Redis server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{wait_until_ready, Supervised, TempDir};
use crate::{on_a_free_port, Error};

/// How long redis-server may take to answer its first PING.
const STARTUP: Duration = Duration::from_secs(30);

/// A Redis server on a free 127.0.0.1 port with no persistence (`--save ''`,
/// `--appendonly no`) and its working directory in a temporary directory.
///
/// Dropping it stops the server and deletes the directory.
pub struct TempRedis {
    // Declared before `dir`: the server must stop before its directory is deleted.
    _server: Supervised,
    port: u16,
    dir: TempDir,
}

impl TempRedis {
    /// Starts redis-server and waits until it answers PING.
    pub fn start() -> Result<TempRedis, Error> {
        on_a_free_port(TempRedis::start_on)
    }

    /// Starts redis-server on `port` and waits until it answers PING.
    fn start_on(port: u16) -> Result<TempRedis, Error> {
        let bin = find_redis()?;
        let dir = TempDir::new("redis")?;
        let log = dir.path().join("redis.log");
        let mut cmd = Command::new(&bin);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--dir"])
            .arg(dir.path());
        let server = Supervised::spawn(cmd, None, libc::SIGTERM, &log)?;
        // Whatever answers must be our server: another one may hold the port, ours then
        // fails to bind it and exits.
        let pid = server.pid();
        wait_until_ready("redis-server", &server, &log, STARTUP, || answers_ping(port) && server_pid(port) == Some(pid))?;
        Ok(TempRedis { _server: server, port, dir })
    }

    /// The URL the `redis` crate connects with.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port the server listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's temporary working directory; it is gone after drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn find_redis() -> Result<PathBuf, Error> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("redis-server"))
        .find(|b| b.is_file())
        .ok_or_else(|| Error::Missing("redis-server".into()))
}

/// Whether the server answers an inline PING with +PONG: the port listening alone
/// does not mean it is ready.
fn answers_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    s.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// The process id of the Redis server on `port` (`INFO server`).
fn server_pid(port: u16) -> Option<u32> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"INFO server\r\n").ok()?;
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    reader.read_line(&mut head).ok()?;
    let len: usize = head.strip_prefix('$')?.trim().parse().ok()?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    String::from_utf8_lossy(&body).lines().find_map(|l| l.strip_prefix("process_id:")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The port picked as free is taken (here by another test's server) before
    /// redis-server binds it: that must not pass as our server being ready.
    #[test]
    fn a_port_taken_before_the_server_binds_is_not_someone_elses_server() {
        let other = TempRedis::start().expect("redis-server");
        match TempRedis::start_on(other.port()) {
            Ok(r) => panic!("started \"our\" redis on {}, which is the other server's port", r.port()),
            // What `on_a_free_port` retries on.
            Err(e) => assert!(e.to_string().contains("Address already in use"), "{e}"),
        }
    }
}
