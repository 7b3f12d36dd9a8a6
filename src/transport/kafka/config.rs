//! Settings of a [`KafkaTransport`](super::KafkaTransport).

use std::time::Duration;

pub use rskafka::client::partition::Compression;
pub use rskafka::client::{Credentials, SaslConfig};

/// How to reach and talk to a Kafka-protocol cluster. Built with
/// [`KafkaConfig::builder`]; every setting has a default tuned for request-reply
/// latency rather than bulk throughput.
#[derive(Clone)]
pub struct KafkaConfig {
    pub(crate) bootstrap: Vec<String>,
    pub(crate) client_id: String,
    pub(crate) compression: Compression,
    pub(crate) fetch_max_wait: Duration,
    pub(crate) fetch_max_bytes: i32,
    pub(crate) busy_linger: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) session_timeout: Duration,
    pub(crate) rebalance_timeout: Duration,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) metadata_max_age: Duration,
    pub(crate) group_instance_id: Option<String>,
    /// `None`: on where the broker supports it (Kafka's default since 3.0); `Some`: as
    /// the application asked, failing when the broker cannot.
    pub(crate) idempotent: Option<bool>,
    pub(crate) sasl: Option<SaslConfig>,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for KafkaConfig {
    // Hand-written so that SASL passwords never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("KafkaConfig");
        d.field("bootstrap", &self.bootstrap)
            .field("client_id", &self.client_id)
            .field("compression", &self.compression)
            .field("fetch_max_wait", &self.fetch_max_wait)
            .field("busy_linger", &self.busy_linger)
            .field("fetch_max_bytes", &self.fetch_max_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("session_timeout", &self.session_timeout)
            .field("rebalance_timeout", &self.rebalance_timeout)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("metadata_max_age", &self.metadata_max_age)
            .field("group_instance_id", &self.group_instance_id)
            .field("idempotent", &self.idempotent)
            .field("sasl", &self.sasl.as_ref().map(|_| "<set>"));
        #[cfg(feature = "tls")]
        d.field("tls", &self.tls.as_ref().map(|_| "<set>"));
        d.finish()
    }
}

impl KafkaConfig {
    /// Starts a configuration for the cluster reachable at `bootstrap`, a list of
    /// `host:port` addresses separated by commas (as Kafka tools take it).
    pub fn builder(bootstrap: impl AsRef<str>) -> KafkaConfigBuilder {
        let bootstrap = bootstrap
            .as_ref()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        KafkaConfigBuilder {
            config: KafkaConfig {
                bootstrap,
                client_id: "kafka-rpc".to_string(),
                compression: Compression::NoCompression,
                fetch_max_wait: Duration::from_millis(1),
                fetch_max_bytes: 4 * 1024 * 1024,
                busy_linger: DEFAULT_BUSY_LINGER,
                request_timeout: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(10),
                session_timeout: Duration::from_secs(10),
                rebalance_timeout: Duration::from_secs(30),
                heartbeat_interval: Duration::from_secs(1),
                metadata_max_age: Duration::from_secs(5 * 60),
                group_instance_id: None,
                idempotent: None,
                sasl: None,
                #[cfg(feature = "tls")]
                tls: None,
            },
        }
    }

    /// The bootstrap addresses, as given.
    pub fn bootstrap(&self) -> &[String] {
        &self.bootstrap
    }
}

impl KafkaConfig {
    /// Timings that cannot work, refused when the transport connects (as Kafka's
    /// consumer refuses a heartbeat interval not below its session timeout).
    pub(crate) fn check(&self) -> Result<(), crate::error::ConfigError> {
        use crate::error::ConfigError;
        if self.request_timeout.is_zero() {
            return Err(ConfigError::new("request_timeout", "zero would fail every broker request at once"));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::new("connect_timeout", "zero would fail every connection at once"));
        }
        // A member cannot hand its partitions over in no time: every rebalance would
        // expel it (Kafka's consumer refuses a `max.poll.interval.ms` below 1).
        if self.rebalance_timeout.is_zero() {
            return Err(ConfigError::new("rebalance_timeout", "zero would expel every member at its first rebalance"));
        }
        // Zero heartbeats in a hot loop against the coordinator.
        if self.heartbeat_interval.is_zero() {
            return Err(ConfigError::new("heartbeat_interval", "zero would send heartbeats without pause"));
        }
        // The coordinator expires a member silent for a session timeout: heartbeats must
        // come more often than that, or the member is expelled between two of them.
        if self.heartbeat_interval >= self.session_timeout {
            return Err(ConfigError::new(
                "heartbeat_interval",
                format!(
                    "{:?} is not below the session timeout ({:?}): the member would be expelled between heartbeats",
                    self.heartbeat_interval, self.session_timeout
                ),
            ));
        }
        Ok(())
    }
}

/// The default of [`KafkaConfigBuilder::busy_linger`].
const DEFAULT_BUSY_LINGER: Duration = Duration::from_millis(5);

/// Builds a [`KafkaConfig`].
#[derive(Debug, Clone)]
pub struct KafkaConfigBuilder {
    config: KafkaConfig,
}

impl KafkaConfigBuilder {
    /// Client id sent with every request, so broker logs and quotas can tell this
    /// application apart. Default `kafka-rpc`.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.config.client_id = id.into();
        self
    }

    /// Compression of produced batches. Default none: RPC payloads are small and
    /// compression costs latency.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.config.compression = compression;
        self
    }

    /// Longest time one fetch request may wait on the broker for records. Default 1 ms,
    /// because some brokers (tansu) hold every fetch for its full max-wait even when
    /// records are ready; against Apache Kafka, which answers as soon as data arrives,
    /// a longer wait (e.g. 100 ms) saves idle polling.
    pub fn fetch_max_wait(mut self, wait: Duration) -> Self {
        self.config.fetch_max_wait = wait;
        self
    }

    /// How long a busy partition waits to fill its next produce batch. Default 5 ms,
    /// the `linger.ms` of Kafka 4's Java client and of librdkafka.
    ///
    /// Unlike `linger.ms` it applies only under load: after a produce that carried more
    /// than one record of the partition. A partition sending one record at a time sends
    /// each at once, so a quiet round trip pays nothing. Under load it trades a few
    /// milliseconds for fewer, larger batches, which a broker's per-batch cost asks for:
    /// on tansu 0.6, 60 s at 2,000 in flight went from 37,900 req/s with none to 47,700
    /// with 5 ms and 55,000 with 10 ms, and loaded latency fell; at 16 in flight 5 ms
    /// added 2 ms to the median (docs/benchmarks.md). Zero turns it off.
    pub fn busy_linger(mut self, linger: Duration) -> Self {
        self.config.busy_linger = linger;
        self
    }

    /// Upper bound on the bytes one fetch asks for. Default 4 MiB.
    pub fn fetch_max_bytes(mut self, bytes: i32) -> Self {
        self.config.fetch_max_bytes = bytes.max(1);
        self
    }

    /// Bound on any single broker request including its retries; past it the call
    /// fails with a typed error instead of hanging. Default 30 s. Zero is refused at
    /// connect.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// Bound on opening one broker connection. Default 10 s. Zero is refused at connect.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Consumer-group session timeout: how long the coordinator keeps a silent
    /// member. Default 10 s.
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.config.session_timeout = timeout;
        self
    }

    /// Consumer-group rebalance timeout: how long the coordinator waits for members to
    /// rejoin, and so how long a member may take to finish revoked partitions.
    /// Default 30 s. Zero is refused at connect.
    pub fn rebalance_timeout(mut self, timeout: Duration) -> Self {
        self.config.rebalance_timeout = timeout;
        self
    }

    /// Interval between group heartbeats, which is also how quickly a member notices
    /// a rebalance. Default 1 s; keep it well below the session timeout. Zero, or a
    /// value not below the session timeout, is refused at connect
    /// ([`TransportError::Config`](crate::transport::TransportError::Config)).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.config.heartbeat_interval = interval;
        self
    }

    /// How often a group member looks up the partition counts of the topics it
    /// consumes, to rejoin (and so be assigned the new partitions) when one grows or is
    /// recreated: Kafka's `metadata.max.age.ms`. Default 5 minutes, as in Kafka.
    pub fn metadata_max_age(mut self, age: Duration) -> Self {
        self.config.metadata_max_age = age;
        self
    }

    /// Static group membership (Kafka's `group.instance.id`, KIP-345): a name for
    /// this process that stays the same across restarts, unique within each group it
    /// joins. A member that restarts under the same name takes its old place (and
    /// partitions) at once instead of waiting for the coordinator to expire the
    /// crashed member after the session timeout. Two live processes with one name
    /// fence each other: the broker refuses the older one, which then ends with
    /// [`GroupEvent::Failed`](crate::transport::GroupEvent::Failed). Default none
    /// (dynamic membership).
    pub fn group_instance_id(mut self, id: impl Into<String>) -> Self {
        self.config.group_instance_id = Some(id.into()).filter(|id| !id.is_empty());
        self
    }

    /// The idempotent producer (Kafka's `enable.idempotence`): the transport asks the
    /// broker for a producer id (InitProducerId) and numbers every partition's records,
    /// so when an acknowledgement is lost and the batch is sent again, the broker drops
    /// the copy it already has instead of appending it twice (and every request in it
    /// running twice).
    ///
    /// **On by default where the broker supports it**, as in Kafka's Java client since
    /// 3.0: when the broker refuses InitProducerId (too old, or no IDEMPOTENT_WRITE
    /// permission), the transport logs one warning and produces without producer ids.
    /// `idempotent_producer(true)` makes that refusal an error on every produce instead;
    /// `idempotent_producer(false)` never asks. Without it, a retried batch whose
    /// acknowledgement was lost is appended twice (see docs/guarantees.md).
    ///
    /// The producer id comes from InitProducerId version 3 (Kafka 2.5 and later; tansu
    /// 0.6 answers nothing older) without a transactional id, so each transport has
    /// an id of its own and producers do not fence each other. SASL mechanisms other
    /// than PLAIN produce through rskafka, which has no producer ids: there the default
    /// is off and `true` is refused at connect.
    pub fn idempotent_producer(mut self, on: bool) -> Self {
        self.config.idempotent = Some(on);
        self
    }

    /// SASL authentication. rskafka's connections (fetches, metadata, offsets) take
    /// every mechanism rskafka supports; our own produce and consumer-group
    /// connections speak PLAIN only. With another mechanism, produces fall back to
    /// rskafka (without TCP_NODELAY, so mid-sized batches are slower) and consumer
    /// groups fail to connect with a clear error.
    pub fn sasl(mut self, sasl: SaslConfig) -> Self {
        self.config.sasl = Some(sasl);
        self
    }

    /// TLS for every broker connection.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: std::sync::Arc<rustls::ClientConfig>) -> Self {
        self.config.tls = Some(tls);
        self
    }

    /// The finished configuration.
    pub fn build(self) -> KafkaConfig {
        self.config
    }
}
