//! Deduplication by idempotency key, on every transport: a request delivered again gets
//! the first reply and its handler runs once — across a restart with the Kafka window.

mod support;
#[path = "support/growing.rs"]
mod growing;
use growing::Growing;
#[path = "support/rewrite.rs"]
mod rewrite;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_rpc::partitioner::partition_for_key;
use kafka_rpc::prelude::*;
use kafka_rpc::server::batch::Batch;
use futures::future::BoxFuture;
use kafka_rpc::server::idempotency::{
    IdempotencyStore, KafkaWindow, MemoryWindow, StoreError, StoredReply, KEY_HEADER, STORE_UNAVAILABLE,
};
use kafka_rpc::server::RpcServerBuilder;
use kafka_rpc::transport::{ConsumedRecord, Record, TopicPartition, TransportError};
use kafka_rpc::__private::wire::{self, ReplyAddress, RequestMeta};
use serde::{Deserialize, Serialize};
use support::{unique, Env};

/// Adds to an account; the reply is the running total, so a second run answers differently.
#[derive(Serialize, Deserialize, Debug, Clone, Request)]
#[request(type = "test.deposit", response = u64, key = account)]
struct Deposit {
    account: String,
    cents: u64,
}

/// [`Deposit`] for a batch handler: one call runs every deposit of a batch.
#[derive(Serialize, Deserialize, Debug, Clone, Request)]
#[request(type = "test.batch-deposit", response = u64, key = account)]
struct BatchDeposit {
    account: String,
    cents: u64,
}

/// Always refuses, counting its runs.
#[derive(Serialize, Deserialize, Debug, Clone, Request)]
#[request(type = "test.withdraw", response = u64, key = account)]
struct Withdraw {
    account: String,
}

/// Takes from an account, counting its runs; the reply is the running total.
#[derive(Serialize, Deserialize, Debug, Clone, Request)]
#[request(type = "test.refund", response = u64, key = account)]
struct Refund {
    account: String,
    cents: u64,
}

async fn refund(req: Refund, _ctx: Context, State(ledger): State<Arc<Ledger>>) -> Result<u64, RemoteError> {
    ledger.runs.fetch_add(1, Ordering::SeqCst);
    Ok(ledger.total.fetch_sub(req.cents, Ordering::SeqCst) - req.cents)
}

/// Answers with `bytes` bytes, or fails with a message that long; counts its runs.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Export {
    bytes: usize,
    fail: bool,
}
impl Request for Export {
    const TYPE: &'static str = "test.export";
    type Response = Vec<u8>;
    fn key(&self) -> Option<Vec<u8>> {
        Some(b"acct-1".to_vec())
    }
}

async fn export(req: Export, _ctx: Context, State(ledger): State<Arc<Ledger>>) -> Result<Vec<u8>, RemoteError> {
    ledger.runs.fetch_add(1, Ordering::SeqCst);
    match req.fail {
        true => Err(RemoteError::new("EXPORT_FAILED", "x".repeat(req.bytes))),
        false => Ok(vec![7; req.bytes]),
    }
}

/// A memory window noting the largest reply it was asked to keep.
#[derive(Default)]
struct Sizes {
    window: MemoryWindow,
    largest: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl IdempotencyStore for Sizes {
    async fn lookup(&self, partition: &TopicPartition, key: &[u8]) -> Result<Option<StoredReply>, StoreError> {
        self.window.lookup(partition, key).await
    }
    fn record(&self, partition: &TopicPartition, key: Bytes, reply: StoredReply) -> BoxFuture<'static, Result<(), StoreError>> {
        self.largest.fetch_max(reply.size(), Ordering::SeqCst);
        self.window.record(partition, key, reply)
    }
}

/// "Memory: at most `capacity` replies per partition": what a window keeps for a key is
/// the reply its caller got, bounded as replies are. It kept the handler's own outcome
/// instead — a response over `max_reply_bytes`, answered `REPLY_TOO_LARGE`, or an error
/// message answered cut to 1 KiB — whole, for `max_age` (and a `KafkaWindow` record that
/// large is past a broker's record limit). Duplicates still get what the first caller got.
async fn a_window_keeps_the_reply_as_sent_not_the_oversized_outcome(env: Env) {
    let topic = unique("dedup-as-sent");
    let ledger = Arc::new(Ledger::default());
    let store = Arc::new(Sizes::default());
    let server =
        env.server(&topic).state(ledger.clone()).handler(export).max_reply_bytes(10_000).idempotency(store.clone()).start().await.unwrap();
    let client = env.client(&topic).start().await.unwrap();
    for (fail, code) in [(false, ErrorCode::ReplyTooLarge), (true, ErrorCode::Custom("EXPORT_FAILED".into()))] {
        let key = RequestOptions::new().idempotency_key(format!("export-{fail}"));
        for attempt in 0..2 {
            let err = client.request_with(Export { bytes: 100_000, fail }, key.clone()).await.unwrap_err();
            assert_eq!(err.code(), Some(&code), "attempt {attempt}: {err:?}");
            assert!(err.to_string().len() < 2_000, "the caller gets a bounded error");
        }
    }
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 2, "each key ran once, its answer replayed");
    let largest = store.largest.load(Ordering::SeqCst);
    assert!(largest < 2_000, "the window was asked to keep {largest} bytes for an answer of under 2,000");
    client.shutdown().await;
    server.shutdown().await.unwrap();
}

/// Panics when `panic`, else never finishes; counts its runs.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Misbehave {
    panic: bool,
}
impl Request for Misbehave {
    const TYPE: &'static str = "test.misbehave";
    type Response = u64;
    fn key(&self) -> Option<Vec<u8>> {
        Some(b"acct-1".to_vec())
    }
}

async fn misbehave(req: Misbehave, _ctx: Context, State(ledger): State<Arc<Ledger>>) -> Result<u64, RemoteError> {
    ledger.runs.fetch_add(1, Ordering::SeqCst);
    if req.panic {
        panic!("misbehaved");
    }
    std::future::pending().await
}

#[derive(Default)]
struct Ledger {
    total: AtomicU64,
    runs: AtomicU64,
}

async fn deposit(req: Deposit, _ctx: Context, State(ledger): State<Arc<Ledger>>) -> Result<u64, RemoteError> {
    ledger.runs.fetch_add(1, Ordering::SeqCst);
    Ok(ledger.total.fetch_add(req.cents, Ordering::SeqCst) + req.cents)
}

async fn withdraw(_req: Withdraw, _ctx: Context, State(ledger): State<Arc<Ledger>>) -> Result<u64, RemoteError> {
    ledger.runs.fetch_add(1, Ordering::SeqCst);
    Err(RemoteError::new("INSUFFICIENT_FUNDS", "balance too low"))
}

async fn batch_deposit(batch: Batch<BatchDeposit>, State(ledger): State<Arc<Ledger>>) -> Result<Vec<Result<u64, RemoteError>>, RemoteError> {
    Ok(batch
        .requests()
        .map(|req| {
            ledger.runs.fetch_add(1, Ordering::SeqCst);
            Ok(ledger.total.fetch_add(req.cents, Ordering::SeqCst) + req.cents)
        })
        .collect())
}

fn server(env: &Env, topic: &str, ledger: &Arc<Ledger>) -> RpcServerBuilder {
    env.server(topic).state(ledger.clone()).handler(deposit).handler(withdraw)
}

/// A request record as any producer would write it, with a fixed correlation id, so
/// producing it twice is exactly what a redelivery or a producer retry looks like.
fn deposit_record(replies: &str, correlation_id: &'static [u8], cents: u64) -> Record {
    typed_record(Deposit { account: "acct-1".into(), cents }, replies, correlation_id)
}

fn typed_record<R: Request>(request: R, replies: &str, correlation_id: &'static [u8]) -> Record {
    let mut record = Record::new(request.key(), ContentType::Bincode.encode(&request).unwrap());
    record.headers = wire::request_headers(&RequestMeta {
        request_type: Some(R::TYPE.into()),
        correlation_id: Some(Bytes::from_static(correlation_id)),
        reply_to: Some(ReplyAddress { topic: replies.into(), partition: Some(0) }),
        content_type: ContentType::Bincode,
        deadline_ms: None,
        ..RequestMeta::default()
    });
    record
}

fn request_partition() -> i32 {
    partition_for_key(&"acct-1".to_string().key_bytes(), 4)
}

/// Reads `count` replies from partition 0 of `replies`, starting at `from`.
async fn read_replies(env: &Env, replies: &str, from: i64, count: usize) -> Vec<ConsumedRecord> {
    let mut reader = env.transport.reader(replies, 0).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    let mut offset = from;
    while got.len() < count {
        assert!(tokio::time::Instant::now() < deadline, "only {} of {count} replies within 30 s", got.len());
        for r in reader.fetch(offset, Duration::from_millis(200)).await.unwrap() {
            offset = r.offset + 1;
            got.push(r);
        }
    }
    got
}

fn total_in(reply: &ConsumedRecord) -> u64 {
    assert_eq!(wire::decode_reply(&reply.record).error, None, "expected a successful reply");
    ContentType::Bincode.decode(reply.record.value.as_deref().unwrap_or_default()).unwrap()
}

/// The request topic's reply topic (the only one the server's reply policy allows by
/// default), with one partition, and where its replies will start.
async fn reply_topic(env: &Env, topic: &str) -> (String, i64) {
    let replies = format!("{topic}.replies");
    env.transport.ensure_topic(&replies, 1).await.unwrap();
    let start = env.transport.latest_offset(&replies, 0).await.unwrap();
    (replies, start)
}

// ---- cases ---------------------------------------------------------------

/// The same record appended twice (a producer retry, or a redelivery): one run, and
/// both copies are answered with the first reply.
async fn a_redelivered_record_runs_its_handler_once(env: Env) {
    let topic = unique("dedup-twice");
    let ledger = Arc::new(Ledger::default());
    let server = server(&env, &topic, &ledger).idempotency(MemoryWindow::new()).start().await.unwrap();
    let (replies, start) = reply_topic(&env, &topic).await;
    let record = deposit_record(&replies, b"corr-1", 500);
    env.transport.produce(&topic, request_partition(), vec![record.clone(), record.clone()]).await.unwrap();
    // And once more later, on its own.
    let got = read_replies(&env, &replies, start, 2).await;
    env.transport.produce(&topic, request_partition(), vec![record]).await.unwrap();
    let got: Vec<_> = got.into_iter().chain(read_replies(&env, &replies, start + 2, 1).await).collect();

    assert_eq!(ledger.runs.load(Ordering::SeqCst), 1, "the handler must run once");
    for reply in &got {
        assert_eq!(total_in(reply), 500, "every copy gets the first reply");
        assert_eq!(wire::reply_correlation_id(&reply.record).unwrap().as_ref(), b"corr-1");
    }
    let stats = server.stats();
    assert_eq!((stats.handled(), stats.duplicates()), (1, 2));
    server.shutdown().await.unwrap();
}

/// "The reply is in the window as soon as the handler returns, before the next record
/// of the partition is read": with the Kafka window too, whose record is durable only
/// once the broker acknowledged it, a copy right behind the first (same fetch) is
/// answered, not run.
async fn a_copy_right_behind_is_caught_by_the_kafka_window(env: Env) {
    let topic = unique("dedup-kafka-twice");
    let ledger = Arc::new(Ledger::default());
    let window = KafkaWindow::new(env.transport.clone(), format!("{topic}.idempotency"));
    let server = server(&env, &topic, &ledger).idempotency(window).start().await.unwrap();
    let (replies, start) = reply_topic(&env, &topic).await;
    let record = deposit_record(&replies, b"corr-1", 500);
    env.transport.produce(&topic, request_partition(), vec![record.clone(), record.clone(), record]).await.unwrap();
    let got = read_replies(&env, &replies, start, 3).await;
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 1, "the handler must run once");
    assert!(got.iter().all(|r| total_in(r) == 500), "every copy gets the first reply");
    assert_eq!(server.stats().duplicates(), 2);
    server.shutdown().await.unwrap();
}

/// The same, for a batch handler: both copies land in one batch, and the second must
/// not run beside the first before the first's outcome is in the window.
async fn a_redelivered_record_runs_its_batch_handler_once(env: Env) {
    let topic = unique("dedup-batch");
    let ledger = Arc::new(Ledger::default());
    let server = env.server(&topic).state(ledger.clone()).batch_handler(batch_deposit).idempotency(MemoryWindow::new()).start().await.unwrap();
    let (replies, start) = reply_topic(&env, &topic).await;
    let record = typed_record(BatchDeposit { account: "acct-1".into(), cents: 500 }, &replies, b"corr-1");
    env.transport.produce(&topic, request_partition(), vec![record.clone(), record]).await.unwrap();
    let got = read_replies(&env, &replies, start, 2).await;

    let totals: Vec<u64> = got.iter().map(total_in).collect();
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 1, "the handler must run once; replies {totals:?}");
    assert_eq!(totals, [500, 500], "both copies get the first reply");
    server.shutdown().await.unwrap();
}

/// The control: without idempotency the same two records run twice. Shows the case
/// above can fail.
async fn without_idempotency_a_redelivered_record_runs_twice(env: Env) {
    let topic = unique("dedup-off");
    let ledger = Arc::new(Ledger::default());
    let server = server(&env, &topic, &ledger).start().await.unwrap();
    let (replies, start) = reply_topic(&env, &topic).await;
    let record = deposit_record(&replies, b"corr-1", 500);
    env.transport.produce(&topic, request_partition(), vec![record.clone(), record]).await.unwrap();
    let got = read_replies(&env, &replies, start, 2).await;
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 2);
    assert_eq!((total_in(&got[0]), total_in(&got[1])), (500, 1000));
    server.shutdown().await.unwrap();
}

/// A new server instance with a new `KafkaWindow` on the same topic still answers a key
/// the old instance handled, without running it.
async fn a_restarted_server_still_knows_the_keys_of_the_kafka_window(env: Env) {
    let topic = unique("dedup-restart");
    let window = format!("{topic}.idempotency");
    let ledger = Arc::new(Ledger::default());
    let (replies, start) = reply_topic(&env, &topic).await;

    let first = server(&env, &topic, &ledger).idempotency(KafkaWindow::new(env.transport.clone(), &window)).start().await.unwrap();
    let record = deposit_record(&replies, b"corr-restart", 700);
    env.transport.produce(&topic, request_partition(), vec![record.clone()]).await.unwrap();
    let before = read_replies(&env, &replies, start, 1).await;
    first.shutdown().await.unwrap();
    drop(first);

    // The request comes again while no server runs: what a crash before the commit
    // (redelivery) or a producer retry leaves for the next instance.
    env.transport.produce(&topic, request_partition(), vec![record]).await.unwrap();
    let second = server(&env, &topic, &ledger).idempotency(KafkaWindow::new(env.transport.clone(), &window)).start().await.unwrap();
    let after = read_replies(&env, &replies, start + 1, 1).await;

    assert_eq!(ledger.runs.load(Ordering::SeqCst), 1, "the restarted server must not run it again");
    assert_eq!((total_in(&before[0]), total_in(&after[0])), (700, 700));
    assert_eq!(second.stats().duplicates(), 1);
    // And it keeps deduplicating what it handles itself.
    env.transport.produce(&topic, request_partition(), vec![deposit_record(&replies, b"corr-new", 1)]).await.unwrap();
    env.transport.produce(&topic, request_partition(), vec![deposit_record(&replies, b"corr-new", 1)]).await.unwrap();
    let fresh = read_replies(&env, &replies, start + 2, 2).await;
    assert_eq!((total_in(&fresh[0]), total_in(&fresh[1])), (701, 701));
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 2);
    second.shutdown().await.unwrap();
}

/// The memory window is not restart-safe: the same scenario runs the request again.
async fn a_memory_window_forgets_on_restart(env: Env) {
    let topic = unique("dedup-forget");
    let ledger = Arc::new(Ledger::default());
    let (replies, start) = reply_topic(&env, &topic).await;
    let first = server(&env, &topic, &ledger).idempotency(MemoryWindow::new()).start().await.unwrap();
    let record = deposit_record(&replies, b"corr-mem", 300);
    env.transport.produce(&topic, request_partition(), vec![record.clone()]).await.unwrap();
    read_replies(&env, &replies, start, 1).await;
    first.shutdown().await.unwrap();
    env.transport.produce(&topic, request_partition(), vec![record]).await.unwrap();
    let second = server(&env, &topic, &ledger).idempotency(MemoryWindow::new()).start().await.unwrap();
    let after = read_replies(&env, &replies, start + 1, 1).await;
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 2);
    assert_eq!(total_in(&after[0]), 600);
    second.shutdown().await.unwrap();
}

/// Client retries carry new correlation ids; an idempotency key makes them one
/// operation. Errors are replayed too: the handler that refused is not asked again.
async fn calls_with_one_idempotency_key_get_the_first_reply(env: Env) {
    let topic = unique("dedup-key");
    let ledger = Arc::new(Ledger::default());
    let server = server(&env, &topic, &ledger).idempotency(MemoryWindow::new()).start().await.unwrap();
    let client = env.client(&topic).start().await.unwrap();
    let once = RequestOptions::new().idempotency_key("deposit-1");
    let first = client.request_with(Deposit { account: "acct-1".into(), cents: 100 }, once.clone()).await.unwrap();
    let retried = client.request_with(Deposit { account: "acct-1".into(), cents: 100 }, once).await.unwrap();
    assert_eq!((first, retried), (100, 100));
    // Another key is another operation.
    let other = client.request_with(Deposit { account: "acct-1".into(), cents: 100 }, RequestOptions::new().idempotency_key("deposit-2"));
    assert_eq!(other.await.unwrap(), 200);

    let refused = RequestOptions::new().idempotency_key("withdraw-1");
    for _ in 0..2 {
        let err = client.request_with(Withdraw { account: "acct-1".into() }, refused.clone()).await.unwrap_err();
        assert_eq!(err.code(), Some(&ErrorCode::Custom("INSUFFICIENT_FUNDS".into())), "{err:?}");
    }
    // The stored bytes are bincode: a JSON caller reusing the key is told, not sent bytes it cannot read.
    let json = env.client(&topic).content_type(ContentType::Json).start().await.unwrap();
    let err = json.request_with(Deposit { account: "acct-1".into(), cents: 100 }, RequestOptions::new().idempotency_key("deposit-1")).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::BadRequest), "{err:?}");
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 3, "deposit-1 once, deposit-2 once, withdraw-1 once");
    assert_eq!(server.stats().duplicates(), 3);
    server.shutdown().await.unwrap();
}

/// The window is bounded: a key pushed out by newer ones runs again.
async fn a_key_pushed_out_of_the_window_runs_again(env: Env) {
    let topic = unique("dedup-evict");
    let ledger = Arc::new(Ledger::default());
    let server = server(&env, &topic, &ledger).idempotency(MemoryWindow::new().capacity(1)).start().await.unwrap();
    let client = env.client(&topic).start().await.unwrap();
    let call = |key: &'static str| client.request_with(Deposit { account: "acct-1".into(), cents: 1 }, RequestOptions::new().idempotency_key(key));
    assert_eq!(call("a").await.unwrap(), 1);
    assert_eq!(call("a").await.unwrap(), 1, "still in the window");
    assert_eq!(call("b").await.unwrap(), 2);
    assert_eq!(call("a").await.unwrap(), 3, "pushed out by b: runs again");
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 3);
    server.shutdown().await.unwrap();
}

/// A key longer than the bound is refused unrun rather than kept in memory.
async fn an_oversized_key_is_refused_unrun(env: Env) {
    let topic = unique("dedup-long");
    let ledger = Arc::new(Ledger::default());
    let server = server(&env, &topic, &ledger).idempotency(MemoryWindow::new()).start().await.unwrap();
    let client = env.client(&topic).start().await.unwrap();
    let long = vec![b'k'; kafka_rpc::server::idempotency::MAX_KEY_LEN + 1];
    let err = client
        .request_with(Deposit { account: "acct-1".into(), cents: 1 }, RequestOptions::new().idempotency_key(long))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::BadRequest), "{err:?}");
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 0);
    assert_eq!(server.stats().bad_request(), 1, "counted like every BAD_REQUEST the server answers");
    server.shutdown().await.unwrap();
}

/// Two different requests, each forwarded with its predecessor's headers (Spring's
/// `ReplyingKafkaTemplate` *appends* its `kafka_correlationId`, and Spring reads the
/// last one). The server answers each under its last id, as Spring does; deduplication
/// must use that same id, or the second deposit is taken for a copy of the first.
async fn dedup_uses_the_correlation_id_the_reply_is_sent_under(env: Env) {
    let topic = unique("dedup-two-ids");
    let ledger = Arc::new(Ledger::default());
    let server = server(&env, &topic, &ledger).idempotency(MemoryWindow::new()).start().await.unwrap();
    let (replies, start) = reply_topic(&env, &topic).await;
    let forwarded = |own: &'static [u8], cents| {
        let mut record = deposit_record(&replies, own, cents);
        // The inherited id first, the request's own appended after it.
        let inherited = kafka_rpc::transport::Header { key: kafka_rpc::wire::names::CORRELATION_ID.into(), value: Bytes::from_static(b"upstream-id") };
        record.headers.insert(0, inherited);
        record
    };
    env.transport.produce(&topic, request_partition(), vec![forwarded(b"call-1", 500), forwarded(b"call-2", 1000)]).await.unwrap();
    let got = read_replies(&env, &replies, start, 2).await;
    let ids: Vec<_> = got.iter().map(|r| wire::reply_correlation_id(&r.record).unwrap().clone()).collect();
    assert_eq!(ids, [&b"call-1"[..], &b"call-2"[..]], "each answered under its own (last) id");
    let totals: Vec<u64> = got.iter().map(total_in).collect();
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 2, "two distinct requests must both run; call-2 got {}", totals[1]);
    assert_eq!(totals, [500, 1500]);
    server.shutdown().await.unwrap();
}

/// After `max_age` a key is a new request and runs again (documented); that
/// second run must then be in the window like any first run, so its own retry is
/// answered, not run a third time. Both windows share the memory window's insert.
async fn a_key_that_aged_out_and_ran_again_is_deduplicated_again(env: Env) {
    for kafka in [false, true] {
        let topic = unique("dedup-age");
        let ledger = Arc::new(Ledger::default());
        let age = Duration::from_millis(500);
        let builder = server(&env, &topic, &ledger);
        let builder = if kafka {
            builder.idempotency(KafkaWindow::new(env.transport.clone(), format!("{topic}.idempotency")).max_age(age))
        } else {
            builder.idempotency(MemoryWindow::new().max_age(age))
        };
        let server = builder.start().await.unwrap();
        let client = env.client(&topic).start().await.unwrap();
        let call = || client.request_with(Deposit { account: "acct-1".into(), cents: 1 }, RequestOptions::new().idempotency_key("k"));
        assert_eq!(call().await.unwrap(), 1);
        // Asked again until aged out: a retry before then is answered from the window, and
        // one sent 300 ms past `age` is a new request.
        let aged_by = tokio::time::Instant::now() + age + Duration::from_millis(300);
        loop {
            let sent = tokio::time::Instant::now();
            match call().await.unwrap() {
                2 => break,
                n => assert_eq!(n, 1, "a retry within max_age is answered from the window"),
            }
            assert!(sent < aged_by, "aged out: a new request, runs again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(call().await.unwrap(), 2, "kafka window: {kafka}: the retry of the second run must get its reply, not run a third time");
        assert_eq!(ledger.runs.load(Ordering::SeqCst), 2);
        client.shutdown().await;
        server.shutdown().await.unwrap();
    }
}

/// "Errors are replayed too, including HANDLER_PANICKED and HANDLER_TIMEOUT: the handler
/// may have had an effect before it failed": a retry under the same key gets the same
/// code and the handler is not run again.
async fn a_panic_and_a_timeout_are_replayed_not_run_again(env: Env) {
    let topic = unique("dedup-failures");
    let ledger = Arc::new(Ledger::default());
    let server = env
        .server(&topic)
        .state(ledger.clone())
        .handler(misbehave)
        .handler_timeout(Duration::from_millis(200))
        .idempotency(MemoryWindow::new())
        .start()
        .await
        .unwrap();
    let client = env.client(&topic).timeout(Duration::from_secs(20)).start().await.unwrap();
    for (panic, code, key) in [(true, ErrorCode::HandlerPanicked, "panics"), (false, ErrorCode::HandlerTimeout, "hangs")] {
        let runs = ledger.runs.load(Ordering::SeqCst);
        for attempt in 0..2 {
            let err = client.request_with(Misbehave { panic }, RequestOptions::new().idempotency_key(key)).await.unwrap_err();
            assert_eq!(err.code(), Some(&code), "attempt {attempt}: {err:?}");
        }
        assert_eq!(ledger.runs.load(Ordering::SeqCst), runs + 1, "{key}: run once, its failure replayed");
    }
    assert_eq!(server.stats().duplicates(), 2);
    server.shutdown().await.unwrap();
}

/// A memory window whose loads and lookups fail while the switches say so, counting
/// the attempts.
#[derive(Default)]
struct Flaky {
    window: MemoryWindow,
    load_fails: AtomicBool,
    loads: AtomicU64,
    lookup_fails: AtomicBool,
}

#[async_trait::async_trait]
impl IdempotencyStore for Flaky {
    async fn load(&self, partition: &TopicPartition) -> Result<(), StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if self.load_fails.load(Ordering::SeqCst) {
            return Err(StoreError::Transport(TransportError::connection("window unreadable (test)")));
        }
        self.window.load(partition).await
    }
    async fn lookup(&self, partition: &TopicPartition, key: &[u8]) -> Result<Option<StoredReply>, StoreError> {
        if self.lookup_fails.load(Ordering::SeqCst) {
            return Err(StoreError::Transport(TransportError::connection("store unreachable (test)")));
        }
        self.window.lookup(partition, key).await
    }
    fn record(&self, partition: &TopicPartition, key: Bytes, reply: StoredReply) -> BoxFuture<'static, Result<(), StoreError>> {
        self.window.record(partition, key, reply)
    }
}

/// "A store lookup that fails answers the request with IDEMPOTENCY_STORE_UNAVAILABLE
/// without running it, and is counted in idempotency_failures"; the same key sent again
/// once the store answers runs (nothing was recorded for it).
async fn a_failed_lookup_is_answered_unrun_and_not_recorded(env: Env) {
    let topic = unique("dedup-store-down");
    let ledger = Arc::new(Ledger::default());
    let store = Arc::new(Flaky::default());
    store.lookup_fails.store(true, Ordering::SeqCst);
    let server = server(&env, &topic, &ledger).idempotency(store.clone()).start().await.unwrap();
    let client = env.client(&topic).start().await.unwrap();
    let once = RequestOptions::new().idempotency_key("deposit-1");
    let err = client.request_with(Deposit { account: "acct-1".into(), cents: 100 }, once.clone()).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::Custom(STORE_UNAVAILABLE.into())), "{err:?}");
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 0, "not run while the store cannot tell");
    assert_eq!(server.stats().idempotency_failures(), 1);
    store.lookup_fails.store(false, Ordering::SeqCst);
    let retried = client.request_with(Deposit { account: "acct-1".into(), cents: 100 }, once.clone()).await.unwrap();
    assert_eq!((retried, ledger.runs.load(Ordering::SeqCst)), (100, 1), "the refusal was not replayed: the retry ran");
    assert_eq!(client.request_with(Deposit { account: "acct-1".into(), cents: 100 }, once).await.unwrap(), 100);
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 1, "and its outcome is what the window replays");
    server.shutdown().await.unwrap();
}

/// "While the window cannot be loaded, the partition is not served": a request waiting
/// on it neither runs nor is skipped, and is answered once the load succeeds.
async fn a_partition_whose_window_cannot_be_loaded_is_not_served(env: Env) {
    let topic = unique("dedup-no-load");
    let ledger = Arc::new(Ledger::default());
    let store = Arc::new(Flaky::default());
    store.load_fails.store(true, Ordering::SeqCst);
    let server = server(&env, &topic, &ledger).idempotency(store.clone()).start().await.unwrap();
    let client = env.client(&topic).timeout(Duration::from_secs(60)).start().await.unwrap();
    let call = tokio::spawn(client.request(Deposit { account: "acct-1".into(), cents: 100 }));
    // Four partitions, each tried at least twice (the first pause is 50 ms).
    support::eventually("the window loads are retried (or the request ran)", Duration::from_secs(30), || async {
        store.loads.load(Ordering::SeqCst) >= 8 || ledger.runs.load(Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 0, "served before its window was loaded");
    assert!(!call.is_finished());
    store.load_fails.store(false, Ordering::SeqCst);
    assert_eq!(call.await.unwrap().unwrap(), 100);
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 1);
    server.shutdown().await.unwrap();
}

/// "Events (no reply address) with a key are deduplicated as well: a duplicate is not
/// run and nothing is sent."
async fn a_keyed_event_delivered_twice_runs_once_and_sends_nothing(env: Env) {
    let topic = unique("dedup-event");
    let ledger = Arc::new(Ledger::default());
    let server = server(&env, &topic, &ledger).idempotency(MemoryWindow::new()).start().await.unwrap();
    let deposit = Deposit { account: "acct-1".into(), cents: 5 };
    let mut event = Record::new(deposit.key(), ContentType::Bincode.encode(&deposit).unwrap());
    event.headers = wire::request_headers(&RequestMeta {
        request_type: Some(Deposit::TYPE.into()),
        content_type: ContentType::Bincode,
        ..RequestMeta::default()
    });
    event.headers.push(kafka_rpc::transport::Header { key: KEY_HEADER.into(), value: Bytes::from_static(b"event-1") });
    env.transport.produce(&topic, request_partition(), vec![event.clone(), event.clone()]).await.unwrap();
    support::eventually("both copies are read", Duration::from_secs(20), || async { server.stats().duplicates() == 1 }).await;
    // A third copy on its own, after the first is surely in the window.
    env.transport.produce(&topic, request_partition(), vec![event]).await.unwrap();
    support::eventually("the third copy is read", Duration::from_secs(20), || async { server.stats().duplicates() == 2 }).await;
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 1, "the event must run once");
    assert_eq!(ledger.total.load(Ordering::SeqCst), 5);
    // As a duplicate request is counted in `duplicates`, not `handled`.
    assert_eq!(server.stats().events(), 1, "events handled: the copies were not");
    assert!(env.transport.partition_count(&format!("{topic}.replies")).await.is_err(), "nothing is sent: no reply topic even exists");
    server.shutdown().await.unwrap();
}

/// One key reused for two operations of one account (an order id as the key of its
/// payment and then of its refund, which land on one partition): the refund was
/// answered with the payment's reply, a number it decodes as its own, and never ran —
/// the caller believed the money returned. It is refused instead, also by a restarted
/// server reading the Kafka window back; the payment's retry still gets its reply.
async fn a_key_reused_for_another_handler_is_refused_not_answered_with_its_outcome(env: Env) {
    for kafka in [false, true] {
        let topic = unique("dedup-other-handler");
        let window = format!("{topic}.idempotency");
        let ledger = Arc::new(Ledger::default());
        let start = |ledger: &Arc<Ledger>| {
            let builder = server(&env, &topic, ledger).handler(refund);
            match kafka {
                true => builder.idempotency(KafkaWindow::new(env.transport.clone(), &window)),
                false => builder.idempotency(MemoryWindow::new()),
            }
            .start()
        };
        let first = start(&ledger).await.unwrap();
        let client = env.client(&topic).start().await.unwrap();
        let order = RequestOptions::new().idempotency_key("order-42");
        let pay = || client.request_with(Deposit { account: "acct-1".into(), cents: 500 }, order.clone());
        let refund = || client.request_with(Refund { account: "acct-1".into(), cents: 200 }, order.clone());
        assert_eq!(pay().await.unwrap(), 500);
        let refused = refund().await;
        assert_eq!(ledger.runs.load(Ordering::SeqCst), 1, "kafka window: {kafka}: the refund must not be answered with the payment's reply ({refused:?})");
        assert_eq!(refused.unwrap_err().code(), Some(&ErrorCode::BadRequest));
        assert_eq!(pay().await.unwrap(), 500, "the payment's own retry still gets its reply");
        if kafka {
            first.shutdown().await.unwrap();
            let second = start(&ledger).await.unwrap();
            assert_eq!(refund().await.unwrap_err().code(), Some(&ErrorCode::BadRequest), "the handler is read back with the window");
            assert_eq!(pay().await.unwrap(), 500);
            second.shutdown().await.unwrap();
        } else {
            first.shutdown().await.unwrap();
        }
        assert_eq!(ledger.runs.load(Ordering::SeqCst), 1);
        client.shutdown().await;
    }
}

on_every_transport!(
    a_window_keeps_the_reply_as_sent_not_the_oversized_outcome,
    a_key_reused_for_another_handler_is_refused_not_answered_with_its_outcome,
    a_panic_and_a_timeout_are_replayed_not_run_again,
    a_copy_right_behind_is_caught_by_the_kafka_window,
    a_failed_lookup_is_answered_unrun_and_not_recorded,
    a_partition_whose_window_cannot_be_loaded_is_not_served,
    a_keyed_event_delivered_twice_runs_once_and_sends_nothing,
    a_key_that_aged_out_and_ran_again_is_deduplicated_again,
    dedup_uses_the_correlation_id_the_reply_is_sent_under,
    a_redelivered_record_runs_its_handler_once,
    a_redelivered_record_runs_its_batch_handler_once,
    without_idempotency_a_redelivered_record_runs_twice,
    a_restarted_server_still_knows_the_keys_of_the_kafka_window,
    a_memory_window_forgets_on_restart,
    calls_with_one_idempotency_key_get_the_first_reply,
    a_key_pushed_out_of_the_window_runs_again,
    an_oversized_key_is_refused_unrun,
);

/// A partition number is the group leader's to give (any client can lead a group) or
/// the caller's: `i32::MAX` is refused as beyond the window topic, not a panic while
/// naming the partition count it would need (one more than `i32::MAX`).
#[tokio::test]
async fn loading_the_kafka_window_for_the_last_partition_number_is_a_typed_error() {
    use kafka_rpc::server::idempotency::{IdempotencyStore, StoreError};
    use kafka_rpc::transport::TopicPartition;
    let broker = EmbeddedBroker::new();
    let topic = unique("window-last-partition");
    broker.ensure_topic(&topic, 1).await.unwrap();
    let window = KafkaWindow::new(broker.clone(), format!("{topic}.idempotency"));
    match window.load(&TopicPartition::new(topic.as_str(), i32::MAX)).await {
        Err(StoreError::Misconfigured(why)) => assert!(why.contains("2147483648"), "{why}"),
        other => panic!("expected a misconfiguration, got {other:?}"),
    }
}

/// "The window topic: ... fewer partitions is a configuration error, logged and
/// retried": retried, so the operator's remedy (more partitions for the window topic)
/// must take without a restart. The window kept the count it first read for good, and
/// the partition stayed unserved until the server restarted.
#[tokio::test]
async fn a_window_topic_given_the_partitions_it_lacked_is_loaded_without_a_restart() {
    let broker = EmbeddedBroker::new();
    let topic = unique("window-too-short");
    let short = format!("{topic}.idempotency");
    broker.ensure_topic(&topic, 2).await.unwrap();
    broker.ensure_topic(&short, 2).await.unwrap();
    let transport = Arc::new(Growing::new(broker, short.clone(), 1));
    let window = KafkaWindow::new(transport.clone(), &short);
    assert!(window.load(&TopicPartition::new(topic.as_str(), 0)).await.is_ok());
    match window.load(&TopicPartition::new(topic.as_str(), 1)).await {
        Err(StoreError::Misconfigured(_)) => {}
        other => panic!("a window topic of one partition cannot hold request partition 1: {other:?}"),
    }
    transport.grow();
    let retried = window.load(&TopicPartition::new(topic.as_str(), 1)).await;
    assert!(retried.is_ok(), "the retry after the window topic grew: {retried:?}");
}

/// A memory window whose look-up of the key `boom` panics, as a store of the
/// application's that unwraps what it cannot parse in a key it was sent would.
struct PanicsOnBoom(MemoryWindow);

#[async_trait::async_trait]
impl kafka_rpc::server::idempotency::IdempotencyStore for PanicsOnBoom {
    async fn lookup(
        &self,
        partition: &kafka_rpc::transport::TopicPartition,
        key: &[u8],
    ) -> Result<Option<kafka_rpc::server::idempotency::StoredReply>, kafka_rpc::server::idempotency::StoreError> {
        assert_ne!(key, b"boom", "the store cannot read this key");
        self.0.lookup(partition, key).await
    }

    fn record(
        &self,
        partition: &kafka_rpc::transport::TopicPartition,
        key: Bytes,
        reply: kafka_rpc::server::idempotency::StoredReply,
    ) -> futures::future::BoxFuture<'static, Result<(), kafka_rpc::server::idempotency::StoreError>> {
        self.0.record(partition, key, reply)
    }
}

/// A store is the application's code, called with keys from the network, like a
/// handler; its panic is the store failing (the request is refused unrun), not the end
/// of the partition worker: that left the partition unserved until a rebalance, every
/// later request on it timing out.
#[tokio::test]
async fn a_panicking_store_refuses_the_request_and_the_partition_serves_on() {
    let broker = EmbeddedBroker::new();
    let topic = unique("dedup-store-panics");
    let server = RpcServer::builder(broker.clone(), &topic)
        .partitions(1)
        .handler(|d: Deposit| async move { Ok::<_, RemoteError>(d.cents) })
        .idempotency(PanicsOnBoom(MemoryWindow::new()))
        .start()
        .await
        .unwrap();
    let client = ReplyingClient::builder(broker, &topic).partitions(1).timeout(Duration::from_secs(10)).start().await.unwrap();
    let deposit = || Deposit { account: "a".into(), cents: 5 };
    match client.request_with(deposit(), RequestOptions::new().idempotency_key("boom")).await {
        Err(RpcError::Remote(e)) => assert_eq!(e.code.as_str(), kafka_rpc::server::idempotency::STORE_UNAVAILABLE),
        other => panic!("expected the store-unavailable refusal, got {other:?}"),
    }
    assert_eq!(client.request_with(deposit(), RequestOptions::new().idempotency_key("fine")).await.unwrap(), 5);
    client.shutdown().await;
    server.shutdown().await.unwrap();
}

/// "Consecutive empty fetches tolerated below the high watermark while loading"
/// (`LOAD_EMPTY_FETCHES`, 50, in `src/server/idempotency/kafka.rs`): a window partition
/// whose end the reader cannot reach is served after 50 empty fetches, with what was
/// read, rather than never. Here the proxy in front of the broker hides the window's
/// second record: a fetch from offset 1 is answered with the high watermark (2) and no
/// records, as a broker would answer one whose records the reader may not see. The key
/// of the first record is still answered from the window; the hidden one runs again.
#[tokio::test]
async fn a_kafka_window_whose_end_cannot_be_read_is_served_with_what_was_read() {
    use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse};
    use std::sync::atomic::AtomicUsize;
    let broker = support::kafka::ProxiedBroker::start();
    let env = Env { name: "kafka", transport: Arc::new(support::kafka::connect(broker.config()).await) };
    let topic = unique("window-unreachable-end");
    let window = format!("{topic}.idempotency");
    let ledger = Arc::new(Ledger::default());
    let (replies, start) = reply_topic(&env, &topic).await;
    let window_end = || async { env.transport.latest_offset(&window, request_partition()).await.unwrap_or(-1) };

    let first = server(&env, &topic, &ledger).idempotency(KafkaWindow::new(env.transport.clone(), &window)).start().await.unwrap();
    let (a, b) = (deposit_record(&replies, b"corr-seen", 100), deposit_record(&replies, b"corr-hidden", 10));
    // One at a time, so that each window record is a batch of its own.
    env.transport.produce(&topic, request_partition(), vec![a.clone()]).await.unwrap();
    read_replies(&env, &replies, start, 1).await;
    support::eventually("the first window record is written", Duration::from_secs(20), || async { window_end().await == 1 }).await;
    env.transport.produce(&topic, request_partition(), vec![b.clone()]).await.unwrap();
    read_replies(&env, &replies, start + 1, 1).await;
    support::eventually("the second window record is written", Duration::from_secs(20), || async { window_end().await == 2 }).await;
    first.shutdown().await.unwrap();
    drop(first);

    // From now on the window's log reads as ending after its first record.
    let name = window.clone();
    broker.proxy.rewrite_responses(kafka_rpc_testkit::kafka_proxy::api::FETCH, move |request, response| {
        rewrite::rewrite(ApiKey::Fetch, request, response, |_: &FetchRequest, resp: &mut FetchResponse| {
            for t in resp.responses.iter_mut().filter(|t| t.topic.0.as_str() == name) {
                for p in &mut t.partitions {
                    let Some(records) = p.records.take() else { continue };
                    p.records = Some(records.slice(..batches_before(&records, 1)));
                }
            }
        })
    });

    // Delivered again while no server runs: the next instance loads the window first.
    env.transport.produce(&topic, request_partition(), vec![a, b]).await.unwrap();
    let empty = Arc::new(AtomicUsize::new(0));
    let counting = CountingEmptyReads { inner: env.transport.clone(), empty: empty.clone() };
    let second = server(&env, &topic, &ledger).idempotency(KafkaWindow::new(counting, &window)).start().await.unwrap();
    let again = read_replies(&env, &replies, start + 2, 2).await;
    assert_eq!(empty.load(Ordering::SeqCst), 50, "empty reads of the window before the partition was served");
    assert_eq!(total_in(&again[0]), 100, "the record read is answered from the window");
    assert_eq!(total_in(&again[1]), 120, "the hidden record was not loaded: its request runs again");
    assert_eq!(ledger.runs.load(Ordering::SeqCst), 3);
    assert_eq!(second.stats().duplicates(), 1);
    second.shutdown().await.unwrap();
}

/// How many bytes of the record batches in `records` (Kafka's v2 batch layout: base
/// offset, i64, then batch length, i32, counting what follows it) lie before the first
/// batch at or past `offset`.
fn batches_before(records: &[u8], offset: i64) -> usize {
    let mut at = 0;
    while let (Some(base), Some(length)) = (records.get(at..at + 8), records.get(at + 8..at + 12)) {
        let base = i64::from_be_bytes(base.try_into().unwrap_or_default());
        let length = i32::from_be_bytes(length.try_into().unwrap_or_default());
        if base >= offset || length < 0 {
            break;
        }
        at = (at + 12 + length as usize).min(records.len());
    }
    at
}

/// The broker's transport, counting the reads that came back empty without moving (no
/// records, the next offset where the read began): what the window's loader counts.
struct CountingEmptyReads {
    inner: Arc<dyn Transport>,
    empty: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl Transport for CountingEmptyReads {
    async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<i32, TransportError> {
        self.inner.ensure_topic(topic, partitions).await
    }
    async fn partition_count(&self, topic: &str) -> Result<i32, TransportError> {
        self.inner.partition_count(topic).await
    }
    async fn produce(&self, topic: &str, partition: i32, records: Vec<Record>) -> Result<i64, kafka_rpc::transport::ProduceError> {
        self.inner.produce(topic, partition, records).await
    }
    async fn latest_offset(&self, topic: &str, partition: i32) -> Result<i64, TransportError> {
        self.inner.latest_offset(topic, partition).await
    }
    async fn reader(&self, topic: &str, partition: i32) -> Result<Box<dyn kafka_rpc::transport::PartitionReader>, TransportError> {
        let inner = self.inner.reader(topic, partition).await?;
        Ok(Box::new(EmptyReads { inner, empty: self.empty.clone() }))
    }
    async fn join_group(
        &self,
        group: &str,
        topics: &[String],
        reset: kafka_rpc::transport::OffsetReset,
    ) -> Result<kafka_rpc::transport::GroupMembership, TransportError> {
        self.inner.join_group(group, topics, reset).await
    }
    fn busy_linger(&self) -> Duration {
        self.inner.busy_linger()
    }
}

struct EmptyReads {
    inner: Box<dyn kafka_rpc::transport::PartitionReader>,
    empty: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl kafka_rpc::transport::PartitionReader for EmptyReads {
    async fn read(&mut self, offset: i64, max_wait: Duration) -> Result<kafka_rpc::transport::Fetch, TransportError> {
        let fetch = self.inner.read(offset, max_wait).await?;
        if fetch.records.is_empty() && fetch.next_offset <= offset {
            self.empty.fetch_add(1, Ordering::SeqCst);
        }
        Ok(fetch)
    }
}
