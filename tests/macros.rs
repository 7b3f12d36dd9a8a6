//! Tests for `#[derive(Request)]` and `#[handler]`: compile-time diagnostics (trybuild)
//! and the behaviour of the generated code.

use std::time::Duration;

use kafka_rpc::prelude::*;
use kafka_rpc::__private::StateRequirement;
use kafka_rpc::transport::Record;
use serde::{Deserialize, Serialize};

/// Every expected `.stderr` was read by a person: the messages are part of the API.
/// Regenerate with `TRYBUILD=overwrite cargo test --test macros` after a deliberate change.
#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass_*.rs");
    t.compile_fail("tests/ui/fail_*.rs");
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct RadiusReduced {
    radius_m: u32,
}

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.reduce", response = RadiusReduced, key = store_id)]
struct ReduceRadius {
    store_id: u64,
    radius_m: u32,
    by_m: u32,
}

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.get", response = u32, key = store)]
struct GetRadius {
    store: String,
}

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.zone.get", response = u32, key = zone)]
struct GetZone {
    zone: Option<String>,
}

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.stats", response = u64)]
struct Stats;

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.ping", response = i32, key = 0)]
struct Ping(i32);

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.event", response = ())]
enum StoreEvent {
    Opened { store_id: u64 },
    Closed,
}

#[derive(Debug)]
enum RadiusError {
    TooSmall(u32),
}

impl From<RadiusError> for RemoteError {
    fn from(e: RadiusError) -> Self {
        match e {
            RadiusError::TooSmall(m) => RemoteError::new("RADIUS_TOO_SMALL", format!("{m} m is below the minimum")),
        }
    }
}

/// Shrinks a delivery radius, refusing to go under 500 m.
#[handler(timeout_ms = 250)]
async fn reduce_radius(req: ReduceRadius) -> Result<RadiusReduced, RadiusError> {
    let radius_m = req.radius_m.saturating_sub(req.by_m);
    if radius_m < 500 {
        return Err(RadiusError::TooSmall(radius_m));
    }
    Ok(RadiusReduced { radius_m })
}

#[handler(type = "delivery.radius.get.v1")]
async fn get_radius(req: GetRadius, ctx: Context) -> Result<u32, RemoteError> {
    Ok(req.store.len() as u32 + ctx.partition() as u32)
}

#[derive(Clone)]
struct Defaults {
    radius_m: u32,
}

#[handler]
async fn get_zone(_req: GetZone, _ctx: Context, State(defaults): State<Defaults>) -> Result<u32, RemoteError> {
    Ok(defaults.radius_m)
}

fn ctx() -> Context {
    Context::for_test(Record::default())
}

#[test]
fn derive_sets_type_and_key() {
    assert_eq!(ReduceRadius::TYPE, "delivery.radius.reduce");
    let req = ReduceRadius { store_id: 258, radius_m: 0, by_m: 0 };
    assert_eq!(req.key(), Some(258u64.to_be_bytes().to_vec()));
    assert_eq!(GetRadius { store: "store-1".into() }.key(), Some(b"store-1".to_vec()));
    assert_eq!(Stats.key(), None);
    assert_eq!(Ping(258).key(), Some(vec![0, 0, 1, 2]));
    assert_eq!(StoreEvent::Closed.key(), None);
    assert_eq!(StoreEvent::Opened { store_id: 1 }.key(), None);
}

#[test]
fn derive_optional_key_is_none_when_absent() {
    assert_eq!(GetZone { zone: Some("north".into()) }.key(), Some(b"north".to_vec()));
    assert_eq!(GetZone { zone: None }.key(), None);
}

#[tokio::test]
async fn handler_calls_the_function_and_converts_errors() {
    let ok = reduce_radius.call(ReduceRadius { store_id: 1, radius_m: 3000, by_m: 1000 }, ctx()).await;
    assert_eq!(ok, Ok(RadiusReduced { radius_m: 2000 }));

    let err = reduce_radius
        .call(ReduceRadius { store_id: 1, radius_m: 1000, by_m: 900 }, ctx())
        .await
        .expect_err("radius below the minimum");
    assert_eq!(err.code, ErrorCode::Custom("RADIUS_TOO_SMALL".into()));
    assert_eq!(err.message, "100 m is below the minimum");
}

/// The attribute leaves the function callable as written: same arguments, same return
/// type (here its own error type, not yet converted to `RemoteError`).
#[tokio::test]
async fn handler_stays_callable_as_a_plain_async_fn() {
    let ok: Result<RadiusReduced, RadiusError> = reduce_radius(ReduceRadius { store_id: 1, radius_m: 3000, by_m: 1000 }).await;
    assert_eq!(ok.expect("within the minimum"), RadiusReduced { radius_m: 2000 });
    let Err(RadiusError::TooSmall(100)) = reduce_radius(ReduceRadius { store_id: 1, radius_m: 1000, by_m: 900 }).await else {
        panic!("expected the function's own error");
    };

    assert_eq!(get_radius(GetRadius { store: "abcd".into() }, ctx()).await, Ok(4));
    let state = State(Defaults { radius_m: 700 });
    assert_eq!(get_zone(GetZone { zone: None }, ctx(), state).await, Ok(700));

    // The boxed future is `Send`, so it can be spawned like any handler future.
    let spawned = tokio::spawn(get_radius(GetRadius { store: "ab".into() }, ctx()));
    assert_eq!(spawned.await.expect("task"), Ok(2));
}

#[test]
fn handler_options() {
    assert_eq!(reduce_radius.request_type(), "delivery.radius.reduce");
    assert_eq!(reduce_radius.timeout(), Some(Duration::from_millis(250)));
    assert!(reduce_radius.state_requirement().is_none());

    assert_eq!(get_radius.request_type(), "delivery.radius.get.v1");
    assert_eq!(get_radius.timeout(), None);
}

#[tokio::test]
async fn handler_with_context() {
    assert_eq!(get_radius.call(GetRadius { store: "abc".into() }, ctx()).await, Ok(3));
}

#[tokio::test]
async fn handler_with_state_declares_and_extracts_it() {
    let req: Option<StateRequirement> = get_zone.state_requirement();
    let req = req.expect("a State<Defaults> argument is a requirement");
    assert_eq!(req.id, std::any::TypeId::of::<Defaults>());

    // `Context::for_test` carries no state, so this exercises the missing-state path.
    let err = get_zone.call(GetZone { zone: None }, ctx()).await.expect_err("no state registered");
    assert_eq!(err.code, ErrorCode::HandlerError);
    assert!(err.message.contains("Defaults"), "{}", err.message);
}

/// What the server runs: the handler and its response's encoding in one future. It
/// answers as `call` does, with the response encoded in the request's content type.
#[tokio::test]
async fn handler_encodes_what_it_answers() {
    let req = || ReduceRadius { store_id: 1, radius_m: 3000, by_m: 1000 };
    for content_type in [ContentType::Bincode, ContentType::Json] {
        let encoded = reduce_radius.call_encoded(req(), ctx(), content_type).await.expect("encoded");
        assert_eq!(content_type.decode::<RadiusReduced>(&encoded).expect("decodes"), RadiusReduced { radius_m: 2000 });
    }
    let err = reduce_radius
        .call_encoded(ReduceRadius { store_id: 1, radius_m: 1000, by_m: 900 }, ctx(), ContentType::Json)
        .await
        .expect_err("radius below the minimum");
    assert_eq!(err.code, ErrorCode::Custom("RADIUS_TOO_SMALL".into()));
    let encoded = get_radius.call_encoded(GetRadius { store: "abc".into() }, ctx(), ContentType::Json).await;
    assert_eq!(encoded.expect("encoded"), b"3");
    let err = get_zone.call_encoded(GetZone { zone: None }, ctx(), ContentType::Json).await.expect_err("no state registered");
    assert!(err.message.contains("Defaults"), "{}", err.message);
    let state = ctx().with_state(Defaults { radius_m: 700 });
    assert_eq!(get_zone.call_encoded(GetZone { zone: None }, state, ContentType::Json).await.expect("encoded"), b"700");
}

// ---- through a server ----------------------------------------------------------

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.legacy", response = u32, key = store_id)]
struct LegacyRadius {
    store_id: u64,
}

/// Served under an older name than its request's `TYPE`, to check dispatch uses the override.
#[handler(type = "delivery.radius.legacy.v0")]
async fn legacy_radius(req: LegacyRadius, _ctx: Context, State(defaults): State<Defaults>) -> Result<u32, RemoteError> {
    Ok(defaults.radius_m + req.store_id as u32)
}

/// What a client sends when it still uses the old dispatch name.
#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.radius.legacy.v0", response = u32, key = store_id)]
struct LegacyRadiusV0 {
    store_id: u64,
}

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.slow", response = ())]
struct Slow;

#[handler(timeout_ms = 50)]
async fn slow(_req: Slow) -> Result<(), RemoteError> {
    tokio::time::sleep(Duration::from_secs(5)).await;
    Ok(())
}

#[tokio::test]
async fn generated_handlers_run_behind_a_server() {
    let broker = EmbeddedBroker::new();
    let server = RpcServer::builder(broker.clone(), "macros.delivery")
        .group("macros.delivery.server")
        .state(Defaults { radius_m: 1000 })
        .handler(reduce_radius)
        .handler(get_zone)
        .handler(legacy_radius)
        .handler(slow)
        .start()
        .await
        .expect("server starts");
    let client = ReplyingClient::builder(broker, "macros.delivery").start().await.expect("client starts");

    let reduced = client.request(ReduceRadius { store_id: 1, radius_m: 3000, by_m: 500 }).await;
    assert_eq!(reduced.expect("reply"), RadiusReduced { radius_m: 2500 });

    let err = client.request(ReduceRadius { store_id: 1, radius_m: 600, by_m: 500 }).await.expect_err("too small");
    assert_eq!(err.code(), Some(&ErrorCode::Custom("RADIUS_TOO_SMALL".into())));

    // State registered on the server reaches the handler.
    assert_eq!(client.request(GetZone { zone: None }).await.expect("reply"), 1000);

    // The override is the only name the handler answers to.
    assert_eq!(client.request(LegacyRadiusV0 { store_id: 7 }).await.expect("reply"), 1007);
    let err = client.request(LegacyRadius { store_id: 7 }).await.expect_err("not registered under TYPE");
    assert_eq!(err.code(), Some(&ErrorCode::UnknownType));

    // The attribute's timeout is the one the server enforces.
    let err = client.request(Slow).await.expect_err("times out");
    assert_eq!(err.code(), Some(&ErrorCode::HandlerTimeout));

    client.shutdown().await;
    server.shutdown().await.expect("server stops");
}

/// Options given at registration override the attribute's: the same function served
/// under a second name, with a tighter time limit than its own.
#[tokio::test]
async fn registration_options_override_the_attribute() {
    let broker = EmbeddedBroker::new();
    let server = RpcServer::builder(broker.clone(), "macros.options")
        .state(Defaults { radius_m: 1000 })
        .handler(legacy_radius)
        .handler_with(legacy_radius, HandlerOptions::new().name(LegacyRadius::TYPE))
        .handler_with(slow, HandlerOptions::new().timeout(Duration::from_millis(20)).name("delivery.slower"))
        .handler_with(reduce_radius, HandlerOptions::new().timeout(Duration::from_secs(5)))
        .start()
        .await
        .expect("server starts");
    let client = ReplyingClient::builder(broker, "macros.options").start().await.expect("client starts");

    // Both names are served: the attribute's and the one given at registration.
    assert_eq!(client.request(LegacyRadiusV0 { store_id: 7 }).await.expect("reply"), 1007);
    assert_eq!(client.request(LegacyRadius { store_id: 8 }).await.expect("reply"), 1008);
    // `slow` was registered only under the new name, with the registration's timeout.
    let err = client.request(Slow).await.expect_err("not registered under its own name");
    assert_eq!(err.code(), Some(&ErrorCode::UnknownType));
    let err = client.request(Slower).await.expect_err("times out");
    assert_eq!(err.code(), Some(&ErrorCode::HandlerTimeout));
    assert!(err.to_string().contains("20ms"), "the registration's limit applies: {err}");
    // An option left unset keeps the handler's own: `reduce_radius` keeps its type name.
    let reduced = client.request(ReduceRadius { store_id: 1, radius_m: 3000, by_m: 500 }).await;
    assert_eq!(reduced.expect("reply"), RadiusReduced { radius_m: 2500 });

    client.shutdown().await;
    server.shutdown().await.expect("server stops");
}

/// What a client sends to reach `slow` under the name it was registered with.
#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.slower", response = ())]
struct Slower;

// ---- events ----------------------------------------------------------------------

#[derive(Serialize, Deserialize, Request)]
#[request(type = "delivery.store.opened", response = (), key = store_id)]
struct StoreOpened {
    store_id: u64,
}

#[derive(Clone, Default)]
struct Opened(std::sync::Arc<std::sync::atomic::AtomicU64>);

#[handler]
async fn store_opened(req: StoreOpened, ctx: Context, State(opened): State<Opened>) -> Result<(), RemoteError> {
    assert!(!ctx.expects_reply(), "a record without reply headers is an event");
    opened.0.fetch_add(req.store_id, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// A record with a type header but no reply headers runs the handler and gets no reply.
#[tokio::test]
async fn events_run_the_handler_without_a_reply() {
    use kafka_rpc::__private::wire::{self, RequestMeta};

    let broker = EmbeddedBroker::new();
    let opened = Opened::default();
    let server = RpcServer::builder(broker.clone(), "macros.events")
        .state(opened.clone())
        .handler(store_opened)
        .start()
        .await
        .expect("server starts");

    let mut record = Record::new(
        Some(42u64.key_bytes()),
        ContentType::Bincode.encode(&StoreOpened { store_id: 42 }).expect("encodes"),
    );
    record.headers =
        wire::request_headers(&RequestMeta { request_type: Some(StoreOpened::TYPE.into()), ..RequestMeta::default() });
    broker.produce("macros.events", 0, vec![record]).await.expect("produced");

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.stats().events() == 0 {
        assert!(std::time::Instant::now() < deadline, "the event was not handled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(opened.0.load(std::sync::atomic::Ordering::SeqCst), 42);
    server.shutdown().await.expect("server stops");
}
