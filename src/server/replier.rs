//! The one owner of replies: where a reply goes (addressing and the reply-topic
//! policy), what it says (error text bounded, size checked), producing it, and telling
//! the partition worker when the record counts as answered.
//!
//! The rule it implements (see `docs/guarantees.md`): a record is settled only once
//! its reply, or a small error reply in its place, was acknowledged by the broker.
//! A reply larger than the configured maximum is replaced by `REPLY_TOO_LARGE` before
//! it is batched; a reply the broker refuses after bounded retries is replaced by
//! `REPLY_FAILED` (the ordered producer splits a batch refused as a whole, so only the
//! record at fault is replaced). If not even the error reply can be produced because
//! the broker is unreachable, the record is reported unanswered and its offset is not
//! committed. If the broker refuses it, the request goes to the dead-letter topic when
//! the server has one, and is settled once that write is acknowledged.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::inbound::{Inbound, ReplyTo};
use super::reply_policy::{LastAllowed, Refusal, ReplyPolicy, RECHECK_AFTER_MS};
use super::stats::ServerCounters;
use crate::codec::ContentType;
use crate::error::{excerpt, ErrorCode, RemoteError, MAX_ECHO, MAX_ERROR_MESSAGE};
use crate::partitioner::partition_for_key;
use crate::producer::{BatchConfig, LastQueue, OrderedProducer, Tag};
use crate::transport::{Record, Transport, TransportError};
use crate::wire::{self, names, Peer};

/// A reply address that passed the policy, with its partition resolved.
#[derive(Debug, Clone)]
pub(crate) struct Address {
    topic: Arc<str>,
    partition: i32,
}

/// Where a request's reply may go.
pub(crate) enum Route {
    /// The address passed the policy.
    To(Address),
    /// The policy refused it (counted and logged): settle the record unanswered by design.
    Refused,
    /// The broker could not say whether the address exists: read the record again later
    /// rather than drop a legitimate request over a hiccup.
    Unknown,
}

/// Settles a record once its reply was produced: `true` when it (or its error-reply
/// replacement) was acknowledged, `false` when nothing could be produced.
pub(crate) type Ack = oneshot::Receiver<bool>;

/// What a queued reply carries through the producer: whom to tell, and what to send
/// instead if the reply itself cannot be produced.
struct ReplyTag {
    ack: oneshot::Sender<bool>,
    // The key and correlation id of a replacement are read from the failed reply
    // itself: kept here, they were two shared reference counts changed per reply.
    content_type: ContentType,
    peer: Peer,
    replaced: bool,
    /// The request, kept when the server has a dead-letter topic.
    request: Option<Origin>,
}

/// The reply queue one partition worker sent to last: its next reply to the same
/// address skips the reply producer's lock and lookups.
#[derive(Default)]
pub(crate) struct LastReplyQueue(LastQueue<ReplyTag>);

/// Where a request was read, and the request itself.
struct Origin {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    record: Arc<Record>,
}

/// A dead-letter topic and its partition count.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetters {
    pub(crate) topic: String,
    pub(crate) partitions: i32,
}

impl Tag for ReplyTag {
    fn fallback(&mut self, failed: &Record, error: &TransportError) -> Option<Record> {
        let id = wire::reply_correlation_id(failed)?.clone();
        self.replaced = true;
        let message = excerpt(format!("the reply could not be produced: {error}"), MAX_ECHO);
        let error = RemoteError::with_code(ErrorCode::ReplyFailed, message);
        Some(wire::reply_record(self.peer, small_key(&failed.key), id, self.content_type, Err(error), crate::clock::now_ms()))
    }
}

/// Reply settings chosen on the server builder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplySettings {
    pub(crate) batch: BatchConfig,
    pub(crate) max_reply_bytes: usize,
    /// Conventions every reply follows; `None` answers each caller in its own.
    pub(crate) peer: Option<Peer>,
}

pub(crate) struct Replier {
    transport: Arc<dyn Transport>,
    policy: ReplyPolicy,
    producer: OrderedProducer<ReplyTag>,
    counters: Arc<ServerCounters>,
    max_reply_bytes: usize,
    peer: Option<Peer>,
    dead_letters: Option<Arc<DeadLetters>>,
}

impl Replier {
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        policy: ReplyPolicy,
        settings: ReplySettings,
        counters: Arc<ServerCounters>,
        dead_letters: Option<DeadLetters>,
    ) -> Self {
        let dead_letters = dead_letters.map(Arc::new);
        let (settled, to_dead_letters, dlt_transport) = (counters.clone(), dead_letters.clone(), transport.clone());
        let producer = OrderedProducer::new(
            transport.clone(),
            settings.batch,
            Arc::new(move |outcome: Result<i64, TransportError>, tags: Vec<ReplyTag>| {
                // Unreachable broker: the record is read again later. Refused even as an
                // error reply: retrying cannot help, and rewinding would block the
                // partition for good, so the record counts as settled.
                let answered = match &outcome {
                    Ok(_) => true,
                    Err(TransportError::Connection { .. } | TransportError::Closed) => false,
                    Err(_) => true,
                };
                for mut tag in tags {
                    if let (Err(error), true, Some(dlt), Some(origin)) = (&outcome, answered, &to_dead_letters, tag.request.take()) {
                        let letter = dead_letter(&origin, error);
                        tokio::spawn(send_dead_letter(dlt_transport.clone(), dlt.clone(), origin, letter, tag.ack, settled.clone()));
                        continue;
                    }
                    let counter = match &outcome {
                        Ok(_) if tag.replaced => Some(&settled.replies_replaced),
                        Ok(_) => None,
                        Err(_) if answered => Some(&settled.replies_dropped),
                        Err(_) => Some(&settled.reply_failures),
                    };
                    if let Some(counter) = counter {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = tag.ack.send(answered);
                }
            }),
            None,
        );
        Replier { transport, policy, producer, counters, max_reply_bytes: settings.max_reply_bytes, peer: settings.peer, dead_letters }
    }

    /// Checks a request's reply address against the policy at `now_ms` (the worker's
    /// clock read for the request) and resolves its partition.
    /// A refusal is counted and logged (rate-limited per topic); the caller settles the
    /// record without running it, since it cannot be answered.
    pub(crate) async fn route(&self, inbound: &Inbound, reply_to: &ReplyTo, now_ms: i64, last: &mut LastAllowed) -> Route {
        match self.resolve(inbound, reply_to, now_ms, last).await {
            Ok(address) => Route::To(address),
            Err(Refusal::Unavailable(e)) => {
                tracing::warn!(offset = inbound.offset, error = %e, "cannot check the reply address; will read the request again");
                Route::Unknown
            }
            Err(refusal) => {
                self.counters.replies_refused.fetch_add(1, Ordering::Relaxed);
                if self.policy.should_warn(&reply_to.topic) {
                    tracing::warn!(
                        reply_topic = %excerpt(reply_to.topic.as_bytes(), MAX_ECHO),
                        partition = ?reply_to.partition,
                        offset = inbound.offset,
                        reason = %refusal,
                        "refusing to reply (logged once a minute per topic)"
                    );
                }
                Route::Refused
            }
        }
    }

    /// The partition count of an allowed reply topic and when it was asked, from the
    /// policy's cache or, if `fresh`, from the broker; remembered in `last`.
    async fn look_up(&self, topic: &Arc<str>, now_ms: i64, fresh: bool, last: &mut LastAllowed) -> Result<(i32, i64), Refusal> {
        let transport = self.transport.as_ref();
        let found = if fresh {
            self.policy.ask(transport, topic, now_ms).await
        } else {
            self.policy.partitions(transport, topic, now_ms).await
        };
        let (partitions, at) = found.map_err(Refusal::Unavailable)?.ok_or(Refusal::UnknownTopic)?;
        last.remember(topic, partitions, at);
        Ok((partitions, at))
    }

    async fn resolve(&self, inbound: &Inbound, reply_to: &ReplyTo, now_ms: i64, last: &mut LastAllowed) -> Result<Address, Refusal> {
        let (mut partitions, at) = match last.count(&reply_to.topic, now_ms) {
            Some(remembered) => remembered,
            None => {
                if !self.policy.allows(&reply_to.topic) {
                    return Err(Refusal::TopicNotAllowed);
                }
                self.look_up(&reply_to.topic, now_ms, false, last).await?
            }
        };
        if reply_to.partition.is_some_and(|p| p >= partitions) && now_ms.saturating_sub(at) >= RECHECK_AFTER_MS {
            // A remembered count may be from before the topic grew (a client started
            // since may pin a new partition): ask again before refusing for good.
            (partitions, _) = self.look_up(&reply_to.topic, now_ms, true, last).await?;
        }
        let partition = match reply_to.partition {
            Some(p) if (0..partitions).contains(&p) => p,
            Some(_) => return Err(Refusal::NoSuchPartition { partitions }),
            // By key, as a Kafka producer would choose it.
            None => inbound.record.key.as_deref().map(|k| partition_for_key(k, partitions)).unwrap_or(0),
        };
        Ok(Address { topic: reply_to.topic.clone(), partition })
    }

    /// Queues the reply to `inbound` (read from `topic`) at `address`, stamped `at_ms`,
    /// and returns its acknowledgement.
    pub(crate) fn send(
        &self,
        topic: &Arc<str>,
        inbound: &Inbound,
        address: &Address,
        outcome: Result<Vec<u8>, RemoteError>,
        at_ms: i64,
        last: &mut LastReplyQueue,
    ) -> Ack {
        let (ack, acked) = oneshot::channel();
        let Some(correlation_id) = inbound.correlation_id.clone() else {
            // Unreachable: an address exists only for requests with a correlation id.
            let _ = ack.send(true);
            return acked;
        };
        let outcome = self.as_sent(inbound, outcome);
        let key = match &outcome {
            // The error reply must fit where the reply did not: keep a key only if small.
            Err(e) if e.code == ErrorCode::ReplyTooLarge => small_key(&inbound.record.key),
            _ => inbound.record.key.clone(),
        };
        let peer = self.peer.unwrap_or(inbound.peer);
        let tag = ReplyTag {
            ack,
            content_type: inbound.content_type,
            peer,
            replaced: false,
            request: self.dead_letters.as_ref().map(|_| Origin {
                topic: topic.clone(),
                partition: inbound.partition,
                offset: inbound.offset,
                record: inbound.record.clone(),
            }),
        };
        let record = wire::reply_record(peer, key, correlation_id, inbound.content_type, outcome, at_ms);
        if let Err(tag) = self.producer.send_remembering(&mut last.0, &address.topic, address.partition, record, tag) {
            // Shutting down: unanswered, so the offset stays for the next owner.
            let _ = tag.ack.send(false);
        }
        acked
    }

    /// `outcome` as a reply to `inbound` carries it: a response over `max_reply_bytes`
    /// replaced by `REPLY_TOO_LARGE` (counted and logged here), an error's text bounded.
    /// What an idempotency window keeps, too: it holds no more than the caller got.
    pub(crate) fn as_sent(&self, inbound: &Inbound, outcome: Result<Vec<u8>, RemoteError>) -> Result<Vec<u8>, RemoteError> {
        match outcome {
            Ok(value) if reply_size(inbound.record.key.as_ref(), &value) > self.max_reply_bytes => {
                self.counters.replies_too_large.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(offset = inbound.offset, bytes = value.len(), max = self.max_reply_bytes, "reply too large; sending REPLY_TOO_LARGE");
                Err(RemoteError::with_code(
                    ErrorCode::ReplyTooLarge,
                    format!("the reply has {} bytes; the server sends at most {}", value.len(), self.max_reply_bytes),
                ))
            }
            Ok(value) => Ok(value),
            Err(e) => Err(bounded(e)),
        }
    }

    /// Sends queued replies, and every reply from now on, without waiting out the
    /// linger: for a server winding down, whose workers end once their replies are
    /// acknowledged.
    pub(crate) fn flush(&self) {
        self.producer.flush();
    }

    /// Produces what is queued and stops, waiting up to `timeout`; returns the reply
    /// partitions whose produce had not finished by then and was abandoned.
    pub(crate) async fn close_within(&self, timeout: std::time::Duration) -> Vec<crate::transport::TopicPartition> {
        self.producer.close_within(timeout).await
    }
}

/// The request as a dead-letter record: its key, value and headers, then where it was
/// read and why it is here, in Spring's `kafka_dlt-*` headers so Spring's tools read it.
fn dead_letter(origin: &Origin, error: &TransportError) -> Record {
    let request = &origin.record;
    let mut headers = request.headers.clone();
    let why = excerpt(format!("neither the reply nor an error reply could be produced: {error}"), MAX_ERROR_MESSAGE);
    headers.extend([
        wire::header(names::DLT_ORIGINAL_TOPIC, Bytes::copy_from_slice(origin.topic.as_bytes())),
        wire::header(names::DLT_ORIGINAL_PARTITION, Bytes::copy_from_slice(&origin.partition.to_be_bytes())),
        wire::header(names::DLT_ORIGINAL_OFFSET, Bytes::copy_from_slice(&origin.offset.to_be_bytes())),
        wire::header(names::DLT_EXCEPTION_MESSAGE, why),
    ]);
    Record { key: request.key.clone(), value: request.value.clone(), headers, timestamp_ms: request.timestamp_ms }
}

/// Writes a dead letter, then settles its request: answered once the write is
/// acknowledged or refused for good (counted and logged: nothing more can be done
/// without blocking the partition), unanswered while the broker is unreachable.
async fn send_dead_letter(
    transport: Arc<dyn Transport>,
    dlt: Arc<DeadLetters>,
    origin: Origin,
    letter: Record,
    ack: oneshot::Sender<bool>,
    counters: Arc<ServerCounters>,
) {
    let partition = origin.partition.rem_euclid(dlt.partitions.max(1));
    let answered = match transport.produce(&dlt.topic, partition, vec![letter]).await {
        Ok(_) => {
            counters.replies_dead_lettered.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic = %origin.topic, partition = origin.partition, offset = origin.offset, dead_letter_topic = %dlt.topic, "reply refused by the broker; request written to the dead-letter topic");
            true
        }
        Err(e) if matches!(e.error, TransportError::Connection { .. } | TransportError::Closed) => {
            counters.reply_failures.fetch_add(1, Ordering::Relaxed);
            false
        }
        Err(e) => {
            counters.replies_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic = %origin.topic, partition = origin.partition, offset = origin.offset, error = %e.error, "the dead-letter topic refused the request too; committing it unanswered");
            true
        }
    };
    let _ = ack.send(answered);
}

/// Longest request key echoed on an error reply sent in place of another reply; a
/// longer one is left off so the replacement is sure to be small.
const MAX_REPLACEMENT_KEY: usize = 1024;

fn small_key(key: &Option<Bytes>) -> Option<Bytes> {
    key.clone().filter(|k| k.len() <= MAX_REPLACEMENT_KEY)
}

/// Bytes a reply record takes, near enough to compare with a broker's limit (headers
/// add a few dozen bytes, covered by the margin in the default maximum).
fn reply_size(key: Option<&Bytes>, value: &[u8]) -> usize {
    key.map_or(0, |k| k.len()) + value.len()
}

/// An error as it may be sent: code and message cut to bounded lengths, so a reply
/// never echoes an unbounded amount of whatever the request or handler produced.
fn bounded(mut error: RemoteError) -> RemoteError {
    if error.message.len() > MAX_ERROR_MESSAGE || error.message.contains(char::is_control) {
        error.message = excerpt(&error.message, MAX_ERROR_MESSAGE);
    }
    if let ErrorCode::Custom(code) = &error.code {
        if code.len() > 64 || code.contains(char::is_control) {
            error.code = ErrorCode::Custom(excerpt(code, 64));
        }
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_is_bounded() {
        let e = bounded(RemoteError::new("X".repeat(500), "m".repeat(100_000)));
        assert!(e.message.len() <= MAX_ERROR_MESSAGE + 3);
        assert!(e.code.as_str().len() <= 64 + 3);
        assert_eq!(bounded(RemoteError::from("short")).message, "short");
    }
}
