//! A request record decoded once: everything the later stages (policy, dispatch,
//! reply) need, read from the headers in one pass.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::codec::ContentType;
use crate::transport::{ConsumedRecord, Record};
use crate::wire::{self, names, Peer, WireError};

/// Longest correlation id a server answers.
pub(crate) const MAX_CORRELATION_ID: usize = 256;

/// The request type and reply topic a partition's requests named last.
///
/// Nearly every request of a partition names the same few types and reply topics.
/// Handing out the previous request's shared name when the next names the same one
/// saves copying both into fresh strings per request (and the reply address copies
/// the topic once more): three allocations and frees of each request's ~15.
#[derive(Default)]
pub(crate) struct RecentNames {
    request_type: Option<Arc<str>>,
    reply_topic: Option<Arc<str>>,
}

/// Header `header`'s `value` as a name, shared with the previous request when it
/// named the same; checked as UTF-8 only when it did not (the previous one was).
fn shared(recent: &mut Option<Arc<str>>, header: &'static str, value: &[u8]) -> Result<Arc<str>, WireError> {
    match recent {
        Some(last) if last.as_bytes() == value => Ok(last.clone()),
        _ => Ok(recent.insert(Arc::from(wire::utf8(header, value)?)).clone()),
    }
}

/// Where the requester wants its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReplyTo {
    pub(crate) topic: Arc<str>,
    /// `None` when the requester did not pin one (the reply goes by key).
    pub(crate) partition: Option<i32>,
}

/// One request record and what its headers say.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) record: Arc<Record>,
    pub(crate) request_type: Option<Arc<str>>,
    pub(crate) correlation_id: Option<Bytes>,
    /// Set only when a correlation id is present too: without one a reply could not be
    /// matched, so the record is an event.
    pub(crate) reply_to: Option<ReplyTo>,
    pub(crate) deadline_ms: Option<i64>,
    pub(crate) content_type: ContentType,
    /// Whose conventions the request follows; the reply answers in kind.
    pub(crate) peer: Peer,
    /// A header saying how to read the request (codec, deadline, type) that could not
    /// be read: the request is not run, and answered `BAD_REQUEST` if it has an address.
    pub(crate) unreadable: Option<WireError>,
}

impl Inbound {
    /// Decodes the headers of `consumed`. Malformed reply headers leave no trustworthy
    /// reply address, so the error is final for this record; other unreadable headers
    /// are kept in [`Inbound::unreadable`].
    pub(crate) fn decode(consumed: ConsumedRecord, recent: &mut RecentNames) -> Result<Inbound, WireError> {
        let raw = wire::decode_request_raw(&consumed.record)?;
        let meta = raw.meta;
        if meta.correlation_id.as_ref().is_some_and(|id| id.len() > MAX_CORRELATION_ID) {
            // Echoed on every reply: an oversized one could make even an error reply too
            // large to produce. Peers send 16 bytes (Spring) or 36 (NestJS).
            return Err(WireError::BadHeader {
                name: wire::names::CORRELATION_ID,
                reason: format!("longer than {MAX_CORRELATION_ID} bytes"),
            });
        }
        // Checked even for an event, which has no use for it: a record whose headers
        // cannot be read is skipped whatever it is.
        let reply_topic = raw.reply_topic.map(|t| shared(&mut recent.reply_topic, names::REPLY_TOPIC, t)).transpose()?;
        // A type name that is not UTF-8 names no handler, but the reply address still
        // tells the caller so: unreadable, like a codec or deadline header.
        let mut unreadable = raw.unreadable;
        let request_type = match raw.request_type.map(|t| shared(&mut recent.request_type, names::TYPE, t)).transpose() {
            Ok(request_type) => request_type,
            Err(e) => {
                unreadable.get_or_insert(e);
                None
            }
        };
        let reply_to = match (reply_topic, &meta.correlation_id) {
            (Some(topic), Some(_)) => Some(ReplyTo { topic, partition: raw.reply_partition }),
            _ => None,
        };
        Ok(Inbound {
            partition: consumed.partition,
            offset: consumed.offset,
            reply_to,
            request_type,
            correlation_id: meta.correlation_id,
            deadline_ms: meta.deadline_ms,
            content_type: meta.content_type,
            peer: meta.peer,
            unreadable,
            record: consumed.record,
        })
    }

    /// Whether the sender waits for a reply (false for events).
    pub(crate) fn expects_reply(&self) -> bool {
        self.reply_to.is_some()
    }

    /// Whether the request's deadline passed before `now_ms`.
    pub(crate) fn expired(&self, now_ms: i64) -> bool {
        self.deadline_ms.is_some_and(|deadline| now_ms > deadline)
    }

    /// The deadline as a point in time.
    pub(crate) fn deadline(&self) -> Option<SystemTime> {
        self.deadline_ms.and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms.max(0) as u64)))
    }

    /// Time left until the deadline, if the request has one.
    pub(crate) fn remaining(&self, now_ms: i64) -> Option<Duration> {
        self.deadline_ms.map(|deadline| Duration::from_millis(deadline.saturating_sub(now_ms).max(0) as u64))
    }

    /// The request's payload.
    pub(crate) fn payload(&self) -> &[u8] {
        self.record.value.as_deref().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Header;
    use crate::wire::names;

    fn consumed(headers: Vec<Header>) -> ConsumedRecord {
        ConsumedRecord { partition: 2, offset: 7, record: Arc::new(Record { headers, ..Record::default() }) }
    }

    fn header(key: &'static str, value: &'static [u8]) -> Header {
        Header { key: key.into(), value: Bytes::from_static(value) }
    }

    fn decode(consumed: ConsumedRecord) -> Result<Inbound, WireError> {
        Inbound::decode(consumed, &mut RecentNames::default())
    }

    #[test]
    fn consecutive_requests_share_the_names_they_repeat() {
        let request = |kind: &'static [u8], topic: &'static [u8]| {
            consumed(vec![header(names::TYPE, kind), header(names::REPLY_TOPIC, topic), header(names::CORRELATION_ID, b"1")])
        };
        let mut recent = RecentNames::default();
        let first = Inbound::decode(request(b"a", b"r1"), &mut recent).unwrap();
        let second = Inbound::decode(request(b"a", b"r1"), &mut recent).unwrap();
        let (t1, t2) = (first.request_type.unwrap(), second.request_type.unwrap());
        let (r1, r2) = (first.reply_to.unwrap().topic, second.reply_to.unwrap().topic);
        assert!(Arc::ptr_eq(&t1, &t2) && Arc::ptr_eq(&r1, &r2), "the same names are shared, not copied");
        let third = Inbound::decode(request(b"b", b"r2"), &mut recent).unwrap();
        assert_eq!(third.request_type.as_deref(), Some("b"));
        assert_eq!(third.reply_to.map(|r| r.topic), Some(Arc::from("r2")), "a new name replaces the old");
    }

    #[test]
    fn names_that_are_not_text_are_refused_even_after_good_ones() {
        let mut recent = RecentNames::default();
        let good = consumed(vec![header(names::TYPE, b"a"), header(names::REPLY_TOPIC, b"r"), header(names::CORRELATION_ID, b"1")]);
        assert!(Inbound::decode(good, &mut recent).is_ok());
        let bad = consumed(vec![header(names::REPLY_TOPIC, b"\xff\xfe"), header(names::CORRELATION_ID, b"1")]);
        assert!(matches!(Inbound::decode(bad, &mut recent), Err(WireError::BadHeader { .. })));
        // A type that is not text leaves the reply address readable: kept as unreadable,
        // so the caller is answered.
        let bad = consumed(vec![header(names::TYPE, b"\xff\xfe"), header(names::REPLY_TOPIC, b"r"), header(names::CORRELATION_ID, b"1")]);
        let inbound = Inbound::decode(bad, &mut recent).expect("the reply address is readable");
        assert!(matches!(inbound.unreadable, Some(WireError::BadHeader { name: names::TYPE, .. })));
        assert_eq!(inbound.request_type, None);
        // An event has no use for a reply topic, but one that cannot be read still
        // makes its headers untrustworthy.
        let event = consumed(vec![header(names::REPLY_TOPIC, b"\xff")]);
        assert!(Inbound::decode(event, &mut recent).is_err());
    }

    #[test]
    fn a_reply_address_without_correlation_id_is_an_event() {
        let inbound = decode(consumed(vec![header(names::REPLY_TOPIC, b"r")])).unwrap();
        assert!(!inbound.expects_reply());
        let inbound =
            decode(consumed(vec![header(names::REPLY_TOPIC, b"r"), header(names::CORRELATION_ID, b"1")])).unwrap();
        assert_eq!(inbound.reply_to, Some(ReplyTo { topic: "r".into(), partition: None }));
        assert_eq!((inbound.partition, inbound.offset), (2, 7));
    }

    #[test]
    fn huge_malformed_headers_give_short_errors() {
        let huge: &'static [u8] = Box::leak(vec![b'x'; 1 << 20].into_boxed_slice());
        let err = decode(consumed(vec![header(names::REPLY_TOPIC, b"r"), header(names::REPLY_PARTITION, huge)])).unwrap_err();
        assert!(err.to_string().len() < 400, "{}: {} bytes", names::REPLY_PARTITION, err.to_string().len());
        // These leave the reply address readable: the request is answered with the error.
        for name in [names::CONTENT_TYPE, names::DEADLINE] {
            let inbound = decode(consumed(vec![header(names::REPLY_TOPIC, b"r"), header(name, huge)])).unwrap();
            let err = inbound.unreadable.unwrap_or_else(|| panic!("{name} read"));
            assert!(err.to_string().len() < 400, "{name}: {} bytes", err.to_string().len());
        }
    }

    #[test]
    fn oversized_correlation_ids_are_unroutable() {
        let long: &'static [u8] = Box::leak(vec![1u8; MAX_CORRELATION_ID + 1].into_boxed_slice());
        let ok: &'static [u8] = &[1u8; MAX_CORRELATION_ID];
        assert!(decode(consumed(vec![header(names::CORRELATION_ID, long)])).is_err());
        assert!(decode(consumed(vec![header(names::CORRELATION_ID, ok)])).is_ok());
    }

    #[test]
    fn deadlines_expire_and_cap() {
        let mut inbound = decode(consumed(Vec::new())).unwrap();
        assert!(!inbound.expired(i64::MAX) && inbound.remaining(0).is_none());
        inbound.deadline_ms = Some(1_000);
        assert!(inbound.expired(1_001) && !inbound.expired(1_000));
        assert_eq!(inbound.remaining(400), Some(Duration::from_millis(600)));
        assert_eq!(inbound.remaining(5_000), Some(Duration::ZERO));
    }
}
