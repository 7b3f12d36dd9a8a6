//! Consumer groups: membership, eager rebalancing, and committed offsets.
//!
//! Each group has one coordinator task. A membership change marks the group dirty and
//! wakes the coordinator, which then runs Kafka's classic eager protocol: every member
//! that holds an assignment is sent `Revoked` for all it owns, the coordinator waits
//! for each `done` (members that stay silent past the rebalance timeout are expelled),
//! and only then computes a range assignment and sends `Assigned`. Because nothing is
//! assigned until every previous owner has let go, two members never read one
//! partition at the same time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::assign::range_assign;
use super::topics::TopicRegistry;
use crate::transport::{
    AssignedPartition, GroupEvent, GroupHandle, GroupMembership, OffsetReset, TopicPartition, TransportError,
};

/// Room for a few rebalances' worth of events, so a member that is busy for a moment
/// does not hold up the coordinator.
const EVENT_CAPACITY: usize = 64;

/// One consumer group: its members, their ownership, and its committed offsets.
pub(crate) struct Group {
    id: String,
    topics: Arc<TopicRegistry>,
    rebalance_timeout: Duration,
    state: Mutex<GroupState>,
    /// Wakes the coordinator when membership changes or the group is dropped. A single
    /// waiter plus `notify_one`'s stored permit means no change is ever missed.
    wake: Arc<Notify>,
    /// Kept to restart the coordinator if the runtime it was spawned on has gone away
    /// (a broker shared by several test runtimes, say).
    coordinator: Mutex<Option<JoinHandle<()>>>,
}

struct GroupState {
    members: BTreeMap<String, Member>,
    committed: HashMap<TopicPartition, i64>,
    joined_total: u64,
    /// Membership changed since the current assignment was computed.
    dirty: bool,
}

struct Member {
    topics: Vec<String>,
    reset: OffsetReset,
    events: mpsc::Sender<GroupEvent>,
    owned: Vec<TopicPartition>,
    /// Partitions sent in a `Revoked` that the member has not acknowledged yet; it may
    /// still commit them.
    revoking: Vec<TopicPartition>,
    /// Whether the member has received an assignment, and so must revoke it before the
    /// next one.
    assigned: bool,
    /// Dropped with the member, which stops its close watcher and with it the last
    /// sender clone besides `events`, so the member's event stream ends.
    _stop_watcher: oneshot::Sender<()>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Group state is updated in single statements that cannot leave it half-changed,
    // so a panic elsewhere while holding the lock does not make it unusable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `now + d`, saturating instead of panicking on absurd timeouts.
fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl Group {
    /// A group with no members whose coordinator starts on the first join.
    pub(crate) fn new(id: &str, topics: Arc<TopicRegistry>, rebalance_timeout: Duration) -> Arc<Self> {
        Arc::new(Group {
            id: id.to_owned(),
            topics,
            rebalance_timeout,
            state: Mutex::new(GroupState {
                members: BTreeMap::new(),
                committed: HashMap::new(),
                joined_total: 0,
                dirty: false,
            }),
            wake: Arc::new(Notify::new()),
            coordinator: Mutex::new(None),
        })
    }

    fn group_error(&self, reason: impl Into<String>) -> TransportError {
        TransportError::Group { group: self.id.clone(), reason: reason.into() }
    }

    /// Adds a member subscribed to `topics` and triggers a rebalance.
    pub(crate) fn join(self: &Arc<Self>, topics: &[String], reset: OffsetReset) -> Result<GroupMembership, TransportError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| self.group_error("joining a group needs a running Tokio runtime"))?;
        self.ensure_coordinator(&runtime);

        let (events, receiver) = mpsc::channel(EVENT_CAPACITY);
        let (stop_watcher, watcher_stopped) = oneshot::channel();
        let watched = events.clone();
        let member_id = {
            let mut state = lock(&self.state);
            state.joined_total += 1;
            // Zero-padded so that id order, which the range assignor follows, is join order.
            let member_id = format!("member-{:08}", state.joined_total);
            let mut topics = topics.to_vec();
            topics.sort();
            topics.dedup();
            state.members.insert(
                member_id.clone(),
                Member {
                    topics,
                    reset,
                    events,
                    owned: Vec::new(),
                    revoking: Vec::new(),
                    assigned: false,
                    _stop_watcher: stop_watcher,
                },
            );
            state.dirty = true;
            member_id
        };
        runtime.spawn(watch_member(Arc::downgrade(self), member_id.clone(), watched, watcher_stopped));
        tracing::debug!(group = %self.id, member = %member_id, "member joined");
        self.wake.notify_one();
        Ok(GroupMembership { events: receiver, handle: Arc::new(MemberHandle { group: Arc::clone(self), member_id }) })
    }

    fn ensure_coordinator(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        let mut slot = lock(&self.coordinator);
        if slot.as_ref().is_none_or(JoinHandle::is_finished) {
            *slot = Some(runtime.spawn(coordinate(Arc::downgrade(self), Arc::clone(&self.wake))));
        }
    }

    /// Removes a member (if still present) and triggers a rebalance of the rest.
    fn remove(&self, member_id: &str, why: &str) -> bool {
        let removed = {
            let mut state = lock(&self.state);
            let removed = state.members.remove(member_id);
            if removed.is_some() {
                state.dirty = true;
            }
            removed
        };
        match removed {
            Some(member) => {
                // Dropped outside the lock: it ends the member's event stream.
                drop(member);
                tracing::info!(group = %self.id, member = %member_id, "member removed: {why}");
                self.wake.notify_one();
                true
            }
            None => false,
        }
    }

    fn commit(&self, member_id: &str, offsets: &[(TopicPartition, i64)]) -> Result<(), TransportError> {
        let mut state = lock(&self.state);
        let GroupState { members, committed, .. } = &mut *state;
        let member = members
            .get(member_id)
            .ok_or_else(|| self.group_error(format!("{member_id} is no longer a member (it left or was expelled)")))?;
        // Validate the whole batch first so a rejected commit changes nothing.
        for (tp, offset) in offsets {
            if !member.owned.contains(tp) && !member.revoking.contains(tp) {
                return Err(self.group_error(format!("{member_id} cannot commit {tp}: it does not own it")));
            }
            if *offset < 0 {
                return Err(self.group_error(format!("{member_id} cannot commit negative offset {offset} for {tp}")));
            }
        }
        for (tp, offset) in offsets {
            match committed.get_mut(tp) {
                Some(slot) => *slot = *offset,
                None => {
                    committed.insert(tp.clone(), *offset);
                }
            }
        }
        Ok(())
    }

    /// Ids of the current members, in id order.
    pub(crate) fn members(&self) -> Vec<String> {
        lock(&self.state).members.keys().cloned().collect()
    }

    /// The committed offset of `tp`, if any member committed one.
    pub(crate) fn committed(&self, tp: &TopicPartition) -> Option<i64> {
        lock(&self.state).committed.get(tp).copied()
    }

    fn needs_rebalance(&self) -> bool {
        lock(&self.state).dirty
    }

    async fn rebalance(&self) {
        self.revoke_all().await;
        self.assign_all().await;
    }

    /// Phase one: take every assignment back and wait until each owner has let go.
    async fn revoke_all(&self) {
        let revocations: Vec<_> = {
            let mut state = lock(&self.state);
            state
                .members
                .iter_mut()
                .filter(|(_, m)| m.assigned)
                .map(|(id, m)| {
                    let partitions = std::mem::take(&mut m.owned);
                    m.revoking.clone_from(&partitions);
                    let (done, acknowledged) = oneshot::channel();
                    (id.clone(), m.events.clone(), GroupEvent::Revoked { partitions, done }, acknowledged)
                })
                .collect()
        };
        if revocations.is_empty() {
            return;
        }
        let deadline = deadline_after(self.rebalance_timeout);
        let mut waiting = HashSet::new();
        let mut acknowledgements = FuturesUnordered::new();
        for (id, events, event, acknowledged) in revocations {
            match tokio::time::timeout_at(deadline, events.send(event)).await {
                Ok(Ok(())) => {
                    waiting.insert(id.clone());
                    acknowledgements.push(async move {
                        // A dropped `done` means no answer is coming (often because the
                        // receiver itself is gone); count it as let go rather than stall.
                        let _ = acknowledged.await;
                        id
                    });
                }
                Ok(Err(_)) => {
                    self.remove(&id, "its event receiver was dropped");
                }
                Err(_) => {
                    self.remove(&id, "its event queue stayed full for the rebalance timeout");
                }
            }
        }

        let expired = tokio::time::sleep_until(deadline);
        tokio::pin!(expired);
        loop {
            {
                // Members that left meanwhile own nothing any more; stop waiting for them.
                let state = lock(&self.state);
                waiting.retain(|id| state.members.contains_key(id));
            }
            if waiting.is_empty() {
                return;
            }
            tokio::select! {
                Some(id) = acknowledgements.next() => {
                    waiting.remove(&id);
                    if let Some(member) = lock(&self.state).members.get_mut(&id) {
                        member.revoking.clear();
                    }
                }
                () = self.wake.notified() => {}
                () = &mut expired => {
                    for id in waiting.drain() {
                        tracing::warn!(group = %self.id, member = %id, "expelling member: no revocation acknowledgement within {:?}", self.rebalance_timeout);
                        self.remove(&id, "it did not acknowledge a revocation within the rebalance timeout");
                    }
                    return;
                }
            }
        }
    }

    /// Phase two: nobody owns anything now, so hand out the new assignment.
    async fn assign_all(&self) {
        let assignments: Vec<_> = {
            let mut state = lock(&self.state);
            state.dirty = false;
            let plan: Vec<(String, Vec<TopicPartition>)> = range_assign(
                state.members.iter().map(|(id, m)| (id.as_str(), m.topics.as_slice())),
                |topic| self.topics.partition_count(topic).ok(),
            )
            .into_iter()
            .map(|(id, tps)| (id.to_owned(), tps))
            .collect();
            let GroupState { members, committed, .. } = &mut *state;
            plan.into_iter()
                .filter_map(|(id, tps)| {
                    let member = members.get_mut(&id)?;
                    let assigned = tps
                        .iter()
                        .map(|tp| AssignedPartition {
                            tp: tp.clone(),
                            offset: committed.get(tp).copied().unwrap_or_else(|| self.reset_offset(tp, member.reset)),
                        })
                        .collect();
                    member.owned = tps;
                    member.revoking.clear();
                    member.assigned = true;
                    Some((id, member.events.clone(), assigned))
                })
                .collect()
        };
        let deadline = deadline_after(self.rebalance_timeout);
        for (id, events, partitions) in assignments {
            match tokio::time::timeout_at(deadline, events.send(GroupEvent::Assigned(partitions))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    self.remove(&id, "its event receiver was dropped");
                }
                Err(_) => {
                    self.remove(&id, "its event queue stayed full for the rebalance timeout");
                }
            }
        }
    }

    fn reset_offset(&self, tp: &TopicPartition, reset: OffsetReset) -> i64 {
        self.topics
            .with_log(&tp.topic, tp.partition, |log| match reset {
                OffsetReset::Earliest => log.start_offset(),
                OffsetReset::Latest => log.high_watermark(),
            })
            .unwrap_or(0)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Lets the coordinator notice that nothing refers to the group any more.
        self.wake.notify_one();
    }
}

/// The coordinator task. Holds the group weakly so it ends when the group is dropped.
async fn coordinate(group: Weak<Group>, wake: Arc<Notify>) {
    loop {
        {
            let Some(group) = group.upgrade() else { return };
            while group.needs_rebalance() {
                group.rebalance().await;
            }
        }
        wake.notified().await;
    }
}

/// Treats a dropped event receiver as the member leaving, so a crashed consumer's
/// partitions move without it calling `leave`.
async fn watch_member(
    group: Weak<Group>,
    member_id: String,
    events: mpsc::Sender<GroupEvent>,
    stopped: oneshot::Receiver<()>,
) {
    tokio::select! {
        () = events.closed() => {
            drop(events);
            if let Some(group) = group.upgrade() {
                group.remove(&member_id, "its event receiver was dropped");
            }
        }
        _ = stopped => {}
    }
}

/// A member's [`GroupHandle`].
struct MemberHandle {
    group: Arc<Group>,
    member_id: String,
}

#[async_trait]
impl GroupHandle for MemberHandle {
    async fn commit(&self, offsets: &[(TopicPartition, i64)]) -> Result<(), TransportError> {
        self.group.commit(&self.member_id, offsets)
    }

    async fn leave(&self) -> Result<(), TransportError> {
        // Leaving twice, or after being expelled, is not an error: the member is gone either way.
        self.group.remove(&self.member_id, "it left");
        Ok(())
    }
}
