//! Tuning knobs of an [`EmbeddedBroker`].

use std::time::Duration;

use super::EmbeddedBroker;

/// Configures an [`EmbeddedBroker`] before it is built; get one from
/// [`EmbeddedBroker::builder`].
///
/// ```
/// use kafka_rpc::transport::embedded::EmbeddedBroker;
/// use std::time::Duration;
///
/// let broker = EmbeddedBroker::builder()
///     .retention_records(10_000)
///     .max_fetch_records(256)
///     .rebalance_timeout(Duration::from_secs(2))
///     .build();
/// # drop(broker);
/// ```
#[derive(Clone, Debug)]
pub struct EmbeddedBrokerBuilder {
    pub(crate) retention_records: usize,
    pub(crate) max_fetch_records: usize,
    pub(crate) rebalance_timeout: Duration,
}

impl Default for EmbeddedBrokerBuilder {
    fn default() -> Self {
        EmbeddedBrokerBuilder {
            retention_records: 100_000,
            max_fetch_records: 1024,
            rebalance_timeout: Duration::from_secs(10),
        }
    }
}

impl EmbeddedBrokerBuilder {
    /// How many records each partition keeps (default 100 000, at least 1). Older
    /// records are dropped and the log start offset moves past them, which bounds
    /// memory under sustained load.
    pub fn retention_records(mut self, records: usize) -> Self {
        self.retention_records = records.max(1);
        self
    }

    /// The most records one fetch returns (default 1024, at least 1).
    pub fn max_fetch_records(mut self, records: usize) -> Self {
        self.max_fetch_records = records.max(1);
        self
    }

    /// How long a rebalance waits for members to acknowledge a revocation before it
    /// expels them (default 10 s).
    pub fn rebalance_timeout(mut self, timeout: Duration) -> Self {
        self.rebalance_timeout = timeout;
        self
    }

    /// Builds a broker with no topics and no groups.
    pub fn build(self) -> EmbeddedBroker {
        EmbeddedBroker::from_builder(self)
    }
}
