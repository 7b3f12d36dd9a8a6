//! tansu for the kafka-rpc contenders: the test suite's own launcher, reused so that
//! there is one way to start the broker (on a free port, dying with this process).

#[path = "../../tests/support/kafka.rs"]
mod kafka;

/// The address of a tansu started for this process on first use (or
/// `KAFKA_BOOTSTRAP`). Panics with how to get tansu when there is none.
pub fn tansu() -> String {
    kafka::bootstrap()
}
