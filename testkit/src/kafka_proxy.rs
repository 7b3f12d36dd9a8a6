//! A Kafka-aware TCP proxy: counts requests per API key and injects faults.
//!
//! Start the broker so that it *advertises* the proxy's address (tansu's
//! `--advertised-listener-url`): clients then reach the broker only through the
//! proxy, also for the connections they open after reading metadata. The proxy
//! forwards bytes unchanged unless told to rewrite them; it reads just enough of each
//! frame (the request header's API key and correlation id, the response's correlation
//! id) to
//!
//! - count requests, responses and their bytes per API key ([`KafkaProxy::stats`]),
//!   which is what a broker-side request breakdown needs,
//! - lose an acknowledgement on purpose ([`KafkaProxy::cut_response`]): the request
//!   reaches the broker, which acts on it, but the client's connection is closed
//!   instead of receiving the response — the "appended, ack lost" fault that makes a
//!   producer retry;
//! - rewrite the responses of one API ([`KafkaProxy::rewrite_responses`]), so a
//!   test can make one broker answer as another would (tansu as Apache Kafka).
//!
//! ```no_run
//! use kafka_rpc_testkit::kafka_proxy::{api, KafkaProxy};
//!
//! let proxy = KafkaProxy::bind().expect("a free port");
//! // start the broker with --advertised-listener-url tcp://{proxy.addr()}, listening on
//! // its own port, then:
//! proxy.forward_to("127.0.0.1:9092");
//! proxy.cut_response(api::PRODUCE, 3); // the third Produce from now loses its response
//! // ... run the client ...
//! println!("{}", proxy.stats().table());
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// Kafka API keys the proxy names in its reports.
pub mod api {
    /// Produce.
    pub const PRODUCE: i16 = 0;
    /// Fetch.
    pub const FETCH: i16 = 1;
    /// ListOffsets.
    pub const LIST_OFFSETS: i16 = 2;
    /// Metadata.
    pub const METADATA: i16 = 3;
    /// OffsetCommit.
    pub const OFFSET_COMMIT: i16 = 8;
    /// OffsetFetch.
    pub const OFFSET_FETCH: i16 = 9;
    /// FindCoordinator.
    pub const FIND_COORDINATOR: i16 = 10;
    /// JoinGroup.
    pub const JOIN_GROUP: i16 = 11;
    /// Heartbeat.
    pub const HEARTBEAT: i16 = 12;
    /// LeaveGroup.
    pub const LEAVE_GROUP: i16 = 13;
    /// SyncGroup.
    pub const SYNC_GROUP: i16 = 14;
    /// ApiVersions.
    pub const API_VERSIONS: i16 = 18;
    /// CreateTopics.
    pub const CREATE_TOPICS: i16 = 19;
    /// InitProducerId.
    pub const INIT_PRODUCER_ID: i16 = 22;

    /// The API's name, or its number when the proxy does not know it.
    pub fn name(key: i16) -> String {
        let known = match key {
            PRODUCE => "Produce",
            FETCH => "Fetch",
            LIST_OFFSETS => "ListOffsets",
            METADATA => "Metadata",
            OFFSET_COMMIT => "OffsetCommit",
            OFFSET_FETCH => "OffsetFetch",
            FIND_COORDINATOR => "FindCoordinator",
            JOIN_GROUP => "JoinGroup",
            HEARTBEAT => "Heartbeat",
            LEAVE_GROUP => "LeaveGroup",
            SYNC_GROUP => "SyncGroup",
            17 => "SaslHandshake",
            API_VERSIONS => "ApiVersions",
            CREATE_TOPICS => "CreateTopics",
            INIT_PRODUCER_ID => "InitProducerId",
            36 => "SaslAuthenticate",
            _ => return format!("api-{key}"),
        };
        known.to_string()
    }
}

/// Frames larger than this are not Kafka traffic we expect; the connection is closed
/// rather than buffering them.
const MAX_FRAME: usize = 256 * 1024 * 1024;

/// Traffic of one API key through the proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApiTraffic {
    /// Requests forwarded to the broker.
    pub requests: u64,
    /// Bytes of those requests, size prefixes included.
    pub request_bytes: u64,
    /// Responses relayed to clients.
    pub responses: u64,
    /// Bytes of those responses, size prefixes included.
    pub response_bytes: u64,
    /// Time the broker held those requests (request forwarded to response read), in
    /// microseconds, summed: how long each API costs at the broker, a fetch's max-wait
    /// included.
    pub broker_micros: u64,
}

/// A snapshot of the proxy's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Traffic per API key.
    pub by_api: BTreeMap<i16, ApiTraffic>,
    /// Client connections accepted so far.
    pub connections: u64,
    /// Responses withheld by [`KafkaProxy::cut_response`].
    pub cut: u64,
}

impl Stats {
    /// Traffic of one API key (zero when none passed).
    pub fn api(&self, key: i16) -> ApiTraffic {
        self.by_api.get(&key).copied().unwrap_or_default()
    }

    /// The counters that grew since `earlier`, for measuring one phase of a run.
    pub fn since(&self, earlier: &Stats) -> Stats {
        let by_api = self
            .by_api
            .iter()
            .map(|(k, now)| {
                let then = earlier.api(*k);
                let delta = ApiTraffic {
                    requests: now.requests - then.requests,
                    request_bytes: now.request_bytes - then.request_bytes,
                    responses: now.responses - then.responses,
                    response_bytes: now.response_bytes - then.response_bytes,
                    broker_micros: now.broker_micros - then.broker_micros,
                };
                (*k, delta)
            })
            .filter(|(_, d)| d.requests > 0 || d.responses > 0)
            .collect();
        Stats { by_api, connections: self.connections - earlier.connections, cut: self.cut - earlier.cut }
    }

    /// A markdown table: requests, mean request size, mean response size and mean time
    /// at the broker per API. With `seconds`, requests per second too.
    pub fn table_over(&self, seconds: Option<f64>) -> String {
        let mut out = String::from(
            "| API | requests | requests/s | mean request B | mean response B | mean broker ms |\n|---|---:|---:|---:|---:|---:|\n",
        );
        for (key, t) in &self.by_api {
            let rate = match seconds {
                Some(s) if s > 0.0 => format!("{:.0}", t.requests as f64 / s),
                _ => "-".to_string(),
            };
            let mean = |bytes: u64, n: u64| bytes.checked_div(n).unwrap_or(0);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.2} |",
                api::name(*key),
                t.requests,
                rate,
                mean(t.request_bytes, t.requests),
                mean(t.response_bytes, t.responses),
                mean(t.broker_micros, t.responses) as f64 / 1000.0
            );
        }
        out
    }

    /// [`table_over`](Self::table_over) without rates.
    pub fn table(&self) -> String {
        self.table_over(None)
    }
}

/// A request forwarded to the broker, awaiting its response.
struct Forwarded {
    /// Its API key.
    key: i16,
    /// The response is to be withheld and the connection closed.
    cut: bool,
    /// When it was forwarded, for the time the broker held it.
    at: Instant,
    /// The request (size prefix excluded), kept only when its API's responses are
    /// rewritten: the rewrite needs its version and what it asked.
    request: Option<Vec<u8>>,
}

/// Correlation id → the request awaiting that response.
type Pending = HashMap<i32, Forwarded>;

/// A response rewrite: given the request and its response (each without its size
/// prefix), the response to relay instead, or `None` to relay it unchanged.
type Rewrite = Arc<dyn Fn(&[u8], &[u8]) -> Option<Vec<u8>> + Send + Sync>;

#[derive(Default)]
struct Shared {
    stats: Mutex<Stats>,
    /// Pending faults: API key → how many more requests of it pass before the one
    /// whose response is cut.
    cuts: Mutex<HashMap<i16, u64>>,
    /// Response rewrites per API key.
    rewrites: Mutex<HashMap<i16, Rewrite>>,
    /// API key and client id whose connections get no responses while set.
    /// Each hold is numbered, so a connection a released hold caught is not caught
    /// again by a later hold it does not match.
    hold: Mutex<Option<(i16, String, u64)>>,
    holds: AtomicU64,
    hold_released: Condvar,
    /// Live sockets, so that dropping the proxy closes every connection.
    sockets: Mutex<Vec<TcpStream>>,
    stopped: AtomicBool,
    /// The broker's address once known; connections accepted before wait for it.
    upstream: Mutex<Option<String>>,
    upstream_known: Condvar,
}

/// A running proxy. Dropping it stops accepting and closes every connection.
pub struct KafkaProxy {
    addr: String,
    shared: Arc<Shared>,
}

impl KafkaProxy {
    /// Listens on a free 127.0.0.1 port. Connections are accepted but not served
    /// until [`forward_to`](Self::forward_to) names the broker, so the broker can be
    /// started afterwards, advertising [`addr`](Self::addr).
    pub fn bind() -> io::Result<KafkaProxy> {
        KafkaProxy::bind_on("127.0.0.1:0")
    }

    /// As [`bind`](Self::bind), on a given address.
    pub fn bind_on(addr: &str) -> io::Result<KafkaProxy> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?.to_string();
        let shared = Arc::new(Shared::default());
        let accepting = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("kafka-proxy-accept".into())
            .spawn(move || accept_loop(listener, accepting))?;
        Ok(KafkaProxy { addr, shared })
    }

    /// The address clients (and the broker's advertised listener) use.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sets the broker every connection is forwarded to. Only the first call counts.
    pub fn forward_to(&self, upstream: &str) {
        if let Ok(mut slot) = self.shared.upstream.lock() {
            if slot.is_none() {
                *slot = Some(upstream.to_string());
            }
        }
        self.shared.upstream_known.notify_all();
    }

    /// The `nth` request of API `key` from now on (1 = the next one) is forwarded
    /// to the broker, but instead of relaying its response the proxy closes that
    /// client connection (and its broker connection). Later requests pass.
    pub fn cut_response(&self, key: i16, nth: u64) {
        if let Ok(mut cuts) = self.shared.cuts.lock() {
            cuts.insert(key, nth.max(1));
        }
    }

    /// From now on, a connection on which client `client_id` sends a request of API
    /// `key` gets no more responses: they are kept back, the connection stays open, as
    /// with a broker that hangs rather than fails. Until [`release`](Self::release).
    pub fn hold_responses(&self, key: i16, client_id: &str) {
        if let Ok(mut hold) = self.shared.hold.lock() {
            let number = self.shared.holds.fetch_add(1, Ordering::SeqCst) + 1;
            *hold = Some((key, client_id.to_string(), number));
        }
    }

    /// Lets the responses [`hold_responses`](Self::hold_responses) kept back go, in order.
    pub fn release(&self) {
        if let Ok(mut hold) = self.shared.hold.lock() {
            *hold = None;
        }
        self.shared.hold_released.notify_all();
    }

    /// From now on, every response of API `key` is relayed as `rewrite` returns it.
    /// `rewrite` gets the request (whose header tells its API version) and the
    /// broker's response, each without its size prefix, header included; it returns
    /// the response to relay in its place (size prefix excluded, the proxy adds it),
    /// or `None` to relay the broker's unchanged. A later call for the same key
    /// replaces the rewrite.
    pub fn rewrite_responses(&self, key: i16, rewrite: impl Fn(&[u8], &[u8]) -> Option<Vec<u8>> + Send + Sync + 'static) {
        if let Ok(mut rewrites) = self.shared.rewrites.lock() {
            rewrites.insert(key, Arc::new(rewrite));
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for KafkaProxy {
    fn drop(&mut self) {
        {
            // Under the lock a connection registers with: one registered before is
            // shut here, one registering after sees the flag and closes itself.
            let sockets = self.shared.sockets.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.stopped.store(true, Ordering::SeqCst);
            for s in sockets.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.addr);
        // Taking the lock first: a connection that saw no flag is waiting by now, so
        // the notification cannot fall between its check and its wait.
        drop(self.shared.upstream.lock());
        self.shared.upstream_known.notify_all();
        self.release();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        let shared = Arc::clone(&shared);
        let _ = std::thread::Builder::new().name("kafka-proxy-conn".into()).spawn(move || serve(client, shared));
    }
}

fn serve(client: TcpStream, shared: Arc<Shared>) {
    let upstream = {
        let Ok(mut slot) = shared.upstream.lock() else { return };
        loop {
            if let Some(u) = slot.as_ref() {
                break u.clone();
            }
            if shared.stopped.load(Ordering::SeqCst) {
                return;
            }
            slot = match shared.upstream_known.wait(slot) {
                Ok(s) => s,
                Err(_) => return,
            };
        }
    };
    let Ok(broker) = TcpStream::connect(&upstream) else { return };
    let _ = client.set_nodelay(true);
    let _ = broker.set_nodelay(true);
    let (Ok(client_r), Ok(broker_r), Ok(client_w), Ok(broker_w)) =
        (client.try_clone(), broker.try_clone(), client.try_clone(), broker.try_clone())
    else {
        return;
    };
    {
        let mut sockets = shared.sockets.lock().unwrap_or_else(|p| p.into_inner());
        if shared.stopped.load(Ordering::SeqCst) {
            // The proxy was dropped while this connection was being set up.
            let _ = client.shutdown(Shutdown::Both);
            let _ = broker.shutdown(Shutdown::Both);
            return;
        }
        sockets.retain(|s| s.peer_addr().is_ok());
        if let (Ok(c), Ok(b)) = (client.try_clone(), broker.try_clone()) {
            sockets.push(c);
            sockets.push(b);
        }
    }
    if let Ok(mut stats) = shared.stats.lock() {
        stats.connections += 1;
    }
    // Correlation id → API key and forwarding time of requests awaiting their response;
    // a cut request's entry is marked so the response side closes the connection instead.
    let pending: Arc<Mutex<Pending>> = Arc::default();
    // The number of the hold whose request this connection carried (0: none), so its
    // responses wait while that hold lasts.
    let held: Arc<AtomicU64> = Arc::default();
    let close = {
        let (c, b) = (client, broker);
        move || {
            let _ = c.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    };
    let close = Arc::new(close);

    let up_pending = Arc::clone(&pending);
    let up_shared = Arc::clone(&shared);
    let up_close = Arc::clone(&close);
    let up_held = Arc::clone(&held);
    let requests = std::thread::Builder::new().name("kafka-proxy-up".into()).spawn(move || {
        let mut from = BufReader::with_capacity(64 * 1024, client_r);
        let mut to = broker_w;
        while let Ok(frame) = read_frame(&mut from) {
            if frame.len() < 12 {
                break;
            }
            let key = i16::from_be_bytes([frame[4], frame[5]]);
            let correlation = i32::from_be_bytes([frame[8], frame[9], frame[10], frame[11]]);
            let cut = match up_shared.cuts.lock() {
                Ok(mut cuts) => match cuts.get_mut(&key) {
                    Some(left) if *left <= 1 => {
                        cuts.remove(&key);
                        true
                    }
                    Some(left) => {
                        *left -= 1;
                        false
                    }
                    None => false,
                },
                Err(_) => false,
            };
            if let Ok(hold) = up_shared.hold.lock() {
                if let Some((_, _, number)) =
                    hold.as_ref().filter(|(k, client, _)| *k == key && client_id(&frame) == Some(client.as_bytes()))
                {
                    up_held.store(*number, Ordering::SeqCst);
                }
            }
            let rewritten = up_shared.rewrites.lock().is_ok_and(|r| r.contains_key(&key));
            let request = rewritten.then(|| frame[4..].to_vec());
            if let Ok(mut p) = up_pending.lock() {
                p.insert(correlation, Forwarded { key, cut, at: Instant::now(), request });
            }
            if let Ok(mut stats) = up_shared.stats.lock() {
                let t = stats.by_api.entry(key).or_default();
                t.requests += 1;
                t.request_bytes += frame.len() as u64;
            }
            if to.write_all(&frame).is_err() {
                break;
            }
        }
        up_close();
    });

    let mut from = BufReader::with_capacity(64 * 1024, broker_r);
    let mut to = client_w;
    while let Ok(mut frame) = read_frame(&mut from) {
        if frame.len() < 8 {
            break;
        }
        let correlation = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
        let entry = pending.lock().ok().and_then(|mut p| p.remove(&correlation));
        let Some(Forwarded { key, cut, at: forwarded, request }) = entry else {
            // A response to nothing we forwarded: not Kafka as we know it.
            break;
        };
        if cut {
            if let Ok(mut stats) = shared.stats.lock() {
                stats.cut += 1;
            }
            break;
        }
        let held_by = held.load(Ordering::SeqCst);
        if held_by != 0 {
            let Ok(mut hold) = shared.hold.lock() else { break };
            while hold.as_ref().is_some_and(|(_, _, number)| *number == held_by) {
                hold = match shared.hold_released.wait(hold) {
                    Ok(h) => h,
                    Err(_) => break,
                };
            }
        }
        let rewrite = shared.rewrites.lock().ok().and_then(|r| r.get(&key).cloned());
        if let (Some(rewrite), Some(request)) = (rewrite, request) {
            if let Some(body) = rewrite(&request, &frame[4..]) {
                let Ok(size) = i32::try_from(body.len()) else { break };
                frame = size.to_be_bytes().to_vec();
                frame.extend_from_slice(&body);
            }
        }
        if let Ok(mut stats) = shared.stats.lock() {
            let t = stats.by_api.entry(key).or_default();
            t.responses += 1;
            t.response_bytes += frame.len() as u64;
            t.broker_micros += u64::try_from(forwarded.elapsed().as_micros()).unwrap_or(u64::MAX);
        }
        if to.write_all(&frame).is_err() {
            break;
        }
    }
    close();
    if let Ok(handle) = requests {
        let _ = handle.join();
    }
}

/// The client id of a request frame (size prefix included): request header v1 and
/// later put it after the API key, version and correlation id, as an i16-length string.
fn client_id(frame: &[u8]) -> Option<&[u8]> {
    let len = i16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    frame.get(14..14 + usize::try_from(len).ok()?)
}

/// Reads one size-prefixed frame, prefix included.
fn read_frame(from: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut size = [0u8; 4];
    from.read_exact(&mut size)?;
    let len = i32::from_be_bytes(size);
    let len = usize::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "negative frame size"))?;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame too large"));
    }
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&size);
    frame.resize(4 + len, 0);
    from.read_exact(&mut frame[4..])?;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Dropping the proxy closes every client connection, also one it accepted just
    /// before and was still connecting to the broker for.
    #[test]
    fn dropping_the_proxy_closes_a_connection_it_was_still_setting_up() {
        let broker = TcpListener::bind("127.0.0.1:0").expect("bind");
        let upstream = broker.local_addr().expect("addr").to_string();
        // Keeps the broker side of every connection open.
        std::thread::spawn(move || {
            let mut keep = Vec::new();
            for c in broker.incoming().flatten() {
                keep.push(c);
            }
        });
        for round in 0..300 {
            let proxy = KafkaProxy::bind().expect("proxy");
            let mut client = TcpStream::connect(proxy.addr()).expect("connect");
            if round % 2 == 0 {
                proxy.forward_to(&upstream);
            }
            drop(proxy);
            client.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
            let mut buf = [0u8; 1];
            match client.read(&mut buf) {
                Ok(0) => {}
                other => panic!("round {round}: the client's connection outlived the proxy: {other:?}"),
            }
        }
    }

    /// A broker that answers each request with its correlation id and nothing else.
    fn echo_broker() -> String {
        let broker = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = broker.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            for c in broker.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut w = c.try_clone().expect("clone");
                    let mut r = c;
                    while let Ok(frame) = read_frame(&mut r) {
                        let mut response = 4i32.to_be_bytes().to_vec();
                        response.extend_from_slice(&frame[8..12]);
                        if w.write_all(&response).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Sends a request of API `key` from `client_id` and waits up to 2 s for its response.
    fn call(conn: &mut TcpStream, key: i16, correlation: i32, client_id: &str) -> bool {
        let mut body = key.to_be_bytes().to_vec();
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&correlation.to_be_bytes());
        body.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut frame = (body.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        conn.write_all(&frame).expect("write");
        conn.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        read_frame(conn).is_ok_and(|r| r[4..8] == correlation.to_be_bytes())
    }

    /// A connection held once is not held again by a later hold that names another
    /// client: after `release` it is like any other.
    #[test]
    fn a_released_connection_is_not_held_by_a_hold_on_another_client() {
        let proxy = KafkaProxy::bind().expect("proxy");
        proxy.forward_to(&echo_broker());
        let mut a = TcpStream::connect(proxy.addr()).expect("connect");
        assert!(call(&mut a, api::METADATA, 1, "a"), "no hold yet");
        proxy.hold_responses(api::HEARTBEAT, "a");
        assert!(!call(&mut a, api::HEARTBEAT, 2, "a"), "held");
        proxy.release();
        let mut released = [0u8; 8];
        a.read_exact(&mut released).expect("the held response, once released");
        proxy.hold_responses(api::HEARTBEAT, "b");
        assert!(call(&mut a, api::METADATA, 3, "a"), "client a's connection is held by a hold on client b");
    }
}

