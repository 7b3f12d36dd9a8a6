//! Which reply addresses a server will write to.
//!
//! A request names its reply topic and partition, and the server produces there with
//! its own credentials; left unchecked, one record could make the server write into
//! any topic it can reach. So only configured reply topics are allowed (by default
//! `<request topic>.replies`, plus an allowlist and name prefixes), the partition must
//! exist, and topics are never created on the reply path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use foldhash::HashSet;

use crate::transport::{Transport, TransportError};

/// Most reply topics whose partition count is remembered.
pub(crate) const MAX_CACHED_TOPICS: usize = 1024;

/// How long a partition count is trusted before it is asked again (topics may grow),
/// in ms of the clock the worker already read for the request's deadline.
const COUNT_TTL_MS: i64 = 60_000;

/// A count asked this recently (ms) is trusted even for a partition past it: asking
/// again lists the broker's topics, and a request may name any partition.
pub(crate) const RECHECK_AFTER_MS: i64 = 1_000;

/// How often a refusal for one topic is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Why a reply address was refused.
#[derive(Debug, Clone)]
pub(crate) enum Refusal {
    /// The topic is not a configured reply topic.
    TopicNotAllowed,
    /// The topic is allowed but does not exist (it is not created).
    UnknownTopic,
    /// The partition is outside the topic.
    NoSuchPartition { partitions: i32 },
    /// The broker could not be asked; not a refusal for good.
    Unavailable(TransportError),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::TopicNotAllowed => f.write_str("not an allowed reply topic"),
            Refusal::UnknownTopic => f.write_str("reply topic does not exist"),
            Refusal::NoSuchPartition { partitions } => write!(f, "reply partition outside the topic's {partitions}"),
            Refusal::Unavailable(e) => write!(f, "cannot look the reply topic up: {e}"),
        }
    }
}

/// The allowed reply topics, with a bounded cache of their partition counts.
pub(crate) struct ReplyPolicy {
    topics: HashSet<String>,
    prefixes: Vec<String>,
    // Read for every request by every partition worker: sharded, not one lock.
    // The time is the worker's `now_ms`: a clock read of its own here was one more
    // per request.
    counts: DashMap<String, (i32, i64), foldhash::fast::RandomState>,
    warned: Mutex<HashMap<String, Instant>>,
}

impl ReplyPolicy {
    pub(crate) fn new(topics: impl IntoIterator<Item = String>, prefixes: Vec<String>) -> Self {
        ReplyPolicy { topics: topics.into_iter().collect(), prefixes, counts: DashMap::default(), warned: Mutex::default() }
    }

    /// Whether `topic` is a configured reply topic.
    pub(crate) fn allows(&self, topic: &str) -> bool {
        self.topics.contains(topic) || self.prefixes.iter().any(|p| topic.starts_with(p.as_str()))
    }

    /// The partition count of an allowed topic at `now_ms` (ms since the epoch) and
    /// when it was asked: cached, else asked of the broker (which never creates it).
    /// `Ok(None)` when the topic does not exist; an error when the broker cannot say
    /// (not cached, so it is asked again).
    pub(crate) async fn partitions(&self, transport: &dyn Transport, topic: &str, now_ms: i64) -> Result<Option<(i32, i64)>, TransportError> {
        if let Some(entry) = self.counts.get(topic) {
            let (count, at) = *entry;
            if fresh(at, now_ms) {
                return Ok(Some((count, at)));
            }
        }
        self.ask(transport, topic, now_ms).await
    }

    /// The partition count of an allowed topic asked of the broker at `now_ms`, past the
    /// cache (which it updates): for a partition the cached count does not have yet,
    /// since topics grow. As [`partitions`](Self::partitions) otherwise.
    pub(crate) async fn ask(&self, transport: &dyn Transport, topic: &str, now_ms: i64) -> Result<Option<(i32, i64)>, TransportError> {
        let count = match transport.partition_count(topic).await {
            Ok(count) => count,
            Err(TransportError::UnknownTopic(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let counts = &self.counts;
        if counts.len() >= MAX_CACHED_TOPICS && !counts.contains_key(topic) {
            // Prefix rules can allow unboundedly many names; drop the stale entries, and
            // if none are stale, everything (the cache is only a shortcut).
            counts.retain(|_, (_, at)| fresh(*at, now_ms));
            if counts.len() >= MAX_CACHED_TOPICS {
                counts.clear();
            }
        }
        counts.insert(topic.to_owned(), (count, now_ms));
        Ok(Some((count, now_ms)))
    }

    /// Whether a refusal for `topic` should be logged now (at most once per topic per
    /// minute; the tracked names are bounded like the count cache).
    pub(crate) fn should_warn(&self, topic: &str) -> bool {
        let mut warned = lock(&self.warned);
        if let Some(at) = warned.get(topic) {
            if at.elapsed() < WARN_EVERY {
                return false;
            }
        }
        if warned.len() >= MAX_CACHED_TOPICS {
            warned.retain(|_, at| at.elapsed() < WARN_EVERY);
            if warned.len() >= MAX_CACHED_TOPICS {
                // Flooded with distinct names: stay quiet rather than grow.
                return false;
            }
        }
        warned.insert(topic.to_owned(), Instant::now());
        true
    }

    #[cfg(test)]
    fn cached(&self) -> usize {
        self.counts.len()
    }
}

/// The last reply topic one partition worker found allowed, with its partition count
/// and when that count was asked.
///
/// Why: consecutive requests nearly always name the same reply topic, and
/// `RecentNames` hands them the same `Arc<str>`. Recognised by pointer, such a request
/// skips the allowlist and the shared count cache, which hashed and compared the name
/// twice per request (2 % of an embedded round trip). The count expires exactly when
/// the shared cache's entry does.
#[derive(Debug, Default)]
pub(crate) struct LastAllowed(Option<(Arc<str>, i32, i64)>);

impl LastAllowed {
    /// The partition count of `topic` at `now_ms` and when it was asked, if it is the
    /// topic remembered and its count is still fresh.
    pub(crate) fn count(&self, topic: &Arc<str>, now_ms: i64) -> Option<(i32, i64)> {
        match &self.0 {
            Some((last, count, at)) if Arc::ptr_eq(last, topic) && fresh(*at, now_ms) => Some((*count, *at)),
            _ => None,
        }
    }

    /// Remembers that `topic` was allowed and has `count` partitions, asked at `at`.
    pub(crate) fn remember(&mut self, topic: &Arc<str>, count: i32, at: i64) {
        self.0 = Some((topic.clone(), count, at));
    }
}

/// Whether a count cached at `at` may still be used at `now`. A wall clock set back
/// makes it stale, not fresh for as long as the clock went back.
fn fresh(at: i64, now: i64) -> bool {
    (0..COUNT_TTL_MS).contains(&now.saturating_sub(at))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::embedded::EmbeddedBroker;

    #[test]
    fn only_configured_topics_and_prefixes_are_allowed() {
        let policy = ReplyPolicy::new(["orders.replies".to_string()], vec!["replies.".into()]);
        assert!(policy.allows("orders.replies"));
        assert!(policy.allows("replies.client-7"));
        assert!(!policy.allows("user-profiles"));
        assert!(!policy.allows("orders.replies2"));
    }

    #[tokio::test]
    async fn partition_counts_are_cached_with_a_bound_and_never_create_topics() {
        let broker = EmbeddedBroker::new();
        let policy = ReplyPolicy::new([], vec!["r-".into()]);
        assert_eq!(policy.partitions(&broker, "r-missing", 0).await.unwrap(), None);
        assert!(broker.partition_count("r-missing").await.is_err(), "the reply path must not create topics");
        for n in 0..MAX_CACHED_TOPICS + 10 {
            let topic = format!("r-{n}");
            broker.ensure_topic(&topic, 2).await.unwrap();
            assert_eq!(policy.partitions(&broker, &topic, 0).await.unwrap(), Some((2, 0)));
            assert!(policy.cached() <= MAX_CACHED_TOPICS);
        }
    }

    #[test]
    fn cached_counts_expire_and_a_clock_set_back_expires_them_too() {
        assert!(fresh(1_000, 1_000) && fresh(1_000, 1_000 + COUNT_TTL_MS - 1));
        assert!(!fresh(1_000, 1_000 + COUNT_TTL_MS));
        assert!(!fresh(1_000, 999), "a clock set back must not keep a count forever");
    }

    #[tokio::test]
    async fn a_cached_count_keeps_the_time_it_was_asked() {
        let broker = EmbeddedBroker::new();
        broker.ensure_topic("r", 3).await.unwrap();
        let policy = ReplyPolicy::new(["r".to_string()], Vec::new());
        assert_eq!(policy.partitions(&broker, "r", 1_000).await.unwrap(), Some((3, 1_000)));
        assert_eq!(policy.partitions(&broker, "r", 5_000).await.unwrap(), Some((3, 1_000)), "served from the cache");
        let later = 1_000 + COUNT_TTL_MS;
        assert_eq!(policy.partitions(&broker, "r", later).await.unwrap(), Some((3, later)), "asked again once stale");
    }

    #[test]
    fn the_last_allowed_topic_is_recognised_by_pointer_and_expires_with_its_count() {
        let topic: Arc<str> = Arc::from("orders.replies");
        let mut last = LastAllowed::default();
        assert_eq!(last.count(&topic, 0), None);
        last.remember(&topic, 4, 1_000);
        assert_eq!(last.count(&topic.clone(), 1_000 + COUNT_TTL_MS - 1), Some((4, 1_000)));
        assert_eq!(last.count(&topic, 1_000 + COUNT_TTL_MS), None, "stale when the shared cache's entry is");
        assert_eq!(last.count(&topic, 999), None, "a clock set back makes it stale too");
        let same_name: Arc<str> = Arc::from("orders.replies");
        assert_eq!(last.count(&same_name, 1_000), None, "another name is checked again, even if equal");
    }

    #[test]
    fn refusals_warn_once_per_topic() {
        let policy = ReplyPolicy::new([], Vec::new());
        assert!(policy.should_warn("a"));
        assert!(!policy.should_warn("a"));
        assert!(policy.should_warn("b"));
    }
}
