//! The test proxy in front of a real broker: it sees every request a client sends,
//! also on the connections opened after metadata, and can lose a response on purpose.

#[path = "support/kafka.rs"]
mod kafka_support;

use std::time::Duration;

use kafka_rpc::transport::kafka::KafkaTransport;
use kafka_rpc::transport::{Record, Transport};
use kafka_rpc_testkit::kafka_proxy::api;
use kafka_support::{unique_topic, ProxiedBroker};

async fn read_all(t: &KafkaTransport, topic: &str, want: usize) -> usize {
    let mut reader = t.reader(topic, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    let mut seen = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut offset = 0;
    while seen < want && tokio::time::Instant::now() < deadline {
        let batch = reader.fetch(offset, Duration::from_millis(200)).await.unwrap_or_else(|e| panic!("fetch: {e}"));
        if let Some(last) = batch.last() {
            offset = last.offset + 1;
        }
        seen += batch.len();
    }
    seen
}

#[tokio::test]
async fn the_proxy_sees_every_produce_and_fetch_a_transport_sends() {
    let broker = ProxiedBroker::start();
    let t = kafka_support::connect(broker.config()).await;
    let topic = unique_topic("proxy-count");
    t.ensure_topic(&topic, 1).await.unwrap_or_else(|e| panic!("ensure_topic: {e}"));
    let before = broker.proxy.stats();
    for i in 0..5 {
        t.produce(&topic, 0, vec![Record::new(Some(format!("k{i}")), "v")])
            .await
            .unwrap_or_else(|e| panic!("produce: {e}"));
    }
    assert_eq!(read_all(&t, &topic, 5).await, 5);
    let phase = broker.proxy.stats().since(&before);
    assert!(phase.api(api::PRODUCE).requests >= 1, "no Produce went through the proxy:\n{}", phase.table());
    assert_eq!(phase.api(api::PRODUCE).requests, phase.api(api::PRODUCE).responses);
    assert!(phase.api(api::FETCH).requests >= 1, "no Fetch went through the proxy:\n{}", phase.table());
}

#[tokio::test]
async fn a_cut_response_reaches_the_broker_but_not_the_client() {
    let broker = ProxiedBroker::start();
    let t = kafka_support::connect(broker.config()).await;
    let topic = unique_topic("proxy-cut");
    t.ensure_topic(&topic, 1).await.unwrap_or_else(|e| panic!("ensure_topic: {e}"));
    broker.proxy.cut_response(api::PRODUCE, 1);
    // Whatever the transport does about the lost response (fail, or retry), the
    // record reached the broker.
    let _ = t.produce(&topic, 0, vec![Record::new(Some("k".to_string()), "v")]).await;
    let stats = broker.proxy.stats();
    assert_eq!(stats.cut, 1, "{}", stats.table());
    assert!(read_all(&t, &topic, 1).await >= 1, "the cut produce never reached the broker");
}

/// The port picked as free is taken (here by another broker) before tansu binds it:
/// that must not pass as our broker being ready.
#[test]
fn a_port_taken_before_the_broker_binds_is_not_someone_elses_broker() {
    let taken = kafka_support::bootstrap();
    assert!(!kafka_support::launch_tansu(&taken, &taken), "launched \"our\" tansu on {taken}, which is another broker's port");
}
