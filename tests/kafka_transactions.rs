//! Records of transactional producers (Spring Kafka's transactional `KafkaTemplate`, any
//! producer with a `transactional.id`), read as a read-committed consumer reads them
//! (KIP-98): nothing from a transaction that aborted, nothing past the last stable
//! offset, and the position moved past both.
//!
//! tansu 0.6 has no EndTxn, so no transaction ends there: the transactional batches and
//! their COMMIT/ABORT markers are written raw (`raw_batches`), and a proxy in front of
//! the real broker adds to each read-committed fetch answer what Apache Kafka's would
//! carry and tansu's does not: the aborted transactions overlapping the range answered,
//! and the last stable offset while a transaction is open.

#[path = "support/kafka.rs"]
mod kafka_support;
#[path = "support/raw_batches.rs"]
mod raw_batches;
#[path = "support/rewrite.rs"]
mod rewrite;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::fetch_response::AbortedTransaction;
use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse, ProducerId};
use kafka_rpc::prelude::*;
use kafka_rpc::transport::kafka::KafkaTransport;
use kafka_rpc::transport::{GroupEvent, OffsetReset, Record, Transport};
use kafka_support::{unique_topic, ProxiedBroker};
use rewrite::rewrite;
use serde::{Deserialize, Serialize};

/// Bound on any wait for the broker; a rebalance on tansu takes ~3 s.
const WAIT: Duration = Duration::from_secs(40);

/// The transactions of one partition, as its leader would know them.
#[derive(Default)]
struct Ledger {
    /// Aborted transactions: producer id, first offset, offset of the ABORT marker.
    aborted: Vec<(i64, i64, i64)>,
    /// First offset of the transaction still open, if one is: the last stable offset.
    open: Option<i64>,
}

#[derive(Clone, Default)]
struct Ledgers(Arc<Mutex<HashMap<(String, i32), Ledger>>>);

impl Ledgers {
    fn with<T>(&self, topic: &str, partition: i32, f: impl FnOnce(&mut Ledger) -> T) -> T {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(all.entry((topic.to_string(), partition)).or_default())
    }
}


/// Makes the broker behind `proxy` answer read-committed fetches as Apache Kafka does
/// for the transactions in `ledgers`: each answer lists the aborted transactions whose
/// range overlaps the one answered (`ProducerStateManager` / `LogSegment.collectAbortedTxns`:
/// ended at or after the fetch offset, begun before the end answered), and an open
/// transaction holds the last stable offset at its first offset. The records stay as
/// tansu sends them, past the last stable offset too, as a broker that ignores the
/// isolation level would: the reader must not hand out what lies past it.
fn answer_read_committed(proxy: &kafka_rpc_testkit::KafkaProxy, ledgers: Ledgers) {
    proxy.rewrite_responses(kafka_rpc_testkit::kafka_proxy::api::FETCH, move |request, response| {
        rewrite(ApiKey::Fetch, request, response, |req: &FetchRequest, resp: &mut FetchResponse| answer_as_kafka(&ledgers, req, resp))
    });
}

/// The change [`answer_read_committed`] makes to one fetch answer.
fn answer_as_kafka(ledgers: &Ledgers, req: &FetchRequest, resp: &mut FetchResponse) {
    if req.isolation_level != 1 {
        return;
    }
    for topic in &mut resp.responses {
        let asked: Vec<_> = req.topics.iter().filter(|t| t.topic == topic.topic).flat_map(|t| t.partitions.iter()).collect();
        for p in &mut topic.partitions {
            let Some(asked) = asked.iter().find(|a| a.partition == p.partition_index) else { continue };
            ledgers.with(topic.topic.0.as_str(), p.partition_index, |ledger| {
                let stable = ledger.open.map_or(p.high_watermark, |open| open.min(p.high_watermark));
                p.last_stable_offset = stable;
                let overlapping = ledger.aborted.iter().filter(|(_, first, end)| *end >= asked.fetch_offset && *first < stable);
                p.aborted_transactions = Some(
                    overlapping
                        .map(|(producer, first, _)| AbortedTransaction::default().with_producer_id(ProducerId(*producer)).with_first_offset(*first))
                        .collect(),
                );
            });
        }
    }
}

/// Makes the broker behind `proxy` answer ListOffsets for the latest offset, read
/// committed, as Apache Kafka does while a transaction in `ledgers` is open: with the
/// last stable offset, not the log's end.
fn list_read_committed(proxy: &kafka_rpc_testkit::KafkaProxy, ledgers: Ledgers) {
    use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};
    /// ListOffsets' timestamp for "the latest offset".
    const LATEST: i64 = -1;
    proxy.rewrite_responses(kafka_rpc_testkit::kafka_proxy::api::LIST_OFFSETS, move |request, response| {
        rewrite(ApiKey::ListOffsets, request, response, |req: &ListOffsetsRequest, resp: &mut ListOffsetsResponse| {
            if req.isolation_level != 1 {
                return;
            }
            for topic in &mut resp.topics {
                let asked: Vec<_> = req.topics.iter().filter(|t| t.name == topic.name).flat_map(|t| t.partitions.iter()).collect();
                for p in &mut topic.partitions {
                    let latest = asked.iter().any(|a| a.partition_index == p.partition_index && a.timestamp == LATEST);
                    if let Some(open) = ledgers.with(topic.name.0.as_str(), p.partition_index, |l| l.open).filter(|_| latest) {
                        p.offset = p.offset.min(open);
                    }
                }
            }
        })
    });
}

/// A keyed update: the server remembers the order it applied them in.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Apply(u32);
impl Request for Apply {
    const TYPE: &'static str = "txn.apply";
    type Response = u32;
    fn key(&self) -> Option<Vec<u8>> {
        Some(b"account-7".to_vec())
    }
}

type Applied = Arc<Mutex<Vec<u32>>>;

async fn apply(Apply(n): Apply, _ctx: Context, State(applied): State<Applied>) -> Result<u32, RemoteError> {
    applied.lock().unwrap_or_else(|p| p.into_inner()).push(n);
    Ok(n)
}

/// The headers and value of an `Apply(n)` request as a transactional Spring template
/// would send it, replying to partition 0 of `topic`'s reply topic.
fn request(topic: &str, n: u32) -> (Vec<(String, Bytes)>, Bytes) {
    use kafka_rpc::__private::wire::{request_headers, ReplyAddress, RequestMeta};
    let headers = request_headers(&RequestMeta {
        request_type: Some(Apply::TYPE.into()),
        correlation_id: Some(Bytes::from(n.to_be_bytes().repeat(4))),
        reply_to: Some(ReplyAddress { topic: format!("{topic}.replies").into(), partition: Some(0) }),
        content_type: ContentType::Bincode,
        deadline_ms: None,
        ..Default::default()
    });
    let value = ContentType::Bincode.encode(&Apply(n)).unwrap_or_else(|e| panic!("encode: {e}"));
    (headers.into_iter().map(|h| (h.key.into_owned(), h.value)).collect(), Bytes::from(value))
}

struct Setup {
    broker: ProxiedBroker,
    ledgers: Ledgers,
    transport: Arc<KafkaTransport>,
    topic: String,
    /// The transactional producer writing requests to `topic`.
    producer: Mutex<raw_batches::Producer>,
}

impl Setup {
    async fn start(prefix: &str) -> Setup {
        let broker = ProxiedBroker::start();
        let ledgers = Ledgers::default();
        answer_read_committed(&broker.proxy, ledgers.clone());
        list_read_committed(&broker.proxy, ledgers.clone());
        let transport = Arc::new(kafka_support::connect(broker.config()).await);
        let topic = unique_topic(prefix);
        transport.ensure_topic(&topic, 1).await.unwrap_or_else(|e| panic!("ensure_topic: {e}"));
        let producer = Mutex::new(raw_batches::producer(broker.proxy.addr()));
        Setup { broker, ledgers, transport, topic, producer }
    }

    /// Appends a raw batch to partition 0 of `topic`; its base offset.
    fn append(&self, topic: &str, batch: Vec<u8>) -> i64 {
        raw_batches::produce(self.broker.proxy.addr(), topic, 0, batch).unwrap_or_else(|code| panic!("the broker refused a batch: error {code}"))
    }

    /// Appends `producer`'s batch of `records` to partition 0 of `topic`, in its
    /// transaction there, which opens first if none is: as on Apache Kafka, the last
    /// stable offset stays at a transaction's first offset from before its first batch is
    /// in the log until its marker is (here, the test is the partition's only writer).
    /// Returns the batch's offset.
    async fn transactional_as(&self, producer: &Mutex<raw_batches::Producer>, topic: &str, records: &[(Vec<(String, Bytes)>, Bytes)]) -> i64 {
        let end = self.transport.latest_offset(topic, 0).await.unwrap_or_else(|e| panic!("latest: {e}"));
        self.ledgers.with(topic, 0, |l| *l.open.get_or_insert(end));
        let batch = producer.lock().unwrap_or_else(|p| p.into_inner()).transactional(records);
        self.append(topic, batch)
    }

    /// Ends `producer`'s open transaction on `topic` with its COMMIT (`commit`) or ABORT
    /// marker, and the broker's record of it; the marker's offset.
    fn end_as(&self, producer: &Mutex<raw_batches::Producer>, topic: &str, commit: bool) -> i64 {
        let (marker, id) = {
            let producer = producer.lock().unwrap_or_else(|p| p.into_inner());
            (producer.marker(commit), producer.id)
        };
        let at = self.append(topic, marker);
        self.ledgers.with(topic, 0, |l| {
            let first = l.open.take().unwrap_or_else(|| panic!("no transaction open on {topic}"));
            if !commit {
                l.aborted.push((id, first, at));
            }
        });
        at
    }

    /// A batch of `requests` in the transaction of `topic`'s producer; its offset.
    async fn transaction(&self, requests: &[u32]) -> i64 {
        let records: Vec<_> = requests.iter().map(|&n| request(&self.topic, n)).collect();
        self.transactional_as(&self.producer, &self.topic, &records).await
    }

    fn commit(&self) -> i64 {
        self.end_as(&self.producer, &self.topic, true)
    }

    fn abort(&self) -> i64 {
        self.end_as(&self.producer, &self.topic, false)
    }

    /// A plain (non-transactional) `Apply(n)` request, as a caller without a
    /// transaction writes it.
    async fn plain(&self, n: u32) -> i64 {
        let (headers, value) = request(&self.topic, n);
        let mut record = Record::new(Some(b"account-7".to_vec()), value);
        record.headers = headers.into_iter().map(|(k, v)| kafka_rpc::transport::Header { key: k.into(), value: v }).collect();
        self.transport.produce(&self.topic, 0, vec![record]).await.unwrap_or_else(|e| panic!("produce: {e}"))
    }

    async fn server(&self, group: &str, applied: Applied) -> RpcServer {
        RpcServer::builder(self.transport.clone(), &self.topic)
            .group(group.to_string())
            .partitions(1)
            .commit_interval(Duration::from_millis(20))
            .state(applied)
            .handler(apply)
            .start()
            .await
            .unwrap_or_else(|e| panic!("server: {e}"))
    }

    async fn client(&self) -> ReplyingClient {
        ReplyingClient::builder(self.transport.clone(), &self.topic)
            .partitions(1)
            .timeout(WAIT)
            .start()
            .await
            .unwrap_or_else(|e| panic!("client: {e}"))
    }

    /// Where the next member of `group` starts: what the server committed.
    async fn committed(&self, group: &str) -> i64 {
        let mut member = self
            .transport
            .join_group(group, std::slice::from_ref(&self.topic), OffsetReset::Earliest)
            .await
            .unwrap_or_else(|e| panic!("join: {e}"));
        let assigned = loop {
            match tokio::time::timeout(WAIT, member.events.recv()).await {
                Ok(Some(GroupEvent::Assigned(a))) => break a,
                Ok(Some(_)) => continue,
                other => panic!("no assignment within {WAIT:?}: {other:?}"),
            }
        };
        let _ = member.handle.leave().await;
        assigned.first().map_or(-1, |a| a.offset)
    }
}

fn applied(a: &Applied) -> Vec<u32> {
    a.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A transactional sender rolled back: the update it wrote is never applied, nor
/// answered, and the server passes and commits its offsets like any others. Before,
/// the server fetched read uncommitted and applied the rolled-back update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_an_aborted_transaction_is_never_run_and_is_passed() {
    let s = Setup::start("txn-aborted").await;
    let group = unique_topic("txn-aborted-group");
    let client = s.client().await;
    s.transaction(&[1, 2]).await;
    s.abort();
    let applied_log = Applied::default();
    let server = s.server(&group, applied_log.clone()).await;
    // Same key, same partition, after the aborted transaction: answered only once the
    // server went past it.
    let answer = tokio::time::timeout(WAIT, client.request(Apply(3))).await.unwrap_or_else(|_| panic!("no answer in time"));
    assert_eq!(answer.unwrap_or_else(|e| panic!("request: {e}")), 3);
    assert_eq!(applied(&applied_log), [3], "the aborted updates 1 and 2 must not be applied");
    let end = s.transport.latest_offset(&s.topic, 0).await.unwrap_or_else(|e| panic!("latest: {e}"));
    client.shutdown().await;
    server.shutdown().await.unwrap_or_else(|e| panic!("shutdown: {e}"));
    assert_eq!(s.committed(&group).await, end, "committed past the aborted transaction and the request after it");
}

/// A committed transaction's requests run, in log order with the plain (non
/// transactional) requests written between them, and the aborted one among them does
/// not: offsets 0 txn(1), 1 plain(2), 2 txn(3), 3 COMMIT, 4 txn(4), 5 plain(5), 6 ABORT,
/// 7 plain(6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_transactions_run_in_order_with_plain_requests_and_aborted_ones_do_not() {
    let s = Setup::start("txn-order").await;
    let group = unique_topic("txn-order-group");
    let client = s.client().await;
    s.transaction(&[1]).await;
    s.plain(2).await;
    s.transaction(&[3]).await;
    s.commit();
    s.transaction(&[4]).await;
    s.plain(5).await;
    s.abort();
    s.plain(6).await;
    let applied_log = Applied::default();
    let server = s.server(&group, applied_log.clone()).await;
    let answer = tokio::time::timeout(WAIT, client.request(Apply(7))).await.unwrap_or_else(|_| panic!("no answer in time"));
    assert_eq!(answer.unwrap_or_else(|e| panic!("request: {e}")), 7);
    assert_eq!(applied(&applied_log), [1, 2, 3, 5, 6, 7]);
    client.shutdown().await;
    server.shutdown().await.unwrap_or_else(|e| panic!("shutdown: {e}"));
}

/// While a transaction is open, a reader stops at its first offset (the last stable
/// offset): nothing of it or after it is handed out, and the reported position stays
/// there, until the transaction is decided. Then its records and those after it are
/// read. Before, the reader handed out the open transaction's records, and the
/// records after them, at once.
#[tokio::test]
async fn a_reader_does_not_read_past_the_last_stable_offset() {
    let s = Setup::start("txn-lso").await;
    s.plain(1).await;
    let open = s.transaction(&[2]).await;
    s.plain(3).await;
    let mut reader = s.transport.reader(&s.topic, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    let fetch = reader.read(0, Duration::from_millis(200)).await.unwrap_or_else(|e| panic!("read: {e}"));
    let offsets: Vec<i64> = fetch.records.iter().map(|r| r.offset).collect();
    assert_eq!((offsets, fetch.next_offset), (vec![0], open), "only what precedes the open transaction");
    let fetch = reader.read(open, Duration::from_millis(200)).await.unwrap_or_else(|e| panic!("read: {e}"));
    assert!(fetch.records.is_empty(), "read past the last stable offset: {:?}", fetch.records);
    assert_eq!(fetch.next_offset, open);

    let commit = s.commit();
    let (mut offset, mut read) = (open, Vec::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    while offset <= commit {
        assert!(tokio::time::Instant::now() < deadline, "read to {commit} in {WAIT:?}; at {offset}");
        let fetch = reader.read(offset, Duration::from_millis(200)).await.unwrap_or_else(|e| panic!("read: {e}"));
        read.extend(fetch.records.iter().map(|r| r.offset));
        offset = fetch.next_offset;
    }
    assert_eq!(read, [open, open + 1], "the committed transaction, then the record after it");
    assert_eq!(offset, commit + 1, "past the commit marker");
}

/// A broker that ignores the isolation level sends the records past the last stable
/// offset, which the reader drops: it has nothing for its reader. Apache Kafka answers
/// nothing past the last stable offset and so holds such a fetch for its max-wait;
/// before, the fetch session asked again as soon as the answer came, for as long as the
/// transaction stayed open: a fetch every round trip from a broker that answers at once
/// when it has data (tansu answers after half the wait, so twice as many fetches here).
/// It now asks again only once the fetch wait has passed since it asked, and the
/// records are read once the transaction commits.
#[tokio::test]
async fn a_reader_held_at_an_open_transaction_fetches_no_more_often_than_the_fetch_wait() {
    use kafka_rpc_testkit::kafka_proxy::api;
    const FETCH_WAIT: Duration = Duration::from_millis(500);
    const READ: Duration = Duration::from_secs(4);
    let s = Setup::start("txn-hold").await;
    s.plain(1).await;
    let open = s.transaction(&[2]).await;
    let transport = kafka_support::connect(s.broker.config().fetch_max_wait(FETCH_WAIT)).await;
    let mut reader = transport.reader(&s.topic, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    let fetch = reader.read(0, READ).await.unwrap_or_else(|e| panic!("read: {e}"));
    assert_eq!(fetch.next_offset, open, "read up to the open transaction");

    let before = s.broker.proxy.stats();
    let fetch = reader.read(open, READ).await.unwrap_or_else(|e| panic!("read: {e}"));
    let fetches = s.broker.proxy.stats().since(&before).api(api::FETCH).requests;
    assert!(fetch.records.is_empty(), "read past the last stable offset: {:?}", fetch.records);
    // One fetch per fetch wait, give or take the one in flight at each end.
    let most = u64::try_from(READ.as_millis() / FETCH_WAIT.as_millis()).unwrap_or(u64::MAX) + 2;
    assert!(fetches <= most, "{fetches} fetches while held {READ:?} at the last stable offset, at most {most} expected");

    s.commit();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "the committed transaction was not read in {WAIT:?}");
        let fetch = reader.read(open, READ).await.unwrap_or_else(|e| panic!("read: {e}"));
        if let Some(first) = fetch.records.first() {
            assert_eq!(first.offset, open, "the committed transaction's record");
            break;
        }
    }
}

/// Read committed, a partition ends at its last stable offset: that is where a reader
/// catching up stops, so it is what the server's lag is measured against (as the Java
/// consumer's `records-lag` is under read_committed) and where a `Latest` reset or a
/// new client's reply listener starts (as Java's `seekToEnd`). Before, it was the high
/// watermark: a partition held at an open transaction showed a lag it could not work
/// off.
#[tokio::test]
async fn a_partition_ends_at_its_last_stable_offset() {
    let s = Setup::start("txn-end").await;
    s.plain(1).await;
    let open = s.transaction(&[2, 3]).await;
    s.plain(4).await;
    let end = || async { s.transport.latest_offset(&s.topic, 0).await.unwrap_or_else(|e| panic!("latest: {e}")) };
    assert_eq!(end().await, open, "held at the open transaction");
    let commit = s.commit();
    assert_eq!(end().await, commit + 1, "decided: the log's end");
}

/// Apache Kafka's out-of-range answer names neither end of the log; the reader looks
/// them up, and its tail takes an offset past the end looked up for records the broker
/// lost, and resets (to the log start, with `OffsetReset::Earliest`: the partition runs
/// again). That end must be the high watermark, not the last stable offset: a reader may
/// sit between the two (started from what a read-uncommitted consumer committed, as the
/// Java consumer reads by default), and an offset there is in the log. The answer here
/// is one a leader that has not caught up yet gives; the next fetch finds the offset.
#[tokio::test]
async fn an_out_of_range_answer_past_the_last_stable_offset_names_the_high_watermark() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = Setup::start("txn-oor").await;
    s.plain(1).await;
    let open = s.transaction(&[2]).await;
    let at = s.plain(3).await + 1;
    assert!(open < at, "the reader sits past the last stable offset");
    let (ledgers, injected) = (s.ledgers.clone(), Arc::new(AtomicBool::new(false)));
    s.broker.proxy.rewrite_responses(kafka_rpc_testkit::kafka_proxy::api::FETCH, move |request, response| {
        rewrite(ApiKey::Fetch, request, response, |req: &FetchRequest, resp: &mut FetchResponse| {
            answer_as_kafka(&ledgers, req, resp);
            // The reader's fetch (not an end look-up's, which takes one byte), once.
            let reader = req.topics.iter().flat_map(|t| t.partitions.iter()).any(|p| p.fetch_offset == at && p.partition_max_bytes > 1);
            if reader && !injected.swap(true, Ordering::SeqCst) {
                for p in resp.responses.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                    (p.error_code, p.high_watermark, p.last_stable_offset, p.log_start_offset) = (1, -1, -1, -1);
                    p.aborted_transactions = None;
                    p.records = None;
                }
            }
        })
    });
    let mut reader = s.transport.reader(&s.topic, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    match reader.read(at, Duration::from_millis(200)).await {
        Err(kafka_rpc::transport::TransportError::OffsetOutOfRange { offset, latest, .. }) => {
            assert!(offset <= latest, "{offset} is in the log, which ends at {at}; reported: {latest}");
        }
        other => panic!("expected the injected out-of-range answer: {other:?}"),
    }
}

/// The end is read on a connection kept between look-ups; one the broker closed
/// meanwhile (Apache Kafka closes idle connections after `connections.max.idle.ms`) is
/// replaced, not reported as a failure: a client starting after a quiet spell reads its
/// reply partition's end this way.
#[tokio::test]
async fn a_kept_connection_closed_by_the_broker_does_not_fail_the_next_end_look_up() {
    let s = Setup::start("txn-end-conn").await;
    s.plain(1).await;
    assert_eq!(s.transport.latest_offset(&s.topic, 0).await.unwrap_or_else(|e| panic!("latest: {e}")), 1);
    s.plain(2).await;
    // The next fetch the proxy sees, the look-up's on the kept connection, is answered by
    // closing that connection.
    s.broker.proxy.cut_response(kafka_rpc_testkit::kafka_proxy::api::FETCH, 1);
    let end = s.transport.latest_offset(&s.topic, 0).await;
    assert_eq!(end.unwrap_or_else(|e| panic!("the look-up failed on the closed connection: {e}")), 2);
    assert_eq!(s.broker.proxy.stats().cut, 1, "the kept connection was the one closed");
}

/// The client's reply listener reads through the same reader: a reply written in a
/// transaction that aborted does not complete the call; the reply after it does.
/// Before, the call completed with the rolled-back reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_in_an_aborted_transaction_does_not_complete_the_call() {
    use kafka_rpc::__private::wire::{decode_request, reply_record};
    use kafka_rpc::wire::Peer;
    let s = Setup::start("txn-reply").await;
    let client = s.client().await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.request(Apply(1)).await }
    });
    // Play the server: read the request for its correlation id and reply address.
    let mut reader = s.transport.reader(&s.topic, 0).await.unwrap_or_else(|e| panic!("reader: {e}"));
    let deadline = tokio::time::Instant::now() + WAIT;
    let request = loop {
        assert!(tokio::time::Instant::now() < deadline, "the request reached the log in {WAIT:?}");
        let fetch = reader.read(0, Duration::from_millis(200)).await.unwrap_or_else(|e| panic!("read: {e}"));
        if let Some(r) = fetch.records.into_iter().next() {
            break r;
        }
    };
    let meta = decode_request(&request.record).unwrap_or_else(|e| panic!("decode the request: {e}"));
    let correlation = meta.correlation_id.clone().unwrap_or_else(|| panic!("a correlation id"));
    let reply_to = meta.reply_to.clone().unwrap_or_else(|| panic!("a reply address"));
    let (reply_topic, reply_partition) = (reply_to.topic.to_string(), reply_to.partition.unwrap_or(0));
    assert_eq!(reply_partition, 0, "the client replies on partition 0 of its one");
    let reply = |n: u32| {
        let value = ContentType::Bincode.encode(&n).unwrap_or_else(|e| panic!("encode: {e}"));
        reply_record(Peer::Native, None, correlation.clone(), ContentType::Bincode, Ok(value), 0)
    };

    let rolled_back = reply(666);
    let headers: Vec<(String, Bytes)> =
        rolled_back.headers.iter().map(|h| (h.key.to_string(), h.value.clone())).collect();
    // The reply topic's own transactional producer (sequence numbers are per partition).
    let replier = Mutex::new(raw_batches::producer(s.broker.proxy.addr()));
    s.transactional_as(&replier, &reply_topic, &[(headers, rolled_back.value.clone().unwrap_or_default())]).await;
    s.end_as(&replier, &reply_topic, false);
    s.transport.produce(&reply_topic, 0, vec![reply(1)]).await.unwrap_or_else(|e| panic!("produce the reply: {e}"));

    let answer = tokio::time::timeout(WAIT, call).await.unwrap_or_else(|_| panic!("no answer in time"));
    assert_eq!(answer.unwrap_or_else(|e| panic!("join: {e}")).unwrap_or_else(|e| panic!("request: {e}")), 1, "not the aborted reply");
    client.shutdown().await;
}

