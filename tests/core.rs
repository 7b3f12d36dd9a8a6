//! The core request-reply behaviour, run on every transport from one definition.

mod support;
#[path = "support/growing.rs"]
mod growing;
use growing::Growing;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use kafka_rpc::client::{Backpressure, ReplyPartitions};
use kafka_rpc::partitioner::partition_for_key;
use kafka_rpc::prelude::*;
use kafka_rpc::transport::{GroupMembership, Header, OffsetReset, PartitionReader, ProduceError, Record, TransportError};
use kafka_rpc::wire::names;
use serde::{Deserialize, Serialize};
use support::{eventually, unique, Env};

// ---- request types -------------------------------------------------------

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Echo {
    key: String,
    n: u64,
}
impl Request for Echo {
    const TYPE: &'static str = "test.echo";
    type Response = (String, u64);
    fn key(&self) -> Option<Vec<u8>> {
        Some(self.key.key_bytes())
    }
}

/// Same dispatch name as `Echo`, different shape: the server cannot decode it.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct NotAnEcho(String);
impl Request for NotAnEcho {
    const TYPE: &'static str = "test.echo";
    type Response = (String, u64);
    fn key(&self) -> Option<Vec<u8>> {
        Some(self.0.key_bytes())
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Fail {
    message: String,
}
impl Request for Fail {
    const TYPE: &'static str = "test.fail";
    type Response = ();
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Explode {
    key: String,
}
impl Request for Explode {
    const TYPE: &'static str = "test.explode";
    type Response = ();
    fn key(&self) -> Option<Vec<u8>> {
        Some(self.key.key_bytes())
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Slow {
    ms: u64,
}
impl Request for Slow {
    const TYPE: &'static str = "test.slow";
    type Response = u64;
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Nobody;
impl Request for Nobody {
    const TYPE: &'static str = "test.nobody-serves-this";
    type Response = ();
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

/// Appends `seq` to the log of `key`; the server remembers the order it saw.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Append {
    key: String,
    seq: u64,
}
impl Request for Append {
    const TYPE: &'static str = "test.append";
    type Response = i32;
    fn key(&self) -> Option<Vec<u8>> {
        Some(self.key.key_bytes())
    }
}

/// Returns `size` bytes.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Big {
    key: String,
    size: usize,
}
impl Request for Big {
    const TYPE: &'static str = "test.big";
    type Response = Vec<u8>;
    fn key(&self) -> Option<Vec<u8>> {
        Some(self.key.key_bytes())
    }
}

/// Never finishes on its own; counts the cancellations it sees.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Hang {
    key: String,
}
impl Request for Hang {
    const TYPE: &'static str = "test.hang";
    type Response = ();
    fn key(&self) -> Option<Vec<u8>> {
        Some(self.key.key_bytes())
    }
}

/// Runs until the server gives up on it, then answers how it ended.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct UntilCancelled;
impl Request for UntilCancelled {
    const TYPE: &'static str = "test.until-cancelled";
    type Response = String;
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

/// Answers the values of its `x-tag` headers, in order.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Tags;
impl Request for Tags {
    const TYPE: &'static str = "test.tags";
    type Response = Vec<String>;
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

#[derive(Default)]
struct Seen {
    cancelled: AtomicU64,
    by_key: Mutex<HashMap<String, Vec<(u64, i32)>>>,
    calls: AtomicU64,
    running: AtomicU64,
    most_running: AtomicU64,
}

type SeenState = Arc<Seen>;

async fn echo(req: Echo) -> Result<(String, u64), RemoteError> {
    Ok((req.key, req.n))
}

async fn fail(req: Fail) -> Result<(), RemoteError> {
    Err(RemoteError::new("OUT_OF_RANGE", req.message))
}

async fn explode(req: Explode) -> Result<(), RemoteError> {
    panic!("handler blew up on {}", req.key)
}

async fn slow(req: Slow, _ctx: Context, State(seen): State<SeenState>) -> Result<u64, RemoteError> {
    let now = seen.running.fetch_add(1, Ordering::SeqCst) + 1;
    seen.most_running.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(req.ms)).await;
    seen.running.fetch_sub(1, Ordering::SeqCst);
    seen.calls.fetch_add(1, Ordering::SeqCst);
    Ok(req.ms)
}

async fn append(req: Append, ctx: Context, State(seen): State<SeenState>) -> Result<i32, RemoteError> {
    seen.calls.fetch_add(1, Ordering::SeqCst);
    seen.by_key.lock().unwrap().entry(req.key).or_default().push((req.seq, ctx.partition()));
    Ok(ctx.partition())
}

async fn tags(_req: Tags, ctx: Context) -> Result<Vec<String>, RemoteError> {
    Ok(ctx.headers().iter().filter(|h| h.key == "x-tag").map(|h| String::from_utf8_lossy(&h.value).into_owned()).collect())
}

async fn big(req: Big) -> Result<Vec<u8>, RemoteError> {
    Ok(vec![7; req.size])
}

async fn hang(_req: Hang, ctx: Context, State(seen): State<SeenState>) -> Result<(), RemoteError> {
    // Work handed elsewhere learns of the time limit through the cancellation handle.
    let cancellation = ctx.cancellation();
    tokio::spawn(async move {
        cancellation.cancelled().await;
        seen.cancelled.fetch_add(1, Ordering::SeqCst);
    });
    std::future::pending().await
}

async fn until_cancelled(_req: UntilCancelled, ctx: Context, State(seen): State<SeenState>) -> Result<String, RemoteError> {
    seen.running.fetch_add(1, Ordering::SeqCst);
    ctx.cancelled().await;
    Ok("cancelled".into())
}

async fn start_server(env: &Env, topic: &str, seen: SeenState) -> RpcServer {
    start_configured(env.server(topic), seen).await
}

async fn start_configured(builder: kafka_rpc::server::RpcServerBuilder, seen: SeenState) -> RpcServer {
    builder
        .state(seen)
        .handler(echo)
        .handler(fail)
        .handler(explode)
        .handler(slow)
        .handler(append)
        .handler(big)
        .handler(tags)
        .handler(hang)
        .handler(until_cancelled)
        .start()
        .await
        .expect("server starts")
}

// ---- cases ---------------------------------------------------------------

async fn three_clients_share_a_reply_topic(env: Env) {
    let topic = unique("share");
    let server = start_server(&env, &topic, SeenState::default()).await;
    // All three advertise partition 0, so each listener also sees the other two's replies.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let client = env
            .client(&topic)
            .reply_partitions(ReplyPartitions::Pinned(Some(0)))
            .timeout(Duration::from_secs(60))
            .start()
            .await
            .expect("client starts");
        clients.push(client);
    }
    const TOTAL: u64 = 10_000;
    let mut calls = Vec::new();
    for n in 0..TOTAL {
        let client = &clients[(n % 3) as usize];
        let request = Echo { key: format!("store-{}", n % 97), n };
        calls.push((n, client.request(request)));
    }
    let outcomes = join_all(calls.into_iter().map(|(n, call)| async move { (n, call.await) })).await;
    for (n, outcome) in outcomes {
        let (key, echoed) = outcome.unwrap_or_else(|e| panic!("request {n} failed: {e}"));
        assert_eq!((key.as_str(), echoed), (format!("store-{}", n % 97).as_str(), n), "request {n} got another's reply");
    }
    for (i, client) in clients.iter().enumerate() {
        let own = TOTAL / 3 + u64::from((i as u64) < TOTAL % 3);
        eventually("each client has read every reply on the shared partition", Duration::from_secs(30), || async {
            let s = client.stats();
            s.replies_delivered() + s.replies_ignored() == TOTAL
        })
        .await;
        let stats = client.stats();
        assert_eq!(stats.replies_delivered(), own, "client {i} delivered");
        assert_eq!(stats.replies_ignored(), TOTAL - own, "client {i} must ignore exactly the others' replies");
        assert_eq!(stats.in_flight(), 0);
    }
    server.shutdown().await.unwrap();
}

/// A timeout too long for the clock (say `Duration::MAX`, "no limit") is no limit: the
/// call, the deadline it carries and the handler's limit must neither overflow nor
/// read as already past.
async fn a_timeout_beyond_the_clock_is_no_limit(env: Env) {
    let topic = unique("no-limit");
    let server = start_configured(env.server(&topic).handler_timeout(Duration::MAX), SeenState::default()).await;
    let client = env.client(&topic).timeout(Duration::MAX).start().await.unwrap();
    let answer = client.request_with(Slow { ms: 50 }, RequestOptions::new().timeout(Duration::MAX)).await;
    assert_eq!(answer.unwrap(), 50);
    assert_eq!(client.request(Slow { ms: 10 }).await.unwrap(), 10);
    server.shutdown().await.unwrap();
}

async fn timeout_returns_error_and_late_reply_is_ignored(env: Env) {
    let topic = unique("timeout");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let client = env.client(&topic).start().await.unwrap();
    let err = client
        .request_with(Slow { ms: 1500 }, RequestOptions::new().timeout(Duration::from_millis(300)))
        .await
        .unwrap_err();
    // The request's deadline caps the handler, so the server answers HANDLER_TIMEOUT at
    // about the moment the caller gives up: whichever comes first is what the caller sees.
    // (On a loaded machine the server may even read the request after its deadline and
    // skip it.)
    let timed_out = match &err {
        RpcError::Timeout(d) => {
            assert_eq!(*d, Duration::from_millis(300));
            true
        }
        RpcError::Remote(e) => {
            assert_eq!(e.code, ErrorCode::HandlerTimeout, "{err:?}");
            false
        }
        other => panic!("expected a timeout, got {other:?}"),
    };
    assert_eq!(client.in_flight(), 0);
    eventually("the handler is stopped at the deadline, or not run past it", Duration::from_secs(20), || async {
        let s = server.stats();
        s.failed() + s.expired() == 1
    })
    .await;
    if timed_out && server.stats().failed() == 1 {
        eventually("the late reply arrives and is ignored", Duration::from_secs(20), || async {
            client.stats().replies_ignored() == 1
        })
        .await;
        assert_eq!(client.stats().replies_delivered(), 0);
    }
    server.shutdown().await.unwrap();
}

async fn cancellation_and_mixed_outcomes_leave_nothing_pending(env: Env) {
    let topic = unique("cancel");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let client = env.client(&topic).start().await.unwrap();

    // Dropped before the reply comes.
    let dropped = client.request(Slow { ms: 500 });
    assert_eq!(client.in_flight(), 1, "the request is registered when it is sent");
    drop(dropped);
    assert_eq!(client.in_flight(), 0, "dropping the future unregisters it");

    // A mix: answered, timed out, cancelled, failed.
    let mut calls = Vec::new();
    for i in 0..40u64 {
        let c = client.clone();
        calls.push(tokio::spawn(async move {
            match i % 4 {
                0 => c.request(Echo { key: "k".into(), n: i }).await.map(|_| ()),
                1 => c.request_with(Slow { ms: 400 }, RequestOptions::new().timeout(Duration::from_millis(50))).await.map(|_| ()),
                2 => match tokio::time::timeout(Duration::from_millis(5), c.request(Slow { ms: 400 })).await {
                    Ok(r) => r.map(|_| ()),
                    Err(_) => Ok(()),
                },
                _ => c.request(Fail { message: "no".into() }).await,
            }
        }));
    }
    for call in calls {
        let _ = call.await.unwrap();
    }
    assert_eq!(client.in_flight(), 0, "every path must unregister its request");
    server.shutdown().await.unwrap();
}

async fn handler_error_becomes_typed_remote_error(env: Env) {
    let topic = unique("error");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let client = env.client(&topic).start().await.unwrap();
    let err = client.request(Fail { message: "radius below 500 m".into() }).await.unwrap_err();
    match err {
        RpcError::Remote(e) => {
            assert_eq!(e.code, ErrorCode::Custom("OUT_OF_RANGE".into()));
            assert_eq!(e.message, "radius below 500 m");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    assert_eq!(server.stats().failed(), 1);
    server.shutdown().await.unwrap();
}

async fn panic_becomes_error_reply_and_server_keeps_serving(env: Env) {
    let topic = unique("panic");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let client = env.client(&topic).start().await.unwrap();
    let err = client.request(Explode { key: "store-1".into() }).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::HandlerPanicked), "{err:?}");
    // Panic messages may carry internals: callers get a generic message by default.
    assert!(!err.to_string().contains("blew up"), "{err}");
    // Same key, so same partition: the worker that caught the panic must still run.
    let ok = client.request(Echo { key: "store-1".into(), n: 9 }).await.unwrap();
    assert_eq!(ok, ("store-1".into(), 9));
    assert_eq!(server.stats().panicked(), 1);
    server.shutdown().await.unwrap();
}

async fn unknown_type_is_named_in_the_error(env: Env) {
    let topic = unique("unknown");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let client = env.client(&topic).start().await.unwrap();
    let err = client.request(Nobody).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::UnknownType));
    assert!(err.to_string().contains("test.nobody-serves-this"), "{err}");
    server.shutdown().await.unwrap();
}

async fn poison_records_do_not_block_the_partition(env: Env) {
    let topic = unique("poison");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let client = env.client(&topic).start().await.unwrap();
    let key = "store-13";
    let partition = partition_for_key(key.as_bytes(), 4);

    // A record whose reply headers are garbage: skipped, nothing to answer.
    let mut garbage = Record::new(Some(key.as_bytes().to_vec()), vec![0xff; 7]);
    garbage.headers = vec![
        Header { key: names::REPLY_TOPIC.into(), value: Bytes::from_static(b"x") },
        Header { key: names::REPLY_PARTITION.into(), value: Bytes::from_static(b"not-a-number") },
    ];
    env.transport.produce(&topic, partition, vec![garbage]).await.unwrap();

    // A payload the handler's type cannot decode: answered with BAD_REQUEST.
    let err = client.request(NotAnEcho(key.into())).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::BadRequest), "{err:?}");

    // And the partition moves on.
    let ok = client.request(Echo { key: key.into(), n: 1 }).await.unwrap();
    assert_eq!(ok, (key.to_string(), 1));
    let stats = server.stats();
    assert_eq!((stats.unroutable(), stats.bad_request()), (1, 1));
    server.shutdown().await.unwrap();
}

async fn per_key_order_holds_under_concurrency(env: Env) {
    let topic = unique("order");
    let seen = SeenState::default();
    let server = start_server(&env, &topic, seen.clone()).await;
    // A bound far below the 3,000 calls: most wait for a slot, and order must survive it.
    let client = env.client(&topic).max_in_flight(64).timeout(Duration::from_secs(60)).start().await.unwrap();
    const KEYS: u64 = 60;
    const PER_KEY: u64 = 50;
    // Interleave keys and spawn every call: order must come from the call order alone.
    let mut tasks = Vec::new();
    for seq in 0..PER_KEY {
        for k in 0..KEYS {
            tasks.push(tokio::spawn(client.request(Append { key: format!("store-{k}"), seq })));
        }
    }
    let partitions: Vec<i32> = join_all(tasks).await.into_iter().map(|t| t.unwrap().unwrap()).collect();
    assert_eq!(partitions.len() as u64, KEYS * PER_KEY);

    {
        let by_key = seen.by_key.lock().unwrap();
        for k in 0..KEYS {
            let key = format!("store-{k}");
            let log = &by_key[&key];
            let seqs: Vec<u64> = log.iter().map(|(s, _)| *s).collect();
            assert_eq!(seqs, (0..PER_KEY).collect::<Vec<_>>(), "order of {key}");
            let expected = partition_for_key(key.as_bytes(), 4);
            assert!(log.iter().all(|(_, p)| *p == expected), "{key} must always land on partition {expected}");
        }
    }
    server.shutdown().await.unwrap();
}

async fn records_without_reply_headers_are_events(env: Env) {
    let topic = unique("events");
    let seen = SeenState::default();
    let server = start_server(&env, &topic, seen.clone()).await;
    let payload = ContentType::Bincode.encode(&Append { key: "store-5".into(), seq: 77 }).unwrap();
    let mut event = Record::new(Some(b"store-5".to_vec()), payload);
    event.headers = vec![Header { key: names::TYPE.into(), value: Bytes::from_static(b"test.append") }];
    let partition = partition_for_key(b"store-5", 4);
    env.transport.produce(&topic, partition, vec![event]).await.unwrap();
    eventually("the event is handled", Duration::from_secs(20), || async { server.stats().events() == 1 }).await;
    assert_eq!(seen.by_key.lock().unwrap()["store-5"], vec![(77, partition)]);
    let replies = format!("{topic}.replies");
    // Nothing may have been written to any reply topic.
    assert!(env.transport.partition_count(&replies).await.is_err(), "no reply topic should even exist");
    server.shutdown().await.unwrap();
}

async fn expired_requests_are_skipped(env: Env) {
    let topic = unique("expired");
    let seen = SeenState::default();
    let server = start_server(&env, &topic, seen.clone()).await;
    let payload = ContentType::Bincode.encode(&Append { key: "s".into(), seq: 1 }).unwrap();
    let mut stale = Record::new(Some(b"s".to_vec()), payload);
    stale.headers = kafka_rpc::__private::wire::request_headers(&kafka_rpc::__private::wire::RequestMeta {
        request_type: Some("test.append".into()),
        correlation_id: Some(Bytes::from_static(&[1; 16])),
        reply_to: Some(kafka_rpc::__private::wire::ReplyAddress { topic: format!("{topic}.replies").into(), partition: Some(0) }),
        content_type: ContentType::Bincode,
        // A second ago by the local clock: expired when the server reads it.
        deadline_ms: Some(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64 - 1_000),
        ..Default::default()
    });
    env.transport.produce(&topic, partition_for_key(b"s", 4), vec![stale]).await.unwrap();
    eventually("the stale request is counted", Duration::from_secs(20), || async { server.stats().expired() == 1 }).await;
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0, "an expired request must not run");
    server.shutdown().await.unwrap();
}

async fn shutdown_fails_pending_requests(env: Env) {
    let topic = unique("shutdown");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let client = env.client(&topic).timeout(Duration::from_secs(60)).start().await.unwrap();
    let pending: Vec<_> = (0..5).map(|_| tokio::spawn(client.request(Slow { ms: 3_000 }))).collect();
    assert_eq!(client.in_flight(), 5);
    client.shutdown().await;
    for call in pending {
        let outcome = tokio::time::timeout(Duration::from_secs(2), call).await.expect("pending calls end at shutdown");
        assert!(matches!(outcome.unwrap(), Err(RpcError::Closed)));
    }
    assert!(matches!(client.request(Echo { key: "k".into(), n: 1 }).await, Err(RpcError::Closed)));
    assert_eq!(client.in_flight(), 0);

    // Dropping the last handle does the same.
    let client = env.client(&topic).timeout(Duration::from_secs(60)).start().await.unwrap();
    let call = tokio::spawn(client.request(Slow { ms: 3_000 }));
    drop(client);
    let outcome = tokio::time::timeout(Duration::from_secs(2), call).await.expect("drop ends pending calls");
    assert!(matches!(outcome.unwrap(), Err(RpcError::Closed)));
    server.shutdown().await.unwrap();
}

async fn foreign_style_request_gets_verbatim_correlation_id(env: Env) {
    let topic = unique("foreign");
    let replies = unique("foreign-replies");
    let server = start_configured(env.server(&topic).reply_topic(&replies), SeenState::default()).await;
    env.transport.ensure_topic(&replies, 1).await.unwrap();
    let start = env.transport.latest_offset(&replies, 0).await.unwrap();
    // NestJS style: string correlation id, ASCII partition, JSON body.
    let correlation = b"0f8fad5b-d9cb-469f-a165-70867728950e";
    let mut request = Record::new(Some(b"store-2".to_vec()), br#"{"key":"store-2","n":41}"#.to_vec());
    request.headers = vec![
        Header { key: names::CORRELATION_ID.into(), value: Bytes::from_static(correlation) },
        Header { key: names::REPLY_TOPIC.into(), value: Bytes::from(replies.clone().into_bytes()) },
        Header { key: names::REPLY_PARTITION.into(), value: Bytes::from_static(b"0") },
        Header { key: names::TYPE.into(), value: Bytes::from_static(b"test.echo") },
        Header { key: names::CONTENT_TYPE.into(), value: Bytes::from_static(b"application/json") },
        Header { key: "x-unknown".into(), value: Bytes::from_static(b"ignored") },
    ];
    env.transport.produce(&topic, partition_for_key(b"store-2", 4), vec![request]).await.unwrap();
    let mut reader = env.transport.reader(&replies, 0).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let got = loop {
        let records = reader.fetch(start, Duration::from_millis(200)).await.unwrap();
        if !records.is_empty() {
            break records;
        }
        assert!(tokio::time::Instant::now() < deadline, "no reply within 20 s");
    };
    let reply = &got[0].record;
    assert_eq!(reply.header(names::CORRELATION_ID).unwrap().as_ref(), correlation);
    assert_eq!(reply.key.as_deref(), Some(&b"store-2"[..]));
    assert_eq!(reply.value.as_deref(), Some(&br#"["store-2",41]"#[..]));
    server.shutdown().await.unwrap();
}

/// A request whose reply address is readable but whose codec, deadline or type header
/// is not (a newer client's codec, a garbled deadline or type name) is answered with `BAD_REQUEST`, not
/// left for its caller to time out on, and the partition moves on.
async fn a_request_with_an_unreadable_codec_or_deadline_is_answered_bad_request(env: Env) {
    let topic = unique("unreadable");
    let replies = unique("unreadable-replies");
    let server = start_configured(env.server(&topic).reply_topic(&replies), SeenState::default()).await;
    env.transport.ensure_topic(&replies, 1).await.unwrap();
    let start = env.transport.latest_offset(&replies, 0).await.unwrap();
    let request = |correlation: &'static [u8], bad: Header| {
        let mut request = Record::new(Some(b"store-3".to_vec()), br#"{"key":"store-3","n":1}"#.to_vec());
        request.headers = vec![
            Header { key: names::CORRELATION_ID.into(), value: Bytes::from_static(correlation) },
            Header { key: names::REPLY_TOPIC.into(), value: Bytes::from(replies.clone().into_bytes()) },
            Header { key: names::REPLY_PARTITION.into(), value: Bytes::from_static(b"0") },
            Header { key: names::TYPE.into(), value: Bytes::from_static(b"test.echo") },
            bad,
        ];
        request
    };
    let records = vec![
        request(b"codec", Header { key: names::CONTENT_TYPE.into(), value: Bytes::from_static(b"application/x-msgpack") }),
        request(b"deadline", Header { key: names::DEADLINE.into(), value: Bytes::from_static(b"soon") }),
        // The last type header is read: one that is not UTF-8 names no handler.
        request(b"type", Header { key: names::TYPE.into(), value: Bytes::from_static(&[0xff, 0xfe]) }),
    ];
    env.transport.produce(&topic, partition_for_key(b"store-3", 4), records).await.unwrap();
    let mut reader = env.transport.reader(&replies, 0).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < 3 {
        let from = start + got.len() as i64;
        got.extend(reader.fetch(from, Duration::from_millis(200)).await.unwrap());
        assert!(tokio::time::Instant::now() < deadline, "{} of 3 replies within 20 s", got.len());
    }
    for (reply, correlation) in got.iter().zip([&b"codec"[..], b"deadline", b"type"]) {
        assert_eq!(reply.record.header(names::CORRELATION_ID).map(|v| v.as_ref()), Some(correlation));
        assert_eq!(reply.record.header(names::ERROR_CODE).map(|v| v.as_ref()), Some(&b"BAD_REQUEST"[..]), "{:?}", reply.record);
    }
    let stats = server.stats();
    assert_eq!((stats.bad_request(), stats.unroutable()), (3, 0));
    server.shutdown().await.unwrap();
}

/// A reply is stamped when it was made: after its handler ran, not when its request
/// was picked up.
async fn a_reply_is_stamped_after_its_handler(env: Env) {
    let topic = unique("stamp");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let client = env.client(&topic).timeout(Duration::from_secs(30)).start().await.unwrap();
    let (replies, partition) = client.reply_address();
    let (replies, start) = (replies.to_owned(), env.transport.latest_offset(replies, partition).await.unwrap());
    let ms = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let sent = ms(std::time::SystemTime::now());
    client.request(Slow { ms: 300 }).await.unwrap();
    let answered = ms(std::time::SystemTime::now());
    let mut reader = env.transport.reader(&replies, partition).await.unwrap();
    let reply = reader.fetch(start, Duration::from_secs(5)).await.unwrap().into_iter().next().expect("the reply is in the log");
    let stamp = reply.record.timestamp_ms;
    assert!(stamp >= sent + 300 && stamp <= answered, "stamped {stamp}, sent {sent}, answered {answered}");
    server.shutdown().await.unwrap();
}

async fn restarted_server_resumes_after_committed_offsets(env: Env) {
    let topic = unique("resume");
    let seen = SeenState::default();
    let client = env.client(&topic).timeout(Duration::from_secs(30)).start().await.unwrap();
    let server = start_server(&env, &topic, seen.clone()).await;
    for seq in 0..20 {
        client.request(Append { key: format!("k{}", seq % 5), seq }).await.unwrap();
    }
    server.shutdown().await.unwrap();
    assert_eq!(seen.calls.load(Ordering::SeqCst), 20);

    // Sent while no server runs; the next one must handle exactly these.
    let waiting: Vec<_> = (20..30).map(|seq| tokio::spawn(client.request(Append { key: format!("k{}", seq % 5), seq }))).collect();
    let server = start_server(&env, &topic, seen.clone()).await;
    for call in waiting {
        call.await.unwrap().unwrap();
    }
    assert_eq!(seen.calls.load(Ordering::SeqCst), 30, "nothing handled twice, nothing lost");
    server.shutdown().await.unwrap();
}

async fn backpressure_waits_or_refuses(env: Env) {
    let topic = unique("backpressure");
    let seen = SeenState::default();
    let server = start_server(&env, &topic, seen.clone()).await;
    let refusing = env.client(&topic).max_in_flight(2).backpressure(Backpressure::Fail).start().await.unwrap();
    let a = refusing.request(Slow { ms: 300 });
    let b = refusing.request(Slow { ms: 300 });
    assert!(matches!(refusing.request(Slow { ms: 1 }).await, Err(RpcError::Busy(2))));
    assert_eq!((a.await.unwrap(), b.await.unwrap()), (300, 300));

    // Slow requests go round-robin over 4 partitions, so without the bound 4 would run at once.
    seen.most_running.store(0, Ordering::SeqCst);
    let waiting = env.client(&topic).max_in_flight(2).timeout(Duration::from_secs(30)).start().await.unwrap();
    let calls: Vec<_> = (0..8).map(|_| tokio::spawn(waiting.request(Slow { ms: 100 }))).collect();
    assert_eq!(waiting.in_flight(), 8, "all calls are registered at once");
    assert!(waiting.stats().sent_unanswered() <= 2);
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), 100);
    }
    assert_eq!(seen.most_running.load(Ordering::SeqCst), 2, "the bound must hold and be used");
    assert_eq!(waiting.in_flight(), 0);
    server.shutdown().await.unwrap();
}

async fn json_clients_get_json_replies(env: Env) {
    let topic = unique("json");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let client = env.client(&topic).content_type(ContentType::Json).start().await.unwrap();
    let reply = client.request(Echo { key: "j".into(), n: 3 }).await.unwrap();
    assert_eq!(reply, ("j".to_string(), 3));
    server.shutdown().await.unwrap();
}

/// A zero commit interval cannot mean "commit after every record" (commits are
/// periodic), and was silently taken as 1 ms: refused at start, as Spring refuses an
/// `ackTime` of 0, with the setting named.
async fn a_zero_commit_interval_is_refused_at_start(env: Env) {
    let topic = unique("zero-commit");
    match env.server(&topic).handler(echo).commit_interval(Duration::ZERO).start().await {
        Err(kafka_rpc::server::ServerError::Config(e)) => assert_eq!(e.setting, "commit_interval", "{e}"),
        Err(e) => panic!("a zero commit interval should be refused as a setting, got {e:?}"),
        Ok(server) => {
            let _ = server.shutdown().await;
            panic!("a zero commit interval should be refused at start")
        }
    }
}

/// A zero shutdown timeout means "do not wait for running handlers", not "do not
/// commit": what was finished is committed, on a broker whose commit takes a round
/// trip too. (The workers, not waited for, are reported abandoned.)
async fn a_zero_shutdown_timeout_still_commits_what_was_finished(env: Env) {
    let topic = unique("zero-shutdown");
    let group = format!("{topic}.server");
    let server = env.server(&topic).partitions(1).handler(echo).shutdown_timeout(Duration::ZERO).start().await.unwrap();
    let client = env.client(&topic).partitions(1).start().await.unwrap();
    assert_eq!(client.request(Echo { key: "z".into(), n: 1 }).await.unwrap(), ("z".to_string(), 1));
    client.shutdown().await;
    // Its worker is idle: nothing to abandon, so nothing to report.
    if let Err(e) = server.shutdown().await {
        panic!("the finished request should be committed and nothing abandoned, got {e:?}");
    }
    // The group's next member resumes past the answered request.
    let mut member = env.transport.join_group(&group, std::slice::from_ref(&topic), OffsetReset::Earliest).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(30), member.events.recv()).await {
        Ok(Some(kafka_rpc::transport::GroupEvent::Assigned(owned))) => {
            assert_eq!(owned.iter().map(|a| a.offset).collect::<Vec<_>>(), [1], "resumes after the committed request")
        }
        other => panic!("expected an assignment, got {other:?}"),
    }
    let _ = member.handle.leave().await;
}

async fn a_client_can_read_every_reply_partition(env: Env) {
    let topic = unique("all-replies");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let all = env.client(&topic).reply_partitions(ReplyPartitions::All).start().await.unwrap();
    let (_, pinned) = all.reply_address();
    // A neighbour on the same reply topic, pinned to a partition `all` does not advertise.
    let elsewhere = (pinned + 1) % 4;
    let neighbour = env.client(&topic).reply_partitions(ReplyPartitions::Pinned(Some(elsewhere))).start().await.unwrap();
    assert_eq!(neighbour.reply_address().1, elsewhere);

    assert_eq!(all.request(Echo { key: "a".into(), n: 1 }).await.unwrap(), ("a".to_string(), 1));
    for n in 0..10 {
        neighbour.request(Echo { key: "b".into(), n }).await.unwrap();
    }
    eventually("the all-partitions client sees the neighbour's replies on another partition", Duration::from_secs(20), || async {
        all.stats().replies_ignored() == 10
    })
    .await;
    assert_eq!(all.stats().replies_delivered(), 1);
    server.shutdown().await.unwrap();
}

/// A request on the request topic names another service's (existing) topic as its reply
/// topic: nothing may be written there, and legitimate requests keep being answered.
async fn a_request_cannot_make_the_server_write_elsewhere(env: Env) {
    let topic = unique("inject");
    let seen = SeenState::default();
    let server = start_server(&env, &topic, seen.clone()).await;
    let client = env.client(&topic).start().await.unwrap();
    let victim = unique("user-profiles");
    env.transport.ensure_topic(&victim, 1).await.unwrap();
    let key = "user-42";
    let forged = |reply_topic: &str, reply_partition: Option<i32>, request_type: &'static str, payload: Vec<u8>| {
        let mut record = Record::new(Some(key.as_bytes().to_vec()), payload);
        record.headers = kafka_rpc::__private::wire::request_headers(&kafka_rpc::__private::wire::RequestMeta {
            request_type: Some(request_type.into()),
            correlation_id: Some(Bytes::from_static(&[4; 16])),
            reply_to: Some(kafka_rpc::__private::wire::ReplyAddress { topic: reply_topic.to_string().into(), partition: reply_partition }),
            content_type: ContentType::Bincode,
            deadline_ms: None,
            ..Default::default()
        });
        record
    };
    let append = ContentType::Bincode.encode(&Append { key: key.into(), seq: 1 }).unwrap();
    let records = vec![
        // Unknown type: the error reply would be the tombstone (user-42, null) in the victim.
        forged(&victim, None, "no.such.type", Vec::new()),
        forged(&victim, Some(0), "test.append", append.clone()),
        // An allowed reply topic, but a partition it does not have.
        forged(&format!("{topic}.replies"), Some(999), "test.append", append),
    ];
    env.transport.produce(&topic, partition_for_key(key.as_bytes(), 4), records).await.unwrap();
    // Same key, same partition: answered only after the forged records were dealt with.
    let ok = client.request(Echo { key: key.into(), n: 5 }).await.unwrap();
    assert_eq!(ok, (key.to_string(), 5));
    assert_eq!(server.stats().replies_refused(), 3);
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0, "a request that cannot be answered is not run");
    assert_eq!(env.transport.latest_offset(&victim, 0).await.unwrap(), 0, "nothing written to the victim topic");
    server.shutdown().await.unwrap();
}

/// One reply over the maximum among normal ones on the same reply partition: the others
/// get their replies, the big one a typed error, and the partition moves on.
async fn an_oversized_reply_fails_alone(env: Env) {
    let topic = unique("oversized");
    let server = start_configured(env.server(&topic).max_reply_bytes(10_000).linger(Duration::from_millis(20)), SeenState::default()).await;
    let client = env.client(&topic).timeout(Duration::from_secs(30)).start().await.unwrap();
    let calls: Vec<_> = (0..21)
        .map(|n| tokio::spawn(client.request(Big { key: "same-key".into(), size: if n == 10 { 50_000 } else { 100 } })))
        .collect();
    for (n, call) in calls.into_iter().enumerate() {
        let outcome = call.await.unwrap();
        if n == 10 {
            let err = outcome.unwrap_err();
            assert_eq!(err.code(), Some(&ErrorCode::ReplyTooLarge), "{err:?}");
        } else {
            assert_eq!(outcome.unwrap().len(), 100, "request {n}");
        }
    }
    assert_eq!(server.stats().replies_too_large(), 1);
    assert_eq!(client.request(Big { key: "same-key".into(), size: 5 }).await.unwrap().len(), 5);
    server.shutdown().await.unwrap();
}

/// A handler that never finishes is stopped at the server's default timeout: the caller
/// gets HANDLER_TIMEOUT, the handler's cancellation fires, the partition moves on.
async fn a_hung_handler_is_stopped_at_the_default_timeout(env: Env) {
    let topic = unique("hung");
    let seen = SeenState::default();
    let server = start_configured(env.server(&topic).handler_timeout(Duration::from_millis(300)), seen.clone()).await;
    let client = env.client(&topic).timeout(Duration::from_secs(30)).start().await.unwrap();
    let err = client.request(Hang { key: "k".into() }).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::HandlerTimeout), "{err:?}");
    eventually("the handler's cancellation fired", Duration::from_secs(10), || async {
        seen.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(client.request(Echo { key: "k".into(), n: 2 }).await.unwrap(), ("k".to_string(), 2));
    server.shutdown().await.unwrap();
}

/// Holds what must not be dropped where the server drops it (say a blocking runtime,
/// which panics when dropped in async code).
struct PanicsWhenDropped;
impl Drop for PanicsWhenDropped {
    fn drop(&mut self) {
        panic!("dropped where it must not be")
    }
}

async fn hang_holding_a_panicky_value(_req: Hang) -> Result<(), RemoteError> {
    let _held = PanicsWhenDropped;
    std::future::pending().await
}

/// A handler whose future panics when it is dropped at its time limit: the caller still
/// gets HANDLER_TIMEOUT, and the partition's worker lives on to serve the next request.
async fn a_handler_that_panics_when_dropped_at_its_limit_does_not_kill_its_partition(env: Env) {
    let topic = unique("drop-panic");
    let server = env
        .server(&topic)
        .handler_timeout(Duration::from_millis(200))
        .handler(hang_holding_a_panicky_value)
        .handler(echo)
        .start()
        .await
        .expect("server starts");
    let client = env.client(&topic).timeout(Duration::from_secs(10)).start().await.unwrap();
    let err = client.request(Hang { key: "k".into() }).await.unwrap_err();
    assert_eq!(err.code(), Some(&ErrorCode::HandlerTimeout), "{err:?}");
    // Same key, same partition: its worker must still be there.
    assert_eq!(client.request(Echo { key: "k".into(), n: 3 }).await.unwrap(), ("k".to_string(), 3));
    assert_eq!(server.stats().failed(), 1);
    server.shutdown().await.unwrap();
}

/// Shutting down fires the running handler's cancellation: a handler that watches it
/// ends at once, its reply is still produced, and shutdown does not wait out its timeout.
async fn shutdown_cancels_the_running_handler(env: Env) {
    let topic = unique("cancel-on-stop");
    let seen = SeenState::default();
    let server = start_configured(env.server(&topic).shutdown_timeout(Duration::from_secs(60)), seen.clone()).await;
    let client = env.client(&topic).timeout(Duration::from_secs(60)).start().await.unwrap();
    let call = tokio::spawn(client.request(UntilCancelled));
    eventually("the handler runs", Duration::from_secs(20), || async { seen.running.load(Ordering::SeqCst) == 1 }).await;
    let started = std::time::Instant::now();
    server.shutdown().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(20), "shutdown waited {:?}", started.elapsed());
    assert_eq!(call.await.unwrap().unwrap(), "cancelled");
}

/// Error replies repeat only a bounded, single-line excerpt of what the request carried.
async fn error_replies_echo_bounded_text(env: Env) {
    let topic = unique("bounded");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let client = env.client(&topic).start().await.unwrap();
    let long_type = format!("evil\n{}", "x".repeat(20_000));
    let options = RequestOptions::new().header(names::TYPE, Bytes::from(long_type.into_bytes()));
    let err = match client.request_with(Nobody, options).await {
        Err(RpcError::Remote(e)) => e,
        other => panic!("expected a remote error, got {other:?}"),
    };
    assert_eq!(err.code, ErrorCode::UnknownType);
    assert!(err.message.len() < 400, "{} bytes echoed", err.message.len());
    assert!(!err.message.contains('\n'), "{:?}", err.message);
    server.shutdown().await.unwrap();

    // Panic details reach callers only when the server opts in.
    let topic = unique("panic-details");
    let server = start_configured(env.server(&topic).send_panic_details(true), SeenState::default()).await;
    let client = env.client(&topic).start().await.unwrap();
    let err = client.request(Explode { key: "store-1".into() }).await.unwrap_err();
    assert!(err.to_string().contains("handler blew up on store-1"), "{err}");
    server.shutdown().await.unwrap();
}

/// Calls beyond the in-flight bound queue, but only up to `max_queued`: then they fail
/// fast with `Busy` instead of growing the client's memory.
async fn queued_calls_are_bounded(env: Env) {
    let topic = unique("queued");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let client = env.client(&topic).max_in_flight(1).max_queued(2).timeout(Duration::from_secs(30)).start().await.unwrap();
    let accepted: Vec<_> = (0..3).map(|_| tokio::spawn(client.request(Slow { ms: 200 }))).collect();
    assert!(matches!(client.request(Slow { ms: 1 }).await, Err(RpcError::Busy(3))));
    for call in accepted {
        assert_eq!(call.await.unwrap().unwrap(), 200);
    }
    assert_eq!(client.request(Slow { ms: 1 }).await.unwrap(), 1, "room again once they are answered");
    server.shutdown().await.unwrap();
}

/// Calls given up on while queued behind a call that waits for a slot leave their
/// records in the key's queue until a slot frees: they count against `max_queued` until
/// then, or a caller that retries on its own timeouts while the server is stalled would
/// grow the client's memory without bound.
async fn calls_dropped_while_queued_stay_bounded(env: Env) {
    let topic = unique("dropped-queued");
    // No server: the first request holds the only slot for the whole test.
    let client = env.client(&topic).max_in_flight(1).max_queued(2).timeout(Duration::from_secs(60)).start().await.unwrap();
    let held = client.request(Echo { key: "k".into(), n: 0 });
    eventually("the first call is sent", Duration::from_secs(20), || async { client.stats().sent_unanswered() == 1 }).await;
    let waiting = client.request(Echo { key: "k".into(), n: 1 });
    let mut refused = 0;
    for n in 2..1_000 {
        // Queued behind `waiting`, then given up on at once, or refused.
        match futures::FutureExt::now_or_never(client.request(Echo { key: "k".into(), n })) {
            Some(Err(RpcError::Busy(3))) => refused += 1,
            None => {}
            Some(other) => panic!("call {n}: {other:?}"),
        }
    }
    assert!(refused > 0, "998 calls queued and dropped behind a waiting one; none was refused");
    drop((held, waiting));
    client.shutdown().await;
}

/// Headers a caller adds cannot replace those its reply is routed by: a gateway that
/// forwards an incoming request's headers still gets its own call's reply.
async fn forwarded_headers_do_not_reroute_the_reply(env: Env) {
    let topic = unique("forwarded");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let client = env.client(&topic).timeout(Duration::from_secs(5)).start().await.unwrap();
    let upstream = RequestOptions::new()
        .header(names::CORRELATION_ID, Bytes::from_static(&[7; 16]))
        .header(names::REPLY_TOPIC, Bytes::from_static(b"upstream.replies"))
        .header(names::REPLY_PARTITION, Bytes::from_static(&[0, 0, 0, 0]))
        .header("x-tenant", Bytes::from_static(b"t1"));
    let reply = client.request_with(Echo { key: "g".into(), n: 5 }, upstream).await;
    assert_eq!(reply.unwrap(), ("g".to_string(), 5));
    assert_eq!(client.in_flight(), 0);
    server.shutdown().await.unwrap();
}

/// Kafka's headers are a list: a handler sees a header its caller named twice both
/// times, in order.
async fn a_handler_sees_every_value_of_a_repeated_header(env: Env) {
    let topic = unique("tags");
    let server = start_server(&env, &topic, SeenState::default()).await;
    let client = env.client(&topic).timeout(Duration::from_secs(20)).start().await.unwrap();
    let options = RequestOptions::new()
        .header("x-tag", Bytes::from_static(b"a"))
        .header("x-other", Bytes::from_static(b"-"))
        .header("x-tag", Bytes::from_static(b"b"));
    assert_eq!(client.request_with(Tags, options).await.unwrap(), ["a", "b"]);
    server.shutdown().await.unwrap();
}

/// A partition count no broker would create (Kafka's controller refuses more than
/// 10,000 partitions in one request) is refused with a typed error, before anything is
/// allocated or sent: it must not take the process down with it.
async fn an_absurd_partition_count_is_refused(env: Env) {
    let topic = unique("absurd");
    for absurd in [i32::MAX, kafka_rpc::transport::MAX_PARTITIONS + 1] {
        match env.transport.ensure_topic(&topic, absurd).await {
            Err(TransportError::TopicCreation { topic: named, reason }) => {
                assert_eq!(named, topic);
                assert!(reason.contains(&absurd.to_string()), "the reason names the count: {reason}");
            }
            other => panic!("{absurd} partitions should be refused, got {other:?}"),
        }
    }
    assert!(env.transport.partition_count(&topic).await.is_err(), "nothing was created");
    match env.server(&topic).partitions(i32::MAX).handler(echo).start().await {
        Err(kafka_rpc::server::ServerError::Transport(TransportError::TopicCreation { .. })) => {}
        Err(e) => panic!("a server asked for i32::MAX partitions should fail to create its topic, got {e:?}"),
        Ok(_) => panic!("a server asked for i32::MAX partitions should fail to create its topic"),
    }
}

on_every_transport!(
    an_absurd_partition_count_is_refused,
    shutdown_cancels_the_running_handler,
    a_handler_that_panics_when_dropped_at_its_limit_does_not_kill_its_partition,
    queued_calls_are_bounded,
    a_request_cannot_make_the_server_write_elsewhere,
    an_oversized_reply_fails_alone,
    a_hung_handler_is_stopped_at_the_default_timeout,
    error_replies_echo_bounded_text,
    a_client_can_read_every_reply_partition,
    three_clients_share_a_reply_topic,
    timeout_returns_error_and_late_reply_is_ignored,
    a_timeout_beyond_the_clock_is_no_limit,
    cancellation_and_mixed_outcomes_leave_nothing_pending,
    handler_error_becomes_typed_remote_error,
    panic_becomes_error_reply_and_server_keeps_serving,
    unknown_type_is_named_in_the_error,
    poison_records_do_not_block_the_partition,
    per_key_order_holds_under_concurrency,
    records_without_reply_headers_are_events,
    expired_requests_are_skipped,
    shutdown_fails_pending_requests,
    foreign_style_request_gets_verbatim_correlation_id,
    a_request_with_an_unreadable_codec_or_deadline_is_answered_bad_request,
    a_reply_is_stamped_after_its_handler,
    restarted_server_resumes_after_committed_offsets,
    backpressure_waits_or_refuses,
    json_clients_get_json_replies,
    a_zero_commit_interval_is_refused_at_start,
    a_zero_shutdown_timeout_still_commits_what_was_finished,
    calls_dropped_while_queued_stay_bounded,
    forwarded_headers_do_not_reroute_the_reply,
    a_handler_sees_every_value_of_a_repeated_header,
);

/// A request topic grows from 2 to 4 partitions. Java and Node producers send a key to
/// `murmur2 % 4` once their metadata is refreshed (5 minutes at most, by default); a
/// client that kept its start-up count would send it to another partition for good,
/// out of order with theirs.
#[tokio::test(start_paused = true)]
async fn a_client_routes_keys_by_the_grown_partition_count() {
    let broker = EmbeddedBroker::new();
    broker.ensure_topic("grown", 4).await.unwrap();
    let grown = Arc::new(Growing::new(broker.clone(), "grown", 2));
    let client = ReplyingClient::builder(grown.clone(), "grown").timeout(Duration::from_millis(500)).start().await.unwrap();
    grown.reported.store(4, Ordering::SeqCst);
    // Paused time: the clock jumps past the metadata age.
    tokio::time::sleep(Duration::from_secs(301)).await;
    let key = (0..).map(|i| format!("key-{i}")).find(|k| partition_for_key(&k.key_bytes(), 2) != partition_for_key(&k.key_bytes(), 4)).unwrap();
    let _ = client.request(Echo { key: key.clone(), n: 1 }).await;
    let mut landed = Vec::new();
    for p in 0..4 {
        if broker.latest_offset("grown", p).await.unwrap() > 0 {
            landed.push(p);
        }
    }
    let java = partition_for_key(&key.key_bytes(), 4);
    assert_eq!(landed, [java], "key {key}: a Java producer sends it to partition {java} of 4");
    client.shutdown().await;
}

/// `max_in_flight(usize::MAX)`, "no bound", is a setting like any other, not a panic.
#[tokio::test]
async fn an_unbounded_in_flight_setting_starts_and_serves() {
    let broker = EmbeddedBroker::new();
    let server = RpcServer::builder(broker.clone(), "unbounded").handler(echo).start().await.unwrap();
    let client = ReplyingClient::builder(broker, "unbounded").max_in_flight(usize::MAX).start().await.unwrap();
    assert_eq!(client.request(Echo { key: "u".into(), n: 1 }).await.unwrap(), ("u".to_string(), 1));
    assert_eq!(client.stats().sent_unanswered(), 0);
    client.shutdown().await;
    server.shutdown().await.unwrap();
}

/// `max_batch(usize::MAX)`, "batch whatever queued up", is a setting like any other: a
/// partition's produce path once reserved room for that many records up front, which
/// panicked ("capacity overflow") in its task, and every call to the partition waited
/// out its timeout unsent.
#[tokio::test]
async fn an_unbounded_produce_batch_setting_sends() {
    let broker = EmbeddedBroker::new();
    let server = RpcServer::builder(broker.clone(), "unbounded-batch").handler(echo).start().await.unwrap();
    let client = ReplyingClient::builder(broker, "unbounded-batch")
        .max_batch(usize::MAX)
        .timeout(Duration::from_secs(10))
        .start()
        .await
        .unwrap();
    assert_eq!(client.request(Echo { key: "b".into(), n: 1 }).await.unwrap(), ("b".to_string(), 1));
    client.shutdown().await;
    server.shutdown().await.unwrap();
}

/// A fault a [`Faulty`] transport has.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Creating a topic never answers.
    TopicCreation,
    /// A partition-count look-up never answers (a broker that stopped answering metadata).
    PartitionCount,
    /// A produce never answers.
    Produce,
    /// Joining a group never answers.
    GroupJoin,
    /// Reading a reply topic panics (a custom transport's bug under the client's reply
    /// listener).
    ReplyReaderPanics,
}

/// The embedded broker with `faults`: a call that never answers is a broker that
/// accepted the connection and went silent, behind a transport without its own time
/// limit.
struct Faulty {
    inner: EmbeddedBroker,
    faults: &'static [Fault],
}

impl Faulty {
    fn new(faults: &'static [Fault]) -> Self {
        Faulty { inner: EmbeddedBroker::new(), faults }
    }

    /// Never returns if `fault` is one of this transport's.
    async fn stall_on(&self, fault: Fault) {
        if self.faults.contains(&fault) {
            std::future::pending::<()>().await;
        }
    }
}

#[async_trait::async_trait]
impl Transport for Faulty {
    async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<i32, TransportError> {
        self.stall_on(Fault::TopicCreation).await;
        self.inner.ensure_topic(topic, partitions).await
    }
    async fn partition_count(&self, topic: &str) -> Result<i32, TransportError> {
        self.stall_on(Fault::PartitionCount).await;
        self.inner.partition_count(topic).await
    }
    async fn produce(&self, topic: &str, partition: i32, records: Vec<Record>) -> Result<i64, ProduceError> {
        self.stall_on(Fault::Produce).await;
        self.inner.produce(topic, partition, records).await
    }
    async fn latest_offset(&self, topic: &str, partition: i32) -> Result<i64, TransportError> {
        self.inner.latest_offset(topic, partition).await
    }
    async fn reader(&self, topic: &str, partition: i32) -> Result<Box<dyn PartitionReader>, TransportError> {
        if self.faults.contains(&Fault::ReplyReaderPanics) && topic.ends_with(".replies") {
            return Ok(Box::new(PanickingReader));
        }
        self.inner.reader(topic, partition).await
    }
    async fn join_group(&self, group: &str, topics: &[String], reset: OffsetReset) -> Result<GroupMembership, TransportError> {
        self.stall_on(Fault::GroupJoin).await;
        self.inner.join_group(group, topics, reset).await
    }
}

/// `shutdown` returns while the client's periodic partition-count look-up waits on a
/// broker that does not answer, as it does while a reply fetch waits.
#[tokio::test(start_paused = true)]
async fn shutdown_does_not_wait_for_a_stalled_partition_count_lookup() {
    let client = ReplyingClient::builder(Faulty::new(&[Fault::PartitionCount]), "stalled").start().await.unwrap();
    // Paused time: the clock jumps past the metadata age, to a look-up that never answers.
    tokio::time::sleep(Duration::from_secs(301)).await;
    tokio::time::timeout(Duration::from_secs(60), client.shutdown()).await.expect("shutdown returns");
}

/// `shutdown` returns while a request's produce never answers: the send is abandoned
/// once the client's request timeout has passed (its caller was told `Closed` at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_shutdown_does_not_wait_for_a_produce_that_never_answers() {
    let client = ReplyingClient::builder(Faulty::new(&[Fault::Produce]), "produce-stalls")
        .timeout(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let call = tokio::spawn(client.request(Echo { key: "k".into(), n: 1 }));
    eventually("the request is handed to the transport", Duration::from_secs(10), || {
        let sent = client.stats().sent_unanswered();
        async move { sent == 1 }
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), client.shutdown()).await.expect("shutdown returns");
    assert!(matches!(call.await.unwrap(), Err(RpcError::Closed | RpcError::Timeout(_))));
}

/// A reply topic grows from 1 to 4 partitions. A client started since pins a reply
/// partition the server's cached count (trusted for 60 s) does not have yet: the server
/// asks again (if its count is over a second old) before refusing, rather than commit
/// the request unrun and unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_partition_of_a_grown_reply_topic_is_not_refused() {
    let broker = EmbeddedBroker::new();
    broker.ensure_topic("grows.replies", 4).await.unwrap();
    let grown = Arc::new(Growing::new(broker.clone(), "grows.replies", 1));
    let server = RpcServer::builder(grown.clone(), "grows").partitions(1).handler(echo).start().await.unwrap();
    let before = ReplyingClient::builder(grown.clone(), "grows").partitions(1).timeout(Duration::from_secs(10)).start().await.unwrap();
    assert_eq!(before.request(Echo { key: "k".into(), n: 1 }).await.unwrap(), ("k".to_string(), 1));
    grown.reported.store(4, Ordering::SeqCst);
    // A count is asked again at most once a second (each ask lists the broker's topics).
    // Wall time must pass: the count ages by the clock the server reads for deadlines,
    // which no paused runtime moves, and a request sent earlier would be refused.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let after = ReplyingClient::builder(grown.clone(), "grows")
        .partitions(1)
        .reply_partitions(ReplyPartitions::Pinned(Some(3)))
        .timeout(Duration::from_secs(5))
        .start()
        .await
        .unwrap();
    let answer = after.request(Echo { key: "k".into(), n: 2 }).await;
    assert_eq!(server.stats().replies_refused(), 0, "refused by a stale partition count");
    assert_eq!(answer.unwrap(), ("k".to_string(), 2));
    before.shutdown().await;
    after.shutdown().await;
    server.shutdown().await.unwrap();
}

/// A request without a partition key is keyed by its idempotency key: the record
/// carries it as its key (docs/wire-format.md) and lands on its murmur2 partition, so
/// every retry reaches the same partition's window.
#[tokio::test]
async fn a_keyless_request_is_keyed_by_its_idempotency_key() {
    let broker = EmbeddedBroker::new();
    let client = ReplyingClient::builder(broker.clone(), "keyless").timeout(Duration::from_millis(200)).start().await.unwrap();
    let call = client.request_named::<_, ()>("keyless.op", &1u32, RequestOptions::new().idempotency_key("order-42"));
    assert!(matches!(call.await, Err(RpcError::Timeout(_))), "no server answers");
    let partition = partition_for_key(b"order-42", kafka_rpc::defaults::PARTITIONS);
    let mut reader = broker.reader("keyless", partition).await.unwrap();
    let records = reader.fetch(0, Duration::from_millis(100)).await.unwrap();
    assert_eq!(records.len(), 1, "the request is on the idempotency key's partition");
    assert_eq!(records[0].record.key.as_deref(), Some(&b"order-42"[..]));
    client.shutdown().await;
}

/// A request with no handler for its type never reaches a handler, but its
/// `UNKNOWN_TYPE` answer is recorded in the idempotency window like a handler's error:
/// a retry under the same key is answered from the window (docs/guarantees.md).
#[tokio::test]
async fn an_unknown_type_answer_is_replayed_to_a_retry_with_its_key() {
    use kafka_rpc::server::idempotency::MemoryWindow;
    let broker = EmbeddedBroker::new();
    let server = RpcServer::builder(broker.clone(), "unknown-replayed").idempotency(MemoryWindow::new()).handler(echo).start().await.unwrap();
    let client = ReplyingClient::builder(broker, "unknown-replayed").start().await.unwrap();
    for _ in 0..2 {
        let call = client.request_named::<_, ()>("no.such.type", &1u32, RequestOptions::new().idempotency_key("op-1"));
        assert_eq!(call.await.unwrap_err().code(), Some(&ErrorCode::UnknownType));
    }
    assert_eq!(server.stats().duplicates(), 1, "the second UNKNOWN_TYPE came from the window");
    client.shutdown().await;
    server.shutdown().await.unwrap();
}

/// Builder values that cannot work are refused when the server or client starts, with
/// the setting named, as Spring refuses invalid container properties: a zero handler
/// timeout (every handler would time out), a topic handler for a topic the server does
/// not consume (never called), a zero client timeout (every call would time out).
#[tokio::test]
async fn builder_values_that_cannot_work_are_refused_at_start() {
    let broker = EmbeddedBroker::new();
    let refused = |what: &str, outcome: Result<RpcServer, kafka_rpc::server::ServerError>| match outcome {
        Err(e) => e,
        Ok(_) => panic!("{what} should be refused at start"),
    };
    let e = refused("a zero handler timeout", RpcServer::builder(broker.clone(), "cfg").handler(echo).handler_timeout(Duration::ZERO).start().await);
    check_setting(&e, "handler_timeout");
    let options = kafka_rpc::server::handler::HandlerOptions::new().timeout(Duration::ZERO);
    let e = refused("a zero per-handler timeout", RpcServer::builder(broker.clone(), "cfg").handler_with(echo, options).start().await);
    check_setting(&e, "HandlerOptions::timeout");
    let e = refused("a topic handler for another topic", RpcServer::builder(broker.clone(), "cfg").topic_handler("elsewhere", echo).start().await);
    check_setting(&e, "topic_handler");
    let e = refused("a zero reply size", RpcServer::builder(broker.clone(), "cfg").handler(echo).max_reply_bytes(0).start().await);
    check_setting(&e, "max_reply_bytes");
    match ReplyingClient::builder(broker.clone(), "cfg").timeout(Duration::ZERO).start().await {
        Err(e) => check_setting(&e, "timeout"),
        Ok(_) => panic!("a zero client timeout should be refused at start"),
    }
    // As Kafka's producer refuses a `delivery.timeout.ms` below `linger.ms`: every call
    // would time out before its request left.
    match ReplyingClient::builder(broker.clone(), "cfg").timeout(Duration::from_secs(1)).linger(Duration::from_secs(1)).start().await {
        Err(e) => check_setting(&e, "linger"),
        Ok(_) => panic!("a linger as long as the client timeout should be refused at start"),
    }
    // What is refused is the setting, not the server: the same builder without it serves.
    let server = RpcServer::builder(broker.clone(), "cfg").topic_handler("cfg", echo).start().await.unwrap();
    server.shutdown().await.unwrap();
}

fn check_setting(error: &dyn std::error::Error, setting: &str) {
    let text = error.to_string();
    assert!(text.contains(setting), "the error names `{setting}`: {text}");
}

/// The longest durations every builder takes are settings ("no limit", "no periodic
/// commit"), not an overflow of `Instant + d` in a serving task.
#[tokio::test]
async fn the_longest_durations_are_settings_not_overflows() {
    let broker = EmbeddedBroker::builder().rebalance_timeout(Duration::MAX).build();
    let server = RpcServer::builder(broker.clone(), "longest")
        .partitions(1)
        .commit_interval(Duration::MAX)
        .handler_timeout(Duration::MAX)
        .shutdown_timeout(Duration::MAX)
        .handler(echo)
        .start()
        .await
        .unwrap();
    let client = ReplyingClient::builder(broker.clone(), "longest").partitions(1).timeout(Duration::MAX).start().await.unwrap();
    assert_eq!(client.request(Echo { key: "l".into(), n: 1 }).await.unwrap(), ("l".to_string(), 1));
    assert!(matches!(server.health(), kafka_rpc::server::Health::Serving));
    client.shutdown().await;
    server.shutdown().await.unwrap();
    assert_eq!(broker.committed_offset("longest.server", &kafka_rpc::transport::TopicPartition::new("longest", 0)), Some(1));
}

/// A zero rebalance timeout on the embedded broker would expel every member at its
/// first revocation (no server can stop its workers and commit in no time), so the
/// second instance of a service would end the first. It is refused when joining, with
/// the setting named, as Kafka's consumer refuses `max.poll.interval.ms` below 1.
#[tokio::test]
async fn a_zero_embedded_rebalance_timeout_is_refused_when_joining() {
    let broker = EmbeddedBroker::builder().rebalance_timeout(Duration::ZERO).build();
    match RpcServer::builder(broker, "zero-rebalance").handler(echo).start().await {
        Err(e) => check_setting(&e, "rebalance_timeout"),
        Ok(_) => panic!("a zero rebalance timeout should be refused when the server joins its group"),
    }
}

struct PanickingReader;

#[async_trait::async_trait]
impl PartitionReader for PanickingReader {
    async fn read(&mut self, _offset: i64, _max_wait: Duration) -> Result<kafka_rpc::transport::Fetch, TransportError> {
        panic!("a custom transport's reply reader failed (test)")
    }
}

/// A client whose reply listener died can never complete a call: its calls fail with
/// `Closed` at once, and new ones are refused, instead of each waiting out its timeout.
#[tokio::test]
async fn a_client_whose_reply_listener_dies_fails_its_calls_at_once() {
    let client = ReplyingClient::builder(Faulty::new(&[Fault::ReplyReaderPanics]), "listener-dies")
        .timeout(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let call = tokio::time::timeout(Duration::from_secs(10), client.request(Echo { key: "a".into(), n: 1 })).await;
    match call {
        Ok(Err(RpcError::Closed)) => {}
        other => panic!("the call should fail with Closed once the listener died, got {other:?}"),
    }
    assert!(matches!(client.request(Echo { key: "b".into(), n: 2 }).await, Err(RpcError::Closed)), "new calls are refused");
}

/// Calls made at once from several threads, each kept pending (no server answers):
/// the futures not refused `Busy` on their first poll.
async fn accepted_at_once(client: &ReplyingClient, threads: usize, calls: usize) -> Vec<std::pin::Pin<Box<dyn std::future::Future<Output = Result<(String, u64), RpcError>> + Send>>> {
    let start = Arc::new(tokio::sync::Barrier::new(threads));
    let callers: Vec<_> = (0..threads)
        .map(|t| {
            let (client, start) = (client.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let mut kept = Vec::new();
                for n in 0..calls as u64 {
                    let mut call: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
                        Box::pin(client.request(Echo { key: format!("{t}-{n}"), n }));
                    match futures::FutureExt::now_or_never(&mut call) {
                        Some(Err(RpcError::Busy(_))) => {}
                        None => kept.push(call),
                        Some(other) => panic!("call {t}-{n}: {other:?}"),
                    }
                }
                kept
            })
        })
        .collect();
    let mut kept = Vec::new();
    for caller in callers {
        kept.extend(caller.await.unwrap());
    }
    kept
}

/// With `Backpressure::Fail`, `max_in_flight` is a limit, not a target: callers racing
/// from several threads once all saw room left and were all accepted, a few past it.
/// A call given up on (dropped before or after it was sent) gives its room back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_backpressure_admits_no_more_than_max_in_flight_under_concurrency() {
    const MAX: usize = 4;
    // No server: accepted calls stay pending until dropped.
    let client = ReplyingClient::builder(EmbeddedBroker::new(), "fail-fast")
        .max_in_flight(MAX)
        .backpressure(Backpressure::Fail)
        .timeout(Duration::from_secs(600))
        .start()
        .await
        .unwrap();
    let mut most = 0;
    // The race is narrow (a few hundred rounds to see it once): try it often.
    for round in 0..3_000 {
        let kept = accepted_at_once(&client, 4, 3 * MAX).await;
        most = most.max(kept.len());
        assert!(kept.len() <= MAX, "round {round}: {} calls accepted with max_in_flight {MAX}", kept.len());
        // Given up on, sent or not: every one's room must come back.
        drop(kept);
        eventually("the dropped calls' room comes back", Duration::from_secs(10), || {
            let client = client.clone();
            async move {
                let mut probes: Vec<_> = (0..MAX as u64).map(|n| Box::pin(client.request(Echo { key: format!("p{n}"), n }))).collect();
                probes.iter_mut().all(|p| futures::FutureExt::now_or_never(p).is_none())
            }
        })
        .await;
    }
    assert_eq!(most, MAX, "the limit was reached");
    assert_eq!(client.in_flight(), 0);
    client.shutdown().await;
}

/// A batch of zero records cannot be sent (client) or handled (server); the value was
/// silently taken as 1, though elsewhere 0 often means "no limit". Refused at start,
/// with the setting named.
#[tokio::test]
async fn a_zero_batch_size_is_refused_at_start() {
    let broker = EmbeddedBroker::new();
    client_refuses(ReplyingClient::builder(broker.clone(), "zero-batch").max_batch(0).start().await, "max_batch");
    server_refuses(RpcServer::builder(broker.clone(), "zero-batch").handler(echo).max_batch(0).start().await, "max_batch");
}

/// `started` is the client's refusal of `setting`, as a setting.
fn client_refuses(started: Result<ReplyingClient, RpcError>, setting: &str) {
    match started {
        Err(RpcError::Config(e)) => assert_eq!(e.setting, setting, "{e}"),
        Err(e) => panic!("the client's {setting} should be refused as a setting, got {e:?}"),
        Ok(_) => panic!("the client's {setting} should be refused at start"),
    }
}

/// `started` is the server's refusal of `setting`, as a setting.
fn server_refuses(started: Result<RpcServer, kafka_rpc::server::ServerError>, setting: &str) {
    match started {
        Err(kafka_rpc::server::ServerError::Config(e)) => assert_eq!(e.setting, setting, "{e}"),
        Err(e) => panic!("the server's {setting} should be refused as a setting, got {e:?}"),
        Ok(_) => panic!("the server's {setting} should be refused at start"),
    }
}

/// An embedded broker keeping zero bytes per partition drops every record as soon as
/// the next one arrives (the newest is always kept): a reader behind by one record
/// loses it, so requests and replies vanish under any concurrency. Refused when a topic
/// is created, the broker's first use (building it cannot fail).
#[tokio::test]
async fn a_zero_retention_is_refused_when_a_topic_is_created() {
    let broker = EmbeddedBroker::builder().retention_bytes(0).build();
    match broker.ensure_topic("zero-retention", 1).await {
        Err(TransportError::Config(e)) => assert_eq!(e.setting, "retention_bytes", "{e}"),
        other => panic!("a zero retention should be refused as a setting, got {other:?}"),
    }
    match ReplyingClient::builder(broker, "zero-retention").start().await {
        Err(RpcError::Transport(TransportError::Config(e))) => assert_eq!(e.setting, "retention_bytes", "{e}"),
        Err(e) => panic!("a client on it should fail with the setting, got {e:?}"),
        Ok(_) => panic!("a client on a zero-retention broker should fail to start"),
    }
}

/// Far longer than any start should take; paused time jumps there at once.
const FOR_EVER: Duration = Duration::from_secs(24 * 3600);

/// `start` on a transport whose topic creation never answers fails with a typed
/// error after the transport's start timeout (60 s by default, Kafka's
/// `default.api.timeout.ms`), as everything else in the crate is bounded; it waited for
/// ever.
#[tokio::test(start_paused = true)]
async fn a_start_whose_topic_creation_never_answers_times_out() {
    let stalls = || Faulty::new(&[Fault::TopicCreation]);
    let began = tokio::time::Instant::now();
    match tokio::time::timeout(FOR_EVER, ReplyingClient::builder(stalls(), "stalled-topic").start()).await {
        Ok(Err(RpcError::Transport(TransportError::TimedOut { operation, timeout }))) => {
            assert!(operation.contains("stalled-topic"), "the operation names the topic: {operation}");
            assert_eq!(timeout, kafka_rpc::transport::DEFAULT_START_TIMEOUT);
        }
        Ok(Err(e)) => panic!("the client should time out starting, got {e:?}"),
        Ok(Ok(_)) => panic!("the client cannot start without its topics"),
        Err(_) => panic!("the client's start waited for ever on a topic creation that never answers"),
    }
    assert_eq!(began.elapsed(), kafka_rpc::transport::DEFAULT_START_TIMEOUT);
    match tokio::time::timeout(FOR_EVER, RpcServer::builder(stalls(), "stalled-topic").handler(echo).start()).await {
        Ok(Err(kafka_rpc::server::ServerError::Transport(TransportError::TimedOut { .. }))) => {}
        Ok(Err(e)) => panic!("the server should time out starting, got {e:?}"),
        Ok(Ok(_)) => panic!("the server cannot start without its topic"),
        Err(_) => panic!("the server's start waited for ever on a topic creation that never answers"),
    }
}

/// `start` on a transport whose group join never answers fails with a typed error
/// after the transport's start timeout; it waited for ever.
#[tokio::test(start_paused = true)]
async fn a_server_start_whose_group_join_never_answers_times_out() {
    let stalls = Faulty::new(&[Fault::GroupJoin]);
    let began = tokio::time::Instant::now();
    match tokio::time::timeout(FOR_EVER, RpcServer::builder(stalls, "stalled-join").handler(echo).start()).await {
        Ok(Err(kafka_rpc::server::ServerError::Transport(TransportError::TimedOut { operation, timeout }))) => {
            assert!(operation.contains("stalled-join.server"), "the operation names the group: {operation}");
            assert_eq!(timeout, kafka_rpc::transport::DEFAULT_START_TIMEOUT);
        }
        Ok(Err(e)) => panic!("the server should time out starting, got {e:?}"),
        Ok(Ok(_)) => panic!("the server cannot start without its group"),
        Err(_) => panic!("the server's start waited for ever on a group join that never answers"),
    }
    assert_eq!(began.elapsed(), kafka_rpc::transport::DEFAULT_START_TIMEOUT);
}

/// No call can be in flight under a bound of zero, nor a record handled with none
/// unacknowledged; both were silently taken as 1, though 0 often means "no limit"
/// (Kafka refuses `max.in.flight.requests.per.connection=0` too). Refused at start, with
/// the setting named.
#[tokio::test]
async fn a_zero_in_flight_bound_is_refused_at_start() {
    let broker = EmbeddedBroker::new();
    client_refuses(ReplyingClient::builder(broker.clone(), "zero-bound").max_in_flight(0).start().await, "max_in_flight");
    server_refuses(RpcServer::builder(broker.clone(), "zero-bound").handler(echo).max_unacknowledged(0).start().await, "max_unacknowledged");
}

/// Sleeps `ms` the first time it runs and ignores its cancellation meanwhile; answers at
/// once afterwards.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct StubbornOnce {
    key: String,
    ms: u64,
}
impl Request for StubbornOnce {
    const TYPE: &'static str = "test.stubborn-once";
    type Response = u64;
    fn key(&self) -> Option<Vec<u8>> {
        Some(self.key.key_bytes())
    }
}

async fn stubborn_once(req: StubbornOnce, _ctx: Context, State(seen): State<SeenState>) -> Result<u64, RemoteError> {
    let run = seen.running.fetch_add(1, Ordering::SeqCst);
    if run == 0 {
        // Not `ctx.cancelled()`: a handler that does not look, as most do not.
        tokio::time::sleep(Duration::from_millis(req.ms)).await;
    }
    seen.calls.fetch_add(1, Ordering::SeqCst);
    Ok(run)
}

/// Fails the test at once if `server` stopped serving, naming the error.
fn still_serving(server: &RpcServer, which: &str) {
    if let kafka_rpc::server::Health::Failed(e) = server.health() {
        panic!("the {which} server failed: {e:?}");
    }
}

/// A server whose handler overruns the rebalance timeout while a second server joins is
/// expelled from the group, as a Kafka consumer past `max.poll.interval.ms` is; it then
/// rejoins and serves again, as the Kafka transport's membership does (and a Spring
/// container). On the embedded broker it stopped with `MembershipEnded` when one handler
/// was slow.
///
/// Run on both brokers, but on tansu 0.6 the steps in between differ (as its groups do,
/// docs/guarantees.md, "A member leaving, on tansu"): the second server was not given the
/// slow one's partitions while it held on; nobody owned any until the slow member's own
/// wait ran out and it rejoined, abandoning the handler uncommitted (the Kafka membership
/// commits nothing once its wait is over). So those steps (the second server owning
/// everything, the expelled server's late commit refused, the committed offsets, which
/// only the embedded broker shows) are checked on the embedded broker only.
///
/// With `abandoned`, the handler runs past the group's patience too (the Kafka
/// membership's own wait, one more rebalance timeout on the embedded broker) and past
/// nothing else: the server's shutdown timeout is longer still. The hand-over ends when
/// the group gives up, not when the handler or the shutdown timeout does; the abandoned
/// run never answers, so the caller gets one reply, its successor's; and (embedded) no
/// commit passes the record.
async fn a_server_past_its_rebalance_timeout_rejoins_and_keeps_serving(transport: Arc<dyn Transport>, embedded: Option<EmbeddedBroker>, abandoned: bool) {
    let topic = unique("expelled");
    let slow_ms = if abandoned { 60_000 } else { 3000 };
    let start = |seen: SeenState| {
        RpcServer::builder(transport.clone(), &topic)
            .partitions(4)
            .commit_interval(Duration::from_millis(50))
            // Longer than the slow handler: the revocation waits it out, past the rebalance timeout.
            .shutdown_timeout(Duration::from_millis(slow_ms + 7000))
            .state(seen)
            .handler(echo)
            .handler(stubborn_once)
            .start()
    };
    let client = ReplyingClient::builder(transport.clone(), &topic).partitions(4).timeout(Duration::from_secs(60)).start().await.unwrap();
    let seen = SeenState::default();
    let first = start(seen.clone()).await.expect("first server starts");
    eventually("the first server owns every partition", Duration::from_secs(20), || async { first.assignment().len() == 4 }).await;

    // 3 s against a rebalance timeout of 2 s: the first server is expelled. The embedded
    // group takes a late acknowledgement for one more rebalance timeout, so there the
    // first server lets go by finishing the handler (its commit is refused), then rejoins.
    let slow = tokio::spawn(client.request(StubbornOnce { key: "slow".into(), ms: slow_ms }));
    eventually("the slow handler runs", Duration::from_secs(10), || async { seen.running.load(Ordering::SeqCst) == 1 }).await;
    let second = start(seen.clone()).await.expect("second server starts");

    if embedded.is_some() {
        eventually("the second server takes over while the first is slow", Duration::from_secs(10), || async {
            still_serving(&first, "first");
            second.assignment().len() == 4
        })
        .await;
    }
    eventually("the first server rejoins and serves again", Duration::from_secs(30), || async {
        still_serving(&first, "first");
        still_serving(&second, "second");
        !first.assignment().is_empty() && !second.assignment().is_empty()
    })
    .await;
    assert_eq!(first.assignment().len() + second.assignment().len(), 4, "{:?} / {:?}", first.assignment(), second.assignment());

    let answered = slow.await.unwrap().expect("the slow request is answered");
    assert!(answered <= 1, "run at most twice (by the expelled server and by its successor): {answered}");
    if abandoned {
        assert_eq!(answered, 1, "answered by the run after the abandoned one");
        assert_eq!(seen.calls.load(Ordering::SeqCst), 1, "the abandoned run never finished");
        assert_eq!(client.stats().replies_ignored(), 0, "one reply: the abandoned run sent none");
    } else if embedded.is_some() {
        assert!(first.stats().commit_failures() >= 1, "the expelled server's commit of the slow record is refused");
        // The expelled server answered after its partition moved, and so did its
        // successor: two replies to one request, the second ignored by the client (one
        // reply per request is not promised).
        eventually("the second reply is ignored", Duration::from_secs(10), || async { client.stats().replies_ignored() == 1 }).await;
        assert_eq!(seen.calls.load(Ordering::SeqCst), 2, "both runs finished");
    }
    let calls: Vec<_> = (0..40).map(|n| client.request(Echo { key: format!("k{n}"), n })).collect();
    for (n, reply) in join_all(calls).await.into_iter().enumerate() {
        assert_eq!(reply.expect("every request is answered"), (format!("k{n}"), n as u64));
    }
    still_serving(&first, "first");
    first.shutdown().await.expect("the first server stops cleanly");
    second.shutdown().await.expect("the second server stops cleanly");
    if let Some(broker) = embedded {
        for p in 0..4 {
            let end = broker.latest_offset(&topic, p).await.unwrap();
            let committed = broker.committed_offset(&format!("{topic}.server"), &kafka_rpc::transport::TopicPartition::new(&topic, p));
            assert_eq!(committed.unwrap_or(0), end, "partition {p}: everything handled is committed, nothing past it");
        }
    }
    client.shutdown().await;
}

/// Short, so that a handler overruns it; each broker's own setting.
const REBALANCE: Duration = Duration::from_secs(2);

mod past_the_rebalance_timeout {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded() {
        let broker = EmbeddedBroker::builder().rebalance_timeout(REBALANCE).build();
        a_server_past_its_rebalance_timeout_rejoins_and_keeps_serving(Arc::new(broker.clone()), Some(broker), false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kafka() {
        let transport = support::kafka::connect(support::kafka::config().rebalance_timeout(REBALANCE)).await;
        a_server_past_its_rebalance_timeout_rejoins_and_keeps_serving(Arc::new(transport), None, false).await;
    }
}

mod past_the_groups_patience {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded() {
        let broker = EmbeddedBroker::builder().rebalance_timeout(REBALANCE).build();
        a_server_past_its_rebalance_timeout_rejoins_and_keeps_serving(Arc::new(broker.clone()), Some(broker), true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kafka() {
        let transport = support::kafka::connect(support::kafka::config().rebalance_timeout(REBALANCE)).await;
        a_server_past_its_rebalance_timeout_rejoins_and_keeps_serving(Arc::new(transport), None, true).await;
    }
}
