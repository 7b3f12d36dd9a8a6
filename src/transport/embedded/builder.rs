//! Tuning knobs of an [`EmbeddedBroker`].

use std::time::Duration;

use super::EmbeddedBroker;

/// Bytes each partition of an [`EmbeddedBroker`] keeps unless
/// [`EmbeddedBrokerBuilder::retention_bytes`] says otherwise: 4 MiB, about 10,000
/// small request-reply records. Sized for a development or test broker: a service
/// with a request and a reply topic of 8 partitions each holds at most 64 MiB, while a
/// reader may fall thousands of records behind before anything it has not read is
/// dropped.
pub const DEFAULT_RETENTION_BYTES: usize = 4 << 20;

/// Configures an [`EmbeddedBroker`] before it is built; get one from
/// [`EmbeddedBroker::builder`].
///
/// ```
/// use kafka_rpc::transport::embedded::EmbeddedBroker;
/// use std::time::Duration;
///
/// let broker = EmbeddedBroker::builder()
///     .retention_bytes(16 << 20)
///     .max_fetch_records(256)
///     .rebalance_timeout(Duration::from_secs(2))
///     .build();
/// # drop(broker);
/// ```
#[derive(Clone, Debug)]
pub struct EmbeddedBrokerBuilder {
    pub(crate) retention_bytes: usize,
    pub(crate) max_fetch_records: usize,
    pub(crate) rebalance_timeout: Duration,
}

impl Default for EmbeddedBrokerBuilder {
    fn default() -> Self {
        EmbeddedBrokerBuilder {
            retention_bytes: DEFAULT_RETENTION_BYTES,
            max_fetch_records: 1024,
            rebalance_timeout: Duration::from_secs(10),
        }
    }
}

impl EmbeddedBrokerBuilder {
    /// How many bytes of records each partition keeps (default
    /// [`DEFAULT_RETENTION_BYTES`]), like Kafka's `retention.bytes`. Older records are
    /// dropped and the log start offset moves past them, which bounds the broker's
    /// memory under sustained load: at most about partitions × this. A record counts
    /// as its key, value and headers plus roughly 150 bytes of bookkeeping, so a small
    /// request-reply record counts as 300–500 bytes. The newest record of a partition
    /// is always kept, whatever its size. Zero, which would drop every record as soon as
    /// the next arrives, makes creating a topic fail with
    /// [`TransportError::Config`](crate::transport::TransportError::Config).
    pub fn retention_bytes(mut self, bytes: usize) -> Self {
        self.retention_bytes = bytes;
        self
    }

    /// The most records one fetch returns (default 1024, at least 1).
    pub fn max_fetch_records(mut self, records: usize) -> Self {
        self.max_fetch_records = records.max(1);
        self
    }

    /// How long a rebalance waits for members to acknowledge a revocation before it
    /// expels them (default 10 s); an expelled member rejoins once it has let go. Zero,
    /// which would expel every member at its first revocation, makes joining a group
    /// fail with [`TransportError::Config`](crate::transport::TransportError::Config).
    pub fn rebalance_timeout(mut self, timeout: Duration) -> Self {
        self.rebalance_timeout = timeout;
        self
    }

    /// Builds a broker with no topics and no groups.
    pub fn build(self) -> EmbeddedBroker {
        EmbeddedBroker::from_builder(self)
    }
}
