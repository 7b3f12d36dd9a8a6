//! Metrics end to end: a Prometheus exporter is installed as the process's recorder,
//! real request traffic runs on the embedded broker and on tansu, and the exporter's
//! endpoint is read with a real HTTP GET to check that every metric moved as the
//! traffic says it must. Tests share the process-wide recorder, so each one uses its
//! own topics and reads only the series labelled with them.

#[path = "support/kafka.rs"]
mod kafka_support;
#[path = "support/raw_batches.rs"]
mod raw_batches;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kafka_rpc::client::{Backpressure, ReplyPartitions};
use kafka_rpc::metrics as m;
use kafka_rpc::prelude::*;
use kafka_rpc::server::ServerError;
use kafka_rpc::server::idempotency::{IdempotencyStore, StoreError, StoredReply, STORE_UNAVAILABLE};
use kafka_rpc::transport::{
    GroupHandle, GroupMembership, OffsetReset, PartitionReader, ProduceError, Record, TopicPartition, TransportError,
};
use kafka_support::{free_port, unique_topic};
use serde::{Deserialize, Serialize};

/// Bound on waiting for a metric to reach its value (a rebalance on tansu takes ~3 s).
const WAIT: Duration = Duration::from_secs(40);

#[derive(Serialize, Deserialize)]
struct Echo(u32);
impl Request for Echo {
    const TYPE: &'static str = "metrics.echo";
    type Response = u32;
    fn key(&self) -> Option<Vec<u8>> {
        Some(self.0.to_be_bytes().to_vec())
    }
}

#[derive(Serialize, Deserialize)]
struct Refuse;
impl Request for Refuse {
    const TYPE: &'static str = "metrics.refuse";
    type Response = ();
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

/// A type no server registers: its label must not reach the server's metrics.
#[derive(Serialize, Deserialize)]
struct Stranger;
impl Request for Stranger {
    const TYPE: &'static str = "metrics.stranger-8f3a";
    type Response = ();
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

async fn echo(Echo(n): Echo) -> Result<u32, RemoteError> {
    Ok(n)
}

async fn refuse(_: Refuse) -> Result<(), RemoteError> {
    Err(RemoteError::with_code(ErrorCode::Custom("OUT_OF_STOCK".into()), "none left"))
}

/// The exporter's address; installs it as the global recorder on first use. It runs
/// on a runtime of its own, so it outlives every test's runtime.
fn exporter() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        // Outside any runtime, `install` starts its own thread for the listener.
        let installed =
            std::thread::spawn(move || metrics_exporter_prometheus::PrometheusBuilder::new().with_http_listener(addr).install()).join();
        match installed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("cannot install the Prometheus exporter on {addr}: {e}"),
            Err(_) => panic!("installing the Prometheus exporter panicked"),
        }
        m::describe();
        addr
    })
}

/// This process's exporter's page.
fn scrape() -> String {
    scrape_at(exporter())
}

/// The page of the exporter at `addr`, read with a plain HTTP/1.0 GET (so the body is
/// not chunked).
fn scrape_at(addr: SocketAddr) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    // The listener starts on its own thread: the first connection may come too early.
    let mut stream = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot connect to the exporter at {addr}: {e}"),
        }
    };
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send the GET");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "exporter answered {head:?}");
    body.to_string()
}

/// The value of the series `name` whose labels include all of `labels`, if exported.
fn value(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let matches = series_name == name && labels.iter().all(|(k, v)| series_labels.split(',').any(|l| l == format!("{k}=\"{v}\"")));
        matches.then(|| value.parse().ok()).flatten()
    })
}

/// Scrapes until `check` holds for the page, failing with the last page after [`WAIT`].
async fn until(what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let page = tokio::task::spawn_blocking(scrape).await.expect("scrape");
        if check(&page) {
            return page;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what} within {WAIT:?}; last page:\n{page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn at_least(page: &str, name: &str, labels: &[(&str, &str)], min: f64) -> bool {
    value(page, name, labels).is_some_and(|v| v >= min)
}

#[tokio::test]
async fn embedded_traffic_moves_every_client_and_server_metric() {
    exporter();
    let broker = EmbeddedBroker::new();
    let topic = unique_topic("metrics");
    let t = topic.as_str();
    let server = RpcServer::builder(broker.clone(), t)
        .partitions(2)
        .commit_interval(Duration::from_millis(10))
        .handler(echo)
        .handler(refuse)
        .start()
        .await
        .expect("server");
    // Two clients read one reply partition: each ignores the other's replies.
    let client = ReplyingClient::builder(broker.clone(), t)
        .partitions(2)
        .reply_partitions(ReplyPartitions::Pinned(Some(0)))
        .start()
        .await
        .expect("client");
    let other = ReplyingClient::builder(broker.clone(), t)
        .partitions(2)
        .reply_partitions(ReplyPartitions::Pinned(Some(0)))
        .start()
        .await
        .expect("other client");

    for n in 0..5 {
        assert_eq!(client.request(Echo(n)).await.expect("echo"), n);
    }
    let refused = client.request(Refuse).await.expect_err("refuse fails");
    assert!(matches!(&refused, RpcError::Remote(e) if e.code.as_str() == "OUT_OF_STOCK"), "{refused}");
    let stranger = client.request(Stranger).await.expect_err("no handler");
    assert!(matches!(&stranger, RpcError::Remote(e) if e.code == ErrorCode::UnknownType), "{stranger}");

    // Nobody serves this topic: one request waits (the gauge shows it), the next is
    // refused at the in-flight bound, and the first times out.
    let silent = unique_topic("metrics-silent");
    let lonely = ReplyingClient::builder(broker.clone(), silent.as_str())
        .max_in_flight(1)
        .max_queued(0)
        .backpressure(Backpressure::Fail)
        .timeout(Duration::from_secs(2))
        .start()
        .await
        .expect("lonely client");
    let waiting = tokio::spawn(lonely.request(Echo(1)));
    until("the in-flight gauge shows the waiting request", |p| value(p, m::CLIENT_IN_FLIGHT, &[("topic", &silent)]) == Some(1.0)).await;
    assert!(matches!(lonely.request(Echo(2)).await, Err(RpcError::Busy(1))));
    assert!(matches!(waiting.await.expect("join"), Err(RpcError::Timeout(_))));

    let page = until("every metric moved", |p| {
        at_least(p, m::CLIENT_REPLIES_IGNORED, &[("topic", t)], 7.0) && at_least(p, m::SERVER_PARTITION_LAG, &[("topic", t)], 0.0)
    })
    .await;
    let get = |name: &str, labels: &[(&str, &str)]| {
        value(&page, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} not exported:\n{page}"))
    };
    let echo_t = [("topic", t), ("type", Echo::TYPE)];
    // Client side.
    assert_eq!(get(m::CLIENT_REQUESTS_SENT, &echo_t), 5.0);
    assert_eq!(get(m::CLIENT_REQUESTS_SENT, &[("topic", t), ("type", Stranger::TYPE)]), 1.0);
    assert_eq!(get(m::CLIENT_REPLIES_DELIVERED, &[("topic", t)]), 7.0, "5 echoes, the refusal and the unknown type");
    assert_eq!(get(m::CLIENT_REPLIES_IGNORED, &[("topic", t)]), 7.0, "the other client saw every reply");
    assert_eq!(get(&format!("{}_count", m::CLIENT_ROUND_TRIP), &echo_t), 5.0);
    assert_eq!(
        get(&format!("{}_count", m::CLIENT_ROUND_TRIP), &[("topic", t), ("type", Refuse::TYPE)]),
        1.0,
        "error replies are round trips too"
    );
    assert_eq!(get(m::CLIENT_IN_FLIGHT, &[("topic", t)]), 0.0);
    assert_eq!(get(m::CLIENT_IN_FLIGHT, &[("topic", &silent)]), 0.0, "the timed-out request left the gauge");
    assert_eq!(get(m::CLIENT_TIMEOUTS, &[("topic", &silent), ("type", Echo::TYPE)]), 1.0);
    assert_eq!(get(m::CLIENT_BUSY, &[("topic", &silent)]), 1.0);
    // Server side.
    assert_eq!(get(m::SERVER_HANDLED, &echo_t), 5.0);
    assert_eq!(get(m::SERVER_HANDLED, &[("topic", t), ("type", Refuse::TYPE)]), 1.0);
    assert_eq!(get(m::SERVER_FAILED, &[("topic", t), ("type", Refuse::TYPE), ("code", "OUT_OF_STOCK")]), 1.0);
    assert_eq!(get(m::SERVER_FAILED, &[("topic", t), ("type", "unknown"), ("code", "UNKNOWN_TYPE")]), 1.0);
    assert_eq!(get(m::SERVER_HANDLED, &[("topic", t), ("type", "unknown")]), 1.0);
    assert_eq!(value(&page, m::SERVER_HANDLED, &[("type", Stranger::TYPE)]), None, "a caller's type name never becomes a server label");
    assert_eq!(get(&format!("{}_count", m::SERVER_HANDLER_DURATION), &echo_t), 5.0);
    assert_eq!(get(m::SERVER_ASSIGNED, &[("topic", t)]), 2.0);
    let lag: f64 = ["0", "1"].iter().filter_map(|p| value(&page, m::SERVER_PARTITION_LAG, &[("topic", t), ("partition", p)])).sum();
    assert_eq!(lag, 0.0, "every request was answered and committed");
    assert!(page.contains(&format!("# HELP {}", m::CLIENT_ROUND_TRIP)), "describe() reached the exporter");

    for c in [&client, &other, &lonely] {
        c.shutdown().await;
    }
    server.shutdown().await.expect("shutdown");
    let page = until("the assignment gauge drops on shutdown", |p| value(p, m::SERVER_ASSIGNED, &[("topic", t)]) == Some(0.0)).await;
    assert_eq!(value(&page, m::SERVER_HANDLED, &echo_t), Some(5.0));
}

/// A server stuck behind a slow handler shows its backlog as lag, and the lag drains.
#[tokio::test]
async fn partition_lag_shows_the_backlog_of_a_busy_partition() {
    exporter();
    let broker = EmbeddedBroker::new();
    let topic = unique_topic("metrics-lag");
    let t = topic.as_str();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let server = RpcServer::builder(broker.clone(), t)
        .partitions(1)
        .commit_interval(Duration::from_millis(10))
        .state(gate.clone())
        .handler(|Echo(n): Echo, _ctx: Context, State(gate): State<Arc<tokio::sync::Semaphore>>| async move {
            gate.acquire().await.map_err(|e| RemoteError::with_code(ErrorCode::HandlerError, e.to_string()))?.forget();
            Ok::<_, RemoteError>(n)
        })
        .start()
        .await
        .expect("server");
    let client = ReplyingClient::builder(broker.clone(), t).partitions(1).start().await.expect("client");
    let calls: Vec<_> = (0..4).map(|n| tokio::spawn(client.request(Echo(n)))).collect();
    // One request is in the handler; none is committed: all four are behind.
    until("lag 4 while the handler is held", |p| value(p, m::SERVER_PARTITION_LAG, &[("topic", t), ("partition", "0")]) == Some(4.0)).await;
    gate.add_permits(4);
    for call in calls {
        call.await.expect("join").expect("echo");
    }
    until("lag back to 0", |p| value(p, m::SERVER_PARTITION_LAG, &[("topic", t), ("partition", "0")]) == Some(0.0)).await;
    client.shutdown().await;
    server.shutdown().await.expect("shutdown");
}

/// On a real broker: the group assignment, the high watermarks behind the lag, and
/// the round trip through tansu.
#[tokio::test]
async fn tansu_traffic_moves_the_metrics() {
    exporter();
    let transport = kafka_support::transport().await;
    let topic = unique_topic("metrics-tansu");
    let t = topic.as_str();
    let server = RpcServer::builder(transport.clone(), t)
        .partitions(2)
        .commit_interval(Duration::from_millis(20))
        .handler(echo)
        .start()
        .await
        .expect("server");
    let client = ReplyingClient::builder(transport.clone(), t)
        .partitions(2)
        .timeout(WAIT)
        .start()
        .await
        .expect("client");
    for n in 0..4 {
        assert_eq!(client.request(Echo(n)).await.expect("echo over tansu"), n);
    }
    let echo_t = [("topic", t), ("type", Echo::TYPE)];
    let page = until("assignment, lag and counts over tansu", |p| {
        value(p, m::SERVER_ASSIGNED, &[("topic", t)]) == Some(2.0)
            && ["0", "1"].iter().all(|part| value(p, m::SERVER_PARTITION_LAG, &[("topic", t), ("partition", part)]) == Some(0.0))
    })
    .await;
    assert_eq!(value(&page, m::CLIENT_REQUESTS_SENT, &echo_t), Some(4.0));
    assert_eq!(value(&page, m::CLIENT_REPLIES_DELIVERED, &[("topic", t)]), Some(4.0));
    assert_eq!(value(&page, &format!("{}_count", m::CLIENT_ROUND_TRIP), &echo_t), Some(4.0));
    assert_eq!(value(&page, m::SERVER_HANDLED, &echo_t), Some(4.0));
    assert_eq!(value(&page, m::CLIENT_IN_FLIGHT, &[("topic", t)]), Some(0.0));
    client.shutdown().await;
    server.shutdown().await.expect("shutdown");
}

#[derive(Serialize, Deserialize)]
struct Big;
impl Request for Big {
    const TYPE: &'static str = "metrics.big";
    type Response = String;
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

/// Records a server settles without running them, or answers otherwise than the handler
/// said, are counted by reason, and the metrics agree with `ServerStats`.
#[tokio::test]
async fn skipped_expired_events_and_failed_replies_are_counted_by_reason() {
    use bytes::Bytes;
    use kafka_rpc::codec::ContentType;
    use kafka_rpc::transport::Header;
    use kafka_rpc::wire::names;

    exporter();
    let broker = EmbeddedBroker::new();
    let topic = unique_topic("metrics-skips");
    let t = topic.as_str();
    let server = RpcServer::builder(broker.clone(), t)
        .partitions(1)
        .max_reply_bytes(64)
        .handler(echo)
        .handler(|_: Big| async { Ok::<_, RemoteError>("x".repeat(1_000)) })
        .start()
        .await
        .expect("server");
    let client = ReplyingClient::builder(broker.clone(), t).partitions(1).start().await.expect("client");
    let too_large = client.request(Big).await.expect_err("the reply is over the limit");
    assert!(matches!(&too_large, RpcError::Remote(e) if e.code == ErrorCode::ReplyTooLarge), "{too_large}");

    let header = |key: &'static str, value: &[u8]| Header { key: key.into(), value: Bytes::copy_from_slice(value) };
    let reply_topic = format!("{t}.replies");
    let request = |extra: Vec<Header>| {
        let mut headers = vec![header(names::CORRELATION_ID, uuid::Uuid::new_v4().as_bytes()), header(names::TYPE, Echo::TYPE.as_bytes())];
        headers.extend(extra);
        let value = ContentType::Bincode.encode(&Echo(5)).expect("encode");
        Record { key: None, value: Some(value.into()), headers, timestamp_ms: 0 }
    };
    let records = vec![
        // Its caller stopped waiting at 1 ms past the epoch.
        request(vec![header(names::REPLY_TOPIC, reply_topic.as_bytes()), header(names::DEADLINE, &1i64.to_be_bytes())]),
        // A codec this server does not know, with a readable reply address: answered
        // BAD_REQUEST (not run), so counted as a failure, not as skipped.
        request(vec![header(names::REPLY_TOPIC, reply_topic.as_bytes()), header(names::CONTENT_TYPE, b"text/bogus")]),
        // A reply partition that is not a number: nowhere to answer, unroutable.
        request(vec![header(names::REPLY_TOPIC, reply_topic.as_bytes()), header(names::REPLY_PARTITION, b"x")]),
        request(vec![header(names::REPLY_TOPIC, b"somebody-elses-topic")]),
        // No reply address: an event.
        request(Vec::new()),
    ];
    broker.produce(t, 0, records).await.expect("produce");

    let page = until("the skipped records are counted", |p| {
        value(p, m::SERVER_EVENTS, &[("topic", t)]) == Some(1.0)
            && value(p, m::SERVER_SKIPPED, &[("topic", t), ("reason", "reply_refused")]) == Some(1.0)
    })
    .await;
    let stats = server.stats();
    let get = |name: &str, labels: &[(&str, &str)]| {
        value(&page, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} not exported:\n{page}"))
    };
    assert_eq!(get(m::SERVER_EXPIRED, &[("topic", t)]), 1.0);
    assert_eq!(get(m::SERVER_SKIPPED, &[("topic", t), ("reason", "unroutable")]), 1.0);
    assert_eq!(get(m::SERVER_REPLIES_FAILED, &[("topic", t), ("reason", "too_large")]), 1.0);
    assert_eq!(get(m::SERVER_FAILED, &[("topic", t), ("type", Echo::TYPE), ("code", "BAD_REQUEST")]), 1.0);
    assert_eq!(
        (stats.expired(), stats.unroutable(), stats.replies_refused(), stats.events(), stats.replies_too_large(), stats.bad_request()),
        (1, 1, 1, 1, 1, 1),
        "ServerStats counts the same events"
    );
    client.shutdown().await;
    server.shutdown().await.expect("shutdown");
}

/// The example a user copies (`examples/prometheus.rs`), run as its own process: its
/// endpoint answers a real GET, and the counters of its traffic move.
#[tokio::test]
async fn the_prometheus_example_serves_moving_counters() {
    // Integration tests live in target/<profile>/deps; `cargo test` builds examples
    // into target/<profile>/examples.
    let exe = std::env::current_exe().expect("test binary path");
    let example = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join("prometheus"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| panic!("examples/prometheus is not built next to {}: run `cargo test --workspace` (which builds examples) or `cargo build --example prometheus`", exe.display()));
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = tokio::process::Command::new(&example)
        .args(["--listen", &addr.to_string(), "--seconds", "60"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", example.display()));
    let sent = |page: &str| value(page, m::CLIENT_REQUESTS_SENT, &[("type", "stock.reserve")]).unwrap_or(0.0);
    let deadline = tokio::time::Instant::now() + WAIT;
    let first = loop {
        let page = tokio::task::spawn_blocking(move || scrape_at(addr)).await.expect("scrape");
        if sent(&page) > 0.0 {
            break page;
        }
        assert!(tokio::time::Instant::now() < deadline, "the example's requests within {WAIT:?}; last page:\n{page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let later = loop {
        let page = tokio::task::spawn_blocking(move || scrape_at(addr)).await.expect("scrape");
        if sent(&page) > sent(&first) {
            break page;
        }
        assert!(tokio::time::Instant::now() < deadline, "the counter to move within {WAIT:?}; last page:\n{page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(value(&later, m::SERVER_HANDLED, &[("type", "stock.reserve")]).unwrap_or(0.0) > 0.0, "server counters on the page:\n{later}");
    let _ = child.kill().await;
}

/// A request delivered again under the same idempotency key is answered from the window
/// without running its handler, and counted as a duplicate in the metric and in
/// `ServerStats`.
#[tokio::test]
async fn duplicates_answered_from_the_window_are_counted() {
    use kafka_rpc::server::idempotency::MemoryWindow;

    exporter();
    let broker = EmbeddedBroker::new();
    let topic = unique_topic("metrics-duplicates");
    let t = topic.as_str();
    let server = RpcServer::builder(broker.clone(), t)
        .partitions(1)
        .idempotency(MemoryWindow::new())
        .handler(echo)
        .start()
        .await
        .expect("server");
    let client = ReplyingClient::builder(broker, t).partitions(1).start().await.expect("client");
    let once = RequestOptions::new().idempotency_key("echo-7");
    for _ in 0..3 {
        assert_eq!(client.request_with(Echo(7), once.clone()).await.expect("echo"), 7);
    }
    let page = until("the duplicates are counted", |p| value(p, m::SERVER_DUPLICATES, &[("topic", t)]) == Some(2.0)).await;
    assert_eq!(value(&page, m::SERVER_HANDLED, &[("topic", t), ("type", Echo::TYPE)]), Some(1.0), "the handler ran once");
    assert_eq!(server.stats().duplicates(), 2);
    client.shutdown().await;
    server.shutdown().await.expect("shutdown");
}

/// A retry that reuses an idempotency key with another codec is answered `BAD_REQUEST`
/// (the stored reply would not decode): an error answer, counted as one in
/// `records_failed_total` and in `ServerStats::bad_request`.
#[tokio::test]
async fn a_key_reused_with_another_codec_is_counted_as_a_bad_request() {
    use kafka_rpc::server::idempotency::MemoryWindow;

    exporter();
    let broker = EmbeddedBroker::new();
    let topic = unique_topic("metrics-codec-mismatch");
    let t = topic.as_str();
    let server =
        RpcServer::builder(broker.clone(), t).partitions(1).idempotency(MemoryWindow::new()).handler(echo).start().await.expect("server");
    let bincode = ReplyingClient::builder(broker.clone(), t).partitions(1).start().await.expect("client");
    let json = ReplyingClient::builder(broker, t).partitions(1).content_type(ContentType::Json).start().await.expect("client");
    let once = RequestOptions::new().idempotency_key("codec-7");
    assert_eq!(bincode.request_with(Echo(7), once.clone()).await.expect("first use"), 7);
    match json.request_with(Echo(7), once).await {
        Err(RpcError::Remote(e)) => assert_eq!(e.code, ErrorCode::BadRequest),
        other => panic!("a key reused with another codec should be refused, got {other:?}"),
    }
    let labels = [("topic", t), ("type", Echo::TYPE), ("code", "BAD_REQUEST")];
    let page = until("the refusal is counted", |p| value(p, m::SERVER_DUPLICATES, &[("topic", t)]) == Some(1.0)).await;
    assert_eq!(value(&page, m::SERVER_FAILED, &labels), Some(1.0), "page:\n{page}");
    assert_eq!(server.stats().bad_request(), 1);
    bincode.shutdown().await;
    json.shutdown().await;
    server.shutdown().await.expect("shutdown");
}

/// An idempotency store that is down for lookups of one key and never makes a record
/// durable.
struct FailingStore;

#[async_trait::async_trait]
impl IdempotencyStore for FailingStore {
    async fn lookup(
        &self,
        _: &TopicPartition,
        key: &[u8],
    ) -> Result<Option<StoredReply>, StoreError> {
        match key {
            b"lookup-down" => Err(StoreError::Misconfigured("down for this test".into())),
            _ => Ok(None),
        }
    }

    fn record(
        &self,
        _: &TopicPartition,
        _: bytes::Bytes,
        _: StoredReply,
    ) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::Misconfigured("cannot record".into())) })
    }
}

/// A failed lookup refuses the request unrun and a failed record still answers it; both
/// are counted, in the metric and in `ServerStats`.
#[tokio::test]
async fn idempotency_store_failures_are_counted() {
    exporter();
    let broker = EmbeddedBroker::new();
    let topic = unique_topic("metrics-idempotency-failures");
    let t = topic.as_str();
    let server =
        RpcServer::builder(broker.clone(), t).partitions(1).idempotency(FailingStore).handler(echo).start().await.expect("server");
    let client = ReplyingClient::builder(broker, t).partitions(1).start().await.expect("client");

    let answered = client.request_with(Echo(5), RequestOptions::new().idempotency_key("record-fails")).await;
    assert_eq!(answered.expect("a request whose record failed is still answered"), 5);
    let refused = client.request_with(Echo(6), RequestOptions::new().idempotency_key("lookup-down")).await;
    match refused {
        Err(RpcError::Remote(e)) => assert_eq!(e.code.as_str(), STORE_UNAVAILABLE),
        other => panic!("a request the store cannot check should be refused unrun, got {other:?}"),
    }

    let page = until("both store failures are counted", |p| {
        value(p, m::SERVER_IDEMPOTENCY_FAILURES, &[("topic", t)]) == Some(2.0)
    })
    .await;
    assert_eq!(value(&page, m::SERVER_HANDLED, &[("topic", t), ("type", Echo::TYPE)]), Some(1.0), "the refused request never ran");
    assert_eq!(server.stats().idempotency_failures(), 2);
    client.shutdown().await;
    server.shutdown().await.expect("shutdown");
}

/// A request refused unrun because the idempotency store cannot be asked is answered
/// with an error, so it is a failed record like every other error answer: counted under
/// its code, and under its handler's type (the caller cannot create series).
#[tokio::test]
async fn store_unavailable_answers_are_counted_as_failed_records() {
    exporter();
    let broker = EmbeddedBroker::new();
    let topic = unique_topic("metrics-store-unavailable");
    let t = topic.as_str();
    let server =
        RpcServer::builder(broker.clone(), t).partitions(1).idempotency(FailingStore).handler(echo).start().await.expect("server");
    let client = ReplyingClient::builder(broker, t).partitions(1).start().await.expect("client");
    for n in 0..2 {
        match client.request_with(Echo(n), RequestOptions::new().idempotency_key("lookup-down")).await {
            Err(RpcError::Remote(e)) => assert_eq!(e.code.as_str(), STORE_UNAVAILABLE),
            other => panic!("a request the store cannot check should be refused unrun, got {other:?}"),
        }
    }
    let labels = [("topic", t), ("type", Echo::TYPE), ("code", STORE_UNAVAILABLE)];
    let page = until("store-unavailable answers are counted as failed records", |p| {
        value(p, m::SERVER_IDEMPOTENCY_FAILURES, &[("topic", t)]) == Some(2.0)
    })
    .await;
    assert_eq!(value(&page, m::SERVER_FAILED, &labels), Some(2.0), "page:\n{page}");
    assert_eq!(server.stats().failed(), 0, "`failed` counts handler errors and timeouts; the handler never ran");
    client.shutdown().await;
    server.shutdown().await.expect("shutdown");
}

/// The embedded broker, except that its group refuses every offset commit.
struct CommitsRefused(EmbeddedBroker);

struct RefusingHandle(Arc<dyn GroupHandle>);

#[async_trait::async_trait]
impl GroupHandle for RefusingHandle {
    async fn commit(&self, _: &[(TopicPartition, i64)]) -> Result<(), TransportError> {
        Err(TransportError::connection("commits refused (test)"))
    }

    async fn leave(&self) -> Result<(), TransportError> {
        self.0.leave().await
    }
}

#[async_trait::async_trait]
impl Transport for CommitsRefused {
    async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<i32, TransportError> {
        self.0.ensure_topic(topic, partitions).await
    }
    async fn partition_count(&self, topic: &str) -> Result<i32, TransportError> {
        self.0.partition_count(topic).await
    }
    async fn produce(
        &self,
        topic: &str,
        partition: i32,
        records: Vec<Record>,
    ) -> Result<i64, ProduceError> {
        self.0.produce(topic, partition, records).await
    }
    async fn latest_offset(&self, topic: &str, partition: i32) -> Result<i64, TransportError> {
        self.0.latest_offset(topic, partition).await
    }
    async fn reader(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<Box<dyn PartitionReader>, TransportError> {
        self.0.reader(topic, partition).await
    }
    async fn join_group(
        &self,
        group_id: &str,
        topics: &[String],
        reset: OffsetReset,
    ) -> Result<GroupMembership, TransportError> {
        let mut membership = self.0.join_group(group_id, topics, reset).await?;
        membership.handle = Arc::new(RefusingHandle(membership.handle));
        Ok(membership)
    }
}

/// Refused offset commits are counted (and retried) while requests are still answered.
#[tokio::test]
async fn refused_commits_are_counted() {
    exporter();
    let broker = EmbeddedBroker::new();
    let topic = unique_topic("metrics-commit-failures");
    let t = topic.as_str();
    let server = RpcServer::builder(Arc::new(CommitsRefused(broker.clone())), t)
        .partitions(1)
        .commit_interval(Duration::from_millis(10))
        .handler(echo)
        .start()
        .await
        .expect("server");
    let client = ReplyingClient::builder(broker, t).partitions(1).start().await.expect("client");
    assert_eq!(client.request(Echo(3)).await.expect("answered although commits fail"), 3);
    until("a refused commit is counted", |p| at_least(p, m::SERVER_COMMIT_FAILURES, &[("topic", t)], 1.0)).await;
    assert!(server.stats().commit_failures() >= 1);
    client.shutdown().await;
    // The answered request's offset was never committed, and no later tick will retry:
    // shutdown says so instead of reporting a clean stop.
    match server.shutdown().await {
        Err(ServerError::FinalCommit(TransportError::Connection { .. })) => {}
        other => panic!("a refused final commit should fail the shutdown, got {other:?}"),
    }
}

/// A transactional peer (Spring Kafka's `executeInTransaction`, any producer with a
/// `transactional.id`) ends each transaction with a commit marker: a control batch
/// that takes an offset and holds no record. A server whose last request is followed
/// by one must commit past it, as Kafka's own consumers do (KIP-98): before, its
/// committed position stopped at the marker, and the lag gauge showed 1 for ever.
/// tansu 0.6 has no EndTxn, so the test writes the marker itself.
#[tokio::test]
async fn a_trailing_commit_marker_leaves_no_lag() {
    requests_then_nothing_to_read("metrics-marker", || vec![raw_batches::commit_marker()]).await;
}

/// The same for batches no reader can decode, which the server skips (and counts).
#[tokio::test]
async fn trailing_unreadable_batches_leave_no_lag() {
    requests_then_nothing_to_read("metrics-unreadable", || {
        vec![raw_batches::bad_checksum(&["x", "y"]), raw_batches::unknown_magic(&["z"])]
    })
    .await;
}

/// A request, then `batches` (which hold no record a server hands out), all in the log
/// before a server starts, so the lag it reports is of that log and none before it.
/// The server answers the request; its lag must reach 0 and its commit the log's end.
async fn requests_then_nothing_to_read(prefix: &str, batches: impl FnOnce() -> Vec<Vec<u8>>) {
    exporter();
    let transport = kafka_support::transport().await;
    let topic = unique_topic(prefix);
    let group = unique_topic(&format!("{prefix}-group"));
    let t = topic.as_str();
    transport.ensure_topic(t, 1).await.expect("create the topic");
    let client = ReplyingClient::builder(transport.clone(), t).partitions(1).timeout(WAIT).start().await.expect("client");
    let asked = tokio::spawn({
        let client = client.clone();
        async move { client.request(Echo(1)).await }
    });
    // The broker says when the request is in; there is nothing to wait on but asking.
    let deadline = tokio::time::Instant::now() + WAIT;
    while transport.latest_offset(t, 0).await.expect("high watermark") < 1 {
        assert!(tokio::time::Instant::now() < deadline, "the request reached the log within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let bootstrap = kafka_support::bootstrap();
    for batch in batches() {
        raw_batches::produce(&bootstrap, t, 0, batch).unwrap_or_else(|code| panic!("the broker refused the batch: error {code}"));
    }
    let end = transport.latest_offset(t, 0).await.expect("high watermark");
    assert!(end > 1, "the batches took offsets after the request");

    let server = RpcServer::builder(transport.clone(), t)
        .group(group.clone())
        .partitions(1)
        .commit_interval(Duration::from_millis(20))
        .handler(echo)
        .start()
        .await
        .expect("server");
    assert_eq!(asked.await.expect("joined").expect("echo"), 1);
    until("lag 0 past what the log ends in", |p| {
        value(p, m::SERVER_PARTITION_LAG, &[("topic", t), ("partition", "0")]) == Some(0.0)
    })
    .await;
    client.shutdown().await;
    server.shutdown().await.expect("shutdown");

    // What was committed is where the group's next member starts: the log's end.
    let mut member = transport.join_group(&group, std::slice::from_ref(&topic), OffsetReset::Earliest).await.expect("join");
    let assigned = loop {
        match tokio::time::timeout(WAIT, member.events.recv()).await {
            Ok(Some(kafka_rpc::transport::GroupEvent::Assigned(a))) => break a,
            Ok(Some(_)) => continue,
            other => panic!("no assignment within {WAIT:?}: {other:?}"),
        }
    };
    assert_eq!(assigned.iter().map(|a| a.offset).collect::<Vec<_>>(), [end], "committed up to the log's end");
    member.handle.leave().await.expect("leave");
}
