//! The testkit's servers start, answer, and leave nothing behind.

use std::net::TcpStream;

use kafka_rpc_testkit::{TempPostgres, TempRedis};

fn postgres() -> TempPostgres {
    TempPostgres::start().unwrap_or_else(|e| panic!("{e}"))
}

fn redis() -> TempRedis {
    TempRedis::start().unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn postgres_answers_a_query_with_durability_on_and_its_cluster_goes_away() {
    let pg = postgres();
    let dir = pg.dir().to_path_buf();
    let port = pg.port();
    let (client, conn) = tokio_postgres::connect(&pg.connection_string(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", pg.connection_string()));
    let conn = tokio::spawn(conn);
    let row = client.query_one("SELECT 40 + 2", &[]).await.expect("query");
    assert_eq!(row.get::<_, i32>(0), 42);
    for (setting, want) in [("fsync", "on"), ("synchronous_commit", "on"), ("listen_addresses", "127.0.0.1")] {
        let row = client.query_one(&format!("SHOW {setting}"), &[]).await.expect("SHOW");
        assert_eq!(row.get::<_, String>(0), want, "{setting}");
    }
    let max: String = client.query_one("SHOW max_connections", &[]).await.expect("SHOW").get(0);
    assert!(max.parse::<u32>().expect("a number") >= 300, "max_connections {max}");
    assert!(dir.join("data/PG_VERSION").is_file());
    drop(client);
    let _ = conn.await;

    drop(pg);
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "postgres still listens on {port} after drop");
}

#[tokio::test]
async fn redis_answers_ping_and_its_directory_goes_away() {
    let server = redis();
    let dir = server.dir().to_path_buf();
    let port = server.port();
    let client = redis::Client::open(server.url()).expect("url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.expect("PING");
    assert_eq!(pong, "PONG");
    let save: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("save").query_async(&mut conn).await.expect("CONFIG");
    assert_eq!(save, ["save", ""], "persistence must be off");
    drop(conn);

    drop(server);
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "redis still listens on {port} after drop");
}

#[test]
fn servers_stop_when_the_test_that_owns_them_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let joined = std::thread::spawn(move || {
        let pg = postgres();
        let redis = redis();
        let _ = tx.send((pg.dir().to_path_buf(), pg.port(), redis.dir().to_path_buf(), redis.port()));
        panic!("a failing test");
    })
    .join();
    assert!(joined.is_err(), "the thread was meant to panic");
    let (pg_dir, pg_port, redis_dir, redis_port) = rx.recv().expect("the servers started");
    assert!(!pg_dir.exists() && !redis_dir.exists(), "directories left behind");
    assert!(TcpStream::connect(("127.0.0.1", pg_port)).is_err(), "postgres outlived the panic");
    assert!(TcpStream::connect(("127.0.0.1", redis_port)).is_err(), "redis outlived the panic");
}

/// Set in the environment of the process [`a_killed_owner_leaves_no_postgres_shared_memory`]
/// starts: that process runs [`owner_of_a_postgres_that_is_killed`] for real.
const KILLED_OWNER: &str = "KAFKA_RPC_TESTKIT_KILLED_OWNER";

/// Not a test of its own: the process a test kills. Starts PostgreSQL, prints its
/// cluster directory and waits to be killed.
#[test]
#[ignore = "run by a_killed_owner_leaves_no_postgres_shared_memory"]
fn owner_of_a_postgres_that_is_killed() {
    if std::env::var_os(KILLED_OWNER).is_none() {
        return;
    }
    let pg = postgres();
    println!("cluster {}", pg.dir().display());
    // Until killed: stdin is a pipe the killing test never writes to.
    let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
}

/// A test run that is killed (SIGKILL: no destructor runs) takes its PostgreSQL down
/// with it, and the postmaster, killed too, removes none of its shared memory. Its
/// dynamic shared memory lives in files of the cluster directory, which the next
/// temporary directory of any process deletes; so is the System V segment PostgreSQL
/// keeps (56 bytes) whatever `shared_memory_type` says, as an interlock against two
/// postmasters on one data directory. Before, each killed run left both behind: a
/// `/dev/shm/PostgreSQL.*` file and a segment in `ipcs -m`.
#[test]
fn a_killed_owner_leaves_no_postgres_shared_memory() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    /// Killed on drop too, so that a failing assertion leaves no owner (nor its server) running.
    struct Owner(std::process::Child);
    impl Drop for Owner {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut owner = Owner(Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--ignored", "--exact", "owner_of_a_postgres_that_is_killed", "--nocapture", "--test-threads=1"])
        .env(KILLED_OWNER, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the owner process starts"));
    let mut lines = std::io::BufReader::new(owner.0.stdout.take().expect("piped"));
    let cluster = loop {
        let mut line = String::new();
        assert!(lines.read_line(&mut line).expect("the owner's output") > 0, "the owner ended without starting PostgreSQL");
        // The harness writes the test's name on the same line, before what it prints.
        if let Some((_, dir)) = line.trim().split_once("cluster ") {
            break std::path::PathBuf::from(dir);
        }
    };
    let data = cluster.join("data");
    let pid_file = std::fs::read_to_string(data.join("postmaster.pid")).expect("the postmaster's pid file");
    let lines: Vec<&str> = pid_file.lines().collect();
    let postmaster: libc::pid_t = lines[0].trim().parse().expect("the postmaster's pid");
    let shmid: libc::c_int = lines[6].split_whitespace().nth(1).and_then(|id| id.parse().ok()).expect("the segment's id");
    let in_cluster = std::fs::read_dir(data.join("pg_dynshmem")).map(|d| d.count()).unwrap_or(0);
    assert!(in_cluster > 0, "no dynamic shared memory in the cluster directory: it is in /dev/shm, which nothing cleans");

    owner.0.kill().expect("SIGKILL");
    owner.0.wait().expect("reaped");
    // The postmaster gets SIGKILL as its parent dies; it is not our child to wait for.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(postmaster, 0) } == 0 {
        assert!(std::time::Instant::now() < deadline, "the postmaster outlived its owner");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Not asserted here that the segment is still there: another test of this binary
    // creating a temporary directory meanwhile cleans up as the next run would.

    // What the next test run does first.
    drop(kafka_rpc_testkit::TempDir::new("after-a-kill").expect("temp dir"));
    assert!(!cluster.exists(), "{} left behind", cluster.display());
    assert!(!segment_exists(shmid), "System V segment {shmid} left behind (ipcs -m)");
}

fn segment_exists(shmid: libc::c_int) -> bool {
    // SAFETY: IPC_STAT writes into the zeroed struct it is given.
    let mut stat: libc::shmid_ds = unsafe { std::mem::zeroed() };
    unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut stat) == 0 }
}
