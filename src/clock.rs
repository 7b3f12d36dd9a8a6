//! The local clock, read one way everywhere (record timestamps, deadlines, retention).

/// Milliseconds since the Unix epoch, by the local clock; 0 if the clock is set before 1970.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
