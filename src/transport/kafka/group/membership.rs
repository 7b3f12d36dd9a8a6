//! The member's life: join, sync, resume offsets, heartbeat, and on any rebalance
//! or failure revoke everything and join again (eager protocol).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    GroupId, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, OffsetFetchRequest, SyncGroupRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::assignor::{self, RANGE};
use crate::backoff::Backoff;
use crate::transport::kafka::connection::Connection;
use super::{codes, kafka_result, versions, CallError, Shared};
use crate::transport::{AssignedPartition, GroupEvent, OffsetReset, TopicPartition};

/// Why the membership ended.
#[derive(Debug)]
enum Stop {
    /// [`GroupHandle::leave`](crate::transport::GroupHandle::leave) was called.
    Requested,
    /// Nobody listens to the events any more.
    EventsDropped,
    /// The broker refused the membership for a reason retrying will not fix.
    Fatal(CallError),
}

/// The state the membership task owns.
pub(super) struct Member {
    shared: Arc<Shared>,
    topics: Vec<String>,
    reset: OffsetReset,
    events: mpsc::Sender<GroupEvent>,
    stop: watch::Receiver<bool>,
    conn: Option<Connection>,
    owned: Vec<TopicPartition>,
    /// When the last heartbeat the coordinator accepted was sent: the coordinator
    /// expires the member a session timeout after it.
    last_ok: tokio::time::Instant,
    /// Partition counts of the consumed topics as of the last join.
    seen_counts: Option<std::collections::HashMap<String, i32>>,
}

impl Member {
    pub(super) fn new(
        shared: Arc<Shared>,
        topics: Vec<String>,
        reset: OffsetReset,
        events: mpsc::Sender<GroupEvent>,
        conn: Connection,
    ) -> Self {
        let stop = shared.stop.subscribe();
        Member { shared, topics, reset, events, stop, conn: Some(conn), owned: Vec::new(), last_ok: tokio::time::Instant::now(), seen_counts: None }
    }

    /// Runs until asked to leave, the events receiver is dropped, or a fatal error;
    /// then leaves the group so the partitions move at once rather than after the
    /// session timeout.
    pub(super) async fn run(mut self) {
        let why = self.run_loop().await;
        match why {
            Stop::Fatal(e) => {
                tracing::error!(group = %self.shared.group, error = %e, "consumer group membership ended");
                let failure = e.into_transport(&self.shared.group);
                *self.shared.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(failure.clone());
                // Bounded: an application that stopped reading events must not keep
                // the member from leaving.
                let limit = self.shared.transport.config().request_timeout;
                let _ = tokio::time::timeout(limit, self.events.send(GroupEvent::Failed(failure))).await;
            }
            other => tracing::debug!(group = %self.shared.group, reason = ?other, "leaving consumer group"),
        }
        self.shared.update(|s| s.owned.clear());
        // Whatever was in flight on this connection is abandoned; leave on a fresh one.
        self.conn = None;
        if let Err(e) = self.leave_group().await {
            tracing::warn!(group = %self.shared.group, error = %e, "LeaveGroup failed; the coordinator will expire the member");
        }
        self.shared.finished.send_replace(true);
    }

    async fn run_loop(&mut self) -> Stop {
        let mut stop = self.stop.clone();
        let events = self.events.clone();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let joined = match or_stop(&mut stop, &events, self.join_and_sync()).await {
                Ok(r) => r,
                Err(s) => return s,
            };
            let assigned = match joined {
                Ok(a) => a,
                Err(e) => {
                    if let Err(s) = self.recover(&e) {
                        return s;
                    }
                    if needs_pause(&e) {
                        let pause = backoff.next_pause();
                        if let Err(s) = or_stop(&mut stop, &events, tokio::time::sleep(pause)).await {
                            return s;
                        }
                    }
                    continue;
                }
            };
            backoff.reset();
            self.owned = assigned.iter().map(|a| a.tp.clone()).collect();
            let owned = self.owned.iter().cloned().collect();
            self.shared.update(|s| s.owned = owned);
            match or_stop(&mut stop, &events, events.send(GroupEvent::Assigned(assigned))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(Stop::EventsDropped) => return Stop::EventsDropped,
                Err(s) => return s,
            }
            let why = match or_stop(&mut stop, &events, self.heartbeat_until_error()).await {
                Ok(e) => e,
                Err(s) => return s,
            };
            tracing::debug!(group = %self.shared.group, reason = %why, "rejoining consumer group");
            if is_lost(&why) {
                // The coordinator no longer counts this member (or this generation):
                // the partitions may be another member's already. Workers still stop,
                // but nothing is committed for them.
                self.shared.update(|s| s.owned.clear());
            }
            if let Err(s) = self.revoke_all(&mut stop).await {
                return s;
            }
            if let Err(s) = self.recover(&why) {
                return s;
            }
        }
    }

    /// Adjusts the member after a failed step so the next join can succeed, or
    /// gives up when retrying cannot help.
    fn recover(&mut self, e: &CallError) -> Result<(), Stop> {
        match e {
            CallError::Io(_) => {
                self.conn = None;
                Ok(())
            }
            CallError::Kafka(code, _) => match *code {
                codes::NOT_COORDINATOR | codes::COORDINATOR_NOT_AVAILABLE => {
                    self.conn = None;
                    self.shared.update(|s| s.coordinator = None);
                    Ok(())
                }
                codes::UNKNOWN_MEMBER_ID => {
                    self.shared.update(|s| {
                        s.member_id.clear();
                        s.generation = -1;
                    });
                    Ok(())
                }
                code if codes::is_fatal(code) => Err(Stop::Fatal(e.clone())),
                // Retriable, or unknown to this client: rejoin (after a backoff pause
                // where `needs_pause` says so) rather than stop serving.
                _ => Ok(()),
            },
            CallError::Protocol(_) => {
                self.conn = None;
                Ok(())
            }
            CallError::Unsupported(_) => Err(Stop::Fatal(e.clone())),
        }
    }

    /// Hands back every owned partition and waits (bounded by the rebalance timeout)
    /// until the application says it has stopped them.
    async fn revoke_all(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), Stop> {
        if self.owned.is_empty() {
            return Ok(());
        }
        let partitions = std::mem::take(&mut self.owned);
        let (done, finished) = oneshot::channel();
        let events = self.events.clone();
        match or_stop(stop, &events, events.send(GroupEvent::Revoked { partitions, done })).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Stop::EventsDropped),
            Err(s) => return Err(s),
        }
        // Heartbeats go on while the application finishes: without them the
        // coordinator expires the member after the session timeout and hands its
        // partitions to another member while its handlers still run.
        let config = self.shared.transport.config().clone();
        let deadline = crate::clock::instant_after(tokio::time::Instant::now(), config.rebalance_timeout);
        let mut finished = finished;
        let released = loop {
            let tick = tokio::time::sleep_until(crate::clock::instant_after(tokio::time::Instant::now(), config.heartbeat_interval).min(deadline));
            let waited = or_stop(stop, &events, async {
                tokio::select! {
                    _ = &mut finished => true,
                    _ = tick => false,
                }
            })
            .await;
            match waited {
                Ok(true) => break true,
                Ok(false) if tokio::time::Instant::now() >= deadline => break false,
                Ok(false) => {
                    // REBALANCE_IN_PROGRESS is the expected answer; any answer keeps
                    // the session alive, and failures are for the rejoin to handle.
                    if let Err(e) = self.heartbeat().await {
                        if is_lost(&e) {
                            self.shared.update(|s| s.owned.clear());
                        }
                        tracing::debug!(group = %self.shared.group, error = %e, "heartbeat during revocation failed");
                    }
                }
                Err(s) => {
                    self.shared.update(|s| s.owned.clear());
                    return Err(s);
                }
            }
        };
        // From here on a commit for these partitions is late.
        self.shared.update(|s| s.owned.clear());
        if !released {
            tracing::warn!(
                group = %self.shared.group, limit = ?config.rebalance_timeout,
                "revoked partitions not released in time; rejoining anyway"
            );
        }
        Ok(())
    }

    async fn conn(&mut self) -> Result<&mut Connection, CallError> {
        if self.conn.is_none() {
            self.conn = Some(self.shared.connect_coordinator().await?);
        }
        self.conn.as_mut().ok_or_else(|| CallError::Io("no coordinator connection".into()))
    }

    /// Sends on the coordinator connection, dropping it if the exchange failed (its
    /// stream position is then unknown).
    async fn call<R: crate::transport::kafka::connection::Call>(
        &mut self,
        req: &R,
        version: i16,
        extra: Duration,
    ) -> Result<R::Response, CallError> {
        let conn = self.conn().await?;
        let r = conn.send(req, version, extra).await;
        if matches!(r, Err(CallError::Io(_) | CallError::Protocol(_) | CallError::Unsupported(_))) {
            self.conn = None;
        }
        r
    }

    /// The static member id (`group.instance.id`), when configured.
    fn instance_id(&self) -> Option<StrBytes> {
        self.shared.transport.config().group_instance_id.clone().map(StrBytes::from_string)
    }

    fn group_id(&self) -> GroupId {
        GroupId(StrBytes::from_string(self.shared.group.clone()))
    }

    async fn join_and_sync(&mut self) -> Result<Vec<AssignedPartition>, CallError> {
        let config = self.shared.transport.config().clone();
        // The counts this join is made with: the next look compares with them, and the
        // subscription carries them (a restarted static member joins as it left).
        self.seen_counts = self.shared.transport.partition_counts(&self.topics).await.ok();
        let metadata = assignor::encode_subscription(&self.topics, self.seen_counts.as_ref())?;
        let mut member_id = self.shared.state().member_id;
        let mut attempts = 0;
        let joined = loop {
            let req = JoinGroupRequest::default()
                .with_group_id(self.group_id())
                .with_session_timeout_ms(millis(config.session_timeout))
                .with_rebalance_timeout_ms(millis(config.rebalance_timeout))
                .with_member_id(StrBytes::from_string(member_id.clone()))
                .with_group_instance_id(self.instance_id())
                .with_protocol_type(StrBytes::from_static_str("consumer"))
                .with_protocols(vec![JoinGroupRequestProtocol::default()
                    .with_name(StrBytes::from_static_str(RANGE))
                    .with_metadata(metadata.clone())]);
            // The coordinator holds JoinGroup until every member has rejoined, up to
            // the rebalance timeout.
            let resp = self.call(&req, versions::JOIN_GROUP, config.rebalance_timeout).await?;
            attempts += 1;
            if resp.error_code == codes::MEMBER_ID_REQUIRED && attempts < 3 {
                // The broker names us and expects the same join again with that name.
                member_id = resp.member_id.to_string();
                self.shared.update(|s| s.member_id = member_id.clone());
                continue;
            }
            kafka_result(resp.error_code, "join group")?;
            break resp;
        };
        let member_id = joined.member_id.to_string();
        let generation = joined.generation_id;
        self.shared.update(|s| {
            s.member_id = member_id.clone();
            s.generation = generation;
        });
        let assignments = if joined.leader.as_str() == member_id {
            self.assign(&joined.members).await?
        } else {
            Vec::new()
        };
        let sync = SyncGroupRequest::default()
            .with_group_id(self.group_id())
            .with_generation_id(generation)
            .with_member_id(StrBytes::from_string(member_id))
            .with_group_instance_id(self.instance_id())
            .with_assignments(assignments);
        let sync_sent = tokio::time::Instant::now();
        let synced = self.call(&sync, versions::SYNC_GROUP, config.rebalance_timeout).await?;
        kafka_result(synced.error_code, "sync group")?;
        // The coordinator's session clock restarts with this exchange at the latest.
        self.last_ok = sync_sent;
        let partitions = assignor::decode_assignment(synced.assignment)?;
        tracing::debug!(group = %self.shared.group, generation, ?partitions, "assigned");
        self.resume_offsets(partitions).await
    }

    /// As leader: the range assignment for every member, encoded for SyncGroup.
    async fn assign(&mut self, members: &[JoinGroupResponseMember]) -> Result<Vec<SyncGroupRequestAssignment>, CallError> {
        let mut subscriptions = BTreeMap::new();
        for m in members {
            // A member whose subscription cannot be read (a foreign or hostile client)
            // is assigned nothing: failing here would take the whole group down.
            let topics = match assignor::decode_subscription(m.metadata.clone()) {
                Ok(topics) => topics,
                Err(e) => {
                    tracing::warn!(
                        group = %self.shared.group, member = %m.member_id.as_str().escape_debug(), error = %e,
                        "unreadable subscription; assigning that member nothing"
                    );
                    Vec::new()
                }
            };
            subscriptions.insert(m.member_id.to_string(), topics);
        }
        let mut topics: Vec<String> = subscriptions.values().flatten().cloned().collect();
        topics.sort();
        topics.dedup();
        let counts = self
            .shared
            .transport
            .partition_counts(&topics)
            .await
            .map_err(|e| CallError::Io(format!("metadata for assignment: {e}")))?;
        let counts: BTreeMap<String, i32> = counts.into_iter().collect();
        let plan = assignor::range_assign(&subscriptions, &counts);
        plan.into_iter()
            .map(|(member, parts)| {
                Ok(SyncGroupRequestAssignment::default()
                    .with_member_id(StrBytes::from_string(member))
                    .with_assignment(assignor::encode_assignment(&parts)?))
            })
            .collect()
    }

    /// The offset to resume each partition from: the committed one, else the reset
    /// policy's.
    async fn resume_offsets(&mut self, partitions: Vec<(String, i32)>) -> Result<Vec<AssignedPartition>, CallError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for (t, p) in &partitions {
            by_topic.entry(t.clone()).or_default().push(*p);
        }
        let req = OffsetFetchRequest::default().with_group_id(self.group_id()).with_topics(Some(
            by_topic
                .into_iter()
                .map(|(t, ps)| {
                    OffsetFetchRequestTopic::default()
                        .with_name(TopicName(StrBytes::from_string(t)))
                        .with_partition_indexes(ps)
                })
                .collect(),
        ));
        let resp = self.call(&req, versions::OFFSET_FETCH, Duration::ZERO).await?;
        kafka_result(resp.error_code, "fetch committed offsets")?;
        let mut committed: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for t in resp.topics {
            for p in t.partitions {
                if p.error_code != 0 && p.error_code != 3 {
                    return Err(CallError::Kafka(
                        p.error_code,
                        format!("fetch committed offset of {}-{}", t.name.0.as_str(), p.partition_index),
                    ));
                }
                if p.error_code == 0 && p.committed_offset >= 0 {
                    committed.insert((t.name.0.to_string(), p.partition_index), p.committed_offset);
                }
            }
        }
        let mut out = Vec::with_capacity(partitions.len());
        for (topic, partition) in partitions {
            let offset = match committed.get(&(topic.clone(), partition)) {
                Some(o) => *o,
                None => self
                    .shared
                    .transport
                    .reset_offset(&topic, partition, self.reset)
                    .await
                    .map_err(|e| CallError::Io(format!("reset offset of {topic}-{partition}: {e}")))?,
            };
            out.push(AssignedPartition { tp: TopicPartition::new(topic, partition), offset });
        }
        Ok(out)
    }

    /// Heartbeats until the coordinator reports a rebalance or anything fails; the
    /// error says why.
    async fn heartbeat_until_error(&mut self) -> CallError {
        let config = self.shared.transport.config();
        let (interval, max_age) = (config.heartbeat_interval, config.metadata_max_age);
        let mut next_look = crate::clock::instant_after(tokio::time::Instant::now(), max_age);
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = self.heartbeat().await {
                return e;
            }
            if tokio::time::Instant::now() >= next_look {
                next_look = crate::clock::instant_after(tokio::time::Instant::now(), max_age);
                if let Some(why) = self.partitions_changed().await {
                    return why;
                }
            }
        }
    }

    /// Why to rejoin, if a consumed topic's partition count is no longer the one seen
    /// at the last join (it grew, or was deleted or recreated): the leader then
    /// assigns what is there now, as a Java consumer's leader does once its metadata
    /// shows the change. A failed look-up changes nothing.
    async fn partitions_changed(&mut self) -> Option<CallError> {
        let now = self.shared.transport.partition_counts(&self.topics).await.ok()?;
        if self.seen_counts.as_ref().is_some_and(|seen| *seen == now) {
            return None;
        }
        // Unknown at the join (its look-up failed): nothing to compare with yet.
        let changed = self.seen_counts.is_some();
        self.seen_counts = Some(now);
        changed.then(|| CallError::Kafka(codes::REBALANCE_IN_PROGRESS, "the partitions of a consumed topic changed".into()))
    }

    /// One heartbeat with the current identity, given up a session timeout after the
    /// last one the coordinator accepted: by then it has expired this member (and may
    /// have given its partitions away), whatever a hung connection still promises.
    async fn heartbeat(&mut self) -> Result<(), CallError> {
        let session = self.shared.transport.config().session_timeout;
        let expiry = crate::clock::instant_after(self.last_ok, session);
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout_at(expiry, self.heartbeat_once()).await {
            Ok(r) => {
                // An answer that keeps the session: accepted, or a rebalance to join.
                if matches!(&r, Ok(()) | Err(CallError::Kafka(codes::REBALANCE_IN_PROGRESS, _))) {
                    self.last_ok = sent;
                }
                r
            }
            Err(_) => {
                // No answer within the session: the coordinator has expired us.
                self.conn = None;
                Err(CallError::Kafka(codes::UNKNOWN_MEMBER_ID, "no heartbeat answered within the session timeout".into()))
            }
        }
    }

    /// The Heartbeat exchange itself.
    async fn heartbeat_once(&mut self) -> Result<(), CallError> {
        let st = self.shared.state();
        let req = HeartbeatRequest::default()
            .with_group_id(self.group_id())
            .with_generation_id(st.generation)
            .with_member_id(StrBytes::from_string(st.member_id))
            .with_group_instance_id(self.instance_id());
        let r = self.call(&req, versions::HEARTBEAT, Duration::ZERO).await?;
        kafka_result(r.error_code, "heartbeat")
    }

    async fn leave_group(&mut self) -> Result<(), CallError> {
        let st = self.shared.state();
        if st.member_id.is_empty() {
            return Ok(());
        }
        let req = LeaveGroupRequest::default()
            .with_group_id(self.group_id())
            .with_members(vec![MemberIdentity::default()
                .with_member_id(StrBytes::from_string(st.member_id))
                .with_group_instance_id(self.instance_id())]);
        let resp = self.call(&req, versions::LEAVE_GROUP, Duration::ZERO).await;
        self.shared.update(|s| {
            s.member_id.clear();
            s.generation = -1;
        });
        let resp = resp?;
        kafka_result(resp.error_code, "leave group")?;
        for m in resp.members {
            // Already gone is what we wanted.
            if m.error_code != 0 && m.error_code != codes::UNKNOWN_MEMBER_ID {
                return Err(CallError::Kafka(m.error_code, "leave group".into()));
            }
        }
        Ok(())
    }
}

/// Heartbeat errors after which the member's partitions may already be another's.
fn is_lost(e: &CallError) -> bool {
    matches!(e.code(), Some(codes::UNKNOWN_MEMBER_ID | codes::ILLEGAL_GENERATION | codes::FENCED_INSTANCE_ID))
}

/// Errors after which rejoining at once would only spin.
fn needs_pause(e: &CallError) -> bool {
    !matches!(
        e.code(),
        Some(codes::REBALANCE_IN_PROGRESS | codes::ILLEGAL_GENERATION | codes::UNKNOWN_MEMBER_ID | codes::MEMBER_ID_REQUIRED)
    )
}

fn millis(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

/// Runs `fut` unless the member is asked to leave or its events receiver goes away
/// first.
async fn or_stop<T>(
    stop: &mut watch::Receiver<bool>,
    events: &mpsc::Sender<GroupEvent>,
    fut: impl Future<Output = T>,
) -> Result<T, Stop> {
    if *stop.borrow() {
        return Err(Stop::Requested);
    }
    tokio::select! {
        r = fut => Ok(r),
        _ = stop.wait_for(|s| *s) => Err(Stop::Requested),
        _ = events.closed() => Err(Stop::EventsDropped),
    }
}
