//! W3C Trace Context across a call (feature `otel`): spans are exported to an
//! in-memory OpenTelemetry exporter, and the server's `rpc.handle` span must be the
//! child of the client's `rpc.request` span, itself the child of the caller's span,
//! all in one trace. A request carrying a foreign `traceparent`, as a Spring or
//! NestJS caller sends it, is honoured the same way.
//!
//! The tracing subscriber is process-wide, so every test finds its own spans by
//! trace id.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use kafka_rpc::prelude::*;
use kafka_rpc::transport::{Header, Record};
use kafka_rpc::wire::names;
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// Bound on waiting for spans to be exported.
const WAIT: Duration = Duration::from_secs(20);

#[derive(Serialize, Deserialize)]
struct Echo(u32);
impl Request for Echo {
    const TYPE: &'static str = "otel.echo";
    type Response = u32;
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

/// Opens a span of its own, which must land under `rpc.handle`.
async fn echo(Echo(n): Echo) -> Result<u32, RemoteError> {
    tokio::task::yield_now().await;
    let _work = tracing::info_span!("echo.work").entered();
    Ok(n)
}

/// The exporter every span of this process ends up in.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("kafka-rpc-tests"));
        // No level filter: kafka-rpc's spans are DEBUG, and the layer must see them.
        if tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).is_err() {
            panic!("another global tracing subscriber is installed");
        }
        exporter
    })
}

/// Waits until the spans of `trace` include one of each name, and returns them.
async fn spans_of(trace: TraceId, names: &[&str]) -> Vec<SpanData> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let spans: Vec<SpanData> = match exporter().get_finished_spans() {
            Ok(all) => all.into_iter().filter(|s| s.span_context.trace_id() == trace).collect(),
            Err(e) => panic!("reading the in-memory exporter: {e}"),
        };
        if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
            return spans;
        }
        let seen: Vec<_> = spans.iter().map(|s| s.name.to_string()).collect();
        assert!(tokio::time::Instant::now() < deadline, "spans {names:?} of trace {trace} within {WAIT:?}; saw {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    match spans.iter().find(|s| s.name == name) {
        Some(span) => span,
        None => panic!("no {name} span"),
    }
}

#[tokio::test]
async fn the_handler_span_is_a_child_of_the_client_span_in_the_callers_trace() {
    exporter();
    let broker = EmbeddedBroker::new();
    let topic = format!("otel-{}", uuid::Uuid::new_v4().simple());
    let server = RpcServer::builder(broker.clone(), topic.as_str()).handler(echo).start().await.expect("server");
    let client = ReplyingClient::builder(broker, topic.as_str()).start().await.expect("client");

    let caller = tracing::info_span!("caller");
    let trace = caller.context().span().span_context().trace_id();
    assert_ne!(trace, TraceId::INVALID, "the OpenTelemetry layer records the caller's span");
    // Called inside the caller's span: the request span is created at the call.
    let reply = async { client.request(Echo(7)).await }.instrument(caller.clone()).await.expect("echo");
    assert_eq!(reply, 7);
    drop(caller);

    let spans = spans_of(trace, &["caller", "rpc.request", "rpc.handle", "echo.work"]).await;
    let (caller, request, handle) = (named(&spans, "caller"), named(&spans, "rpc.request"), named(&spans, "rpc.handle"));
    assert_eq!(request.parent_span_id, caller.span_context.span_id(), "rpc.request is the caller's child");
    assert_eq!(handle.parent_span_id, request.span_context.span_id(), "rpc.handle is rpc.request's child");
    let work = named(&spans, "echo.work");
    assert_eq!(work.parent_span_id, handle.span_context.span_id(), "the handler runs inside rpc.handle, also after a yield");
    assert_eq!(handle.span_context.trace_id(), trace, "one trace across the broker");
    client.shutdown().await;
    server.shutdown().await.expect("shutdown");
}

/// A Spring Kafka caller (Micrometer Tracing) or a NestJS one (OpenTelemetry's kafkajs
/// instrumentation) sends the W3C headers as UTF-8 text beside its own request headers.
#[tokio::test]
async fn a_foreign_traceparent_parents_the_handler_span() {
    exporter();
    let broker = EmbeddedBroker::new();
    let topic = format!("otel-spring-{}", uuid::Uuid::new_v4().simple());
    let server = RpcServer::builder(broker.clone(), topic.as_str()).topic_handler(topic.as_str(), echo).start().await.expect("server");

    // The example of the W3C Trace Context specification.
    let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id");
    let parent = SpanId::from_hex("00f067aa0ba902b7").expect("span id");
    let header = |key: &'static str, value: &[u8]| Header { key: key.into(), value: Bytes::copy_from_slice(value) };
    let reply_topic = format!("{topic}.replies");
    let request = Record {
        key: None,
        value: Some(Bytes::from_static(b"7")),
        headers: vec![
            header(names::CORRELATION_ID, uuid::Uuid::new_v4().as_bytes()),
            header(names::REPLY_TOPIC, reply_topic.as_bytes()),
            header(names::REPLY_PARTITION, &0i32.to_be_bytes()),
            header(names::SPRING_TYPE_ID, b"com.example.Echo"),
            header("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            header("tracestate", b"congo=t61rcWkgMzE"),
        ],
        timestamp_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0),
    };
    broker.ensure_topic(&reply_topic, 1).await.expect("reply topic");
    broker.produce(&topic, 0, vec![request]).await.expect("produce the foreign request");

    let spans = spans_of(trace, &["rpc.handle"]).await;
    let handle = named(&spans, "rpc.handle");
    assert_eq!(handle.parent_span_id, parent, "the caller's span is the parent");
    assert!(handle.parent_span_is_remote, "the parent came over the wire");
    assert_eq!(handle.span_context.trace_state().header(), "congo=t61rcWkgMzE", "tracestate rides along");
    // The handler ran (and was answered) inside that span: the reply exists.
    let reader_deadline = tokio::time::Instant::now() + WAIT;
    let mut reader = broker.reader(&reply_topic, 0).await.expect("reader");
    loop {
        let replies = reader.fetch(0, Duration::from_millis(100)).await.expect("fetch replies");
        if let Some(reply) = replies.first() {
            assert_eq!(reply.record.value.as_deref(), Some(&b"7"[..]), "the Spring caller's echo");
            break;
        }
        assert!(tokio::time::Instant::now() < reader_deadline, "no reply within {WAIT:?}");
    }
    server.shutdown().await.expect("shutdown");
}

#[derive(Serialize, Deserialize)]
struct Malformed(u32);
impl Request for Malformed {
    const TYPE: &'static str = "otel.malformed";
    type Response = u32;
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

/// A malformed `traceparent` (version `ff` is forbidden by the specification) is
/// ignored: the request is served, and its span starts a trace of its own.
#[tokio::test]
async fn a_malformed_traceparent_is_ignored() {
    exporter();
    let broker = EmbeddedBroker::new();
    let topic = format!("otel-bad-{}", uuid::Uuid::new_v4().simple());
    let server = RpcServer::builder(broker.clone(), topic.as_str())
        .handler(|Malformed(n): Malformed| async move { Ok::<_, RemoteError>(n) })
        .start()
        .await
        .expect("server");
    let client = ReplyingClient::builder(broker, topic.as_str()).start().await.expect("client");
    // Set by hand, it also stops the client from writing its own.
    let bad = "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let options = RequestOptions::new().header("traceparent", Bytes::from_static(bad.as_bytes()));
    assert_eq!(client.request_with(Malformed(3), options).await.expect("served despite the bad header"), 3);

    let deadline = tokio::time::Instant::now() + WAIT;
    let handle = loop {
        let spans = exporter().get_finished_spans().expect("spans");
        let ours = spans.into_iter().find(|s| {
            s.name == "rpc.handle"
                && s.attributes.iter().any(|kv| kv.key.as_str() == "request_type" && kv.value.as_str() == Malformed::TYPE)
        });
        if let Some(span) = ours {
            break span;
        }
        assert!(tokio::time::Instant::now() < deadline, "no rpc.handle span for {} within {WAIT:?}", Malformed::TYPE);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(handle.parent_span_id, SpanId::INVALID, "a version-ff traceparent parents nothing");
    assert_ne!(handle.span_context.trace_id(), TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("id"));
    client.shutdown().await;
    server.shutdown().await.expect("shutdown");
}
