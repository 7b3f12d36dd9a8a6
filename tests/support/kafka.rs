//! A real Kafka-protocol broker for integration tests.
//!
//! [`bootstrap`] returns `KAFKA_BOOTSTRAP` when it is set, so the suite can run
//! against any cluster; otherwise it starts one tansu broker per test binary and
//! returns its address. The broker dies with the test process: tansu is spawned
//! from a thread that lives as long as the broker, with a parent-death signal, so
//! not even a killed test run leaves it behind.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kafka_rpc::transport::kafka::{KafkaConfig, KafkaConfigBuilder, KafkaTransport};
use kafka_rpc_testkit::KafkaProxy;

/// How long a freshly started broker may take to answer its first request.
const STARTUP: Duration = Duration::from_secs(30);

/// How to get the foreign client the group and hostile-producer tests drive.
pub const NO_PYTHON: &str = "this test needs Python 3 with confluent-kafka: run `scripts/test.sh` (it installs \
                             the module, into target/test-venv where the interpreter refuses pip), and set PYTHON to \
                             choose the interpreter";

const HOW_TO_GET_A_BROKER: &str = "\
no Kafka-protocol broker for the integration tests. Either
  - point KAFKA_BOOTSTRAP at a running cluster (host:port[,host:port...]), or
  - install tansu 0.6.0: `scripts/install-tansu.sh` prints its path; export TANSU_BIN=<that path>
    (or put `tansu` on PATH / in ~/.cargo/bin)";

/// Address of the broker the tests use: `KAFKA_BOOTSTRAP`, or a tansu started for
/// this test binary on the first call.
pub fn bootstrap() -> String {
    if let Ok(b) = std::env::var("KAFKA_BOOTSTRAP") {
        if !b.trim().is_empty() {
            return b;
        }
    }
    static BROKER: OnceLock<String> = OnceLock::new();
    BROKER.get_or_init(start_tansu).clone()
}

/// Settings for the test broker, with group timings short enough for tests.
pub fn config() -> KafkaConfigBuilder {
    with_test_timings(KafkaConfig::builder(bootstrap()))
}

fn with_test_timings(builder: KafkaConfigBuilder) -> KafkaConfigBuilder {
    builder
        .client_id("kafka-rpc-tests")
        .request_timeout(Duration::from_secs(20))
        .heartbeat_interval(Duration::from_millis(300))
        .session_timeout(Duration::from_secs(10))
        .rebalance_timeout(Duration::from_secs(20))
}

/// A transport connected to the test broker.
pub async fn transport() -> KafkaTransport {
    connect(config()).await
}

/// A transport built from `config`, failing the test with the reason when the broker
/// cannot be reached.
pub async fn connect(config: KafkaConfigBuilder) -> KafkaTransport {
    let config = config.build();
    match KafkaTransport::connect(config.clone()).await {
        Ok(t) => t,
        Err(e) => panic!("cannot connect to the test broker {:?}: {e}", config.bootstrap()),
    }
}

/// A topic (or group) name no other test or earlier run uses.
pub fn unique_topic(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The tansu executable to run, or `None` when there is none.
pub fn find_tansu() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("TANSU_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        if is_executable(&bin) {
            return Some(bin);
        }
        panic!("TANSU_BIN={} is not an executable file\n{HOW_TO_GET_A_BROKER}", bin.display());
    }
    let on_path =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).collect::<Vec<_>>()).unwrap_or_default();
    let in_cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu"));
    on_path.into_iter().chain(in_cargo).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// How many ports a broker is tried on: one picked as free can be taken by another
/// process before tansu binds it.
const PORT_ATTEMPTS: usize = 5;

fn start_tansu() -> String {
    for _ in 0..PORT_ATTEMPTS {
        let addr = format!("127.0.0.1:{}", free_port());
        if launch_tansu(&addr, &addr) {
            return addr;
        }
    }
    panic!("tansu found each of {PORT_ATTEMPTS} free ports taken before it could bind it")
}

/// A tansu broker of its own that clients reach only through a [`KafkaProxy`]: the
/// broker advertises the proxy's address, so every connection a client opens after
/// reading metadata goes through the proxy too. For tests that count broker
/// requests or lose a response on purpose. The broker dies with the test process.
pub struct ProxiedBroker {
    /// The proxy in front of the broker.
    pub proxy: KafkaProxy,
}

impl ProxiedBroker {
    /// Starts the proxy and a fresh broker behind it.
    pub fn start() -> ProxiedBroker {
        let proxy = match KafkaProxy::bind() {
            Ok(p) => p,
            Err(e) => panic!("cannot start the Kafka proxy: {e}"),
        };
        for _ in 0..PORT_ATTEMPTS {
            let listen = format!("127.0.0.1:{}", free_port());
            if launch_tansu(&listen, proxy.addr()) {
                proxy.forward_to(&listen);
                return ProxiedBroker { proxy };
            }
        }
        panic!("tansu found each of {PORT_ATTEMPTS} free ports taken before it could bind it")
    }

    /// Test settings (as [`config`]) pointing at the proxy.
    pub fn config(&self) -> KafkaConfigBuilder {
        with_test_timings(KafkaConfig::builder(self.proxy.addr()))
    }
}

/// Starts tansu listening on `addr` and advertising `advertised`, and waits until it
/// answers on `addr`. Returns false when another process had taken `addr`'s port, so
/// tansu could not bind it and exited (the caller tries another port); fails the test
/// on any other problem.
pub fn launch_tansu(addr: &str, advertised: &str) -> bool {
    let Some(bin) = find_tansu() else { panic!("{HOW_TO_GET_A_BROKER}") };
    let port = addr.rsplit(':').next().unwrap_or("0").to_string();
    // Kept while this process lives: the broker serves every test of the binary.
    let dir = match kafka_rpc_testkit::TempDir::new(&format!("tansu-{port}")) {
        Ok(dir) => dir.keep(),
        Err(e) => panic!("cannot create tansu's working directory: {e}"),
    };
    let log = dir.join("tansu.log");
    let exited: Arc<Mutex<Option<ExitStatus>>> = Arc::new(Mutex::new(None));
    let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<u32, String>>();

    let exited_in_thread = Arc::clone(&exited);
    let listener = format!("tcp://{addr}");
    let advertised = format!("tcp://{advertised}");
    let spawn_dir = dir.clone();
    let spawn_log = log.clone();
    let spawn_bin = bin.clone();
    // PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, and the
    // test harness ends its threads after each test. So the broker is spawned from
    // this thread, which then waits on it and never returns while it runs.
    let spawned = std::thread::Builder::new().name("tansu-broker".into()).spawn(move || {
        let out = std::fs::File::create(&spawn_log).and_then(|f| Ok((f.try_clone()?, f)));
        let (stdout, stderr) = match out {
            Ok(files) => files,
            Err(e) => {
                let _ = started_tx.send(Err(format!("cannot create {}: {e}", spawn_log.display())));
                return;
            }
        };
        let parent = std::process::id() as libc::pid_t;
        let mut cmd = Command::new(&spawn_bin);
        cmd.args(["broker", "--storage-engine", "memory://tansu/", "--listener-url"])
            .arg(&listener)
            .arg("--advertised-listener-url")
            .arg(&advertised)
            .current_dir(&spawn_dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
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
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = started_tx.send(Err(format!("cannot run {}: {e}", spawn_bin.display())));
                return;
            }
        };
        let _ = started_tx.send(Ok(child.id()));
        let status = child.wait();
        if let Ok(mut slot) = exited_in_thread.lock() {
            *slot = status.ok();
        }
        // The broker is gone, so returning (and firing PDEATHSIG on nothing) is fine.
    });
    if let Err(e) = spawned {
        panic!("cannot start the thread that runs tansu: {e}");
    }
    let pid = match started_rx.recv_timeout(STARTUP) {
        Ok(Ok(pid)) => pid,
        Ok(Err(e)) => panic!("{e}\n{HOW_TO_GET_A_BROKER}"),
        Err(_) => panic!("tansu did not start within {STARTUP:?}"),
    };
    let port: u16 = port.parse().unwrap_or_else(|_| panic!("no port in {addr}"));

    let deadline = Instant::now() + STARTUP;
    loop {
        // Whatever answers must be our broker: another may hold the port, ours then
        // fails to bind it and exits.
        if answers_kafka(addr) && listens_on(pid, port) {
            return true;
        }
        let status = exited.lock().ok().and_then(|s| *s);
        if let Some(status) = status {
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            if log_text.contains("Address already in use") {
                return false;
            }
            panic!(
                "tansu ({}) exited with {status} before answering on {addr}; its log:\n{}",
                bin.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if Instant::now() >= deadline {
            panic!(
                "tansu ({}) did not answer a Kafka request on {addr} within {STARTUP:?}; its log:\n{}",
                bin.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port`: tells our
/// server from another one that answers on the same port.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else { return false };
    let local = format!("0100007F:{port:04X}");
    // Fields: sl, local address, remote address, state (0A = LISTEN), ..., inode (10th).
    let sockets: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A")).then(|| f.get(9).map(|i| format!("socket:[{i}]")))?
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| sockets.iter().any(|s| t.as_os_str() == s.as_str())))
}

/// A port on 127.0.0.1 that nothing listens on now.
pub fn free_port() -> u16 {
    match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => panic!("cannot find a free port on 127.0.0.1: {e}"),
    }
}

/// Whether something at `addr` answers a Kafka ApiVersions request: a listening
/// socket alone does not mean the broker is ready.
pub fn answers_kafka(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let client_id = b"ready-check";
    let mut body = Vec::new();
    body.extend_from_slice(&18i16.to_be_bytes()); // ApiVersions
    body.extend_from_slice(&0i16.to_be_bytes()); // version 0
    body.extend_from_slice(&7i32.to_be_bytes()); // correlation id
    body.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    body.extend_from_slice(client_id);
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    if s.write_all(&frame).is_err() {
        return false;
    }
    let mut head = [0u8; 10];
    if s.read_exact(&mut head).is_err() {
        return false;
    }
    let correlation = i32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let error = i16::from_be_bytes([head[8], head[9]]);
    correlation == 7 && error == 0
}
