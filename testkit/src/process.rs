//! The one mechanism both servers share: a temporary directory that is removed on
//! drop, and a child process that is stopped on drop and killed if we die.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Error;

/// Prefix of every directory this crate creates in the system temp dir.
const DIR_PREFIX: &str = "kafka-rpc-testkit-";

/// How long a server may take to shut down cleanly before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often the supervising thread looks for a stop request or an exit.
const POLL: Duration = Duration::from_millis(20);

/// An unprivileged account a child runs as.
#[derive(Clone, Copy, Debug)]
pub(crate) struct User {
    pub uid: u32,
    pub gid: u32,
}

impl User {
    /// Looks `name` up with `id`, which goes through NSS like every other tool.
    pub fn lookup(name: &str) -> Result<User, Error> {
        let id = |flag: &str| -> Result<u32, Error> {
            let out = Command::new("id")
                .args([flag, name])
                .output()
                .map_err(|e| Error::Io(format!("cannot run `id {flag} {name}`"), e))?;
            String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|_| {
                Error::Start(format!("there is no `{name}` account to run the server as (`id {flag} {name}` failed)"))
            })
        };
        Ok(User { uid: id("-u")?, gid: id("-g")? })
    }
}

/// Whether this process runs as root, where PostgreSQL refuses to start.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A fresh directory under the system temp dir, deleted with everything in it on drop
/// (also while a failing test unwinds). One a killed process left behind is deleted by
/// the next [`TempDir::new`] of any process.
///
/// ```
/// let dir = kafka_rpc_testkit::TempDir::new("example").expect("temp dir");
/// std::fs::write(dir.path().join("log"), "…").expect("write");
/// let path = dir.path().to_owned();
/// drop(dir);
/// assert!(!path.exists());
/// ```
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/kafka-rpc-testkit-<pid>-<kind>-<n>`, first removing directories
    /// that earlier, now dead, processes left behind.
    pub fn new(kind: &str) -> Result<TempDir, Error> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_stale_dirs();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{kind}-{n}", std::process::id()));
        // A leftover from a recycled pid would hold someone else's data files.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| Error::Io(format!("cannot create {}", path.display()), e))?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory in place for as long as this process lives, for what must
    /// outlive every owner in it (a broker shared by a whole test binary); the first
    /// `TempDir::new` after the process has exited deletes it.
    pub fn keep(self) -> PathBuf {
        let path = self.path.clone();
        std::mem::forget(self);
        path
    }

    /// Hands the directory to `user`, so a server running as that user can write in it.
    pub(crate) fn give_to(&self, user: User) -> Result<(), Error> {
        std::os::unix::fs::chown(&self.path, Some(user.uid), Some(user.gid))
            .map_err(|e| Error::Io(format!("cannot give {} to uid {}", self.path.display(), user.uid), e))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes directories whose creating process no longer exists (a killed test run).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            // A server killed with its owner removed none of its shared memory. One
            // still exiting keeps its directory, which names that memory, until later.
            if crate::postgres::release_shared_memory(&entry.path()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// A server process, stopped with `stop_signal` when this is dropped.
///
/// The child is spawned and reaped by a thread of its own. That thread lives exactly
/// as long as the child, which matters twice: the parent-death signal fires when the
/// *thread* that forked the child exits (test harnesses end a thread per test), and
/// only the reaping thread can signal the pid without racing its reuse.
pub(crate) struct Supervised {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    exited: Arc<Mutex<Option<ExitStatus>>>,
    pid: u32,
}

impl Supervised {
    /// Starts `cmd` (as `user` when given), with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, user: Option<User>, stop_signal: libc::c_int, log: &Path) -> Result<Supervised, Error> {
        let what = format!("{:?}", cmd.get_program());
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|f| Ok((f.try_clone()?, f)))
            .map_err(|e| Error::Io(format!("cannot open {}", log.display()), e))?;
        cmd.stdin(Stdio::null()).stdout(out.0).stderr(out.1);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(u) = user {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(u.gid) != 0
                        || libc::setuid(u.uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // After setuid: changing credentials clears the parent-death signal.
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

        let exited: Arc<Mutex<Option<ExitStatus>>> = Arc::new(Mutex::new(None));
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<Result<u32, std::io::Error>>();
        let exited_in_thread = Arc::clone(&exited);
        let thread = std::thread::Builder::new()
            .name("testkit-server".into())
            .spawn(move || {
                let child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(child.id()));
                let status = supervise(child, &stop_rx, stop_signal);
                if let Ok(mut slot) = exited_in_thread.lock() {
                    *slot = Some(status);
                }
            })
            .map_err(|e| Error::Io("cannot start a thread to run the server".into(), e))?;
        match started_rx.recv() {
            Ok(Ok(pid)) => Ok(Supervised { stop: Some(stop_tx), thread: Some(thread), exited, pid }),
            Ok(Err(e)) => Err(Error::Io(format!("cannot run {what}"), e)),
            Err(_) => Err(Error::Start(format!("the thread running {what} ended before starting it"))),
        }
    }

    /// The child's process id (a readiness check compares it with what answers).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The child's exit status, once it has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.exited.lock().ok().and_then(|s| *s)
    }
}

/// Waits for the child to exit or for a stop request (or the owner going away), then
/// asks it to stop and kills it if it takes longer than [`SHUTDOWN_GRACE`].
fn supervise(mut child: Child, stop: &mpsc::Receiver<()>, stop_signal: libc::c_int) -> ExitStatus {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) => {}
            Err(_) => break,
        }
        match stop.recv_timeout(POLL) {
            Err(RecvTimeoutError::Timeout) => continue,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    // SAFETY: the child is not reaped yet (only this thread waits on it), so the pid is still ours.
    unsafe { libc::kill(child.id() as libc::pid_t, stop_signal) };
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(POLL);
    }
    let _ = child.kill();
    match child.wait() {
        Ok(status) => status,
        // Only possible if someone else reaped it; report it as killed.
        Err(_) => std::os::unix::process::ExitStatusExt::from_raw(libc::SIGKILL),
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls `ready` until it holds, the server exits, or `timeout` passes. A server
/// offers no event to await its readiness, so this is a poll on the condition itself.
pub(crate) fn wait_until_ready(
    name: &str,
    server: &Supervised,
    log: &Path,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = server.exited() {
            return Err(Error::Start(format!(
                "{name} exited with {status} before answering; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )));
        }
        if Instant::now() >= deadline {
            return Err(Error::Start(format!(
                "{name} did not answer within {timeout:?}; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )));
        }
        std::thread::sleep(POLL);
    }
}
