//! Translation between rskafka's types and the transport seam's.
//!
//! rskafka keeps headers in a map, so produces through it send them in name order
//! and a repeated name keeps one value.

use rskafka::client::error::{Error as RsError, ProtocolError};

use crate::transport::{Record, TransportError};

/// Our record as rskafka wants it (for produces on SASL mechanisms only rskafka
/// speaks). Headers go into rskafka's map: name order, one value per name.
pub(crate) fn to_rskafka(record: &Record) -> rskafka::record::Record {
    let timestamp = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(record.timestamp_ms)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH);
    rskafka::record::Record {
        key: record.key.as_ref().map(|k| k.to_vec()),
        value: record.value.as_ref().map(|v| v.to_vec()),
        headers: record.headers.iter().map(|h| (h.key.clone().into_owned(), h.value.to_vec())).collect(),
        timestamp,
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
