//! Spring Kafka interop, byte for byte, from fixtures: Spring cannot be installed here
//! (no Maven repository), so these records are built the way spring-kafka's source
//! writes and reads them:
//!
//! - `ReplyingKafkaTemplate.sendAndReceive` adds `kafka_replyTopic` (UTF-8),
//!   `kafka_replyPartition` (`ByteBuffer.putInt`: 4 bytes big-endian, when the reply
//!   container is assigned one partition) and `kafka_correlationId` (16 bytes: the
//!   UUID's most then least significant long);
//! - `JsonSerializer` then adds `__TypeId__` (the class name) and writes JSON;
//! - a `@KafkaListener` + `@SendTo` reply echoes `kafka_correlationId` and goes to the
//!   request's reply topic and partition, with the reply's `__TypeId__`;
//! - `DefaultKafkaHeaderMapper` writes a `String` message header as raw UTF-8 and names
//!   it in `spring_json_header_types`, or JSON-quoted when `encodeStrings` is on; this
//!   is how a `KafkaListenerErrorHandler`'s error headers reach the wire.
//!
//! The server side runs through a real `RpcServer` on the embedded broker; the records
//! it writes are compared header by header.

use std::time::Duration;

use bytes::Bytes;
use kafka_rpc::prelude::*;
use kafka_rpc::transport::{Header, Record};
use kafka_rpc::__private::wire;
use kafka_rpc::wire::{names, Peer};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Sum {
    a: i64,
    b: i64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct SumReply {
    sum: i64,
}

impl Request for Sum {
    const TYPE: &'static str = "spring.sums";
    type Response = SumReply;
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

/// The correlation id of the fixtures: `UUID.fromString("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")`
/// as `defaultCorrelationIdStrategy` writes it.
const SPRING_ID: [u8; 16] = [0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69, 0x78, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2, 0xe1, 0xf0];

fn h(key: &str, value: &[u8]) -> Header {
    Header { key: key.to_owned().into(), value: Bytes::copy_from_slice(value) }
}

fn headers(record: &Record) -> Vec<(String, Vec<u8>)> {
    record.headers.iter().map(|h| (h.key.to_string(), h.value.to_vec())).collect()
}

/// What `ReplyingKafkaTemplate` + `JsonSerializer` put on the wire for
/// `sendAndReceive(new ProducerRecord<>("spring.sums", "k1", new Sum(2, 3)))` with a
/// reply container assigned `spring.sums.replies` partition 3.
fn spring_request(value: &[u8]) -> Record {
    Record {
        key: Some(Bytes::from_static(b"k1")),
        value: Some(Bytes::copy_from_slice(value)),
        headers: vec![
            h("kafka_replyTopic", b"spring.sums.replies"),
            h("kafka_replyPartition", &[0, 0, 0, 3]),
            h("kafka_correlationId", &SPRING_ID),
            h("__TypeId__", b"com.example.Sum"),
        ],
        timestamp_ms: 0,
    }
}

#[test]
fn spring_request_is_decoded() {
    let record = spring_request(br#"{"a":2,"b":3}"#);
    let meta = wire::decode_request(&record).expect("a Spring request decodes");
    assert_eq!(meta.peer, Peer::Spring);
    assert_eq!(meta.content_type, ContentType::Json, "JsonSerializer's payload, no content-type header");
    assert_eq!(meta.request_type, None, "Spring dispatches by topic");
    assert_eq!(meta.correlation_id.as_deref(), Some(&SPRING_ID[..]));
    let reply_to = meta.reply_to.expect("reply address");
    assert_eq!((&*reply_to.topic, reply_to.partition), ("spring.sums.replies", Some(3)));
    assert_eq!(meta.deadline_ms, None);
}

async fn sums(Sum { a, b }: Sum) -> Result<SumReply, RemoteError> {
    if a < 0 {
        return Err(RemoteError::new("NEGATIVE", format!("{a} is negative")));
    }
    Ok(SumReply { sum: a + b })
}

/// The records on `topic`/`partition` from `offset` on, waiting up to 10 s for `count`.
async fn read(broker: &EmbeddedBroker, topic: &str, partition: i32, count: usize) -> Vec<Record> {
    let mut reader = broker.reader(topic, partition).await.expect("reader");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < count {
        assert!(tokio::time::Instant::now() < deadline, "only {} of {count} records on {topic}/{partition}", out.len());
        let fetched = reader.fetch(out.len() as i64, Duration::from_millis(100)).await.expect("fetch");
        out.extend(fetched.into_iter().map(|c| (*c.record).clone()));
    }
    out
}

#[tokio::test]
async fn spring_caller_gets_a_reply_it_can_read() {
    let broker = EmbeddedBroker::new();
    broker.ensure_topic("spring.sums.replies", 4).await.unwrap();
    // The handler's type name is the topic, so Spring's untyped requests reach it.
    let server = RpcServer::builder(broker.clone(), "spring.sums").partitions(1).handler(sums).start().await.unwrap();
    broker.produce("spring.sums", 0, vec![spring_request(br#"{"a":2,"b":3}"#), spring_request(br#"{"a":-1,"b":3}"#)]).await.unwrap();

    let replies = read(&broker, "spring.sums.replies", 3, 2).await;
    let ok = &replies[0];
    assert_eq!(ok.key.as_deref(), Some(&b"k1"[..]), "the request's key");
    assert_eq!(ok.value.as_deref(), Some(&br#"{"sum":5}"#[..]), "JSON, as the request");
    assert_eq!(
        headers(ok),
        [("kafka_correlationId".to_owned(), SPRING_ID.to_vec()), ("kafka_rpc-content-type".to_owned(), b"application/json".to_vec())],
        "the 16-byte id echoed: ReplyingKafkaTemplate matches it as a CorrelationKey"
    );
    let failed = &replies[1];
    assert_eq!(failed.value, None);
    assert_eq!(
        headers(failed),
        [
            ("kafka_correlationId".to_owned(), SPRING_ID.to_vec()),
            ("kafka_rpc-content-type".to_owned(), b"application/json".to_vec()),
            ("kafka_rpc-error-code".to_owned(), b"NEGATIVE".to_vec()),
            ("kafka_rpc-error-message".to_owned(), b"-1 is negative".to_vec()),
        ],
        "no NestJS headers for a Spring caller; a replyErrorChecker reads kafka_rpc-error-*"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn spring_listener_is_called_and_its_replies_read() {
    let broker = EmbeddedBroker::new();
    broker.ensure_topic("spring.sums", 1).await.unwrap();
    broker.ensure_topic("spring.sums.replies", 1).await.unwrap();
    let client = ReplyingClient::builder(broker.clone(), "spring.sums")
        .peer(Peer::Spring)
        .partitions(1)
        .timeout(Duration::from_secs(10))
        .start()
        .await
        .unwrap();
    let ok = tokio::spawn(client.request(Sum { a: 2, b: 3 }));
    let failed = tokio::spawn(client.request(Sum { a: 1, b: 1 }));
    let quoted = tokio::spawn(client.request(Sum { a: 0, b: 0 }));

    // Play the @KafkaListener: read what a Spring listener would receive.
    let requests = read(&broker, "spring.sums", 0, 3).await;
    let mut replies = Vec::new();
    for request in &requests {
        let get = |name: &str| request.header(name).map(|v| v.to_vec());
        assert_eq!(get(names::REPLY_TOPIC).as_deref(), Some(&b"spring.sums.replies"[..]));
        assert_eq!(get(names::REPLY_PARTITION), Some(vec![0, 0, 0, 0]), "ByteBuffer.getInt reads 4 bytes big-endian");
        let id = get(names::CORRELATION_ID).expect("correlation id");
        assert_eq!(id.len(), 16, "a CorrelationKey of 16 bytes");
        assert_eq!(get(names::SPRING_TYPE_ID), None, "no __TypeId__: JsonDeserializer would look that class up");
        let sum: serde_json::Value = serde_json::from_slice(request.value.as_deref().unwrap()).expect("JSON payload");
        let (a, b) = (sum["a"].as_i64().unwrap(), sum["b"].as_i64().unwrap());
        // Play @SendTo, or a KafkaListenerErrorHandler that returns error headers.
        let reply = match (a, b) {
            (2, 3) => Record {
                key: None,
                value: Some(Bytes::from_static(br#"{"sum":5}"#)),
                headers: vec![h("kafka_correlationId", &id), h("__TypeId__", b"com.example.SumReply")],
                timestamp_ms: 0,
            },
            (1, 1) => Record {
                key: None,
                value: None,
                headers: vec![
                    h("kafka_correlationId", &id),
                    h("kafka_rpc-error-code", b"OUT_OF_RANGE"),
                    h("kafka_rpc-error-message", b"1 + 1 is too small"),
                    h("spring_json_header_types", br#"{"kafka_rpc-error-code":"java.lang.String","kafka_rpc-error-message":"java.lang.String"}"#),
                ],
                timestamp_ms: 0,
            },
            _ => Record {
                key: None,
                value: None,
                headers: vec![
                    h("kafka_correlationId", &id),
                    h("kafka_rpc-error-code", br#""ZERO""#),
                    h("kafka_rpc-error-message", br#""zero \"sums\"""#),
                    h("spring_json_header_types", br#"{"kafka_rpc-error-code":"java.lang.String","kafka_rpc-error-message":"java.lang.String"}"#),
                ],
                timestamp_ms: 0,
            },
        };
        replies.push(reply);
    }
    broker.produce("spring.sums.replies", 0, replies).await.unwrap();

    assert_eq!(ok.await.unwrap().expect("the Spring reply is read"), SumReply { sum: 5 });
    match failed.await.unwrap() {
        Err(RpcError::Remote(e)) => {
            assert_eq!((e.code.as_str(), e.message.as_str()), ("OUT_OF_RANGE", "1 + 1 is too small"))
        }
        other => panic!("expected the listener's error, got {other:?}"),
    }
    match quoted.await.unwrap() {
        Err(RpcError::Remote(e)) => {
            assert_eq!((e.code.as_str(), e.message.as_str()), ("ZERO", r#"zero "sums""#), "encodeStrings=true quoting")
        }
        other => panic!("expected the listener's error, got {other:?}"),
    }
    client.shutdown().await;
}

/// A record Spring re-sends (built from one it received) keeps the old
/// `kafka_correlationId`: `sendAndReceive` adds its own after it and waits for the
/// reply that carries the last one (`lastHeader`). The reply must echo that one, and
/// only it, or Spring would not match it.
#[tokio::test]
async fn a_resent_spring_request_is_answered_to_its_last_correlation_id() {
    let broker = EmbeddedBroker::new();
    broker.ensure_topic("spring.sums.replies", 4).await.unwrap();
    let server = RpcServer::builder(broker.clone(), "spring.sums").partitions(1).handler(sums).start().await.unwrap();
    let mut resent = spring_request(br#"{"a":2,"b":3}"#);
    resent.headers.insert(0, h("kafka_correlationId", &[9; 16]));
    broker.produce("spring.sums", 0, vec![resent]).await.unwrap();

    let replies = read(&broker, "spring.sums.replies", 3, 1).await;
    let ids: Vec<_> = replies[0].headers.iter().filter(|h| h.key == "kafka_correlationId").map(|h| h.value.to_vec()).collect();
    assert_eq!(ids, [SPRING_ID.to_vec()]);
    server.shutdown().await.unwrap();
}
