//! Contenders 3 and 4: kafka-rpc. Each trigger is a request keyed by store id; the
//! handler does the read–modify–write with no lock, because one partition worker sees
//! all of a store's requests, in order. Contender 3 handles one request per
//! transaction; contender 4 uses a batch handler that applies everything one fetch
//! returned for a partition in one transaction, in order, and answers each request.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use kafka_rpc::prelude::*;
use kafka_rpc::server::batch::Batch;
use kafka_rpc::transport::kafka::{KafkaConfig, KafkaTransport};
use serde::{Deserialize, Serialize};

use super::{in_transaction, Contender, Counters, Pending};
use crate::db::Applied;
use crate::workload::Update;

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
    radius_m: i32,
    payload: Vec<u8>,
}

impl ApplyRadius {
    fn from_update(u: Update) -> ApplyRadius {
        ApplyRadius { store_id: u.store_id as u64, seq: u.seq, radius_m: u.radius_m, payload: u.payload }
    }

    fn to_update(&self) -> Update {
        Update { store_id: self.store_id as i64, seq: self.seq, radius_m: self.radius_m, payload: self.payload.clone() }
    }
}

/// What the handlers share: the rows and how to treat stale updates.
#[derive(Clone)]
struct Db {
    pool: Pool,
    counters: Arc<Counters>,
    fence: bool,
}

#[handler]
async fn apply_radius(req: ApplyRadius, _ctx: Context, State(db): State<Db>) -> Result<Applied, RemoteError> {
    in_transaction(&db.pool, &db.counters, &req.to_update(), false, db.fence)
        .await
        .map(|(applied, _)| applied)
        .map_err(|e| RemoteError::new("UPDATE_FAILED", e))
}

#[handler]
async fn apply_radius_batch(batch: Batch<ApplyRadius>, State(db): State<Db>) -> Result<Vec<Result<Applied, RemoteError>>, RemoteError> {
    let failed = |e: tokio_postgres::Error| {
        db.counters.classify(&e);
        RemoteError::new("UPDATE_FAILED", crate::db::describe(&e))
    };
    let mut conn = db.pool.get().await.map_err(|e| RemoteError::new("UPDATE_FAILED", format!("no PostgreSQL connection: {e}")))?;
    let tx = conn.transaction().await.map_err(failed)?;
    let updates: Vec<Update> = batch.requests().map(ApplyRadius::to_update).collect();
    // A failed statement aborts the transaction, so it fails the whole batch.
    let outcomes = crate::db::apply_batch(&tx, &updates, db.fence).await.map_err(failed)?;
    // One commit (one WAL flush) for the whole batch: this is what batching buys.
    tx.commit().await.map_err(failed)?;
    Ok(outcomes.into_iter().map(Ok).collect())
}

/// Most requests one batch-handler call applies in one transaction.
pub const MAX_BATCH: usize = 500;

/// A server and a client on one broker, with a fresh topic.
pub struct Rpc {
    server: RpcServer,
    client: ReplyingClient,
}

impl Rpc {
    /// Starts the server (handlers use `pool`; `batched` picks the batch handler) and
    /// the client on `broker`.
    pub async fn start(broker: &RpcBroker, pool: Pool, counters: Arc<Counters>, fence: bool, batched: bool) -> Result<Rpc, String> {
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
        let server = RpcServer::builder(transport.clone(), &topic)
            .partitions(PARTITIONS)
            .state(Db { pool, counters, fence })
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
        Ok(Rpc { server, client })
    }

    /// Stops the client and the server.
    pub async fn shutdown(self) -> Result<(), String> {
        self.client.shutdown().await;
        self.server.shutdown().await.map_err(|e| format!("server did not stop cleanly: {e}"))
    }
}

impl Contender for Rpc {
    fn start(&self, update: Update) -> Pending {
        // Queued now, while the store's sequence number is held: requests of one
        // store reach their partition in sequence order.
        let call = self.client.request(ApplyRadius::from_update(update));
        Box::pin(async move { call.await.map_err(|e| e.to_string()) })
    }
}
