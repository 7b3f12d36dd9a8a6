//! Kafka's `range` assignor and the standard `consumer` protocol encodings, so the
//! group's metadata is the same as a Java or librdkafka consumer's and Kafka tools
//! can describe it.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition as AssignedTopic;
use kafka_protocol::messages::{ConsumerProtocolAssignment, ConsumerProtocolSubscription, TopicName};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use super::GroupError;

/// Name of the assignment strategy, as Kafka's consumers call it.
pub(crate) const RANGE: &str = "range";

/// Version of the subscription and assignment encodings written. Version 0 is the
/// one every Kafka-protocol tool reads.
const VERSION: i16 = 0;

/// Subscription metadata sent in JoinGroup: a version prefix, then the message.
pub(crate) fn encode_subscription(topics: &[String]) -> Result<Bytes, GroupError> {
    let sub = ConsumerProtocolSubscription::default()
        .with_topics(topics.iter().map(|t| StrBytes::from_string(t.clone())).collect());
    encode_versioned(&sub)
}

/// Topics a member subscribed to, from its JoinGroup metadata.
pub(crate) fn decode_subscription(mut data: Bytes) -> Result<Vec<String>, GroupError> {
    let version = read_version(&mut data)?;
    let sub = ConsumerProtocolSubscription::decode(&mut data, version.min(3))
        .map_err(|e| GroupError::Protocol(format!("decoding subscription: {e}")))?;
    Ok(sub.topics.into_iter().map(|t| t.to_string()).collect())
}

/// One member's assignment as sent in SyncGroup.
pub(crate) fn encode_assignment(partitions: &BTreeMap<String, Vec<i32>>) -> Result<Bytes, GroupError> {
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

/// The partitions in a SyncGroup answer. An empty answer means no partitions.
pub(crate) fn decode_assignment(mut data: Bytes) -> Result<Vec<(String, i32)>, GroupError> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let version = read_version(&mut data)?;
    let a = ConsumerProtocolAssignment::decode(&mut data, version.min(3))
        .map_err(|e| GroupError::Protocol(format!("decoding assignment: {e}")))?;
    Ok(a
        .assigned_partitions
        .into_iter()
        .flat_map(|t| {
            let topic = t.topic.0.to_string();
            t.partitions.into_iter().map(move |p| (topic.clone(), p))
        })
        .collect())
}

fn encode_versioned<M: Encodable>(m: &M) -> Result<Bytes, GroupError> {
    let mut buf = BytesMut::new();
    buf.put_i16(VERSION);
    m.encode(&mut buf, VERSION)
        .map_err(|e| GroupError::Protocol(format!("encoding consumer protocol: {e}")))?;
    Ok(buf.freeze())
}

fn read_version(data: &mut Bytes) -> Result<i16, GroupError> {
    if data.remaining() < 2 {
        return Err(GroupError::Protocol("consumer protocol data too short".into()));
    }
    let v = data.get_i16();
    if v < 0 {
        return Err(GroupError::Protocol(format!("consumer protocol version {v}")));
    }
    Ok(v)
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
        let members: Vec<&String> =
            subscriptions.iter().filter(|(_, ts)| ts.contains(topic)).map(|(m, _)| m).collect();
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
        members
            .iter()
            .map(|(m, ts)| (m.to_string(), ts.iter().map(|t| t.to_string()).collect()))
            .collect()
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
        let a = range_assign(
            &subs(&[("a", &["x", "y"]), ("b", &["y"])]),
            &counts(&[("x", 2), ("y", 4)]),
        );
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
    fn subscription_and_assignment_round_trip() -> Result<(), GroupError> {
        let topics = vec!["orders".to_string(), "replies".to_string()];
        assert_eq!(decode_subscription(encode_subscription(&topics)?)?, topics);
        let mut parts = BTreeMap::new();
        parts.insert("orders".to_string(), vec![0, 2]);
        let decoded = decode_assignment(encode_assignment(&parts)?)?;
        assert_eq!(decoded, vec![("orders".to_string(), 0), ("orders".to_string(), 2)]);
        assert!(decode_assignment(Bytes::new())?.is_empty());
        Ok(())
    }

    #[test]
    fn subscription_matches_the_java_layout() -> Result<(), GroupError> {
        // version 0, array of 1 topic "t", null user data
        let bytes = encode_subscription(&["t".to_string()])?;
        assert_eq!(&bytes[..], &[0, 0, 0, 0, 0, 1, 0, 1, b't', 0xff, 0xff, 0xff, 0xff]);
        Ok(())
    }
}
