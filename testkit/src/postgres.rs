//! A throwaway PostgreSQL server.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{is_root, wait_until_ready, Supervised, TempDir, User};
use crate::{on_a_free_port, Error};

/// How long initdb plus the first start may take on a slow, shared machine.
const STARTUP: Duration = Duration::from_secs(60);

/// A PostgreSQL server with its own cluster in a temporary directory, listening on a
/// free 127.0.0.1 port, with trust authentication for the `postgres` role.
///
/// Durability is PostgreSQL's default and is set explicitly so that no environment
/// can change it under a benchmark: `fsync`, `synchronous_commit` and
/// `full_page_writes` are on. PostgreSQL refuses to run as root, so under root the
/// cluster is created with `runuser -u postgres` and the server runs as that account.
///
/// Dropping it stops the server (fast shutdown) and deletes the cluster.
pub struct TempPostgres {
    // Declared before `dir`: the server must stop before its files are deleted.
    _server: Supervised,
    port: u16,
    bin_dir: PathBuf,
    dir: TempDir,
}

/// Settings for [`TempPostgres`]; [`TempPostgres::start`] uses the defaults.
#[derive(Clone, Debug)]
pub struct TempPostgresBuilder {
    max_connections: u32,
    settings: Vec<(String, String)>,
}

impl Default for TempPostgresBuilder {
    fn default() -> Self {
        // Enough for a benchmark's pools plus pgbench's 256 clients.
        TempPostgresBuilder { max_connections: 600, settings: Vec::new() }
    }
}

impl TempPostgresBuilder {
    /// `max_connections` of the server (default 600).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// Any other server setting, passed as `-c name=value` after the defaults.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Creates the cluster, starts the server and waits until it accepts connections.
    pub fn start(self) -> Result<TempPostgres, Error> {
        on_a_free_port(|port| self.clone().start_on(port))
    }

    /// Creates the cluster, starts the server on `port` and waits until it accepts connections.
    fn start_on(self, port: u16) -> Result<TempPostgres, Error> {
        let bin_dir = find_bin_dir()?;
        let dir = TempDir::new("postgres")?;
        let user = if is_root() { Some(User::lookup("postgres")?) } else { None };
        if let Some(u) = user {
            dir.give_to(u)?;
        }
        let data = dir.path().join("data");
        let sockets = dir.path().join("sockets");
        let log = dir.path().join("postgres.log");

        // Trust on 127.0.0.1 only; -N skips initdb's own fsyncs of the template files,
        // which only matter if the machine crashed during the test.
        let mut initdb = match user {
            Some(_) => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(bin_dir.join("initdb"));
                c
            }
            None => Command::new(bin_dir.join("initdb")),
        };
        initdb.args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "-N", "-D"]).arg(&data);
        let out = initdb.output().map_err(|e| Error::Io(format!("cannot run {:?}", initdb.get_program()), e))?;
        if !out.status.success() {
            return Err(Error::Start(format!(
                "initdb failed with {}:\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        if let Err(e) = std::fs::create_dir(&sockets) {
            return Err(Error::Io(format!("cannot create {}", sockets.display()), e));
        }
        if let Some(u) = user {
            std::os::unix::fs::chown(&sockets, Some(u.uid), Some(u.gid))
                .map_err(|e| Error::Io(format!("cannot give {} to postgres", sockets.display()), e))?;
        }

        let mut cmd = Command::new(bin_dir.join("postgres"));
        cmd.arg("-D").arg(&data);
        let mut set = |name: &str, value: String| {
            cmd.arg("-c").arg(format!("{name}={value}"));
        };
        set("listen_addresses", "127.0.0.1".into());
        set("port", port.to_string());
        set("unix_socket_directories", sockets.display().to_string());
        set("max_connections", self.max_connections.to_string());
        set("fsync", "on".into());
        set("synchronous_commit", "on".into());
        set("full_page_writes", "on".into());
        // Shared memory that a killed postmaster (a killed test run takes it down with
        // SIGKILL, so it cleans nothing up) cannot leave behind: the main region an
        // anonymous mapping, gone with the processes (the default since 12, set so no
        // packager's default changes it), and dynamic shared memory files under the
        // data directory, deleted with the cluster, instead of `/dev/shm/PostgreSQL.*`
        // files nothing names afterwards. The System V segment PostgreSQL keeps anyway,
        // as an interlock, is removed with the directory (`release_shared_memory`).
        set("shared_memory_type", "mmap".into());
        set("dynamic_shared_memory_type", "mmap".into());
        for (name, value) in self.settings {
            set(&name, value);
        }
        // SIGINT is PostgreSQL's fast shutdown: disconnect clients, checkpoint, exit.
        let server = Supervised::spawn(cmd, user, libc::SIGINT, &log)?;
        let pg_isready = bin_dir.join("pg_isready");
        let port_arg = port.to_string();
        let pid_file = data.join("postmaster.pid");
        let pid = server.pid().to_string();
        // Whatever answers must be our server: another one may hold the port, ours then
        // fails to bind it and exits. Ours has said it is ready in its own pid file.
        wait_until_ready("postgres", &server, &log, STARTUP, || {
            let ours = std::fs::read_to_string(&pid_file).is_ok_and(|f| {
                let lines: Vec<&str> = f.lines().map(str::trim).collect();
                lines.first() == Some(&pid.as_str()) && lines.get(3) == Some(&port_arg.as_str()) && lines.get(7) == Some(&"ready")
            });
            ours && Command::new(&pg_isready)
                .args(["-q", "-h", "127.0.0.1", "-p", &port_arg, "-U", "postgres", "-d", "postgres"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })?;
        Ok(TempPostgres { _server: server, port, bin_dir, dir })
    }
}

impl TempPostgres {
    /// Starts a server with the default settings.
    pub fn start() -> Result<TempPostgres, Error> {
        TempPostgresBuilder::default().start()
    }

    /// Settings other than the defaults.
    pub fn builder() -> TempPostgresBuilder {
        TempPostgresBuilder::default()
    }

    /// A libpq-style connection string for the `postgres` database, as `tokio-postgres` takes it.
    pub fn connection_string(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// The port the server listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding this server's binaries, where `pgbench` and `psql` are too.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The temporary directory holding the cluster; it is gone after drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes the System V segment of the postmaster whose cluster `dir` held, if it is
/// still there: a postmaster that exits cleanly removes it (and its pid file) itself,
/// one killed leaves it, and with `shared_memory_type = mmap` too (a small segment kept
/// as an interlock against two postmasters on one data directory). Only a segment whose
/// creator is the pid file's postmaster is removed. Returns false while that postmaster
/// still runs (killed with its owner, it may not have exited yet): the directory, whose
/// pid file names the segment, is then to be kept for a later clean-up.
pub(crate) fn release_shared_memory(dir: &Path) -> bool {
    let Ok(pid_file) = std::fs::read_to_string(dir.join("data").join("postmaster.pid")) else { return true };
    let lines: Vec<&str> = pid_file.lines().collect();
    // Line 1 the postmaster's pid, line 7 the segment's key and id (see PostgreSQL's
    // `LOCK_FILE_LINE_SHMEM_KEY`).
    let Some(postmaster) = lines.first().and_then(|l| l.trim().parse::<libc::pid_t>().ok()) else { return true };
    if running(postmaster) {
        return false;
    }
    let Some(shmid) = lines.get(6).and_then(|l| l.split_whitespace().nth(1)).and_then(|id| id.parse::<libc::c_int>().ok()) else {
        return true;
    };
    // SAFETY: IPC_STAT writes into the zeroed struct it is given.
    let mut stat: libc::shmid_ds = unsafe { std::mem::zeroed() };
    if unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut stat) } != 0 || stat.shm_cpid != postmaster {
        return true;
    }
    // SAFETY: IPC_RMID takes no buffer. Backends still attached (they exit once they
    // see the postmaster gone) keep it until they detach.
    unsafe { libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut()) };
    true
}

/// Whether `pid` is a process that has not exited (a zombie has: only its parent has
/// not reaped it yet).
fn running(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks whether the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    // The state follows the parenthesised name, which may itself hold spaces.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()));
    !matches!(state, Some('Z' | 'X'))
}

/// The newest `/usr/lib/postgresql/<version>/bin` (Debian's layout), else the directory
/// of `initdb` on PATH.
fn find_bin_dir() -> Result<PathBuf, Error> {
    let complete = |d: &Path| ["initdb", "postgres", "pg_isready"].iter().all(|b| d.join(b).is_file());
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, d)| complete(d))
        .collect();
    debian.sort();
    if let Some((_, d)) = debian.pop() {
        return Ok(d);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|d| complete(d))
        .ok_or_else(|| Error::Missing("PostgreSQL (initdb, postgres, pg_isready under /usr/lib/postgresql/*/bin or on PATH)".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The port picked as free is taken (here by another test's server) before
    /// postgres binds it: that must not pass as our server being ready.
    #[test]
    fn a_port_taken_before_the_server_binds_is_not_someone_elses_server() {
        let other = TempPostgres::start().expect("PostgreSQL");
        match TempPostgres::builder().start_on(other.port()) {
            Ok(pg) => panic!("started \"our\" postgres on {}, which is the other server's port", pg.port()),
            // What `on_a_free_port` retries on.
            Err(e) => assert!(e.to_string().contains("Address already in use"), "{e}"),
        }
    }
}
