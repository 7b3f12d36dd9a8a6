//! The Kafka transport's produce path against tansu: shared pipelined connections,
//! per-partition order, cancel safety, and the idempotent producer. The
//! lost-acknowledgement tests run a broker of their own behind a proxy that withholds
//! one Produce response after the broker acted on the request.

#[path = "support/kafka.rs"]
mod kafka_support;

use std::time::Duration;

use kafka_rpc::transport::kafka::KafkaTransport;
use kafka_rpc::transport::{Record, Transport, TransportError};
use kafka_rpc_testkit::kafka_proxy::api;
use kafka_support::{config, connect, transport, unique_topic, ProxiedBroker};

/// Bound on any single wait for the broker.
const WAIT: Duration = Duration::from_secs(40);

async fn topic(t: &KafkaTransport, prefix: &str, partitions: i32) -> String {
    let name = unique_topic(prefix);
    let n = t.ensure_topic(&name, partitions).await.unwrap_or_else(|e| panic!("ensure_topic {name}: {e}"));
    assert_eq!(n, partitions, "partition count of the new topic {name}");
    name
}

fn value(v: impl ToString) -> Record {
    Record::new(Some("k"), v.to_string())
}

/// Every value in one partition from offset 0 up to its high watermark.
async fn values(t: &KafkaTransport, topic: &str, partition: i32) -> Vec<String> {
    let end = t.latest_offset(topic, partition).await.unwrap_or_else(|e| panic!("latest offset: {e}"));
    let mut reader = t.reader(topic, partition).await.unwrap_or_else(|e| panic!("reader: {e}"));
    let mut out = Vec::new();
    let mut next = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while next < end {
        assert!(tokio::time::Instant::now() < deadline, "read {topic}-{partition} up to {end} in {WAIT:?}");
        for r in reader.fetch(next, Duration::from_millis(100)).await.unwrap_or_else(|e| panic!("fetch: {e}")) {
            next = r.offset + 1;
            out.push(String::from_utf8_lossy(r.record.value.as_deref().unwrap_or_default()).into_owned());
        }
    }
    out
}

#[tokio::test]
async fn concurrent_batches_to_many_partitions_keep_each_partitions_order() {
    let t = transport().await;
    let name = topic(&t, "produce-order", 8).await;
    let mut tasks = Vec::new();
    for p in 0..8 {
        let (t, name) = (t.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            for b in 0..40 {
                let batch = (0..5).map(|i| value(format!("{p}-{}", b * 5 + i))).collect();
                t.produce(&name, p, batch).await.unwrap_or_else(|e| panic!("produce to {p}: {e}"));
            }
        }));
    }
    for task in tasks {
        task.await.expect("producer task");
    }
    for p in 0..8 {
        let expected: Vec<String> = (0..200).map(|i| format!("{p}-{i}")).collect();
        assert_eq!(values(&t, &name, p).await, expected, "partition {p} holds its records once, in call order");
    }
}

#[tokio::test]
async fn a_produce_dropped_mid_flight_does_not_block_its_partition() {
    let t = transport().await;
    let name = topic(&t, "produce-cancel", 1).await;
    t.produce(&name, 0, vec![value("first")]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    for i in 0..20 {
        // Dropped at some point between queued and answered.
        let _ = tokio::time::timeout(Duration::from_micros(50 * i), t.produce(&name, 0, vec![value("maybe")])).await;
    }
    let last = tokio::time::timeout(WAIT, t.produce(&name, 0, vec![value("last")]))
        .await
        .expect("a produce after dropped ones is answered in time")
        .unwrap_or_else(|e| panic!("produce: {e}"));
    let got = values(&t, &name, 0).await;
    assert_eq!(got.first().map(String::as_str), Some("first"));
    assert_eq!(got.last().map(String::as_str), Some("last"));
    assert_eq!(last, got.len() as i64 - 1, "the offset returned is where the record is");
    assert!(got[1..got.len() - 1].iter().all(|v| v == "maybe"));
}

#[tokio::test]
async fn an_unknown_partition_is_a_typed_error_and_hands_the_records_back() {
    let t = transport().await;
    let name = topic(&t, "produce-unknown", 2).await;
    let err = t.produce(&name, 5, vec![value("a"), value("b")]).await.expect_err("partition 5 does not exist");
    assert!(matches!(&err.error, TransportError::UnknownPartition { partition: 5, .. }), "got {}", err.error);
    let back: Vec<_> = err.records.iter().map(|r| r.value.clone()).collect();
    assert_eq!(back, vec![Some("a".into()), Some("b".into())], "the records come back in order");
}

/// Last session's note said tansu 0.6 hands every InitProducerId caller producer id 1
/// with the next epoch, so that a second producer fences the first. That holds for
/// requests naming the (default) empty transactional id; with none, as this transport
/// asks (version 3), each producer gets an id of its own and nothing fences it.
#[tokio::test]
async fn two_idempotent_producers_on_one_partition_do_not_fence_each_other() {
    let first = connect(config().idempotent_producer(true)).await;
    let name = topic(&first, "produce-two", 1).await;
    first.produce(&name, 0, vec![value("a1")]).await.unwrap_or_else(|e| panic!("first produce: {e}"));
    let second = connect(config().idempotent_producer(true)).await;
    second.produce(&name, 0, vec![value("b1"), value("b2")]).await.unwrap_or_else(|e| panic!("second produce: {e}"));
    let again = tokio::time::timeout(WAIT, first.produce(&name, 0, vec![value("a2")]))
        .await
        .expect("answered, not left hanging");
    assert_eq!(again.map_err(|e| e.error.to_string()), Ok(3), "the first producer still appends after the second started");
    assert_eq!(values(&first, &name, 0).await, ["a1", "b1", "b2", "a2"]);
}

/// Produces "before", then a batch "o1".."o3" with its Produce response withheld by the proxy
/// (the broker appended it; the client's connection closes instead of the answer),
/// then "after", and returns what the partition holds.
async fn produce_through_a_lost_acknowledgement(idempotent: Option<bool>) -> Vec<String> {
    let broker = ProxiedBroker::start();
    let config = match idempotent {
        Some(on) => broker.config().idempotent_producer(on),
        None => broker.config(),
    };
    let t = connect(config).await;
    let name = topic(&t, "produce-lost-ack", 1).await;
    t.produce(&name, 0, vec![value("before")]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    let before = broker.proxy.stats();
    broker.proxy.cut_response(api::PRODUCE, 1);
    tokio::time::timeout(WAIT, t.produce(&name, 0, vec![value("o1"), value("o2"), value("o3")]))
        .await
        .expect("the retry is answered in time")
        .unwrap_or_else(|e| panic!("a lost acknowledgement is retried, not reported: {e}"));
    let during = broker.proxy.stats().since(&before);
    assert_eq!(during.cut, 1, "the proxy withheld one response");
    assert_eq!(during.api(api::PRODUCE).requests, 2, "the batch was sent, then sent again");
    t.produce(&name, 0, vec![value("after")]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    values(&t, &name, 0).await
}

#[tokio::test]
async fn an_idempotent_retry_after_a_lost_acknowledgement_appends_once() {
    assert_eq!(produce_through_a_lost_acknowledgement(Some(true)).await, ["before", "o1", "o2", "o3", "after"]);
}

/// As in Kafka's Java client since 3.0, idempotence is on unless the application
/// turns it off, where the broker supports it (tansu does).
#[tokio::test]
async fn by_default_a_retry_after_a_lost_acknowledgement_appends_once() {
    assert_eq!(produce_through_a_lost_acknowledgement(None).await, ["before", "o1", "o2", "o3", "after"]);
}

/// What the idempotent producer is for: without it the retry appends a second copy
/// (docs/guarantees.md, "Produce retries and duplicates").
#[tokio::test]
async fn without_idempotence_a_lost_acknowledgement_appends_twice() {
    assert_eq!(produce_through_a_lost_acknowledgement(Some(false)).await, ["before", "o1", "o2", "o3", "o1", "o2", "o3", "after"]);
}

/// "A call holds its partition from its first attempt until its outcome is known, so
/// a retry never lets a later batch land before an earlier one": a second call made
/// while the first waits for its lost acknowledgement and resends goes after both
/// copies of the first (no idempotence here, so the resend is appended again and the
/// order of everything in the log shows who went when).
#[tokio::test]
async fn a_call_made_while_another_is_retried_lands_after_it() {
    let broker = ProxiedBroker::start();
    let t = connect(broker.config().idempotent_producer(false)).await;
    let name = topic(&t, "produce-lane", 1).await;
    t.produce(&name, 0, vec![value("before")]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    broker.proxy.cut_response(api::PRODUCE, 1);
    let first = tokio::spawn({
        let (t, name) = (t.clone(), name.clone());
        async move { t.produce(&name, 0, vec![value("o1"), value("o2"), value("o3")]).await }
    });
    // This test's runtime has one thread: the first call runs until it waits on the
    // broker, holding the partition, before the second is made.
    tokio::task::yield_now().await;
    let second = tokio::spawn({
        let (t, name) = (t.clone(), name.clone());
        async move { t.produce(&name, 0, vec![value("later")]).await }
    });
    tokio::time::timeout(WAIT, first).await.expect("the retry is answered in time").unwrap().unwrap_or_else(|e| panic!("first: {e}"));
    tokio::time::timeout(WAIT, second).await.expect("answered in time").unwrap().unwrap_or_else(|e| panic!("second: {e}"));
    assert_eq!(broker.proxy.stats().cut, 1, "the proxy withheld one response");
    assert_eq!(values(&t, &name, 0).await, ["before", "o1", "o2", "o3", "o1", "o2", "o3", "later"]);
}

/// "When a produce gives up with its batch in doubt (its caller went away), the next
/// batch of that partition first takes a new producer id": the dropped batch was
/// appended under sequence n, and a next batch stamped n again would be taken by the
/// broker for a duplicate of it, answered as produced, and never appended.
#[tokio::test]
async fn a_produce_dropped_after_it_was_sent_does_not_swallow_the_next() {
    let broker = ProxiedBroker::start();
    let t = connect(broker.config().client_id("in-doubt").idempotent_producer(true)).await;
    let name = topic(&t, "produce-in-doubt", 1).await;
    t.produce(&name, 0, vec![value("before")]).await.unwrap_or_else(|e| panic!("produce: {e}"));
    let before = broker.proxy.stats();
    broker.proxy.hold_responses(api::PRODUCE, "in-doubt");
    let dropped = tokio::spawn({
        let (t, name) = (t.clone(), name.clone());
        async move { t.produce(&name, 0, vec![value("maybe")]).await }
    });
    // The broker has it (and appends it); its answer is held back.
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.proxy.stats().since(&before).api(api::PRODUCE).requests == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the produce reached the proxy");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    dropped.abort();
    assert!(dropped.await.is_err(), "the caller went away before the answer");
    broker.proxy.release();
    let next = tokio::time::timeout(WAIT, t.produce(&name, 0, vec![value("next")]))
        .await
        .expect("answered in time")
        .unwrap_or_else(|e| panic!("produce: {e}"));
    assert_eq!(values(&t, &name, 0).await, ["before", "maybe", "next"]);
    assert_eq!(next, 2, "the offset returned is where the record is");
}

/// Kafka refuses a produce request holding two batches for one partition (from v3 on,
/// INVALID_RECORD), and a batch over the topic's `max.message.bytes`. So a produce
/// call over the batch size (512 KiB) travels as several requests, one batch each, in
/// order. tansu would accept two batches in one request: the proxy's count of Produce
/// requests is what shows the split.
#[tokio::test]
async fn a_produce_call_over_the_batch_size_is_one_request_per_batch() {
    let broker = ProxiedBroker::start();
    let t = connect(broker.config()).await;
    let name = topic(&t, "produce-large", 1).await;
    let big = "x".repeat(200 * 1024);
    let records: Vec<Record> = (0..7).map(|i| value(format!("{i}{big}"))).collect();
    let before = broker.proxy.stats();
    let first = t.produce(&name, 0, records).await.unwrap_or_else(|e| panic!("produce: {e}"));
    assert_eq!(first, 0);
    assert_eq!(broker.proxy.stats().since(&before).api(api::PRODUCE).requests, 4, "two 200 KiB records to a batch: 2, 2, 2 and 1");
    let got: Vec<String> = values(&t, &name, 0).await.into_iter().map(|v| v[..1].to_string()).collect();
    assert_eq!(got, ["0", "1", "2", "3", "4", "5", "6"]);
}

/// InitProducerId goes over the transport's metadata connection, which may sit idle
/// long enough for the broker to close it. A lost answer there is retried within the
/// request timeout, as a lost Produce answer is, not reported.
#[tokio::test]
async fn a_lost_init_producer_id_answer_is_retried_not_reported() {
    let broker = ProxiedBroker::start();
    let t = connect(broker.config().idempotent_producer(true)).await;
    let name = topic(&t, "produce-lost-init", 1).await;
    let before = broker.proxy.stats();
    broker.proxy.cut_response(api::INIT_PRODUCER_ID, 1);
    tokio::time::timeout(WAIT, t.produce(&name, 0, vec![value("v")]))
        .await
        .expect("answered in time")
        .unwrap_or_else(|e| panic!("a lost InitProducerId answer is retried, not reported: {e}"));
    let during = broker.proxy.stats().since(&before);
    assert_eq!((during.cut, during.api(api::INIT_PRODUCER_ID).requests), (1, 2), "asked, cut off, asked again");
    assert_eq!(values(&t, &name, 0).await, ["v"]);
}
