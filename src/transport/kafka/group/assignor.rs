//! Kafka's `range` assignor and the standard `consumer` protocol encodings, so the
//! group's metadata is the same as a Java or librdkafka consumer's and Kafka tools
//! can describe it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition as AssignedTopic;
use kafka_protocol::messages::{ConsumerProtocolAssignment, ConsumerProtocolSubscription, TopicName};
use kafka_protocol::protocol::{Encodable, StrBytes};

use super::CallError;

/// Name of the assignment strategy, as Kafka's consumers call it.
pub(crate) const RANGE: &str = "range";

/// Version of the subscription and assignment encodings written. Version 0 is the
/// one every Kafka-protocol tool reads.
const VERSION: i16 = 0;

/// Subscription metadata sent in JoinGroup: a version prefix, then the message.
pub(crate) fn encode_subscription(topics: &[String], seen: Option<&HashMap<String, i32>>) -> Result<Bytes, CallError> {
    // The partition counts the member last saw, as user data no assignor reads: a
    // member that rejoins because a topic grew then differs from its last join, which
    // tansu needs to start a new generation (it hands a member rejoining unchanged its
    // stored assignment).
    let seen = seen.map(|counts| {
        let mut counts: Vec<_> = counts.iter().collect();
        counts.sort();
        Bytes::from(counts.iter().map(|(t, n)| format!("{t}:{n}\n")).collect::<String>())
    });
    let sub = ConsumerProtocolSubscription::default()
        .with_topics(topics.iter().map(|t| StrBytes::from_string(t.clone())).collect())
        .with_user_data(seen);
    encode_versioned(&sub)
}

/// Topics a member subscribed to, from its JoinGroup metadata. The bytes come
/// from another member (any client, maybe hostile), so every count is checked
/// against the bytes left before anything is allocated by it. Fields after the
/// topics (user data, owned partitions, and whatever later versions add) are not
/// needed and not read, so any version decodes.
pub(crate) fn decode_subscription(data: Bytes) -> Result<Vec<String>, CallError> {
    let mut r = Reader { data: &data[..], what: "subscription" };
    r.version()?;
    let count = r.count(2)?;
    let mut topics = Vec::with_capacity(count);
    for _ in 0..count {
        topics.push(r.string()?);
    }
    Ok(topics)
}

/// One member's assignment as sent in SyncGroup.
pub(crate) fn encode_assignment(partitions: &BTreeMap<String, Vec<i32>>) -> Result<Bytes, CallError> {
    let assignment = ConsumerProtocolAssignment::default().with_assigned_partitions(
        partitions
            .iter()
            .map(|(topic, parts)| {
                AssignedTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(topic.clone())))
                    .with_partitions(parts.clone())
            })
            .collect(),
    );
    encode_versioned(&assignment)
}

/// The partitions in a SyncGroup answer (written by the group's leader, maybe a
/// foreign client), with every count checked against the bytes left. An empty
/// answer means no partitions.
pub(crate) fn decode_assignment(data: Bytes) -> Result<Vec<(String, i32)>, CallError> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let mut r = Reader { data: &data[..], what: "assignment" };
    r.version()?;
    let topics = r.count(6)?;
    let mut out = Vec::new();
    for _ in 0..topics {
        let topic = r.string()?;
        let partitions = r.count(4)?;
        out.reserve(partitions);
        for _ in 0..partitions {
            out.push((topic.clone(), r.i32()?));
        }
    }
    Ok(out)
}

/// Reads the consumer protocol's big-endian fields from untrusted bytes.
struct Reader<'a> {
    data: &'a [u8],
    what: &'static str,
}

impl Reader<'_> {
    fn error(&self, why: String) -> CallError {
        CallError::Protocol(format!("decoding {}: {why}", self.what))
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], CallError> {
        match self.data.split_first_chunk::<N>() {
            Some((head, rest)) => {
                self.data = rest;
                Ok(*head)
            }
            None => Err(self.error(format!("{} bytes left, {N} needed", self.data.len()))),
        }
    }

    fn i32(&mut self) -> Result<i32, CallError> {
        self.take::<4>().map(i32::from_be_bytes)
    }

    fn version(&mut self) -> Result<i16, CallError> {
        let v = i16::from_be_bytes(self.take::<2>()?);
        if v < 0 {
            return Err(self.error(format!("version {v}")));
        }
        Ok(v)
    }

    /// An array length whose elements take at least `min_size` bytes each.
    fn count(&mut self, min_size: usize) -> Result<usize, CallError> {
        let n = self.i32()?;
        let n = usize::try_from(n).map_err(|_| self.error(format!("array length {n}")))?;
        if n.saturating_mul(min_size) > self.data.len() {
            return Err(self.error(format!("{n} elements cannot fit in {} bytes", self.data.len())));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, CallError> {
        let len = i16::from_be_bytes(self.take::<2>()?);
        let len = usize::try_from(len).map_err(|_| self.error(format!("string length {len}")))?;
        if len > self.data.len() {
            return Err(self.error(format!("string of {len} bytes in {}", self.data.len())));
        }
        let (s, rest) = self.data.split_at(len);
        self.data = rest;
        std::str::from_utf8(s).map(str::to_string).map_err(|e| self.error(format!("topic name: {e}")))
    }
}

fn encode_versioned<M: Encodable>(m: &M) -> Result<Bytes, CallError> {
    let mut buf = BytesMut::new();
    buf.put_i16(VERSION);
    m.encode(&mut buf, VERSION).map_err(|e| CallError::Protocol(format!("encoding consumer protocol: {e}")))?;
    Ok(buf.freeze())
}

/// Kafka's range assignment: per topic, the members subscribed to it in member-id
/// order each take a contiguous run of partitions, the first `partitions % members`
/// one extra. Every member appears in the result, possibly with nothing.
pub(crate) fn range_assign(
    subscriptions: &BTreeMap<String, Vec<String>>,
    partition_counts: &BTreeMap<String, i32>,
) -> BTreeMap<String, BTreeMap<String, Vec<i32>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<i32>>> =
        subscriptions.keys().map(|m| (m.clone(), BTreeMap::new())).collect();
    let topics: BTreeSet<&String> = subscriptions.values().flatten().collect();
    for topic in topics {
        let Some(&count) = partition_counts.get(topic) else { continue };
        let members: Vec<&String> = subscriptions.iter().filter(|(_, ts)| ts.contains(topic)).map(|(m, _)| m).collect();
        if members.is_empty() || count <= 0 {
            continue;
        }
        let n = members.len() as i32;
        let (per, extra) = (count / n, count % n);
        let mut next = 0;
        for (i, member) in members.into_iter().enumerate() {
            let take = per + i32::from((i as i32) < extra);
            if take == 0 {
                continue;
            }
            let parts: Vec<i32> = (next..next + take).collect();
            next += take;
            if let Some(m) = out.get_mut(member) {
                m.insert(topic.clone(), parts);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subs(members: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        members.iter().map(|(m, ts)| (m.to_string(), ts.iter().map(|t| t.to_string()).collect())).collect()
    }

    fn counts(c: &[(&str, i32)]) -> BTreeMap<String, i32> {
        c.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    }

    #[test]
    fn uneven_split_gives_the_first_members_one_more() {
        let a = range_assign(&subs(&[("b", &["t"]), ("a", &["t"])]), &counts(&[("t", 5)]));
        assert_eq!(a["a"]["t"], vec![0, 1, 2]);
        assert_eq!(a["b"]["t"], vec![3, 4]);
    }

    #[test]
    fn more_members_than_partitions_leaves_some_idle() {
        let a = range_assign(&subs(&[("a", &["t"]), ("b", &["t"]), ("c", &["t"])]), &counts(&[("t", 2)]));
        assert_eq!(a["a"]["t"], vec![0]);
        assert_eq!(a["b"]["t"], vec![1]);
        assert!(a["c"].is_empty());
    }

    #[test]
    fn topics_are_split_independently_among_their_subscribers() {
        let a = range_assign(&subs(&[("a", &["x", "y"]), ("b", &["y"])]), &counts(&[("x", 2), ("y", 4)]));
        assert_eq!(a["a"]["x"], vec![0, 1]);
        assert_eq!(a["a"]["y"], vec![0, 1]);
        assert_eq!(a["b"]["y"], vec![2, 3]);
        assert!(!a["b"].contains_key("x"));
    }

    #[test]
    fn unknown_topics_are_skipped() {
        let a = range_assign(&subs(&[("a", &["missing"])]), &counts(&[]));
        assert!(a["a"].is_empty());
    }

    #[test]
    fn subscription_and_assignment_round_trip() -> Result<(), CallError> {
        let topics = vec!["orders".to_string(), "replies".to_string()];
        assert_eq!(decode_subscription(encode_subscription(&topics, None)?)?, topics);
        let mut parts = BTreeMap::new();
        parts.insert("orders".to_string(), vec![0, 2]);
        let decoded = decode_assignment(encode_assignment(&parts)?)?;
        assert_eq!(decoded, vec![("orders".to_string(), 0), ("orders".to_string(), 2)]);
        assert!(decode_assignment(Bytes::new())?.is_empty());
        Ok(())
    }

    #[test]
    fn counts_the_bytes_cannot_hold_are_refused_before_allocating() {
        // Version 0, then 2^31 - 1 topics in six bytes.
        let hostile = Bytes::from_static(&[0, 0, 0x7f, 0xff, 0xff, 0xff]);
        assert!(decode_subscription(hostile.clone()).is_err());
        assert!(decode_assignment(hostile).is_err());
        assert!(decode_subscription(Bytes::from_static(&[0xff, 0xff, 0, 0, 0, 0])).is_err(), "negative version");
    }

    #[test]
    fn later_versions_decode_by_their_common_prefix() -> Result<(), CallError> {
        // Version 3: topics ["t"], then user data, owned partitions, generation and
        // rack, none of which this client reads.
        let mut v3 = vec![0, 3, 0, 0, 0, 1, 0, 1, b't'];
        v3.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 7, 0xff, 0xff]);
        assert_eq!(decode_subscription(Bytes::from(v3))?, vec!["t".to_string()]);
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_subscriptions_decode_or_fail_without_panicking(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            if let Ok(topics) = decode_subscription(Bytes::from(data.clone())) {
                // Every topic took at least its two length bytes.
                proptest::prop_assert!(topics.len() * 2 <= data.len());
            }
        }

        #[test]
        fn arbitrary_assignments_decode_or_fail_without_panicking(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            if let Ok(parts) = decode_assignment(Bytes::from(data.clone())) {
                proptest::prop_assert!(parts.len() * 4 <= data.len());
            }
        }

        #[test]
        fn encoded_subscriptions_round_trip(topics in proptest::collection::vec("[a-z.-]{1,20}", 0..8)) {
            let decoded = encode_subscription(&topics, None).and_then(decode_subscription);
            proptest::prop_assert_eq!(decoded.ok(), Some(topics));
        }
    }

    #[test]
    fn subscription_matches_the_java_layout() -> Result<(), CallError> {
        // version 0, array of 1 topic "t", null user data
        let bytes = encode_subscription(&["t".to_string()], None)?;
        assert_eq!(&bytes[..], &[0, 0, 0, 0, 0, 1, 0, 1, b't', 0xff, 0xff, 0xff, 0xff]);
        Ok(())
    }
}
