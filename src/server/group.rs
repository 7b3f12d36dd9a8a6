//! Follows the consumer group's assignment: a worker per owned partition, periodic
//! commits of what the workers finished, and an orderly hand-over on revocation and
//! shutdown. It ends with an error when the membership ends without the server
//! leaving (the group failed); [`RpcServer::health`](super::RpcServer::health) and
//! `shutdown` report it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::partition_worker::{self, Progress, Shared};
use super::{Abandoned, ServerError};
use crate::transport::{GroupEvent, GroupHandle, GroupMembership, TopicPartition, TransportError};

/// The least time the final commit, a revocation's commit and leaving the group are
/// given, whatever the shutdown timeout: a short (or zero) one means "do not wait for
/// running handlers", not "do not commit what was finished".
pub(crate) const MIN_FINAL_CALL: Duration = Duration::from_secs(5);

/// Partition lag is sampled every this many commit ticks (once a second by default):
/// it costs one high-watermark request per owned partition.
const LAG_EVERY: u32 = 10;

/// How long one lag sample may take before it is given up.
const LAG_LIMIT: Duration = Duration::from_secs(1);

/// The partitions a server instance serves now, kept in order.
pub(crate) type Owned = Arc<Mutex<Vec<TopicPartition>>>;

#[derive(Clone, Copy)]
pub(crate) struct LoopSettings {
    pub(crate) commit_interval: Duration,
    pub(crate) shutdown_timeout: Duration,
}

struct Worker {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    progress: Arc<Progress>,
    committed: i64,
}

/// Runs until shutdown is requested (then stops the workers, commits and leaves) or
/// the membership fails (then calls `failed` at once, stops the workers, commits what
/// it can and returns the error).
pub(crate) async fn serve(
    shared: Arc<Shared>,
    membership: GroupMembership,
    mut shutdown: watch::Receiver<bool>,
    settings: LoopSettings,
    owned: Owned,
    failed: impl FnOnce(&ServerError),
) -> Result<(), ServerError> {
    let publish = |workers: &HashMap<TopicPartition, Worker>| {
        let mut now: Vec<TopicPartition> = workers.keys().cloned().collect();
        now.sort();
        shared.counters.metrics.assigned(now.len());
        *owned.lock().unwrap_or_else(|p| p.into_inner()) = now;
    };
    let GroupMembership { mut events, handle } = membership;
    let mut workers: HashMap<TopicPartition, Worker> = HashMap::new();
    let mut tick = tokio::time::interval(settings.commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u32 = 0;

    // Why serving ended when it was not asked to, and whether this member still belongs
    // to the group (then it leaves, so its partitions move on at once).
    let (failure, member) = loop {
        tokio::select! {
            _ = crate::stop::requested(&mut shutdown) => break (None, true),
            event = events.recv() => match event {
                Some(GroupEvent::Assigned(partitions)) => {
                    for assigned in partitions {
                        tracing::info!(tp = %assigned.tp, offset = assigned.offset, "partition assigned");
                        let worker = start_worker(&shared, assigned.tp.clone(), assigned.offset);
                        if let Some(old) = workers.insert(assigned.tp, worker) {
                            old.task.abort();
                        }
                    }
                    publish(&workers);
                }
                Some(GroupEvent::Revoked { partitions, done }) => {
                    let revoked: Vec<(TopicPartition, Worker)> =
                        partitions.iter().filter_map(|tp| workers.remove_entry(tp)).collect();
                    tracing::info!(count = revoked.len(), "partitions revoked");
                    revoked.iter().for_each(|(tp, _)| shared.counters.metrics.forget(tp.partition));
                    publish(&workers);
                    if let Some(failure) = hand_over(&shared, handle.as_ref(), revoked, settings.shutdown_timeout, done).await {
                        break (Some(failure), true);
                    }
                }
                Some(GroupEvent::Failed(e)) => {
                    tracing::error!(error = %e, "group membership failed; stopping");
                    break (Some(ServerError::Transport(e)), false);
                }
                None => {
                    tracing::error!("group membership ended without the server leaving; stopping");
                    break (Some(ServerError::MembershipEnded), false);
                }
            },
            _ = tick.tick() => {
                if let Some(failure) = ended_worker(&mut workers).await {
                    break (Some(failure), true);
                }
                ticks = ticks.wrapping_add(1);
                let bookkeeping = async {
                    // A refused commit is retried on the next tick, with the positions of then.
                    let _ = commit(&shared, handle.as_ref(), workers.iter_mut()).await;
                    if ticks % LAG_EVERY == 0 {
                        let positions = workers.iter().map(|(tp, w)| (tp.clone(), w.progress.position.load(Ordering::Acquire))).collect();
                        // A gauge, not a duty: a sample whose look-ups hang (a partition's
                        // leader stopped answering while the coordinator still takes
                        // commits) is given up, the gauge keeping its last values, so the
                        // tick goes on committing and the loop on handling revocations.
                        let sample = shared.counters.metrics.sample_lag(shared.transport.as_ref(), positions);
                        if tokio::time::timeout(LAG_LIMIT, sample).await.is_err() {
                            tracing::debug!(limit = ?LAG_LIMIT, "partition lag sample gave up");
                        }
                    }
                };
                // A commit or a lag read that never answers must not keep a shutdown
                // from being seen; the final commit is made (bounded) on the way out.
                tokio::select! {
                    biased;
                    _ = crate::stop::requested(&mut shutdown) => break (None, true),
                    _ = bookkeeping => {}
                }
            }
        }
    };
    if let Some(failure) = &failure {
        // Serving ended now; winding the workers down may take the shutdown timeout.
        failed(failure);
    }
    let (abandoned, committed, died) =
        stop_and_commit(&shared, handle.as_ref(), workers.drain().collect(), settings.shutdown_timeout).await;
    publish(&workers);
    // Leave even when the commit failed: the partitions then move at once, and their
    // next owner resumes from the last commit that succeeded. Bounded like the rest: a
    // member that cannot say goodbye is expelled by the group's session timeout.
    let left = match member {
        true => leave_within(handle.as_ref(), settings.shutdown_timeout.max(MIN_FINAL_CALL)).await,
        false => Ok(()),
    };
    // A worker found dead on the way out (it panicked after the last tick looked) is
    // reported as the tick would have: a shutdown must not pass for a clean one.
    if let Some(failure) = failure.or(died) {
        return Err(failure);
    }
    committed.map_err(ServerError::FinalCommit)?;
    if !abandoned.is_empty() {
        return Err(ServerError::ShutdownTimedOut { timeout: settings.shutdown_timeout, abandoned });
    }
    left?;
    tracing::info!("server stopped");
    Ok(())
}

/// Leaves the group, given up after `bound`. A failure is logged here, so it is never
/// lost when an earlier error is the one reported.
async fn leave_within(handle: &dyn GroupHandle, bound: Duration) -> Result<(), TransportError> {
    let left = tokio::time::timeout(bound, handle.leave())
        .await
        .unwrap_or_else(|_| Err(TransportError::connection(format!("leaving the group: no answer within {bound:?}"))));
    if let Err(e) = &left {
        tracing::warn!(error = %e, "leaving the group failed; the group expires this member after its session timeout");
    }
    left
}

/// A worker that ended on its own, as an error. Workers end only when told to stop, and
/// those are taken out of `workers` first, so one that ended here panicked outside the
/// handler's guard (a bug in kafka-rpc, or in a custom transport's reader). Its partition
/// would go unread while `health()` said `Serving`; the server fails visibly instead, as
/// when its membership fails, and the wind-down still commits what the worker finished
/// and leaves the group, so every partition moves to a member that serves it.
async fn ended_worker(workers: &mut HashMap<TopicPartition, Worker>) -> Option<ServerError> {
    let (tp, worker) = workers.iter_mut().find(|(_, w)| w.task.is_finished())?;
    let reason = match (&mut worker.task).await {
        Err(e) => join_failure(e),
        Ok(()) => "it returned without being stopped".to_string(),
    };
    // Its handle is spent; a finished stand-in lets the wind-down treat it as stopped.
    worker.task = tokio::spawn(async {});
    Some(worker_died(tp, reason))
}

/// Why a worker's task failed (it panicked, or was cancelled), for [`worker_died`].
fn join_failure(e: tokio::task::JoinError) -> String {
    match e.is_panic() {
        true => crate::error::panic_message(e.into_panic().as_ref()),
        false => e.to_string(),
    }
}

/// The server's failure when the worker of `tp` died (logged here).
fn worker_died(tp: &TopicPartition, reason: String) -> ServerError {
    tracing::error!(%tp, reason, "a partition worker ended; stopping the server");
    ServerError::Panicked(format!("the partition worker of {tp}: {reason}"))
}

fn start_worker(shared: &Arc<Shared>, tp: TopicPartition, offset: i64) -> Worker {
    let (stop, stop_rx) = watch::channel(false);
    let progress = Arc::new(Progress::new(offset));
    let task = tokio::spawn(partition_worker::run(shared.clone(), tp, offset, progress.clone(), stop_rx));
    Worker { stop, task, progress, committed: offset }
}

/// Gives revoked partitions back: stops their workers, commits what they finished and
/// answers `done`. If the group stops waiting (drops the receiver of `done`, its
/// rebalance timeout having passed), the partitions may already be another member's:
/// the workers still running are aborted and nothing is committed for them, so a late
/// commit cannot overwrite the new owner's progress.
///
/// A worker found dead here (it panicked before the revocation, unseen by the commit
/// tick) is not a clean hand-over: its failure is returned, for the server to fail as
/// [`ended_worker`] has it, whether the group waited or not. Its partition is still
/// committed and handed over when the group waits, since its position holds only what
/// it settled (the records it handled but did not answer are read again by the next
/// owner).
async fn hand_over(
    shared: &Shared,
    handle: &dyn GroupHandle,
    mut revoked: Vec<(TopicPartition, Worker)>,
    timeout: Duration,
    mut done: oneshot::Sender<()>,
) -> Option<ServerError> {
    for (_, worker) in &revoked {
        let _ = worker.stop.send(true);
    }
    let deadline = crate::clock::instant_after(tokio::time::Instant::now(), timeout);
    let given_up = async {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {}
            () = done.closed() => {}
        }
    };
    let Stopped { died, .. } = stop_workers_until(&mut revoked, given_up).await;
    if done.is_closed() {
        tracing::warn!(count = revoked.len(), "the group stopped waiting for the revoked partitions; abandoning them uncommitted");
        return died;
    }
    // Nothing retries a refused commit here: the partitions are leaving, and their next
    // owner resumes from the last commit that succeeded (counted and logged by `commit`).
    // Bounded like the workers' stop, and given up when the group stops waiting: a
    // commit that never answers must not hold the serving loop.
    tokio::select! {
        _ = commit_within(shared, handle, revoked.iter_mut().map(|(tp, w)| (&*tp, w)), timeout) => {}
        _ = done.closed() => return died,
    }
    let _ = done.send(());
    died
}

/// How stopping workers went.
struct Stopped {
    /// The partitions of the workers abandoned (still running at the deadline, not idle).
    abandoned: Vec<TopicPartition>,
    /// The failure of the first worker that had ended in one (a panic); each is logged.
    died: Option<ServerError>,
}

/// Waits for stopped workers until `give_up` resolves, aborting those still running
/// then. A worker that has ended is joined even after that, which costs no wait: one
/// that panicked is reported whatever cut the wait short.
async fn stop_workers_until(workers: &mut [(TopicPartition, Worker)], give_up: impl std::future::Future<Output = ()>) -> Stopped {
    tokio::pin!(give_up);
    let mut gave_up = false;
    let mut stopped = Stopped { abandoned: Vec::new(), died: None };
    for (tp, worker) in workers.iter_mut() {
        let joined = if worker.task.is_finished() {
            Some((&mut worker.task).await)
        } else if gave_up {
            None
        } else {
            tokio::select! {
                biased;
                joined = &mut worker.task => Some(joined),
                () = &mut give_up => {
                    gave_up = true;
                    None
                }
            }
        };
        match joined {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                let died = worker_died(tp, join_failure(e));
                stopped.died.get_or_insert(died);
            }
            // Idle, it holds nothing to abandon, and signalled to stop it never takes a
            // record again (`Progress::idle`): only its task had not been run yet, which
            // a zero timeout leaves to chance. Not reported.
            None if worker.progress.idle.load(Ordering::SeqCst) => worker.task.abort(),
            None => {
                // Its in-flight work is abandoned; the uncommitted records are redelivered
                // to the next owner.
                tracing::warn!(%tp, "partition worker did not stop in time; abandoning it");
                worker.task.abort();
                stopped.abandoned.push(tp.clone());
            }
        }
    }
    stopped
}

/// Stops every worker and produces their replies, both by one deadline `timeout` from
/// now (a worker ends only once its replies are acknowledged, so what the reply
/// producer still holds then is an abandoned worker's), then commits what they
/// finished, within another `timeout` (at least [`MIN_FINAL_CALL`]). Returns what was
/// abandoned, the commit's failure, since no later tick will retry it, and the failure
/// of a worker found dead (as [`hand_over`] reports one).
async fn stop_and_commit(
    shared: &Shared,
    handle: &dyn GroupHandle,
    mut workers: Vec<(TopicPartition, Worker)>,
    timeout: Duration,
) -> (Abandoned, Result<(), TransportError>, Option<ServerError>) {
    let deadline = crate::clock::instant_after(tokio::time::Instant::now(), timeout);
    // A worker ends once its replies are acknowledged: none may wait out a linger now.
    shared.replier.flush();
    for (_, worker) in &workers {
        let _ = worker.stop.send(true);
    }
    let Stopped { abandoned: workers_abandoned, died } = stop_workers_until(&mut workers, tokio::time::sleep_until(deadline)).await;
    let mut abandoned = Abandoned { workers: workers_abandoned, ..Abandoned::default() };
    abandoned.workers.sort();
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    abandoned.replies = shared.replier.close_within(left).await;
    if !abandoned.replies.is_empty() {
        tracing::warn!(partitions = ?abandoned.replies, "replies not produced in time; abandoning them (their records are not committed)");
    }
    let committed = commit_within(shared, handle, workers.iter_mut().map(|(tp, w)| (&*tp, w)), timeout).await;
    (abandoned, committed, died)
}

/// [`commit`], given up after `timeout` (at least [`MIN_FINAL_CALL`]; then counted and
/// logged as a failed commit): a group handle whose commit never answers must not hold
/// the server.
async fn commit_within<'a>(
    shared: &Shared,
    handle: &dyn GroupHandle,
    workers: impl Iterator<Item = (&'a TopicPartition, &'a mut Worker)>,
    timeout: Duration,
) -> Result<(), TransportError> {
    let timeout = timeout.max(MIN_FINAL_CALL);
    match tokio::time::timeout(timeout, commit(shared, handle, workers)).await {
        Ok(outcome) => outcome,
        Err(_) => {
            shared.counters.commit_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(?timeout, "offset commit did not answer in time; giving it up");
            Err(TransportError::connection(format!("offset commit: no answer within {timeout:?}")))
        }
    }
}

/// Commits the positions that moved since the last commit. A failure is counted and
/// logged here; the periodic caller retries on its next tick.
async fn commit<'a>(
    shared: &Shared,
    handle: &dyn GroupHandle,
    workers: impl Iterator<Item = (&'a TopicPartition, &'a mut Worker)>,
) -> Result<(), TransportError> {
    let mut due = Vec::new();
    let mut committed = Vec::new();
    for (tp, worker) in workers {
        let position = worker.progress.position.load(Ordering::Acquire);
        // Unequal, not greater: after a reset the position is below what was committed
        // (see `Tail::next`), and that lower offset is the one to commit.
        if position != worker.committed {
            due.push((tp.clone(), position));
            committed.push((worker, position));
        }
    }
    if due.is_empty() {
        return Ok(());
    }
    match handle.commit(&due).await {
        Ok(()) => {
            for (worker, position) in committed {
                worker.committed = position;
            }
            Ok(())
        }
        Err(e) => {
            shared.counters.commit_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "offset commit failed");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker whose task never ends by itself, as any looks to a stop whose deadline
    /// passed before the task was run.
    fn worker(idle: bool) -> Worker {
        let (stop, _) = watch::channel(false);
        let progress = Arc::new(Progress::new(0));
        progress.idle.store(idle, Ordering::SeqCst);
        Worker { stop, task: tokio::spawn(std::future::pending()), progress, committed: 0 }
    }

    /// A zero shutdown timeout leaves no time for a stopped worker to be run: an idle one
    /// held nothing and is not reported abandoned; one holding records is.
    #[tokio::test]
    async fn only_a_worker_holding_records_is_abandoned_at_the_deadline() {
        let (idle, busy) = (TopicPartition::new("t", 0), TopicPartition::new("t", 1));
        let mut workers = vec![(idle, worker(true)), (busy.clone(), worker(false))];
        let stopped = stop_workers_until(&mut workers, std::future::ready(())).await;
        assert_eq!(stopped.abandoned, [busy]);
        assert!(stopped.died.is_none());
        for (tp, w) in workers {
            assert!(w.task.await.is_err_and(|e| e.is_cancelled()), "{tp}: every worker still running is aborted");
        }
    }
}
