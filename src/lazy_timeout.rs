//! A time limit whose timer is made only once the limited future has to wait.
//!
//! `tokio::time::timeout` builds its timer up front: a clock read, the runtime handle
//! from thread-local storage, and a reference count on it shared by every worker thread,
//! bumped and dropped once per request. Most handlers finish on their first poll, so
//! here the timer is made on the first poll that finds the future pending. (A call's
//! reply is always pending at first; its deadline is the client's sweeper's.)

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;

/// The limit passed first; the future was dropped unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elapsed;

pin_project_lite::pin_project! {
    /// `future`, bounded by a time limit. Like `tokio::time::timeout`, the future is
    /// polled before the timer, so an outcome that is there wins over a limit that
    /// passed while the task waited to run.
    pub(crate) struct LazyTimeout<F> {
        #[pin]
        future: F,
        // Counted from the first poll that finds the future pending.
        limit: Duration,
        #[pin]
        timer: Option<Sleep>,
    }
}

impl<F> LazyTimeout<F> {
    pub(crate) fn new(future: F, limit: Duration) -> Self {
        LazyTimeout { future, limit, timer: None }
    }
}

impl<F: Future> Future for LazyTimeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        if this.timer.is_none() {
            // `sleep`, not `sleep_until(now + limit)`: it takes a limit past what the
            // clock holds as no limit instead of overflowing.
            this.timer.set(Some(tokio::time::sleep(*this.limit)));
        }
        if let Some(timer) = this.timer.as_pin_mut() {
            ready!(timer.poll(cx));
        }
        Poll::Ready(Err(Elapsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_ready_future_never_makes_a_timer() {
        let limited = LazyTimeout::new(async { 3 }, Duration::ZERO);
        tokio::pin!(limited);
        assert_eq!(limited.as_mut().await, Ok(3));
        assert!(limited.timer.is_none(), "finished on its first poll: no timer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pending_future_is_cut_off_at_its_limit() {
        let started = Instant::now();
        let out = LazyTimeout::new(std::future::pending::<()>(), Duration::from_millis(40)).await;
        assert_eq!(out, Err(Elapsed));
        assert_eq!(started.elapsed(), Duration::from_millis(40));
    }

    /// A receiver that gets `value` after `delay`.
    fn sent_after(delay: Duration, value: i32) -> tokio::sync::oneshot::Receiver<i32> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(value);
        });
        rx
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_past_the_clock_is_no_limit() {
        assert_eq!(LazyTimeout::new(sent_after(Duration::from_secs(3600), 1), Duration::MAX).await, Ok(Ok(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_outcome_that_comes_in_time_wins() {
        assert_eq!(LazyTimeout::new(sent_after(Duration::from_millis(10), 5), Duration::from_millis(50)).await, Ok(Ok(5)));
    }
}
