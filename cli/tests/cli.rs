//! The built `kafka-rpc` binary against a real broker (tansu, started by the shared
//! launcher in tests/support/kafka.rs, or `KAFKA_BOOTSTRAP`), with a kafka-rpc server
//! in this process answering.
//!
//! Every failure case checks the promise of the CLI: its own exit code, one line on
//! stderr, nothing on stdout, no panic.

#[path = "../../tests/support/kafka.rs"]
mod kafka;
#[path = "../../tests/support/raw_batches.rs"]
mod raw_batches;
#[path = "../../tests/support/rewrite.rs"]
mod rewrite;

use std::process::Stdio;
use std::time::Duration;

use kafka_rpc::prelude::*;
use kafka_rpc::transport::Record;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Longest any one run of the binary may take before the test fails.
const RUN_LIMIT: Duration = Duration::from_secs(90);

#[derive(Serialize, Deserialize, Request)]
#[request(type = "cli.add", response = Sum)]
struct Add {
    a: i64,
    b: i64,
}

#[derive(Serialize, Deserialize)]
struct Sum {
    sum: i64,
}

#[handler]
async fn add(req: Add) -> Result<Sum, RemoteError> {
    if req.a < 0 {
        return Err(RemoteError::new("NEGATIVE", "a must not be negative"));
    }
    Ok(Sum { sum: req.a + req.b })
}

/// What one run of the binary left behind.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kafka-rpc"));
    // A panic would show its backtrace; the tests check there is none to show.
    cmd.args(args).env("RUST_BACKTRACE", "1").stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

async fn kafka_rpc(args: &[&str]) -> Run {
    let output = command(args).output();
    let output = match tokio::time::timeout(RUN_LIMIT, output).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot run kafka-rpc {args:?}: {e}"),
        Err(_) => panic!("kafka-rpc {args:?} still running after {RUN_LIMIT:?}"),
    };
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `kafka-rpc call` on the test broker: `json` to `request_type` on `topic`, plus `extra` flags.
async fn call(topic: &str, request_type: &str, json: &str, extra: &[&str]) -> Run {
    let bootstrap = kafka::bootstrap();
    let args = ["call", "--bootstrap", &bootstrap, "--topic", topic, "--type", request_type, "--json", json];
    kafka_rpc(&[&args[..], extra].concat()).await
}

/// `kafka-rpc inspect --from-beginning` of `topic` on the test broker.
async fn inspect(topic: &str) -> Run {
    kafka_rpc(&["inspect", "--bootstrap", &kafka::bootstrap(), "--topic", topic, "--from-beginning"]).await
}

/// The run failed with `code`, saying so in one line that contains `needle`.
fn assert_one_line_failure(run: &Run, code: i32, needle: &str) {
    assert_eq!(run.code, Some(code), "{run:#?}");
    assert_eq!(run.stderr.lines().count(), 1, "one line: {run:#?}");
    assert!(run.stderr.starts_with("kafka-rpc: ") && run.stderr.contains(needle), "{run:#?}");
    assert!(!run.stderr.contains("panicked") && !run.stderr.contains("backtrace"), "{run:#?}");
    assert_eq!(run.stdout, "", "{run:#?}");
}

async fn serve(topic: &str) -> RpcServer {
    match RpcServer::builder(kafka::transport().await, topic).partitions(2).handler(add).start().await {
        Ok(server) => server,
        Err(e) => panic!("cannot start the server on {topic}: {e}"),
    }
}

/// The value of the first `  name: value` line of `text`.
fn header_line<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let prefix = format!("  {name}: ");
    text.lines().find_map(|l| l.strip_prefix(prefix.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_prints_the_reply_and_inspect_shows_request_and_reply_headers() {
    let topic = kafka::unique_topic("cli-call");
    let server = serve(&topic).await;
    let run = call(&topic, "cli.add", r#"{"a":2,"b":3}"#, &["--key", "k-1", "--timeout", "30s"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    let reply: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run:#?}"));
    assert_eq!(reply, serde_json::json!({"sum": 5}));

    let requests = inspect(&topic).await;
    assert_eq!(requests.code, Some(0), "{requests:#?}");
    let out = &requests.stdout;
    assert!(out.lines().next().is_some_and(|l| l.ends_with(" request kafka-rpc")), "{out}");
    assert_eq!(header_line(out, "key"), Some("k-1"), "{out}");
    assert_eq!(header_line(out, "kafka_rpc-type"), Some("cli.add"), "{out}");
    assert_eq!(header_line(out, "kafka_replyTopic"), Some(format!("{topic}.replies").as_str()), "{out}");
    assert!(header_line(out, "kafka_rpc-deadline").is_some_and(|d| d.contains("30.000 s after the record's timestamp")), "{out}");
    let id = header_line(out, "kafka_correlationId").unwrap_or_else(|| panic!("no correlation id: {out}"));
    assert!(id.ends_with("(16 bytes)"), "{out}");

    let replies = inspect(&format!("{topic}.replies")).await;
    assert_eq!(replies.code, Some(0), "{replies:#?}");
    let out = &replies.stdout;
    assert!(out.lines().next().is_some_and(|l| l.ends_with(" reply kafka-rpc")), "{out}");
    assert_eq!(header_line(out, "kafka_correlationId"), Some(id), "the reply echoes the request's id: {out}");
    assert_eq!(header_line(out, "kafka_rpc-content-type"), Some("application/json"), "{out}");
    assert_eq!(header_line(out, "value"), Some(r#"(9 bytes) {"sum":5}"#), "{out}");
    server.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_flag_writes_that_peers_headers() {
    // A kafka-rpc server answers each caller in its own conventions, so one server
    // shows what `--peer` changes on the wire.
    let topic = kafka::unique_topic("cli-peer");
    let server = serve(&topic).await;
    for (peer, reply_topic, id_len) in
        [("nestjs", format!("{topic}.reply"), "(36 bytes)"), ("spring", format!("{topic}.replies"), "(16 bytes)")]
    {
        let run = call(&topic, "cli.add", r#"{"a":1,"b":1}"#, &["--timeout", "30s", "--peer", peer]).await;
        assert_eq!(run.code, Some(0), "{peer}: {run:#?}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&run.stdout).ok(), Some(serde_json::json!({"sum": 2})), "{run:#?}");

        let replies = inspect(&reply_topic).await;
        assert_eq!(replies.code, Some(0), "{replies:#?}");
        let id = header_line(&replies.stdout, "kafka_correlationId").unwrap_or_else(|| panic!("{peer}: {replies:#?}"));
        assert!(id.ends_with(id_len), "{peer}: {id}");
    }
    server.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_error_prints_its_code_and_exits_1() {
    let topic = kafka::unique_topic("cli-error");
    let server = serve(&topic).await;
    let run = call(&topic, "cli.add", r#"{"a":-1,"b":3}"#, &["--timeout", "30s"]).await;
    assert_one_line_failure(&run, 1, "NEGATIVE: a must not be negative");
    let replies = inspect(&format!("{topic}.replies")).await;
    let out = &replies.stdout;
    assert!(out.lines().next().is_some_and(|l| l.ends_with(" error-reply kafka-rpc")), "{replies:#?}");
    assert_eq!(header_line(out, "kafka_rpc-error-code"), Some("NEGATIVE"), "{out}");
    assert_eq!(header_line(out, "kafka_rpc-error-message"), Some("a must not be negative"), "{out}");
    assert_eq!(header_line(out, "value"), Some("(null)"), "{out}");
    let unknown = call(&topic, "cli.nope", "{}", &["--timeout", "30s"]).await;
    assert_one_line_failure(&unknown, 1, "UNKNOWN_TYPE");
    server.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reply_in_time_exits_3() {
    let topic = kafka::unique_topic("cli-silent");
    // The topic exists, but nothing serves it.
    kafka::transport().await.ensure_topic(&topic, 1).await.unwrap_or_else(|e| panic!("{e}"));
    let run = call(&topic, "cli.add", "{}", &["--timeout", "1s"]).await;
    assert_one_line_failure(&run, 3, "no reply within 1s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_exits_4() {
    let nobody = format!("127.0.0.1:{}", kafka::free_port());
    let run =
        kafka_rpc(&["call", "--bootstrap", &nobody, "--connect-timeout", "1s", "--topic", "t", "--type", "x", "--json", "{}"])
            .await;
    assert_one_line_failure(&run, 4, "cannot reach the broker");
    let inspect = kafka_rpc(&["inspect", "--bootstrap", &nobody, "--connect-timeout", "1s", "--topic", "t"]).await;
    assert_one_line_failure(&inspect, 4, "cannot reach the broker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_accepts_but_never_answers_exits_4() {
    // A proxy with nothing behind it accepts connections and stays silent, as a broker
    // behind a black-holing firewall does: only --connect-timeout ends the wait.
    let silent = match kafka_rpc_testkit::KafkaProxy::bind() {
        Ok(proxy) => proxy,
        Err(e) => panic!("cannot start the proxy: {e}"),
    };
    let run = kafka_rpc(&[
        "call",
        "--bootstrap",
        silent.addr(),
        "--connect-timeout",
        "1s",
        "--topic",
        "t",
        "--type",
        "x",
        "--json",
        "{}",
    ])
    .await;
    assert_one_line_failure(&run, 4, "answered within 1s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_exits_2_before_touching_the_broker() {
    // An address nobody listens on: the JSON must be refused first.
    let nobody = format!("127.0.0.1:{}", kafka::free_port());
    let run = kafka_rpc(&["call", "--bootstrap", &nobody, "--topic", "t", "--type", "x", "--json", "{not json"]).await;
    assert_one_line_failure(&run, 2, "--json is not valid JSON");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_topic_exits_5_and_is_not_created() {
    let topic = kafka::unique_topic("cli-missing");
    let run = call(&topic, "x", "{}", &[]).await;
    assert_one_line_failure(&run, 5, &format!("unknown topic `{topic}`"));
    let inspected = inspect(&topic).await;
    assert_one_line_failure(&inspected, 5, &format!("unknown topic `{topic}`"));
    let transport = kafka::transport().await;
    assert!(transport.partition_count(&topic).await.is_err(), "the CLI must not create topics it is asked about");
    assert!(transport.partition_count(&format!("{topic}.replies")).await.is_err(), "nor a reply topic for them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_follow_prints_records_as_they_arrive() {
    let topic = kafka::unique_topic("cli-follow");
    let transport = kafka::transport().await;
    let produce = |value: &'static str| {
        let (transport, topic) = (transport.clone(), topic.clone());
        async move { transport.produce(&topic, 0, vec![Record::new(None::<Vec<u8>>, value)]).await.unwrap_or_else(|e| panic!("{e}")) }
    };
    transport.ensure_topic(&topic, 1).await.unwrap_or_else(|e| panic!("{e}"));
    produce("before").await;
    let bootstrap = kafka::bootstrap();
    let mut child =
        command(&["inspect", "--bootstrap", &bootstrap, "--topic", &topic, "--from-beginning", "--follow", "--max-records", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run kafka-rpc: {e}"));
    let Some(stdout) = child.stdout.take() else { panic!("no stdout") };
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    for needle in ["value: (6 bytes) before", "value: (5 bytes) after"] {
        loop {
            let line = tokio::time::timeout(RUN_LIMIT, lines.next_line()).await;
            match line {
                Ok(Ok(Some(line))) => {
                    seen.push(line.clone());
                    if line.trim() == needle {
                        break;
                    }
                }
                other => panic!("waiting for `{needle}`: {other:?} after {seen:#?}"),
            }
        }
        if needle.ends_with("before") {
            // Only now, with the old record printed and the tool still running, does
            // the new one exist: it can only be printed by following.
            produce("after").await;
        }
    }
    let status = tokio::time::timeout(RUN_LIMIT, child.wait()).await;
    assert!(matches!(status, Ok(Ok(s)) if s.success()), "stops after --max-records: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_on_the_embedded_broker_prints_percentiles() {
    let run = kafka_rpc(&["bench", "--embedded", "--requests", "2000", "--in-flight", "64"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.contains("2000 answered, 0 failed"), "{run:#?}");
    let latency = run.stdout.lines().find(|l| l.starts_with("latency: ")).unwrap_or_else(|| panic!("{run:#?}"));
    for p in ["p50", "p90", "p99", "p99.9", "max"] {
        assert!(latency.contains(&format!("{p} ")), "{latency}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_on_a_real_broker() {
    let bootstrap = kafka::bootstrap();
    let run =
        kafka_rpc(&["bench", "--bootstrap", &bootstrap, "--requests", "300", "--in-flight", "32", "--partitions", "2"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.stdout.contains("300 answered, 0 failed"), "{run:#?}");
    assert!(run.stdout.contains("latency: p50 "), "{run:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_needs_exactly_one_broker() {
    let run = kafka_rpc(&["bench"]).await;
    assert_eq!(run.code, Some(2), "{run:#?}");
    let both = kafka_rpc(&["bench", "--embedded", "--bootstrap", "127.0.0.1:1"]).await;
    assert_eq!(both.code, Some(2), "{both:#?}");
}

#[tokio::test]
async fn a_usage_error_is_one_line_and_exit_2() {
    let missing = kafka_rpc(&["call", "--topic", "t"]).await;
    assert_one_line_failure(&missing, 2, "--help");
    let unknown = kafka_rpc(&["frobnicate"]).await;
    assert_one_line_failure(&unknown, 2, "frobnicate");
    let help = kafka_rpc(&["--help"]).await;
    assert_eq!(help.code, Some(0), "{help:#?}");
    assert!(help.stdout.contains("call"), "{help:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_into_a_closed_pipe_stops_quietly() {
    // `kafka-rpc inspect ... | head -n 1`: the reader goes away while records remain.
    let topic = kafka::unique_topic("cli-pipe");
    let transport = kafka::transport().await;
    transport.ensure_topic(&topic, 1).await.unwrap_or_else(|e| panic!("{e}"));
    let records = (0..20).map(|i| Record::new(None::<Vec<u8>>, format!("record {i}"))).collect();
    transport.produce(&topic, 0, records).await.unwrap_or_else(|e| panic!("{e}"));
    let bootstrap = kafka::bootstrap();
    let mut child = command(&["inspect", "--bootstrap", &bootstrap, "--topic", &topic, "--from-beginning"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run kafka-rpc: {e}"));
    // Closed before the tool has connected, so its first record already goes nowhere.
    drop(child.stdout.take());
    let output = tokio::time::timeout(RUN_LIMIT, child.wait_with_output()).await;
    let output = match output {
        Ok(Ok(output)) => output,
        other => panic!("kafka-rpc inspect into a closed pipe: {other:?}"),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "", "nothing to report: the reader has seen enough");
}

/// `inspect --from-beginning` stops at the end of the log even when the log ends in
/// offsets that hold no record it can print: a transactional producer's commit marker
/// (every transaction of a Spring Kafka `KafkaTemplate` with a transaction id ends in
/// one), or batches no reader can decode. It used to wait for a record at or past the
/// end that would never come, and hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_from_the_beginning_ends_at_trailing_markers_and_unreadable_batches() {
    /// Far more than reading four records takes; far less than the run limit.
    const ENDS_WITHIN: Duration = Duration::from_secs(20);
    let bootstrap = kafka::bootstrap();
    let transport = kafka::transport().await;
    let append = |topic: &str, batch: Vec<u8>| {
        raw_batches::produce(&bootstrap, topic, 0, batch).unwrap_or_else(|code| panic!("the broker refused the batch: error {code}"))
    };
    let markers = kafka::unique_topic("cli-markers");
    let unreadable = kafka::unique_topic("cli-unreadable");
    for topic in [&markers, &unreadable] {
        transport.ensure_topic(topic, 1).await.unwrap_or_else(|e| panic!("{e}"));
        transport.produce(topic, 0, vec![Record::new(None::<Vec<u8>>, "first")]).await.unwrap_or_else(|e| panic!("{e}"));
    }
    append(&markers, raw_batches::commit_marker());
    append(&unreadable, raw_batches::bad_checksum(&["x", "y"]));
    append(&unreadable, raw_batches::unknown_magic(&["z"]));

    for topic in [&markers, &unreadable] {
        let run = command(&["inspect", "--bootstrap", &bootstrap, "--topic", topic, "--from-beginning"]).output();
        let output = match tokio::time::timeout(ENDS_WITHIN, run).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => panic!("cannot run kafka-rpc: {e}"),
            Err(_) => panic!("inspect --from-beginning of {topic} did not end within {ENDS_WITHIN:?}"),
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        assert!(stdout.contains("first"), "the one record is printed: {stdout}");
    }
}

/// Apache Kafka answers a fetch it finds out of range without the log's ends; the reader
/// then looks them up, and by then the offset may be inside them again (the log grew, a
/// new leader caught up). `inspect` took any out-of-range offset not before the log start
/// as past the end and jumped to the end, so the records between were never printed. It
/// now reads on from the same offset. A proxy in front of tansu answers the first fetch
/// as Kafka would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_reads_on_after_an_out_of_range_answer_inside_the_log() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (broker, topic) = three_records_behind_a_proxy("cli-out-of-range").await;
    let answered = AtomicBool::new(false);
    // Only the first answer that carries data, as a broker whose log was briefly
    // shorter (or whose leader moved) would give it.
    out_of_range_while(&broker, move || !answered.swap(true, Ordering::SeqCst));

    let run = kafka_rpc(&["inspect", "--bootstrap", broker.proxy.addr(), "--topic", &topic, "--from-beginning"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    for i in 0..3 {
        assert!(run.stdout.contains(&format!("record {i}")), "record {i} is printed: {run:#?}");
    }
}

/// While the broker keeps answering out of range at an offset inside the log (a new
/// leader still catching up), `inspect` reads that offset again after a pause that grows,
/// as every other retrying reader does. Before, it asked again at once, a fetch and an
/// end look-up every round trip for as long as the answers lasted. The proxy answers out
/// of range for a second after its first such answer, then lets the records through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_pauses_between_out_of_range_answers_inside_the_log() {
    use std::sync::{Arc, Mutex};
    const LASTING: Duration = Duration::from_secs(1);
    let (broker, topic) = three_records_behind_a_proxy("cli-out-of-range-pause").await;
    // When the first out-of-range answer was given, and how many were.
    let answers: Arc<Mutex<(Option<std::time::Instant>, u64)>> = Arc::default();
    let counted = answers.clone();
    out_of_range_while(&broker, move || {
        let mut answers = counted.lock().unwrap_or_else(|p| p.into_inner());
        let first = *answers.0.get_or_insert_with(std::time::Instant::now);
        let lasting = first.elapsed() < LASTING;
        answers.1 += u64::from(lasting);
        lasting
    });

    let run = kafka_rpc(&["inspect", "--bootstrap", broker.proxy.addr(), "--topic", &topic, "--from-beginning"]).await;
    assert_eq!(run.code, Some(0), "{run:#?}");
    for i in 0..3 {
        assert!(run.stdout.contains(&format!("record {i}")), "record {i} is printed: {run:#?}");
    }
    let out_of_range = answers.lock().unwrap_or_else(|p| p.into_inner()).1;
    // Pauses doubling from 10 ms fit 7 answers in a second; at once, hundreds.
    assert!(out_of_range <= 12, "{out_of_range} out-of-range answers in {LASTING:?}: read again without a pause");
}

/// A one-partition topic holding `record 0` to `record 2`, on a tansu behind a proxy.
async fn three_records_behind_a_proxy(name: &str) -> (kafka::ProxiedBroker, String) {
    let broker = kafka::ProxiedBroker::start();
    let transport = kafka::connect(broker.config()).await;
    let topic = kafka::unique_topic(name);
    transport.ensure_topic(&topic, 1).await.unwrap_or_else(|e| panic!("{e}"));
    let records = (0..3).map(|i| Record::new(None::<Vec<u8>>, format!("record {i}"))).collect();
    transport.produce(&topic, 0, records).await.unwrap_or_else(|e| panic!("{e}"));
    (broker, topic)
}

/// Has the proxy answer a fetch that carries records OFFSET_OUT_OF_RANGE, with none of
/// the log's ends (as Kafka answers an offset its leader does not hold), whenever `now`
/// says so.
fn out_of_range_while(broker: &kafka::ProxiedBroker, now: impl Fn() -> bool + Send + Sync + 'static) {
    use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse};
    const OFFSET_OUT_OF_RANGE: i16 = 1;
    broker.proxy.rewrite_responses(kafka_rpc_testkit::kafka_proxy::api::FETCH, move |request, response| {
        rewrite::rewrite(ApiKey::Fetch, request, response, |_: &FetchRequest, resp: &mut FetchResponse| {
            let with_records = resp.responses.iter_mut().flat_map(|t| t.partitions.iter_mut()).find(|p| p.records.as_ref().is_some_and(|r| !r.is_empty()));
            if let Some(p) = with_records.filter(|_| now()) {
                p.error_code = OFFSET_OUT_OF_RANGE;
                p.high_watermark = -1;
                p.last_stable_offset = -1;
                p.log_start_offset = -1;
                p.records = Some(bytes::Bytes::new());
            }
        })
    });
}
