//! The local clock, read one way everywhere (record timestamps, deadlines, retention),
//! and the one way to add a timeout to a time: a timeout too long for the clock (say
//! `Duration::MAX`, "no limit") means no limit, never an overflow.

use std::time::Duration;

use tokio::time::Instant;

/// Milliseconds since the Unix epoch, by the local clock; 0 if the clock is set before 1970.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `ms` (milliseconds since the epoch) plus `d`, saturating.
pub(crate) fn ms_after(ms: i64, d: Duration) -> i64 {
    ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `start + timeout`, or about 30 years after `start` when the sum is past what an
/// `Instant` holds (as tokio's own `sleep` does).
pub(crate) fn instant_after(start: Instant, timeout: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    start.checked_add(timeout).unwrap_or_else(|| start + FAR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_beyond_the_clock_saturates() {
        assert_eq!(ms_after(1_000, Duration::from_millis(500)), 1_500);
        assert_eq!(ms_after(1_000, Duration::MAX), i64::MAX);
        let start = Instant::now();
        assert_eq!(instant_after(start, Duration::from_secs(1)), start + Duration::from_secs(1));
        assert!(instant_after(start, Duration::MAX) > start + Duration::from_secs(86_400 * 365));
    }
}
