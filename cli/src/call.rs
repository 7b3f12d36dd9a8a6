//! `kafka-rpc call`: one request, its reply on stdout.
//!
//! The body is sent as JSON whatever the peer: a kafka-rpc server answers in the codec
//! it was asked in, and Spring and NestJS services speak JSON anyway. So the reply is
//! JSON too, and printed as such without knowing the service's types.

use std::time::Duration;

use kafka_rpc::client::{ReplyingClient, RequestOptions};
use kafka_rpc::codec::ContentType;
use kafka_rpc::wire::Peer;
use serde_json::Value;

use crate::broker::{self, BrokerArgs};
use crate::failure::Failure;

/// Whose conventions the service follows (see docs/interop.md).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum PeerArg {
    /// A kafka-rpc server.
    #[default]
    Native,
    /// A Spring Kafka `@KafkaListener` with `@SendTo`.
    Spring,
    /// A NestJS `@MessagePattern` (the topic is the pattern).
    Nestjs,
}

impl From<PeerArg> for Peer {
    fn from(peer: PeerArg) -> Peer {
        match peer {
            PeerArg::Native => Peer::Native,
            PeerArg::Spring => Peer::Spring,
            PeerArg::Nestjs => Peer::Nest,
        }
    }
}

/// Arguments of `kafka-rpc call`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Request topic (for NestJS, the message pattern). It must exist.
    #[arg(long)]
    topic: String,
    /// Request type the server dispatches on (the `kafka_rpc-type` header).
    #[arg(long = "type", value_name = "NAME")]
    request_type: String,
    /// Request body as JSON.
    #[arg(long, value_name = "JSON")]
    json: String,
    /// Partition key (UTF-8); requests with one key are handled in order.
    #[arg(long)]
    key: Option<String>,
    /// How long to wait for the reply; also sent as the request's deadline.
    #[arg(long, default_value = "5s", value_parser = crate::duration::parse)]
    timeout: Duration,
    /// Conventions of the service.
    #[arg(long, value_enum, default_value_t)]
    peer: PeerArg,
    /// Topic the reply comes back on (created when missing); defaults to
    /// `<topic>.replies`, or `<topic>.reply` for NestJS.
    #[arg(long)]
    reply_topic: Option<String>,
}

/// Sends the request and prints the reply, pretty JSON on stdout.
pub async fn run(args: Args) -> Result<(), Failure> {
    // Bad input fails before anything touches the network.
    let body: Value = serde_json::from_str(&args.json).map_err(|e| Failure::Usage(format!("--json is not valid JSON: {e}")))?;
    let transport = args.broker.connect().await?;
    broker::existing_topic(&transport, &args.topic).await?;

    let mut builder = ReplyingClient::builder(transport, &args.topic)
        .peer(args.peer.into())
        .content_type(ContentType::Json)
        .timeout(args.timeout);
    if let Some(reply_topic) = args.reply_topic {
        builder = builder.reply_topic(reply_topic);
    }
    let client = builder.start().await?;
    let mut options = RequestOptions::new().timeout(args.timeout);
    if let Some(key) = args.key {
        options = options.key(key.into_bytes());
    }
    let outcome = client.request_named::<_, Value>(args.request_type, &body, options).await;
    client.shutdown().await;
    let reply = outcome?;
    let text = serde_json::to_string_pretty(&reply).map_err(|e| Failure::Other(format!("cannot print the reply: {e}")))?;
    crate::failure::write_stdout(&format!("{text}\n"))?;
    Ok(())
}
