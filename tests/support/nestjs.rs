//! A real NestJS peer (`tests/peers/nestjs/peer.mjs`): installs its pinned npm
//! packages once, starts it against the test broker, talks to it line by line and
//! stops it.
//!
//! The peer prints `READY` when it can take work and one line per answer, so callers
//! wait on its output, never on a clock. It exits when its stdin closes, so a killed
//! test run does not leave it behind.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use kafka_rpc_testkit::TempDir;

/// Longest a peer may take to start: a NestJS client joins a consumer group first.
pub const STARTUP: Duration = Duration::from_secs(60);

const HOW_TO_GET_NODE: &str = "\
the NestJS interop tests need Node.js >= 20 with npm on PATH
  (Debian: `apt-get install nodejs npm`; or set NODE / NPM to their paths)";

/// Where the peer's sources and `package.json` live.
pub fn peer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/nestjs")
}

fn tool(var: &str, default: &str) -> String {
    std::env::var(var).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

/// Installs the peer's pinned packages (`npm ci` from the committed lock file) unless
/// `node_modules` already matches it. Fails the test, saying how to fix it, when node
/// or npm is missing or the install fails.
pub fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let node = tool("NODE", "node");
        let npm = tool("NPM", "npm");
        for bin in [&node, &npm] {
            match std::process::Command::new(bin).arg("--version").output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => panic!("`{bin} --version` failed ({}); {HOW_TO_GET_NODE}", out.status),
                Err(e) => panic!("cannot run `{bin}`: {e}; {HOW_TO_GET_NODE}"),
            }
        }
        let dir = peer_dir();
        // npm writes node_modules/.package-lock.json on install; when it is newer than
        // the committed lock file, the installed tree is the pinned one.
        let lock = std::fs::metadata(dir.join("package-lock.json")).and_then(|m| m.modified());
        let installed = std::fs::metadata(dir.join("node_modules/.package-lock.json")).and_then(|m| m.modified());
        if let (Ok(lock), Ok(installed)) = (&lock, &installed) {
            if installed >= lock {
                return;
            }
        }
        let out = std::process::Command::new(&npm)
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run `{npm} ci`: {e}; {HOW_TO_GET_NODE}"));
        if !out.status.success() {
            panic!(
                "`npm ci` in {} failed ({}):\n{}\n{}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
}

/// A running peer process.
pub struct NestPeer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
    log: PathBuf,
    /// Holds `log`; removed with it when the peer is dropped.
    _dir: TempDir,
}

/// What a peer process is started as.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// A NestJS microservice serving `<prefix>.nest.sum`, `<prefix>.nest.fail` and the
    /// event pattern `<prefix>.nest.events`.
    Server,
    /// A `ClientKafka` that takes `call`, `emit` and `load` commands.
    Client,
}

impl NestPeer {
    /// Starts the peer against `broker` and waits for its `READY` line. `prefix`
    /// names its topics; `patterns` are those a client will send to (it subscribes to
    /// their `.reply` topics before connecting, as NestJS requires).
    pub async fn start(mode: Mode, broker: &str, prefix: &str, patterns: &[&str]) -> NestPeer {
        install();
        let arg = match mode {
            Mode::Server => "server",
            Mode::Client => "client",
        };
        let dir = TempDir::new(&format!("nest-{arg}")).unwrap_or_else(|e| panic!("cannot create the peer's log directory: {e}"));
        let log = dir.path().join("peer.log");
        let stderr = std::fs::File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let mut child = Command::new(tool("NODE", "node"))
            .arg("peer.mjs")
            .arg(arg)
            .current_dir(peer_dir())
            .env("KAFKA_BROKER", broker)
            .env("PREFIX", prefix)
            .env("GROUP", format!("{prefix}-{arg}"))
            .env("PATTERNS", patterns.join(","))
            .env("KAFKAJS_NO_PARTITIONER_WARNING", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the NestJS peer: {e}; {HOW_TO_GET_NODE}"));
        let stdin = child.stdin.take();
        let Some(stdout) = child.stdout.take() else { panic!("the peer's stdout was not piped") };
        let mut peer = NestPeer { child, stdin, lines: BufReader::new(stdout).lines(), log, _dir: dir };
        let ready = peer.next_line(STARTUP).await;
        assert_eq!(ready, "READY", "the NestJS {arg} did not start; its log:\n{}", peer.log());
        peer
    }

    /// What the peer wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The next line the peer prints, failing the test after `within`.
    pub async fn next_line(&mut self, within: Duration) -> String {
        match tokio::time::timeout(within, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => panic!("the NestJS peer exited; its log:\n{}", self.log()),
            Ok(Err(e)) => panic!("reading the NestJS peer's output: {e}"),
            Err(_) => panic!("the NestJS peer printed nothing for {within:?}; its log:\n{}", self.log()),
        }
    }

    /// The next line that starts with `prefix`, without it; other lines are skipped.
    pub async fn expect(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = self.next_line(left).await;
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim_start().to_owned();
            }
        }
    }

    /// Sends one command line to a client peer.
    pub async fn command(&mut self, line: &str) {
        let Some(stdin) = self.stdin.as_mut() else { panic!("the peer's stdin is closed") };
        let sent = async {
            stdin.write_all(line.as_bytes()).await?;
            stdin.write_all(b"\n").await?;
            stdin.flush().await
        };
        if let Err(e) = sent.await {
            panic!("writing to the NestJS peer: {e}; its log:\n{}", self.log());
        }
    }

    /// Stops the peer: closes its stdin, which makes it leave its group and exit, and
    /// kills it if it has not exited within a few seconds.
    pub async fn stop(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}
