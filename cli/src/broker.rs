//! Reaching the broker: the flags every command shares.

use std::time::Duration;

use kafka_rpc::transport::kafka::{KafkaConfig, KafkaTransport};
use kafka_rpc::transport::Transport;

use crate::failure::Failure;

/// Where the broker is and how long to wait for it.
#[derive(clap::Args, Debug)]
pub struct BrokerArgs {
    /// Bootstrap servers, `host:port[,host:port...]`.
    #[arg(long)]
    pub bootstrap: String,
    /// How long the broker may take to answer at all before the command gives up.
    #[arg(long, default_value = "5s", value_parser = crate::duration::parse)]
    pub connect_timeout: Duration,
}

impl BrokerArgs {
    /// Connects to the broker.
    pub async fn connect(&self) -> Result<KafkaTransport, Failure> {
        connect(&self.bootstrap, self.connect_timeout).await
    }
}

/// Connects to `bootstrap`, failing as [`Failure::Unreachable`] after `timeout`.
pub async fn connect(bootstrap: &str, timeout: Duration) -> Result<KafkaTransport, Failure> {
    let config = KafkaConfig::builder(bootstrap)
        .client_id("kafka-rpc-cli")
        .connect_timeout(timeout)
        // Also bounds rskafka's reconnect retries, so a broker that goes away mid-command
        // ends it instead of hanging it.
        .request_timeout(timeout.max(Duration::from_secs(10)))
        .build();
    Ok(KafkaTransport::connect(config).await?)
}

/// The partition count of `topic`, which must exist: a command that names a topic
/// never creates it, so a typo is an error rather than a new, empty topic.
pub async fn existing_topic(transport: &impl Transport, topic: &str) -> Result<i32, Failure> {
    Ok(transport.partition_count(topic).await?)
}
