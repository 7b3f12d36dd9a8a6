//! Request-reply and events with a real NestJS service (`@nestjs/microservices` 12.1.1,
//! `kafkajs` 2.2.4, pinned in `tests/peers/nestjs/package-lock.json`) on the test
//! broker, in both directions. Needs Node.js and npm; fails, saying so, without them.

mod support;
#[path = "support/nestjs.rs"]
mod nestjs;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kafka_rpc::prelude::*;
use kafka_rpc::transport::Record;
use kafka_rpc::wire::Peer;
use nestjs::{Mode, NestPeer};
use serde::{Deserialize, Serialize};
use support::{eventually, unique, Env};

/// What the NestJS `sum` handler and our `sum` handler take.
#[derive(Debug, Serialize, Deserialize)]
struct Sum {
    a: i64,
    b: i64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct SumReply {
    sum: i64,
}

/// The topic our server's `Sum` handler serves. NestJS names a handler by its topic,
/// so a handler whose type name is the topic serves NestJS callers unconfigured.
const RUST_SUM: &str = "interop.rust.sum";

impl Request for Sum {
    const TYPE: &'static str = RUST_SUM;
    type Response = SumReply;
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

/// Fails on both sides: NestJS throws an `RpcException`, ours returns an error.
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    sku: String,
}

impl Request for Order {
    const TYPE: &'static str = "interop.order";
    type Response = SumReply;
    fn key(&self) -> Option<Vec<u8>> {
        Some(self.sku.clone().into_bytes())
    }
}

/// A bare string each way: NestJS writes strings unquoted, and reads back as JSON only
/// values that start like an object or an array.
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct Greeting(String);

impl Request for Greeting {
    const TYPE: &'static str = "interop.greeting";
    type Response = String;
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

async fn greet(Greeting(name): Greeting) -> Result<String, RemoteError> {
    Ok(format!("hello, {name}"))
}

/// An event: no reply expected.
#[derive(Debug, Serialize, Deserialize)]
struct Emitted {
    e: i64,
}

impl Request for Emitted {
    const TYPE: &'static str = "interop.emitted";
    type Response = ();
    fn key(&self) -> Option<Vec<u8>> {
        None
    }
}

const ANSWER: Duration = Duration::from_secs(60);

async fn topics(env: &Env, names: &[String]) {
    for name in names {
        env.transport.ensure_topic(name, 8).await.expect("topic created");
    }
}

/// The NestJS server's topics for `prefix`, with their reply topics.
fn nest_topics(prefix: &str) -> Vec<String> {
    let sum = format!("{prefix}.nest.sum");
    let fail = format!("{prefix}.nest.fail");
    vec![format!("{sum}.reply"), format!("{fail}.reply"), sum, fail, format!("{prefix}.nest.events")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_calls_nest_server() {
    let env = Env::kafka().await;
    let prefix = unique("r2n");
    topics(&env, &nest_topics(&prefix)).await;
    let nest = NestPeer::start(Mode::Server, &support::kafka::bootstrap(), &prefix, &[]).await;

    let sum = env
        .client(&format!("{prefix}.nest.sum"))
        .peer(Peer::Nest)
        .partitions(8)
        .timeout(ANSWER)
        .start()
        .await
        .expect("client starts");
    assert_eq!(sum.reply_address().0, format!("{prefix}.nest.sum.reply"), "NestJS's reply topic naming");
    assert_eq!(sum.request(Sum { a: 2, b: 3 }).await.expect("NestJS answers"), SumReply { sum: 5 });

    // RpcException("insufficient stock for ...") → a typed error with the peer's message.
    let fail = env.client(&format!("{prefix}.nest.fail")).peer(Peer::Nest).partitions(8).timeout(ANSWER).start().await.unwrap();
    match fail.request(Order { sku: "sku-9".into() }).await {
        Err(RpcError::Remote(e)) => {
            assert_eq!(e.message, "insufficient stock for sku-9");
            assert_eq!(e.code, ErrorCode::Custom(kafka_rpc::wire::NEST_ERROR_CODE.into()));
        }
        other => panic!("expected the NestJS error, got {other:?}"),
    }

    let calls: Vec<_> = (0..1000).map(|i| sum.request(Sum { a: i, b: 1 })).collect();
    let replies = futures::future::join_all(calls).await;
    for (i, reply) in replies.into_iter().enumerate() {
        assert_eq!(reply.expect("every call is answered"), SumReply { sum: i as i64 + 1 });
    }
    assert_eq!(sum.in_flight(), 0);
    sum.shutdown().await;
    fail.shutdown().await;
    nest.stop().await;
}

async fn order(Order { sku }: Order) -> Result<SumReply, RemoteError> {
    Err(RemoteError::new("OUT_OF_STOCK", format!("no stock for {sku}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nest_client_calls_rust_server() {
    let env = Env::kafka().await;
    let prefix = unique("n2r");
    let fail_topic = format!("{prefix}.rust.fail");
    let greet_topic = format!("{prefix}.rust.greet");
    topics(
        &env,
        &[
            RUST_SUM.into(),
            format!("{RUST_SUM}.reply"),
            fail_topic.clone(),
            format!("{fail_topic}.reply"),
            greet_topic.clone(),
            format!("{greet_topic}.reply"),
        ],
    )
    .await;
    let sum_server = env
        .server(RUST_SUM)
        .group(format!("{prefix}-sum"))
        .handler(|Sum { a, b }: Sum| async move { Ok::<_, RemoteError>(SumReply { sum: a + b }) })
        .start()
        .await
        .expect("server starts");
    // A topic whose name is no type name: mapped to its handler explicitly.
    let fail_server = env.server(&fail_topic).topic_handler(&fail_topic, order).start().await.expect("server starts");
    let greet_server = env.server(&greet_topic).topic_handler(&greet_topic, greet).start().await.expect("server starts");

    let mut nest =
        NestPeer::start(Mode::Client, &support::kafka::bootstrap(), &prefix, &[RUST_SUM, &fail_topic, &greet_topic]).await;
    // `call` awaits `lastValueFrom(send(...))`: a REPLY line means the observable
    // completed, which NestJS does only on `kafka_nest-is-disposed`.
    nest.command(&format!(r#"call {RUST_SUM} {{"a":2,"b":40}}"#)).await;
    assert_eq!(nest.expect("", ANSWER).await, r#"REPLY {"sum":42}"#);

    // A string sent unquoted is read as a string, and the string answered reaches
    // NestJS without quotes (printed here through `JSON.stringify`).
    nest.command(&format!(r#"call {greet_topic} "Seoul""#)).await;
    assert_eq!(nest.expect("", ANSWER).await, r#"REPLY "hello, Seoul""#);

    nest.command(&format!(r#"call {fail_topic} {{"sku":"sku-7"}}"#)).await;
    let error = nest.expect("ERROR", ANSWER).await;
    let error: serde_json::Value = serde_json::from_str(&error).expect("NestJS sees an error object");
    assert_eq!(error["message"], "no stock for sku-7", "{error}");
    assert_eq!(error["code"], "OUT_OF_STOCK", "{error}");
    assert_eq!(error["status"], "error", "the shape of a NestJS RpcException: {error}");

    nest.command(&format!("load {RUST_SUM} 1000 1000")).await;
    let load: serde_json::Value = serde_json::from_str(&nest.expect("LOAD", ANSWER * 2).await).unwrap();
    assert_eq!((load["answered"].as_u64(), load["failed"].as_u64()), (Some(1000), Some(0)), "{load}");

    nest.stop().await;
    sum_server.shutdown().await.unwrap();
    fail_server.shutdown().await.unwrap();
    greet_server.shutdown().await.unwrap();
}

async fn record_event(Emitted { e }: Emitted, _ctx: Context, State(seen): State<Arc<AtomicI64>>) -> Result<(), RemoteError> {
    seen.store(e, Ordering::SeqCst);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_both_ways() {
    let env = Env::kafka().await;
    let prefix = unique("events");
    let ours = format!("{prefix}.rust.events");
    let mut names = nest_topics(&prefix);
    names.push(ours.clone());
    topics(&env, &names).await;

    // NestJS emit → our event handler.
    let seen = Arc::new(AtomicI64::new(0));
    let server = env
        .server(&ours)
        .state(seen.clone())
        .topic_handler(&ours, record_event)
        .start()
        .await
        .unwrap();
    let mut client = NestPeer::start(Mode::Client, &support::kafka::bootstrap(), &prefix, &[]).await;
    client.command(&format!(r#"emit {ours} {{"e":17}}"#)).await;
    assert_eq!(client.next_line(ANSWER).await, "EMITTED");
    eventually("our handler saw the NestJS event", ANSWER, || async { seen.load(Ordering::SeqCst) == 17 }).await;
    assert_eq!(server.stats().events(), 1);

    // A record of ours without reply headers → the NestJS @EventPattern handler.
    let mut nest = NestPeer::start(Mode::Server, &support::kafka::bootstrap(), &prefix, &[]).await;
    let event = Record::new(None::<Vec<u8>>, ContentType::Json.encode(&Emitted { e: 23 }).unwrap());
    env.transport.produce(&format!("{prefix}.nest.events"), 0, vec![event]).await.unwrap();
    assert_eq!(nest.expect("EVENT", ANSWER).await, r#"{"e":23}"#);

    client.stop().await;
    nest.stop().await;
    server.shutdown().await.unwrap();
}
