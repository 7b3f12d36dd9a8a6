//! Consumer groups: membership, eager rebalancing, and committed offsets.
//!
//! Each group has one coordinator task. A membership change marks the group dirty and
//! wakes the coordinator, which then runs Kafka's classic eager protocol: every member
//! that holds an assignment is sent `Revoked` for all it owns, the coordinator waits
//! for each `done` (members that stay silent past the rebalance timeout are expelled),
//! and only then computes a range assignment and sends `Assigned`. Because nothing is
//! assigned until every previous owner has let go, two members never read one
//! partition at the same time.
//!
//! An expelled member is out of the group at once: its commits are refused and its
//! partitions go to the others. Its event stream goes on, as a Kafka consumer's
//! membership goes on after the broker expels it: once it lets go (its late `done` is
//! sent or dropped, or at the latest one more rebalance timeout after the expulsion,
//! when the group stops waiting as the Kafka membership does when its own wait runs
//! out) it rejoins as a new member, with a new id, and is assigned partitions in the
//! next rebalance. A member whose event queue stays full for the rebalance timeout is
//! expelled the same way and rejoins once it reads again, as a Kafka consumer that did not
//! poll in time rejoins at its next poll; a revocation it could not be sent reaches it
//! first. The stream ends only when the member leaves, drops its receiver, or the group
//! is dropped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
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
    /// Members expelled for not acknowledging a revocation in time, by the id they had,
    /// until they let go and rejoin under a new id. They own nothing and may not commit.
    expelled: HashMap<String, Member>,
    committed: HashMap<TopicPartition, i64>,
    joined_total: u64,
    /// Membership changed since the current assignment was computed.
    dirty: bool,
}

struct Member {
    /// What its handle and watcher know the membership by: unlike its id, which changes
    /// when an expelled member rejoins, it is the membership's for good.
    key: u64,
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

/// A member id for the `n`th join. Zero-padded so that id order, which the range
/// assignor follows, is join order (a rejoin counts as a join).
fn member_id(n: u64) -> String {
    format!("member-{n:08}")
}

/// Takes the membership now called `id` out of the group, wherever it is (a member, or
/// expelled and waiting to rejoin). Removing a member marks the group dirty.
fn take(state: &mut GroupState, id: &str) -> Option<Member> {
    let member = match state.members.remove(id) {
        Some(member) => {
            state.dirty = true;
            member
        }
        None => state.expelled.remove(id)?,
    };
    Some(member)
}

/// The id the membership known by `key` has now, a member or expelled and waiting to
/// rejoin; `None` once it left. A scan, not a map kept beside the members: a group has
/// a handful, and this is asked when one leaves.
fn id_of(state: &GroupState, key: u64) -> Option<String> {
    state.members.iter().chain(&state.expelled).find(|(_, m)| m.key == key).map(|(id, _)| id.clone())
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
                expelled: HashMap::new(),
                committed: HashMap::new(),
                joined_total: 0,
                dirty: false,
            }),
            wake: Arc::new(Notify::new()),
            coordinator: Mutex::new(None),
        })
    }

    fn group_error(&self, reason: impl Into<String>) -> TransportError {
        TransportError::group(self.id.clone(), reason)
    }

    /// Adds a member subscribed to `topics` and triggers a rebalance.
    pub(crate) fn join(
        self: &Arc<Self>,
        topics: &[String],
        reset: OffsetReset,
    ) -> Result<GroupMembership, TransportError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| self.group_error("joining a group needs a running Tokio runtime"))?;
        self.ensure_coordinator(&runtime);

        let (events, receiver) = mpsc::channel(EVENT_CAPACITY);
        let (stop_watcher, watcher_stopped) = oneshot::channel();
        let watched = events.clone();
        let (key, member_id) = {
            let mut state = lock(&self.state);
            state.joined_total += 1;
            let key = state.joined_total;
            let member_id = member_id(key);
            let mut topics = topics.to_vec();
            topics.sort();
            topics.dedup();
            state.members.insert(
                member_id.clone(),
                Member {
                    key,
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
            (key, member_id)
        };
        runtime.spawn(watch_member(Arc::downgrade(self), key, watched, watcher_stopped));
        tracing::debug!(group = %self.id, member = %member_id, "member joined");
        self.wake.notify_one();
        Ok(GroupMembership { events: receiver, handle: Arc::new(MemberHandle { group: Arc::clone(self), key }) })
    }

    fn ensure_coordinator(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        let mut slot = lock(&self.coordinator);
        if slot.as_ref().is_none_or(JoinHandle::is_finished) {
            *slot = Some(runtime.spawn(coordinate(Arc::downgrade(self), Arc::clone(&self.wake))));
        }
    }

    /// Removes the membership now called `member_id` (if still present) and triggers a
    /// rebalance of the rest.
    fn remove(&self, member_id: &str, why: &str) {
        let removed = take(&mut lock(&self.state), member_id);
        self.removed(removed, member_id, why);
    }

    /// Removes the membership known by `key` (if still present), whatever its id is now,
    /// and triggers a rebalance of the rest.
    fn remove_membership(&self, key: u64, why: &str) {
        let (removed, member_id) = {
            let mut state = lock(&self.state);
            let Some(member_id) = id_of(&state, key) else { return };
            (take(&mut state, &member_id), member_id)
        };
        self.removed(removed, &member_id, why);
    }

    fn removed(&self, removed: Option<Member>, member_id: &str, why: &str) {
        if let Some(member) = removed {
            // Dropped outside the lock: it ends the member's event stream.
            drop(member);
            tracing::info!(group = %self.id, member = %member_id, "member removed: {why}");
            self.wake.notify_one();
        }
    }

    /// Takes the member out of the assignment (its partitions go to the others in the
    /// rebalance under way) while keeping its event stream, until it rejoins. Whether it
    /// was still a member.
    fn expel(&self, member_id: &str) -> bool {
        let mut state = lock(&self.state);
        let Some(mut member) = state.members.remove(member_id) else { return false };
        member.owned.clear();
        member.revoking.clear();
        member.assigned = false;
        state.expelled.insert(member_id.to_owned(), member);
        state.dirty = true;
        true
    }

    /// Expels a member whose event queue stayed full for the rebalance timeout, as Kafka
    /// expels a consumer that does not poll within `max.poll.interval.ms`, and brings it
    /// back once it reads again (its queue has room), as that consumer rejoins at its
    /// next poll. A `revocation` it could not be sent reaches it first, its `done`
    /// already closed (nobody waits for it now): it must learn that it lost the
    /// partitions before it is assigned any.
    fn expel_until_read(self: &Arc<Self>, member_id: &str, events: mpsc::Sender<GroupEvent>, revocation: Option<GroupEvent>) {
        if !self.expel(member_id) {
            return;
        }
        tracing::warn!(
            group = %self.id, member = %member_id,
            "expelling member: its event queue stayed full for {:?}; it rejoins once it reads again", self.rebalance_timeout
        );
        let group = Arc::downgrade(self);
        let member_id = member_id.to_owned();
        tokio::spawn(async move {
            // An error: the receiver is gone, and its watcher takes the member out.
            let Ok(room) = events.reserve().await else { return };
            if let Some(revocation) = revocation {
                room.send(revocation);
            }
            if let Some(group) = group.upgrade() {
                group.rejoin(&member_id, "it reads its events again");
            }
        });
    }

    /// Brings an expelled member back as a new member (a new id, ordered after every
    /// member so far) and triggers a rebalance that assigns it partitions.
    fn rejoin(&self, old_id: &str, why: &str) {
        let new_id = {
            let mut state = lock(&self.state);
            // Gone meanwhile: it left, or dropped its event receiver.
            let Some(member) = state.expelled.remove(old_id) else { return };
            state.joined_total += 1;
            let new_id = member_id(state.joined_total);
            state.members.insert(new_id.clone(), member);
            state.dirty = true;
            new_id
        };
        tracing::info!(group = %self.id, member = %old_id, new_id = %new_id, "expelled member rejoins: {why}");
        self.wake.notify_one();
    }

    fn commit(&self, key: u64, offsets: &[(TopicPartition, i64)]) -> Result<(), TransportError> {
        let mut state = lock(&self.state);
        let GroupState { members, expelled, committed, .. } = &mut *state;
        let Some((member_id, member)) = members.iter().find(|(_, m)| m.key == key) else {
            return Err(match expelled.iter().find(|(_, m)| m.key == key) {
                // An expelled member's partitions may be another's already: its commit
                // must not overwrite the new owner's progress.
                Some((id, _)) => self.group_error(format!("{id} is no longer a member (it was expelled and has not rejoined yet)")),
                None => self.group_error(format!("member #{key} is no longer a member (it left)")),
            });
        };
        // Validate the whole batch first so a rejected commit changes nothing.
        for (tp, offset) in offsets {
            if !member.owned.contains(tp) && !member.revoking.contains(tp) {
                return Err(TransportError::NotAssigned { group: self.id.clone(), tp: tp.clone(), generation: -1 });
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

    async fn rebalance(self: &Arc<Self>) {
        self.revoke_all().await;
        self.assign_all().await;
    }

    /// Phase one: take every assignment back and wait until each owner has let go.
    /// Owners that do not in time are expelled, and rejoin once they have.
    async fn revoke_all(self: &Arc<Self>) {
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
            match tokio::time::timeout_at(deadline, events.reserve()).await {
                Ok(Ok(room)) => {
                    room.send(event);
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
                Err(_) => self.expel_until_read(&id, events.clone(), Some(event)),
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
                () = &mut expired => break,
            }
        }
        let mut expelled = HashSet::new();
        for id in waiting.drain() {
            if self.expel(&id) {
                tracing::warn!(
                    group = %self.id, member = %id,
                    "expelling member: no revocation acknowledgement within {:?}; it rejoins once it lets go", self.rebalance_timeout
                );
                expelled.insert(id);
            }
        }
        if !expelled.is_empty() {
            // Still the acknowledgements the expelled members owe: they rejoin as each comes.
            tokio::spawn(rejoin_when_let_go(Arc::downgrade(self), acknowledgements, expelled, self.rebalance_timeout));
        }
    }

    /// Phase two: nobody owns anything now, so hand out the new assignment.
    async fn assign_all(self: &Arc<Self>) {
        let assignments: Vec<_> = {
            let mut state = lock(&self.state);
            state.dirty = false;
            let plan: Vec<(String, Vec<TopicPartition>)> =
                range_assign(state.members.iter().map(|(id, m)| (id.as_str(), m.topics.as_slice())), |topic| {
                    self.topics.partition_count(topic).ok()
                })
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
                // Never told of the partitions, it must not keep them: they go to the others.
                Err(_) => self.expel_until_read(&id, events, None),
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

/// Rejoins each `expelled` member once its revocation acknowledgement (one of
/// `acknowledgements`, which yield the member's id) arrives, sent or dropped: it has let
/// go of what it held then. The acknowledgements still owed `limit` later are dropped,
/// which tells those members to abandon the partitions (their `done` closes), and those
/// members rejoin anyway, as the Kafka membership rejoins when its own wait runs out.
async fn rejoin_when_let_go<F: Future<Output = String>>(
    group: Weak<Group>,
    mut acknowledgements: FuturesUnordered<F>,
    mut expelled: HashSet<String>,
    limit: Duration,
) {
    let deadline = deadline_after(limit);
    while !expelled.is_empty() {
        match tokio::time::timeout_at(deadline, acknowledgements.next()).await {
            Ok(Some(id)) => {
                // Others in the set left the group during the rebalance; nobody rejoins for them.
                if expelled.remove(&id) {
                    let Some(group) = group.upgrade() else { return };
                    group.rejoin(&id, "it acknowledged its revocation late");
                }
            }
            Ok(None) => return,
            Err(_) => {
                drop(acknowledgements);
                let Some(group) = group.upgrade() else { return };
                for id in expelled.drain() {
                    group.rejoin(&id, "the group stopped waiting for its revocation acknowledgement");
                }
                return;
            }
        }
    }
}

/// Treats a dropped event receiver as the member leaving, so a crashed consumer's
/// partitions move without it calling `leave`.
async fn watch_member(group: Weak<Group>, key: u64, events: mpsc::Sender<GroupEvent>, stopped: oneshot::Receiver<()>) {
    tokio::select! {
        () = events.closed() => {
            drop(events);
            if let Some(group) = group.upgrade() {
                group.remove_membership(key, "its event receiver was dropped");
            }
        }
        _ = stopped => {}
    }
}

/// A member's [`GroupHandle`]. It follows the membership by its key, since the member
/// id changes when an expelled member rejoins.
struct MemberHandle {
    group: Arc<Group>,
    key: u64,
}

#[async_trait]
impl GroupHandle for MemberHandle {
    async fn commit(&self, offsets: &[(TopicPartition, i64)]) -> Result<(), TransportError> {
        self.group.commit(self.key, offsets)
    }

    async fn leave(&self) -> Result<(), TransportError> {
        // Leaving twice is not an error: the member is gone either way. An expelled
        // member that leaves before rejoining is taken out for good.
        self.group.remove_membership(self.key, "it left");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc::error::TryRecvError;
    use tokio::time::{timeout, Instant};

    use crate::transport::embedded::EmbeddedBroker;
    use crate::transport::{
        AssignedPartition, GroupEvent, GroupMembership, OffsetReset, Record, TopicPartition, Transport, TransportError,
    };

    const PATIENCE: Duration = Duration::from_secs(5);

    async fn broker_with(topic: &str, partitions: i32) -> EmbeddedBroker {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic(topic, partitions).await.expect("create topic");
        broker
    }

    async fn join(broker: &EmbeddedBroker, group: &str, topic: &str, reset: OffsetReset) -> GroupMembership {
        broker.join_group(group, &[topic.to_owned()], reset).await.expect("join")
    }

    async fn next_event(member: &mut GroupMembership, within: Duration, what: &str) -> GroupEvent {
        match timeout(within, member.events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("event stream ended while waiting for {what}"),
            Err(_) => panic!("no event within {within:?} while waiting for {what}"),
        }
    }

    async fn assigned(member: &mut GroupMembership, what: &str) -> Vec<AssignedPartition> {
        match next_event(member, PATIENCE, what).await {
            GroupEvent::Assigned(partitions) => partitions,
            GroupEvent::Revoked { partitions, .. } => panic!("expected {what}, got Revoked({partitions:?})"),
            GroupEvent::Failed(e) => panic!("expected {what}, got Failed({e})"),
        }
    }

    async fn revoked(
        member: &mut GroupMembership,
        what: &str,
    ) -> (Vec<TopicPartition>, tokio::sync::oneshot::Sender<()>) {
        match next_event(member, PATIENCE, what).await {
            GroupEvent::Revoked { partitions, done } => (partitions, done),
            GroupEvent::Assigned(partitions) => panic!("expected {what}, got Assigned({partitions:?})"),
            GroupEvent::Failed(e) => panic!("expected {what}, got Failed({e})"),
        }
    }

    fn partitions_of(assigned: &[AssignedPartition]) -> Vec<i32> {
        assigned.iter().map(|a| a.tp.partition).collect()
    }

    fn tps(topic: &str, parts: &[i32]) -> Vec<TopicPartition> {
        parts.iter().map(|&p| TopicPartition::new(topic, p)).collect()
    }

    /// A group of 10 s rebalance timeout on topic `t` of 2 partitions: `a` joined and was
    /// assigned both, then `b` joined (at the instant returned) and `a` was sent its
    /// revocation, whose acknowledgement is returned unsent.
    async fn a_revoked_as_b_joins() -> (EmbeddedBroker, GroupMembership, GroupMembership, tokio::sync::oneshot::Sender<()>, Instant) {
        let broker = EmbeddedBroker::builder().rebalance_timeout(Duration::from_secs(10)).build();
        broker.ensure_topic("t", 2).await.expect("create");
        let mut a = join(&broker, "g", "t", OffsetReset::Earliest).await;
        assigned(&mut a, "a's first assignment").await;
        let start = Instant::now();
        let b = join(&broker, "g", "t", OffsetReset::Earliest).await;
        let (_, done) = revoked(&mut a, "a's revocation").await;
        (broker, a, b, done, start)
    }

    /// The next event, an assignment, given the 10 s rebalance timeout of the expulsion tests.
    async fn after_expulsion(member: &mut GroupMembership) -> Vec<AssignedPartition> {
        match next_event(member, Duration::from_secs(60), "an assignment after the expulsion").await {
            GroupEvent::Assigned(partitions) => partitions,
            other => panic!("expected an assignment after the expulsion, got {other:?}"),
        }
    }

    async fn ended(member: &mut GroupMembership, what: &str) {
        match timeout(PATIENCE, member.events.recv()).await {
            Ok(None) => {}
            Ok(Some(event)) => panic!("expected the event stream of {what} to end, got {event:?}"),
            Err(_) => panic!("the event stream of {what} did not end within {PATIENCE:?}"),
        }
    }

    /// Joins `a` then `b` to a 4-partition topic and acknowledges the rebalance, leaving
    /// `a` with partitions 0-1 and `b` with 2-3.
    async fn two_members(broker: &EmbeddedBroker) -> (GroupMembership, GroupMembership) {
        let mut a = join(broker, "g", "t", OffsetReset::Earliest).await;
        assigned(&mut a, "a's first assignment").await;
        let mut b = join(broker, "g", "t", OffsetReset::Earliest).await;
        let (_, done) = revoked(&mut a, "a's revocation when b joins").await;
        done.send(()).expect("coordinator waits for the acknowledgement");
        assert_eq!(partitions_of(&assigned(&mut a, "a's second assignment").await), [0, 1]);
        assert_eq!(partitions_of(&assigned(&mut b, "b's assignment").await), [2, 3]);
        (a, b)
    }

    #[tokio::test]
    async fn a_single_member_gets_every_partition() {
        let broker = broker_with("t", 4).await;
        let mut a = join(&broker, "g", "t", OffsetReset::Earliest).await;
        let got = assigned(&mut a, "the first assignment").await;
        assert_eq!(partitions_of(&got), [0, 1, 2, 3]);
        assert!(got.iter().all(|p| p.tp.topic == "t" && p.offset == 0), "fresh partitions start at 0: {got:?}");
        assert_eq!(broker.group_members("g").len(), 1);
        assert!(broker.group_members("other").is_empty());
    }

    #[tokio::test]
    async fn a_second_member_triggers_revocation_then_disjoint_range_assignment() {
        let broker = broker_with("t", 4).await;
        let mut a = join(&broker, "g", "t", OffsetReset::Earliest).await;
        assigned(&mut a, "a's first assignment").await;

        let mut b = join(&broker, "g", "t", OffsetReset::Earliest).await;
        let (partitions, done) = revoked(&mut a, "a's revocation when b joins").await;
        assert_eq!(partitions, tps("t", &[0, 1, 2, 3]), "eager protocol revokes everything a owns");
        assert!(
            matches!(b.events.try_recv(), Err(TryRecvError::Empty)),
            "b must not be assigned anything before a has let go"
        );
        done.send(()).expect("coordinator waits for the acknowledgement");

        let a_now = partitions_of(&assigned(&mut a, "a's new assignment").await);
        let b_now = partitions_of(&assigned(&mut b, "b's assignment").await);
        // Range assignment in member-id order: the earlier member gets the lower range.
        assert_eq!((a_now, b_now), (vec![0, 1], vec![2, 3]));
        let members = broker.group_members("g");
        assert_eq!(members.len(), 2);
        assert!(members[0] < members[1], "ids are listed in order: {members:?}");
    }

    #[tokio::test]
    async fn a_member_with_nothing_to_own_gets_an_empty_assignment() {
        let broker = broker_with("t", 1).await;
        let mut a = join(&broker, "g", "t", OffsetReset::Earliest).await;
        assigned(&mut a, "a's first assignment").await;
        let mut b = join(&broker, "g", "t", OffsetReset::Earliest).await;
        let (_, done) = revoked(&mut a, "a's revocation").await;
        done.send(()).expect("coordinator waits");
        assert_eq!(partitions_of(&assigned(&mut a, "a's assignment").await), [0]);
        assert_eq!(assigned(&mut b, "b's assignment").await, vec![]);
    }

    #[tokio::test]
    async fn leaving_moves_partitions_to_the_rest() {
        let broker = broker_with("t", 4).await;
        let (mut a, mut b) = two_members(&broker).await;

        b.handle.leave().await.expect("leave");
        let (partitions, done) = revoked(&mut a, "a's revocation when b leaves").await;
        assert_eq!(partitions, tps("t", &[0, 1]));
        done.send(()).expect("coordinator waits");
        assert_eq!(partitions_of(&assigned(&mut a, "a's assignment after b left").await), [0, 1, 2, 3]);
        ended(&mut b, "the member that left").await;
        assert_eq!(broker.group_members("g").len(), 1);
        b.handle.leave().await.expect("leaving twice is harmless");
    }

    #[tokio::test]
    async fn dropping_the_event_receiver_counts_as_leaving() {
        let broker = broker_with("t", 4).await;
        let (mut a, b) = two_members(&broker).await;

        drop(b.events);
        let (partitions, done) = revoked(&mut a, "a's revocation when b vanished").await;
        assert_eq!(partitions, tps("t", &[0, 1]));
        done.send(()).expect("coordinator waits");
        assert_eq!(partitions_of(&assigned(&mut a, "a's assignment after b vanished").await), [0, 1, 2, 3]);
        assert_eq!(broker.group_members("g").len(), 1);
        assert!(
            matches!(b.handle.commit(&[(TopicPartition::new("t", 2), 1)]).await, Err(TransportError::Group { .. })),
            "a member that is gone cannot commit"
        );
    }

    #[tokio::test]
    async fn committed_offsets_are_where_the_next_owner_resumes() {
        let broker = broker_with("t", 4).await;
        for p in 0..4 {
            broker
                .produce("t", p, (0..10).map(|_| Record::new(None::<Vec<u8>>, "x")).collect())
                .await
                .expect("produce");
        }
        let mut a = join(&broker, "g", "t", OffsetReset::Earliest).await;
        assigned(&mut a, "a's first assignment").await;
        a.handle.commit(&[(TopicPartition::new("t", 0), 7)]).await.expect("a owns t-0");

        let mut b = join(&broker, "g", "t", OffsetReset::Earliest).await;
        let (_, done) = revoked(&mut a, "a's revocation").await;
        // Committing what was finished before acknowledging is what revocation is for.
        a.handle.commit(&[(TopicPartition::new("t", 3), 4)]).await.expect("a may commit partitions it is revoking");
        done.send(()).expect("coordinator waits");

        let a_now = assigned(&mut a, "a's assignment").await;
        let b_now = assigned(&mut b, "b's assignment").await;
        let offset_of =
            |list: &[AssignedPartition], p: i32| list.iter().find(|x| x.tp.partition == p).map(|x| x.offset);
        assert_eq!(offset_of(&a_now, 0), Some(7), "committed offset kept for the same owner");
        assert_eq!(offset_of(&a_now, 1), Some(0), "no commit: reset to earliest");
        assert_eq!(offset_of(&b_now, 3), Some(4), "the new owner resumes at the committed offset");
        assert_eq!(broker.committed_offset("g", &TopicPartition::new("t", 3)), Some(4));
        assert_eq!(broker.committed_offset("g", &TopicPartition::new("t", 2)), None);

        let refused = a.handle.commit(&[(TopicPartition::new("t", 1), 5), (TopicPartition::new("t", 3), 9)]).await;
        assert!(
            matches!(&refused, Err(TransportError::NotAssigned { tp, .. }) if *tp == TopicPartition::new("t", 3)),
            "t-3 moved to b, got {refused:?}"
        );
        assert_eq!(broker.committed_offset("g", &TopicPartition::new("t", 1)), None, "a refused batch commits nothing");
    }

    #[tokio::test]
    async fn reset_policy_picks_log_start_or_high_watermark() {
        let record = Record::new(None::<Vec<u8>>, "x");
        let broker = EmbeddedBroker::builder().retention_bytes(3 * super::super::log::retained_size(&record)).build();
        broker.ensure_topic("t", 1).await.expect("create");
        broker.produce("t", 0, vec![record; 5]).await.expect("produce");

        let mut early = join(&broker, "early", "t", OffsetReset::Earliest).await;
        let mut late = join(&broker, "late", "t", OffsetReset::Latest).await;
        assert_eq!(assigned(&mut early, "earliest assignment").await[0].offset, 2, "log start, after retention");
        assert_eq!(assigned(&mut late, "latest assignment").await[0].offset, 5, "high watermark");
    }

    /// Like a Kafka consumer the broker expels (it rejoins, with a new member id), not
    /// the end of the membership: that stopped the whole server over one slow handler.
    #[tokio::test(start_paused = true)]
    async fn a_member_that_never_acknowledges_is_expelled_after_the_rebalance_timeout_then_rejoins() {
        let broker = EmbeddedBroker::builder().rebalance_timeout(Duration::from_secs(10)).build();
        broker.ensure_topic("t", 4).await.expect("create");
        let mut a = join(&broker, "g", "t", OffsetReset::Earliest).await;
        assigned(&mut a, "a's first assignment").await;
        let a_first_id = broker.group_members("g");
        let start = Instant::now();
        let mut b = join(&broker, "g", "t", OffsetReset::Earliest).await;
        let (_, late) = revoked(&mut a, "a's revocation").await;

        let got = match next_event(&mut b, Duration::from_secs(60), "b's assignment after a is expelled").await {
            GroupEvent::Assigned(partitions) => partitions,
            other => panic!("expected an assignment for b, got {other:?}"),
        };
        assert_eq!(partitions_of(&got), [0, 1, 2, 3]);
        assert!(start.elapsed() >= Duration::from_secs(10), "expelled before the timeout: {:?}", start.elapsed());
        assert_eq!(broker.group_members("g").len(), 1);
        assert!(
            matches!(a.handle.commit(&[(TopicPartition::new("t", 0), 1)]).await, Err(TransportError::Group { .. })),
            "an expelled member cannot commit what is b's now"
        );
        assert_eq!(broker.committed_offset("g", &TopicPartition::new("t", 0)), None);
        assert!(matches!(a.events.try_recv(), Err(TryRecvError::Empty)), "the expelled member's stream goes on");

        // Letting go late: a rejoins under a new id, after b's, so it gets the upper range.
        late.send(()).expect("the group still takes the late acknowledgement");
        let (partitions, done) = revoked(&mut b, "b's revocation when a rejoins").await;
        assert_eq!(partitions, tps("t", &[0, 1, 2, 3]));
        done.send(()).expect("coordinator waits");
        assert_eq!(partitions_of(&assigned(&mut b, "b's assignment").await), [0, 1]);
        assert_eq!(partitions_of(&assigned(&mut a, "a's assignment after rejoining").await), [2, 3]);
        let members = broker.group_members("g");
        assert_eq!(members.len(), 2);
        assert!(!members.contains(&a_first_id[0]), "a rejoined as a new member: {members:?} (was {a_first_id:?})");
        a.handle.commit(&[(TopicPartition::new("t", 2), 1)]).await.expect("the rejoined member commits what it owns");
        assert_eq!(broker.committed_offset("g", &TopicPartition::new("t", 2)), Some(1));

        a.handle.leave().await.expect("leave");
        ended(&mut a, "the rejoined member that left").await;
        assert_eq!(broker.group_members("g").len(), 1, "leaving removes the member under its new id");
    }

    /// An expelled member that never lets go is not waited for for ever: one more
    /// rebalance timeout on, its `done` closes (abandon the partitions) and it rejoins,
    /// as the Kafka membership rejoins when its own wait runs out.
    #[tokio::test(start_paused = true)]
    async fn an_expelled_member_that_never_lets_go_rejoins_one_rebalance_timeout_later() {
        let (broker, mut a, mut b, mut never_sent, start) = a_revoked_as_b_joins().await;
        assert_eq!(partitions_of(&after_expulsion(&mut b).await), [0, 1]);

        timeout(Duration::from_secs(60), never_sent.closed()).await.expect("the group stops waiting");
        assert!(start.elapsed() >= Duration::from_secs(20), "stopped waiting too soon: {:?}", start.elapsed());
        let (_, done) = revoked(&mut b, "b's revocation when a rejoins").await;
        done.send(()).expect("coordinator waits");
        assert_eq!(partitions_of(&assigned(&mut b, "b's assignment").await), [0]);
        assert_eq!(partitions_of(&assigned(&mut a, "a's assignment after rejoining").await), [1]);
        assert_eq!(broker.group_members("g").len(), 2);
    }

    /// A member that stops reading its events (its queue stays full for the rebalance
    /// timeout) is out of the group, as a Kafka consumer that does not poll within
    /// `max.poll.interval.ms` is; like that consumer it rejoins once it reads again. Its
    /// membership ended instead (a server stopped on it with `MembershipEnded`). What it reads
    /// must hold together: every assignment is revoked before the next, so it never
    /// goes on serving a partition it was not told it lost.
    #[tokio::test(start_paused = true)]
    async fn a_member_that_stops_reading_its_events_rejoins_when_it_reads_again() {
        let broker = EmbeddedBroker::builder().rebalance_timeout(Duration::from_secs(10)).build();
        broker.ensure_topic("t", 2).await.expect("create");
        let mut a = join(&broker, "g", "t", OffsetReset::Earliest).await;
        let mut owned: Vec<TopicPartition> = assigned(&mut a, "a's first assignment").await.into_iter().map(|p| p.tp).collect();
        // From here on neither reads: each is expelled in turn for not acknowledging its
        // revocation, rejoins, and is sent the next rebalance's events, until both queues
        // are full.
        let _b = join(&broker, "g", "t", OffsetReset::Earliest).await;
        let started = Instant::now();
        while !broker.group_members("g").is_empty() {
            assert!(started.elapsed() < Duration::from_secs(4 * 3600), "the queues never filled: {:?}", broker.group_members("g"));
            tokio::time::sleep(Duration::from_secs(10)).await;
        }

        for read in 0.. {
            match next_event(&mut a, Duration::from_secs(60), "a's events once it reads again").await {
                GroupEvent::Assigned(partitions) => {
                    assert!(owned.is_empty(), "event {read}: assigned {partitions:?} while still owning {owned:?}");
                    owned = partitions.into_iter().map(|p| p.tp).collect();
                    if read >= super::EVENT_CAPACITY {
                        break;
                    }
                }
                GroupEvent::Revoked { partitions, .. } => {
                    assert_eq!(partitions, owned, "event {read}: revoked what it owned");
                    owned.clear();
                }
                GroupEvent::Failed(e) => panic!("event {read}: the membership failed: {e}"),
            }
        }
        assert_eq!(owned, tps("t", &[0, 1]), "the only member reading is assigned everything");
        assert_eq!(broker.group_members("g").len(), 1, "a is a member again");
        a.handle.commit(&[(TopicPartition::new("t", 0), 1)]).await.expect("the rejoined member commits what it owns");
    }

    /// Dropping the event receiver while expelled is leaving: the member does not rejoin.
    #[tokio::test(start_paused = true)]
    async fn an_expelled_member_that_drops_its_receiver_does_not_rejoin() {
        let (broker, a, mut b, mut late, _) = a_revoked_as_b_joins().await;
        assert_eq!(partitions_of(&after_expulsion(&mut b).await), [0, 1]);
        drop(a.events);
        timeout(Duration::from_secs(60), late.closed()).await.expect("the group stops waiting");
        if let Ok(event) = timeout(Duration::from_secs(60), b.events.recv()).await {
            panic!("no rebalance for a member that is gone, got {event:?}");
        }
        assert_eq!(broker.group_members("g").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_done_counts_as_an_acknowledgement() {
        let (broker, _a, mut b, done, start) = a_revoked_as_b_joins().await;
        drop(done);
        assert_eq!(partitions_of(&assigned(&mut b, "b's assignment").await), [1]);
        assert!(start.elapsed() < Duration::from_secs(10), "waited for a timeout: {:?}", start.elapsed());
        assert_eq!(broker.group_members("g").len(), 2);
    }

    /// A broker outliving the runtime its group coordinator ran on (a broker shared by
    /// several `#[tokio::test]`s) must keep working on the next runtime.
    #[test]
    fn a_group_survives_the_runtime_it_started_on() {
        let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let broker = EmbeddedBroker::new();
        runtime().block_on(async {
            broker.ensure_topic("t", 2).await.expect("create");
            let mut a = join(&broker, "g", "t", OffsetReset::Earliest).await;
            assert_eq!(partitions_of(&assigned(&mut a, "a's assignment").await), [0, 1]);
        });
        runtime().block_on(async {
            let mut b = join(&broker, "g", "t", OffsetReset::Earliest).await;
            assert_eq!(partitions_of(&assigned(&mut b, "b's assignment on a new runtime").await), [0, 1]);
            assert_eq!(broker.group_members("g").len(), 1, "the member from the dead runtime is gone");
        });
    }

    #[tokio::test]
    async fn groups_are_independent() {
        let broker = broker_with("t", 2).await;
        let mut a = join(&broker, "g1", "t", OffsetReset::Earliest).await;
        let mut b = join(&broker, "g2", "t", OffsetReset::Earliest).await;
        assert_eq!(partitions_of(&assigned(&mut a, "g1's assignment").await), [0, 1]);
        assert_eq!(partitions_of(&assigned(&mut b, "g2's assignment").await), [0, 1]);
        a.handle.commit(&[(TopicPartition::new("t", 0), 1)]).await.expect("commit");
        assert_eq!(broker.committed_offset("g2", &TopicPartition::new("t", 0)), None);
    }
}
