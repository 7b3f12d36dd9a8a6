//! Waiting on a stop flag shared through a `watch` channel.

use tokio::sync::watch;

/// Resolves once the flag is true (or its sender is gone). Returns nothing, so no
/// borrow of the channel is held across the caller's other awaits.
pub(crate) async fn requested(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}
