//! In-process broker (stub; being implemented).
/// In-process broker.
#[derive(Clone, Debug, Default)]
pub struct EmbeddedBroker;
impl EmbeddedBroker {
    /// New broker.
    pub fn new() -> Self { EmbeddedBroker }
}
