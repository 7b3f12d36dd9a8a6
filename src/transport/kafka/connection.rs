//! One framed Kafka-protocol connection: size-prefixed requests and responses over
//! TCP (optionally TLS), answered in order.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, RequestHeader, ResponseHeader, SaslAuthenticateRequest, SaslHandshakeRequest,
};
use kafka_protocol::messages::{FetchRequest, FetchResponse};
use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse};
use kafka_protocol::messages::{
    ApiVersionsResponse, FindCoordinatorRequest, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse, FindCoordinatorResponse, HeartbeatRequest, HeartbeatResponse,
    JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, OffsetCommitRequest,
    OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, SaslAuthenticateResponse, SaslHandshakeResponse,
    SyncGroupRequest, SyncGroupResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::transport::kafka::{KafkaConfig, SaslConfig};

/// Largest response accepted; guards against a corrupt size prefix allocating
/// gigabytes.
pub(crate) const MAX_FRAME: usize = 64 * 1024 * 1024;

/// What a [`Call`] over a [`Connection`] can fail with: the consumer-group, produce and
/// fetch code branch on it (Kafka error codes above all) and turn it into a
/// [`TransportError`](crate::transport::TransportError), kept as its source, at the seam.
#[derive(Debug, Clone)]
pub(crate) enum CallError {
    /// The connection failed, closed or timed out.
    Io(String),
    /// The broker answered with a Kafka error code; the string says to what.
    Kafka(i16, String),
    /// A message could not be encoded or decoded.
    Protocol(String),
    /// The broker lacks an API version or SASL mechanism this client needs:
    /// retrying cannot help.
    Unsupported(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Io(m) | CallError::Protocol(m) | CallError::Unsupported(m) => f.write_str(m),
            CallError::Kafka(code, what) => write!(f, "{what}: {}", describe(*code)),
        }
    }
}

/// A Kafka error code as its name and number.
fn describe(code: i16) -> String {
    use kafka_protocol::error::ParseResponseErrorCode;
    match code.err() {
        Some(e) => format!("{e} (error {code})"),
        None => format!("error {code}"),
    }
}

impl std::error::Error for CallError {}

/// A request this client sends, paired with its response. kafka-protocol's own
/// `Request` trait needs its broker-side feature (decoding requests), which a
/// client has no use for.
pub(crate) trait Call: Encodable + HeaderVersion {
    /// The API key.
    const KEY: i16;
    /// The matching response.
    type Response: Decodable + HeaderVersion;
}

macro_rules! calls {
    ($($req:ty => $resp:ty, $key:ident;)*) => {
        $(impl Call for $req {
            const KEY: i16 = ApiKey::$key as i16;
            type Response = $resp;
        })*
    };
}

calls! {
    ApiVersionsRequest => ApiVersionsResponse, ApiVersions;
    SaslHandshakeRequest => SaslHandshakeResponse, SaslHandshake;
    SaslAuthenticateRequest => SaslAuthenticateResponse, SaslAuthenticate;
    FindCoordinatorRequest => FindCoordinatorResponse, FindCoordinator;
    JoinGroupRequest => JoinGroupResponse, JoinGroup;
    SyncGroupRequest => SyncGroupResponse, SyncGroup;
    HeartbeatRequest => HeartbeatResponse, Heartbeat;
    LeaveGroupRequest => LeaveGroupResponse, LeaveGroup;
    OffsetCommitRequest => OffsetCommitResponse, OffsetCommit;
    OffsetFetchRequest => OffsetFetchResponse, OffsetFetch;
    MetadataRequest => MetadataResponse, Metadata;
    InitProducerIdRequest => InitProducerIdResponse, InitProducerId;
    ProduceRequest => ProduceResponse, Produce;
    FetchRequest => FetchResponse, Fetch;
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connection kept between exchanges that do not belong to a fetch session (metadata,
/// producer ids, where a partition ends), so each does not pay a connect.
///
/// Exchanges queue for it, each bounded by its own time limit; one that waited `wait`
/// (the request timeout) uses a connection of its own instead, closed after. Callers ask
/// for many at once (a server's lag sample, one look-up per partition), and on a broker
/// that hangs, queueing would cost the sum of every exchange's bound.
///
/// Only one exchange at a time runs on a connection of its own: the kept connection
/// held past a request timeout means the broker is not answering, and every queued
/// exchange opening one (a hung broker leading many partitions) burst connections, each
/// left to hang too. The others fail at once.
#[derive(Default)]
pub(crate) struct Kept {
    kept: tokio::sync::Mutex<Option<Connection>>,
    /// Held by the one exchange running on a connection of its own.
    beside: tokio::sync::Mutex<()>,
}

impl Kept {
    /// Runs `exchange` on the kept connection, or on one `connect` opens when none is
    /// kept. A kept connection the broker closed while it sat idle (Apache Kafka closes
    /// idle ones after `connections.max.idle.ms`) is replaced once. Only that: a broker
    /// that does not answer within the request timeout would not answer a new connection
    /// sooner, and retrying doubled the time a caller waited to learn it. The connection
    /// is kept after a complete exchange, a broker's error code being one; after an I/O
    /// or protocol error the stream's state is unknown, and it is dropped.
    pub(crate) async fn exchange<T, C>(
        &self,
        wait: Duration,
        connect: impl Fn() -> C,
        exchange: impl for<'c> Fn(&'c mut Connection) -> futures::future::BoxFuture<'c, Result<T, CallError>>,
    ) -> Result<T, CallError>
    where
        C: std::future::Future<Output = Result<Connection, CallError>>,
    {
        let Ok(mut slot) = tokio::time::timeout(wait, self.kept.lock()).await else {
            let Ok(_beside) = self.beside.try_lock() else {
                return Err(CallError::Io(format!(
                    "the kept connection and the one beside it are both taken by exchanges unanswered for {wait:?}"
                )));
            };
            return exchange(&mut connect().await?).await;
        };
        let (answer, conn) = match slot.take() {
            Some(mut kept) => match exchange(&mut kept).await {
                Err(CallError::Io(_)) if kept.closed_by_broker => {
                    let mut conn = connect().await?;
                    (exchange(&mut conn).await, conn)
                }
                answer => (answer, kept),
            },
            None => {
                let mut conn = connect().await?;
                (exchange(&mut conn).await, conn)
            }
        };
        if !matches!(answer, Err(CallError::Io(_) | CallError::Protocol(_))) {
            *slot = Some(conn);
        }
        answer
    }
}

/// A connection to one broker. A request that fails or times out leaves the stream
/// in an unknown state, so callers drop the connection on any error.
pub(crate) struct Connection {
    io: Box<dyn Io>,
    addr: String,
    client_id: StrBytes,
    correlation: i32,
    /// Broker's supported version range per API key, from ApiVersions.
    versions: HashMap<i16, (i16, i16)>,
    request_timeout: Duration,
    /// An exchange failed because the broker had closed the connection (end of stream,
    /// reset): unlike a timeout, a new connection may well be answered.
    closed_by_broker: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Connection {
    /// Opens, negotiates API versions and authenticates, all within the connect
    /// timeout.
    pub(crate) async fn connect(addr: &str, config: &KafkaConfig) -> Result<Self, CallError> {
        let fut = Self::connect_inner(addr, config);
        match tokio::time::timeout(config.connect_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Io(format!("connecting to {addr}: timed out after {:?}", config.connect_timeout))),
        }
    }

    async fn connect_inner(addr: &str, config: &KafkaConfig) -> Result<Self, CallError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| CallError::Io(format!("connecting to {addr}: {e}")))?;
        // Group traffic is small request-reply; Nagle would add latency to every one.
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = wrap_tls(tcp, addr, config).await?;
        let mut conn = Connection {
            io,
            addr: addr.to_string(),
            client_id: StrBytes::from_string(config.client_id.clone()),
            correlation: 0,
            versions: HashMap::new(),
            request_timeout: config.request_timeout,
            closed_by_broker: false,
        };
        // ApiVersions first: brokers accept it before authentication.
        let resp = conn.send_raw(&ApiVersionsRequest::default(), 0, config.request_timeout).await?;
        if resp.error_code != 0 {
            return Err(CallError::Kafka(resp.error_code, "api versions".into()));
        }
        conn.versions = resp.api_keys.iter().map(|k| (k.api_key, (k.min_version, k.max_version))).collect();
        if let Some(sasl) = &config.sasl {
            conn.authenticate(sasl).await?;
        }
        Ok(conn)
    }

    async fn authenticate(&mut self, sasl: &SaslConfig) -> Result<(), CallError> {
        let SaslConfig::Plain(creds) = sasl else {
            return Err(CallError::Unsupported(
                "consumer-group connections support SASL PLAIN only".into(),
            ));
        };
        let t = self.request_timeout;
        let hs = self
            .send_raw(&SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("PLAIN")), 1, t)
            .await?;
        if hs.error_code != 0 {
            return Err(CallError::Kafka(hs.error_code, "SASL handshake".into()));
        }
        let mut token = BytesMut::new();
        token.put_u8(0);
        token.put_slice(creds.username.as_bytes());
        token.put_u8(0);
        token.put_slice(creds.password.as_bytes());
        let auth = self
            .send_raw(&SaslAuthenticateRequest::default().with_auth_bytes(token.freeze()), 1, t)
            .await?;
        if auth.error_code != 0 {
            let msg = auth.error_message.map(|m| m.to_string()).unwrap_or_default();
            return Err(CallError::Kafka(auth.error_code, format!("SASL authentication: {msg}")));
        }
        Ok(())
    }

    /// The address this connection is to.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `req` at `version` (checked against what the broker supports) and waits
    /// up to the request timeout plus `extra` for the response. `extra` covers
    /// requests the broker deliberately holds, like JoinGroup during a rebalance.
    pub(crate) async fn send<R: Call>(
        &mut self,
        req: &R,
        version: i16,
        extra: Duration,
    ) -> Result<R::Response, CallError> {
        check_version::<R>(&self.versions, &self.addr, version)?;
        let t = self.request_timeout.saturating_add(extra);
        self.send_raw(req, version, t).await
    }

    async fn send_raw<R: Call>(&mut self, req: &R, version: i16, timeout: Duration) -> Result<R::Response, CallError> {
        match tokio::time::timeout(timeout, self.round_trip(req, version)).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Io(format!("{}: no response within {timeout:?}", self.addr))),
        }
    }

    async fn round_trip<R: Call>(&mut self, req: &R, version: i16) -> Result<R::Response, CallError> {
        self.correlation = self.correlation.wrapping_add(1);
        let correlation = self.correlation;
        let frame = encode_frame(&self.client_id, correlation, req, version)?;
        let Connection { io, addr, closed_by_broker, .. } = self;
        let mut failed = |e: std::io::Error| {
            *closed_by_broker |= is_closed(&e);
            CallError::Io(format!("{addr}: {e}"))
        };
        io.write_all(&frame).await.map_err(&mut failed)?;
        io.flush().await.map_err(&mut failed)?;
        read_response::<R, _>(io, addr, correlation, version, failed).await
    }

    /// Splits the connection for pipelining: the writer sends requests while earlier
    /// ones still wait for their responses, which the reader takes in order.
    pub(crate) fn split(self) -> (RequestWriter, ResponseReader) {
        let (read, write) = tokio::io::split(self.io);
        let writer = RequestWriter {
            io: write,
            addr: self.addr.clone(),
            client_id: self.client_id,
            correlation: self.correlation,
            versions: self.versions,
        };
        (writer, ResponseReader { io: read, addr: self.addr })
    }
}

/// The write half of a split [`Connection`].
pub(crate) struct RequestWriter {
    io: WriteHalf<Box<dyn Io>>,
    addr: String,
    client_id: StrBytes,
    correlation: i32,
    versions: HashMap<i16, (i16, i16)>,
}

impl RequestWriter {
    /// Writes `req` at `version` and returns its correlation id, for the reader to
    /// match the response. Unbounded in time: the caller bounds it.
    pub(crate) async fn write<R: Call>(&mut self, req: &R, version: i16) -> Result<i32, CallError> {
        check_version::<R>(&self.versions, &self.addr, version)?;
        self.correlation = self.correlation.wrapping_add(1);
        let frame = encode_frame(&self.client_id, self.correlation, req, version)?;
        let io_error = |e: std::io::Error| CallError::Io(format!("{}: {e}", self.addr));
        self.io.write_all(&frame).await.map_err(io_error)?;
        self.io.flush().await.map_err(io_error)?;
        Ok(self.correlation)
    }
}

/// The read half of a split [`Connection`].
pub(crate) struct ResponseReader {
    io: ReadHalf<Box<dyn Io>>,
    addr: String,
}

impl ResponseReader {
    /// Reads the next response, which must answer request `correlation`. Unbounded in
    /// time: the caller bounds it.
    pub(crate) async fn read<R: Call>(&mut self, correlation: i32, version: i16) -> Result<R::Response, CallError> {
        let addr = &self.addr;
        read_response::<R, _>(&mut self.io, addr, correlation, version, |e| CallError::Io(format!("{addr}: {e}"))).await
    }

    /// The address this connection is to.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }
}

/// Refuses a version outside the range the broker announced in ApiVersions.
fn check_version<R: Call>(versions: &HashMap<i16, (i16, i16)>, addr: &str, version: i16) -> Result<(), CallError> {
    if let Some((min, max)) = versions.get(&R::KEY) {
        if version < *min || version > *max {
            let name = ApiKey::try_from(R::KEY).map(|k| format!("{k:?}")).unwrap_or_else(|_| R::KEY.to_string());
            return Err(CallError::Unsupported(format!(
                "broker {addr} supports {name} versions {min}..={max}, this client needs {version}"
            )));
        }
    }
    Ok(())
}

/// A request with its header, size-prefixed, ready for one write.
fn encode_frame<R: Call>(client_id: &StrBytes, correlation: i32, req: &R, version: i16) -> Result<BytesMut, CallError> {
    let header = RequestHeader::default()
        .with_request_api_key(R::KEY)
        .with_request_api_version(version)
        .with_correlation_id(correlation)
        .with_client_id(Some(client_id.clone()));
    let mut frame = BytesMut::new();
    // Room for the size prefix, filled in once the length is known.
    frame.put_i32(0);
    header
        .encode(&mut frame, R::header_version(version))
        .map_err(|e| CallError::Protocol(format!("encoding request header: {e}")))?;
    req.encode(&mut frame, version)
        .map_err(|e| CallError::Protocol(format!("encoding request: {e}")))?;
    let len = i32::try_from(frame.len() - 4).map_err(|_| CallError::Protocol("request too large".into()))?;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    Ok(frame)
}

/// Whether an I/O error says the broker closed the connection, as it does an idle one.
fn is_closed(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, NotConnected, UnexpectedEof};
    matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected)
}

/// Reads one size-prefixed response and decodes it as the answer to `correlation`;
/// `io_error` turns a failed read into the caller's error.
async fn read_response<R: Call, I: AsyncRead + Unpin>(
    io: &mut I,
    addr: &str,
    correlation: i32,
    version: i16,
    mut io_error: impl FnMut(std::io::Error) -> CallError,
) -> Result<R::Response, CallError> {
    let size = io.read_i32().await.map_err(&mut io_error)?;
    let size = usize::try_from(size)
        .ok()
        .filter(|s| *s <= MAX_FRAME)
        .ok_or_else(|| CallError::Protocol(format!("{addr}: bad response size {size}")))?;
    let mut buf = vec![0u8; size];
    io.read_exact(&mut buf).await.map_err(io_error)?;
    let mut buf = Bytes::from(buf);
    let rh = ResponseHeader::decode(&mut buf, R::Response::header_version(version))
        .map_err(|e| CallError::Protocol(format!("decoding response header: {e}")))?;
    if rh.correlation_id != correlation {
        return Err(CallError::Protocol(format!(
            "{addr}: response for request {} while waiting for {correlation}",
            rh.correlation_id
        )));
    }
    // The broker is not trusted to send counts its bytes can hold: see `guard`.
    super::guard::check(R::KEY, version, &buf).map_err(CallError::Protocol)?;
    let resp = R::Response::decode(&mut buf, version)
        .map_err(|e| CallError::Protocol(format!("decoding response: {e}")))?;
    if buf.has_remaining() {
        tracing::trace!(left = buf.remaining(), "response had trailing bytes");
    }
    Ok(resp)
}

#[cfg(feature = "tls")]
async fn wrap_tls(tcp: TcpStream, addr: &str, config: &KafkaConfig) -> Result<Box<dyn Io>, CallError> {
    let Some(tls) = &config.tls else {
        return Ok(Box::new(tcp));
    };
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let name = rustls::pki_types::ServerName::try_from(host)
        .map_err(|e| CallError::Io(format!("{addr}: invalid TLS server name: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(tls));
    let stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| CallError::Io(format!("{addr}: TLS handshake: {e}")))?;
    Ok(Box::new(stream))
}

#[cfg(not(feature = "tls"))]
async fn wrap_tls(tcp: TcpStream, _addr: &str, _config: &KafkaConfig) -> Result<Box<dyn Io>, CallError> {
    Ok(Box::new(tcp))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker (or whoever rewrites traffic on a connection without TLS) answering
    /// ApiVersions with 2^31 - 1 API keys in no bytes: the connection fails with a
    /// protocol error instead of kafka-protocol reserving 64 GiB for them (which aborted
    /// the process before the check).
    #[tokio::test]
    async fn a_response_counting_more_than_its_bytes_hold_is_a_protocol_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("has an address").to_string();
        let broker = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accepts");
            let size = s.read_i32().await.expect("reads a size");
            let mut request = vec![0u8; usize::try_from(size).expect("positive size")];
            s.read_exact(&mut request).await.expect("reads the request");
            // Request header: api key, api version, then the correlation id.
            let mut response = request[4..8].to_vec();
            response.extend(0i16.to_be_bytes()); // error code
            response.extend(i32::MAX.to_be_bytes()); // api key count, and nothing after it
            s.write_i32(response.len() as i32).await.expect("writes");
            s.write_all(&response).await.expect("writes");
            // Hold the connection open until the client is done with it.
            let _ = s.read_u8().await;
        });
        let config = KafkaConfig::builder(addr.clone()).build();
        let err = Connection::connect(&addr, &config).await.expect_err("refused");
        assert!(matches!(&err, CallError::Protocol(m) if m.contains("2147483647 array elements in 0 bytes")), "{err}");
        broker.abort();
    }
}
