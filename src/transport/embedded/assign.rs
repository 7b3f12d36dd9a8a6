//! Range assignment, as Kafka's `RangeAssignor` computes it.

use std::collections::{BTreeMap, BTreeSet};

use crate::transport::TopicPartition;

/// Splits each topic's partitions into contiguous ranges over the members subscribed
/// to it, taken in member-id order; the first `partitions % members` members get one
/// extra. Every member appears in the result, with an empty list when it gets nothing.
/// Topics for which `partition_count` gives `None` are skipped.
///
/// Deterministic in the member ids, so every rebalance with the same membership hands
/// out the same partitions, and a Java consumer with the same ids would agree.
pub(crate) fn range_assign<'a>(
    members: impl IntoIterator<Item = (&'a str, &'a [String])>,
    partition_count: impl Fn(&str) -> Option<i32>,
) -> BTreeMap<&'a str, Vec<TopicPartition>> {
    let mut result: BTreeMap<&'a str, Vec<TopicPartition>> = BTreeMap::new();
    let mut subscribers: BTreeMap<&'a str, BTreeSet<&'a str>> = BTreeMap::new();
    for (member, topics) in members {
        result.entry(member).or_default();
        for topic in topics {
            subscribers.entry(topic.as_str()).or_default().insert(member);
        }
    }
    for (topic, members) in subscribers {
        let Some(count) = partition_count(topic) else { continue };
        let count = count.max(0) as usize;
        let per_member = count / members.len();
        let with_extra = count % members.len();
        let mut next = 0usize;
        for (i, member) in members.into_iter().enumerate() {
            let take = per_member + usize::from(i < with_extra);
            let owned = result.entry(member).or_default();
            owned.extend((next..next + take).map(|p| TopicPartition::new(topic, p as i32)));
            next += take;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tps(topic: &str, parts: &[i32]) -> Vec<TopicPartition> {
        parts.iter().map(|&p| TopicPartition::new(topic, p)).collect()
    }

    #[test]
    fn extra_partitions_go_to_the_first_members_in_id_order() {
        let topics = vec!["t".to_owned()];
        // Given out of order on purpose: assignment must follow id order, not input order.
        let members = [("m-c", topics.as_slice()), ("m-a", topics.as_slice()), ("m-b", topics.as_slice())];
        let got = range_assign(members, |_| Some(7));
        assert_eq!(got["m-a"], tps("t", &[0, 1, 2]));
        assert_eq!(got["m-b"], tps("t", &[3, 4]));
        assert_eq!(got["m-c"], tps("t", &[5, 6]));
    }

    #[test]
    fn each_topic_is_split_among_its_own_subscribers() {
        let both = vec!["x".to_owned(), "y".to_owned()];
        let only_y = vec!["y".to_owned()];
        let got = range_assign([("a", both.as_slice()), ("b", only_y.as_slice())], |t| match t {
            "x" => Some(2),
            "y" => Some(3),
            _ => None,
        });
        let mut a = tps("x", &[0, 1]);
        a.extend(tps("y", &[0, 1]));
        assert_eq!(got["a"], a);
        assert_eq!(got["b"], tps("y", &[2]));
    }

    #[test]
    fn more_members_than_partitions_leaves_some_empty() {
        let topics = vec!["t".to_owned()];
        let got = range_assign([("a", topics.as_slice()), ("b", topics.as_slice())], |_| Some(1));
        assert_eq!(got["a"], tps("t", &[0]));
        assert_eq!(got["b"], Vec::<TopicPartition>::new());
    }

    #[test]
    fn unknown_topics_are_skipped() {
        let topics = vec!["gone".to_owned()];
        let got = range_assign([("a", topics.as_slice())], |_| None);
        assert_eq!(got["a"], Vec::<TopicPartition>::new());
    }
}
