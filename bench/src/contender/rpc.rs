//! Contenders 3 and 4: kafka-rpc. Each trigger is a request keyed by store id; the
//! handler does the read–modify–write with no lock, because one partition worker sees
//! all of a store's requests, in order. Contender 3 handles one request per
//! transaction; contender 4 uses a batch handler that applies everything one fetch
//! returned for a partition in one transaction, in order, and answers each request.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use kafka_rpc::prelude::*;
use kafka_rpc::server::batch::Batch;
use kafka_rpc::transport::kafka::{KafkaConfig, KafkaTransport};
use serde::{Deserialize, Serialize};

use super::{in_transaction, Contender, Counters, Failure, Pending};
use crate::db::{Applied, WriteError};
use crate::workload::Update;

/// The error code of a handler failure known to have written nothing; any other
/// failure of a call may have been written.
const NOT_WRITTEN: &str = "NOT_WRITTEN";
/// The error code of a handler failure that may have been written (a failed commit).
const UPDATE_FAILED: &str = "UPDATE_FAILED";

/// Partitions of the request topic, hence handlers running at once.
pub const PARTITIONS: i32 = 8;

/// Which broker carries the requests.
#[derive(Clone, Debug)]
pub enum RpcBroker {
    /// The in-process broker.
    Embedded,
    /// A Kafka-protocol broker at this bootstrap address (tansu in the sweep).
    Kafka(String),
}

impl RpcBroker {
    /// The name used in reports.
    pub fn name(&self) -> &'static str {
        match self {
            RpcBroker::Embedded => "embedded",
            RpcBroker::Kafka(_) => "tansu",
        }
    }
}

/// Apply one trigger to its store's row.
#[derive(Serialize, Deserialize, Debug, Clone, Request)]
#[request(type = "bench.radius.apply", response = Applied, key = store_id)]
pub struct ApplyRadius {
    store_id: u64,
    seq: i64,
    /// This request's place among its store's calls (see [`CallOrder`]).
    call: i64,
    radius_m: i32,
    payload: Vec<u8>,
}

impl ApplyRadius {
    fn from_update(u: Update, call: i64) -> ApplyRadius {
        ApplyRadius { store_id: u.store_id as u64, seq: u.seq, call, radius_m: u.radius_m, payload: u.payload }
    }

    fn to_update(&self) -> Update {
        Update { store_id: self.store_id as i64, seq: self.seq, radius_m: self.radius_m, payload: self.payload.clone() }
    }
}

/// What the handlers share: the rows, how to treat stale updates, and the calls' order.
#[derive(Clone)]
struct Db {
    pool: Pool,
    counters: Arc<Counters>,
    fence: bool,
    calls: Arc<CallOrder>,
}

/// kafka-rpc's own promise, checked apart from the trigger order the rows are judged
/// by: a store's requests are handled in the order their calls were made. Two
/// triggers of one store raced on two threads can reach `request` in either order;
/// no library can undo that, and the rows count it. This counts only what happens
/// after the call.
struct CallOrder {
    /// The last call number given out per store, index `store_id - 1`.
    made: Vec<Mutex<i64>>,
    /// The highest call number handled per store.
    handled: Vec<AtomicI64>,
}

impl CallOrder {
    fn new(stores: u64) -> CallOrder {
        CallOrder {
            made: (0..stores.max(1)).map(|_| Mutex::new(0)).collect(),
            handled: (0..stores.max(1)).map(|_| AtomicI64::new(0)).collect(),
        }
    }

    /// Numbers the store's next call and makes it, holding the number until the
    /// request is queued so that numbers follow queueing order.
    fn call<T>(&self, store_id: i64, make: impl FnOnce(i64) -> T) -> T {
        let Some(slot) = self.made.get((store_id - 1) as usize) else { return make(0) };
        // A poisoned counter is still a valid counter.
        let mut last = slot.lock().unwrap_or_else(|p| p.into_inner());
        *last += 1;
        make(*last)
    }

    /// Records that the store's call `call` is being handled; false if it is not the
    /// one after the highest handled so far (it skips an unhandled earlier call, or
    /// comes after a later one). Against the highest, not the last: after 1, 3, 2 the
    /// call 4 is in order, and only 3 and 2 are not.
    fn handled(&self, store_id: u64, call: i64) -> bool {
        let Some(highest) = self.handled.get((store_id as usize).wrapping_sub(1)) else { return false };
        highest.fetch_max(call, Ordering::Relaxed) + 1 == call
    }
}

impl Db {
    fn check_call_order(&self, req: &ApplyRadius) {
        if !self.calls.handled(req.store_id, req.call) {
            Counters::bump(&self.counters.call_order);
        }
    }
}

#[handler]
async fn apply_radius(req: ApplyRadius, _ctx: Context, State(db): State<Db>) -> Result<Applied, RemoteError> {
    db.check_call_order(&req);
    in_transaction(&db.pool, &db.counters, &req.to_update(), false, db.fence)
        .await
        .map(|(applied, _)| applied)
        .map_err(|e| RemoteError::new(if e.maybe_written { UPDATE_FAILED } else { NOT_WRITTEN }, e.message))
}

#[handler]
async fn apply_radius_batch(batch: Batch<ApplyRadius>, State(db): State<Db>) -> Result<Vec<Result<Applied, RemoteError>>, RemoteError> {
    let failed = |e: WriteError, code: &str| {
        db.counters.classify(&e);
        RemoteError::new(code, e.to_string())
    };
    let mut conn = db.pool.get().await.map_err(|e| RemoteError::new(NOT_WRITTEN, format!("no PostgreSQL connection: {e}")))?;
    let tx = conn.transaction().await.map_err(|e| failed(e.into(), NOT_WRITTEN))?;
    batch.requests().for_each(|req| db.check_call_order(req));
    let updates: Vec<Update> = batch.requests().map(ApplyRadius::to_update).collect();
    // A failed statement aborts the transaction, so it fails the whole batch.
    let outcomes = crate::db::apply_batch(&tx, &updates, db.fence).await.map_err(|e| failed(e, NOT_WRITTEN))?;
    // One commit (one WAL flush) for the whole batch: this is what batching buys. A
    // failed commit may have committed.
    tx.commit().await.map_err(|e| failed(e.into(), UPDATE_FAILED))?;
    outcomes.iter().for_each(|a| db.counters.judged(*a));
    Ok(outcomes.into_iter().map(Ok).collect())
}

/// Most requests one batch-handler call applies in one transaction.
pub const MAX_BATCH: usize = 500;

/// A server and a client on one broker, with a fresh topic.
pub struct Rpc {
    server: RpcServer,
    client: ReplyingClient,
    calls: Arc<CallOrder>,
}

impl Rpc {
    /// Starts the server (handlers use `pool` for stores `1..=stores`; `batched` picks
    /// the batch handler) and the client on `broker`.
    pub async fn start(
        broker: &RpcBroker,
        pool: Pool,
        stores: u64,
        counters: Arc<Counters>,
        batched: bool,
    ) -> Result<Rpc, String> {
        let transport: Arc<dyn Transport> = match broker {
            RpcBroker::Embedded => Arc::new(EmbeddedBroker::new()),
            RpcBroker::Kafka(bootstrap) => {
                let kafka = KafkaTransport::connect(KafkaConfig::builder(bootstrap).client_id("lock-vs-rpc").build())
                    .await
                    .map_err(|e| format!("cannot connect to the broker at {bootstrap}: {e}"))?;
                Arc::new(kafka)
            }
        };
        let topic = format!("bench.radius.{}", uuid::Uuid::new_v4().simple());
        let calls = Arc::new(CallOrder::new(stores));
        let server = RpcServer::builder(transport.clone(), &topic)
            .partitions(PARTITIONS)
            .state(Db { pool, counters, fence: false, calls: Arc::clone(&calls) })
            .max_batch(MAX_BATCH);
        let server = if batched { server.batch_handler(apply_radius_batch) } else { server.handler(apply_radius) };
        let server = server
            .start()
            .await
            .map_err(|e| format!("cannot start the server: {e}"))?;
        let client = ReplyingClient::builder(transport, &topic)
            .partitions(PARTITIONS)
            .timeout(Duration::from_secs(60))
            .start()
            .await
            .map_err(|e| format!("cannot start the client: {e}"))?;
        Ok(Rpc { server, client, calls })
    }

    /// Stops the client and the server.
    pub async fn shutdown(self) -> Result<(), String> {
        self.client.shutdown().await;
        self.server.shutdown().await.map_err(|e| format!("server did not stop cleanly: {e}"))
    }
}

impl Contender for Rpc {
    fn start(&self, update: Update) -> Pending {
        // Queued now: the request's place in its partition is fixed here, in call order.
        let call = self.calls.call(update.store_id, |n| self.client.request(ApplyRadius::from_update(update, n)));
        Box::pin(async move {
            call.await.map_err(|e| {
                // Only the handler can know that nothing was written; a timeout or a
                // lost reply leaves it open.
                let maybe_written = !matches!(e.code(), Some(code) if code.as_str() == NOT_WRITTEN);
                Failure { message: e.to_string(), maybe_written }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::CallOrder;

    #[test]
    fn one_swapped_pair_counts_two_calls_out_of_order_not_the_call_after_it() {
        let calls = CallOrder::new(1);
        // Calls 2 and 3 are handled the wrong way round; 1 and 4 are each handled
        // after every earlier call and before every later one.
        let in_order: Vec<bool> = [1, 3, 2, 4].iter().map(|&call| calls.handled(1, call)).collect();
        assert_eq!(in_order, [true, false, false, true]);
    }
}
