//! Waiting on a stop flag shared through a `watch` channel.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use tokio::sync::watch;

/// Resolves once the flag is true (or its sender is gone). Returns nothing, so no
/// borrow of the channel is held across the caller's other awaits.
pub(crate) async fn requested(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}

/// [`requested`] over a receiver of its own: a future that can outlive one turn of a
/// loop, so the wait is registered once rather than at every turn. Once it resolves it
/// must not be polled again.
pub(crate) async fn requested_owned(mut flag: watch::Receiver<bool>) {
    requested(&mut flag).await
}

/// Runs `work` to its end. If the flag turns true while it waits, `on_stop` is called
/// once (to fire a cancellation) and `work` is still awaited: it decides how to stop.
///
/// Most handlers finish on their first poll, so the flag is only watched once `work`
/// is pending: registering on the channel for every request was ~1,000 instructions
/// of a 19,000-instruction embedded round trip.
///
/// `work` is pinned by the caller and borrowed, so this future stays small: taking it
/// by value would store it twice (the argument, and the pinned copy it is polled in).
pub(crate) async fn finish_or_cancel<F: Future>(
    mut work: Pin<&mut F>,
    flag: &mut watch::Receiver<bool>,
    on_stop: impl FnOnce(),
) -> F::Output {
    // Polled with this task's own waker, so a pending `work` is woken as usual.
    if let Poll::Ready(output) = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await {
        return output;
    }
    tokio::select! {
        biased;
        output = &mut work => output,
        _ = requested(flag) => {
            on_stop();
            work.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn ready_work_never_fires_the_stop() {
        let (tx, mut rx) = watch::channel(true);
        let fired = AtomicBool::new(false);
        let out = finish_or_cancel(pin!(async { 7 }), &mut rx, || fired.store(true, Ordering::SeqCst)).await;
        assert_eq!(out, 7);
        assert!(!fired.load(Ordering::SeqCst), "work that finished at once is not cancelled, even with the flag set");
        drop(tx);
    }

    #[tokio::test]
    async fn stop_while_pending_fires_once_and_still_awaits_the_work() {
        let (tx, mut rx) = watch::channel(false);
        let (release, released) = tokio::sync::oneshot::channel::<u32>();
        let fired = std::sync::Arc::new(AtomicBool::new(false));
        let flag = fired.clone();
        let run = tokio::spawn(async move {
            finish_or_cancel(pin!(async { released.await.unwrap_or(0) }), &mut rx, || flag.store(true, Ordering::SeqCst)).await
        });
        tokio::task::yield_now().await;
        tx.send(true).unwrap();
        while !fired.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        assert!(!run.is_finished(), "the work decides when to end");
        release.send(9).unwrap();
        assert_eq!(run.await.unwrap(), 9);
    }
}
