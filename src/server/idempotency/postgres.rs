//! Exactly-once effects for handlers whose effects live in PostgreSQL: the inbox pattern.
//!
//! A window (memory or Kafka) is written *after* the handler's effect, so a crash in
//! between re-runs the handler. The inbox closes that gap by recording the idempotency
//! key in the handler's own transaction: the effect and the key commit together or not
//! at all, and a second transaction claiming the same key waits for the first and then
//! sees it as a duplicate — also when the two run on different members after a
//! rebalance.
//!
//! ```no_run
//! use kafka_rpc::prelude::*;
//! use kafka_rpc::server::idempotency::postgres::{Claim, Inbox, InboxError};
//! use serde::{Deserialize, Serialize};
//! use std::sync::Arc;
//! use tokio::sync::Mutex;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Pay { account: i64, cents: i64 }
//! impl Request for Pay {
//!     const TYPE: &'static str = "payments.pay";
//!     type Response = i64;
//!     fn key(&self) -> Option<Vec<u8>> { Some(self.account.key_bytes()) }
//! }
//!
//! type Db = Arc<Mutex<tokio_postgres::Client>>;
//!
//! async fn pay(req: Pay, ctx: Context, State(db): State<Db>) -> Result<i64, RemoteError> {
//!     let key = ctx.idempotency_key().ok_or_else(|| RemoteError::new("NO_KEY", "pay needs a key"))?;
//!     let mut db = db.lock().await;
//!     // Every database failure rolls the transaction back: answered as the inbox's own,
//!     // so that a retry under the same key runs again (see `InboxError::into_remote`).
//!     let db_error = |e: tokio_postgres::Error| InboxError::from(e).into_remote();
//!     let tx = db.transaction().await.map_err(db_error)?;
//!     let inbox = Inbox::new();
//!     if let Claim::Duplicate(first) = inbox.claim(&tx, key).await.map_err(InboxError::into_remote)? {
//!         // Already paid: answer as the first time, change nothing.
//!         return first.response::<i64>().map_err(InboxError::into_remote)?.ok_or_else(|| RemoteError::new("DB", "no stored response"));
//!     }
//!     let row = tx
//!         .query_one("UPDATE accounts SET cents = cents - $2 WHERE id = $1 RETURNING cents", &[&req.account, &req.cents])
//!         .await
//!         .map_err(db_error)?;
//!     let balance: i64 = row.get(0);
//!     inbox.complete(&tx, key, &balance).await.map_err(InboxError::into_remote)?;
//!     tx.commit().await.map_err(db_error)?;
//!     Ok(balance)
//! }
//! ```

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_postgres::{GenericClient, Transaction};

use crate::codec::{CodecError, ContentType};
use crate::error::RemoteError;

/// The table [`Inbox::new`] uses.
pub const DEFAULT_TABLE: &str = "kafka_rpc_inbox";

/// Why the inbox could not claim or complete a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    /// PostgreSQL failed (a serialization failure under REPEATABLE READ or SERIALIZABLE
    /// means another transaction claimed the key at the same time: retry the transaction).
    #[error("inbox: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The response could not be stored or read back as JSON.
    #[error("inbox response: {0}")]
    Codec(#[from] CodecError),
    /// [`Inbox::complete`] for a key this transaction did not claim.
    #[error("inbox: key was not claimed in this transaction")]
    NotClaimed,
    /// A table name that is not a plain (optionally schema-qualified) identifier.
    #[error("inbox: `{0}` is not a plain table name")]
    BadTableName(String),
}

impl InboxError {
    /// The error a handler returns for an inbox failure
    /// (`inbox.claim(&tx, key).await.map_err(InboxError::into_remote)?`): the caller gets
    /// [`STORE_UNAVAILABLE`](super::STORE_UNAVAILABLE), and the transaction, dropped
    /// uncommitted, rolls back. Nothing was applied, so a window in front of the inbox
    /// does not keep this answer: a retry under the same key runs again and the inbox
    /// decides. Map the transaction's other database errors (its commit too, whose
    /// outcome a lost connection leaves unknown) through `InboxError::from(e)` the same
    /// way: the retry's claim finds the key if the commit did happen.
    ///
    /// A method rather than `From<InboxError> for RemoteError`: an impl that exists only
    /// with a cargo feature changes the compiler's list of `RemoteError` conversions, and
    /// with it every diagnostic the `#[handler]` macro's users see.
    pub fn into_remote(self) -> RemoteError {
        RemoteError::new(super::STORE_UNAVAILABLE, self.to_string())
    }
}

/// What [`Inbox::claim`] found.
#[derive(Debug)]
pub enum Claim {
    /// The key is new; it is now recorded in this transaction. Apply the effect, call
    /// [`Inbox::complete`], commit.
    First,
    /// A committed transaction already claimed the key: do not apply the effect again.
    Duplicate(FirstResponse),
}

/// The response the first transaction stored with [`Inbox::complete`].
#[derive(Debug, Clone)]
pub struct FirstResponse(Option<Vec<u8>>);

impl FirstResponse {
    /// The stored response, or `None` when the first transaction committed without
    /// calling [`Inbox::complete`].
    pub fn response<T: DeserializeOwned>(&self) -> Result<Option<T>, InboxError> {
        match &self.0 {
            Some(bytes) => Ok(Some(ContentType::Json.decode(bytes)?)),
            None => Ok(None),
        }
    }
}

/// Idempotency keys recorded in the handler's own database, in the transaction of its
/// effect. Rows stay until [`purge`](Self::purge) removes them: the inbox remembers a
/// key as long as you keep its row, with no window of its own.
#[derive(Debug, Clone)]
pub struct Inbox {
    table: String,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox::new()
    }
}

impl Inbox {
    /// An inbox in the table [`DEFAULT_TABLE`].
    pub fn new() -> Self {
        Inbox { table: DEFAULT_TABLE.to_owned() }
    }

    /// An inbox in `table` (`name` or `schema.name`, letters, digits and `_`).
    pub fn with_table(table: &str) -> Result<Self, InboxError> {
        let plain = |part: &str| {
            part.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| plain(p)) {
            return Err(InboxError::BadTableName(table.to_owned()));
        }
        Ok(Inbox { table: table.to_owned() })
    }

    /// Creates the inbox table if it does not exist.
    pub async fn create_table(&self, client: &impl GenericClient) -> Result<(), InboxError> {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (key bytea PRIMARY KEY, response bytea, recorded_at timestamptz NOT NULL DEFAULT now())",
            self.table
        );
        client.batch_execute(&sql).await?;
        Ok(())
    }

    /// Records `key` in `tx`, or reports that a committed transaction already did.
    ///
    /// If another transaction holds the key uncommitted, this waits for it (the primary
    /// key's lock): it returns [`Claim::Duplicate`] once that one commits, and
    /// [`Claim::First`] if it rolls back. So two members running the same request at
    /// once apply its effect once.
    pub async fn claim(&self, tx: &Transaction<'_>, key: &[u8]) -> Result<Claim, InboxError> {
        let insert = format!("INSERT INTO {} (key) VALUES ($1) ON CONFLICT (key) DO NOTHING", self.table);
        let select = format!("SELECT response FROM {} WHERE key = $1", self.table);
        // A purge may delete the conflicting row between the two statements; then the
        // key is new again. Should that keep happening, the safe answer is "seen".
        for _ in 0..3 {
            if tx.execute(&insert, &[&key]).await? == 1 {
                return Ok(Claim::First);
            }
            if let Some(row) = tx.query_opt(&select, &[&key]).await? {
                // `try_get`, not `get` (which panics): the table may predate this inbox
                // (`create_table` keeps an existing one) with a column of another type.
                return Ok(Claim::Duplicate(FirstResponse(row.try_get(0)?)));
            }
        }
        Ok(Claim::Duplicate(FirstResponse(None)))
    }

    /// Stores the response to `key` (as JSON) in `tx`, for duplicates to answer with.
    pub async fn complete<T: Serialize>(&self, tx: &Transaction<'_>, key: &[u8], response: &T) -> Result<(), InboxError> {
        let bytes = ContentType::Json.encode(response)?;
        // Only a claim still open: a committed first response is never overwritten.
        let update = format!("UPDATE {} SET response = $2 WHERE key = $1 AND response IS NULL", self.table);
        match tx.execute(&update, &[&key, &bytes]).await? {
            0 => Err(InboxError::NotClaimed),
            _ => Ok(()),
        }
    }

    /// Deletes keys recorded more than `older_than` ago; returns how many. A duplicate
    /// arriving after its key was purged runs again.
    pub async fn purge(&self, client: &impl GenericClient, older_than: Duration) -> Result<u64, InboxError> {
        let delete = format!("DELETE FROM {} WHERE recorded_at < now() - make_interval(secs => $1)", self.table);
        Ok(client.execute(&delete, &[&older_than.as_secs_f64()]).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(Inbox::with_table("inbox").is_ok());
        assert!(Inbox::with_table("payments.inbox_2").is_ok());
        for bad in ["", "1x", "a.b.c", "inbox; DROP TABLE x", "in box", "a."] {
            assert!(matches!(Inbox::with_table(bad), Err(InboxError::BadTableName(_))), "{bad}");
        }
    }
}
