//! The client's sweeper: fails requests whose reply did not come by their deadline.
//!
//! One task per client, sleeping until the earliest deadline, instead of a runtime
//! timer per request. Timers cost a registration and a cancellation on every call
//! and almost never fire; the sweeper costs nothing per call when all calls share a
//! timeout (their deadlines then come in order) and one visit per pending request
//! per sweep.
//!
//! A timeout fires at its deadline or up to [`spacing`] later: sweeps are spaced so
//! that sweeping costs at most a few percent of a core even when a stalled server
//! lets thousands of requests expire one after another.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::in_flight::{CloseOnDrop, InFlight};

/// Fails `map`'s overdue requests until it is closed. If this task is dropped instead
/// (its runtime shut down under a client that lives on), it closes the map: without a
/// sweeper no call would ever time out, so they fail with `Closed` rather than hang.
pub(crate) async fn run(map: Arc<InFlight>) {
    let map = CloseOnDrop(map);
    let map = &map.0;
    while !map.is_closed() {
        let now = Instant::now();
        map.sweep(now);
        let not_before = now + spacing(map.len());
        // Sleep until the planned sweep; a registration that brings it forward, or
        // `close`, wakes us to look again.
        loop {
            let wake = map.planned_sweep().map(|at| at.max(not_before));
            tokio::select! {
                biased;
                () = map.replanned() => {
                    if map.is_closed() {
                        return;
                    }
                }
                () = sleep_until(wake) => break,
            }
        }
    }
}

/// Least time between two sweeps of a map holding `pending` requests: a millisecond
/// (the runtime timer's resolution), or 100 ns per pending request, whichever is
/// longer. A sweep visits every entry in ~5 ns, so sweeping stays under ~5 % of a core.
fn spacing(pending: usize) -> Duration {
    Duration::from_millis(1).max(Duration::from_nanos(100).saturating_mul(u32::try_from(pending).unwrap_or(u32::MAX)))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_are_spaced_by_the_work_they_do() {
        assert_eq!(spacing(0), Duration::from_millis(1));
        assert_eq!(spacing(10_000), Duration::from_millis(1));
        assert_eq!(spacing(100_000), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_fails_at_its_own_deadline() {
        let map = Arc::new(InFlight::new(10, 100));
        let sweeper = tokio::spawn(run(map.clone()));
        let start = Instant::now();
        // Registered longest first, so the shorter deadlines each bring the plan forward.
        let waits = [300, 200, 50].map(|ms| {
            let pending = map.register(ms, start, Duration::from_millis(ms as u64)).expect("room");
            tokio::spawn(async move {
                let outcome = pending.await;
                (outcome, start.elapsed())
            })
        });
        for (wait, ms) in waits.into_iter().zip([300u64, 200, 50]) {
            let (outcome, elapsed) = wait.await.expect("the waiter does not panic");
            match outcome {
                Err(crate::error::RpcError::Timeout(t)) => assert_eq!(t, Duration::from_millis(ms)),
                other => panic!("expected a timeout after {ms} ms, got {other:?}"),
            }
            assert!(
                elapsed >= Duration::from_millis(ms) && elapsed <= Duration::from_millis(ms + 1),
                "timed out after {elapsed:?}, deadline {ms} ms"
            );
        }
        assert_eq!(map.len(), 0);
        map.close();
        sweeper.await.expect("the sweeper ends when the map closes");
    }

    #[test]
    fn calls_fail_instead_of_hanging_when_the_sweepers_runtime_is_gone() {
        let map = Arc::new(InFlight::new(10, 100));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime");
        runtime.block_on(async {
            tokio::spawn(run(map.clone()));
            tokio::task::yield_now().await;
        });
        let pending = map.register(1, Instant::now(), Duration::from_secs(3600)).expect("room");
        drop(runtime);
        let other = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime");
        other.block_on(async {
            let outcome = tokio::time::timeout(Duration::from_secs(5), pending).await.expect("failed, not hanging");
            assert!(matches!(outcome, Err(crate::error::RpcError::Closed)), "{outcome:?}");
            assert!(matches!(
                map.register(2, Instant::now(), Duration::from_secs(1)),
                Err(crate::error::RpcError::Closed)
            ));
        });
    }

    #[tokio::test(start_paused = true)]
    async fn closing_ends_an_idle_sweeper() {
        let map = Arc::new(InFlight::new(10, 100));
        let sweeper = tokio::spawn(run(map.clone()));
        tokio::task::yield_now().await;
        map.close();
        sweeper.await.expect("the sweeper ends when the map closes");
    }
}
