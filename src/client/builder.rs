//! Configuring a [`ReplyingClient`]: its settings, checked when it starts, and the start
//! itself (topics, reply listeners, the ordered produce path).

use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::in_flight::InFlight;
use super::reply_listener::ReplyCounters;
use super::{Inner, ReplyingClient};
use crate::codec::ContentType;
use crate::error::RpcError;
use crate::metrics::ClientMetrics;
use crate::producer::{BatchConfig, OrderedProducer};
use crate::tail::Tail;
use crate::transport::{within_start_timeout, OffsetReset, TopicPartition, Transport, TransportError};
use crate::wire::{Peer, ReplyHeaders};

/// What the client does when `max_in_flight` requests are already pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backpressure {
    /// Wait for a slot (callers wait in order).
    #[default]
    Wait,
    /// Fail at once with [`RpcError::Busy`], however many callers race for the last
    /// slot. A call given up on before it was sent holds its slot until its record
    /// leaves the partition's queue (at once, unless the partition is stalled).
    Fail,
}

/// Which reply partitions a client reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplyPartitions {
    /// One pinned partition, advertised in every request: the given one, or one derived
    /// from a random instance id when `None`.
    Pinned(Option<i32>),
    /// Every partition of the reply topic (for peers that ignore `kafka_replyPartition`).
    /// Requests still advertise one pinned partition.
    All,
}

/// Configures and starts a [`ReplyingClient`].
pub struct ReplyingClientBuilder {
    transport: Arc<dyn Transport>,
    request_topic: String,
    reply_topic: Option<String>,
    partitions: i32,
    reply_partitions: ReplyPartitions,
    timeout: Duration,
    max_in_flight: usize,
    max_queued: usize,
    backpressure: Backpressure,
    content_type: Option<ContentType>,
    peer: Peer,
    batch: BatchConfig,
}

impl ReplyingClientBuilder {
    /// A builder with every default.
    pub(super) fn new(transport: Arc<dyn Transport>, request_topic: String) -> Self {
        ReplyingClientBuilder {
            transport,
            request_topic,
            reply_topic: None,
            partitions: crate::defaults::PARTITIONS,
            reply_partitions: ReplyPartitions::Pinned(None),
            timeout: Duration::from_secs(5),
            max_in_flight: 10_000,
            max_queued: 100_000,
            backpressure: Backpressure::Wait,
            content_type: None,
            peer: Peer::Native,
            batch: BatchConfig::new(),
        }
    }

    /// Whose conventions the server on the request topic follows (default
    /// [`Peer::Native`]). It sets how the correlation id and reply partition are
    /// written, the codec (JSON for Spring and NestJS unless
    /// [`content_type`](Self::content_type) says otherwise), the default reply topic
    /// (`<pattern>.reply` for NestJS, whose request topic is the pattern) and how
    /// errors are read (a NestJS `RpcException` arrives as [`RpcError::Remote`] with
    /// its message).
    pub fn peer(mut self, peer: Peer) -> Self {
        self.peer = peer;
        self
    }

    /// Reply topic shared by clients; defaults to `<request topic>.replies`
    /// (`<request topic>.reply` for a NestJS peer).
    pub fn reply_topic(mut self, topic: impl Into<String>) -> Self {
        self.reply_topic = Some(topic.into());
        self
    }

    /// Partitions for the request and reply topics when the client has to create them
    /// (default [`defaults::PARTITIONS`](crate::defaults::PARTITIONS)): 1 to
    /// [`MAX_PARTITIONS`](crate::transport::MAX_PARTITIONS), else `start` fails with
    /// [`TransportError::TopicCreation`].
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Which reply partitions to read (default: one pinned at random).
    pub fn reply_partitions(mut self, reply_partitions: ReplyPartitions) -> Self {
        self.reply_partitions = reply_partitions;
        self
    }

    /// Default reply timeout (5 s, as Spring's `ReplyingKafkaTemplate`). A call fails
    /// with [`RpcError::Timeout`] at its deadline or up to a millisecond later (more
    /// only with over 10,000 calls pending: the client checks deadlines in one sweep).
    /// Zero, which would time every call out before it is sent, is refused at start
    /// ([`RpcError::Config`]); a per-call zero ([`RequestOptions::timeout`](super::RequestOptions::timeout)) is allowed.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Most requests sent and not yet answered at once (default 10,000). Further
    /// calls wait in their partition's queue, in call order. Through a broker the rate
    /// is about this bound over the loaded round trip: on tansu on two cores, 2,000 gave
    /// 38,000-48,000 req/s and 10,000 gave 84,000-108,000 (docs/benchmarks.md).
    /// `usize::MAX` means no bound (taken as the most slots a semaphore holds). Zero is
    /// refused at start ([`RpcError::Config`]).
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max.min(tokio::sync::Semaphore::MAX_PERMITS);
        self
    }

    /// Most calls waiting for an in-flight slot, not yet sent (default 100,000). Past
    /// it a call fails at once with [`RpcError::Busy`] in either backpressure mode, so
    /// an overloaded client never queues without limit. A call given up on (dropped,
    /// or timed out) before it was sent counts until its record leaves the queue.
    pub fn max_queued(mut self, max: usize) -> Self {
        self.max_queued = max;
        self
    }

    /// What to do when `max_in_flight` is reached (default: wait).
    pub fn backpressure(mut self, backpressure: Backpressure) -> Self {
        self.backpressure = backpressure;
        self
    }

    /// Payload codec of requests (default: the peer's, bincode for kafka-rpc); the
    /// server answers in kind.
    pub fn content_type(mut self, content_type: ContentType) -> Self {
        self.content_type = Some(content_type);
        self
    }

    /// How long a partition's produce path waits to fill a batch (default 0: batches
    /// form from whatever queues up while the previous produce is in flight). It must
    /// be below the client's [timeout](Self::timeout), else `start` fails with
    /// [`RpcError::Config`] (as Kafka's producer refuses a `delivery.timeout.ms` below
    /// `linger.ms`).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.batch.linger = linger;
        self
    }

    /// Most records per produce request (default 1,000; `usize::MAX` means no bound
    /// beyond what queued up). Zero is refused at start ([`RpcError::Config`]).
    pub fn max_batch(mut self, records: usize) -> Self {
        self.batch.max_records = records;
        self
    }

    /// Creates missing topics, positions the reply listener at the end of the reply
    /// partition, and returns a client ready to send: no reply can be missed because
    /// the listener's start offset is fixed before the first request exists. Each call
    /// it makes on the transport waits at most the transport's
    /// [start timeout](Transport::start_timeout), else `start` fails with
    /// [`TransportError::TimedOut`].
    pub async fn start(self) -> Result<ReplyingClient, RpcError> {
        if self.timeout.is_zero() {
            return Err(crate::error::ConfigError::new(
                "timeout",
                "zero would time every call out before it is sent; give a limit (Duration::MAX for none)",
            )
            .into());
        }
        // Kafka's producer refuses a `delivery.timeout.ms` below `linger.ms` for the same
        // reason: a call sent alone would time out before its request left.
        if self.batch.linger >= self.timeout {
            return Err(crate::error::ConfigError::new(
                "linger",
                format!("{:?} is not below the client timeout ({:?}): a call sent alone would time out unsent", self.batch.linger, self.timeout),
            )
            .into());
        }
        // No record fits a produce request of none; taking it as 1 (or as "no limit", as
        // 0 means elsewhere) would be a guess.
        if self.batch.max_records == 0 {
            return Err(crate::error::ConfigError::new("max_batch", "a produce request of zero records cannot send anything; give at least 1 (usize::MAX for no bound)").into());
        }
        // No call could ever be sent; taking it as 1 (or as "no limit") would be a guess.
        if self.max_in_flight == 0 {
            return Err(crate::error::ConfigError::new("max_in_flight", "no call could ever be sent; give at least 1 (usize::MAX for no bound)").into());
        }
        let transport = self.transport;
        let peer = self.peer;
        let content_type = self.content_type.unwrap_or_else(|| peer.default_content_type());
        let reply_topic = self.reply_topic.unwrap_or_else(|| match peer {
            Peer::Nest => format!("{}.reply", self.request_topic),
            Peer::Native | Peer::Spring => format!("{}.replies", self.request_topic),
        });
        // Every transport call of a start is bounded (`Transport::start_timeout`): a
        // transport without limits of its own would otherwise hang the caller's start-up.
        let request_partitions = within_start_timeout(
            &*transport,
            || format!("ensure_topic `{}`", self.request_topic),
            transport.ensure_topic(&self.request_topic, self.partitions),
        )
        .await?;
        let request_partitions = usable(&self.request_topic, request_partitions)?;
        let reply_count =
            within_start_timeout(&*transport, || format!("ensure_topic `{reply_topic}`"), transport.ensure_topic(&reply_topic, self.partitions))
                .await?;
        let reply_count = usable(&reply_topic, reply_count)?;

        let instance = uuid::Uuid::new_v4();
        let pinned = match self.reply_partitions {
            ReplyPartitions::Pinned(Some(p)) if !(0..reply_count).contains(&p) => {
                return Err(RpcError::Transport(TransportError::UnknownPartition { topic: reply_topic, partition: p }))
            }
            ReplyPartitions::Pinned(Some(p)) => p,
            _ => (instance.as_u128() % reply_count as u128) as i32,
        };
        let listened: Vec<i32> = match self.reply_partitions {
            ReplyPartitions::All => (0..reply_count).collect(),
            ReplyPartitions::Pinned(_) => vec![pinned],
        };

        let metrics = Arc::new(ClientMetrics::new(&self.request_topic));
        // Failing fast, a call is refused unless it can be sent at once: the map's own
        // bound is then `max_in_flight`, reserved atomically at registration. (Checking
        // the map's size first and registering after let racing callers all see room.)
        let max_pending = match self.backpressure {
            Backpressure::Fail => self.max_in_flight,
            _ => self.max_in_flight.saturating_add(self.max_queued),
        };
        let in_flight = Arc::new(InFlight::new(self.max_in_flight, max_pending).reporting_to(metrics.clone()));
        let counters = Arc::new(ReplyCounters::new(metrics.clone()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::with_capacity(listened.len() + 1);
        for partition in listened {
            let start = within_start_timeout(
                &*transport,
                || format!("latest_offset of `{reply_topic}` partition {partition}"),
                transport.latest_offset(&reply_topic, partition),
            )
            .await?;
            let reader =
                within_start_timeout(&*transport, || format!("reader on `{reply_topic}` partition {partition}"), transport.reader(&reply_topic, partition))
                    .await?;
            // After broker data loss everything in the reply log is newer than what
            // was read, so a reset goes to the earliest offset.
            let tail = Tail::new(
                transport.clone(),
                TopicPartition::new(reply_topic.clone(), partition),
                start,
                OffsetReset::Earliest,
                stop_rx.clone(),
            )
            .with_reader(reader)
            .count_errors_in(counters.fetch_errors.clone());
            tasks.push(tokio::spawn(super::reply_listener::run(tail, in_flight.clone(), counters.clone())));
        }

        let failed = in_flight.clone();
        let producer = OrderedProducer::new(
            transport.clone(),
            self.batch,
            Arc::new(move |outcome: Result<i64, TransportError>, ids: Vec<u128>| {
                if let Err(e) = outcome {
                    for id in ids {
                        failed.fail(id, e.clone());
                    }
                }
            }),
            Some(in_flight.clone() as Arc<dyn crate::producer::Gate<u128>>),
        );

        let request_partitions = Arc::new(std::sync::atomic::AtomicI32::new(request_partitions));
        tasks.push(tokio::spawn(super::partition_count::refresh(
            transport.clone(),
            self.request_topic.clone(),
            request_partitions.clone(),
            stop_rx.clone(),
        )));
        // Spawned last: nothing after it can fail and leave it sweeping a map that
        // nobody closes.
        tasks.push(tokio::spawn(super::expiry::run(in_flight.clone())));
        tracing::debug!(%instance, request_topic = %self.request_topic, %reply_topic, pinned, "client started");
        Ok(ReplyingClient {
            inner: Arc::new(Inner {
                request_topic: self.request_topic,
                request_partitions,
                reply_headers: ReplyHeaders::new(peer, &reply_topic, Some(pinned), content_type),
                reply_topic,
                reply_partition: pinned,
                timeout: self.timeout,
                content_type,
                max_in_flight: self.max_in_flight,
                round_robin: AtomicU32::new(0),
                in_flight,
                counters,
                metrics,
                producer,
                stop: stop_tx,
                tasks: std::sync::Mutex::new(tasks),
            }),
        })
    }
}

/// `partitions`, the count a transport reported for `topic`, if a topic with that many
/// can carry anything: a broker may list a topic it is still creating with none.
fn usable(topic: &str, partitions: i32) -> Result<i32, RpcError> {
    if partitions > 0 {
        return Ok(partitions);
    }
    Err(RpcError::Transport(TransportError::TopicCreation { topic: topic.to_string(), reason: format!("it has {partitions} partitions") }))
}
