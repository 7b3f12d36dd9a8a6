//! Translation between rskafka's types and the transport seam's.
//!
//! rskafka keeps fetched headers in a map, so they come back in name order and a
//! repeated name keeps one value.

use std::sync::Arc;

use bytes::Bytes;
use rskafka::client::error::{Error as RsError, ProtocolError};
use rskafka::record::RecordAndOffset;

use crate::transport::{ConsumedRecord, Header, Record, TransportError};

/// Our record as rskafka wants it (for produces on SASL mechanisms only rskafka
/// speaks). Headers go into rskafka's map: name order, one value per name.
pub(crate) fn to_rskafka(record: Record) -> rskafka::record::Record {
    let timestamp = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(record.timestamp_ms)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH);
    rskafka::record::Record {
        key: record.key.map(|k| k.to_vec()),
        value: record.value.map(|v| v.to_vec()),
        headers: record.headers.into_iter().map(|h| (h.key.into_owned(), h.value.to_vec())).collect(),
        timestamp,
    }
}

/// A fetched rskafka record as the seam's shared record.
pub(crate) fn from_rskafka(partition: i32, r: RecordAndOffset) -> ConsumedRecord {
    let RecordAndOffset { record, offset } = r;
    ConsumedRecord {
        partition,
        offset,
        record: Arc::new(Record {
            key: record.key.map(Bytes::from),
            value: record.value.map(Bytes::from),
            headers: record
                .headers
                .into_iter()
                .map(|(key, value)| Header { key: key.into(), value: Bytes::from(value) })
                .collect(),
            timestamp_ms: record.timestamp.timestamp_millis(),
        }),
    }
}

/// The broker's protocol error inside an rskafka error, if the broker sent one.
pub(crate) fn protocol_error(e: &RsError) -> Option<&ProtocolError> {
    match e {
        RsError::ServerError { protocol_error, .. } => Some(protocol_error),
        _ => None,
    }
}

/// Any rskafka error as a typed transport error; `what` names the operation so the
/// message says what was being attempted.
pub(crate) fn map_error(what: &str, e: RsError) -> TransportError {
    match &e {
        RsError::Connection(_) | RsError::Request(_) | RsError::Timeout => {
            TransportError::Connection(format!("{what}: {e}"))
        }
        RsError::RetryFailed(_) => TransportError::Connection(format!("{what}: {e}")),
        RsError::InvalidResponse(_) => TransportError::Broker(format!("{what}: {e}")),
        RsError::ServerError { protocol_error, error_message, .. } => {
            let msg = match error_message {
                Some(m) if !m.is_empty() => format!("{what}: {protocol_error} ({m})"),
                _ => format!("{what}: {protocol_error}"),
            };
            TransportError::Broker(msg)
        }
        _ => TransportError::Broker(format!("{what}: {e}")),
    }
}
