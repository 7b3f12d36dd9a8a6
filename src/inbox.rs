//! An unbounded queue that any number of senders push to and one receiver empties a
//! batch at a time: the hand-over from callers to a produce queue.
//!
//! Why not tokio's unbounded `mpsc`: it moves every item through its block list
//! twice (push, then pop into the receiver's batch), with atomic bookkeeping per item;
//! for the embedded round trip that was ~470 instructions per request for its two
//! records. Here a push is a `Vec::push` under a short lock, the receiver takes up to
//! a batch at once, and the receiver is woken only when the inbox goes from empty to
//! not empty (while it has items it never waits).
//!
//! Like `mpsc`, dropping the receiver (or closing it) makes later sends fail and hand
//! the item back, and a dropped receiver drops what was still queued; dropping the
//! last sender, or closing the inbox from a sender, ends the receiver once the inbox
//! is empty. The tests at the end show each of these in use (the module is private,
//! so a doctest could not reach it).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Fired when items arrive in an empty inbox, and when the senders are done (the
    /// last went away, or one closed the inbox).
    ready: Notify,
}

struct State<T> {
    /// A deque, not a `Vec`: a receiver that takes a few of many (a produce queue
    /// admitting one call per freed slot) must not move all the rest each time.
    items: VecDeque<T>,
    /// Set when the receiver closed or went away, or a sender closed the inbox: sends
    /// fail from then on.
    closed: bool,
    /// Senders alive.
    senders: usize,
    /// Set when the last sender went away or a sender closed the inbox: the receiver
    /// ends once the items are taken.
    sender_gone: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section is a push, a drain or a flag: a panic inside one
        // leaves the state consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The sending half; cloned for each holder.
pub(crate) struct Sender<T>(Arc<Shared<T>>);

/// The receiving half.
pub(crate) struct Receiver<T>(Arc<Shared<T>>);

/// A new, empty inbox.
pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::new(), closed: false, senders: 1, sender_gone: false }),
        ready: Notify::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    /// Queues `item`; hands it back when the receiver closed or went away.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        let was_empty = {
            let mut state = self.0.lock();
            if state.closed {
                return Err(item);
            }
            state.items.push_back(item);
            state.items.len() == 1
        };
        // A receiver waits only on an empty inbox, so only this push can need to wake it.
        if was_empty {
            self.0.ready.notify_one();
        }
        Ok(())
    }

    /// Whether the inbox refuses sends: its receiver closed or went away, or a sender
    /// closed it.
    pub(crate) fn is_closed(&self) -> bool {
        self.0.lock().closed
    }

    /// Refuses further sends from every sender; the receiver still gets what was
    /// queued, then ends. For an owner that must end the receiver while other holders
    /// of a sender may still be around.
    pub(crate) fn close(&self) {
        {
            let mut state = self.0.lock();
            state.closed = true;
            state.sender_gone = true;
        }
        self.0.ready.notify_one();
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let last = {
            let mut state = self.0.lock();
            state.senders -= 1;
            state.sender_gone |= state.senders == 0;
            state.senders == 0
        };
        if last {
            self.0.ready.notify_one();
        }
    }
}

impl<T> Receiver<T> {
    /// Waits until there is at least one item, then moves up to `max` of them to the
    /// end of `buf` (oldest first) and returns how many. Returns 0 once the inbox is
    /// empty and closed, or its sender is gone. Cancel-safe: nothing is taken unless
    /// the call returns.
    pub(crate) async fn recv_many(&mut self, buf: &mut Vec<T>, max: usize) -> usize {
        // Nothing can be taken: waiting for items would never end (tokio's returns too).
        if max == 0 {
            return 0;
        }
        loop {
            // Registered before looking, so an item pushed between the look and the
            // wait still wakes this call.
            let ready = self.0.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            {
                let mut state = self.0.lock();
                let n = take(&mut state.items, buf, max);
                if n > 0 || state.closed || state.sender_gone {
                    return n;
                }
            }
            ready.await;
        }
    }

    /// Moves up to `max` items to the end of `buf` without waiting; returns how many.
    pub(crate) fn try_recv_many(&mut self, buf: &mut Vec<T>, max: usize) -> usize {
        take(&mut self.0.lock().items, buf, max)
    }

    /// Refuses further sends; items already queued can still be received.
    pub(crate) fn close(&mut self) {
        self.0.lock().closed = true;
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // What was queued goes with the receiver, as with `mpsc`: a sender may outlive
        // it for long (a partition worker remembers the queue it used last), and items
        // held on for it would keep whatever they own (a reply's acknowledgement) from
        // ever resolving. Dropped outside the lock: their drops may run code.
        let items = {
            let mut state = self.0.lock();
            state.closed = true;
            std::mem::take(&mut state.items)
        };
        drop(items);
    }
}

/// Moves up to `max` of `items` (oldest first) to the end of `buf`, in time
/// proportional to what is moved.
fn take<T>(items: &mut VecDeque<T>, buf: &mut Vec<T>, max: usize) -> usize {
    let n = items.len().min(max);
    if n == items.len() && buf.is_empty() {
        // The usual case: everything, into an empty batch. The items' buffer becomes
        // the batch (without a copy unless the deque wrapped round), and the batch's
        // already grown one takes the next pushes.
        let spare = VecDeque::from(std::mem::take(buf));
        *buf = Vec::from(std::mem::replace(items, spare));
    } else {
        buf.extend(items.drain(..n));
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn items_arrive_in_order_up_to_max_at_a_time() {
        let (tx, mut rx) = channel();
        for i in 0..5 {
            tx.send(i).unwrap();
        }
        let mut batch = Vec::new();
        assert_eq!(rx.recv_many(&mut batch, 3).await, 3);
        assert_eq!(rx.try_recv_many(&mut batch, 10), 2);
        assert_eq!(batch, [0, 1, 2, 3, 4]);
        assert_eq!(rx.try_recv_many(&mut batch, 10), 0);
    }

    #[test]
    fn order_holds_when_a_few_are_taken_at_a_time_and_the_queue_wraps_round() {
        let (tx, mut rx) = channel();
        let (mut next, mut expected, mut batch) = (0, 0, Vec::new());
        for round in 0..50 {
            for _ in 0..(round % 7 + 1) {
                tx.send(next).unwrap();
                next += 1;
            }
            // A few at a time, as a produce queue does when one slot frees at a time;
            // every fifth round everything, into an empty batch (the handing-over path).
            let want = if round % 5 == 4 { usize::MAX } else { round % 3 + 1 };
            batch.clear();
            let n = rx.try_recv_many(&mut batch, want);
            assert_eq!(batch, (expected..expected + n).collect::<Vec<_>>(), "round {round}");
            expected += n;
        }
        batch.clear();
        rx.try_recv_many(&mut batch, usize::MAX);
        assert_eq!(batch, (expected..next).collect::<Vec<_>>());
    }

    #[test]
    fn items_go_with_the_receiver_while_a_sender_lives_on() {
        let (tx, rx) = channel();
        let item = std::sync::Arc::new(());
        tx.send(item.clone()).unwrap();
        drop(rx);
        assert_eq!(std::sync::Arc::strong_count(&item), 1, "the queued item was dropped with the receiver");
        assert!(tx.send(item.clone()).is_err(), "and later sends are refused");
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_send_from_another_task() {
        let (tx, mut rx) = channel();
        let waiting = tokio::spawn(async move {
            let mut batch = Vec::new();
            rx.recv_many(&mut batch, 10).await;
            batch
        });
        tokio::task::yield_now().await;
        tx.send(7).unwrap();
        let batch = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("woken").expect("task");
        assert_eq!(batch, [7]);
    }

    #[tokio::test]
    async fn a_closed_inbox_refuses_sends_and_still_delivers_what_it_held() {
        let (tx, mut rx) = channel();
        tx.send(1).unwrap();
        rx.close();
        assert!(tx.is_closed());
        assert_eq!(tx.send(2), Err(2), "the item comes back to the sender");
        let mut batch = Vec::new();
        assert_eq!(rx.recv_many(&mut batch, 10).await, 1);
        assert_eq!(rx.recv_many(&mut batch, 10).await, 0, "closed and empty ends the receiver");
        drop(rx);
        assert_eq!(tx.send(3), Err(3));
    }

    #[tokio::test]
    async fn a_dropped_receiver_refuses_sends() {
        let (tx, rx) = channel::<u8>();
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.send(1), Err(1));
    }

    #[tokio::test]
    async fn dropping_the_sender_ends_a_waiting_receiver_after_the_last_item() {
        let (tx, mut rx) = channel();
        tx.send(1).unwrap();
        let mut batch = Vec::new();
        assert_eq!(rx.recv_many(&mut batch, 10).await, 1);
        let waiting = tokio::spawn(async move { rx.recv_many(&mut Vec::new(), 10).await });
        tokio::task::yield_now().await;
        drop(tx);
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("woken").expect("task"), 0);
    }

    #[tokio::test]
    async fn the_receiver_ends_when_the_last_clone_goes_or_a_sender_closes() {
        let (tx, mut rx) = channel();
        let other = tx.clone();
        drop(tx);
        other.send(1).unwrap();
        let mut batch = Vec::new();
        assert_eq!(rx.recv_many(&mut batch, 10).await, 1, "one sender is still there");
        drop(other);
        assert_eq!(rx.recv_many(&mut batch, 10).await, 0, "the last sender went away");

        let (tx, mut rx) = channel();
        let kept = tx.clone();
        tx.send(2).unwrap();
        tx.close();
        assert_eq!(kept.send(3), Err(3), "a closed inbox refuses every sender");
        assert_eq!(rx.recv_many(&mut batch, 10).await, 1, "what was queued still arrives");
        assert_eq!(rx.recv_many(&mut batch, 10).await, 0, "then the receiver ends, clones alive or not");
        assert_eq!(batch, [1, 2]);
    }

    #[tokio::test]
    async fn asking_for_nothing_returns_at_once() {
        let (tx, mut rx) = channel();
        tx.send(1).unwrap();
        let mut batch = Vec::new();
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), rx.recv_many(&mut batch, 0)).await, Ok(0));
        assert_eq!(rx.recv_many(&mut batch, 1).await, 1);
    }

    #[tokio::test]
    async fn a_cancelled_receive_takes_nothing() {
        let (tx, mut rx) = channel();
        let mut batch = Vec::new();
        assert!(tokio::time::timeout(Duration::from_millis(1), rx.recv_many(&mut batch, 10)).await.is_err());
        tx.send(5).unwrap();
        assert_eq!(rx.recv_many(&mut batch, 10).await, 1);
        assert_eq!(batch, [5]);
    }
}
