//! The testkit's servers start, answer, and leave nothing behind.

use std::net::TcpStream;

use kafka_rpc_testkit::{TempPostgres, TempRedis};

fn postgres() -> TempPostgres {
    TempPostgres::start().unwrap_or_else(|e| panic!("{e}"))
}

fn redis() -> TempRedis {
    TempRedis::start().unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn postgres_answers_a_query_with_durability_on_and_its_cluster_goes_away() {
    let pg = postgres();
    let dir = pg.dir().to_path_buf();
    let port = pg.port();
    let (client, conn) = tokio_postgres::connect(&pg.connection_string(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", pg.connection_string()));
    let conn = tokio::spawn(conn);
    let row = client.query_one("SELECT 40 + 2", &[]).await.expect("query");
    assert_eq!(row.get::<_, i32>(0), 42);
    for (setting, want) in [("fsync", "on"), ("synchronous_commit", "on"), ("listen_addresses", "127.0.0.1")] {
        let row = client.query_one(&format!("SHOW {setting}"), &[]).await.expect("SHOW");
        assert_eq!(row.get::<_, String>(0), want, "{setting}");
    }
    let max: String = client.query_one("SHOW max_connections", &[]).await.expect("SHOW").get(0);
    assert!(max.parse::<u32>().expect("a number") >= 300, "max_connections {max}");
    assert!(dir.join("data/PG_VERSION").is_file());
    drop(client);
    let _ = conn.await;

    drop(pg);
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "postgres still listens on {port} after drop");
}

#[tokio::test]
async fn redis_answers_ping_and_its_directory_goes_away() {
    let server = redis();
    let dir = server.dir().to_path_buf();
    let port = server.port();
    let client = redis::Client::open(server.url()).expect("url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.expect("PING");
    assert_eq!(pong, "PONG");
    let save: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("save").query_async(&mut conn).await.expect("CONFIG");
    assert_eq!(save, ["save", ""], "persistence must be off");
    drop(conn);

    drop(server);
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "redis still listens on {port} after drop");
}

#[test]
fn servers_stop_when_the_test_that_owns_them_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let joined = std::thread::spawn(move || {
        let pg = postgres();
        let redis = redis();
        let _ = tx.send((pg.dir().to_path_buf(), pg.port(), redis.dir().to_path_buf(), redis.port()));
        panic!("a failing test");
    })
    .join();
    assert!(joined.is_err(), "the thread was meant to panic");
    let (pg_dir, pg_port, redis_dir, redis_port) = rx.recv().expect("the servers started");
    assert!(!pg_dir.exists() && !redis_dir.exists(), "directories left behind");
    assert!(TcpStream::connect(("127.0.0.1", pg_port)).is_err(), "postgres outlived the panic");
    assert!(TcpStream::connect(("127.0.0.1", redis_port)).is_err(), "redis outlived the panic");
}
