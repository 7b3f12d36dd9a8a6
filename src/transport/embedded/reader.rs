//! Long-polling fetches from one partition.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::log::PartitionLog;
use crate::transport::{ConsumedRecord, Fetch, PartitionReader, TransportError};

/// A [`PartitionReader`] holding its partition's log directly, so a fetch touches no
/// broker-wide state.
pub(crate) struct EmbeddedReader {
    log: Arc<PartitionLog>,
    max_records: usize,
}

impl EmbeddedReader {
    /// A reader returning at most `max_records` records per fetch (at least one).
    pub(crate) fn new(log: Arc<PartitionLog>, max_records: usize) -> Self {
        EmbeddedReader { log, max_records: max_records.max(1) }
    }
}

#[async_trait]
impl PartitionReader for EmbeddedReader {
    async fn read(&mut self, offset: i64, max_wait: Duration) -> Result<Fetch, TransportError> {
        // Every offset of an embedded log holds a record (it has no transaction
        // markers and nothing it cannot read), so the next read starts after the last.
        let records = self.wait_for(offset, max_wait).await?;
        let next_offset = records.last().map_or(offset, |last| last.offset + 1);
        Ok(Fetch { records, next_offset })
    }
}

impl EmbeddedReader {
    /// Records at or after `offset`, waiting up to `max_wait` for at least one.
    async fn wait_for(&self, offset: i64, max_wait: Duration) -> Result<Vec<ConsumedRecord>, TransportError> {
        // `None` when the wait is too long to represent: then only records end it.
        let deadline = Instant::now().checked_add(max_wait);
        loop {
            // Registering interest before reading means an append racing with the read
            // below still wakes us; `notify_waiters` counts futures from their creation.
            let appended = self.log.appended().notified();
            let records = self.log.read(offset, self.max_records)?;
            if !records.is_empty() {
                return Ok(records);
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, appended).await.is_err() {
                        // One last look, so a record appended as the timer fired is not
                        // left for the next fetch.
                        return self.log.read(offset, self.max_records);
                    }
                }
                None => appended.await,
            }
        }
    }
}
