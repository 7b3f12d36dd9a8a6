//! Process-level fault tests on a real broker: servers run as separate OS processes
//! (this test binary started again in the server role, see [`server_process`]), and
//! each applied update is appended and fsync'd to a file outside them, one line per
//! `(key, seq, correlation id, pid)`, so that losses and duplicates are counted from
//! the outside after `kill -9`, a broker restart and hostile records from a foreign
//! producer.

mod support;
#[path = "support/raw_batches.rs"]
mod raw_batches;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_rpc::partitioner::partition_for_key;
use kafka_rpc::prelude::*;
use kafka_rpc::server::idempotency::KafkaWindow;
use kafka_rpc::transport::kafka::{KafkaConfig, KafkaTransport};
use serde::{Deserialize, Serialize};
use support::process::{temp_dir, DurableTansu, Process, TempDir};
use support::kafka::NO_PYTHON;
use support::{eventually, unique};

/// Selects the role of a re-executed test binary.
const ROLE: &str = "KAFKA_RPC_FAULTS_ROLE";
const PARTITIONS: i32 = 4;
/// Session timeout of the server processes: how long the broker keeps a killed
/// member before a restarted one can take its partitions.
const SESSION: Duration = Duration::from_secs(6);

/// The session timeout of static members: long enough for tansu 0.6.0 (see `serve`);
/// a restarted static member takes its place without waiting for it.
const STATIC_SESSION: Duration = Duration::from_secs(30);

/// One keyed update: the effect is the line `key seq correlation-id pid`.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Apply {
    key: String,
    seq: u64,
}

impl Request for Apply {
    const TYPE: &'static str = "faults.apply";
    type Response = u64;
    fn key(&self) -> Option<Vec<u8>> {
        Some(self.key.key_bytes())
    }
}

/// The external record of effects: an append-only file, each line written with one
/// `write` and fsync'd before the reply is sent, so a reply implies a durable line.
struct Effects(std::sync::Mutex<std::fs::File>);

impl Effects {
    fn append(&self, line: &str) -> std::io::Result<()> {
        let mut file = self.0.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(line.as_bytes())?;
        file.sync_data()
    }
}

fn correlation_hex(ctx: &Context) -> String {
    match ctx.correlation_id() {
        Some(id) => id.iter().map(|b| format!("{b:02x}")).collect(),
        None => "-".into(),
    }
}

async fn apply(req: Apply, ctx: Context, State(effects): State<Arc<Effects>>) -> Result<u64, RemoteError> {
    let line = format!("{} {} {} {}\n", req.key, req.seq, correlation_hex(&ctx), std::process::id());
    match tokio::task::spawn_blocking(move || effects.append(&line)).await {
        Ok(Ok(())) => Ok(req.seq),
        Ok(Err(e)) => Err(RemoteError::new("EFFECT_FAILED", e.to_string())),
        Err(e) => Err(RemoteError::new("EFFECT_FAILED", e.to_string())),
    }
}

/// The PostgreSQL record of effects: one row per application, written in the same
/// transaction as the inbox's claim of the request's idempotency key.
#[cfg(feature = "postgres")]
type Db = Arc<tokio::sync::Mutex<tokio_postgres::Client>>;

#[cfg(feature = "postgres")]
const EFFECTS_TABLE: &str = "CREATE TABLE effects (id bigserial PRIMARY KEY, key text NOT NULL, seq bigint NOT NULL, \
                             correlation text NOT NULL, pid bigint NOT NULL)";

/// The inbox pattern: claim the key, apply, complete, commit, all or nothing. A
/// redelivered request whose first run committed gets that run's reply, not a second
/// effect.
#[cfg(feature = "postgres")]
async fn apply_in_db(req: Apply, ctx: Context, State(db): State<Db>) -> Result<u64, RemoteError> {
    use kafka_rpc::server::idempotency::postgres::{Claim, Inbox, InboxError};
    let db_error = |e: tokio_postgres::Error| RemoteError::new("DB", e.to_string());
    let key = ctx.idempotency_key().ok_or_else(|| RemoteError::new("NO_KEY", "apply needs an idempotency key"))?.to_vec();
    let mut db = db.lock().await;
    let tx = db.transaction().await.map_err(db_error)?;
    let inbox = Inbox::new();
    if let Claim::Duplicate(first) = inbox.claim(&tx, &key).await.map_err(InboxError::into_remote)? {
        return first.response().map_err(InboxError::into_remote)?.ok_or_else(|| RemoteError::new("NO_RESPONSE", "the first run stored none"));
    }
    let (seq, pid) = (req.seq as i64, i64::from(std::process::id()));
    tx.execute(
        "INSERT INTO effects (key, seq, correlation, pid) VALUES ($1, $2, $3, $4)",
        &[&req.key, &seq, &correlation_hex(&ctx), &pid],
    )
    .await
    .map_err(db_error)?;
    inbox.complete(&tx, &key, &req.seq).await.map_err(InboxError::into_remote)?;
    tx.commit().await.map_err(db_error)?;
    Ok(req.seq)
}

/// Where a test reads the effects back from.
enum EffectLog {
    File(PathBuf),
    #[cfg(feature = "postgres")]
    Postgres(tokio_postgres::Client),
}

impl EffectLog {
    async fn read(&self) -> Vec<Effect> {
        match self {
            EffectLog::File(path) => read_effects(path),
            #[cfg(feature = "postgres")]
            EffectLog::Postgres(client) => client
                .query("SELECT key, seq, pid FROM effects ORDER BY id", &[])
                .await
                .unwrap_or_else(|e| panic!("reading the effects table: {e}"))
                .iter()
                .map(|row| Effect { key: row.get(0), seq: row.get::<_, i64>(1) as u64, pid: row.get::<_, i64>(2) as u32 })
                .collect(),
        }
    }
}

/// Not a test of its own: the entry point of a server process. A fault test runs this
/// binary again with `KAFKA_RPC_FAULTS_ROLE=server` and this test selected; without
/// the variable it passes at once.
///
/// The process serves [`Apply`] on `FAULTS_TOPIC` in group `FAULTS_GROUP` on the broker
/// at `KAFKA_BOOTSTRAP`, appends effects to `FAULTS_EFFECTS`, prints `FAULTS ready`,
/// then `FAULTS assigned <partitions>` whenever its assignment changes, and on SIGTERM
/// shuts down gracefully and prints `FAULTS stats ...` and `FAULTS stopped`.
#[test]
fn server_process() {
    let Ok(role) = std::env::var(ROLE) else { return };
    assert_eq!(role, "server", "unknown {ROLE}");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    std::process::exit(runtime.block_on(serve()));
}

async fn serve() -> i32 {
    // Warnings and group changes go to the process's stderr, which the test keeps in a
    // log file and shows when it fails.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,kafka_rpc::server::group=info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).try_init();
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let (topic, group, effects) = (var("FAULTS_TOPIC"), var("FAULTS_GROUP"), var("FAULTS_EFFECTS"));
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&effects).expect("open the effects file");
    let mut config = server_config(&var("KAFKA_BOOTSTRAP")).client_id(format!("faults-server-{}", std::process::id()));
    if let Some(instance) = std::env::var("FAULTS_INSTANCE").ok().filter(|i| !i.is_empty()) {
        // tansu 0.6.0 holds a static member's join and sync 3 s each and counts its
        // session from its last heartbeat before them: a 6 s session expires a static
        // member at its first heartbeat, every generation (see
        // `kill_9_a_static_member_and_start_it_again`).
        config = config.group_instance_id(instance).session_timeout(STATIC_SESSION);
    }
    let transport = support::kafka::connect(config).await;
    let mut builder = RpcServer::builder(transport.clone(), &topic);
    if std::env::var("FAULTS_DEDUP").is_ok_and(|d| d == "kafka") {
        builder = builder.idempotency(KafkaWindow::new(transport, format!("{topic}.idempotency")));
    }
    builder = builder
        .group(&group)
        .partitions(PARTITIONS)
        .commit_interval(Duration::from_millis(var("FAULTS_COMMIT_MS").parse().unwrap_or(50)))
        .shutdown_timeout(Duration::from_secs(5));
    builder = match std::env::var("FAULTS_PG").ok().filter(|pg| !pg.is_empty()) {
        #[cfg(feature = "postgres")]
        Some(pg) => {
            let (client, connection) = tokio_postgres::connect(&pg, tokio_postgres::NoTls).await.expect("connect to PostgreSQL");
            tokio::spawn(connection);
            builder.state::<Db>(Arc::new(tokio::sync::Mutex::new(client))).handler(apply_in_db)
        }
        #[cfg(not(feature = "postgres"))]
        Some(_) => panic!("FAULTS_PG needs the postgres feature"),
        None => builder.state(Arc::new(Effects(std::sync::Mutex::new(file)))).handler(apply),
    };
    let server = builder.start().await.expect("server starts");
    println!("FAULTS ready {}", std::process::id());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    let mut reported = None;
    loop {
        let now: Vec<String> = server.assignment().iter().map(|tp| tp.partition.to_string()).collect();
        if reported.as_ref() != Some(&now) {
            println!("FAULTS assigned {}", now.join(","));
            reported = Some(now);
        }
        // Polling only reports the assignment to the parent; nothing waits on it here.
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let result = server.shutdown().await;
    println!("FAULTS stats {:?}", server.stats());
    match result {
        Ok(()) => {
            println!("FAULTS stopped");
            0
        }
        Err(e) => {
            eprintln!("shutdown failed: {e}");
            1
        }
    }
}

/// Group timings short enough for a test to see a killed member expire.
fn server_config(bootstrap: &str) -> kafka_rpc::transport::kafka::KafkaConfigBuilder {
    KafkaConfig::builder(bootstrap)
        .request_timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(2))
        .heartbeat_interval(Duration::from_millis(300))
        .session_timeout(SESSION)
        .rebalance_timeout(Duration::from_secs(10))
}

/// A server process started from this test binary.
struct ServerProcess(Process);

/// How a server process is set up.
#[derive(Default, Clone)]
struct Options {
    /// Keep a [`KafkaWindow`] in `<topic>.idempotency`, committing once a second.
    dedup: bool,
    /// Join as a static member under this `group.instance.id`.
    instance: Option<String>,
    /// Apply effects in this PostgreSQL database through the inbox, not to the file.
    postgres: Option<String>,
}

impl ServerProcess {
    fn start(name: &str, bootstrap: &str, topic: &str, group: &str, effects: &Path, dir: &Path) -> ServerProcess {
        Self::start_with(name, bootstrap, topic, group, effects, dir, &Options::default())
    }

    /// Like [`start`](Self::start), with `options`.
    fn start_with(
        name: &str,
        bootstrap: &str,
        topic: &str,
        group: &str,
        effects: &Path,
        dir: &Path,
        options: &Options,
    ) -> ServerProcess {
        let dedup = options.dedup;
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => panic!("cannot find the test binary to start a server process: {e}"),
        };
        let mut cmd = Command::new(exe);
        cmd.args(["server_process", "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, "server")
            .env("KAFKA_BOOTSTRAP", bootstrap)
            .env("FAULTS_TOPIC", topic)
            .env("FAULTS_GROUP", group)
            .env("FAULTS_EFFECTS", effects)
            .env("FAULTS_DEDUP", if dedup { "kafka" } else { "off" })
            // With the window or the inbox, commits are rare so that the killed server
            // leaves a long uncommitted tail for its successor to answer from them.
            .env("FAULTS_COMMIT_MS", if dedup || options.postgres.is_some() { "1000" } else { "50" })
            .env("FAULTS_INSTANCE", options.instance.as_deref().unwrap_or(""))
            .env("FAULTS_PG", options.postgres.as_deref().unwrap_or(""))
            .env("RUST_BACKTRACE", "1");
        ServerProcess(Process::spawn(name, cmd, dir))
    }

    /// Waits until the process reports owning exactly `partitions`.
    async fn await_assignment(&mut self, partitions: &[i32], within: Duration) {
        let want: Vec<String> = partitions.iter().map(i32::to_string).collect();
        let want = format!("FAULTS assigned {}", want.join(","));
        let what = format!("the server reports `{want}`");
        self.0.await_line(&what, within, "FAULTS assigned", |l| l == want).await;
    }

    /// SIGTERM, then waits for a clean exit and returns the server's stats line.
    async fn stop(&mut self) -> String {
        self.0.signal(libc::SIGTERM);
        let status = self.0.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "server exited with {status} on SIGTERM; stderr:\n{}", self.0.log_tail());
        self.0.lines().into_iter().find(|l| l.starts_with("FAULTS stats")).unwrap_or_default()
    }
}

/// One applied effect, as read back from the file.
#[derive(Debug, Clone)]
struct Effect {
    key: String,
    seq: u64,
    pid: u32,
}

fn read_effects(path: &Path) -> Vec<Effect> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // The test polls the file while a server appends to it, and a read may see part of a
    // write in progress: a last line without its newline is not written yet. Every
    // complete line must be whole.
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    complete
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 4, "torn or malformed effect line {line:?}");
            Effect {
                key: f[0].to_string(),
                seq: f[1].parse().unwrap_or_else(|_| panic!("bad seq in {line:?}")),
                pid: f[3].parse().unwrap_or_else(|_| panic!("bad pid in {line:?}")),
            }
        })
        .collect()
}

/// Applications per `(key, seq)`, in file order, by applying process.
fn applications(effects: &[Effect]) -> BTreeMap<(String, u64), Vec<u32>> {
    let mut by = BTreeMap::<(String, u64), Vec<u32>>::new();
    for e in effects {
        by.entry((e.key.clone(), e.seq)).or_default().push(e.pid);
    }
    by
}

/// Asserts that each key's updates were first applied in the order they were sent.
fn assert_applied_in_order(effects: &[Effect]) {
    let mut seen = BTreeSet::new();
    let mut last = HashMap::<&str, &Effect>::new();
    for (line, e) in effects.iter().enumerate() {
        if !seen.insert((e.key.as_str(), e.seq)) {
            continue; // a re-application, counted as a duplicate elsewhere
        }
        if let Some(prev) = last.insert(&e.key, e) {
            assert!(
                prev.seq < e.seq,
                "key {}: seq {} first applied (line {}, pid {}) after seq {} (pid {})",
                e.key,
                e.seq,
                line + 1,
                e.pid,
                prev.seq,
                prev.pid
            );
        }
    }
}

fn client_config(bootstrap: &str, client_id: &str) -> KafkaConfig {
    server_config(bootstrap).client_id(client_id).build()
}

async fn connect(config: KafkaConfig) -> KafkaTransport {
    match KafkaTransport::connect(config).await {
        Ok(t) => t,
        Err(e) => panic!("cannot connect to the test broker: {e}"),
    }
}

/// The outcome of one call: what it returned and how long the caller waited.
struct Call {
    key: String,
    seq: u64,
    sent: Instant,
    waited: Duration,
    result: Result<u64, RpcError>,
}

fn spawn_call(client: &ReplyingClient, key: String, seq: u64) -> tokio::task::JoinHandle<Call> {
    let sent = Instant::now();
    let call = client.request(Apply { key: key.clone(), seq });
    tokio::spawn(async move {
        let result = call.await;
        Call { key, seq, sent, waited: sent.elapsed(), result }
    })
}

/// Fails the test unless every call ended with its reply or a typed error no later
/// than its deadline (plus `slack` for scheduling), and no call failed with an error
/// that is not about the outcome of the request.
fn assert_bounded(calls: &[Call], timeout: Duration, slack: Duration) {
    for c in calls {
        assert!(
            c.waited <= timeout + slack,
            "{}#{} waited {:?}, past its {timeout:?} deadline",
            c.key,
            c.seq,
            c.waited
        );
        if let Err(e) = &c.result {
            assert!(
                matches!(e, RpcError::Timeout(_) | RpcError::Remote(_) | RpcError::Transport(_)),
                "{}#{} failed with an error that says nothing about the request: {e:?}",
                c.key,
                c.seq
            );
        }
    }
}

fn summary(calls: &[Call]) -> String {
    let mut by_kind = BTreeMap::<String, usize>::new();
    for c in calls {
        let kind = match &c.result {
            Ok(_) => "ok".to_string(),
            Err(RpcError::Timeout(_)) => "timeout".to_string(),
            Err(RpcError::Remote(r)) => format!("remote:{}", r.code),
            Err(RpcError::Transport(_)) => "transport".to_string(),
            Err(e) => format!("other:{e}"),
        };
        *by_kind.entry(kind).or_default() += 1;
    }
    format!("{by_kind:?}")
}

/// `kill -9` one server process while requests stream in, start a new one in its
/// place, and count from the effects file: every reply or typed error arrives by its
/// deadline, every acknowledged update is in the file, updates of a key are first
/// applied in order, and updates run again only where at-least-once delivery allows:
/// records the killed process applied but did not commit, re-run once by its
/// successor.
///
/// tansu 0.6 keeps a killed member (without static membership) in the group until its
/// session expires; the restarted process, a new member id, gets the partitions at
/// the rebalance that follows, about one session timeout after the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_a_server_under_load_and_start_it_again() {
    let duplicates = kill_9_under_load(Options::default()).await.twice;
    eprintln!("kill -9 without deduplication: {duplicates} updates ran twice");
}

/// The same crash with a static member (`group.instance.id`), restarted under the same
/// name: it takes the killed member's place (same member id, same partitions) instead
/// of waiting as a newcomer for the old session to expire.
///
/// On tansu 0.6.0 this needs a session timeout well above the 6 s tansu holds a
/// static member in JoinGroup and SyncGroup (it refreshes a member's last contact only
/// on heartbeats, and checks expiry before refreshing): with the 6 s session of the
/// other tests the static member expired at its first heartbeat after every sync and
/// rejoined every ~6.5 s, serving a fraction of the time. Static members here use 30 s
/// (`STATIC_SESSION`); the restarted one does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_a_static_member_and_start_it_again() {
    let options = Options { instance: Some(unique("faults-static")), ..Options::default() };
    let duplicates = kill_9_under_load(options).await.twice;
    eprintln!("kill -9 of a static member: {duplicates} updates ran twice");
}

/// The same crash with the server's [`KafkaWindow`] and commits a second apart, so the
/// killed server leaves a long uncommitted tail: the restarted server reads the keys its
/// predecessor made durable before serving and answers those redeliveries from the
/// window. An update still runs again in the window's documented gap — applied after
/// its window record's produce began and killed before it was acknowledged — and what
/// runs again is still the killed process's tail on each partition.
/// The same crash with the handler applying each update through the PostgreSQL inbox
/// (`server::idempotency::postgres`): the effect and the claimed key commit in one
/// transaction, so the successor answers the killed process's uncommitted tail from
/// the inbox, and no update is applied twice.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_postgres_inbox_applies_every_update_exactly_once() {
    use kafka_rpc::server::idempotency::postgres::Inbox;
    // PostgreSQL itself does not crash here, so it may acknowledge commits before they
    // reach the disk; the test is about the server process's crash.
    let pg = kafka_rpc_testkit::TempPostgres::builder()
        .setting("synchronous_commit", "off")
        .start()
        .unwrap_or_else(|e| panic!("this test needs PostgreSQL (scripts/test.sh installs it): {e}"));
    let (client, connection) = tokio_postgres::connect(&pg.connection_string(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to the test PostgreSQL: {e}"));
    tokio::spawn(connection);
    client.batch_execute(EFFECTS_TABLE).await.unwrap_or_else(|e| panic!("create the effects table: {e}"));
    Inbox::new().create_table(&client).await.unwrap_or_else(|e| panic!("create the inbox table: {e}"));
    let options = Options { postgres: Some(pg.connection_string()), ..Options::default() };
    let run = kill_9_under_load_into(options, Some(EffectLog::Postgres(client))).await;
    assert_eq!(run.twice, 0, "with the inbox no update may be applied twice");
    // The successor ran its handler for redelivered requests too, and the inbox answered
    // them: without redeliveries this test would show nothing.
    assert!(
        run.handled_by_successor > run.applied_by_successor,
        "the restarted server handled {} requests and applied {}: no redelivery reached the inbox",
        run.handled_by_successor,
        run.applied_by_successor
    );
    eprintln!(
        "kill -9 with the PostgreSQL inbox: {} redelivered requests answered by the inbox, none applied twice",
        run.handled_by_successor - run.applied_by_successor
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_the_kafka_idempotency_window() {
    let KillRun { twice: duplicates, from_window, .. } = kill_9_under_load(Options { dedup: true, ..Options::default() }).await;
    eprintln!("kill -9 with the Kafka idempotency window: {duplicates} updates ran twice, {from_window} answered from the window");
    assert!(from_window > 0, "the restarted server answered no redelivered request from the window");
}

/// Runs the kill -9 scenario and returns how many updates ran twice and how many
/// redelivered requests the restarted server answered from its idempotency window.
async fn kill_9_under_load(options: Options) -> KillRun {
    kill_9_under_load_into(options, None).await
}

/// What a kill -9 run counted.
struct KillRun {
    /// Updates applied twice.
    twice: usize,
    /// Redelivered requests the successor answered from its idempotency window.
    from_window: u64,
    /// Handler runs in the successor, and effects it applied (read by the PostgreSQL test).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    handled_by_successor: u64,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    applied_by_successor: u64,
}

/// [`kill_9_under_load`], reading effects from `log` when given (else the file).
async fn kill_9_under_load_into(options: Options, log: Option<EffectLog>) -> KillRun {
    const KEYS: u64 = 16;
    const TOTAL: u64 = 2_400;
    const TIMEOUT: Duration = Duration::from_secs(20);
    let bootstrap = support::kafka::bootstrap();
    let dir = temp_dir("faults-kill");
    let effects = dir.path().join("effects.log");
    let log = log.unwrap_or_else(|| EffectLog::File(effects.clone()));
    let (topic, group) = (unique("faults-kill"), unique("faults-kill-group"));
    let transport = connect(client_config(&bootstrap, "faults-client")).await;
    transport.ensure_topic(&topic, PARTITIONS).await.expect("create the request topic");
    let all: Vec<i32> = (0..PARTITIONS).collect();

    let mut first = ServerProcess::start_with("server-1", &bootstrap, &topic, &group, &effects, dir.path(), &options);
    first.await_assignment(&all, Duration::from_secs(60)).await;
    let killed_pid = first.0.pid();
    let client = ReplyingClient::builder(transport.clone(), &topic)
        .partitions(PARTITIONS)
        .timeout(TIMEOUT)
        .start()
        .await
        .expect("client starts");

    // A steady stream (about 400 requests/s) in its own task, so the kill lands mid-stream.
    let load_client = client.clone();
    let load = tokio::spawn(async move {
        let mut calls = Vec::new();
        for i in 0..TOTAL {
            calls.push(spawn_call(&load_client, format!("k{}", i % KEYS), i / KEYS));
            if i % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        calls
    });
    let quarter_by = Instant::now() + Duration::from_secs(60);
    while (log.read().await.len() as u64) < TOTAL / 4 {
        assert!(
            Instant::now() < quarter_by,
            "the first server applied {} updates in 60 s; its stderr:\n{}",
            log.read().await.len(),
            first.0.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = first.0.kill9();
    let killed_at = Instant::now();
    eprintln!("killed server-1 (pid {killed_pid}, {status}) after {} effects", log.read().await.len());
    let mut second = ServerProcess::start_with("server-2", &bootstrap, &topic, &group, &effects, dir.path(), &options);
    second.await_assignment(&all, Duration::from_secs(60)).await;
    let takeover = killed_at.elapsed();

    let mut calls = Vec::new();
    for call in load.await.expect("load task") {
        calls.push(call.await.expect("call task"));
    }
    assert_bounded(&calls, TIMEOUT, Duration::from_secs(3));
    let first_summary = summary(&calls);
    // The successor owned every partition long before any deadline, so every call
    // waiting over the crash is owed its reply, not a timeout.
    let timed_out = calls.iter().filter(|c| matches!(c.result, Err(RpcError::Timeout(_)))).count();
    assert!(
        takeover > TIMEOUT / 2 || timed_out == 0,
        "{timed_out} calls timed out although the restarted server owned every partition {takeover:?} after the \
         kill, well within their {TIMEOUT:?}: {first_summary}; restarted server's stderr:\n{}",
        second.0.log_tail()
    );

    // The restarted server serves: one more update per key, all answered.
    let mut after = Vec::new();
    for k in 0..KEYS {
        after.push(spawn_call(&client, format!("k{k}"), TOTAL / KEYS + k));
    }
    for call in after {
        let call = call.await.expect("call task");
        if let Err(e) = &call.result {
            panic!("{}#{} after the restart failed: {e}", call.key, call.seq);
        }
        calls.push(call);
    }
    client.shutdown().await;
    if std::env::var_os("FAULTS_SHOW_LOGS").is_some() {
        eprintln!("server-1 stderr:\n{}\nserver-2 stderr:\n{}", first.0.log_tail(), second.0.log_tail());
    }
    let stats = second.stop().await;

    let effects = log.read().await;
    let applied = applications(&effects);
    let acknowledged: Vec<&Call> = calls.iter().filter(|c| c.result.is_ok()).collect();
    for c in &acknowledged {
        assert!(applied.contains_key(&(c.key.clone(), c.seq)), "{}#{} was acknowledged but its effect is missing", c.key, c.seq);
    }
    assert_applied_in_order(&effects);
    let duplicates: Vec<(&(String, u64), &Vec<u32>)> = applied.iter().filter(|(_, pids)| pids.len() > 1).collect();
    eprintln!(
        "kill -9: takeover by the restarted server after {takeover:?}; calls {first_summary}; {} effects, {} distinct, \
         {} applied twice; restarted server {stats}",
        effects.len(),
        applied.len(),
        duplicates.len()
    );
    assert_only_the_uncommitted_tail_ran_again(&effects, killed_pid);
    let stat = |name: &str| -> u64 {
        stats
            .split(&format!("{name}: "))
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    KillRun {
        twice: duplicates.len(),
        from_window: stat("duplicates"),
        handled_by_successor: stat("handled"),
        applied_by_successor: effects.iter().filter(|e| e.pid != killed_pid).count() as u64,
    }
}

/// At-least-once, exactly: an update runs twice only when the killed process applied it
/// after the last offset it committed, and then once more, by its successor. On each
/// partition the duplicated updates are therefore the *last* ones the killed process
/// applied there, with nothing it applied later left out.
fn assert_only_the_uncommitted_tail_ran_again(effects: &[Effect], killed_pid: u32) {
    let applied = applications(effects);
    for ((key, seq), pids) in &applied {
        assert!(
            pids.len() == 1 || (pids.len() == 2 && pids[0] == killed_pid && pids[1] != killed_pid),
            "{key}#{seq} applied by {pids:?}: more than the one re-run after the crash of {killed_pid}"
        );
    }
    let mut by_partition = BTreeMap::<i32, Vec<(String, u64)>>::new();
    let mut seen = BTreeSet::new();
    for e in effects.iter().filter(|e| e.pid == killed_pid) {
        if seen.insert((e.key.clone(), e.seq)) {
            let p = partition_for_key(e.key.as_bytes(), PARTITIONS);
            by_partition.entry(p).or_default().push((e.key.clone(), e.seq));
        }
    }
    for (p, order) in by_partition {
        let twice = order.iter().filter(|k| applied[*k].len() > 1).count();
        let tail = &order[order.len() - twice..];
        assert!(
            tail.iter().all(|k| applied[k].len() > 1),
            "partition {p}: the {twice} updates run again are not the last ones the killed process applied there"
        );
    }
}

/// A server process owning both partitions of a fresh two-partition topic on
/// `broker`, and a client of it in this process.
struct Served {
    topic: String,
    /// Holds the effects file and the server's log.
    _dir: TempDir,
    effects: PathBuf,
    transport: KafkaTransport,
    server: ServerProcess,
    client: ReplyingClient,
}

async fn serve_two_partitions(broker: &DurableTansu, name: &str, timeout: Duration) -> Served {
    let bootstrap = broker.addr();
    let dir = temp_dir(name);
    let effects = dir.path().join("effects.log");
    let (topic, group) = (unique(name), unique(&format!("{name}-group")));
    let transport = connect(client_config(&bootstrap, "faults-client")).await;
    transport.ensure_topic(&topic, 2).await.expect("create the request topic");
    let mut server = ServerProcess::start("server", &bootstrap, &topic, &group, &effects, dir.path());
    server.await_assignment(&[0, 1], Duration::from_secs(60)).await;
    let client = ReplyingClient::builder(transport.clone(), &topic)
        .partitions(2)
        .timeout(timeout)
        .start()
        .await
        .expect("client starts");
    Served { topic, _dir: dir, effects, transport, server, client }
}

/// Kill the broker (tansu on `sqlite://`, so its data survives) under load and start
/// it again: the server process and the client recover without restarting, calls
/// pending while it is down end by their deadline, and the time from the broker
/// answering again to the first successful reply is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_the_broker_under_load() {
    // Down longer than a call's timeout, so calls pending over the outage must end by
    // their deadline rather than wait for the broker.
    const TIMEOUT: Duration = Duration::from_secs(3);
    const DOWN: Duration = Duration::from_secs(5);
    let mut broker = DurableTansu::start();
    let Served { effects, mut server, client, _dir, .. } = serve_two_partitions(&broker, "faults-broker", TIMEOUT).await;
    let warm = spawn_call(&client, "warm".into(), 0).await.expect("call task");
    assert!(warm.result.is_ok(), "no reply before the broker restart: {:?}", warm.result.err());

    // About 100 requests/s until told to stop.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load_client = client.clone();
    let load = tokio::spawn(async move {
        let mut calls = Vec::new();
        let mut seq = 1;
        while !*stop_rx.borrow() {
            calls.push(spawn_call(&load_client, format!("k{}", seq % 8), seq));
            seq += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        calls
    });
    eventually("the load is answered before the restart", Duration::from_secs(30), || {
        let n = read_effects(&effects).len();
        async move { n >= 100 }
    })
    .await;
    broker.kill9();
    let killed_at = Instant::now();
    // The outage itself: the broker stays down this long.
    tokio::time::sleep(DOWN).await;
    let back_at = broker.restart();
    let restart_took = back_at - killed_at;

    // Recovery: rounds of one call per load key (so every partition is asked) until a
    // whole round is answered; the first answered call marks the first reply.
    let recovery_deadline = back_at + Duration::from_secs(90);
    let (mut first_reply, mut recovered_at) = (None, None);
    let mut seq = 1_000_000;
    while Instant::now() < recovery_deadline {
        let round: Vec<_> = (0..8)
            .map(|k| {
                seq += 1;
                spawn_call(&client, format!("k{k}"), seq)
            })
            .collect();
        let mut answered = 0;
        for call in round {
            let call = call.await.expect("call task");
            if call.result.is_ok() {
                answered += 1;
                let at = call.sent + call.waited;
                first_reply = Some(first_reply.map_or(at, |f: Instant| f.min(at)));
            }
        }
        if answered == 8 {
            recovered_at = Some(Instant::now());
            break;
        }
    }
    let Some(recovered_at) = recovered_at else {
        panic!("calls still fail 90 s after the broker came back; server stderr:\n{}", server.0.log_tail())
    };
    let first_reply = first_reply.map_or(Duration::ZERO, |f| f - back_at);
    let recovery = recovered_at - back_at;
    // Keep the load on a little longer: everything sent after recovery is answered.
    // (A window of load, not a wait for something to happen.)
    let steady_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let mut calls = Vec::new();
    for call in load.await.expect("load task") {
        calls.push(call.await.expect("call task"));
    }
    assert_bounded(&calls, TIMEOUT, Duration::from_secs(3));
    let failed_after: Vec<String> = calls
        .iter()
        .filter(|c| c.sent >= steady_from && c.result.is_err())
        .map(|c| format!("{}#{}: {:?}", c.key, c.seq, c.result.as_ref().err()))
        .collect();
    let server_pid = server.0.pid();
    assert!(server.0.exited().is_none(), "the server process died with the broker; stderr:\n{}", server.0.log_tail());
    let answered_by: BTreeSet<u32> = read_effects(&effects).iter().map(|e| e.pid).collect();
    assert_eq!(answered_by, BTreeSet::from([server_pid]), "one server process served before and after");
    eprintln!(
        "broker restart: down {restart_took:?} (tansu answering again {DOWN:?} + start); after it answered, first reply in \
         {first_reply:?}, every partition answering in {recovery:?}; calls {}",
        summary(&calls)
    );
    assert!(failed_after.is_empty(), "calls sent after recovery failed: {failed_after:?}");
    let timed_out = calls.iter().filter(|c| matches!(c.result, Err(RpcError::Timeout(_)))).count();
    assert!(timed_out > 0, "no call timed out although the broker was down longer than the timeout");
    client.shutdown().await;
    let stats = server.stop().await;
    eprintln!("broker restart: server {stats}");
}

/// Restart a `memory://` tansu on the same port: every record and committed offset is
/// gone, so the client's reply position and the server's read positions are above
/// the new high watermark. Without restarting, both reset per their offset-reset
/// policy (earliest), each with one warn line per partition, and calls made after
/// the topics are back are answered. Before the restart the client's pinned reply
/// partition is filled well past anything the recovery rounds write, so a reply tail
/// that did not reset would miss every reply after the restart and the calls would
/// time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_lost_its_data_is_read_from_its_new_start() {
    const TIMEOUT: Duration = Duration::from_secs(3);
    const BEFORE: u64 = 200;
    const ROUNDS: u64 = 10;
    let mut broker = DurableTansu::start_in_memory();
    let Served { topic, transport, mut server, client, _dir, .. } = serve_two_partitions(&broker, "faults-lost", TIMEOUT).await;
    let calls: Vec<_> = (0..BEFORE).map(|seq| spawn_call(&client, format!("k{}", seq % 8), seq)).collect();
    for call in calls {
        let call = call.await.expect("call task");
        assert!(call.result.is_ok(), "{}#{} before the restart: {:?}", call.key, call.seq, call.result.err());
    }

    broker.kill9();
    let back_at = broker.restart();
    // tansu does not create topics on demand; whoever restores the broker does.
    for t in [topic.clone(), format!("{topic}.replies")] {
        eventually("the topics are created again", Duration::from_secs(30), || {
            let (transport, t) = (transport.clone(), t.clone());
            async move { transport.ensure_topic(&t, 2).await.is_ok() }
        })
        .await;
    }

    // Rounds of one call per key until a whole round is answered. The rounds write at
    // most ROUNDS * 8 replies, fewer than the BEFORE the reply tail had read.
    let mut recovered = None;
    let mut seq = BEFORE;
    for _ in 0..ROUNDS {
        let round: Vec<_> = (0..8)
            .map(|k| {
                seq += 1;
                spawn_call(&client, format!("k{k}"), seq)
            })
            .collect();
        let mut answered = 0;
        for call in round {
            if call.await.expect("call task").result.is_ok() {
                answered += 1;
            }
        }
        if answered == 8 {
            recovered = Some(back_at.elapsed());
            break;
        }
    }
    let Some(recovered) = recovered else {
        panic!(
            "calls still fail after {ROUNDS} rounds once the broker lost its data; client stats {:?}; server stderr:\n{}",
            client.stats(),
            server.0.log_tail()
        )
    };
    assert!(server.0.exited().is_none(), "the server process died with the broker's data; stderr:\n{}", server.0.log_tail());
    // One reset line per partition at most: a reset that loops would log on every fetch.
    let resets = server.0.log_tail().matches("above the high watermark").count();
    assert!(resets <= 2, "the server logged {resets} high-watermark resets for 2 partitions:\n{}", server.0.log_tail());
    eprintln!("broker lost its data: every key answered again {recovered:?} after the broker came back; server resets logged: {resets}");
    client.shutdown().await;
    server.stop().await;
}

/// A Kafka reader that skipped a stretch of offsets holding nothing readable (here an
/// unreadable batch) starts after it when asked to read from inside it. When the broker
/// loses its data, the reader's offset is out of range and its owner jumps back to the
/// new log's start; the records the new log holds at those offsets are readable, and
/// must be read, not passed as the old log's stretch was (a server would commit past
/// requests it never saw).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_reads_the_new_log_where_the_lost_one_was_unreadable() {
    use kafka_rpc::transport::{Record, TransportError};
    const WAIT: Duration = Duration::from_secs(30);
    let mut broker = DurableTansu::start_in_memory();
    let transport = connect(client_config(&broker.addr(), "faults-skip")).await;
    let topic = unique("faults-skip");
    let value = |v: &str| Record::new(None::<Vec<u8>>, v.to_string());
    transport.ensure_topic(&topic, 1).await.expect("create the topic");
    transport.produce(&topic, 0, vec![value("a")]).await.expect("produce");
    raw_batches::produce(&broker.addr(), &topic, 0, raw_batches::bad_checksum(&["x", "y"])).expect("append a bad batch");
    let mut reader = transport.reader(&topic, 0).await.expect("reader");
    let mut offset = 0;
    while offset < 3 {
        offset = reader.read(offset, Duration::from_millis(200)).await.expect("read the old log").next_offset;
    }

    broker.kill9();
    broker.restart();
    eventually("the topic is created again", WAIT, || async { transport.ensure_topic(&topic, 1).await.is_ok() }).await;
    eventually("a record is produced to the new log", WAIT, || async { transport.produce(&topic, 0, vec![value("p")]).await.is_ok() }).await;
    // The jump: the old position is past the new log's end.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match reader.read(3, Duration::from_millis(200)).await {
            Err(TransportError::OffsetOutOfRange { earliest: 0, latest: 1, .. }) => break,
            other => assert!(tokio::time::Instant::now() < deadline, "read past the new log's end: {other:?}"),
        }
    }
    let first = reader.read(0, Duration::from_millis(200)).await.expect("read the new log");
    assert_eq!(first.records.iter().map(|r| r.offset).collect::<Vec<_>>(), [0]);
    for v in ["q", "r"] {
        transport.produce(&topic, 0, vec![value(v)]).await.expect("produce");
    }
    let (mut offset, mut read) = (first.next_offset, Vec::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    while offset < 3 {
        assert!(tokio::time::Instant::now() < deadline, "read to 3 in {WAIT:?}; at {offset}");
        let fetch = reader.read(offset, Duration::from_millis(200)).await.expect("read the new log");
        read.extend(fetch.records.iter().map(|r| (r.offset, r.record.value.clone())));
        offset = fetch.next_offset;
    }
    let want: Vec<_> = [(1, "q"), (2, "r")].iter().map(|(o, v)| (*o, Some(bytes::Bytes::from(*v)))).collect();
    assert_eq!(read, want, "the new log's records where the lost log's unreadable batch was");
}

/// The foreign producer's report (see `tests/support/hostile_producer.py`).
#[derive(Deserialize, Debug)]
struct HostileReport {
    kinds: Vec<String>,
    good: usize,
    answered_ok: usize,
    answered_error: BTreeMap<String, String>,
    missing: Vec<String>,
    error_codes: Vec<String>,
    error_missing: Vec<String>,
    unexpected_replies: usize,
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}


/// Records a server can read but must not trust, from a foreign producer
/// (librdkafka), each followed on its partition by a well-formed request: reply-topic
/// injection, huge and garbage headers, undecodable payloads. The server process keeps
/// serving, answers every well-formed request, answers every undecodable one with
/// `BAD_REQUEST`, neither runs a request naming a foreign reply topic nor writes
/// anything there, and shuts down cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_headers_and_payloads_from_a_foreign_producer() {
    hostile("headers").await;
}

/// Records a server may be unable to read, from a foreign producer, each in a batch of
/// its own and followed on its partition by a well-formed request: extreme timestamps
/// (negative, 2^62 and i64::MAX ms, which rskafka cannot turn into a date) and a
/// record larger than the server's fetch size. The partition moves past them and
/// every well-formed request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_records_from_a_foreign_producer() {
    hostile("unreadable").await;
}

async fn hostile(family: &str) {
    let bootstrap = support::kafka::bootstrap();
    let dir = temp_dir("faults-hostile");
    let effects = dir.path().join("effects.log");
    let (topic, group) = (unique(&format!("faults-{family}")), unique("faults-hostile-group"));
    let (replies, victim) = (format!("{topic}.replies"), unique("user-profiles"));
    let transport = connect(client_config(&bootstrap, "faults-client")).await;
    transport.ensure_topic(&topic, PARTITIONS).await.expect("create the request topic");
    transport.ensure_topic(&replies, 1).await.expect("create the reply topic");
    transport.ensure_topic(&victim, 1).await.expect("create the victim topic");
    let mut server = ServerProcess::start("server", &bootstrap, &topic, &group, &effects, dir.path());
    server.await_assignment(&(0..PARTITIONS).collect::<Vec<_>>(), Duration::from_secs(60)).await;

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/hostile_producer.py");
    let output = tokio::process::Command::new(python())
        .arg(&script)
        .args([&bootstrap, &topic, &replies, &victim, &PARTITIONS.to_string(), "45", family])
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run Python ({e}): {NO_PYTHON}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("No module named 'confluent_kafka'") {
        panic!("Python module confluent-kafka is missing: {NO_PYTHON}");
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: HostileReport = match stdout.lines().last().map(serde_json::from_str) {
        Some(Ok(r)) => r,
        _ => panic!("the foreign producer failed ({}):\n{stdout}\n{stderr}", output.status),
    };
    eprintln!("{family}: {report:?}; {} replies to hostile records", report.unexpected_replies);

    assert!(server.0.exited().is_none(), "the server process died; stderr:\n{}", server.0.log_tail());
    assert!(
        report.missing.is_empty(),
        "{family}: {} of {} well-formed requests after hostile records were not answered: {:?}; server stderr:\n{}",
        report.missing.len(),
        report.good,
        report.missing,
        server.0.log_tail()
    );
    assert!(report.answered_error.is_empty(), "well-formed requests got errors: {:?}", report.answered_error);
    assert_eq!(report.answered_ok, report.good);
    assert!(report.error_missing.is_empty(), "undecodable requests got no error reply: {:?}", report.error_missing);
    assert!(report.error_codes.iter().all(|c| c == "BAD_REQUEST"), "undecodable requests got {:?}", report.error_codes);

    // Stopping flushes every reply the server still had to send, so an empty victim
    // topic after it means nothing was or will be written there.
    let stats = server.stop().await;
    eprintln!("{family}: server {stats}; hostile kinds {:?}", report.kinds);
    let injected: Vec<Effect> = read_effects(&effects).into_iter().filter(|e| e.key.starts_with("inject-")).collect();
    assert!(injected.is_empty(), "requests naming a foreign reply topic were run: {injected:?}");
    let written = transport.latest_offset(&victim, 0).await.expect("victim offsets");
    assert_eq!(written, 0, "the server wrote {written} record(s) into {victim}, a topic named by a request");
}
