//! Test support shared by the integration suites: one environment per transport so
//! the same test body runs on the embedded broker and on a real Kafka-protocol broker.
#![allow(dead_code)]

pub mod kafka;
pub mod process;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kafka_rpc::client::ReplyingClientBuilder;
use kafka_rpc::prelude::*;
use kafka_rpc::server::RpcServerBuilder;

/// A broker to run a test on, with the settings that suit it.
#[derive(Clone)]
pub struct Env {
    pub name: &'static str,
    pub transport: Arc<dyn Transport>,
}

impl Env {
    pub fn embedded() -> Env {
        Env { name: "embedded", transport: Arc::new(EmbeddedBroker::new()) }
    }

    /// The real broker of this test binary (tansu, or `KAFKA_BOOTSTRAP`).
    pub async fn kafka() -> Env {
        Env { name: "kafka", transport: Arc::new(kafka::transport().await) }
    }

    pub fn server(&self, topic: &str) -> RpcServerBuilder {
        RpcServer::builder(self.transport.clone(), topic)
            .partitions(4)
            .commit_interval(Duration::from_millis(50))
    }

    pub fn client(&self, topic: &str) -> ReplyingClientBuilder {
        ReplyingClient::builder(self.transport.clone(), topic).partitions(4)
    }
}

/// A topic name no other test uses.
pub fn unique(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4().simple())
}

/// Waits until `check` holds, polling every 10 ms, or fails with `what`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs each listed `async fn(Env)` once per transport, as `embedded::<name>` and
/// `kafka::<name>`.
#[macro_export]
macro_rules! on_every_transport {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case($crate::support::Env::embedded()).await
                }
            )*
        }
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case($crate::support::Env::kafka().await).await
                }
            )*
        }
    };
}
