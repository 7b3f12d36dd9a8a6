//! Contender 1: a per-store Redis lock (`SET key token NX PX ttl`, retried with
//! exponential backoff and full jitter, released with a compare-and-delete script)
//! around a read–modify–write of the store's row.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use redis::aio::MultiplexedConnection;

use super::{in_transaction, Contender, Counters, Failure, Pending};
use crate::workload::{Update, XorShift};

/// Lock lifetime: long against a critical section of a few milliseconds, as a
/// production setting would be.
pub const LOCK_TTL: Duration = Duration::from_secs(2);
/// First retry delay; doubles per retry up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(1);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_millis(64);
/// A trigger that cannot get its lock within this long fails.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// Deletes the lock only if it still holds our token, so an expired lock that another
/// trigger now holds is left alone.
const RELEASE: &str = r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;

/// Each update takes its store's Redis lock, then runs a plain read–modify–write.
pub struct RedisLock {
    redis: MultiplexedConnection,
    pool: Pool,
    counters: Arc<Counters>,
    fence: bool,
    release: redis::Script,
}

impl RedisLock {
    /// A contender using `redis` for locks and `pool` for the rows.
    pub fn new(redis: MultiplexedConnection, pool: Pool, counters: Arc<Counters>, fence: bool) -> RedisLock {
        RedisLock { redis, pool, counters, fence, release: redis::Script::new(RELEASE) }
    }
}

impl Contender for RedisLock {
    fn start(&self, update: Update) -> Pending {
        let mut redis = self.redis.clone();
        let (pool, counters, fence, release) = (self.pool.clone(), Arc::clone(&self.counters), self.fence, self.release.clone());
        Box::pin(async move {
            let key = format!("lock:store:{}", update.store_id);
            let token = uuid::Uuid::new_v4().simple().to_string();
            let mut rng = XorShift::new(uuid::Uuid::new_v4().as_u64_pair().0);
            let started = Instant::now();
            let mut backoff = FIRST_BACKOFF;
            let mut waited = false;
            loop {
                let got: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(LOCK_TTL.as_millis() as u64)
                    .query_async(&mut redis)
                    .await
                    .map_err(|e| Failure::unwritten(format!("Redis SET failed: {e}")))?;
                if got.is_some() {
                    break;
                }
                if !waited {
                    waited = true;
                    Counters::bump(&counters.lock_waits);
                }
                if started.elapsed() >= ACQUIRE_TIMEOUT {
                    return Err(Failure::unwritten(format!("no lock on store {} within {ACQUIRE_TIMEOUT:?}", update.store_id)));
                }
                Counters::bump(&counters.lock_retries);
                // Full jitter: a uniformly random wait up to the current backoff, so
                // waiters that failed together do not retry together.
                let wait = backoff.mul_f64(rng.unit());
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            let acquired = Instant::now();
            let outcome = in_transaction(&pool, &counters, &update, false, fence).await.map(|(a, _)| a);
            let released: Result<i64, _> = release.key(&key).arg(&token).invoke_async(&mut redis).await;
            if !matches!(released, Ok(1)) || acquired.elapsed() > LOCK_TTL {
                // The lock expired while we were in the critical section, or could not
                // be released (it will expire). Either way the update's outcome is
                // already decided by its transaction, and that is what the caller learns.
                Counters::bump(&counters.lock_expiries);
            }
            outcome
        })
    }
}
