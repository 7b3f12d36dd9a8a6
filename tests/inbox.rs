//! The PostgreSQL inbox on a real, throwaway PostgreSQL server: the effect and the key
//! commit atomically, and a concurrent duplicate waits for the first and then sees it.

#[cfg(not(feature = "postgres"))]
#[test]
fn the_inbox_tests_need_the_postgres_feature() {
    panic!("tests/inbox.rs tests the `postgres` feature: run `cargo test --features postgres` (scripts/test.sh does)");
}

#[cfg(feature = "postgres")]
mod support;

#[cfg(feature = "postgres")]
mod inbox {
    use std::sync::Arc;
    use std::time::Duration;

    use kafka_rpc::prelude::*;
    use kafka_rpc::server::idempotency::postgres::{Claim, Inbox, InboxError};
    use kafka_rpc::server::idempotency::{MemoryWindow, STORE_UNAVAILABLE};
    use kafka_rpc_testkit::TempPostgres;
    use serde::{Deserialize, Serialize};
    use tokio::sync::Mutex;
    use tokio_postgres::{Client, NoTls};

    use super::support::{eventually, unique, Env};

    /// Adds to an account in PostgreSQL; optionally fails after the effect, before commit.
    #[derive(Serialize, Deserialize, Debug, Clone)]
    struct Charge {
        account: i32,
        cents: i64,
        fail_after_effect: bool,
    }
    impl Request for Charge {
        const TYPE: &'static str = "test.charge";
        type Response = i64;
        fn key(&self) -> Option<Vec<u8>> {
            Some(self.account.key_bytes())
        }
    }

    type Db = Arc<Mutex<Client>>;

    /// A database failure rolls the transaction back: answered as the inbox's own, so a
    /// window in front does not keep it (see `InboxError::into_remote`).
    fn db_error(e: tokio_postgres::Error) -> RemoteError {
        InboxError::from(e).into_remote()
    }

    async fn charge(req: Charge, ctx: Context, State(db): State<Db>) -> Result<i64, RemoteError> {
        let key = ctx.idempotency_key().ok_or_else(|| RemoteError::new("NO_KEY", "charge needs a key"))?;
        let mut db = db.lock().await;
        let tx = db.transaction().await.map_err(db_error)?;
        let inbox = Inbox::new();
        if let Claim::Duplicate(first) = inbox.claim(&tx, key).await.map_err(InboxError::into_remote)? {
            return first.response().map_err(InboxError::into_remote)?.ok_or_else(|| RemoteError::new("NO_RESPONSE", "the first run stored none"));
        }
        let row = tx
            .query_one("UPDATE accounts SET cents = cents + $2 WHERE id = $1 RETURNING cents", &[&req.account, &req.cents])
            .await
            .map_err(db_error)?;
        let balance: i64 = row.get(0);
        if req.fail_after_effect {
            // Returning drops `tx` uncommitted: the effect and the claimed key roll back.
            return Err(RemoteError::new("FAILED_AFTER_EFFECT", "the handler failed after its effect"));
        }
        inbox.complete(&tx, key, &balance).await.map_err(InboxError::into_remote)?;
        tx.commit().await.map_err(db_error)?;
        Ok(balance)
    }

    async fn connect(pg: &TempPostgres) -> Client {
        let (client, connection) = tokio_postgres::connect(&pg.connection_string(), NoTls).await.expect("connect to the test PostgreSQL");
        tokio::spawn(connection);
        client
    }

    fn start_postgres() -> TempPostgres {
        TempPostgres::start().unwrap_or_else(|e| panic!("the inbox tests need PostgreSQL: {e}"))
    }

    async fn setup(client: &Client) {
        client.batch_execute("CREATE TABLE accounts (id int PRIMARY KEY, cents bigint NOT NULL); INSERT INTO accounts VALUES (1, 0)").await.unwrap();
        Inbox::new().create_table(client).await.unwrap();
    }

    async fn balance(client: &Client) -> i64 {
        client.query_one("SELECT cents FROM accounts WHERE id = 1", &[]).await.unwrap().get(0)
    }

    async fn keys(client: &Client) -> i64 {
        client.query_one("SELECT count(*) FROM kafka_rpc_inbox", &[]).await.unwrap().get(0)
    }

    /// Through a server: a handler that fails after its effect leaves neither the effect
    /// nor the key; the next delivery applies it once; duplicates after that change
    /// nothing and get the first reply.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_effect_and_the_key_commit_together() {
        let pg = start_postgres();
        let check = connect(&pg).await;
        setup(&check).await;
        let db: Db = Arc::new(Mutex::new(connect(&pg).await));

        let env = Env::embedded();
        let topic = unique("inbox");
        // No window on the server: the inbox alone must hold the guarantee.
        let server = env.server(&topic).state(db).handler(charge).start().await.unwrap();
        let client = env.client(&topic).start().await.unwrap();
        let once = RequestOptions::new().idempotency_key("charge-1");
        let call = |fail_after_effect| client.request_with(Charge { account: 1, cents: 100, fail_after_effect }, once.clone());

        let err = call(true).await.unwrap_err();
        assert_eq!(err.code(), Some(&ErrorCode::Custom("FAILED_AFTER_EFFECT".into())), "{err:?}");
        assert_eq!((balance(&check).await, keys(&check).await), (0, 0), "effect and key roll back together");

        assert_eq!(call(false).await.unwrap(), 100);
        assert_eq!((balance(&check).await, keys(&check).await), (100, 1));

        // Delivered again (with any payload): the handler runs, the effect does not.
        assert_eq!(call(false).await.unwrap(), 100);
        assert_eq!(call(true).await.unwrap(), 100);
        assert_eq!(balance(&check).await, 100, "applied exactly once");
        assert_eq!(server.stats().handled(), 4);
        server.shutdown().await.unwrap();
    }

    /// "The inbox and a window combine": with a window in front, an inbox that fails for
    /// a moment (here its table is briefly gone; a PostgreSQL restart or a dropped
    /// connection does the same) rolls its transaction back, so nothing was applied and
    /// the retry under the same key must run. The window kept the failure as the key's
    /// outcome instead and replayed it to every retry for `max_age`: the charge was never
    /// applied and its caller could not make it apply without a new key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_inbox_failure_is_not_kept_by_a_window_in_front_of_it() {
        let pg = start_postgres();
        let check = connect(&pg).await;
        setup(&check).await;
        let db: Db = Arc::new(Mutex::new(connect(&pg).await));

        let env = Env::embedded();
        let topic = unique("inbox-window");
        let server = env.server(&topic).state(db).handler(charge).idempotency(MemoryWindow::new()).start().await.unwrap();
        let client = env.client(&topic).start().await.unwrap();
        let once = RequestOptions::new().idempotency_key("charge-1");
        let call = || client.request_with(Charge { account: 1, cents: 100, fail_after_effect: false }, once.clone());

        check.batch_execute("ALTER TABLE kafka_rpc_inbox RENAME TO inbox_away").await.unwrap();
        let err = call().await.unwrap_err();
        assert_eq!(err.code(), Some(&ErrorCode::Custom(STORE_UNAVAILABLE.into())), "{err:?}");
        check.batch_execute("ALTER TABLE inbox_away RENAME TO kafka_rpc_inbox").await.unwrap();
        assert_eq!((balance(&check).await, keys(&check).await), (0, 0), "the failed claim rolled back");

        assert_eq!(call().await.unwrap(), 100, "the retry runs: the failure was not the key's outcome");
        assert_eq!(call().await.unwrap(), 100, "and its outcome is what the window replays");
        assert_eq!((balance(&check).await, keys(&check).await), (100, 1), "applied once");
        assert_eq!((server.stats().handled(), server.stats().duplicates()), (2, 1));
        client.shutdown().await;
        server.shutdown().await.unwrap();
    }

    /// Two members running the same request at once (a rebalance while the first still
    /// runs): the second claim waits for the first transaction, then sees what it did.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_concurrent_duplicate_waits_for_the_first_and_sees_its_outcome() {
        let pg = start_postgres();
        let check = connect(&pg).await;
        setup(&check).await;
        let inbox = Inbox::new();
        let mut first = connect(&pg).await;
        let second = Arc::new(Mutex::new(connect(&pg).await));

        for commit in [true, false] {
            let key = format!("concurrent-{commit}").into_bytes();
            let tx = first.transaction().await.unwrap();
            assert!(matches!(inbox.claim(&tx, &key).await.unwrap(), Claim::First));
            tx.execute("UPDATE accounts SET cents = cents + 1 WHERE id = 1", &[]).await.unwrap();

            let (other, other_key) = (second.clone(), key.clone());
            let racing = tokio::spawn(async move {
                let mut other = other.lock().await;
                let tx = other.transaction().await.unwrap();
                let claim = Inbox::new().claim(&tx, &other_key).await.unwrap();
                tx.commit().await.unwrap();
                claim
            });
            // The duplicate's claim is blocked on the first transaction's key.
            eventually("the second claim waits on a lock", Duration::from_secs(20), || async {
                let waiting: i64 = check
                    .query_one("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'", &[])
                    .await
                    .unwrap()
                    .get(0);
                waiting == 1
            })
            .await;
            assert!(!racing.is_finished());

            if commit {
                inbox.complete(&tx, &key, &41i64).await.unwrap();
                tx.commit().await.unwrap();
                match racing.await.unwrap() {
                    Claim::Duplicate(first) => assert_eq!(first.response::<i64>().unwrap(), Some(41)),
                    Claim::First => panic!("a duplicate of a committed claim must see it"),
                }
            } else {
                tx.rollback().await.unwrap();
                assert!(matches!(racing.await.unwrap(), Claim::First), "a rolled-back claim leaves the key free");
            }
        }
        assert_eq!(balance(&check).await, 1, "only the committed effect remains");
    }

    /// `complete` promises `NotClaimed` "for a key this transaction did not claim":
    /// a key another (committed) transaction claimed and completed keeps its first
    /// response, which every later duplicate replays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn complete_does_not_overwrite_another_transaction_s_response() {
        let pg = start_postgres();
        let mut client = connect(&pg).await;
        setup(&client).await;
        let inbox = Inbox::new();
        let tx = client.transaction().await.unwrap();
        assert!(matches!(inbox.claim(&tx, b"k").await.unwrap(), Claim::First));
        inbox.complete(&tx, b"k", &41i64).await.unwrap();
        tx.commit().await.unwrap();

        let tx = client.transaction().await.unwrap();
        let completed = inbox.complete(&tx, b"k", &99i64).await;
        tx.commit().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let Claim::Duplicate(first) = inbox.claim(&tx, b"k").await.unwrap() else { panic!("claimed before") };
        assert_eq!(first.response::<i64>().unwrap(), Some(41), "the first response was overwritten; complete returned {completed:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purge_forgets_old_keys_and_complete_needs_a_claim() {
        let pg = start_postgres();
        let mut client = connect(&pg).await;
        setup(&client).await;
        let inbox = Inbox::new();
        let tx = client.transaction().await.unwrap();
        assert!(matches!(inbox.complete(&tx, b"never-claimed", &1i64).await, Err(kafka_rpc::server::idempotency::postgres::InboxError::NotClaimed)));
        assert!(matches!(inbox.claim(&tx, b"old").await.unwrap(), Claim::First));
        tx.commit().await.unwrap();
        client.execute("UPDATE kafka_rpc_inbox SET recorded_at = now() - interval '2 hours'", &[]).await.unwrap();
        let tx = client.transaction().await.unwrap();
        assert!(matches!(inbox.claim(&tx, b"new").await.unwrap(), Claim::First));
        tx.commit().await.unwrap();

        assert_eq!(inbox.purge(&client, Duration::from_secs(3600)).await.unwrap(), 1);
        assert_eq!(keys(&client).await, 1);
        let tx = client.transaction().await.unwrap();
        assert!(matches!(inbox.claim(&tx, b"old").await.unwrap(), Claim::First), "a purged key is new again");
        assert!(matches!(inbox.claim(&tx, b"new").await.unwrap(), Claim::Duplicate(_)));
    }

    /// The inbox reads a table it did not necessarily create (`create_table` keeps an
    /// existing one): a `response` column of another type is the database's error, not
    /// a panic in the handler that claimed a duplicate.
    #[tokio::test]
    async fn a_response_column_of_another_type_is_an_error_not_a_panic() {
        let pg = start_postgres();
        let mut client = connect(&pg).await;
        client
            .batch_execute("CREATE TABLE odd_inbox (key bytea PRIMARY KEY, response text, recorded_at timestamptz NOT NULL DEFAULT now())")
            .await
            .unwrap();
        let inbox = Inbox::with_table("odd_inbox").unwrap();
        let tx = client.transaction().await.unwrap();
        assert!(matches!(inbox.claim(&tx, b"k").await.unwrap(), Claim::First));
        tx.commit().await.unwrap();
        let tx = client.transaction().await.unwrap();
        match inbox.claim(&tx, b"k").await {
            Err(InboxError::Postgres(_)) => {}
            other => panic!("expected the database's error, got {other:?}"),
        }
    }
}
