//! A throwaway Redis server.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{wait_until_ready, Supervised, TempDir};
use crate::{free_port, Error};

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
        let bin = find_redis()?;
        let dir = TempDir::new("redis")?;
        let log = dir.path().join("redis.log");
        let port = free_port()?;
        let mut cmd = Command::new(&bin);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--dir"])
            .arg(dir.path());
        let server = Supervised::spawn(cmd, None, libc::SIGTERM, &log)?;
        wait_until_ready("redis-server", &server, &log, STARTUP, || answers_ping(port))?;
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
