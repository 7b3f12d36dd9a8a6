//! Requests waiting for their reply: correlation id → completion, with deadlines.
//!
//! An entry leaves the map on exactly one of: its reply arrives, its deadline passes,
//! its caller drops the future, or the client closes. The [`PendingReply`] guard
//! removes it on drop, which is what makes `request` cancel-safe and keeps
//! [`InFlight::len`] honest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::RpcError;
use crate::transport::{ConsumedRecord, TransportError};

type Completion = oneshot::Sender<Result<ConsumedRecord, RpcError>>;

/// The pending-reply map of one client.
#[derive(Default)]
pub(crate) struct InFlight {
    pending: DashMap<u128, Completion>,
    closed: AtomicBool,
}

impl InFlight {
    /// Registers a request that will wait until `deadline`.
    pub(crate) fn register(self: &Arc<Self>, id: u128, deadline: Instant) -> Result<PendingReply, RpcError> {
        let (tx, rx) = oneshot::channel();
        self.pending.insert(id, tx);
        // Checked after the insert so that a concurrent `close` either sees this entry
        // or we see its flag: no request can slip in after the drain and hang.
        if self.closed.load(Ordering::Acquire) {
            self.pending.remove(&id);
            return Err(RpcError::Closed);
        }
        Ok(PendingReply { id, deadline, rx, map: self.clone() })
    }

    /// Hands a reply to its waiter. False when nobody waits for `id`: a foreign reply,
    /// or a late one whose caller timed out or gave up.
    pub(crate) fn complete(&self, id: u128, reply: ConsumedRecord) -> bool {
        match self.pending.remove(&id) {
            Some((_, tx)) => tx.send(Ok(reply)).is_ok(),
            None => false,
        }
    }

    /// Fails one request, e.g. because its produce failed.
    pub(crate) fn fail(&self, id: u128, error: TransportError) {
        if let Some((_, tx)) = self.pending.remove(&id) {
            let _ = tx.send(Err(RpcError::Transport(error)));
        }
    }

    /// Fails every pending request with `Closed` and refuses new ones.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let ids: Vec<u128> = self.pending.iter().map(|e| *e.key()).collect();
        for id in ids {
            if let Some((_, tx)) = self.pending.remove(&id) {
                let _ = tx.send(Err(RpcError::Closed));
            }
        }
    }

    /// Number of requests waiting for a reply.
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

/// A registered request; waits for its reply and unregisters on drop.
pub(crate) struct PendingReply {
    id: u128,
    deadline: Instant,
    rx: oneshot::Receiver<Result<ConsumedRecord, RpcError>>,
    map: Arc<InFlight>,
}

impl PendingReply {
    /// The reply record, or `Timeout` at the deadline, or `Closed`.
    pub(crate) async fn wait(mut self, timeout: std::time::Duration) -> Result<ConsumedRecord, RpcError> {
        match tokio::time::timeout_at(self.deadline, &mut self.rx).await {
            Ok(Ok(outcome)) => outcome,
            // The sender is only dropped by `close`, which sends first; treat it the same.
            Ok(Err(_)) => Err(RpcError::Closed),
            Err(_) => Err(RpcError::Timeout(timeout)),
        }
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        self.map.pending.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Record;
    use std::time::Duration;

    fn reply() -> ConsumedRecord {
        ConsumedRecord { partition: 0, offset: 0, record: Arc::new(Record::default()) }
    }

    #[tokio::test]
    async fn reply_completes_and_unregisters() {
        let map = Arc::new(InFlight::default());
        let pending = map.register(1, Instant::now() + Duration::from_secs(5)).unwrap();
        assert_eq!(map.len(), 1);
        assert!(map.complete(1, reply()));
        assert!(pending.wait(Duration::from_secs(5)).await.is_ok());
        assert_eq!(map.len(), 0);
        assert!(!map.complete(1, reply()), "a second reply for the same id is foreign");
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_unregisters() {
        let map = Arc::new(InFlight::default());
        let pending = map.register(2, Instant::now() + Duration::from_millis(50)).unwrap();
        let err = pending.wait(Duration::from_millis(50)).await.unwrap_err();
        assert!(matches!(err, RpcError::Timeout(_)), "{err}");
        assert_eq!(map.len(), 0);
        assert!(!map.complete(2, reply()), "a late reply is ignored");
    }

    #[tokio::test]
    async fn dropping_the_waiter_unregisters() {
        let map = Arc::new(InFlight::default());
        drop(map.register(3, Instant::now() + Duration::from_secs(5)).unwrap());
        assert_eq!(map.len(), 0);
    }

    #[tokio::test]
    async fn close_fails_pending_and_refuses_new() {
        let map = Arc::new(InFlight::default());
        let pending = map.register(4, Instant::now() + Duration::from_secs(5)).unwrap();
        map.close();
        assert!(matches!(pending.wait(Duration::from_secs(5)).await, Err(RpcError::Closed)));
        assert!(matches!(map.register(5, Instant::now()), Err(RpcError::Closed)));
        assert_eq!(map.len(), 0);
    }
}
