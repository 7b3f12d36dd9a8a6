//! The one retry pause: exponential, capped, reset after a success.
//!
//! Every loop that retries a broker call (partition tails, produce retries, group
//! rejoins, metadata polls, the CLI's `inspect`) pauses with a [`Backoff`], so an outage
//! neither spins a core nor leaves a caller waiting longer than the cap once the broker
//! is back. Public only through the hidden `__private`, for the CLI.

use std::time::Duration;

use tokio::time::Instant;

/// Doubling pauses from `first` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Pauses start at `first` and double up to `max`.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Backoff { first, max, next: first }
    }

    /// The next pause; each call doubles the one after it, up to the cap.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        // Saturating: a cap near `Duration::MAX` must not make the doubling panic.
        self.next = self.next.saturating_mul(2).min(self.max);
        pause
    }

    /// The next pause if, slept in full, it still ends before `deadline`; `None`
    /// means the caller has run out of time and should give up.
    pub fn next_pause_before(&mut self, deadline: Instant) -> Option<Duration> {
        let pause = self.next_pause();
        (crate::clock::instant_after(Instant::now(), pause) <= deadline).then_some(pause)
    }

    /// Starts over from the first pause, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_reset_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
        let pauses: Vec<u64> = (0..5).map(|_| b.next_pause().as_millis() as u64).collect();
        assert_eq!(pauses, [10, 20, 40, 50, 50]);
        b.reset();
        assert_eq!(b.next_pause(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cap_beyond_any_clock_neither_overflows_nor_pauses_past_the_deadline() {
        let mut b = Backoff::new(Duration::from_secs(u64::MAX / 2), Duration::MAX);
        let deadline = Instant::now() + Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(b.next_pause_before(deadline), None);
        }
        assert_eq!(b.next_pause(), Duration::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn no_pause_is_offered_past_the_deadline() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        let deadline = Instant::now() + Duration::from_millis(35);
        assert_eq!(b.next_pause_before(deadline), Some(Duration::from_millis(10)));
        assert_eq!(b.next_pause_before(deadline), Some(Duration::from_millis(20)));
        assert_eq!(b.next_pause_before(deadline), None);
    }
}
