//! Server behaviour under faults the embedded broker cannot produce on its own: reply
//! produces failing or stalling, and a group membership that fails or stops waiting.
//! The broker is the embedded one behind a wrapper; the group is driven by hand.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};

use super::{Health, RpcServer, ServerError};
use crate::prelude::*;
use crate::transport::{
    AssignedPartition, Fetch, GroupEvent, GroupHandle, GroupMembership, OffsetReset, PartitionReader, ProduceError,
    Record, TopicPartition, TransportError,
};

/// The embedded broker with switches on the produce path of reply topics, and a group
/// whose events the test sends.
struct Faulty {
    inner: EmbeddedBroker,
    /// Reply produces fail as if the broker were unreachable.
    replies_down: AtomicBool,
    /// Reply produces are refused by the broker, as when the server may not write there.
    replies_forbidden: AtomicBool,
    /// Partition counts of reply topics cannot be had, as when the broker is unreachable.
    metadata_down: AtomicBool,
    /// How often a partition count was refused.
    metadata_refused: AtomicU64,
    /// Reply produces carrying a value over this many bytes are refused as a whole, as
    /// Kafka refuses a batch with MESSAGE_TOO_LARGE.
    reply_limit: std::sync::atomic::AtomicUsize,
    /// Reply produces wait while this is true.
    replies_paused: watch::Sender<bool>,
    /// Dead-letter produces (topics ending `.DLT`) wait while this is true.
    dead_letters_paused: watch::Sender<bool>,
    /// Dead-letter produces fail as if the broker were unreachable.
    dead_letters_down: AtomicBool,
    /// How many dead-letter produces were attempted.
    dead_letter_attempts: AtomicU64,
    /// The reply to this correlation id cannot be produced (the broker unreachable);
    /// a batch holding it with others is refused as a whole, so it is split and the
    /// others go through.
    unreachable_reply: Mutex<Option<&'static [u8]>>,
    /// How many reply produces still fail as if the broker were unreachable.
    reply_failures_left: AtomicU64,
    /// Produces to idempotency window topics (ending `.idempotency`) wait while this is true.
    window_paused: watch::Sender<bool>,
    /// Produces to idempotency window topics fail as if their broker were unreachable.
    window_down: AtomicBool,
    /// How many produces to idempotency window topics were attempted.
    window_attempts: AtomicU64,
    /// Opening a reader of the request topic panics, as a custom transport's bug would.
    request_reader_panics: AtomicBool,
    /// How many readers of the request topic panicked.
    request_readers_panicked: AtomicU64,
    /// Readers of the request topic opened from now on panic when they are closed, as a
    /// custom transport's might: their worker dies as it stops.
    request_readers_panic_on_close: AtomicBool,
    /// How many such readers were opened, and how many panicked closing.
    closing_readers: (AtomicU64, Arc<AtomicU64>),
    /// End look-ups never answer, as when a partition's leader hangs while the group
    /// coordinator (another broker) still takes commits.
    ends_hang: AtomicBool,
    /// End look-ups left hanging.
    ends_hung: AtomicU64,
    /// End look-ups of the request topic answered: the server's lag samples, which the
    /// commit loop takes right after a tick's commit (see `Rig::a_commit_tick_passes`).
    request_ends_asked: watch::Sender<u64>,
    membership: Mutex<Option<GroupMembership>>,
}

#[async_trait]
impl Transport for Faulty {
    async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<i32, TransportError> {
        self.inner.ensure_topic(topic, partitions).await
    }
    async fn partition_count(&self, topic: &str) -> Result<i32, TransportError> {
        if topic.ends_with(".replies") && self.metadata_down.load(Ordering::SeqCst) {
            self.metadata_refused.fetch_add(1, Ordering::SeqCst);
            return Err(TransportError::connection("broker unreachable (test)"));
        }
        self.inner.partition_count(topic).await
    }
    async fn produce(&self, topic: &str, partition: i32, records: Vec<Record>) -> Result<i64, ProduceError> {
        if topic.ends_with(".idempotency") {
            let _ = self.window_paused.subscribe().wait_for(|paused| !paused).await;
            self.window_attempts.fetch_add(1, Ordering::SeqCst);
            if self.window_down.load(Ordering::SeqCst) {
                return Err(ProduceError::new(TransportError::connection("broker unreachable (test)"), records));
            }
        }
        if topic.ends_with(".DLT") {
            self.dead_letter_attempts.fetch_add(1, Ordering::SeqCst);
            let _ = self.dead_letters_paused.subscribe().wait_for(|paused| !paused).await;
            if self.dead_letters_down.load(Ordering::SeqCst) {
                return Err(ProduceError::new(TransportError::connection("broker unreachable (test)"), records));
            }
        }
        if topic.ends_with(".replies") {
            let _ = self.replies_paused.subscribe().wait_for(|paused| !paused).await;
            if self.reply_failures_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(ProduceError::new(TransportError::connection("broker unreachable (test)"), records));
            }
            let unreachable = *self.unreachable_reply.lock().unwrap();
            if let Some(id) = unreachable {
                if records.iter().any(|r| r.header(crate::wire::names::CORRELATION_ID).is_some_and(|v| v.as_ref() == id)) {
                    let error = if records.len() > 1 { TransportError::broker("MESSAGE_TOO_LARGE (test)") } else { TransportError::connection("broker unreachable (test)") };
                    return Err(ProduceError::new(error, records));
                }
            }
            if self.replies_down.load(Ordering::SeqCst) {
                return Err(ProduceError::new(TransportError::connection("broker unreachable (test)"), records));
            }
            if self.replies_forbidden.load(Ordering::SeqCst) {
                return Err(ProduceError::new(TransportError::broker("TOPIC_AUTHORIZATION_FAILED (test)"), records));
            }
            let limit = self.reply_limit.load(Ordering::SeqCst);
            if records.iter().any(|r| r.value.as_ref().map_or(0, |v| v.len()) > limit) {
                return Err(ProduceError::new(TransportError::broker("MESSAGE_TOO_LARGE (test)"), records));
            }
        }
        self.inner.produce(topic, partition, records).await
    }
    async fn latest_offset(&self, topic: &str, partition: i32) -> Result<i64, TransportError> {
        if self.ends_hang.load(Ordering::SeqCst) {
            self.ends_hung.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        if topic == TOPIC {
            self.request_ends_asked.send_modify(|n| *n += 1);
        }
        self.inner.latest_offset(topic, partition).await
    }
    async fn reader(&self, topic: &str, partition: i32) -> Result<Box<dyn PartitionReader>, TransportError> {
        if topic == TOPIC && self.request_reader_panics.load(Ordering::SeqCst) {
            self.request_readers_panicked.fetch_add(1, Ordering::SeqCst);
            panic!("a custom transport's reader failed (test)");
        }
        let reader = self.inner.reader(topic, partition).await?;
        if topic == TOPIC && self.request_readers_panic_on_close.load(Ordering::SeqCst) {
            self.closing_readers.0.fetch_add(1, Ordering::SeqCst);
            return Ok(Box::new(PanicsOnClose(reader, self.closing_readers.1.clone())));
        }
        Ok(reader)
    }
    async fn join_group(&self, _: &str, _: &[String], _: OffsetReset) -> Result<GroupMembership, TransportError> {
        self.membership.lock().unwrap().take().ok_or(TransportError::Closed)
    }
}

/// A reader that panics when dropped, counting it in `1`.
struct PanicsOnClose(Box<dyn PartitionReader>, Arc<AtomicU64>);

#[async_trait]
impl PartitionReader for PanicsOnClose {
    async fn read(&mut self, offset: i64, max_wait: Duration) -> Result<Fetch, TransportError> {
        self.0.read(offset, max_wait).await
    }
}

impl Drop for PanicsOnClose {
    fn drop(&mut self) {
        self.1.fetch_add(1, Ordering::SeqCst);
        panic!("a custom transport's reader failed closing (test)");
    }
}

/// Records the commits the server makes; while `1` holds true, a commit waits (and
/// is counted in `2`) until it turns false; `3` counts the times the server left.
#[derive(Default)]
struct Commits(Mutex<Vec<(TopicPartition, i64)>>, watch::Sender<bool>, AtomicU64, AtomicU64);

#[async_trait]
impl GroupHandle for Commits {
    async fn commit(&self, offsets: &[(TopicPartition, i64)]) -> Result<(), TransportError> {
        if *self.1.borrow() {
            self.2.fetch_add(1, Ordering::SeqCst);
            let _ = self.1.subscribe().wait_for(|held| !held).await;
        }
        self.0.lock().unwrap().extend_from_slice(offsets);
        Ok(())
    }
    async fn leave(&self) -> Result<(), TransportError> {
        self.3.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Commits {
    fn highest(&self) -> Option<i64> {
        self.0.lock().unwrap().iter().map(|(_, o)| *o).max()
    }
}

struct Rig {
    transport: Arc<Faulty>,
    events: mpsc::Sender<GroupEvent>,
    commits: Arc<Commits>,
}

const TOPIC: &str = "jobs";

async fn rig() -> Rig {
    rig_of(1).await
}

/// The rig with `partitions` partitions of the request topic.
async fn rig_of(partitions: i32) -> Rig {
    let inner = EmbeddedBroker::new();
    inner.ensure_topic(TOPIC, partitions).await.unwrap();
    let (events, rx) = mpsc::channel(8);
    let commits = Arc::new(Commits::default());
    let membership = GroupMembership { events: rx, handle: commits.clone() };
    let transport = Arc::new(Faulty {
        inner,
        replies_down: AtomicBool::new(false),
        replies_forbidden: AtomicBool::new(false),
        metadata_down: AtomicBool::new(false),
        metadata_refused: AtomicU64::new(0),
        reply_limit: std::sync::atomic::AtomicUsize::new(usize::MAX),
        replies_paused: watch::channel(false).0,
        dead_letters_paused: watch::channel(false).0,
        dead_letters_down: AtomicBool::new(false),
        dead_letter_attempts: AtomicU64::new(0),
        unreachable_reply: Mutex::new(None),
        reply_failures_left: AtomicU64::new(0),
        window_paused: watch::channel(false).0,
        window_down: AtomicBool::new(false),
        window_attempts: AtomicU64::new(0),
        request_reader_panics: AtomicBool::new(false),
        request_readers_panicked: AtomicU64::new(0),
        request_readers_panic_on_close: AtomicBool::new(false),
        closing_readers: (AtomicU64::new(0), Arc::new(AtomicU64::new(0))),
        ends_hang: AtomicBool::new(false),
        ends_hung: AtomicU64::new(0),
        request_ends_asked: watch::channel(0).0,
        membership: Mutex::new(Some(membership)),
    });
    Rig { transport, events, commits }
}

impl Rig {
    async fn assign(&self) {
        self.assign_at(0).await
    }

    async fn assign_at(&self, offset: i64) {
        let assigned = vec![AssignedPartition { tp: TopicPartition::new(TOPIC, 0), offset }];
        self.events.send(GroupEvent::Assigned(assigned)).await.unwrap();
    }

    /// Assigns the partition, then has the broker refuse every reply while one request
    /// is served: its caller times out, and the record is settled (committed) after one
    /// run, not rewound forever. Returns the client, replies still refused.
    async fn refuse_every_reply_to_one_request(&self, runs: &AtomicU64, request: Job) -> ReplyingClient {
        self.assign().await;
        let client = ReplyingClient::builder(self.transport.clone(), TOPIC).partitions(1).timeout(Duration::from_secs(5)).start().await.unwrap();
        self.transport.replies_forbidden.store(true, Ordering::SeqCst);
        assert!(matches!(client.request(request).await, Err(RpcError::Timeout(_))));
        eventually("the record is settled", || self.commits.highest() == Some(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "run once, not rewound forever");
        client
    }

    /// A server answering `ordered_job` on the one partition, with a `KafkaWindow` on this
    /// rig's transport (so its fault switches reach the window's writes), `configure`d
    /// further; and the reply topic, created, for requests to name.
    async fn kafka_window_server(&self, ran: &Ran, configure: impl FnOnce(super::RpcServerBuilder) -> super::RpcServerBuilder) -> (RpcServer, String) {
        let replies = format!("{TOPIC}.replies");
        self.transport.inner.ensure_topic(&replies, 1).await.unwrap();
        let window = crate::server::idempotency::KafkaWindow::new(self.transport.clone(), format!("{TOPIC}.idempotency"));
        let builder = RpcServer::builder(self.transport.clone(), TOPIC).partitions(1).state(ran.clone()).handler(ordered_job).idempotency(window);
        (configure(builder).start().await.unwrap(), replies)
    }

    /// Returns once the commit loop ran a whole tick that began after the call, so a
    /// position that had moved by the call was seen by a commit: "no commit happened"
    /// is then shown by a tick that ran, not by a wait that may pass before one does.
    /// A tick commits first, then (every `LAG_EVERY` ticks) samples the lag, asking
    /// the end of the one owned partition. The first sample seen after the call may
    /// close a tick whose commit ran before it; the second closes a later tick, which
    /// began after the first sample ended.
    async fn a_commit_tick_passes(&self) {
        let mut asked = self.transport.request_ends_asked.subscribe();
        let from = *asked.borrow_and_update();
        let ticks = asked.wait_for(|n| *n >= from + 2);
        assert!(tokio::time::timeout(Duration::from_secs(20), ticks).await.is_ok(), "the commit loop stopped ticking");
    }

    /// Returns once every task of the test's runtime, which must be single-threaded
    /// (the server, its broker and its clients all run there), had nothing left to run:
    /// paused, the clock moves on only when no task can (commit ticks and all). "Nothing
    /// more happens" is then shown by what was runnable having run, not by a wait that
    /// may pass before it did; and it takes no wall time.
    async fn runs_idle(&self) {
        tokio::time::pause();
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::time::resume();
    }

    async fn client(&self) -> ReplyingClient {
        ReplyingClient::builder(self.transport.clone(), TOPIC).partitions(1).timeout(Duration::from_secs(30)).start().await.unwrap()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Job(u64);
impl Request for Job {
    const TYPE: &'static str = "job";
    type Response = u64;
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Stuck;
impl Request for Stuck {
    const TYPE: &'static str = "stuck";
    type Response = ();
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Blob(usize);
impl Request for Blob {
    const TYPE: &'static str = "blob";
    type Response = Vec<u8>;
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

async fn blob(req: Blob) -> Result<Vec<u8>, RemoteError> {
    Ok(vec![1; req.0])
}

async fn job(req: Job, _ctx: Context, State(runs): State<Arc<AtomicU64>>) -> Result<u64, RemoteError> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(req.0)
}

async fn stuck(_req: Stuck, _ctx: Context, State(runs): State<Arc<AtomicU64>>) -> Result<(), RemoteError> {
    runs.fetch_add(1, Ordering::SeqCst);
    std::future::pending().await
}

fn server(rig: &Rig, runs: &Arc<AtomicU64>) -> super::RpcServerBuilder {
    RpcServer::builder(rig.transport.clone(), TOPIC)
        .partitions(1)
        .commit_interval(Duration::from_millis(20))
        .state(runs.clone())
        .handler(job)
        .handler(stuck)
        .handler(blob)
}

/// A server whose partition worker dies unseen by any commit tick (it commits only at its
/// first): `Job(1)` is answered, then `Job(2)` is handled but its reply cannot be
/// produced, so the worker reads it again with a fresh reader, and that reader panics (a
/// custom transport's bug).
async fn a_worker_dead_after_one_answer(rig: &Rig, runs: &Arc<AtomicU64>) -> RpcServer {
    let server = server(rig, runs).commit_interval(Duration::from_secs(3600)).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    assert_eq!(client.request(Job(1)).await.unwrap(), 1);
    rig.transport.replies_down.store(true, Ordering::SeqCst);
    rig.transport.request_reader_panics.store(true, Ordering::SeqCst);
    let _unanswered = tokio::spawn(client.request(Job(2)));
    eventually("the worker's reader panics", || rig.transport.request_readers_panicked.load(Ordering::SeqCst) == 1).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    server
}

/// `stopped` reports the death of the worker of `partition` (a name like `jobs-0`).
fn assert_reports_the_dead_worker(stopped: Result<(), ServerError>, partition: &str) {
    match stopped {
        Err(ServerError::Panicked(message)) => {
            assert!(message.contains(partition) && message.contains("reader failed"), "names the partition and the panic: {message}")
        }
        other => panic!("shutdown should report the dead worker, got {other:?}"),
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unproducible_reply_is_not_committed_past_but_read_again() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    rig.transport.replies_down.store(true, Ordering::SeqCst);
    let call = tokio::spawn(client.request(Job(7)));
    // Neither the reply nor its error-reply replacement can be produced: the record is
    // read and run again instead of being skipped.
    eventually("the record is redelivered", || runs.load(Ordering::SeqCst) >= 2).await;
    assert_eq!(rig.commits.highest().unwrap_or(0), 0, "the position must not pass an unanswered record");
    assert!(server.stats().reply_failures() >= 1);
    rig.transport.replies_down.store(false, Ordering::SeqCst);
    assert_eq!(call.await.unwrap().unwrap(), 7, "answered once the broker is back");
    eventually("the answered record is committed", || rig.commits.highest() == Some(1)).await;
    server.shutdown().await.unwrap();
}

/// "A produce that fails is retried up to 5 times in all": a reply whose first two
/// produces fail reaches its caller, and the record is neither run again nor counted
/// as a reply failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_fails_twice_is_retried_not_rewound() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    rig.transport.reply_failures_left.store(2, Ordering::SeqCst);
    assert_eq!(client.request(Job(5)).await.unwrap(), 5);
    assert_eq!(rig.transport.reply_failures_left.load(Ordering::SeqCst), 0, "both failures were used");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "retried, not rewound and run again");
    assert_eq!((server.stats().reply_failures(), server.stats().replies_replaced()), (0, 0));
    eventually("the record is committed", || rig.commits.highest() == Some(1)).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_address_that_cannot_be_checked_is_not_refused() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    rig.transport.metadata_down.store(true, Ordering::SeqCst);
    let call = tokio::spawn(client.request(Job(3)));
    // Asked, then asked again after a rewind: the record was neither run nor skipped.
    eventually("the server looks the address up again", || rig.transport.metadata_refused.load(Ordering::SeqCst) >= 2).await;
    assert_eq!(server.stats().replies_refused(), 0, "a broker hiccup is not a refusal");
    assert_eq!(runs.load(Ordering::SeqCst), 0, "not run before its reply address is known good");
    assert_eq!(rig.commits.highest().unwrap_or(0), 0, "and not committed");
    rig.transport.metadata_down.store(false, Ordering::SeqCst);
    assert_eq!(call.await.unwrap().unwrap(), 3);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_the_broker_refuses_is_replaced_and_spares_its_batch() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    // Under the server's own maximum, over what this broker accepts.
    rig.transport.reply_limit.store(10_000, Ordering::SeqCst);
    let server = server(&rig, &runs).linger(Duration::from_millis(50)).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    let calls: Vec<_> = (0..9usize).map(|n| tokio::spawn(client.request(Blob(if n == 4 { 50_000 } else { 10 })))).collect();
    for (n, call) in calls.into_iter().enumerate() {
        match call.await.unwrap() {
            Err(e) if n == 4 => assert_eq!(e.code(), Some(&ErrorCode::ReplyFailed), "{e:?}"),
            Ok(v) if n != 4 => assert_eq!(v.len(), 10),
            other => panic!("request {n}: {other:?}"),
        }
    }
    assert_eq!(server.stats().replies_replaced(), 1);
    eventually("every record is committed", || rig.commits.highest() == Some(9)).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_refused_even_as_an_error_is_dropped_without_blocking_the_partition() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).start().await.unwrap();
    let client = rig.refuse_every_reply_to_one_request(&runs, Job(1)).await;
    assert_eq!((server.stats().replies_dropped(), server.stats().reply_failures()), (1, 0));
    rig.transport.replies_forbidden.store(false, Ordering::SeqCst);
    assert_eq!(client.request(Job(2)).await.unwrap(), 2, "the partition moved on");
    server.shutdown().await.unwrap();
}

// Single-threaded, for `Rig::runs_idle`.
#[tokio::test(flavor = "current_thread")]
async fn reading_pauses_while_too_many_replies_are_unacknowledged() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).max_unacknowledged(2).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    rig.transport.replies_paused.send_replace(true);
    let calls: Vec<_> = (0..10).map(|n| tokio::spawn(client.request(Job(n)))).collect();
    eventually("two records are handled", || runs.load(Ordering::SeqCst) >= 2).await;
    // The worker, stopped at the bound, has no event of its own: the runtime going idle
    // shows it did not go on.
    rig.runs_idle().await;
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the worker must stop at the bound");
    rig.transport.replies_paused.send_replace(false);
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), n as u64);
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_membership_fails_the_server_visibly() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).start().await.unwrap();
    rig.assign().await;
    assert!(matches!(server.health(), Health::Serving));
    let fatal = TransportError::group("g", "malformed assignment");
    rig.events.send(GroupEvent::Failed(fatal)).await.unwrap();
    eventually("the server reports the failure", || matches!(server.health(), Health::Failed(_))).await;
    assert!(matches!(server.shutdown().await, Err(ServerError::Transport(TransportError::Group { .. }))));
    assert!(matches!(server.shutdown().await, Err(ServerError::Transport(_))), "and keeps reporting it");
}

/// "Group failure: the server stops its workers, commits what it can, and ends": what
/// was answered after the last commit tick is committed as the server ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_membership_commits_what_was_answered() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    // Ticks far enough apart that none falls between the second answer and the failure.
    let server = server(&rig, &runs).commit_interval(Duration::from_millis(500)).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    assert_eq!(client.request(Job(1)).await.unwrap(), 1);
    eventually("a tick commits the first record", || rig.commits.highest() == Some(1)).await;
    assert_eq!(client.request(Job(2)).await.unwrap(), 2);
    rig.events.send(GroupEvent::Failed(TransportError::group("g", "fenced"))).await.unwrap();
    eventually("the server reports the failure", || matches!(server.health(), Health::Failed(_))).await;
    assert!(matches!(server.shutdown().await, Err(ServerError::Transport(_))));
    assert_eq!(rig.commits.highest(), Some(2), "the record answered since the last tick is committed as the server ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_ending_without_leave_is_an_error() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).start().await.unwrap();
    drop(rig.events);
    eventually("the server reports the failure", || matches!(server.health(), Health::Failed(ServerError::MembershipEnded))).await;
    assert!(matches!(server.shutdown().await, Err(ServerError::MembershipEnded)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_the_group_gave_up_on_commits_nothing() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).shutdown_timeout(Duration::from_secs(60)).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    assert_eq!(client.request(Job(1)).await.unwrap(), 1);
    eventually("the first record is committed", || rig.commits.highest() == Some(1)).await;
    let _stuck = tokio::spawn(client.request(Stuck));
    eventually("the stuck request runs", || runs.load(Ordering::SeqCst) == 2).await;

    let (done, acknowledged) = oneshot::channel();
    let commits_before = rig.commits.0.lock().unwrap().len();
    rig.events.send(GroupEvent::Revoked { partitions: vec![TopicPartition::new(TOPIC, 0)], done }).await.unwrap();
    eventually("the partition is given up", || server.assignment().is_empty()).await;
    // The group's rebalance timeout passes: it stops waiting.
    drop(acknowledged);
    // The loop is free again at once, not after the 60 s shutdown timeout. (Assigned
    // past both records, so the new worker has nothing to commit.)
    rig.assign_at(2).await;
    eventually("the partition is served again", || !server.assignment().is_empty()).await;
    let revoked_commits: Vec<_> = rig.commits.0.lock().unwrap()[commits_before..].to_vec();
    assert!(revoked_commits.is_empty(), "no late commit for a partition the group gave up on: {revoked_commits:?}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_refused_even_as_an_error_goes_to_the_dead_letter_topic_before_its_commit() {
    const DLT: &str = "jobs.DLT";
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).dead_letter_topic(DLT).start().await.unwrap();
    let client = rig.refuse_every_reply_to_one_request(&runs, Job(7)).await;
    let stats = server.stats();
    assert_eq!((stats.replies_dead_lettered(), stats.replies_dropped(), stats.reply_failures()), (1, 0, 0));

    // The dead letter is the request, with where it came from and why.
    let mut reader = rig.transport.inner.reader(DLT, 0).await.unwrap();
    let letters = reader.fetch(0, Duration::from_secs(5)).await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0].record;
    let mut requests = rig.transport.inner.reader(TOPIC, 0).await.unwrap();
    let request = requests.fetch(0, Duration::from_secs(5)).await.unwrap().remove(0).record;
    assert_eq!((&letter.key, &letter.value), (&request.key, &request.value));
    let header = |name: &str| letter.headers.iter().find(|h| h.key == name).map(|h| h.value.clone());
    assert_eq!(header(crate::wire::names::DLT_ORIGINAL_TOPIC).as_deref(), Some(TOPIC.as_bytes()));
    assert_eq!(header(crate::wire::names::DLT_ORIGINAL_PARTITION).as_deref(), Some(&0i32.to_be_bytes()[..]));
    assert_eq!(header(crate::wire::names::DLT_ORIGINAL_OFFSET).as_deref(), Some(&0i64.to_be_bytes()[..]));
    let why = header(crate::wire::names::DLT_EXCEPTION_MESSAGE).unwrap_or_default();
    assert!(String::from_utf8_lossy(&why).contains("TOPIC_AUTHORIZATION_FAILED"), "{why:?}");
    assert!(
        request.headers.iter().all(|h| letter.headers.iter().any(|l| l.key == h.key && l.value == h.value)),
        "the request's own headers travel with it"
    );

    rig.transport.replies_forbidden.store(false, Ordering::SeqCst);
    assert_eq!(client.request(Job(2)).await.unwrap(), 2, "the partition moved on");
    server.shutdown().await.unwrap();
}

/// "Its offset is committed only once that write is acknowledged; while the broker is
/// unreachable it is not committed": a dead letter whose write is still in flight, or
/// failed for want of a broker, holds the position; the record is read again (and, with
/// no idempotency, run again) until the write goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_not_yet_written_holds_the_commit() {
    const DLT: &str = "jobs.DLT";
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).dead_letter_topic(DLT).start().await.unwrap();
    rig.assign().await;
    // Long enough that the record, read again, is not skipped as expired.
    let client = rig.client().await;
    rig.transport.replies_forbidden.store(true, Ordering::SeqCst);
    rig.transport.dead_letters_paused.send_replace(true);
    let call = tokio::spawn(client.request(Job(7)));
    eventually("the dead letter is being written", || rig.transport.dead_letter_attempts.load(Ordering::SeqCst) == 1).await;
    rig.a_commit_tick_passes().await;
    assert_eq!(rig.commits.highest().unwrap_or(0), 0, "committed before its dead letter was written");

    // The broker goes away: the write fails, the record is read and run again.
    rig.transport.dead_letters_down.store(true, Ordering::SeqCst);
    rig.transport.dead_letters_paused.send_replace(false);
    eventually("the record is read again", || runs.load(Ordering::SeqCst) >= 2).await;
    assert_eq!(rig.commits.highest().unwrap_or(0), 0, "committed past a dead letter the broker never took");
    assert_eq!(server.stats().replies_dead_lettered(), 0);

    rig.transport.dead_letters_down.store(false, Ordering::SeqCst);
    eventually("the record is committed once its dead letter is written", || rig.commits.highest() == Some(1)).await;
    assert!(server.stats().replies_dead_lettered() >= 1);
    let letters = rig.transport.inner.reader(DLT, 0).await.unwrap().fetch(0, Duration::from_secs(5)).await.unwrap();
    assert!(!letters.is_empty(), "the dead letter is on the broker");
    assert!(!call.is_finished(), "no reply: its caller waits for its timeout");
    server.shutdown().await.unwrap();
}

/// "Lets the replies of handled records be produced, and commits. Only then is the
/// revocation acknowledged": the group hands the partition to its next owner when the
/// acknowledgement arrives, and that owner starts from the committed offset, so an
/// acknowledgement ahead of the commit would have the handled record run again there.
// Single-threaded, for `Rig::runs_idle`.
#[tokio::test(flavor = "current_thread")]
async fn a_revocation_is_acknowledged_only_after_its_reply_and_commit() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    assert_eq!(client.request(Job(1)).await.unwrap(), 1);
    eventually("the first record is committed", || rig.commits.highest() == Some(1)).await;
    rig.transport.replies_paused.send_replace(true);
    let call = tokio::spawn(client.request(Job(2)));
    eventually("the second record is handled", || runs.load(Ordering::SeqCst) == 2).await;
    rig.commits.1.send_replace(true);

    let (done, mut acknowledged) = oneshot::channel();
    rig.events.send(GroupEvent::Revoked { partitions: vec![TopicPartition::new(TOPIC, 0)], done }).await.unwrap();
    eventually("the partition is given up", || server.assignment().is_empty()).await;
    // The hand-over, waiting on the reply, has no event of its own (nor does the commit
    // loop tick meanwhile): the runtime going idle shows it did not acknowledge.
    rig.runs_idle().await;
    assert!(acknowledged.try_recv().is_err(), "acknowledged while a handled record's reply was unproduced");

    rig.transport.replies_paused.send_replace(false);
    assert_eq!(call.await.unwrap().unwrap(), 2);
    eventually("the hand-over commits", || rig.commits.2.load(Ordering::SeqCst) == 1).await;
    assert!(acknowledged.try_recv().is_err(), "acknowledged before the commit");
    rig.commits.1.send_replace(false);
    tokio::time::timeout(Duration::from_secs(10), acknowledged).await.expect("acknowledged after the commit").unwrap();
    assert_eq!(rig.commits.highest(), Some(2), "the handled record was committed before the acknowledgement");
    server.shutdown().await.unwrap();
}

/// "Waits for it (at most `shutdown_timeout`; a handler still running then is abandoned
/// and its record redelivered)": a handler that ignores its cancellation holds the
/// revocation for the shutdown timeout, no longer, and its record is not committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_ignores_revocation_is_abandoned_at_the_shutdown_timeout() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).shutdown_timeout(Duration::from_millis(300)).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    assert_eq!(client.request(Job(1)).await.unwrap(), 1);
    eventually("the first record is committed", || rig.commits.highest() == Some(1)).await;
    let _stuck = tokio::spawn(client.request(Stuck));
    eventually("the stuck request runs", || runs.load(Ordering::SeqCst) == 2).await;
    let (done, acknowledged) = oneshot::channel();
    let revoked = std::time::Instant::now();
    rig.events.send(GroupEvent::Revoked { partitions: vec![TopicPartition::new(TOPIC, 0)], done }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), acknowledged).await.expect("acknowledged after the shutdown timeout").unwrap();
    assert!(revoked.elapsed() >= Duration::from_millis(300), "acknowledged after {:?}, before the timeout", revoked.elapsed());
    assert_eq!(rig.commits.highest(), Some(1), "the abandoned record is not committed: its next owner reads it again");
    server.shutdown().await.unwrap();
}

/// A partition assigned above its high watermark (the broker lost its records) resets to
/// the log start, and the server commits that offset at once, with no record read: were
/// it to wait for one, a hand-over meanwhile would commit the stale offset, and the next
/// owner would reset again over records already handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_partition_commits_its_new_offset_before_any_record_arrives() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).start().await.unwrap();
    rig.assign_at(50).await;
    let tp = TopicPartition::new(TOPIC, 0);
    eventually("the reset offset is committed", || rig.commits.0.lock().unwrap().contains(&(tp.clone(), 0))).await;
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    server.shutdown().await.unwrap();
    assert_eq!(rig.commits.highest(), Some(0), "nothing committed the stale offset");
}

/// Jobs in the order their handler ran them.
type Ran = Arc<Mutex<Vec<u64>>>;

async fn ordered_job(req: Job, _ctx: Context, State(ran): State<Ran>) -> Result<u64, RemoteError> {
    ran.lock().unwrap().push(req.0);
    Ok(req.0)
}

/// A `Job` record as any producer writes it: a request when it names `reply_to`, an
/// event when not.
fn job_record(n: u64, reply_to: Option<&str>) -> Record {
    request_record(&Job(n), n, reply_to)
}

/// `request` as a record, correlated by `n` (`corr-{n}`).
fn request_record<R: Request>(request: &R, n: u64, reply_to: Option<&str>) -> Record {
    use crate::wire::{ReplyAddress, RequestMeta};
    let mut record = Record::new(None::<Vec<u8>>, crate::codec::ContentType::Bincode.encode(request).unwrap());
    record.headers = crate::wire::request_headers(&RequestMeta {
        request_type: Some(R::TYPE.into()),
        correlation_id: Some(bytes::Bytes::from(format!("corr-{n}"))),
        reply_to: reply_to.map(|topic| ReplyAddress { topic: topic.into(), partition: Some(0) }),
        content_type: crate::codec::ContentType::Bincode,
        ..RequestMeta::default()
    });
    record
}

/// A request whose reply address cannot be checked is read again, and so is everything
/// behind it: the record after it in the same fetch must not run first (once per
/// rewind, as it did), or the partition's order is broken while the broker hiccups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_behind_an_unchecked_reply_address_waits_for_it() {
    let rig = rig().await;
    let ran = Ran::default();
    let replies = format!("{TOPIC}.replies");
    rig.transport.inner.ensure_topic(&replies, 1).await.unwrap();
    let server = RpcServer::builder(rig.transport.clone(), TOPIC)
        .partitions(1)
        .commit_interval(Duration::from_millis(20))
        .state(ran.clone())
        .handler(ordered_job)
        .start()
        .await
        .unwrap();
    rig.transport.metadata_down.store(true, Ordering::SeqCst);
    rig.transport.inner.produce(TOPIC, 0, vec![job_record(0, Some(&replies)), job_record(1, None)]).await.unwrap();
    rig.assign().await;
    // Looked up, and looked up again after a rewind: the fetch holding both records was
    // worked through at least once.
    eventually("the server looks the address up again", || rig.transport.metadata_refused.load(Ordering::SeqCst) >= 2).await;
    assert_eq!(*ran.lock().unwrap(), Vec::<u64>::new(), "nothing behind the unchecked request may run before it");
    rig.transport.metadata_down.store(false, Ordering::SeqCst);
    eventually("both records are committed", || rig.commits.highest() == Some(2)).await;
    assert_eq!(*ran.lock().unwrap(), [0, 1], "in partition order, each once");
    server.shutdown().await.unwrap();
}

/// "The record is unanswered: its offset is not committed and the worker rewinds to it,
/// reading it — and the records after it — again", in their order. Record 1's reply is
/// produced while record 0's cannot be: the position must not pass record 0 on the
/// strength of record 1's reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_record_behind_an_unanswered_one_does_not_move_the_position() {
    let rig = rig().await;
    let ran = Ran::default();
    let replies = format!("{TOPIC}.replies");
    rig.transport.inner.ensure_topic(&replies, 1).await.unwrap();
    let server = RpcServer::builder(rig.transport.clone(), TOPIC)
        .partitions(1)
        .commit_interval(Duration::from_millis(20))
        .state(ran.clone())
        .handler(ordered_job)
        .start()
        .await
        .unwrap();
    *rig.transport.unreachable_reply.lock().unwrap() = Some(b"corr-0");
    rig.transport.inner.produce(TOPIC, 0, vec![job_record(0, Some(&replies)), job_record(1, Some(&replies))]).await.unwrap();
    rig.assign().await;
    let mut reader = rig.transport.inner.reader(&replies, 0).await.unwrap();
    assert!(!reader.fetch(0, Duration::from_secs(10)).await.unwrap().is_empty(), "record 1's reply is produced");
    eventually("both records are read again", || ran.lock().unwrap().len() >= 4).await;
    assert_eq!(rig.commits.highest().unwrap_or(0), 0, "the position passed a record whose reply was never produced");
    *rig.transport.unreachable_reply.lock().unwrap() = None;
    eventually("both records are committed", || rig.commits.highest() == Some(2)).await;
    let ran = ran.lock().unwrap().clone();
    assert!(ran.len() % 2 == 0 && ran.chunks(2).all(|c| c == [0, 1]), "read again in their order, from the unanswered one: {ran:?}");
    server.shutdown().await.unwrap();
}

/// Batches in the order their handler got them.
type Batches = Arc<Mutex<Vec<Vec<u64>>>>;

async fn job_batch(batch: crate::server::batch::Batch<Job>, State(seen): State<Batches>) -> Result<Vec<Result<u64, RemoteError>>, RemoteError> {
    seen.lock().unwrap().push(batch.requests().map(|j| j.0).collect());
    Ok(batch.requests().map(|j| Ok(j.0)).collect())
}

/// docs/handlers.md, batch handlers: "the batch settles as one unit. The committed
/// offset passes it only after every one of its replies was produced; if one cannot be
/// produced, the worker reads the batch again from its first record."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_unproduced_reply_is_not_committed_and_is_read_again_whole() {
    let rig = rig().await;
    let batches = Batches::default();
    let replies = format!("{TOPIC}.replies");
    rig.transport.inner.ensure_topic(&replies, 1).await.unwrap();
    let server = RpcServer::builder(rig.transport.clone(), TOPIC)
        .partitions(1)
        .commit_interval(Duration::from_millis(20))
        .state(batches.clone())
        .batch_handler(job_batch)
        .start()
        .await
        .unwrap();
    *rig.transport.unreachable_reply.lock().unwrap() = Some(b"corr-1");
    let records = (0..3).map(|n| job_record(n, Some(&replies))).collect();
    rig.transport.inner.produce(TOPIC, 0, records).await.unwrap();
    rig.assign().await;
    let mut reader = rig.transport.inner.reader(&replies, 0).await.unwrap();
    assert!(!reader.fetch(0, Duration::from_secs(10)).await.unwrap().is_empty(), "the batch's other replies are produced");
    eventually("the batch is read again", || batches.lock().unwrap().len() >= 2).await;
    assert_eq!(rig.commits.highest().unwrap_or(0), 0, "committed past a batch one of whose replies was never produced");
    *rig.transport.unreachable_reply.lock().unwrap() = None;
    eventually("the batch is committed", || rig.commits.highest() == Some(3)).await;
    let batches = batches.lock().unwrap().clone();
    assert!(batches.iter().all(|b| b == &[0, 1, 2]), "read again whole, from its first record: {batches:?}");
    server.shutdown().await.unwrap();
}

/// A window whose writes of one key stay undurable until the test opens a gate;
/// every other key is durable at once. Lookups answer from memory at once, as
/// `KafkaWindow` does while its broker write is in flight.
struct GatedWindow {
    window: crate::server::idempotency::MemoryWindow,
    gated_key: &'static [u8],
    gate: watch::Sender<bool>,
}

#[async_trait]
impl crate::server::idempotency::IdempotencyStore for GatedWindow {
    async fn lookup(
        &self,
        partition: &TopicPartition,
        key: &[u8],
    ) -> Result<Option<crate::server::idempotency::StoredReply>, crate::server::idempotency::StoreError> {
        self.window.lookup(partition, key).await
    }

    fn record(
        &self,
        partition: &TopicPartition,
        key: bytes::Bytes,
        reply: crate::server::idempotency::StoredReply,
    ) -> futures::future::BoxFuture<'static, Result<(), crate::server::idempotency::StoreError>> {
        use futures::FutureExt;
        let gated = key.as_ref() == self.gated_key;
        let written = self.window.record(partition, key, reply);
        let mut open = self.gate.subscribe();
        async move {
            if gated {
                let _ = open.wait_for(|open| *open).await;
            }
            written.await
        }
        .boxed()
    }
}

/// A server of `ordered_job` over a memory window whose record of `gated_key` stays
/// not durable until the returned gate opens; also what ran, and the reply topic.
async fn gated_server(rig: &Rig, gated_key: &'static [u8]) -> (RpcServer, Ran, watch::Sender<bool>, String) {
    let ran = Ran::default();
    let replies = format!("{TOPIC}.replies");
    rig.transport.inner.ensure_topic(&replies, 1).await.unwrap();
    let gate = watch::channel(false).0;
    let store = GatedWindow { window: crate::server::idempotency::MemoryWindow::new(), gated_key, gate: gate.clone() };
    let server = RpcServer::builder(rig.transport.clone(), TOPIC)
        .partitions(1)
        .commit_interval(Duration::from_millis(20))
        .state(ran.clone())
        .handler(ordered_job)
        .idempotency(store)
        .start()
        .await
        .unwrap();
    (server, ran, gate, replies)
}

/// "The request's offset is committed only after its window record is durable".
/// Record 0's reply cannot be produced, so the worker rewinds and drops the pending
/// settlements behind it — including record 1's, whose window record is not durable yet.
/// Read again, record 1 is answered from the in-memory window (a duplicate, with nothing
/// to wait for); the position must still not pass it before its outcome is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_does_not_commit_past_an_outcome_that_is_not_durable() {
    let rig = rig().await;
    let (server, ran, gate, replies) = gated_server(&rig, b"corr-1").await;
    rig.transport.replies_down.store(true, Ordering::SeqCst);
    rig.transport.inner.produce(TOPIC, 0, vec![job_record(0, Some(&replies)), job_record(1, Some(&replies))]).await.unwrap();
    rig.assign().await;
    eventually("both ran and were read again as duplicates", || server.stats().duplicates() >= 2).await;
    assert_eq!(*ran.lock().unwrap(), [0, 1], "each ran once");
    rig.transport.replies_down.store(false, Ordering::SeqCst);
    // Replies flow again: both records are answered, record 1's outcome still not durable.
    let mut reader = rig.transport.inner.reader(&replies, 0).await.unwrap();
    let (mut from, mut answered) = (0, std::collections::HashSet::new());
    while answered.len() < 2 {
        let fetched = reader.fetch(from, Duration::from_secs(10)).await.unwrap();
        assert!(!fetched.is_empty(), "both records are answered; answered {answered:?}");
        from = fetched.last().map_or(from, |r| r.offset + 1);
        answered.extend(fetched.iter().filter_map(|r| r.record.header(crate::wire::names::CORRELATION_ID).map(|v| v.to_vec())));
    }
    rig.a_commit_tick_passes().await;
    let highest = rig.commits.highest().unwrap_or(0);
    assert!(highest <= 1, "committed up to {highest}: past record 1, whose window record is not durable");
    gate.send_replace(true);
    eventually("both records are committed once durable", || rig.commits.highest() == Some(2)).await;
    server.shutdown().await.unwrap();
}

/// "The request's offset is committed only after its window record is durable": the
/// plain case, with no rewind. The reply is produced at once; the record's outcome is
/// not durable until the gate opens, and the position waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_record_is_not_committed_before_its_outcome_is_durable() {
    let rig = rig().await;
    let (server, ran, gate, replies) = gated_server(&rig, b"corr-0").await;
    rig.transport.inner.produce(TOPIC, 0, vec![job_record(0, Some(&replies))]).await.unwrap();
    rig.assign().await;
    let mut reader = rig.transport.inner.reader(&replies, 0).await.unwrap();
    assert_eq!(reader.fetch(0, Duration::from_secs(10)).await.unwrap().len(), 1, "the reply is produced");
    rig.a_commit_tick_passes().await;
    assert_eq!(rig.commits.highest().unwrap_or(0), 0, "committed before the window record was durable");
    gate.send_replace(true);
    eventually("the record is committed once durable", || rig.commits.highest() == Some(1)).await;
    assert_eq!(*ran.lock().unwrap(), [0]);
    server.shutdown().await.unwrap();
}

/// The same with `KafkaWindow`, whose record is durable once the broker acknowledged
/// its write to the window topic: while that write is held up, the position waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_window_write_not_yet_acknowledged_holds_the_commit() {
    let rig = rig().await;
    let ran = Ran::default();
    let (server, replies) = rig.kafka_window_server(&ran, |b| b.commit_interval(Duration::from_millis(20))).await;
    rig.transport.window_paused.send_replace(true);
    rig.transport.inner.produce(TOPIC, 0, vec![job_record(0, Some(&replies))]).await.unwrap();
    rig.assign().await;
    let mut reader = rig.transport.inner.reader(&replies, 0).await.unwrap();
    assert_eq!(reader.fetch(0, Duration::from_secs(10)).await.unwrap().len(), 1, "the reply is produced");
    rig.a_commit_tick_passes().await;
    assert_eq!(rig.commits.highest().unwrap_or(0), 0, "committed before the window write was acknowledged");
    rig.transport.window_paused.send_replace(false);
    eventually("the record is committed once its window write is acknowledged", || rig.commits.highest() == Some(1)).await;
    assert_eq!(*ran.lock().unwrap(), [0]);
    server.shutdown().await.unwrap();
}

/// "The request's offset is committed only after its window record is durable": also
/// when the window partition's broker is unreachable for longer than the window write's
/// produce attempts (its leader can be another broker than the reply's, so the reply
/// goes through). Such a write was given up as if refused, and the offset committed
/// without the record: after a crash or a hand-over a copy of the request ran again. It
/// is now retried while the broker is unreachable, the offset waiting, as for a reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_window_write_to_an_unreachable_broker_holds_the_commit_until_written() {
    let rig = rig().await;
    let ran = Ran::default();
    let window_topic = format!("{TOPIC}.idempotency");
    let (server, replies) = rig.kafka_window_server(&ran, |b| b.commit_interval(Duration::from_millis(20))).await;
    rig.transport.window_down.store(true, Ordering::SeqCst);
    rig.transport.inner.produce(TOPIC, 0, vec![job_record(0, Some(&replies))]).await.unwrap();
    rig.assign().await;
    let mut reader = rig.transport.inner.reader(&replies, 0).await.unwrap();
    assert_eq!(reader.fetch(0, Duration::from_secs(10)).await.unwrap().len(), 1, "the reply is produced");
    // Past the window producer's own attempts (4), and a commit tick after them.
    eventually("the window write is tried as often as its producer tries", || rig.transport.window_attempts.load(Ordering::SeqCst) >= 4).await;
    rig.a_commit_tick_passes().await;
    assert_eq!(rig.commits.highest().unwrap_or(0), 0, "committed while its window record was not written");
    rig.transport.window_down.store(false, Ordering::SeqCst);
    eventually("the record is committed once its window write is acknowledged", || rig.commits.highest() == Some(1)).await;
    assert_eq!(rig.transport.inner.latest_offset(&window_topic, 0).await.unwrap(), 1, "the window record is written");
    assert_eq!(server.stats().idempotency_failures(), 0, "a write that went through is no failure");
    assert_eq!(*ran.lock().unwrap(), [0]);
    server.shutdown().await.unwrap();
}

/// The window write retried while its broker is unreachable (above) is waited for by
/// its partition's worker only: once that worker is gone (here abandoned at the
/// shutdown timeout, its record left uncommitted), nobody waits for the write, and it
/// must not go on retrying for as long as the broker stays away, after the server stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_write_retried_for_an_unreachable_broker_stops_with_its_worker() {
    let rig = rig().await;
    let ran = Ran::default();
    let (server, replies) = rig.kafka_window_server(&ran, |b| b.shutdown_timeout(Duration::from_millis(300))).await;
    rig.transport.window_down.store(true, Ordering::SeqCst);
    rig.transport.inner.produce(TOPIC, 0, vec![job_record(0, Some(&replies))]).await.unwrap();
    rig.assign().await;
    eventually("the window write is retried", || rig.transport.window_attempts.load(Ordering::SeqCst) > 4).await;
    assert!(matches!(server.shutdown().await, Err(ServerError::ShutdownTimedOut { .. })), "the worker waits for the write");
    assert_eq!(rig.commits.highest().unwrap_or(0), 0, "not committed without its window record");
    let after = rig.transport.window_attempts.load(Ordering::SeqCst);
    // Nothing to await: what is shown is that no attempt comes. The retries pause at most
    // 2 s, after the producer's own 4 attempts (0.35 s of backoff).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(rig.transport.window_attempts.load(Ordering::SeqCst) <= after + 1, "still retried after its worker was gone");
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SlowToStop;
impl Request for SlowToStop {
    const TYPE: &'static str = "slow-to-stop";
    type Response = u64;
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

/// Runs until cancelled, then takes a while to wind down.
async fn slow_to_stop(_req: SlowToStop, ctx: Context, State(runs): State<Arc<AtomicU64>>) -> Result<u64, RemoteError> {
    runs.fetch_add(1, Ordering::SeqCst);
    ctx.cancelled().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(7)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_shutdown_returns_only_once_the_server_stopped() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = Arc::new(server(&rig, &runs).handler(slow_to_stop).start().await.unwrap());
    rig.assign().await;
    let client = rig.client().await;
    let call = tokio::spawn(client.request(SlowToStop));
    eventually("the handler runs", || runs.load(Ordering::SeqCst) == 1).await;
    let first = tokio::spawn({
        let server = server.clone();
        async move { server.shutdown().await }
    });
    eventually("the first shutdown is under way", || server.task.lock().unwrap().is_none()).await;
    // Say, a signal handler and the main task both shut the server down: whichever
    // returns first, the running request was answered and committed.
    server.shutdown().await.unwrap();
    assert!(matches!(server.health(), Health::Stopped), "returned while the server was {:?}", server.health());
    assert_eq!(rig.commits.highest(), Some(1), "returned before the answered request was committed");
    assert_eq!(call.await.unwrap().unwrap(), 7);
    first.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_membership_is_reported_while_the_workers_wind_down() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).shutdown_timeout(Duration::from_secs(60)).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    let _call = tokio::spawn(client.request(Stuck));
    eventually("the handler runs", || runs.load(Ordering::SeqCst) == 1).await;
    rig.events.send(GroupEvent::Failed(TransportError::group("g", "fenced"))).await.unwrap();
    // The stuck handler holds its worker for the shutdown timeout; the server stopped
    // serving when the membership failed, and says so at once.
    eventually("the server reports the failure", || matches!(server.health(), Health::Failed(_))).await;
}

/// A reply waiting out its partition's linger when the server is shut down is sent at
/// once, as Kafka's producer `close()` flushes: the shutdown neither waits the linger nor
/// abandons the reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_a_lingering_reply_at_once() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).linger(Duration::from_secs(3600)).shutdown_timeout(Duration::from_secs(60)).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    let call = tokio::spawn(client.request(Job(1)));
    eventually("the handler runs", || runs.load(Ordering::SeqCst) == 1).await;
    let stopped = tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await;
    assert!(matches!(stopped, Ok(Ok(()))), "shutdown waited out the linger: {stopped:?}");
    assert_eq!(call.await.unwrap().unwrap(), 1, "the lingering reply reached its caller");
    assert_eq!(rig.commits.highest(), Some(1));
}

/// A reply produce that never returns (a custom transport stuck on a dead broker)
/// holds neither the worker nor the reply queue past the shutdown timeout: shutdown
/// returns, names what it abandoned, and commits nothing past the unanswered record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_a_reply_produce_never_returns() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).shutdown_timeout(Duration::from_millis(300)).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    rig.transport.replies_paused.send_replace(true);
    let _call = tokio::spawn(client.request(Job(1)));
    eventually("the handler ran", || runs.load(Ordering::SeqCst) == 1).await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await;
    let outcome = outcome.expect("shutdown must return soon after its 300 ms timeout");
    match outcome {
        Err(ServerError::ShutdownTimedOut { timeout, abandoned }) => {
            assert_eq!(timeout, Duration::from_millis(300));
            assert_eq!(abandoned.workers, [TopicPartition::new(TOPIC, 0)], "the worker waited for its reply's ack");
            assert_eq!(abandoned.replies, [TopicPartition::new(format!("{TOPIC}.replies"), 0)]);
        }
        other => panic!("shutdown should report what it abandoned, got {other:?}"),
    }
    assert_eq!(rig.commits.highest().unwrap_or(0), 0, "the unanswered record is not committed past");
}

/// A zero shutdown timeout means "do not wait for running handlers", not "report idle
/// workers as abandoned": a worker with nothing running stops in a scheduler turn, and
/// shutdown succeeds. On one thread the workers cannot run before a deadline of now.
#[tokio::test(flavor = "current_thread")]
async fn a_zero_shutdown_timeout_abandons_no_idle_worker() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).shutdown_timeout(Duration::ZERO).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    client.request(Job(1)).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await;
    match outcome.expect("shutdown returns") {
        Ok(()) => {}
        Err(e) => panic!("an idle server has nothing to abandon, got {e:?}"),
    }
}

/// A partition worker that ends without being stopped (here a custom transport's reader
/// panics under it) leaves its partition unserved: the server fails visibly, as when its
/// membership fails, instead of reporting `Serving` while nothing reads the partition.
#[tokio::test]
async fn a_partition_worker_that_dies_fails_the_server_visibly() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).start().await.unwrap();
    rig.transport.request_reader_panics.store(true, Ordering::SeqCst);
    rig.assign().await;
    eventually("the server reports the dead worker", || matches!(server.health(), Health::Failed(_))).await;
    assert_reports_the_dead_worker(server.shutdown().await, "jobs");
    assert_eq!(rig.commits.3.load(Ordering::SeqCst), 1, "left the group, so its partitions move on at once");
}

/// A worker that dies just before its partition is revoked, before any commit tick saw
/// it: the hand-over must not pass for a clean one. The server fails with
/// `ServerError::Panicked` naming the partition, as when the tick finds the dead worker,
/// and the hand-over commits only what the worker settled, not the record it handled
/// but never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_panics_before_its_revocation_fails_the_server() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    // No commit tick after the first: only the revocation can learn of the dead worker.
    let server = a_worker_dead_after_one_answer(&rig, &runs).await;

    let (done, acknowledged) = oneshot::channel();
    rig.events.send(GroupEvent::Revoked { partitions: vec![TopicPartition::new(TOPIC, 0)], done }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), acknowledged).await.expect("the revocation is answered").unwrap();
    assert_eq!(rig.commits.highest(), Some(1), "committed past a record the dead worker never answered");
    eventually("the server reports the dead worker", || matches!(server.health(), Health::Failed(_))).await;
    assert_reports_the_dead_worker(server.shutdown().await, "jobs-0");
    assert_eq!(rig.commits.3.load(Ordering::SeqCst), 1, "left the group, so its partitions move on at once");
}

/// A worker that dies as it is stopped (its reader panics closing), when the group gives
/// up on the revocation: the second revoked partition's handler ignores its cancellation,
/// so the hand-over is still waiting when the group stops waiting. The dead worker must
/// still be reported, at once (not after the 60 s shutdown timeout), and nothing
/// committed for either partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_panics_in_a_revocation_the_group_gave_up_on_fails_the_server() {
    let rig = rig_of(2).await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).partitions(2).shutdown_timeout(Duration::from_secs(60)).start().await.unwrap();
    let (dying, stuck) = (TopicPartition::new(TOPIC, 0), TopicPartition::new(TOPIC, 1));
    rig.transport.inner.produce(TOPIC, 1, vec![request_record(&Stuck, 1, None)]).await.unwrap();
    rig.events.send(GroupEvent::Assigned(vec![AssignedPartition { tp: stuck.clone(), offset: 0 }])).await.unwrap();
    eventually("the stuck handler runs", || runs.load(Ordering::SeqCst) == 1).await;
    rig.transport.request_readers_panic_on_close.store(true, Ordering::SeqCst);
    rig.events.send(GroupEvent::Assigned(vec![AssignedPartition { tp: dying.clone(), offset: 0 }])).await.unwrap();
    eventually("the second worker reads", || rig.transport.closing_readers.0.load(Ordering::SeqCst) == 1).await;

    let (done, acknowledged) = oneshot::channel();
    rig.events.send(GroupEvent::Revoked { partitions: vec![dying, stuck], done }).await.unwrap();
    eventually("its reader panics closing", || rig.transport.closing_readers.1.load(Ordering::SeqCst) == 1).await;
    assert!(matches!(server.health(), Health::Serving), "the hand-over waits for the stuck handler");
    // The group's rebalance timeout passes: it stops waiting.
    drop(acknowledged);
    eventually("the server reports the dead worker", || matches!(server.health(), Health::Failed(_))).await;
    assert_reports_the_dead_worker(server.shutdown().await, "jobs-0");
    let commits = rig.commits.0.lock().unwrap().clone();
    assert!(commits.is_empty(), "nothing committed for partitions the group gave up on: {commits:?}");
    assert_eq!(rig.commits.3.load(Ordering::SeqCst), 1, "left the group, so its partitions move on at once");
}

/// The same death just before a shutdown (no commit tick saw it): the shutdown must not
/// report a clean stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_panics_before_a_shutdown_is_reported_by_it() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = a_worker_dead_after_one_answer(&rig, &runs).await;
    assert!(matches!(server.health(), Health::Serving), "no tick has seen the dead worker yet");
    assert_reports_the_dead_worker(server.shutdown().await, "jobs-0");
    assert_eq!(rig.commits.highest(), Some(1), "committed past a record the dead worker never answered");
}

/// The lag gauge's end look-ups share the commit tick. When they hang (a partition's
/// leader stopped answering while the coordinator still takes commits), the tick must
/// not hang with them: commits, and with them revocations, go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lag_sample_that_never_answers_does_not_stop_the_commits() {
    let rig = rig().await;
    let runs = Arc::new(AtomicU64::new(0));
    let server = server(&rig, &runs).start().await.unwrap();
    rig.assign().await;
    let client = rig.client().await;
    rig.transport.ends_hang.store(true, Ordering::SeqCst);
    client.request(Job(1)).await.unwrap();
    eventually("the first request is committed", || rig.commits.highest() == Some(1)).await;
    eventually("a lag sample hangs", || rig.transport.ends_hung.load(Ordering::SeqCst) > 0).await;
    client.request(Job(2)).await.unwrap();
    eventually("the second request is committed while lag samples hang", || rig.commits.highest() == Some(2)).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await;
}
