//! Processes a fault test controls: child processes whose stdout lines the test can
//! await, and tansu brokers with durable (`sqlite://`) storage that can be killed and
//! started again on the same port.
//!
//! Every child is killed when its handle drops, and also gets a parent-death signal,
//! so a test that panics or is killed leaves nothing behind. The parent-death signal
//! fires when the *thread* that spawned the child ends: spawn from the test's own
//! thread (the body of a `#[tokio::test]` runs on it), never from a spawned task.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::kafka::{answers_kafka, find_tansu, free_port, listens_on};

/// Makes the process `cmd` starts receive SIGKILL when the thread that spawned it ends
/// (see the module docs), so that no test run, however it ends, leaves it behind.
pub fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// The suite's temporary directories: removed on drop, and swept after a killed run.
pub use kafka_rpc_testkit::TempDir;

/// A fresh temporary directory; the test fails, saying why, when none can be made.
pub fn temp_dir(kind: &str) -> TempDir {
    TempDir::new(kind).unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"))
}

/// A running child process. Its stdout is collected line by line; its stderr goes to
/// `<name>.log` in the directory given at spawn, shown when a wait on it fails.
pub struct Process {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    log: PathBuf,
}

impl Process {
    /// Starts `cmd` as `name`, with stderr in `<dir>/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Process {
        let log = dir.join(format!("{name}.log"));
        let stderr = match std::fs::File::create(&log) {
            Ok(f) => f,
            Err(e) => panic!("cannot create {}: {e}", log.display()),
        };
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        die_with_parent(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("cannot start {name} ({:?}): {e}", cmd.get_program()),
        };
        let lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(stdout) = child.stdout.take() {
            let sink = Arc::clone(&lines);
            // The reader ends at EOF, when the child exits.
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        Process { name: name.to_string(), child, lines, log }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What the child wrote to stderr so far, for failure messages (the last 8 KiB).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(8 * 1024);
        let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        text[start..].to_string()
    }

    /// Sends `signal` (e.g. `libc::SIGKILL`).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid, which is not reaped before drop.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, signal) } != 0 {
            panic!("cannot signal {} ({}): {}", self.name, self.pid(), std::io::Error::last_os_error());
        }
    }

    /// `kill -9`, and reaps the process.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        match self.child.wait() {
            Ok(s) => s,
            Err(e) => panic!("cannot reap {}: {e}", self.name),
        }
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until the process exits, or fails the test after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!("{} did not exit within {within:?}; its stderr:\n{}", self.name, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the latest stdout line that starts with `prefix` satisfies `matches`
    /// and returns it, or fails the test with `what` after `within` or when the
    /// process exits first.
    pub async fn await_line(&mut self, what: &str, within: Duration, prefix: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self.lines().into_iter().rev().find(|l| l.starts_with(prefix)).filter(|l| matches(l)) {
                return line;
            }
            if let Some(status) = self.exited() {
                panic!("{} exited ({status}) before {what}; its stderr:\n{}", self.name, self.log_tail());
            }
            if Instant::now() >= deadline {
                panic!("timed out after {within:?} waiting until {what}; {} stderr:\n{}", self.name, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A tansu broker storing its data in `sqlite://` in a directory of its own, on a
/// port that stays the same across restarts, so clients see one broker go away and
/// come back with its topics, records and committed offsets.
pub struct DurableTansu {
    dir: TempDir,
    /// tansu's `--storage-engine`.
    storage: &'static str,
    port: u16,
    process: Option<Process>,
    starts: u32,
}

impl DurableTansu {
    /// Starts a broker and waits until it answers.
    pub fn start() -> DurableTansu {
        Self::start_with("sqlite://tansu.db")
    }

    /// Starts a broker that keeps everything in memory: each [`restart`](Self::restart)
    /// comes back on the same port with no topics, records or committed offsets, as a
    /// broker that lost its data.
    pub fn start_in_memory() -> DurableTansu {
        Self::start_with("memory://tansu/")
    }

    fn start_with(storage: &'static str) -> DurableTansu {
        let mut broker = DurableTansu { dir: temp_dir("tansu"), storage, port: free_port(), process: None, starts: 0 };
        broker.restart();
        broker
    }

    /// `host:port` of the broker.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Whether the broker answers a Kafka request now.
    pub fn answers(&self) -> bool {
        answers_kafka(&self.addr())
    }

    /// `kill -9` the broker.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
    }

    /// Starts the broker (again) on the same port and storage, and waits until it
    /// answers; returns when it did.
    pub fn restart(&mut self) -> Instant {
        let Some(bin) = find_tansu() else {
            panic!("the broker-restart test needs tansu: `scripts/install-tansu.sh` prints its path; export TANSU_BIN=<that path>")
        };
        let listener = format!("tcp://{}", self.addr());
        let mut cmd = Command::new(bin);
        cmd.args(["broker", "--storage-engine", self.storage, "--listener-url"])
            .arg(&listener)
            .arg("--advertised-listener-url")
            .arg(&listener)
            .current_dir(self.dir.path());
        self.starts += 1;
        let mut process = Process::spawn(&format!("tansu-{}", self.starts), cmd, self.dir.path());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Ours, not another broker that took the port while this one was down.
            if self.answers() && listens_on(process.pid(), self.port) {
                self.process = Some(process);
                return Instant::now();
            }
            if let Some(status) = process.exited() {
                panic!("tansu exited ({status}) before answering; its log:\n{}", process.log_tail());
            }
            if Instant::now() >= deadline {
                panic!("tansu did not answer on {} within 30 s; its log:\n{}", self.addr(), process.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
