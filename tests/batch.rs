//! Batch handlers, on every transport: one call per fetched run of a partition's
//! requests, one reply per request, failures kept to the request that failed.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use kafka_rpc::prelude::*;
use kafka_rpc::server::batch::Batch;
use kafka_rpc::server::handler::HandlerOptions;
use kafka_rpc::transport::{Header, Record};
use kafka_rpc::wire::names;
use serde::{Deserialize, Serialize};
use support::{unique, Env};

/// Set a counter's value; `n` is the sender's sequence number.
#[derive(Serialize, Deserialize, Debug, Clone, Request)]
#[request(type = "test.batch.put", response = u64, key = key)]
struct Put {
    key: String,
    n: u64,
}

/// Each call's requests as (key, n).
type Calls = Vec<Vec<(String, u64)>>;

/// What the handler saw, call by call.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Calls>>);

const MAX_BATCH: usize = 16;

/// Answers each request with its own `n`; a multiple of 7 fails alone.
#[handler]
async fn put(batch: Batch<Put>, State(seen): State<Seen>) -> Result<Vec<Result<u64, RemoteError>>, RemoteError> {
    let call: Vec<(String, u64)> = batch.requests().map(|p| (p.key.clone(), p.n)).collect();
    if let Ok(mut seen) = seen.0.lock() {
        seen.push(call);
    }
    Ok(batch
        .requests()
        .map(|p| if p.n % 7 == 0 { Err(RemoteError::new("SEVEN", format!("{} is a multiple of 7", p.n))) } else { Ok(p.n) })
        .collect())
}

async fn each_request_gets_its_own_outcome_in_partition_order(env: Env) {
    let topic = unique("batch-order");
    let seen = Seen::default();
    let server = env.server(&topic).state(seen.clone()).batch_handler(put).max_batch(MAX_BATCH).start().await.expect("server");
    let client = env.client(&topic).timeout(Duration::from_secs(30)).start().await.expect("client");

    // Queued together, so fetches return runs of them and batches form.
    let calls: Vec<_> = (1..=300u64).map(|n| client.request(Put { key: format!("k{}", n % 3), n })).collect();
    let outcomes = join_all(calls).await;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let n = i as u64 + 1;
        match outcome {
            Ok(answer) => assert_eq!(answer, n, "request {n} got another request's answer"),
            Err(RpcError::Remote(e)) if n % 7 == 0 => assert_eq!(e.code.as_str(), "SEVEN", "{e}"),
            Err(e) => panic!("request {n}: {e}"),
        }
    }

    let calls = seen.0.lock().expect("seen").clone();
    assert_eq!(calls.iter().map(Vec::len).sum::<usize>(), 300, "every request was handled exactly once");
    assert!(calls.iter().all(|c| !c.is_empty() && c.len() <= MAX_BATCH), "batch sizes {:?}", calls.iter().map(Vec::len).collect::<Vec<_>>());
    assert!(calls.iter().any(|c| c.len() > 1), "no call got more than one request");
    // Per key, the handler saw the sender's order across and within calls.
    for key in ["k0", "k1", "k2"] {
        let order: Vec<u64> = calls.iter().flatten().filter(|(k, _)| k == key).map(|(_, n)| *n).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{key} handled out of order: {order:?}");
    }
    client.shutdown().await;
    server.shutdown().await.expect("shutdown");
}

/// Fails every call as a whole.
#[handler]
async fn refuse_all(_batch: Batch<Put>) -> Result<Vec<Result<u64, RemoteError>>, RemoteError> {
    Err(RemoteError::new("DB_DOWN", "the store is unavailable"))
}

/// Returns one outcome too few.
#[handler(type = "test.batch.put")]
async fn short_by_one(batch: Batch<Put>) -> Result<Vec<Result<u64, RemoteError>>, RemoteError> {
    Ok(batch.requests().skip(1).map(|p| Ok(p.n)).collect())
}

async fn a_whole_batch_error_or_a_miscounted_batch_fails_every_request(env: Env) {
    for (name, refuse) in [("DB_DOWN", true), ("HANDLER_ERROR", false)] {
        let topic = unique("batch-fail");
        let builder = env.server(&topic);
        let builder = if refuse { builder.batch_handler(refuse_all) } else { builder.batch_handler(short_by_one) };
        let server = builder.start().await.expect("server");
        let client = env.client(&topic).timeout(Duration::from_secs(30)).start().await.expect("client");
        let calls: Vec<_> = (1..=20u64).map(|n| client.request(Put { key: "k".into(), n })).collect();
        for outcome in join_all(calls).await {
            match outcome {
                Err(RpcError::Remote(e)) => assert_eq!(e.code.as_str(), name, "{e}"),
                other => panic!("expected {name}, got {other:?}"),
            }
        }
        // The partition keeps moving after failed batches.
        assert!(matches!(client.request(Put { key: "k".into(), n: 1 }).await, Err(RpcError::Remote(_))));
        client.shutdown().await;
        server.shutdown().await.expect("shutdown");
    }
}

/// A NestJS or Spring caller names no type: it dispatches by topic. A batch handler
/// registered under the topic's name serves it, as a handler would.
async fn a_request_without_a_type_header_reaches_the_batch_handler_named_after_its_topic(env: Env) {
    let topic = unique("batch-by-topic");
    let name: &'static str = Box::leak(topic.clone().into_boxed_str());
    let replies = format!("{topic}.reply");
    let seen = Seen::default();
    let server = env
        .server(&topic)
        .state(seen.clone())
        .batch_handler_with(put, HandlerOptions::new().name(name))
        .start()
        .await
        .expect("server");
    env.transport.ensure_topic(&replies, 1).await.expect("reply topic");
    let start = env.transport.latest_offset(&replies, 0).await.expect("reply offset");
    // NestJS style: string correlation id, ASCII reply partition, JSON body, no type.
    let correlation = b"0f8fad5b-d9cb-469f-a165-70867728950e";
    let mut request = Record::new(Some(b"k".to_vec()), br#"{"key":"k","n":5}"#.to_vec());
    request.headers = vec![
        Header { key: names::CORRELATION_ID.into(), value: Bytes::from_static(correlation) },
        Header { key: names::REPLY_TOPIC.into(), value: Bytes::from(replies.clone().into_bytes()) },
        Header { key: names::REPLY_PARTITION.into(), value: Bytes::from_static(b"0") },
    ];
    env.transport.produce(&topic, 0, vec![request]).await.expect("produce");
    let mut reader = env.transport.reader(&replies, 0).await.expect("reader");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let got = loop {
        let records = reader.fetch(start, Duration::from_millis(200)).await.expect("fetch");
        if !records.is_empty() {
            break records;
        }
        assert!(tokio::time::Instant::now() < deadline, "no reply within 20 s");
    };
    let reply = &got[0].record;
    let error = reply.header(names::ERROR_MESSAGE).map(|m| String::from_utf8_lossy(m).into_owned());
    assert_eq!(error, None, "answered with an error");
    assert_eq!(reply.value.as_deref(), Some(&b"5"[..]));
    assert_eq!(seen.0.lock().expect("seen").clone(), vec![vec![("k".to_string(), 5)]]);
    server.shutdown().await.expect("shutdown");
}

/// Opened by the test to let [`slow_put`] finish.
#[derive(Clone)]
struct Release(Arc<tokio::sync::watch::Sender<bool>>);

/// Runs until released, so that a request the same fetch returned after its batch waits.
#[handler]
async fn slow_put(batch: Batch<Put>, State(release): State<Release>) -> Result<Vec<Result<u64, RemoteError>>, RemoteError> {
    let _ = release.0.subscribe().wait_for(|open| *open).await;
    Ok(batch.requests().map(|p| Ok(p.n)).collect())
}

#[derive(Serialize, Deserialize, Debug, Clone, Request)]
#[request(type = "test.batch.get", response = u64, key = key)]
struct Get {
    key: String,
}

/// Handler runs that started after their caller's deadline.
#[derive(Clone, Default)]
struct Late(Arc<std::sync::atomic::AtomicU64>);

async fn get(_req: Get, ctx: Context, State(late): State<Late>) -> Result<u64, RemoteError> {
    if ctx.deadline().is_some_and(|deadline| std::time::SystemTime::now() > deadline) {
        late.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    Ok(0)
}

/// A request read in the same fetch as a batch before it waits while the batch runs;
/// its deadline passing meanwhile, it is skipped as expired, not run for a caller who
/// gave up.
async fn a_request_whose_deadline_passed_while_a_batch_ran_is_not_run(env: Env) {
    let topic = unique("batch-then-late");
    let late = Late::default();
    let client = env.client(&topic).timeout(Duration::from_secs(30)).start().await.expect("client");
    let partition = kafka_rpc::partitioner::partition_for_key(b"k", 4);
    let batched = tokio::spawn(client.request(Put { key: "k".into(), n: 1 }));
    support::eventually("the batch request is in the log", Duration::from_secs(10), || async {
        env.transport.latest_offset(&topic, partition).await.unwrap_or(0) == 1
    })
    .await;
    let single = tokio::spawn(client.request_with(Get { key: "k".into() }, RequestOptions::new().timeout(Duration::from_millis(800))));
    support::eventually("both requests are in the log", Duration::from_secs(10), || async {
        env.transport.latest_offset(&topic, partition).await.unwrap_or(0) == 2
    })
    .await;
    // Started now, the server reads both in one fetch.
    let release = Release(Arc::new(tokio::sync::watch::channel(false).0));
    let server =
        env.server(&topic).state(late.clone()).state(release.clone()).batch_handler(slow_put).handler(get).start().await.expect("server");
    // The batch runs until the single request's caller gave up and its deadline, as the
    // server reads it from the request, passed.
    assert!(matches!(single.await.expect("single"), Err(RpcError::Timeout(_))));
    let mut reader = env.transport.reader(&topic, partition).await.expect("reader");
    let fetched = reader.fetch(1, Duration::from_secs(10)).await.expect("fetch");
    let deadline = fetched.first().and_then(|r| r.record.header(names::DEADLINE)).expect("the single request has a deadline");
    let deadline = std::time::UNIX_EPOCH + Duration::from_millis(u64::from_be_bytes(deadline.as_ref().try_into().expect("8 bytes")));
    // The server's clock counts whole milliseconds: past the deadline is a millisecond on.
    if let Ok(left) = (deadline + Duration::from_millis(1)).duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    release.0.send_replace(true);
    assert_eq!(batched.await.expect("batched").expect("batched answered"), 1);
    assert_eq!(late.0.load(std::sync::atomic::Ordering::SeqCst), 0, "a handler ran after its caller's deadline");
    server.shutdown().await.expect("shutdown");
    assert_eq!(server.stats().expired(), 1);
}

#[tokio::test]
async fn a_batch_handler_and_a_handler_cannot_share_a_request_type() {
    async fn single(p: Put) -> Result<u64, RemoteError> {
        Ok(p.n)
    }
    let broker = EmbeddedBroker::new();
    let built = RpcServer::builder(broker, unique("batch-dup")).handler(single).batch_handler(short_by_one).start().await;
    assert!(matches!(built, Err(kafka_rpc::server::ServerError::DuplicateHandler("test.batch.put"))), "{:?}", built.err());
}

on_every_transport!(
    each_request_gets_its_own_outcome_in_partition_order,
    a_whole_batch_error_or_a_miscounted_batch_fails_every_request,
    a_request_without_a_type_header_reaches_the_batch_handler_named_after_its_topic,
    a_request_whose_deadline_passed_while_a_batch_ran_is_not_run,
);
