//! The Kafka transport against a real Kafka-protocol broker: tansu started by the
//! test support, or the cluster named by `KAFKA_BOOTSTRAP`.

#[path = "support/kafka.rs"]
mod kafka_support;
#[path = "support/raw_batches.rs"]
mod raw_batches;
#[path = "support/rewrite.rs"]
mod rewrite;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use kafka_rpc::transport::kafka::KafkaTransport;
use kafka_rpc::transport::{
    AssignedPartition, GroupEvent, GroupMembership, Header, OffsetReset, Record, TopicPartition, Transport,
    TransportError,
};
use kafka_support::{bootstrap, transport, unique_topic, NO_PYTHON};
use rewrite::rewrite;

/// Bound on any single wait for the broker; group rebalances on tansu take ~3 s.
const WAIT: Duration = Duration::from_secs(40);

fn record(key: &str, value: &str, headers: &[(&str, &str)]) -> Record {
    let mut r = Record::new(Some(key.to_string()), value.to_string());
    r.headers = headers
        .iter()
        .map(|(k, v)| Header { key: k.to_string().into(), value: Bytes::from(v.to_string()) })
        .collect();
    r
}

async fn topic(t: &KafkaTransport, prefix: &str, partitions: i32) -> String {
    let name = unique_topic(prefix);
    let n = t.ensure_topic(&name, partitions).await.unwrap_or_else(|e| panic!("ensure_topic {name}: {e}"));
    assert_eq!(n, partitions, "partition count of the new topic {name}");
    name
}

/// Reads `n` records of one partition from `from`, failing after [`WAIT`].
async fn read_n(t: &KafkaTransport, topic: &str, partition: i32, from: i64, n: usize) -> Vec<kafka_rpc::transport::ConsumedRecord> {
    let mut reader = t.reader(topic, partition).await.unwrap_or_else(|e| panic!("reader: {e}"));
    let mut out = Vec::new();
    let mut next = from;
    let deadline = tokio::time::Instant::now() + WAIT;
    while out.len() < n {
        assert!(tokio::time::Instant::now() < deadline, "read {} of {n} records of {topic}-{partition} in {WAIT:?}", out.len());
        let got = reader.fetch(next, Duration::from_millis(200)).await.unwrap_or_else(|e| panic!("fetch: {e}"));
        if let Some(last) = got.last() {
            next = last.offset + 1;
        }
        out.extend(got);
    }
    out
}

#[tokio::test]
async fn produce_and_fetch_keep_keys_values_and_headers() {
    let t = transport().await;
    let name = topic(&t, "roundtrip", 1).await;
    let mut keyless = Record::new(None::<String>, "no key");
    keyless.value = None;
    keyless.key = None;
    let records = vec![
        record("k1", "v1", &[("corr-id", "abc"), ("reply-to", "replies")]),
        record("k2", "v2", &[]),
        keyless,
    ];
    let first = t.produce(&name, 0, records.clone()).await.unwrap_or_else(|e| panic!("produce: {e}"));
    assert_eq!(first, 0);
    let got = read_n(&t, &name, 0, first, 3).await;
    assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![0, 1, 2]);
    for (sent, got) in records.iter().zip(&got) {
        assert_eq!(got.partition, 0);
        assert_eq!(got.record.key, sent.key);
        assert_eq!(got.record.value, sent.value);
        // rskafka keeps headers in name order; ours were written in name order.
        assert_eq!(got.record.headers, sent.headers);
        assert_eq!(got.record.timestamp_ms, sent.timestamp_ms);
    }
    assert_eq!(got[0].record.header("corr-id").map(|b| &b[..]), Some(&b"abc"[..]));
}

/// Kafka headers are a list: a key may repeat (`Headers.add`, Spring's dead-letter
/// headers), and a reader sees every value in the order written (`lastHeader` is the
/// last of them). A request's headers reach its handler, and its dead letter, as sent.
#[tokio::test]
async fn repeated_header_keys_are_kept_in_order_with_every_codec() {
    use kafka_rpc::transport::kafka::Compression;
    for compression in [Compression::NoCompression, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd] {
        let t = kafka_support::connect(kafka_support::config().compression(compression)).await;
        let name = topic(&t, "repeated-headers", 1).await;
        let repeated = record("k", "v", &[("kafka_correlationId", "first"), ("x-trace", "a"), ("kafka_correlationId", "last"), ("x-trace", "b")]);
        let plain = record("k2", "v2", &[("one", "1")]);
        let records = vec![repeated, plain];
        let first = t.produce(&name, 0, records.clone()).await.unwrap_or_else(|e| panic!("produce: {e}"));
        let got = read_n(&t, &name, 0, first, 2).await;
        for (sent, got) in records.iter().zip(&got) {
            assert_eq!(got.record.headers, sent.headers, "{compression:?}");
        }
        assert_eq!(got[0].record.header("kafka_correlationId").map(|b| &b[..]), Some(&b"last"[..]), "lastHeader");
    }
}

/// A timeout too long for the clock (`Duration::MAX`, "no limit") is no limit, not a
/// panic when a deadline is computed from it.
#[tokio::test]
async fn timeouts_beyond_the_clock_are_no_limit() {
    let config = kafka_support::config().request_timeout(Duration::MAX).rebalance_timeout(Duration::MAX).build();
    let t = KafkaTransport::connect(config).await.unwrap_or_else(|e| panic!("connect: {e}"));
    let name = topic(&t, "no-limit", 1).await;
    let first = t.produce(&name, 0, vec![record("k", "v", &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    let mut reader = t.reader(&name, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    let got = reader.fetch(first, Duration::from_secs(1)).await.unwrap_or_else(|e| panic!("fetch: {e}"));
    assert_eq!(got.first().map(|r| r.record.value.clone()), Some(Some(Bytes::from("v"))));
}

#[tokio::test]
async fn ensure_topic_creates_once_and_reports_the_real_partition_count() {
    let t = transport().await;
    let name = topic(&t, "ensure", 3).await;
    assert_eq!(t.ensure_topic(&name, 5).await.ok(), Some(3), "an existing topic keeps its partitions");
    assert_eq!(t.partition_count(&name).await.ok(), Some(3));
    let missing = unique_topic("missing");
    match t.partition_count(&missing).await {
        Err(TransportError::UnknownTopic(n)) => assert_eq!(n, missing),
        other => panic!("partition_count of a missing topic: {other:?}"),
    }
}

#[tokio::test]
async fn latest_offset_and_first_offsets_follow_produces() {
    let t = transport().await;
    let name = topic(&t, "latest", 2).await;
    assert_eq!(t.latest_offset(&name, 1).await.ok(), Some(0));
    let batch: Vec<Record> = (0..5).map(|i| record("k", &format!("v{i}"), &[])).collect();
    assert_eq!(t.produce(&name, 1, batch.clone()).await.ok(), Some(0));
    assert_eq!(t.produce(&name, 1, batch).await.ok(), Some(5));
    assert_eq!(t.latest_offset(&name, 1).await.ok(), Some(10));
    assert_eq!(t.latest_offset(&name, 0).await.ok(), Some(0), "the other partition is untouched");
}

#[tokio::test]
async fn a_waiting_reader_gets_records_produced_later() {
    let t = transport().await;
    let name = topic(&t, "wait", 1).await;
    let mut reader = t.reader(&name, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    let waiting = tokio::spawn(async move { reader.fetch(0, WAIT).await });
    t.produce(&name, 0, vec![record("k", "late", &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    let got = tokio::time::timeout(WAIT + Duration::from_secs(5), waiting)
        .await
        .unwrap_or_else(|_| panic!("the waiting fetch did not return"))
        .unwrap_or_else(|e| panic!("fetch task: {e}"))
        .unwrap_or_else(|e| panic!("fetch: {e}"));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].record.value.as_deref(), Some(&b"late"[..]));
}

#[tokio::test]
async fn an_empty_fetch_returns_after_its_wait() {
    let t = transport().await;
    let name = topic(&t, "empty", 1).await;
    let mut reader = t.reader(&name, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    let started = std::time::Instant::now();
    let got = reader.fetch(0, Duration::from_millis(50)).await.unwrap_or_else(|e| panic!("fetch: {e}"));
    assert!(got.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5), "an empty fetch took {:?}", started.elapsed());
}

#[tokio::test]
async fn bad_partitions_topics_and_offsets_are_typed_errors() {
    let t = transport().await;
    let name = topic(&t, "errors", 1).await;
    match t.produce(&name, 7, vec![record("k", "v", &[])]).await.map_err(TransportError::from) {
        Err(TransportError::UnknownPartition { topic, partition }) => {
            assert_eq!((topic.as_str(), partition), (name.as_str(), 7));
        }
        other => panic!("produce to partition 7 of a 1-partition topic: {other:?}"),
    }
    let missing = unique_topic("nowhere");
    match t.produce(&missing, 0, vec![record("k", "v", &[])]).await.map_err(TransportError::from) {
        Err(TransportError::UnknownTopic(n)) => assert_eq!(n, missing),
        other => panic!("produce to a missing topic: {other:?}"),
    }
    t.produce(&name, 0, vec![record("k", "v", &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    let mut reader = t.reader(&name, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    match reader.fetch(1000, Duration::from_millis(10)).await {
        Err(TransportError::OffsetOutOfRange { tp, offset, earliest, .. }) => {
            assert_eq!(tp, TopicPartition::new(name.clone(), 0));
            assert_eq!((offset, earliest), (1000, 0));
        }
        other => panic!("fetch past the end: {other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_broker_is_a_connection_error_not_a_hang() {
    let (reserved, port) = refusing_port();
    let config = kafka_rpc::transport::kafka::KafkaConfig::builder(format!("127.0.0.1:{port}"))
        .connect_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(2))
        .build();
    let result = tokio::time::timeout(Duration::from_secs(20), KafkaTransport::connect(config))
        .await
        .unwrap_or_else(|_| panic!("connect to a closed port hung"));
    // The cause is kept underneath, not flattened into the message: the client's own
    // error, or (when the connect timeout ends rskafka's retries first) the refused TCP
    // connect.
    assert!(matches!(result, Err(TransportError::Connection { source: Some(_), .. })), "{result:?}");
    drop(reserved);
}

/// With the default request timeout (30 s) rskafka retries longer than the connect
/// timeout lasts, so its own error never arrives; the refused connect is the cause.
#[tokio::test]
async fn an_unreachable_broker_names_the_refused_connect_as_its_cause() {
    let (reserved, port) = refusing_port();
    let config = kafka_rpc::transport::kafka::KafkaConfig::builder(format!("127.0.0.1:{port}"))
        .connect_timeout(Duration::from_millis(500))
        .build();
    let result = tokio::time::timeout(Duration::from_secs(20), KafkaTransport::connect(config))
        .await
        .unwrap_or_else(|_| panic!("connect to a closed port hung"));
    match result {
        Err(TransportError::Connection { source: Some(source), .. }) => {
            let io = source.downcast_ref::<std::io::Error>();
            assert_eq!(io.map(std::io::Error::kind), Some(std::io::ErrorKind::ConnectionRefused), "cause: {source:?}");
        }
        other => panic!("expected a connection error with its cause, got {other:?}"),
    }
    drop(reserved);
}

/// A socket bound but never listening, and its port: every connection to the port is
/// refused, and the port stays the caller's while it holds the socket, so a broker
/// another test starts meanwhile cannot take it.
fn refusing_port() -> (tokio::net::TcpSocket, u16) {
    let reserved = tokio::net::TcpSocket::new_v4()
        .and_then(|s| s.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).map(|()| s))
        .unwrap_or_else(|e| panic!("reserve a port: {e}"));
    let port = reserved.local_addr().map(|a| a.port()).unwrap_or_else(|e| panic!("reserved port: {e}"));
    (reserved, port)
}

#[tokio::test]
async fn a_broker_that_never_answers_is_a_connection_error_not_a_hang() {
    // Accepts connections and reads, but never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("local addr: {e}"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let config = kafka_rpc::transport::kafka::KafkaConfig::builder(addr.to_string())
        .connect_timeout(Duration::from_millis(500))
        .request_timeout(Duration::from_millis(500))
        .build();
    let result = tokio::time::timeout(Duration::from_secs(20), KafkaTransport::connect(config))
        .await
        .unwrap_or_else(|_| panic!("connecting to a silent broker hung"));
    assert!(matches!(result, Err(TransportError::Connection { .. })), "{result:?}");
}

// ---- consumer groups ----

async fn join(t: &KafkaTransport, group: &str, topic: &str, reset: OffsetReset) -> GroupMembership {
    t.join_group(group, &[topic.to_string()], reset).await.unwrap_or_else(|e| panic!("join {group}: {e}"))
}

async fn next_event(m: &mut GroupMembership, who: &str) -> GroupEvent {
    match tokio::time::timeout(WAIT, m.events.recv()).await {
        Ok(Some(e)) => e,
        Ok(None) => panic!("{who}: membership ended"),
        Err(_) => panic!("{who}: no group event within {WAIT:?}"),
    }
}

async fn expect_assigned(m: &mut GroupMembership, who: &str) -> Vec<AssignedPartition> {
    match next_event(m, who).await {
        GroupEvent::Assigned(a) => a,
        GroupEvent::Revoked { partitions, .. } => panic!("{who}: expected an assignment, got revoked {partitions:?}"),
        GroupEvent::Failed(e) => panic!("{who}: expected an assignment, got failed: {e}"),
        other => panic!("{who}: expected an assignment, got {other:?}"),
    }
}

/// Waits for a revocation, acknowledges it, and returns what was revoked.
async fn expect_revoked(m: &mut GroupMembership, who: &str) -> Vec<TopicPartition> {
    match next_event(m, who).await {
        GroupEvent::Revoked { partitions, done } => {
            let _ = done.send(());
            partitions
        }
        GroupEvent::Assigned(a) => panic!("{who}: expected a revocation, got assigned {a:?}"),
        GroupEvent::Failed(e) => panic!("{who}: expected a revocation, got failed: {e}"),
        other => panic!("{who}: expected a revocation, got {other:?}"),
    }
}

fn partitions(a: &[AssignedPartition]) -> BTreeSet<i32> {
    a.iter().map(|p| p.tp.partition).collect()
}

#[tokio::test]
async fn a_lone_member_gets_every_partition_from_the_start() {
    let t = transport().await;
    let name = topic(&t, "group-one", 4).await;
    let mut m = join(&t, &unique_topic("g"), &name, OffsetReset::Earliest).await;
    let a = expect_assigned(&mut m, "member").await;
    assert_eq!(partitions(&a), (0..4).collect());
    assert!(a.iter().all(|p| p.offset == 0 && p.tp.topic == name), "{a:?}");
    m.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
}

#[tokio::test]
async fn a_second_member_splits_the_partitions_and_leaving_gives_them_back() {
    let t = transport().await;
    let name = topic(&t, "group-two", 4).await;
    let group = unique_topic("g");
    let mut first = join(&t, &group, &name, OffsetReset::Earliest).await;
    assert_eq!(partitions(&expect_assigned(&mut first, "first").await), (0..4).collect());

    let mut second = join(&t, &group, &name, OffsetReset::Earliest).await;
    let revoked: BTreeSet<i32> = expect_revoked(&mut first, "first").await.iter().map(|tp| tp.partition).collect();
    assert_eq!(revoked, (0..4).collect(), "the first member hands back everything (eager protocol)");
    let a1 = partitions(&expect_assigned(&mut first, "first").await);
    let a2 = partitions(&expect_assigned(&mut second, "second").await);
    assert!(a1.is_disjoint(&a2), "{a1:?} and {a2:?} overlap");
    assert_eq!(a1.union(&a2).copied().collect::<BTreeSet<_>>(), (0..4).collect());
    assert_eq!((a1.len(), a2.len()), (2, 2), "range assignment splits 4 partitions evenly");

    second.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
    assert_eq!(expect_revoked(&mut first, "first").await.len(), 2);
    assert_eq!(partitions(&expect_assigned(&mut first, "first").await), (0..4).collect());
    first.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
}

#[tokio::test]
async fn heartbeats_keep_a_member_past_its_session_timeout() {
    // 6 s is the smallest session timeout Apache Kafka accepts by default.
    let session = Duration::from_secs(6);
    let t = kafka_support::connect(kafka_support::config().session_timeout(session)).await;
    let name = topic(&t, "group-alive", 2).await;
    let mut m = join(&t, &unique_topic("g"), &name, OffsetReset::Earliest).await;
    assert_eq!(expect_assigned(&mut m, "member").await.len(), 2);
    // Waiting for something NOT to happen needs a deadline: nothing may change for
    // well over a session timeout.
    match tokio::time::timeout(session + session / 2, m.events.recv()).await {
        Err(_) => {}
        Ok(Some(GroupEvent::Revoked { partitions, .. })) => panic!("lost {partitions:?} although heartbeating"),
        Ok(other) => panic!("unexpected group event: {other:?}"),
    }
    m.handle
        .commit(&[(TopicPartition::new(name.clone(), 0), 1)])
        .await
        .unwrap_or_else(|e| panic!("commit with the still-current generation: {e}"));
    m.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
}

#[tokio::test]
async fn dropping_the_events_receiver_leaves_the_group() {
    let t = transport().await;
    let name = topic(&t, "group-drop", 2).await;
    let group = unique_topic("g");
    let mut stays = join(&t, &group, &name, OffsetReset::Earliest).await;
    expect_assigned(&mut stays, "stays").await;
    let mut goes = join(&t, &group, &name, OffsetReset::Earliest).await;
    expect_revoked(&mut stays, "stays").await;
    assert_eq!(expect_assigned(&mut stays, "stays").await.len(), 1);
    assert_eq!(expect_assigned(&mut goes, "goes").await.len(), 1);
    drop(goes);
    expect_revoked(&mut stays, "stays").await;
    assert_eq!(partitions(&expect_assigned(&mut stays, "stays").await), (0..2).collect());
    stays.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
}

#[tokio::test]
async fn committed_offsets_are_where_the_next_assignment_resumes() {
    let t = transport().await;
    let name = topic(&t, "group-commit", 3).await;
    for p in 0..3 {
        let batch: Vec<Record> = (0..10).map(|i| record("k", &format!("{i}"), &[])).collect();
        t.produce(&name, p, batch).await.unwrap_or_else(|e| panic!("produce: {e}"));
    }
    let group = unique_topic("g");
    let mut m = join(&t, &group, &name, OffsetReset::Earliest).await;
    let a = expect_assigned(&mut m, "first run").await;
    assert!(a.iter().all(|p| p.offset == 0), "nothing committed yet, earliest is 0: {a:?}");
    m.handle
        .commit(&[(TopicPartition::new(name.clone(), 0), 4), (TopicPartition::new(name.clone(), 2), 9)])
        .await
        .unwrap_or_else(|e| panic!("commit: {e}"));
    m.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));

    // A restarted service resumes where the last one committed; the uncommitted
    // partition falls back to the reset policy.
    let mut again = join(&t, &group, &name, OffsetReset::Latest).await;
    let mut resumed: Vec<(i32, i64)> =
        expect_assigned(&mut again, "second run").await.iter().map(|p| (p.tp.partition, p.offset)).collect();
    resumed.sort();
    assert_eq!(resumed, vec![(0, 4), (1, 10), (2, 9)]);
    again.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
}

/// A foreign client — librdkafka through PyPI's confluent-kafka — reads the
/// group's committed offsets, which shows the commits are ordinary Kafka ones.
const COMMITTED_PY: &str = r#"
import sys
from confluent_kafka import Consumer, TopicPartition
bootstrap, group, topic, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
for tp in c.committed([TopicPartition(topic, p) for p in range(n)], timeout=30):
    if tp.error is not None:
        raise SystemExit(f"partition {tp.partition}: {tp.error}")
    print(tp.partition, tp.offset)
c.close()
"#;

/// Runs a script with the Python that has confluent-kafka, failing the test with
/// install instructions when there is none.
fn python_command(script: &str, args: &[&str]) -> tokio::process::Command {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg("-c").arg(script).args(args).kill_on_drop(true);
    cmd
}


/// A librdkafka consumer that joins a group with the `range` strategy, prints its
/// assignment once it has one, and leaves.
const RDKAFKA_MEMBER_PY: &str = r#"
import sys, time
from confluent_kafka import Consumer
bootstrap, group, topic = sys.argv[1], sys.argv[2], sys.argv[3]
c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "partition.assignment.strategy": "range",
              "enable.auto.commit": False, "session.timeout.ms": 10000, "heartbeat.interval.ms": 300})
c.subscribe([topic])
deadline = time.time() + 60
while not c.assignment():
    if time.time() > deadline:
        raise SystemExit("no assignment within 60 s")
    c.poll(0.1)
for tp in c.assignment():
    print("assigned", tp.topic, tp.partition, flush=True)
print("done", flush=True)
c.close()
"#;

#[tokio::test]
async fn a_librdkafka_consumer_and_a_kafka_rpc_member_share_a_group() {
    use tokio::io::AsyncBufReadExt;
    let t = transport().await;
    let name = topic(&t, "group-mixed", 2).await;
    let group = unique_topic("g");
    let mut ours = join(&t, &group, &name, OffsetReset::Earliest).await;
    assert_eq!(partitions(&expect_assigned(&mut ours, "ours").await), (0..2).collect());

    let boot = bootstrap();
    let mut child = python_command(RDKAFKA_MEMBER_PY, &[&boot, &group, &name])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run Python ({e}): {NO_PYTHON}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout pipe"));
    let mut lines = tokio::io::BufReader::new(stdout).lines();

    // The librdkafka member's arrival makes ours hand back everything and take its
    // share; one of the two leads and the other decodes its assignment.
    expect_revoked(&mut ours, "ours").await;
    let mine = partitions(&expect_assigned(&mut ours, "ours").await);
    let mut theirs = BTreeSet::new();
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line()).await;
        match line {
            Ok(Ok(Some(l))) if l == "done" => break,
            Ok(Ok(Some(l))) => {
                let parts: Vec<&str> = l.split_whitespace().collect();
                if let ["assigned", tp_topic, p] = parts[..] {
                    assert_eq!(tp_topic, name);
                    theirs.insert(p.parse::<i32>().unwrap_or_else(|e| panic!("partition {p}: {e}")));
                }
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                let out = child.wait_with_output().await.ok();
                let err = out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
                if err.contains("No module named 'confluent_kafka'") {
                    panic!("Python module confluent-kafka is missing: {NO_PYTHON}");
                }
                panic!("the librdkafka member ended without an assignment: {err}");
            }
            Err(_) => panic!("the librdkafka member printed no assignment within {WAIT:?}"),
        }
    }
    assert!(mine.is_disjoint(&theirs), "ours {mine:?} and librdkafka's {theirs:?} overlap");
    assert_eq!(mine.union(&theirs).copied().collect::<BTreeSet<_>>(), (0..2).collect());
    assert_eq!((mine.len(), theirs.len()), (1, 1));

    // When it closes (leaving the group), ours gets everything back.
    expect_revoked(&mut ours, "ours").await;
    assert_eq!(partitions(&expect_assigned(&mut ours, "ours").await), (0..2).collect());
    let status = tokio::time::timeout(WAIT, child.wait()).await;
    assert!(matches!(status, Ok(Ok(s)) if s.success()), "the librdkafka member exited with {status:?}");
    ours.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
}

#[tokio::test]
async fn a_foreign_kafka_client_reads_the_committed_offsets() {
    let t = transport().await;
    let name = topic(&t, "group-foreign", 2).await;
    let group = unique_topic("g");
    let mut m = join(&t, &group, &name, OffsetReset::Earliest).await;
    expect_assigned(&mut m, "member").await;
    m.handle
        .commit(&[(TopicPartition::new(name.clone(), 0), 17), (TopicPartition::new(name.clone(), 1), 3)])
        .await
        .unwrap_or_else(|e| panic!("commit: {e}"));

    let boot = bootstrap();
    let out = python_command(COMMITTED_PY, &[&boot, &group, &name, "2"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run Python ({e}): {NO_PYTHON}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named 'confluent_kafka'") {
        panic!("Python module confluent-kafka is missing: {NO_PYTHON}");
    }
    assert!(out.status.success(), "the confluent-kafka script failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let seen: Vec<(i32, i64)> = stdout
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect();
    assert_eq!(seen, vec![(0, 17), (1, 3)], "committed offsets as librdkafka sees them; output: {stdout}");
    m.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
}

// ---- records and offsets a reader must move past ----

#[tokio::test]
async fn records_with_timestamps_at_the_ends_of_i64_are_read_not_stuck() {
    let t = transport().await;
    let name = topic(&t, "timestamps", 1).await;
    let mut late = record("k", "late", &[]);
    late.timestamp_ms = i64::MAX;
    let mut early = record("k", "early", &[]);
    early.timestamp_ms = i64::MIN + 1;
    let mut negative = record("k", "negative", &[]);
    negative.timestamp_ms = -5;
    for r in [record("k", "before", &[]), late, early, negative, record("k", "after", &[])] {
        t.produce(&name, 0, vec![r]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    }
    let got = tokio::time::timeout(WAIT, read_n(&t, &name, 0, 0, 5)).await.unwrap_or_else(|_| panic!("read timed out"));
    let values: Vec<_> = got.iter().map(|r| r.record.value.clone().unwrap_or_default()).collect();
    assert_eq!(values, ["before", "late", "early", "negative", "after"].map(|v| Bytes::from_static(v.as_bytes())).to_vec());
    assert_eq!(got[1].record.timestamp_ms, i64::MAX);
    assert_eq!(got[3].record.timestamp_ms, -5);
    // The high watermark too is read past such a record (a client starting on this
    // reply partition asks for it).
    let mut last = record("k", "last", &[]);
    last.timestamp_ms = i64::MAX;
    t.produce(&name, 0, vec![last]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    assert_eq!(t.latest_offset(&name, 0).await.unwrap_or_else(|e| panic!("latest offset: {e}")), 6);
}

#[tokio::test]
async fn out_of_range_names_both_ends_of_the_log() {
    let t = transport().await;
    let name = topic(&t, "ends", 1).await;
    t.produce(&name, 0, vec![record("k", "a", &[]), record("k", "b", &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    let mut reader = t.reader(&name, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    match reader.fetch(1000, Duration::from_millis(10)).await {
        Err(TransportError::OffsetOutOfRange { offset, earliest, latest, .. }) => {
            assert_eq!((offset, earliest, latest), (1000, 0, 2));
        }
        other => panic!("fetch past the end: {other:?}"),
    }
}


/// Makes the broker behind `proxy` answer as an Apache Kafka broker whose retention
/// deleted every partition's offsets before `log_start` (tansu 0.6 has neither
/// retention in memory nor DeleteRecords) and, as Apache Kafka does, answer a fetch
/// outside the log with OFFSET_OUT_OF_RANGE and -1 for the high watermark, last stable
/// offset and log start offset: its error reads carry `UnifiedLog.UnknownOffset`, not
/// the log's ends. tansu answers a fetch past the end with no error and its watermarks.
fn answer_as_apache_kafka_after_retention(proxy: &kafka_rpc_testkit::KafkaProxy, log_start: i64) {
    use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse};
    use kafka_rpc_testkit::kafka_proxy::api;
    const OFFSET_OUT_OF_RANGE: i16 = 1;
    /// ListOffsets' timestamp for "the earliest offset".
    const EARLIEST: i64 = -2;
    proxy.rewrite_responses(api::FETCH, move |request, response| {
        rewrite(ApiKey::Fetch, request, response, |req: &FetchRequest, resp: &mut FetchResponse| {
            for topic in &mut resp.responses {
                // Fetch v13 names topics by id, earlier versions by name.
                let asked = req.topics.iter().filter(|t| t.topic == topic.topic && t.topic_id == topic.topic_id);
                let asked: Vec<_> = asked.flat_map(|t| t.partitions.iter()).collect();
                for p in &mut topic.partitions {
                    let Some(asked) = asked.iter().find(|a| a.partition == p.partition_index) else { continue };
                    let outside = asked.fetch_offset < log_start
                        || (p.high_watermark >= 0 && asked.fetch_offset > p.high_watermark);
                    if outside || p.error_code == OFFSET_OUT_OF_RANGE {
                        p.error_code = OFFSET_OUT_OF_RANGE;
                        p.high_watermark = -1;
                        p.last_stable_offset = -1;
                        p.log_start_offset = -1;
                        p.records = Some(Bytes::new());
                    } else {
                        p.log_start_offset = p.log_start_offset.max(log_start);
                    }
                }
            }
        })
    });
    proxy.rewrite_responses(api::LIST_OFFSETS, move |request, response| {
        rewrite(ApiKey::ListOffsets, request, response, |req: &ListOffsetsRequest, resp: &mut ListOffsetsResponse| {
            for topic in &mut resp.topics {
                let asked = req.topics.iter().filter(|t| t.name == topic.name).flat_map(|t| t.partitions.iter());
                let earliest: Vec<i32> = asked.filter(|a| a.timestamp == EARLIEST).map(|a| a.partition_index).collect();
                for p in topic.partitions.iter_mut().filter(|p| earliest.contains(&p.partition_index)) {
                    p.offset = p.offset.max(log_start);
                }
            }
        })
    });
}

/// Apache Kafka answers an out-of-range fetch without the log's ends (-1 for both).
/// The reader looks them up rather than taking them as 0: with (0, 0), a tail past
/// the end reset to 0 whatever its policy, and a tail before a log start that
/// retention moved past 0 was answered (0, 0) at 0 as well, matched neither reset
/// rule and retried the same fetch forever, its partition blocked for good.
#[tokio::test]
async fn an_out_of_range_answer_without_the_logs_ends_is_given_the_true_ends() {
    const LOG_START: i64 = 3;
    let broker = kafka_support::ProxiedBroker::start();
    answer_as_apache_kafka_after_retention(&broker.proxy, LOG_START);
    let t = kafka_support::connect(broker.config()).await;
    let name = topic(&t, "unknown-ends", 1).await;
    for i in 0..5 {
        t.produce(&name, 0, vec![record("k", &format!("{i}"), &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    }
    let mut reader = t.reader(&name, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    for (offset, what) in [(1000, "past the end"), (0, "before the log start")] {
        // An out-of-range answer comes at once; a short wait would only let a slow first
        // exchange (a new fetch session connecting through the proxy) read as "nothing yet".
        match tokio::time::timeout(WAIT, reader.fetch(offset, WAIT)).await {
            Ok(Err(TransportError::OffsetOutOfRange { offset: at, earliest, latest, .. })) => {
                assert_eq!((at, earliest, latest), (offset, LOG_START, 5), "fetch {what}");
            }
            other => panic!("fetch {what}: {other:?}"),
        }
    }
    // Where the error says the log starts, the records are.
    let got = tokio::time::timeout(WAIT, read_n(&t, &name, 0, LOG_START, 2)).await.unwrap_or_else(|_| panic!("read timed out"));
    let offsets: Vec<i64> = got.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [3, 4]);
}

/// One record batch holding a record at each of `offsets` (the first is the base).
fn batch_at(offsets: &[i64]) -> Bytes {
    use kafka_protocol::records::{Compression, Record as WireRecord, RecordBatchEncoder, RecordEncodeOptions, TimestampType};
    let base = offsets.first().copied().unwrap_or_default();
    let records: Vec<WireRecord> = offsets
        .iter()
        .map(|&offset| WireRecord {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset,
            // kafka-protocol starts a new batch wherever offset - sequence changes.
            sequence: i32::try_from(offset - base - 1).unwrap_or_else(|_| panic!("offsets {offsets:?} span more than i32")),
            timestamp: 0,
            key: None,
            value: Some(Bytes::from_static(b"v")),
            headers: Default::default(),
        })
        .collect();
    let mut buf = bytes::BytesMut::new();
    let options = RecordEncodeOptions { version: 2, compression: Compression::None };
    RecordBatchEncoder::encode(&mut buf, &records, &options).unwrap_or_else(|e| panic!("encode: {e}"));
    buf.freeze()
}

/// A broker answering with a record at offset `i64::MAX` (any offset delta up to
/// `i32::MAX` from a base that leaves room for it decodes): the offset after it does
/// not exist. Computing it unchecked panicked the broker's fetch session task (debug
/// builds), after which every reader of that broker got empty answers for ever; release
/// builds wrapped it to `i64::MIN`, and a tail resumed there, out of range, reset and
/// read the partition again. Such a batch is unreadable, skipped like any other.
#[tokio::test]
async fn a_record_at_the_last_offset_of_i64_is_skipped_not_the_end_of_the_fetch_session() {
    use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse};
    use kafka_rpc_testkit::kafka_proxy::api;
    let broker = kafka_support::ProxiedBroker::start();
    let t = kafka_support::connect(broker.config()).await;
    let name = topic(&t, "last-offset", 1).await;
    t.produce(&name, 0, vec![record("k", "v", &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    let hostile = batch_at(&[i64::MAX - i64::from(i32::MAX), i64::MAX]);
    broker.proxy.rewrite_responses(api::FETCH, move |request, response| {
        rewrite(ApiKey::Fetch, request, response, |_: &FetchRequest, resp: &mut FetchResponse| {
            for p in resp.responses.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                if p.records.as_ref().is_some_and(|r| !r.is_empty()) {
                    p.records = Some(hostile.clone());
                    // A log that reaches that far, so the batch is inside what a
                    // read-committed reader may read and its offsets are checked, not
                    // held back as past the last stable offset.
                    p.high_watermark = i64::MAX;
                    p.last_stable_offset = i64::MAX;
                }
            }
        })
    });
    let before = t.unreadable_records();
    let mut reader = t.reader(&name, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    let fetched = tokio::time::timeout(Duration::from_secs(10), reader.fetch(0, Duration::from_millis(100)))
        .await
        .unwrap_or_else(|_| panic!("the fetch never returned: the broker's fetch session ended"));
    if let Ok(records) = &fetched {
        assert!(records.is_empty(), "records handed out: {records:?}");
    }
    assert!(t.unreadable_records() > before, "the batch is skipped and counted; the fetch gave {fetched:?}");
    // The session still serves: another topic on the same broker is read.
    broker.proxy.rewrite_responses(api::FETCH, |_, _| None);
    let other = topic(&t, "after-last-offset", 1).await;
    t.produce(&other, 0, vec![record("k", "fine", &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    let got = tokio::time::timeout(WAIT, read_n(&t, &other, 0, 0, 1)).await.unwrap_or_else(|_| panic!("read timed out"));
    assert_eq!(got[0].record.value.as_deref(), Some(&b"fine"[..]));
}

/// The high watermark is read from a fetch answer. Its records are not needed, yet
/// rskafka decoded them, adding each record's offset delta to the batch's base offset
/// unchecked: a base offset of `i64::MAX` panicked the caller of `latest_offset` (debug
/// builds), which is a client starting, a group member resetting a partition, or a
/// reader that went out of range.
#[tokio::test]
async fn a_high_watermark_answer_with_records_past_i64_is_read_not_a_panic() {
    use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse};
    use kafka_rpc_testkit::kafka_proxy::api;
    let broker = kafka_support::ProxiedBroker::start();
    let t = kafka_support::connect(broker.config()).await;
    let name = topic(&t, "hw-past-i64", 1).await;
    t.produce(&name, 0, vec![record("k", "a", &[]), record("k", "b", &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    // Offsets 0 and 1, then the base offset (outside the checksum) moved to the very end.
    let mut hostile = batch_at(&[0, 1]).to_vec();
    hostile[..8].copy_from_slice(&i64::MAX.to_be_bytes());
    let hostile = Bytes::from(hostile);
    broker.proxy.rewrite_responses(api::FETCH, move |request, response| {
        rewrite(ApiKey::Fetch, request, response, |_: &FetchRequest, resp: &mut FetchResponse| {
            for p in resp.responses.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                p.records = Some(hostile.clone());
            }
        })
    });
    let latest = tokio::time::timeout(WAIT, t.latest_offset(&name, 0)).await.unwrap_or_else(|_| panic!("no high watermark"));
    assert_eq!(latest.unwrap_or_else(|e| panic!("latest offset: {e}")), 2);
}

// ---- hostile and failing group members ----

/// A bare Kafka-protocol connection for playing a misbehaving group member.
struct RawMember {
    stream: tokio::net::TcpStream,
    correlation: i32,
}

impl RawMember {
    async fn connect() -> Self {
        let addr = bootstrap().split(',').next().unwrap_or_default().to_string();
        let stream = tokio::net::TcpStream::connect(&addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        RawMember { stream, correlation: 0 }
    }

    async fn call<Req, Resp>(&mut self, key: i16, version: i16, req: &Req) -> Resp
    where
        Req: kafka_protocol::protocol::Encodable + kafka_protocol::protocol::HeaderVersion,
        Resp: kafka_protocol::protocol::Decodable + kafka_protocol::protocol::HeaderVersion,
    {
        use bytes::{BufMut, BytesMut};
        use kafka_protocol::messages::{RequestHeader, ResponseHeader};
        use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.correlation += 1;
        let header = RequestHeader::default()
            .with_request_api_key(key)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str("hostile")));
        let mut body = BytesMut::new();
        header.encode(&mut body, Req::header_version(version)).unwrap_or_else(|e| panic!("encode header: {e}"));
        req.encode(&mut body, version).unwrap_or_else(|e| panic!("encode request: {e}"));
        let mut frame = BytesMut::new();
        frame.put_i32(body.len() as i32);
        frame.put_slice(&body);
        self.stream.write_all(&frame).await.unwrap_or_else(|e| panic!("write: {e}"));
        let size = self.stream.read_i32().await.unwrap_or_else(|e| panic!("read size: {e}"));
        let mut buf = vec![0u8; size as usize];
        self.stream.read_exact(&mut buf).await.unwrap_or_else(|e| panic!("read body: {e}"));
        let mut buf = Bytes::from(buf);
        ResponseHeader::decode(&mut buf, Resp::header_version(version)).unwrap_or_else(|e| panic!("response header: {e}"));
        Resp::decode(&mut buf, version).unwrap_or_else(|e| panic!("decode response: {e}"))
    }

    /// Joins `group` (JoinGroup v5) as a `consumer` with `metadata` as its
    /// subscription; see [`RawMember::join_as`].
    async fn join(&mut self, group: &str, metadata: &'static [u8]) -> kafka_protocol::messages::JoinGroupResponse {
        self.join_as(group, "consumer", "range", metadata).await
    }

    /// Joins `group` with one protocol, retrying once with the member id the broker
    /// hands out; waits out the rebalance.
    async fn join_as(
        &mut self,
        group: &str,
        protocol_type: &'static str,
        protocol: &'static str,
        metadata: &'static [u8],
    ) -> kafka_protocol::messages::JoinGroupResponse {
        use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
        use kafka_protocol::messages::{GroupId, JoinGroupRequest, JoinGroupResponse};
        use kafka_protocol::protocol::StrBytes;
        let mut member_id = StrBytes::default();
        loop {
            let req = JoinGroupRequest::default()
                .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
                .with_session_timeout_ms(10_000)
                .with_rebalance_timeout_ms(20_000)
                .with_member_id(member_id.clone())
                .with_protocol_type(StrBytes::from_static_str(protocol_type))
                .with_protocols(vec![JoinGroupRequestProtocol::default()
                    .with_name(StrBytes::from_static_str(protocol))
                    .with_metadata(Bytes::from_static(metadata))]);
            let resp: JoinGroupResponse = self.call(11, 5, &req).await;
            if resp.error_code == 79 && member_id.is_empty() {
                member_id = resp.member_id.clone();
                continue;
            }
            return resp;
        }
    }
}

#[tokio::test]
async fn a_member_with_a_malformed_subscription_gets_nothing_and_the_leader_carries_on() {
    let t = transport().await;
    let name = topic(&t, "group-hostile", 3).await;
    let group = unique_topic("g");
    let mut leader = join(&t, &group, &name, OffsetReset::Earliest).await;
    assert_eq!(partitions(&expect_assigned(&mut leader, "leader").await), (0..3).collect());

    // Version 0, then a topic count of 2^31 - 1 in six bytes: decoded naively it asks
    // for tens of GiB before finding the bytes missing.
    let mut hostile = RawMember::connect().await;
    let hostile_join = tokio::spawn({
        let group = group.clone();
        async move { hostile.join(&group, &[0, 0, 0x7f, 0xff, 0xff, 0xff]).await }
    });
    expect_revoked(&mut leader, "leader").await;
    assert_eq!(
        partitions(&expect_assigned(&mut leader, "leader").await),
        (0..3).collect(),
        "the hostile member gets nothing, so the leader keeps every partition"
    );
    let joined = tokio::time::timeout(WAIT, hostile_join)
        .await
        .unwrap_or_else(|_| panic!("the hostile member's join never finished"))
        .unwrap_or_else(|e| panic!("hostile join task: {e}"));
    assert_eq!(joined.error_code, 0, "the hostile member was admitted to the rebalance");
    leader.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
}

#[tokio::test]
async fn a_fatal_group_error_is_a_failed_event_and_leave_reports_it() {
    let t = transport().await;
    let name = topic(&t, "group-fatal", 1).await;
    let group = unique_topic("g");
    // A Kafka Connect worker holds the group id first: a consumer cannot join a
    // group of another protocol type (INCONSISTENT_GROUP_PROTOCOL), and retrying
    // would only ask again.
    let mut connect_worker = RawMember::connect().await;
    let joined = connect_worker.join_as(&group, "connect", "sessioned", b"worker").await;
    assert_eq!(joined.error_code, 0, "the connect worker joined");
    let mut m = join(&t, &group, &name, OffsetReset::Earliest).await;
    match next_event(&mut m, "consumer").await {
        GroupEvent::Failed(e @ TransportError::Group { .. }) => {
            // The broker's error code is kept as the source, and its name ends the message.
            assert!(std::error::Error::source(&e).is_some(), "{e:?}");
            assert!(e.to_string().contains("InconsistentGroupProtocol"), "{e}")
        }
        other => panic!("expected the membership to fail, got {other:?}"),
    }
    let after = tokio::time::timeout(WAIT, m.events.recv()).await.unwrap_or_else(|_| panic!("events never closed"));
    assert!(after.is_none(), "no event follows Failed: {after:?}");
    assert!(m.handle.leave().await.is_err(), "leave reports why the membership ended");
}

// ---- revocation ----

#[tokio::test]
async fn a_member_finishing_revoked_work_past_its_session_timeout_stays_in_the_group() {
    let session = Duration::from_secs(6);
    let t = kafka_support::connect(kafka_support::config().session_timeout(session)).await;
    let name = topic(&t, "group-slow-revoke", 4).await;
    let group = unique_topic("g");
    let mut slow = join(&t, &group, &name, OffsetReset::Earliest).await;
    assert_eq!(expect_assigned(&mut slow, "slow").await.len(), 4);
    let mut other = join(&t, &group, &name, OffsetReset::Earliest).await;
    let done = match next_event(&mut slow, "slow").await {
        GroupEvent::Revoked { done, .. } => done,
        e => panic!("slow: expected a revocation, got {e:?}"),
    };
    // A handler that runs longer than the session timeout: the member must stay
    // alive (heartbeating) so nobody else gets its partitions meanwhile. (Work that
    // outlasts the session is the case under test: nothing to await.)
    tokio::time::sleep(session + Duration::from_secs(3)).await;
    let _ = done.send(());
    let a = partitions(&expect_assigned(&mut slow, "slow").await);
    let b = partitions(&expect_assigned(&mut other, "other").await);
    assert_eq!((a.len(), b.len()), (2, 2), "still two members: slow {a:?}, other {b:?}");
    other.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
    slow.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
}

/// The coordinator stops answering a member's heartbeats without closing its connection
/// (a hung broker). A session timeout after its last answered heartbeat the coordinator
/// expires the member and may give its partitions to another, so the member must learn
/// it by then, not at its request timeout (20 s here), and must count its partitions as
/// lost: the hand-over commit of its server is refused, not written over the progress
/// of their next owner. Once the broker answers again, it rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_heartbeats_go_unanswered_loses_its_partitions_within_its_session() {
    let broker = kafka_support::ProxiedBroker::start();
    let session = Duration::from_secs(6);
    let t = kafka_support::connect(broker.config().client_id("hung-member").session_timeout(session)).await;
    let name = topic(&t, "group-hung", 2).await;
    let group = unique_topic("g");
    let mut member = join(&t, &group, &name, OffsetReset::Earliest).await;
    let owned = expect_assigned(&mut member, "member").await;
    assert_eq!(owned.len(), 2);

    broker.proxy.hold_responses(kafka_rpc_testkit::kafka_proxy::api::HEARTBEAT, "hung-member");
    let held = tokio::time::Instant::now();
    let event = tokio::time::timeout(session + Duration::from_secs(3), member.events.recv()).await;
    let Ok(Some(GroupEvent::Revoked { done, .. })) = event else {
        panic!("no revocation within the session timeout ({session:?}) of the last answered heartbeat: {event:?}")
    };
    // What a server's hand-over does before it answers the revocation.
    match member.handle.commit(&[(owned[0].tp.clone(), 3)]).await {
        Err(TransportError::NotAssigned { .. }) => {}
        other => panic!("an expired member's hand-over commit, {:?} into the hold, was not refused: {other:?}", held.elapsed()),
    }
    let _ = done.send(());

    broker.proxy.release();
    // Back in the group. (tansu 0.6 assigns it nothing: it never hands an expired
    // member's partitions on, the limitation the ignored survivor test records.)
    expect_assigned(&mut member, "member").await;
    member.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
}

/// A consumed topic gains partitions (tansu cannot add any, so it is deleted and
/// created again with two): the member notices within its metadata age and rejoins, and
/// the new partition is assigned, where before it stayed unserved until some unrelated
/// rebalance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_rejoins_when_a_consumed_topic_gains_partitions() {
    let t = kafka_support::connect(kafka_support::config().metadata_max_age(Duration::from_secs(1))).await;
    let name = topic(&t, "group-grows", 1).await;
    let group = unique_topic("g");
    let mut member = join(&t, &group, &name, OffsetReset::Earliest).await;
    assert_eq!(expect_assigned(&mut member, "member").await.len(), 1);

    let admin = rskafka::client::ClientBuilder::new(vec![bootstrap()]).build().await.unwrap_or_else(|e| panic!("admin client: {e}"));
    let controller = admin.controller_client().unwrap_or_else(|e| panic!("controller: {e}"));
    controller.delete_topic(&name, 10_000).await.unwrap_or_else(|e| panic!("delete {name}: {e}"));
    let deadline = tokio::time::Instant::now() + WAIT;
    while t.partition_count(&name).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "{name} was not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(t.ensure_topic(&name, 2).await.unwrap_or_else(|e| panic!("recreate: {e}")), 2);

    // Revoked and assigned again, perhaps more than once while the topic was gone.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match next_event(&mut member, "member").await {
            GroupEvent::Revoked { done, .. } => {
                let _ = done.send(());
            }
            GroupEvent::Assigned(a) if a.len() == 2 => break,
            GroupEvent::Assigned(_) => {}
            other => panic!("member: {other:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "the new partition was never assigned");
    }
    member.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
}

#[tokio::test]
async fn a_late_commit_for_a_partition_moved_away_is_refused_locally() {
    let t = transport().await;
    let name = topic(&t, "group-late-commit", 2).await;
    let group = unique_topic("g");
    let mut first = join(&t, &group, &name, OffsetReset::Earliest).await;
    assert_eq!(expect_assigned(&mut first, "first").await.len(), 2);
    let mut second = join(&t, &group, &name, OffsetReset::Earliest).await;
    expect_revoked(&mut first, "first").await;
    let kept = partitions(&expect_assigned(&mut first, "first").await);
    let moved = partitions(&expect_assigned(&mut second, "second").await);
    let moved = *moved.iter().next().unwrap_or_else(|| panic!("the second member got nothing"));
    // The first member's worker for `moved` outlived the revocation and commits now.
    match first.handle.commit(&[(TopicPartition::new(name.clone(), moved), 99)]).await {
        Err(TransportError::NotAssigned { tp, .. }) => assert_eq!(tp, TopicPartition::new(name.clone(), moved)),
        other => panic!("a commit for {name}-{moved}, now the second member's, was not refused: {other:?}"),
    }
    let own = *kept.iter().next().unwrap_or_else(|| panic!("the first member kept nothing"));
    first
        .handle
        .commit(&[(TopicPartition::new(name.clone(), own), 1)])
        .await
        .unwrap_or_else(|e| panic!("commit of an owned partition: {e}"));
    second.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
    first.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
}

// ---- static membership ----

#[tokio::test]
async fn a_restarted_static_member_takes_its_place_before_the_session_timeout() {
    restart_a_static_member(false).await;
}

#[tokio::test]
async fn a_restarted_static_member_keeps_its_partitions() {
    restart_a_static_member(true).await;
}

/// Kills a static member (no LeaveGroup) and starts it again under the same
/// `group.instance.id`; `check_stable` also requires that it then keeps its
/// partitions.
///
/// The session timeout is 30 s, as an operator of tansu 0.6.0 must set it for static
/// members (Kafka's default is 45 s): tansu holds a static member's JoinGroup and
/// SyncGroup at least 3 s each, refreshes a member's last contact only on a successful
/// heartbeat (not on join or sync), and checks expiry before refreshing it. A member
/// restarted under the same `group.instance.id` inherits its predecessor's last contact
/// and sends its first heartbeat ~6 s after the restart; with a 10 s session that
/// heartbeat found its own entry expired and was answered REBALANCE_IN_PROGRESS.
async fn restart_a_static_member(check_stable: bool) {
    let session = Duration::from_secs(30);
    let config = move || kafka_support::config().session_timeout(session);
    let t = kafka_support::connect(config()).await;
    let name = topic(&t, "group-static", 2).await;
    let group = unique_topic("g");
    let instance = unique_topic("instance");

    // The first life runs on a runtime of its own, which is then dropped: every task
    // stops mid-flight and no LeaveGroup is sent, as when the process is killed.
    let first = std::thread::spawn({
        let (name, group, instance) = (name.clone(), group.clone(), instance.clone());
        move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("runtime: {e}"));
            let (owned, membership, transport) = rt.block_on(async {
                let t = kafka_support::connect(config().group_instance_id(instance)).await;
                let mut m = join(&t, &group, &name, OffsetReset::Earliest).await;
                (partitions(&expect_assigned(&mut m, "first life").await), m, t)
            });
            rt.shutdown_background();
            drop((membership, transport));
            owned
        }
    })
    .join()
    .unwrap_or_else(|_| panic!("first life panicked"));
    assert_eq!(first, (0..2).collect());

    let restarted = std::time::Instant::now();
    let t2 = kafka_support::connect(config().group_instance_id(instance)).await;
    let mut second = join(&t2, &group, &name, OffsetReset::Earliest).await;
    assert_eq!(partitions(&expect_assigned(&mut second, "second life").await), (0..2).collect());
    let took = restarted.elapsed();
    // A newcomer would wait for the old member's session to expire (30 s).
    assert!(took < session / 2, "the restarted member waited {took:?}, as if for a session timeout");
    eprintln!("a restarted static member was assigned after {took:?}");
    if check_stable {
        // Several heartbeat intervals without a change.
        match tokio::time::timeout(Duration::from_secs(3), second.events.recv()).await {
            Err(_) => {}
            Ok(e) => panic!("the restarted static member lost its assignment: {e:?}"),
        }
    }
    second.handle.leave().await.unwrap_or_else(|e| panic!("leave: {e}"));
}

#[tokio::test]
async fn a_reader_resuming_inside_a_produce_reads_the_rest_of_it() {
    // A server taking over a partition resumes at the committed offset, which may
    // fall inside what one produce call wrote.
    let t = transport().await;
    let name = topic(&t, "mid-batch", 1).await;
    let batch: Vec<Record> = (0..10).map(|i| record("k", &format!("{i}"), &[])).collect();
    t.produce(&name, 0, batch).await.unwrap_or_else(|e| panic!("produce: {e}"));
    t.produce(&name, 0, vec![record("k", "10", &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    let got = tokio::time::timeout(WAIT, read_n(&t, &name, 0, 5, 6)).await.unwrap_or_else(|_| panic!("read timed out"));
    let offsets: Vec<i64> = got.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (5..11).collect::<Vec<_>>());
}

/// tansu creates a topic of 0 partitions if asked, and lists it as existing with 0:
/// a client that took that count divided by it (a panic from broker data). A count
/// below 1 is refused before asking, and a topic listed without partitions is not
/// taken as usable.
#[tokio::test]
async fn a_topic_of_no_partitions_is_refused_not_divided_by() {
    let t = transport().await;
    let name = unique_topic("zero-partitions");
    match t.ensure_topic(&name, 0).await {
        Err(TransportError::TopicCreation { reason, .. }) => assert!(reason.contains("must be positive"), "{reason}"),
        other => panic!("a topic of 0 partitions was not refused: {other:?}"),
    }
    assert_eq!(t.ensure_topic(&name, 3).await.unwrap_or_else(|e| panic!("ensure_topic: {e}")), 3);
}

#[tokio::test]
async fn a_reader_resuming_inside_the_last_produce_reads_the_rest_of_it() {
    // tansu answers a fetch from inside a batch with the batches after it: none, when the
    // batch is the log's last, and the reader must not wait for a produce that may never
    // come.
    let t = transport().await;
    let name = topic(&t, "mid-last", 1).await;
    let batch: Vec<Record> = (0..10).map(|i| record("k", &format!("{i}"), &[])).collect();
    t.produce(&name, 0, batch).await.unwrap_or_else(|e| panic!("produce: {e}"));
    let got = tokio::time::timeout(WAIT, read_n(&t, &name, 0, 5, 5)).await.unwrap_or_else(|_| panic!("read timed out"));
    let offsets: Vec<i64> = got.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (5..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_reader_resuming_inside_a_batch_behind_a_full_fetch_reads_the_rest_of_it() {
    // Thirty 200 KiB records travel in batches of two; looking back from the log start,
    // one fetch (4 MiB) ends before the batch holding offset 29. The look-back goes on
    // from the last whole batch it got, not from 29, whose answer would skip 29.
    let t = transport().await;
    let name = topic(&t, "mid-big", 1).await;
    let big = "x".repeat(200 * 1024);
    let batch: Vec<Record> = (0..30).map(|_| record("k", &big, &[])).collect();
    t.produce(&name, 0, batch).await.unwrap_or_else(|e| panic!("produce: {e}"));
    t.produce(&name, 0, vec![record("k", "30", &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    let got = tokio::time::timeout(WAIT, read_n(&t, &name, 0, 29, 2)).await.unwrap_or_else(|_| panic!("read timed out"));
    let offsets: Vec<i64> = got.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [29, 30], "record 29, inside the batch 28..=29, then 30");
}


/// Fetch requests the broker behind `broker` sees while `readers` each wait `window`
/// on an empty partition.
async fn fetches_while_waiting(
    broker: &kafka_support::ProxiedBroker,
    readers: &mut [Box<dyn kafka_rpc::transport::PartitionReader>],
    window: Duration,
) -> u64 {
    let before = broker.proxy.stats();
    let waits = readers.iter_mut().map(|r| r.fetch(0, window));
    for got in futures::future::join_all(waits).await {
        assert!(got.unwrap_or_else(|e| panic!("fetch: {e}")).is_empty(), "records in an empty partition");
    }
    broker.proxy.stats().since(&before).api(kafka_rpc_testkit::kafka_proxy::api::FETCH).requests
}

/// Readers of eight partitions on one broker share one fetch request per round, as
/// the Java client and librdkafka do: waiting on empty partitions, eight readers
/// cost the broker about as many Fetch requests as one reader (one each per round
/// before), and records produced to each partition reach that partition's reader.
#[tokio::test]
async fn readers_of_many_partitions_share_one_fetch_request_per_broker() {
    const WINDOW: Duration = Duration::from_millis(600);
    let broker = kafka_support::ProxiedBroker::start();
    let t = kafka_support::connect(broker.config()).await;
    let name = topic(&t, "shared-fetch", 8).await;
    let mut one = vec![t.reader(&name, 0).await.unwrap_or_else(|e| panic!("reader: {e}"))];
    // The first fetch registers the reader and opens the broker's fetch connection.
    fetches_while_waiting(&broker, &mut one, Duration::from_millis(50)).await;
    let alone = fetches_while_waiting(&broker, &mut one, WINDOW).await;
    drop(one);
    let mut eight = Vec::new();
    for p in 0..8 {
        eight.push(t.reader(&name, p).await.unwrap_or_else(|e| panic!("reader: {e}")));
    }
    fetches_while_waiting(&broker, &mut eight, Duration::from_millis(50)).await;
    let together = fetches_while_waiting(&broker, &mut eight, WINDOW).await;
    assert!(alone > 0, "no Fetch reached the broker while one reader waited");
    assert!(
        together < 2 * alone,
        "eight readers sent {together} fetch requests where one reader sent {alone}: they do not share fetches"
    );

    for p in 0..8 {
        t.produce(&name, p, vec![record(&format!("k{p}"), &format!("v{p}"), &[])])
            .await
            .unwrap_or_else(|e| panic!("produce: {e}"));
    }
    let reads = eight.iter_mut().map(|r| r.fetch(0, WAIT));
    for (p, got) in futures::future::join_all(reads).await.into_iter().enumerate() {
        let got = got.unwrap_or_else(|e| panic!("fetch of partition {p}: {e}"));
        let values: Vec<_> = got.iter().map(|r| r.record.value.clone()).collect();
        assert_eq!(values, [Some(Bytes::from(format!("v{p}")))], "partition {p} got another partition's records");
        assert!(got.iter().all(|r| r.partition == p as i32));
    }
    eprintln!("fetch requests in {WINDOW:?}: one reader {alone}, eight readers {together}");
}

/// A foreign producer (librdkafka) writes one small record, then a decompression bomb
/// in each codec Kafka has (70 MiB of zeros; snappy, the weakest, packs it to ~3.4 MiB), then another
/// small record, each in a batch of its own.
const BOMBS_PY: &str = r#"
import sys
from confluent_kafka import Producer
boot, topic, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
errors = []
def sent(err, msg):
    if err is not None:
        errors.append(str(err))
def send(codec, value):
    p = Producer({"bootstrap.servers": boot, "compression.type": codec, "compression.level": 1 if codec == "gzip" else -1,
                  "message.max.bytes": 200_000_000, "linger.ms": 0, "enable.idempotence": False})
    p.produce(topic, value=value, partition=0, on_delivery=sent)
    p.flush(60)
send("none", b"before")
for codec in ["gzip", "snappy", "lz4", "zstd"]:
    send(codec, bytes(size))
send("none", b"after")
if errors:
    raise SystemExit(f"produce failed: {errors}")
"#;

/// Batches that inflate past the reader's limit are skipped by their offsets and
/// counted, in the transport's counter and in the metric; the partition moves on to the
/// record after them. A reader that inflated them would hold 70 MiB per bomb.
#[tokio::test]
async fn decompression_bombs_from_a_foreign_producer_are_skipped_and_counted() {
    // The only recorder of this test binary; the other tests' series do not matter here.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().expect("install a recorder");
    let t = transport().await;
    let name = topic(&t, "bombs", 1).await;
    let size = (kafka_rpc::transport::kafka::untrusted::MAX_INFLATED + (6 << 20)).to_string();
    let out = python_command(BOMBS_PY, &[&bootstrap(), &name, &size])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run Python ({e}): {NO_PYTHON}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("No module named 'confluent_kafka'"), "Python module confluent-kafka is missing: {NO_PYTHON}");
    assert!(out.status.success(), "the bomb producer failed: {err}");

    let before = t.unreadable_records();
    let got = tokio::time::timeout(WAIT, read_n(&t, &name, 0, 0, 2)).await.unwrap_or_else(|_| panic!("read timed out"));
    let values: Vec<(i64, Option<Bytes>)> = got.iter().map(|r| (r.offset, r.record.value.clone())).collect();
    assert_eq!(values, [(0, Some(Bytes::from("before"))), (5, Some(Bytes::from("after")))]);
    assert_eq!(t.unreadable_records() - before, 4, "one skipped record per codec");
    let page = metrics.render();
    let series = format!("{}{{topic=\"{name}\"}} ", kafka_rpc::metrics::TRANSPORT_UNREADABLE);
    let counted = page.lines().find_map(|l| l.strip_prefix(series.as_str()));
    assert_eq!(counted, Some("4"), "the metric should count the four skipped records; page:\n{page}");
}

/// A reader reports where its next read starts, past offsets that hold nothing it
/// hands out: a transactional producer's commit marker (between records and at the
/// end) and batches it cannot decode. Reading from each reported position reaches the
/// log's end with every record read once, as Kafka's consumer position does (KIP-98).
#[tokio::test]
async fn a_reader_reports_its_position_past_markers_and_unreadable_batches() {
    let t = transport().await;
    let name = topic(&t, "markers", 1).await;
    let bootstrap = bootstrap();
    let append = |batch: Vec<u8>| raw_batches::produce(&bootstrap, &name, 0, batch).unwrap_or_else(|code| panic!("error {code}"));
    t.produce(&name, 0, vec![record("k", "a", &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    append(raw_batches::commit_marker());
    t.produce(&name, 0, vec![record("k", "b", &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    append(raw_batches::bad_checksum(&["x", "y"]));
    append(raw_batches::unknown_magic(&["z"]));
    append(raw_batches::commit_marker());
    let end = t.latest_offset(&name, 0).await.unwrap_or_else(|e| panic!("latest: {e}"));
    assert_eq!(end, 7);

    let mut reader = t.reader(&name, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    let (mut offset, mut read) = (0, Vec::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    while offset < end {
        assert!(tokio::time::Instant::now() < deadline, "read to {end} in {WAIT:?}; at {offset}");
        let fetch = reader.read(offset, Duration::from_millis(200)).await.unwrap_or_else(|e| panic!("read: {e}"));
        assert!(fetch.next_offset >= offset, "the position never goes back");
        assert!(fetch.records.iter().all(|r| r.offset < fetch.next_offset), "nor falls before a record it returned");
        read.extend(fetch.records.iter().map(|r| (r.offset, r.record.value.clone())));
        offset = fetch.next_offset;
    }
    assert_eq!(offset, end, "the reported position stops at the end");
    assert_eq!(read, [(0, Some(Bytes::from("a"))), (2, Some(Bytes::from("b")))]);
}

/// Sets the last offset delta of the batch at `base` in a fetch answer's record bytes
/// to `i32::MAX`: the header then claims offsets far past the log's end, and the
/// batch's checksum (which covers the delta) no longer matches.
fn claim_far(records: &Bytes, base: i64) -> Bytes {
    let mut data = records.to_vec();
    let mut at = 0;
    while at + 27 <= data.len() {
        let offset = i64::from_be_bytes(data[at..at + 8].try_into().unwrap_or_default());
        let length = i32::from_be_bytes(data[at + 8..at + 12].try_into().unwrap_or_default());
        if offset == base {
            data[at + 23..at + 27].copy_from_slice(&i32::MAX.to_be_bytes());
        }
        at += 12 + usize::try_from(length).unwrap_or(usize::MAX - at - 12);
    }
    Bytes::from(data)
}

/// A batch whose header, corrupted on its way to the reader, claims offsets far past
/// the log's end is skipped up to the high watermark, not to where the garbage said:
/// nothing lies past the high watermark, and the reported position is what a server
/// commits. Before, the position (and a server's commit) jumped two billion offsets
/// ahead; the next fetch was then out of range and reset per the policy, which re-read
/// the partition from its start (its handlers ran again) or skipped records produced
/// meanwhile.
#[tokio::test]
async fn a_corrupt_batch_claiming_offsets_past_the_end_is_passed_only_to_the_end() {
    use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse};
    let broker = kafka_support::ProxiedBroker::start();
    let t = kafka_support::connect(broker.config()).await;
    let name = topic(&t, "claims", 1).await;
    for value in ["a", "b"] {
        t.produce(&name, 0, vec![record("k", value, &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    }
    broker.proxy.rewrite_responses(kafka_rpc_testkit::kafka_proxy::api::FETCH, |request, response| {
        rewrite(ApiKey::Fetch, request, response, |_: &FetchRequest, resp: &mut FetchResponse| {
            for p in resp.responses.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                p.records = p.records.as_ref().map(|records| claim_far(records, 1));
            }
        })
    });
    let mut reader = t.reader(&name, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    let fetch = reader.read(0, Duration::from_millis(200)).await.unwrap_or_else(|e| panic!("read: {e}"));
    let offsets: Vec<i64> = fetch.records.iter().map(|r| r.offset).collect();
    assert_eq!((offsets, fetch.next_offset), (vec![0], 2), "the corrupt batch at 1 is passed up to the end, 2");
    t.produce(&name, 0, vec![record("k", "c", &[])]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    let fetch = tokio::time::timeout(WAIT, reader.read(2, WAIT)).await.unwrap_or_else(|_| panic!("read in time"));
    let fetch = fetch.unwrap_or_else(|e| panic!("the record after the corrupt batch is in range: {e}"));
    let offsets: Vec<i64> = fetch.records.iter().map(|r| r.offset).collect();
    assert_eq!((offsets, fetch.next_offset), (vec![2], 3), "the record produced after it is read");
}

/// Group and request timings that cannot work are refused when the transport connects,
/// naming the setting, as Kafka's consumer refuses `heartbeat.interval.ms` not below
/// `session.timeout.ms`: a zero heartbeat interval (heartbeats in a hot loop), one not
/// below the session timeout (the coordinator expires the member between heartbeats),
/// zero request or connect timeouts (every call would fail at once).
#[tokio::test]
async fn timings_that_cannot_work_are_refused_at_connect() {
    let cases = [
        ("heartbeat_interval", kafka_support::config().heartbeat_interval(Duration::ZERO)),
        (
            "heartbeat_interval",
            kafka_support::config().session_timeout(Duration::from_secs(10)).heartbeat_interval(Duration::from_secs(10)),
        ),
        ("request_timeout", kafka_support::config().request_timeout(Duration::ZERO)),
        ("rebalance_timeout", kafka_support::config().rebalance_timeout(Duration::ZERO)),
        ("connect_timeout", kafka_support::config().connect_timeout(Duration::ZERO)),
    ];
    for (setting, config) in cases {
        match KafkaTransport::connect(config.build()).await {
            Err(e) => assert!(e.to_string().contains(setting), "the error names `{setting}`: {e}"),
            Ok(_) => panic!("a transport with an unworkable `{setting}` should be refused at connect"),
        }
    }
}

/// A server's lag sample asks where every partition it owns ends, all at once, and its
/// commit tick (which also handles no revocation meanwhile) waits for the answers. A
/// broker that stops answering fetches without closing the connection must cost the
/// sample about one look-up's bound, not that bound once per partition queued behind
/// the one look-up connection kept per broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_look_ups_of_many_partitions_on_a_hung_broker_end_within_one_look_ups_bound() {
    let timeout = Duration::from_secs(1);
    let partitions = 8;
    let (broker, t, name) = ends_looked_up_then_hung("hung-ends", partitions, timeout).await;
    let started = tokio::time::Instant::now();
    let ends = futures::future::join_all((0..partitions).map(|p| t.latest_offset(&name, p))).await;
    let took = started.elapsed();
    broker.proxy.release();
    assert!(ends.iter().all(Result::is_err), "no fetch was answered: {ends:?}");
    // The look-ups queued on the kept connection wait one request timeout, then one more
    // on the connection beside it; the rest fail at once.
    assert!(took < 4 * timeout, "{partitions} look-ups on a hung broker took {took:?}, the request timeout being {timeout:?}");
}

/// As above, with the partitions' leaders to look up again (a failed end look-up
/// forgets the leader, which may have moved) and the broker not answering metadata
/// requests: the look-ups queued for the one metadata connection, each for its request
/// timeout, so the second sample of a hung broker took that timeout per partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_look_ups_needing_their_leaders_on_a_hung_broker_end_within_one_look_ups_bound() {
    let broker = kafka_support::ProxiedBroker::start();
    let timeout = Duration::from_secs(1);
    let t = kafka_support::connect(broker.config().client_id("hung-leaders").request_timeout(timeout)).await;
    let partitions = 8;
    let name = topic(&t, "hung-leaders", partitions).await;
    for p in 0..partitions {
        t.latest_offset(&name, p).await.unwrap_or_else(|e| panic!("latest of {p}: {e}"));
    }
    let all = || futures::future::join_all((0..partitions).map(|p| t.latest_offset(&name, p)));
    // One failed sample: every leader is forgotten.
    broker.proxy.hold_responses(kafka_rpc_testkit::kafka_proxy::api::FETCH, "hung-leaders");
    assert!(all().await.iter().all(Result::is_err), "no fetch was answered");
    broker.proxy.release();
    broker.proxy.hold_responses(kafka_rpc_testkit::kafka_proxy::api::METADATA, "hung-leaders");
    let started = tokio::time::Instant::now();
    let ends = all().await;
    let took = started.elapsed();
    broker.proxy.release();
    assert!(ends.iter().all(Result::is_err), "no metadata request was answered: {ends:?}");
    assert!(took < 4 * timeout, "{partitions} look-ups on a hung broker took {took:?}, the request timeout being {timeout:?}");
}

/// An end look-up on a broker that stops answering fails after one request timeout, not
/// two: the one retry on a new connection is for a kept connection the broker closed
/// while it sat idle, and one that timed out is not that. Before, a client starting (or
/// a `Latest` reset) against a hung broker waited twice the request timeout, 60 s at the
/// defaults, before learning the look-up failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_look_up_on_a_hung_broker_fails_after_one_request_timeout() {
    let broker = kafka_support::ProxiedBroker::start();
    let timeout = Duration::from_secs(2);
    let t = kafka_support::connect(broker.config().client_id("hung-end").request_timeout(timeout)).await;
    let name = topic(&t, "hung-end", 1).await;
    // The leader known and the kept connection open, as for a client already running.
    t.latest_offset(&name, 0).await.unwrap_or_else(|e| panic!("latest: {e}"));
    // The high watermark is read with a fetch on the kept connection (ListOffsets goes
    // through rskafka, bounded once).
    broker.proxy.hold_responses(kafka_rpc_testkit::kafka_proxy::api::FETCH, "hung-end");
    let started = tokio::time::Instant::now();
    let end = t.latest_offset(&name, 0).await;
    let took = started.elapsed();
    broker.proxy.release();
    assert!(matches!(end, Err(TransportError::Connection { .. })), "no fetch was answered: {end:?}");
    assert!(took < timeout * 3 / 2, "the look-up took {took:?} to fail, the request timeout being {timeout:?}");
}

/// A topic `name` of `partitions` whose ends were each looked up once (every leader known
/// and the kept connection open, as after a server's first lag sample) through a proxy
/// that from then on holds every fetch answer, with a request timeout of `timeout`.
async fn ends_looked_up_then_hung(name: &str, partitions: i32, timeout: Duration) -> (kafka_support::ProxiedBroker, KafkaTransport, String) {
    let broker = kafka_support::ProxiedBroker::start();
    let t = kafka_support::connect(broker.config().client_id(name).request_timeout(timeout)).await;
    let topic = topic(&t, name, partitions).await;
    for p in 0..partitions {
        t.latest_offset(&topic, p).await.unwrap_or_else(|e| panic!("latest of {p}: {e}"));
    }
    broker.proxy.hold_responses(kafka_rpc_testkit::kafka_proxy::api::FETCH, name);
    (broker, t, topic)
}

/// When a look-up holds the kept connection past its request timeout, the look-ups
/// queued behind it do not each open a connection of their own: on a hung broker with
/// many partitions (a server's lag sample asks for all it owns at once) that burst
/// connections, one per partition, each left to hang as well. At most one connection
/// beside the kept one is in use; the look-ups that find both taken fail at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_look_ups_on_a_hung_broker_open_at_most_one_connection_beside_the_kept_one() {
    let partitions = 16;
    let (broker, t, name) = ends_looked_up_then_hung("hung-burst", partitions, Duration::from_secs(1)).await;
    let before = broker.proxy.stats();
    let ends = futures::future::join_all((0..partitions).map(|p| t.latest_offset(&name, p))).await;
    let opened = broker.proxy.stats().since(&before).connections;
    broker.proxy.release();
    assert!(ends.iter().all(Result::is_err), "no fetch was answered: {ends:?}");
    assert!(
        ends.iter().all(|e| matches!(e, Err(TransportError::Connection { .. }))),
        "each look-up fails as a connection failure: {ends:?}"
    );
    // The kept connection, dropped after its look-up timed out, is opened again by the
    // next look-up; beside it, one more.
    assert!(opened <= 2, "{partitions} look-ups on a hung broker opened {opened} connections");
}
