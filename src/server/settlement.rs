//! A record's settlement: what must happen before the committable position may pass
//! it (its reply produced and, with idempotency, its outcome recorded durably), and
//! the queue that yields settlements in offset order.

use super::idempotency::Durable;
use super::replier::Ack;

/// Resolves to the offsets of a record (or of a batch, `first..=offset`) and whether
/// all of it was answered, once its replies were produced (and, with idempotency, its
/// outcomes recorded durably). A named future rather than a boxed one: one is queued
/// for every record.
pub(super) struct Settled {
    first: i64,
    offset: i64,
    ack: Option<Ack>,
    /// With idempotency: the record of the outcome becoming durable.
    durable: Option<Durable>,
    /// The replies of a batch; empty (no allocation) for a single record.
    more: Vec<Ack>,
    /// The outcome records of a batch, with idempotency.
    more_durable: Vec<Durable>,
    /// Whether every acknowledgement resolved so far said "produced"; starts true.
    answered: bool,
}

impl Settled {
    /// The settlement of the record at `offset`.
    pub(super) fn one(offset: i64, ack: Option<Ack>, durable: Option<Durable>) -> Settled {
        Settled { first: offset, offset, ack, durable, more: Vec::new(), more_durable: Vec::new(), answered: true }
    }

    /// The settlement of the batch `first..=last`, to which each reply's
    /// acknowledgement and durable record is added.
    pub(super) fn batch(first: i64, last: i64) -> Settled {
        Settled { offset: last, ..Settled::one(first, None, None) }
    }

    /// Adds a reply of the batch.
    pub(super) fn add_ack(&mut self, ack: Ack) {
        self.more.push(ack);
    }

    /// Adds an outcome record of the batch (with idempotency).
    pub(super) fn add_durable(&mut self, durable: Durable) {
        self.more_durable.push(durable);
    }

    /// The outcome records this settlement still waits for.
    fn take_durables(&mut self) -> impl Iterator<Item = Durable> + use<> {
        self.durable.take().into_iter().chain(std::mem::take(&mut self.more_durable))
    }
}

impl std::future::Future for Settled {
    type Output = (i64, i64, bool);

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<(i64, i64, bool)> {
        let this = self.get_mut();
        // A dropped acknowledgement means the reply was never produced. Each one is
        // taken once it resolved, so a later poll does not wait on it again.
        if let Some(ack) = this.ack.as_mut() {
            this.answered &= std::task::ready!(std::pin::Pin::new(ack).poll(cx)).unwrap_or(false);
            this.ack = None;
        }
        while let Some(ack) = this.more.last_mut() {
            this.answered &= std::task::ready!(std::pin::Pin::new(ack).poll(cx)).unwrap_or(false);
            this.more.pop();
        }
        // The durable tasks only count and log; a panic in one is no reason to hold the offset.
        if let Some(durable) = this.durable.as_mut() {
            let _ = std::task::ready!(std::pin::Pin::new(durable).poll(cx));
            this.durable = None;
        }
        while let Some(durable) = this.more_durable.last_mut() {
            let _ = std::task::ready!(std::pin::Pin::new(durable).poll(cx));
            this.more_durable.pop();
        }
        std::task::Poll::Ready((this.first, this.offset, this.answered))
    }
}

/// The settlements of a partition's records, queued in offset order and yielded in
/// that order.
///
/// Only the oldest is polled: the position can pass a record only after every record
/// before it, so a later settlement that resolves first would wait anyway. Unlike a
/// `FuturesOrdered`, this allocates nothing per record (it was ~400 instructions of
/// each embedded round trip).
#[derive(Default)]
pub(super) struct InOrder(std::collections::VecDeque<Settled>, Vec<Durable>);

impl InOrder {
    pub(super) fn push_back(&mut self, mut settled: Settled) {
        // Outcome records of forgotten settlements: their records are read again and
        // answered from the window, so the position must not pass them before these are durable.
        for durable in self.1.drain(..) {
            settled.add_durable(durable);
        }
        self.0.push_back(settled);
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// Nothing is pending: no settlement, and no outcome record carried over.
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty() && self.1.is_empty()
    }

    /// Lets the position pass offsets up to `last` that hold nothing to answer
    /// (transaction markers, unreadable batches), once everything queued before them
    /// settled. The last queued settlement is stretched over them (its record settles
    /// them: nothing lies between) rather than another queued, so a partition that only
    /// passes such offsets while a reply is slow grows nothing per read.
    pub(super) fn pass_to(&mut self, last: i64) {
        match self.0.back_mut() {
            Some(back) => back.offset = back.offset.max(last),
            None => self.push_back(Settled::one(last, None, None)),
        }
    }

    /// Forgets every pending settlement (their records are read again), keeping the
    /// outcome records they waited for: the next settlement waits for them.
    pub(super) fn clear(&mut self) {
        let InOrder(pending, carried) = self;
        carried.extend(pending.drain(..).flat_map(|mut settled| settled.take_durables()));
    }
}

impl futures::Stream for InOrder {
    type Item = (i64, i64, bool);

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        let queue = &mut self.get_mut().0;
        let Some(oldest) = queue.front_mut() else { return std::task::Poll::Ready(None) };
        let settled = std::task::ready!(std::future::Future::poll(std::pin::Pin::new(oldest), cx));
        queue.pop_front();
        std::task::Poll::Ready(Some(settled))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::sync::oneshot;

    use super::*;

    /// An acknowledgement that reports the record unanswered.
    fn unanswered() -> Ack {
        let (ack, acked) = tokio::sync::oneshot::channel();
        let _ = ack.send(false);
        acked
    }

    #[tokio::test]
    async fn settlements_come_out_in_offset_order_and_a_dropped_ack_is_unanswered() {
        let (first, first_acked) = oneshot::channel();
        let (second, second_acked) = oneshot::channel::<bool>();
        let mut queue = InOrder::default();
        queue.push_back(Settled::one(7, Some(first_acked), None));
        queue.push_back(Settled::one(8, Some(second_acked), None));
        drop(second);
        assert!(futures::poll!(queue.next()).is_pending(), "the later record resolved first, and waits");
        first.send(true).unwrap();
        assert_eq!(queue.next().await, Some((7, 7, true)));
        assert_eq!(queue.next().await, Some((8, 8, false)), "a reply never produced leaves its record unanswered");
        assert_eq!(queue.len(), 0);
    }

    #[tokio::test]
    async fn a_batch_is_answered_only_when_every_reply_was() {
        let (acks, acked): (Vec<_>, Vec<_>) = (0..3).map(|_| oneshot::channel()).unzip();
        let mut batch = Settled::batch(10, 12);
        for ack in acked {
            batch.add_ack(ack);
        }
        for (i, ack) in acks.into_iter().enumerate() {
            ack.send(i != 1).unwrap();
        }
        assert_eq!(batch.await, (10, 12, false));
        assert_eq!(Settled::one(3, Some(unanswered()), None).await, (3, 3, false));
    }

    #[tokio::test]
    async fn offsets_passed_over_settle_with_the_record_before_them() {
        let (ack, acked) = oneshot::channel();
        let mut queue = InOrder::default();
        queue.push_back(Settled::one(4, Some(acked), None));
        queue.pass_to(5);
        queue.pass_to(9);
        assert_eq!(queue.len(), 1, "stretched, not queued");
        assert!(futures::poll!(queue.next()).is_pending(), "not before the record's reply");
        ack.send(true).unwrap();
        assert_eq!(queue.next().await, Some((4, 9, true)));
        queue.pass_to(12);
        assert_eq!(queue.next().await, Some((12, 12, true)), "nothing before them: at once");
    }
}
