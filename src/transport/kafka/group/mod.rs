//! Consumer groups over the classic (eager) group protocol: FindCoordinator,
//! JoinGroup, SyncGroup with the `range` assignor, Heartbeat, OffsetFetch,
//! OffsetCommit and LeaveGroup, spoken with `kafka-protocol` messages over a plain
//! tokio connection because rskafka has no group support.

mod assignor;
mod membership;

pub(crate) use assignor::{decode_assignment, decode_subscription};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kafka_protocol::messages::offset_commit_request::{OffsetCommitRequestPartition, OffsetCommitRequestTopic};
use kafka_protocol::messages::{FindCoordinatorRequest, GroupId, OffsetCommitRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::{mpsc, watch};

use super::connection::{CallError, Connection};
use super::KafkaTransport;
use crate::transport::{GroupHandle, GroupMembership, OffsetReset, TopicPartition, TransportError};

/// Versions of the group APIs this client speaks. Chosen non-flexible, pre-KIP-848
/// versions that Kafka 2.3 through 4.x, Redpanda and tansu all accept.
mod versions {
    pub(super) const FIND_COORDINATOR: i16 = 3;
    pub(super) const JOIN_GROUP: i16 = 5;
    pub(super) const SYNC_GROUP: i16 = 3;
    pub(super) const HEARTBEAT: i16 = 3;
    pub(super) const LEAVE_GROUP: i16 = 3;
    pub(super) const OFFSET_COMMIT: i16 = 7;
    pub(super) const OFFSET_FETCH: i16 = 5;
}

/// Kafka error codes the membership loop reacts to.
mod codes {
    pub(super) const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub(super) const NOT_COORDINATOR: i16 = 16;
    pub(super) const ILLEGAL_GENERATION: i16 = 22;
    pub(super) const UNKNOWN_MEMBER_ID: i16 = 25;
    pub(super) const REBALANCE_IN_PROGRESS: i16 = 27;
    pub(super) const MEMBER_ID_REQUIRED: i16 = 79;
    pub(super) const FENCED_INSTANCE_ID: i16 = 82;

    /// Errors after which retrying sends the same refused request or credentials:
    /// configuration, authorization and protocol mismatches. Every other code is
    /// retried with backoff, so a broker hiccup never ends a membership.
    pub(super) fn is_fatal(code: i16) -> bool {
        matches!(
            code,
            23 // INCONSISTENT_GROUP_PROTOCOL
            | 24 // INVALID_GROUP_ID
            | 26 // INVALID_SESSION_TIMEOUT
            | 29 // TOPIC_AUTHORIZATION_FAILED
            | 30 // GROUP_AUTHORIZATION_FAILED
            | 31 // CLUSTER_AUTHORIZATION_FAILED
            | 33 // UNSUPPORTED_SASL_MECHANISM
            | 34 // ILLEGAL_SASL_STATE
            | 35 // UNSUPPORTED_VERSION
            | 42 // INVALID_REQUEST
            | 58 // SASL_AUTHENTICATION_FAILED
            | 81 // GROUP_MAX_SIZE_REACHED
            | FENCED_INSTANCE_ID // another instance took this group.instance.id
        )
    }
}

impl CallError {
    fn code(&self) -> Option<i16> {
        match self {
            CallError::Kafka(c, _) => Some(*c),
            _ => None,
        }
    }

    fn into_transport(self, group: &str) -> TransportError {
        match self {
            e @ CallError::Io(_) => TransportError::connection(format!("consumer group `{group}`")).caused_by(e),
            e @ CallError::Kafka(..) => TransportError::group(group, "the broker refused a request").caused_by(e),
            e @ CallError::Protocol(_) => TransportError::group(group, "unreadable exchange with the broker").caused_by(e),
            e @ CallError::Unsupported(_) => TransportError::group(group, "not supported by the broker").caused_by(e),
        }
    }
}

fn kafka_result(code: i16, what: &str) -> Result<(), CallError> {
    if code == 0 {
        Ok(())
    } else {
        Err(CallError::Kafka(code, what.to_string()))
    }
}

/// The member's identity in the group, shared by the membership task (which
/// changes it) and the handle (whose commits must carry it).
#[derive(Debug, Clone)]
struct MemberState {
    member_id: String,
    generation: i32,
    coordinator: Option<String>,
    /// Partitions this member may commit: assigned in the current generation and
    /// not yet released after a revocation. A commit for any other partition is
    /// late (its worker outlived the revocation) and is refused locally: sent, it
    /// would carry the current generation and the broker would accept it,
    /// overwriting the new owner's progress.
    owned: BTreeSet<TopicPartition>,
}

struct Shared {
    transport: KafkaTransport,
    group: String,
    state: Mutex<MemberState>,
    /// Set to ask the membership task to leave the group and stop.
    stop: watch::Sender<bool>,
    /// Set by the membership task once it has left the group.
    finished: watch::Sender<bool>,
    /// Why the membership ended, when it ended on a fatal error; `leave` reports it.
    failure: Mutex<Option<TransportError>>,
    /// Coordinator connection for commits, apart from the task's so that a commit
    /// never waits behind a JoinGroup the broker is holding.
    commit_conn: tokio::sync::Mutex<Option<Connection>>,
}

impl Shared {
    fn state(&self) -> MemberState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut MemberState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A connection to the group's coordinator, found through the bootstrap brokers
    /// unless already known.
    async fn connect_coordinator(&self) -> Result<Connection, CallError> {
        let config = self.transport.config();
        if let Some(addr) = self.state().coordinator {
            match Connection::connect(&addr, config).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::debug!(group = %self.group, %addr, error = %e, "coordinator unreachable; looking it up again");
                    self.update(|s| s.coordinator = None);
                }
            }
        }
        let mut last = CallError::Io("no bootstrap servers configured".into());
        for boot in config.bootstrap() {
            let mut conn = match Connection::connect(boot, config).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let req = FindCoordinatorRequest::default()
                .with_key(StrBytes::from_string(self.group.clone()))
                .with_key_type(0);
            let resp = match conn.send(&req, versions::FIND_COORDINATOR, std::time::Duration::ZERO).await {
                Ok(r) => r,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            kafka_result(resp.error_code, "find coordinator")?;
            let addr = format!("{}:{}", resp.host.as_str(), resp.port);
            // Often the bootstrap broker is the coordinator: keep its connection.
            let conn = if conn.addr() == addr { conn } else { Connection::connect(&addr, config).await? };
            self.update(|s| s.coordinator = Some(addr));
            return Ok(conn);
        }
        Err(last)
    }

    async fn commit_once(&self, topics: &[OffsetCommitRequestTopic]) -> Result<(), CommitError> {
        let mut slot = self.commit_conn.lock().await;
        let mut conn = match slot.take() {
            Some(c) => c,
            None => self.connect_coordinator().await?,
        };
        // Checked here, after any wait for the connection, against the same state
        // whose generation the request carries.
        let st = self.state();
        let late = topics.iter().flat_map(|t| {
            t.partitions.iter().map(|p| TopicPartition::new(t.name.0.as_str(), p.partition_index))
        });
        for tp in late {
            if !st.owned.contains(&tp) {
                *slot = Some(conn);
                return Err(CommitError::NotAssigned(tp, st.generation));
            }
        }
        let req = OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(self.group.clone())))
            .with_generation_id_or_member_epoch(st.generation)
            .with_member_id(StrBytes::from_string(st.member_id))
            .with_group_instance_id(self.transport.config().group_instance_id.clone().map(StrBytes::from_string))
            .with_retention_time_ms(-1)
            .with_topics(topics.to_vec());
        let resp = conn.send(&req, versions::OFFSET_COMMIT, std::time::Duration::ZERO).await?;
        let first_error = resp
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(move |p| (t, p)))
            .find(|(_, p)| p.error_code != 0)
            .map(|(t, p)| (p.error_code, format!("commit {}-{}", t.name.0.as_str(), p.partition_index)));
        match first_error {
            Some((code, what)) => {
                if code != codes::NOT_COORDINATOR && code != codes::COORDINATOR_NOT_AVAILABLE {
                    *slot = Some(conn);
                } else {
                    self.update(|s| s.coordinator = None);
                }
                Err(CallError::Kafka(code, what).into())
            }
            None => {
                *slot = Some(conn);
                Ok(())
            }
        }
    }
}

/// Why a commit failed.
enum CommitError {
    /// The partition is not this member's in the current generation (shown).
    NotAssigned(TopicPartition, i32),
    Group(CallError),
}

impl From<CallError> for CommitError {
    fn from(e: CallError) -> Self {
        CommitError::Group(e)
    }
}

/// The [`GroupHandle`] of a Kafka group member.
struct KafkaGroupHandle {
    shared: Arc<Shared>,
}

#[async_trait]
impl GroupHandle for KafkaGroupHandle {
    async fn commit(&self, offsets: &[(TopicPartition, i64)]) -> Result<(), TransportError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let mut by_topic: BTreeMap<&str, Vec<OffsetCommitRequestPartition>> = BTreeMap::new();
        for (tp, offset) in offsets {
            by_topic.entry(tp.topic.as_str()).or_default().push(
                OffsetCommitRequestPartition::default()
                    .with_partition_index(tp.partition)
                    .with_committed_offset(*offset)
                    .with_committed_leader_epoch(-1),
            );
        }
        let topics: Vec<_> = by_topic
            .into_iter()
            .map(|(t, parts)| {
                OffsetCommitRequestTopic::default()
                    .with_name(TopicName(StrBytes::from_string(t.to_string())))
                    .with_partitions(parts)
            })
            .collect();
        // One retry: a moved coordinator or a dropped connection is usually fixed by
        // reconnecting, and a commit lost at a rebalance costs duplicate processing.
        let mut result = self.shared.commit_once(&topics).await;
        if let Err(CommitError::Group(e)) = &result {
            let retry = matches!(e, CallError::Io(_))
                || matches!(e.code(), Some(codes::NOT_COORDINATOR | codes::COORDINATOR_NOT_AVAILABLE));
            if retry {
                result = self.shared.commit_once(&topics).await;
            }
        }
        result.map_err(|e| match e {
            CommitError::NotAssigned(tp, generation) => {
                TransportError::NotAssigned { group: self.shared.group.clone(), tp, generation }
            }
            CommitError::Group(e) => e.into_transport(&self.shared.group),
        })
    }

    async fn leave(&self) -> Result<(), TransportError> {
        self.shared.stop.send_replace(true);
        let mut finished = self.shared.finished.subscribe();
        let limit = self.shared.transport.config().request_timeout.saturating_mul(2);
        let waited = tokio::time::timeout(limit, finished.wait_for(|f| *f)).await.map(|_| ());
        match waited {
            Ok(()) => match self.shared.failure.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                Some(failure) => Err(failure),
                None => Ok(()),
            },
            Err(_) => Err(TransportError::group(self.shared.group.clone(), format!("leaving did not finish within {limit:?}"))),
        }
    }
}

/// Joins `group_id` as a member subscribed to `topics`. Returns once the coordinator
/// is reachable; assignments arrive as events.
pub(crate) async fn join(
    transport: KafkaTransport,
    group_id: &str,
    topics: &[String],
    reset: OffsetReset,
) -> Result<GroupMembership, TransportError> {
    if group_id.is_empty() {
        return Err(TransportError::group("", "empty group id"));
    }
    let (stop, _) = watch::channel(false);
    let (finished, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        transport,
        group: group_id.to_string(),
        state: Mutex::new(MemberState {
            member_id: String::new(),
            generation: -1,
            coordinator: None,
            owned: BTreeSet::new(),
        }),
        stop,
        finished,
        failure: Mutex::new(None),
        commit_conn: tokio::sync::Mutex::new(None),
    });
    let conn = shared.connect_coordinator().await.map_err(|e| e.into_transport(group_id))?;
    let (tx, rx) = mpsc::channel(16);
    let member = membership::Member::new(Arc::clone(&shared), topics.to_vec(), reset, tx, conn);
    tokio::spawn(member.run());
    Ok(GroupMembership { events: rx, handle: Arc::new(KafkaGroupHandle { shared }) })
}
