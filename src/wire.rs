//! The record format of requests and replies (see `docs/wire-format.md`).
//!
//! It follows Spring Kafka's request-reply headers (`kafka_correlationId`,
//! `kafka_replyTopic`, `kafka_replyPartition`) so Spring and NestJS peers can take part,
//! and adds `kafka_rpc-*` headers for what Spring lacks: the dispatch type, the codec,
//! the deadline and the error of a failed call. Decoding is tolerant: correlation ids
//! of any length, reply partitions as 4-byte big-endian or ASCII decimal, unknown
//! headers ignored.
//!
//! Peers differ in more than header names (see `docs/interop.md`): a [`Peer`] names a
//! set of conventions. A server picks the caller's from what its request carries
//! ([`RequestMeta::peer`]) and answers in kind; a client is told which one its server
//! speaks.
//!
//! ```
//! use kafka_rpc::__private::wire::{self, RequestMeta, ReplyAddress};
//! use kafka_rpc::wire::{names, Peer};
//! use kafka_rpc::codec::ContentType;
//! use kafka_rpc::transport::Record;
//!
//! let mut record = Record::default();
//! record.headers = wire::request_headers(&RequestMeta {
//!     request_type: Some("ping".into()),
//!     correlation_id: Some(vec![7u8; 16].into()),
//!     reply_to: Some(ReplyAddress { topic: "replies".into(), partition: Some(3) }),
//!     content_type: ContentType::Bincode,
//!     deadline_ms: Some(1_700_000_000_000),
//!     peer: Peer::Native,
//! });
//! let meta = wire::decode_request(&record).unwrap();
//! assert_eq!(meta.reply_to.unwrap().partition, Some(3));
//! assert_eq!(meta.peer, Peer::Native);
//!
//! // A NestJS request: no type header, a UUID string, the partition in ASCII.
//! let mut nest = Record::new(None::<Vec<u8>>, br#"{"a":1}"#.to_vec());
//! nest.headers = wire::request_headers(&RequestMeta {
//!     correlation_id: Some(b"6a1b6c7e-0f6e-4f4e-9b7e-000000000001".to_vec().into()),
//!     reply_to: Some(ReplyAddress { topic: "math.sum.reply".into(), partition: Some(0) }),
//!     peer: Peer::Nest,
//!     ..RequestMeta::default()
//! });
//! nest.headers.retain(|h| h.key != names::CONTENT_TYPE); // NestJS sends none
//! let meta = wire::decode_request(&nest).unwrap();
//! assert_eq!((meta.peer, meta.content_type), (Peer::Nest, ContentType::Json));
//! ```

use std::borrow::Cow;

use bytes::Bytes;

use crate::codec::ContentType;
use crate::error::{ErrorCode, RemoteError};
use crate::transport::{Header, Record};

/// Header names.
pub mod names {
    /// Correlation id; Spring writes 16 UUID bytes, NestJS a UUID string. Echoed verbatim.
    pub const CORRELATION_ID: &str = "kafka_correlationId";
    /// Topic the reply goes to (UTF-8).
    pub const REPLY_TOPIC: &str = "kafka_replyTopic";
    /// Partition the reply goes to: 4-byte big-endian i32 (ASCII decimal accepted).
    pub const REPLY_PARTITION: &str = "kafka_replyPartition";
    /// Dispatch type of a request (UTF-8), e.g. `delivery.radius.reduce`.
    pub const TYPE: &str = "kafka_rpc-type";
    /// Codec of the value, e.g. `application/x-bincode` or `application/json`.
    pub const CONTENT_TYPE: &str = "kafka_rpc-content-type";
    /// Absolute deadline, milliseconds since the Unix epoch, 8-byte big-endian i64
    /// (ASCII decimal accepted).
    pub const DEADLINE: &str = "kafka_rpc-deadline";
    /// Stable error code of a failed call (UTF-8); its presence marks an error reply.
    pub const ERROR_CODE: &str = "kafka_rpc-error-code";
    /// Human-readable error message of a failed call (UTF-8).
    pub const ERROR_MESSAGE: &str = "kafka_rpc-error-message";
    /// NestJS's error header: a string, or the JSON of an object (`{"status","message"}`
    /// from an `RpcException`). Its presence marks a NestJS error reply.
    pub const NEST_ERROR: &str = "kafka_nest-err";
    /// NestJS's end-of-stream marker (one zero byte): a NestJS client completes its
    /// observable only on a reply that carries it.
    pub const NEST_IS_DISPOSED: &str = "kafka_nest-is-disposed";
    /// Spring's `JsonSerializer` type hint (a class name or a mapped token); its
    /// presence marks a Spring sender.
    pub const SPRING_TYPE_ID: &str = "__TypeId__";
    /// On a dead-letter record: the topic the request was read from (Spring's
    /// `KafkaHeaders.DLT_ORIGINAL_TOPIC`).
    pub const DLT_ORIGINAL_TOPIC: &str = "kafka_dlt-original-topic";
    /// On a dead-letter record: the request's partition, a 4-byte big-endian integer.
    pub const DLT_ORIGINAL_PARTITION: &str = "kafka_dlt-original-partition";
    /// On a dead-letter record: the request's offset, an 8-byte big-endian integer.
    pub const DLT_ORIGINAL_OFFSET: &str = "kafka_dlt-original-offset";
    /// On a dead-letter record: why it is there.
    pub const DLT_EXCEPTION_MESSAGE: &str = "kafka_dlt-exception-message";

    /// Every name above: those a record read back from a broker most often carries.
    const ALL: [&str; 15] = [
        CORRELATION_ID, REPLY_TOPIC, REPLY_PARTITION, TYPE, CONTENT_TYPE, DEADLINE, ERROR_CODE, ERROR_MESSAGE,
        NEST_ERROR, NEST_IS_DISPOSED, SPRING_TYPE_ID, DLT_ORIGINAL_TOPIC, DLT_ORIGINAL_PARTITION, DLT_ORIGINAL_OFFSET,
        DLT_EXCEPTION_MESSAGE,
    ];

    /// A header name read from the wire, borrowed when it is one of the names above, as
    /// [`Header::key`](crate::transport::Header) is for records built here: reading a
    /// request's or reply's headers then allocates nothing for their names.
    pub(crate) fn read(key: &str) -> std::borrow::Cow<'static, str> {
        match ALL.iter().find(|name| **name == key) {
            Some(name) => std::borrow::Cow::Borrowed(name),
            None => std::borrow::Cow::Owned(key.to_owned()),
        }
    }
}

/// Request-reply conventions of the service on the other side.
///
/// The three agree on the header names (`kafka_correlationId`, `kafka_replyTopic`,
/// `kafka_replyPartition`) but not on how values are written:
///
/// | | correlation id | reply partition | codec | end / error of a reply |
/// |---|---|---|---|---|
/// | `Native` | 16 bytes | 4-byte big-endian | bincode | `kafka_rpc-error-*` |
/// | `Spring` | 16 bytes | 4-byte big-endian | JSON | `kafka_rpc-error-*` (read by a `replyErrorChecker`) |
/// | `Nest` | UUID string | ASCII decimal | JSON | `kafka_nest-is-disposed`, `kafka_nest-err` |
///
/// NestJS's parser turns every header value into a string, which is why binary ids and
/// partitions do not survive a trip through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Peer {
    /// kafka-rpc on both sides.
    #[default]
    Native,
    /// Spring Kafka: `ReplyingKafkaTemplate`, `@KafkaListener` + `@SendTo`.
    Spring,
    /// NestJS: `ClientKafka`, `@MessagePattern` / `@EventPattern`.
    Nest,
}

impl Peer {
    /// The codec of a payload whose record does not name one.
    pub fn default_content_type(self) -> ContentType {
        match self {
            Peer::Native => ContentType::Bincode,
            Peer::Spring | Peer::Nest => ContentType::Json,
        }
    }

    /// Which convention a request's headers follow. Ours carry `kafka_rpc-*` headers;
    /// Spring's carry a 16-byte correlation id or a `__TypeId__`; anything else (a
    /// UUID-string id, or a bare record such as a NestJS `emit`) is NestJS's.
    fn of_request(native: bool, correlation_id: Option<&[u8]>, spring_type: bool) -> Peer {
        if native {
            Peer::Native
        } else if spring_type || correlation_id.is_some_and(|id| id.len() == 16) {
            Peer::Spring
        } else {
            Peer::Nest
        }
    }
}

/// Malformed request or reply headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A header is present but its value cannot be read.
    #[error("header `{name}`: {reason}")]
    BadHeader {
        /// Header name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Where the server sends a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyAddress<'a> {
    /// Reply topic (borrowed from the record when decoded).
    pub topic: Cow<'a, str>,
    /// Reply partition; `None` when the requester did not pin one.
    pub partition: Option<i32>,
}

/// What the headers of a request say. Decoding borrows the strings from the record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestMeta<'a> {
    /// Dispatch type; `None` when the sender (say, a plain Spring template) set none.
    pub request_type: Option<Cow<'a, str>>,
    /// Correlation id, echoed byte for byte.
    pub correlation_id: Option<Bytes>,
    /// Reply address; `None` makes the record an event.
    pub reply_to: Option<ReplyAddress<'a>>,
    /// Codec of the value; bincode when the header is absent.
    pub content_type: ContentType,
    /// Absolute deadline in ms since the Unix epoch.
    pub deadline_ms: Option<i64>,
    /// Whose conventions the request follows: decides the codec when the record names
    /// none, and the shape of the reply. Encoding a request uses it for the
    /// correlation id and reply partition.
    pub peer: Peer,
}

impl RequestMeta<'_> {
    /// Whether the sender waits for a reply (false for events).
    pub fn expects_reply(&self) -> bool {
        self.correlation_id.is_some() && self.reply_to.is_some()
    }
}

/// A header with one of the fixed names above.
pub(crate) fn header(name: &'static str, value: impl Into<Bytes>) -> Header {
    Header { key: Cow::Borrowed(name), value: value.into() }
}

/// The headers of a request record, with the reply partition written the way
/// `meta.peer` reads it. The correlation id is written as given.
pub fn request_headers(meta: &RequestMeta<'_>) -> Vec<Header> {
    let reply = meta.reply_to.as_ref().map(|r| ReplyHeaders::new(meta.peer, &r.topic, r.partition, meta.content_type));
    encode_request(
        meta.correlation_id.clone(),
        reply.as_ref(),
        meta.request_type.as_ref().map(|t| Bytes::copy_from_slice(t.as_bytes())),
        meta.content_type,
        meta.deadline_ms,
    )
}

/// The one place that fixes which request headers are written, and in what order.
fn encode_request(
    correlation_id: Option<Bytes>,
    reply: Option<&ReplyHeaders>,
    request_type: Option<Bytes>,
    content_type: ContentType,
    deadline_ms: Option<i64>,
) -> Vec<Header> {
    // Sized to what is pushed below (see `reply_record`).
    let capacity = usize::from(correlation_id.is_some())
        + reply.map_or(0, |r| 1 + usize::from(r.partition.is_some()))
        + usize::from(request_type.is_some())
        + 1
        + usize::from(deadline_ms.is_some());
    let mut headers = Vec::with_capacity(capacity);
    if let Some(id) = correlation_id {
        headers.push(header(names::CORRELATION_ID, id));
    }
    if let Some(reply) = reply {
        headers.push(header(names::REPLY_TOPIC, reply.topic.clone()));
        if let Some(p) = &reply.partition {
            headers.push(header(names::REPLY_PARTITION, p.clone()));
        }
    }
    if let Some(t) = request_type {
        headers.push(header(names::TYPE, t));
    }
    headers.push(header(names::CONTENT_TYPE, content_type_bytes(content_type)));
    if let Some(d) = deadline_ms {
        headers.push(header(names::DEADLINE, d.to_be_bytes().to_vec()));
    }
    headers
}

fn content_type_bytes(content_type: ContentType) -> Bytes {
    Bytes::from_static(content_type.as_str().as_bytes())
}

/// A correlation id as `peer` writes it: 16 big-endian bytes, or for NestJS the
/// hyphenated UUID string (its parser would mangle binary).
pub(crate) fn encode_correlation_id(peer: Peer, id: u128) -> Bytes {
    let id = uuid::Uuid::from_u128(id);
    match peer {
        Peer::Nest => Bytes::copy_from_slice(id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).as_bytes()),
        Peer::Native | Peer::Spring => Bytes::copy_from_slice(id.as_bytes()),
    }
}

/// The id a client registered for a reply's correlation id, in either encoding
/// [`encode_correlation_id`] writes; `None` for ids no client of ours made.
pub(crate) fn correlation_key(id: &[u8]) -> Option<u128> {
    match <[u8; 16]>::try_from(id) {
        Ok(bytes) => Some(u128::from_be_bytes(bytes)),
        Err(_) => uuid::Uuid::try_parse_ascii(id).ok().map(|u| u.as_u128()),
    }
}

/// The headers a client sends unchanged with every request, encoded once so that a
/// request costs only its own correlation id and deadline.
#[derive(Debug, Clone)]
pub(crate) struct ReplyHeaders {
    peer: Peer,
    topic: Bytes,
    partition: Option<Bytes>,
    content_type: ContentType,
}

impl ReplyHeaders {
    pub(crate) fn new(peer: Peer, topic: &str, partition: Option<i32>, content_type: ContentType) -> Self {
        let partition = partition.map(|p| match peer {
            // NestJS reads it with `parseFloat` after turning the bytes into a string.
            Peer::Nest => Bytes::from(p.to_string()),
            Peer::Native | Peer::Spring => Bytes::copy_from_slice(&p.to_be_bytes()),
        });
        ReplyHeaders { peer, topic: Bytes::copy_from_slice(topic.as_bytes()), partition, content_type }
    }

    /// A request's encoded payload as the record's value: as NestJS writes JSON, for a
    /// NestJS peer ([`nest_value`]).
    pub(crate) fn value(&self, payload: Vec<u8>) -> Option<Bytes> {
        record_value(self.peer, self.content_type, payload)
    }

    /// The headers of one request: the same encoder as [`request_headers`], with the
    /// fixed parts already in bytes and a `&'static` type name borrowed, not copied.
    pub(crate) fn request(&self, request_type: impl Into<Bytes>, correlation_id: u128, deadline_ms: i64) -> Vec<Header> {
        encode_request(
            Some(encode_correlation_id(self.peer, correlation_id)),
            Some(self),
            Some(request_type.into()),
            self.content_type,
            Some(deadline_ms),
        )
    }
}

/// `value` as text, or why header `name` is unreadable.
pub(crate) fn utf8<'a>(name: &'static str, value: &'a [u8]) -> Result<Cow<'a, str>, WireError> {
    std::str::from_utf8(value).map(Cow::Borrowed).map_err(|_| WireError::BadHeader { name, reason: "not UTF-8".into() })
}

/// Reads an i32 sent as 4 big-endian bytes or as ASCII decimal.
fn int32(name: &'static str, value: &[u8]) -> Result<i32, WireError> {
    if let Ok(bytes) = <[u8; 4]>::try_from(value) {
        // Four ASCII digits ("1234") are ambiguous; Spring always sends binary, and a
        // binary partition number that is all digits (> 808 million) cannot exist.
        if !value.iter().all(u8::is_ascii_digit) {
            return Ok(i32::from_be_bytes(bytes));
        }
    }
    ascii_decimal(name, value)
}

/// Reads an i64 sent as 8 big-endian bytes or as ASCII decimal.
fn int64(name: &'static str, value: &[u8]) -> Result<i64, WireError> {
    if let Ok(bytes) = <[u8; 8]>::try_from(value) {
        if !value.iter().all(u8::is_ascii_digit) {
            return Ok(i64::from_be_bytes(bytes));
        }
    }
    ascii_decimal(name, value)
}

fn ascii_decimal<T: std::str::FromStr>(name: &'static str, value: &[u8]) -> Result<T, WireError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        // Only the first bytes: the value is untrusted and may be as large as a record.
        .ok_or_else(|| WireError::BadHeader { name, reason: format!("not a number: {:02x?}", &value[..value.len().min(16)]) })
}

/// Reads the request headers of `record`, and judges whose conventions they follow.
/// Unknown headers are ignored.
pub fn decode_request(record: &Record) -> Result<RequestMeta<'_>, WireError> {
    let raw = decode_request_raw(record)?;
    if let Some(e) = raw.unreadable {
        return Err(e);
    }
    let mut meta = raw.meta;
    meta.request_type = raw.request_type.map(|t| utf8(names::TYPE, t)).transpose()?;
    meta.reply_to = match raw.reply_topic {
        Some(topic) => Some(ReplyAddress { topic: utf8(names::REPLY_TOPIC, topic)?, partition: raw.reply_partition }),
        None => None,
    };
    Ok(meta)
}

/// A request's headers read, except that the type name and reply topic are left as
/// bytes, not yet checked as UTF-8: the server checks a name only when it differs
/// from the previous request's (`server::inbound`), which saves the check on nearly
/// every request. [`decode_request`] checks both.
pub(crate) struct RawRequest<'a> {
    /// Everything but `request_type` and `reply_to`, which are `None` here.
    pub(crate) meta: RequestMeta<'a>,
    pub(crate) request_type: Option<&'a [u8]>,
    pub(crate) reply_topic: Option<&'a [u8]>,
    pub(crate) reply_partition: Option<i32>,
    /// A header that says how to read the request (its codec, its deadline) and could
    /// not be read. The reply address still is, so the caller can be told.
    pub(crate) unreadable: Option<WireError>,
}

/// The one reading of a request's headers; see [`RawRequest`].
pub(crate) fn decode_request_raw(record: &Record) -> Result<RawRequest<'_>, WireError> {
    let mut meta = RequestMeta::default();
    let mut request_type = None;
    let mut reply_topic = None;
    let mut reply_partition = None;
    let mut content_type = None;
    let mut deadline = None;
    let mut native = false;
    let mut spring_type = false;
    let mut unreadable = None;
    // A repeated header counts by its last value, as Spring reads it (`lastHeader`):
    // values are only taken here, and read once the last of each is known.
    for h in &record.headers {
        match &*h.key {
            names::CORRELATION_ID => meta.correlation_id = Some(h.value.clone()),
            names::REPLY_TOPIC => reply_topic = Some(&h.value[..]),
            names::REPLY_PARTITION => reply_partition = Some(&h.value[..]),
            names::TYPE => {
                request_type = Some(&h.value[..]);
                native = true;
            }
            names::CONTENT_TYPE => {
                content_type = Some(&h.value[..]);
                native = true;
            }
            names::DEADLINE => deadline = Some(&h.value[..]),
            names::SPRING_TYPE_ID => spring_type = true,
            _ => {}
        }
    }
    let reply_partition = reply_partition.map(|p| int32(names::REPLY_PARTITION, p)).transpose()?;
    if let Some(p) = reply_partition {
        if p < 0 {
            return Err(WireError::BadHeader { name: names::REPLY_PARTITION, reason: format!("negative: {p}") });
        }
    }
    let content_type = match content_type.map(ContentType::parse).transpose() {
        Ok(parsed) => parsed,
        Err(e) => {
            unreadable = Some(WireError::BadHeader { name: names::CONTENT_TYPE, reason: e.to_string() });
            None
        }
    };
    match deadline.map(|d| int64(names::DEADLINE, d)).transpose() {
        Ok(d) => meta.deadline_ms = d,
        Err(e) => unreadable = Some(e),
    }
    meta.peer = Peer::of_request(native, meta.correlation_id.as_deref(), spring_type);
    meta.content_type = content_type.unwrap_or_else(|| meta.peer.default_content_type());
    Ok(RawRequest { meta, request_type, reply_topic, reply_partition, unreadable })
}

/// Builds the reply record for a request, stamped `timestamp_ms`: the correlation id
/// echoed as it came, the request's key, and either the encoded response or the error
/// headers. A NestJS
/// caller also gets `kafka_nest-is-disposed` (without it its observable never
/// completes) and, on failure, `kafka_nest-err` in the shape its `RpcException`
/// filter produces.
pub fn reply_record(
    peer: Peer,
    key: Option<Bytes>,
    correlation_id: Bytes,
    content_type: ContentType,
    outcome: Result<Vec<u8>, RemoteError>,
    timestamp_ms: i64,
) -> Record {
    // Sized to what is pushed below: a reply lives in the log until retention drops it,
    // and spare room would be memory held (and counted against retention) for nothing.
    let nest = usize::from(peer == Peer::Nest);
    let capacity = 2 + nest + if outcome.is_err() { 2 + nest } else { 0 };
    let mut headers = Vec::with_capacity(capacity);
    headers.push(header(names::CORRELATION_ID, correlation_id));
    headers.push(header(names::CONTENT_TYPE, Bytes::from_static(content_type.as_str().as_bytes())));
    let value = match outcome {
        Ok(bytes) => record_value(peer, content_type, bytes),
        Err(e) => {
            if peer == Peer::Nest {
                let shape = serde_json::json!({ "status": "error", "message": e.message, "code": e.code.as_str() });
                headers.push(header(names::NEST_ERROR, shape.to_string().into_bytes()));
            }
            headers.push(header(names::ERROR_CODE, e.code.as_str().to_owned().into_bytes()));
            headers.push(header(names::ERROR_MESSAGE, e.message.into_bytes()));
            None
        }
    };
    if peer == Peer::Nest {
        headers.push(header(names::NEST_IS_DISPOSED, Bytes::from_static(&[0])));
    }
    Record { key, value, headers, timestamp_ms }
}

/// A JSON value as NestJS writes one (`KafkaRequestSerializer.encode`): a string
/// unquoted, `null` as no value at all, anything else as its JSON. NestJS's parser reads
/// back only objects and arrays as JSON, so a quoted string would reach a NestJS handler
/// or caller with its quotes. [`ContentType::decode_value`] reads these back.
fn nest_value(json: Vec<u8>) -> Option<Bytes> {
    if json.first() == Some(&b'"') {
        if let Ok(text) = serde_json::from_slice::<String>(&json) {
            return Some(Bytes::from(text));
        }
    }
    (json != b"null").then(|| Bytes::from(json))
}

/// A request's or reply's encoded payload as the record's value, as `peer` expects it:
/// [`nest_value`] for NestJS's JSON, the bytes as they are otherwise. The one place that
/// decides, for both directions.
fn record_value(peer: Peer, content_type: ContentType, encoded: Vec<u8>) -> Option<Bytes> {
    match (peer, content_type) {
        (Peer::Nest, ContentType::Json) => nest_value(encoded),
        _ => Some(Bytes::from(encoded)),
    }
}

/// What the headers of a reply say.
#[derive(Debug, Clone)]
pub struct ReplyMeta {
    /// Codec of the value: an error when the reply names one this build does not
    /// know, which its value must not be guessed in (an error reply still reads).
    pub content_type: Result<ContentType, crate::codec::CodecError>,
    /// The error the server sent instead of a response.
    pub error: Option<RemoteError>,
}

/// The correlation id of a reply, if it has one.
pub fn reply_correlation_id(record: &Record) -> Option<&Bytes> {
    record.header(names::CORRELATION_ID)
}

/// Reads the reply headers of `record`: its codec (bincode when it names none) and its
/// error, if any. A NestJS `kafka_nest-err` header is read as an error (see
/// [`NEST_ERROR_CODE`]).
pub fn decode_reply(record: &Record) -> ReplyMeta {
    decode_reply_as(record, ContentType::Bincode)
}

/// Like [`decode_reply`], assuming `sent`, the codec of the request, when the reply
/// names none (NestJS and Spring replies do not).
pub fn decode_reply_as(record: &Record, sent: ContentType) -> ReplyMeta {
    let mut content_type = Ok(sent);
    let mut code = None;
    let mut message = None;
    let mut nest = None;
    for h in &record.headers {
        match &*h.key {
            // An unknown codec surfaces when the value is decoded; a bad header must not
            // turn a valid error reply into a hang.
            names::CONTENT_TYPE => content_type = ContentType::parse(&h.value),
            names::ERROR_CODE => code = Some(header_string(&h.value)),
            names::ERROR_MESSAGE => message = Some(header_string(&h.value)),
            names::NEST_ERROR => nest = Some(String::from_utf8_lossy(&h.value).into_owned()),
            _ => {}
        }
    }
    let error = match (code, nest) {
        (Some(code), _) => Some(RemoteError::new(code, message.unwrap_or_default())),
        (None, Some(nest)) => Some(nest_error(&nest)),
        (None, None) => None,
    };
    ReplyMeta { content_type, error }
}

/// A string header as any peer writes it: raw UTF-8, or JSON-quoted as Spring's
/// `DefaultKafkaHeaderMapper` writes `String` headers when `encodeStrings` is on.
fn header_string(value: &[u8]) -> String {
    if value.first() == Some(&b'"') {
        if let Ok(unquoted) = serde_json::from_slice::<String>(value) {
            return unquoted;
        }
    }
    String::from_utf8_lossy(value).into_owned()
}

/// The code of a NestJS error that names none.
pub const NEST_ERROR_CODE: &str = "NEST_ERROR";

/// Reads a `kafka_nest-err` value: NestJS writes a string as is and an object as JSON
/// (an `RpcException("msg")` arrives as `{"status":"error","message":"msg"}`). The
/// object's `message` becomes the message and its `code`, if a string, the code;
/// anything else is kept whole as the message.
fn nest_error(raw: &str) -> RemoteError {
    let object = serde_json::from_str::<serde_json::Value>(raw).ok().filter(serde_json::Value::is_object);
    let field = |name: &str| object.as_ref().and_then(|o| o.get(name)).and_then(|v| v.as_str()).map(str::to_owned);
    let code = field("code").map(|c| ErrorCode::parse(&c)).unwrap_or_else(|| ErrorCode::Custom(NEST_ERROR_CODE.into()));
    RemoteError::with_code(code, field("message").unwrap_or_else(|| raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: &[(&str, &[u8])]) -> Record {
        Record {
            headers: headers.iter().map(|(k, v)| Header { key: k.to_string().into(), value: Bytes::copy_from_slice(v) }).collect(),
            ..Record::default()
        }
    }

    #[test]
    fn a_request_holds_no_spare_header_room() {
        for partition in [None, Some(3)] {
            let reply = ReplyHeaders::new(Peer::Native, "replies", partition, ContentType::Bincode);
            let headers = reply.request(Bytes::from_static(b"t"), 7, 9);
            assert_eq!(headers.capacity(), headers.len(), "reply partition {partition:?}");
        }
    }

    #[test]
    fn a_reply_holds_no_spare_header_room() {
        for peer in [Peer::Native, Peer::Spring, Peer::Nest] {
            for outcome in [Ok(vec![1u8]), Err(RemoteError::with_code(crate::error::ErrorCode::HandlerError, "no"))] {
                let reply = reply_record(peer, None, Bytes::from_static(b"id"), ContentType::Json, outcome.clone(), 0);
                assert_eq!(reply.headers.capacity(), reply.headers.len(), "{peer:?}, {outcome:?}");
            }
        }
    }

    #[test]
    fn request_headers_round_trip_byte_for_byte() {
        let meta = RequestMeta {
            request_type: Some("delivery.radius.reduce".into()),
            correlation_id: Some(Bytes::from(vec![1u8; 16])),
            reply_to: Some(ReplyAddress { topic: "replies".into(), partition: Some(258) }),
            content_type: ContentType::Json,
            deadline_ms: Some(0x0102_0304_0506_0708),
            peer: Peer::Native,
        };
        let r = Record { headers: request_headers(&meta), ..Record::default() };
        assert_eq!(r.header(names::REPLY_PARTITION).unwrap().as_ref(), &[0, 0, 1, 2]);
        assert_eq!(r.header(names::DEADLINE).unwrap().as_ref(), &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(r.header(names::CONTENT_TYPE).unwrap().as_ref(), b"application/json");
        assert_eq!(decode_request(&r).unwrap(), meta);
    }

    #[test]
    fn prepared_client_headers_equal_the_general_encoder() {
        let id = 0x0909_0909_0909_0909_0909_0909_0909_0909u128;
        for peer in [Peer::Native, Peer::Spring, Peer::Nest] {
            let general = request_headers(&RequestMeta {
                request_type: Some("t.x".into()),
                correlation_id: Some(encode_correlation_id(peer, id)),
                reply_to: Some(ReplyAddress { topic: "r".into(), partition: Some(7) }),
                content_type: ContentType::Json,
                deadline_ms: Some(123),
                peer,
            });
            let prepared = ReplyHeaders::new(peer, "r", Some(7), ContentType::Json).request("t.x", id, 123);
            assert_eq!(general, prepared, "{peer:?}");
        }
    }

    #[test]
    fn nest_style_headers_are_accepted() {
        // NestJS sends a UUID string as correlation id and the partition as ASCII.
        let r = record(&[
            (names::CORRELATION_ID, b"6a1b6c7e-0f6e-4f4e-9b7e-000000000001"),
            (names::REPLY_TOPIC, b"math.sum.reply"),
            (names::REPLY_PARTITION, b"0"),
            ("kafka_nest-is-disposed", b"\x00"),
        ]);
        let meta = decode_request(&r).unwrap();
        assert_eq!(meta.correlation_id.unwrap().len(), 36);
        assert_eq!(meta.reply_to, Some(ReplyAddress { topic: "math.sum.reply".into(), partition: Some(0) }));
        assert_eq!(meta.request_type, None);
    }

    /// Spring reads a repeated header as its last value (`Headers.lastHeader`, and its
    /// header mapper keeps the last of a name): an earlier value, readable or not, is
    /// not what the sender meant and must neither win nor fail the request.
    #[test]
    fn a_repeated_header_is_read_as_its_last_value_as_spring_reads_it() {
        let r = record(&[
            (names::CORRELATION_ID, b"first"),
            (names::REPLY_TOPIC, b"old"),
            (names::REPLY_PARTITION, b"zz"),
            (names::DEADLINE, b"zz"),
            (names::CONTENT_TYPE, b"text/xml"),
            (names::CORRELATION_ID, &[2; 16]),
            (names::REPLY_TOPIC, b"new"),
            (names::REPLY_PARTITION, &3i32.to_be_bytes()),
            (names::DEADLINE, &5i64.to_be_bytes()),
            (names::CONTENT_TYPE, b"application/json"),
        ]);
        let meta = decode_request(&r).unwrap();
        assert_eq!(meta.correlation_id.as_deref(), Some(&[2u8; 16][..]));
        assert_eq!(meta.reply_to, Some(ReplyAddress { topic: "new".into(), partition: Some(3) }));
        assert_eq!((meta.deadline_ms, meta.content_type), (Some(5), ContentType::Json));
        let negative_first = record(&[(names::REPLY_TOPIC, b"t"), (names::REPLY_PARTITION, &(-1i32).to_be_bytes()), (names::REPLY_PARTITION, b"0")]);
        assert_eq!(decode_request(&negative_first).unwrap().reply_to.unwrap().partition, Some(0));
    }

    /// A known name read from the wire is the static one, as built records hold it.
    #[test]
    fn known_header_names_are_read_without_allocating() {
        for name in [names::CORRELATION_ID, names::DLT_EXCEPTION_MESSAGE, names::SPRING_TYPE_ID] {
            // A copy, at another address, as a name read from a fetched buffer is.
            let read: String = name.chars().collect();
            assert!(matches!(names::read(&read), Cow::Borrowed(n) if n == name), "{name}");
        }
        assert!(matches!(names::read("x-trace"), Cow::Owned(n) if n == "x-trace"));
    }

    #[test]
    fn ascii_partition_of_four_digits_is_decimal() {
        let r = record(&[(names::REPLY_TOPIC, b"t"), (names::REPLY_PARTITION, b"1234")]);
        assert_eq!(decode_request(&r).unwrap().reply_to.unwrap().partition, Some(1234));
    }

    #[test]
    fn odd_length_correlation_ids_are_kept_verbatim() {
        for id in [&b""[..], b"x", &[0u8; 40]] {
            let r = record(&[(names::CORRELATION_ID, id)]);
            assert_eq!(decode_request(&r).unwrap().correlation_id.unwrap().as_ref(), id);
        }
    }

    #[test]
    fn malformed_headers_are_typed_errors() {
        let bad_partition = record(&[(names::REPLY_TOPIC, b"t"), (names::REPLY_PARTITION, b"zz")]);
        assert!(matches!(decode_request(&bad_partition), Err(WireError::BadHeader { name: names::REPLY_PARTITION, .. })));
        let negative = record(&[(names::REPLY_TOPIC, b"t"), (names::REPLY_PARTITION, &(-1i32).to_be_bytes())]);
        assert!(decode_request(&negative).is_err());
        let bad_topic = record(&[(names::REPLY_TOPIC, &[0xff, 0xfe])]);
        assert!(decode_request(&bad_topic).is_err());
        let bad_ct = record(&[(names::CONTENT_TYPE, b"text/xml")]);
        assert!(decode_request(&bad_ct).is_err());
    }

    #[test]
    fn error_replies_carry_code_and_message() {
        let err = RemoteError::with_code(ErrorCode::UnknownType, "no handler for `x`");
        let r = reply_record(Peer::Native, None, Bytes::from_static(b"id"), ContentType::Bincode, Err(err.clone()), 0);
        assert_eq!(r.value, None);
        assert_eq!(r.header(names::ERROR_CODE).unwrap().as_ref(), b"UNKNOWN_TYPE");
        assert_eq!(decode_reply(&r).error, Some(err));
        assert_eq!(reply_correlation_id(&r).unwrap().as_ref(), b"id");
    }

    #[test]
    fn nest_requests_carry_a_uuid_string_and_an_ascii_partition() {
        let id = 0x6a1b_6c7e_0f6e_4f4e_9b7e_0000_0000_0001u128;
        let headers = ReplyHeaders::new(Peer::Nest, "math.sum.reply", Some(12), ContentType::Json).request("math.sum", id, 1);
        let r = Record { headers, ..Record::default() };
        assert_eq!(r.header(names::CORRELATION_ID).unwrap().as_ref(), b"6a1b6c7e-0f6e-4f4e-9b7e-000000000001");
        assert_eq!(r.header(names::REPLY_PARTITION).unwrap().as_ref(), b"12", "parseFloat reads it");
        assert_eq!(correlation_key(r.header(names::CORRELATION_ID).unwrap()), Some(id));
        assert_eq!(correlation_key(&id.to_be_bytes()), Some(id), "the native 16 bytes");
        assert_eq!(correlation_key(b"not-an-id"), None);
    }

    #[test]
    fn the_peer_is_judged_from_the_request() {
        let nest = record(&[(names::CORRELATION_ID, b"6a1b6c7e-0f6e-4f4e-9b7e-000000000001"), (names::REPLY_TOPIC, b"t.reply")]);
        assert_eq!(decode_request(&nest).unwrap().peer, Peer::Nest);
        assert_eq!(decode_request(&nest).unwrap().content_type, ContentType::Json);
        let nest_event = record(&[]);
        assert_eq!(decode_request(&nest_event).unwrap().peer, Peer::Nest);
        let spring = record(&[(names::CORRELATION_ID, &[1; 16]), (names::REPLY_TOPIC, b"r")]);
        assert_eq!(decode_request(&spring).unwrap().peer, Peer::Spring);
        let spring_event = record(&[(names::SPRING_TYPE_ID, b"com.example.Opened")]);
        assert_eq!(decode_request(&spring_event).unwrap().peer, Peer::Spring);
        let native = record(&[(names::CORRELATION_ID, b"6a1b6c7e-0f6e-4f4e-9b7e-000000000001"), (names::TYPE, b"x")]);
        let meta = decode_request(&native).unwrap();
        assert_eq!((meta.peer, meta.content_type), (Peer::Native, ContentType::Bincode));
    }

    #[test]
    fn nest_callers_get_is_disposed_and_their_error_shape() {
        let id = Bytes::from_static(b"6a1b6c7e-0f6e-4f4e-9b7e-000000000001");
        let ok = reply_record(Peer::Nest, None, id.clone(), ContentType::Json, Ok(b"{}".to_vec()), 0);
        assert_eq!(ok.header(names::CORRELATION_ID), Some(&id), "echoed as sent");
        assert_eq!(ok.header(names::NEST_IS_DISPOSED).unwrap().as_ref(), &[0]);
        assert_eq!(ok.header(names::NEST_ERROR), None);
        let err = RemoteError::new("OUT_OF_STOCK", "none left");
        let failed = reply_record(Peer::Nest, None, id, ContentType::Json, Err(err.clone()), 0);
        let shape: serde_json::Value = serde_json::from_slice(failed.header(names::NEST_ERROR).unwrap()).unwrap();
        assert_eq!(shape, serde_json::json!({"status": "error", "message": "none left", "code": "OUT_OF_STOCK"}));
        assert!(failed.header(names::NEST_IS_DISPOSED).is_some());
        assert_eq!(decode_reply_as(&failed, ContentType::Json).error, Some(err));
        let native = reply_record(Peer::Native, None, Bytes::from_static(b"i"), ContentType::Json, Ok(vec![]), 0);
        assert_eq!(native.header(names::NEST_IS_DISPOSED), None);
    }

    #[test]
    fn nest_callers_get_json_values_as_nestjs_writes_them() {
        let value = |peer, json: &[u8]| reply_record(peer, None, Bytes::new(), ContentType::Json, Ok(json.to_vec()), 0).value;
        assert_eq!(value(Peer::Nest, br#""pong \"quoted\"""#).as_deref(), Some(&br#"pong "quoted""#[..]), "a string unquoted");
        assert_eq!(value(Peer::Nest, b"null"), None, "null as no value");
        assert_eq!(value(Peer::Nest, br#"{"a":1}"#).as_deref(), Some(&br#"{"a":1}"#[..]));
        assert_eq!(value(Peer::Nest, b"42").as_deref(), Some(&b"42"[..]));
        assert_eq!(value(Peer::Native, b"\"pong\"").as_deref(), Some(&b"\"pong\""[..]), "others get JSON");
        // And our reading of them gives the values back.
        for json in [&br#""pong""#[..], b"null", br#"{"a":1}"#] {
            let written = value(Peer::Nest, json);
            let read: serde_json::Value = ContentType::Json.decode_value(written.as_deref()).unwrap();
            assert_eq!(read, serde_json::from_slice::<serde_json::Value>(json).unwrap());
        }
    }

    #[test]
    fn nest_errors_of_every_shape_are_read() {
        let read = |v: &[u8]| decode_reply_as(&record(&[(names::NEST_ERROR, v)]), ContentType::Json).error.unwrap();
        let rpc = read(br#"{"status":"error","message":"insufficient stock"}"#);
        assert_eq!((rpc.code.as_str(), rpc.message.as_str()), (NEST_ERROR_CODE, "insufficient stock"));
        let coded = read(br#"{"message":"m","code":"OUT_OF_STOCK"}"#);
        assert_eq!(coded.code, ErrorCode::Custom("OUT_OF_STOCK".into()));
        let plain = read(b"There is no matching message handler defined in the remote service.");
        assert_eq!(plain.message, "There is no matching message handler defined in the remote service.");
        let other = read(br#"{"reason":1}"#);
        assert_eq!(other.message, r#"{"reason":1}"#, "kept whole when it has no message");
    }

    #[test]
    fn nest_error_header_becomes_remote_error() {
        let r = record(&[(names::CORRELATION_ID, b"1"), (names::NEST_ERROR, b"boom")]);
        let err = decode_reply(&r).error.unwrap();
        assert_eq!(err.message, "boom");
    }
}
