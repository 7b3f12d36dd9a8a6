"""A foreign producer (librdkafka through confluent-kafka) writing hostile records to a
kafka-rpc request topic, each followed on the same partition by a well-formed request,
then reading the replies of the well-formed ones.

Usage: hostile_producer.py BOOTSTRAP REQUEST_TOPIC REPLY_TOPIC VICTIM_TOPIC PARTITIONS WAIT_S FAMILY

FAMILY is `headers` (reply-topic injection, huge and garbage headers, undecodable
payloads: records a server can read but must not trust) or `unreadable` (extreme
timestamps and oversized records: records a server may not be able to read at all).

Prints one JSON line: which well-formed requests were answered, and which hostile
records that carry a usable reply address got an error reply (and its code).
Hostile records are the scenarios of the fault tests: reply-topic injection, huge and
garbage headers, undecodable payloads, extreme timestamps and oversized records.
"""

import json
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition

boot, topic, reply_topic, victim, partitions, wait_s, family = sys.argv[1:8]
partitions, wait_s = int(partitions), float(wait_s)

TYPE = b"faults.apply"
JSON = b"application/json"
OVERSIZED = 5 * 1024 * 1024  # above the server's 4 MiB fetch_max_bytes

producer = Producer({
    "bootstrap.servers": boot,
    "message.max.bytes": 12 * 1024 * 1024,
    "linger.ms": 0,
    "enable.idempotence": False,
})

failures = []


def delivered(err, msg):
    if err is not None:
        failures.append(str(err))


def corr():
    return uuid.uuid4().bytes


def reply_to(c, topic=reply_topic, partition=0):
    return [("kafka_correlationId", c), ("kafka_replyTopic", topic.encode()),
            ("kafka_replyPartition", partition.to_bytes(4, "big", signed=True))]


def apply_value(key, seq):
    return json.dumps({"key": key, "seq": seq}).encode()


good = {}       # correlation id (hex) -> (partition, seq)
expect_error = {}  # correlation id (hex) -> hostile kind: must get an error reply


def send(**kwargs):
    # Each record travels in a batch of its own (flushed at once): a batch the server
    # cannot read whole may be skipped whole, and the well-formed requests must not
    # share a batch with a hostile record to be owed an answer.
    producer.produce(topic, on_delivery=delivered, **kwargs)
    producer.flush(30)


def send_good(p, seq):
    c = corr()
    key = f"py-{p}"
    headers = reply_to(c) + [("kafka_rpc-type", TYPE), ("kafka_rpc-content-type", JSON)]
    send(value=apply_value(key, seq), key=key, partition=p, headers=headers)
    good[c.hex()] = (p, seq)


def hostile(p):
    """(kind, kwargs for produce, expects an error reply) for every hostile record."""
    key = f"hostile-{p}"
    ok_value = apply_value(key, 0)
    typed = [("kafka_rpc-type", TYPE), ("kafka_rpc-content-type", JSON)]
    cases = []
    # Reply-topic injection: the example (unknown type, so the server would
    # write an error reply into another service's topic), a valid request naming the
    # victim with and without a partition, and a second reply-topic header naming it.
    # Their updates are keyed `inject-*`: the server must not run them.
    inject_value = apply_value(f"inject-{p}", 0)
    cases.append(("inject-unknown-type", dict(key=b"user-42", value=b"{}", headers=reply_to(corr(), victim) + [
        ("kafka_rpc-type", b"no.such.type"), ("kafka_rpc-content-type", JSON)]), False))
    cases.append(("inject-valid-request", dict(key=key, value=inject_value, headers=reply_to(corr(), victim) + typed), False))
    cases.append(("inject-no-partition", dict(key=key, value=inject_value, headers=[
        ("kafka_correlationId", corr()), ("kafka_replyTopic", victim.encode())] + typed), False))
    cases.append(("inject-second-reply-topic", dict(key=key, value=inject_value, headers=reply_to(corr()) + [
        ("kafka_replyTopic", victim.encode())] + typed), False))
    # Huge headers: a 1 MiB correlation id, a 1 MiB unknown header, 10,000 headers.
    cases.append(("huge-correlation-id", dict(key=key, value=ok_value, headers=[
        ("kafka_correlationId", b"c" * (1 << 20)), ("kafka_replyTopic", reply_topic.encode()),
        ("kafka_replyPartition", (0).to_bytes(4, "big"))] + typed), False))
    cases.append(("huge-unknown-header", dict(key=key, value=ok_value, headers=[("x-junk", b"j" * (1 << 20))] + typed), False))
    cases.append(("ten-thousand-headers", dict(key=key, value=ok_value, headers=[(f"h{i}", b"v") for i in range(10_000)] + typed), False))
    cases.append(("huge-type-name", dict(key=key, value=ok_value, headers=reply_to(corr()) + [
        ("kafka_rpc-type", b"t" * (256 * 1024)), ("kafka_rpc-content-type", JSON)]), False))
    # Garbage headers.
    for kind, name, value in [
        ("partition-not-a-number", "kafka_replyPartition", b"zz"),
        ("partition-negative", "kafka_replyPartition", (-1).to_bytes(4, "big", signed=True)),
        ("partition-does-not-exist", "kafka_replyPartition", (99_999).to_bytes(4, "big")),
        ("reply-topic-not-utf8", "kafka_replyTopic", b"\xff\xfe\xfd"),
        ("reply-topic-empty", "kafka_replyTopic", b""),
        ("reply-topic-does-not-exist", "kafka_replyTopic", b"no-such-topic-" + uuid.uuid4().hex.encode()),
        ("deadline-garbage", "kafka_rpc-deadline", b"\xff\x00\x01"),
        ("content-type-garbage", "kafka_rpc-content-type", b"text/\xff\x00"),
        ("type-not-utf8", "kafka_rpc-type", b"\xc3\x28"),
    ]:
        c = corr()
        base = {"kafka_correlationId": c, "kafka_replyTopic": reply_topic.encode(),
                "kafka_replyPartition": (0).to_bytes(4, "big"), "kafka_rpc-type": TYPE, "kafka_rpc-content-type": JSON}
        base[name] = value
        # Only an unreadable reply address leaves nowhere to answer: a garbled codec,
        # deadline or type must be answered BAD_REQUEST.
        answered = name in ("kafka_rpc-deadline", "kafka_rpc-content-type", "kafka_rpc-type")
        cases.append((kind, dict(key=key, value=ok_value, headers=list(base.items())), answered, c))
    # Undecodable payloads with a usable reply address: each must get an error reply too.
    for kind, ct, value in [
        ("json-garbage", JSON, b"\x00\xff{not json"),
        ("json-wrong-shape", JSON, b"[1,2,3]"),
        ("bincode-forged-length", b"application/x-bincode", b"\xfc\xff\xff\xff\x7f" + b"abc"),
        ("empty-value", JSON, b""),
    ]:
        c = corr()
        cases.append((kind, dict(key=key, value=value, headers=reply_to(c) + [
            ("kafka_rpc-type", TYPE), ("kafka_rpc-content-type", ct)]), True, c))
    if family == "headers":
        return cases
    cases = []
    # Extreme timestamps: far past, far future and the largest a record can carry.
    for kind, ts in [("timestamp-negative", -(2 ** 40)), ("timestamp-2^62", 2 ** 62), ("timestamp-max", 2 ** 63 - 1)]:
        cases.append((kind, dict(key=key, value=ok_value, headers=reply_to(corr()) + typed, timestamp=ts), False))
    # Oversized: larger than the server's fetch_max_bytes.
    cases.append(("oversized-value", dict(key=key, value=b"\x00" * OVERSIZED, headers=reply_to(corr()) + typed), False))
    return cases


seq = {p: 0 for p in range(partitions)}
kinds = []
for p in range(partitions):
    send_good(p, seq[p])
    seq[p] += 1
    for case in hostile(p):
        kind, kwargs, must_error = case[0], case[1], case[2]
        if p == 0:
            kinds.append(kind)
        send(partition=p, **kwargs)
        if must_error:
            expect_error[case[3].hex()] = kind
        send_good(p, seq[p])
        seq[p] += 1
left = producer.flush(60)
if left or failures:
    print(json.dumps({"produce_failed": failures, "unflushed": left}), flush=True)
    sys.exit(2)

consumer = Consumer({"bootstrap.servers": boot, "group.id": "hostile-" + uuid.uuid4().hex,
                     "enable.auto.commit": False, "fetch.message.max.bytes": 16 * 1024 * 1024})
consumer.assign([TopicPartition(reply_topic, 0, 0)])
answered, errors, unexpected = {}, {}, 0
end = time.time() + wait_s
while time.time() < end and (len(answered) < len(good) or len(errors) < len(expect_error)):
    msg = consumer.poll(0.2)
    if msg is None or msg.error():
        continue
    headers = dict(msg.headers() or [])
    c = headers.get("kafka_correlationId", b"").hex()
    code = headers.get("kafka_rpc-error-code")
    if c in good:
        answered[c] = (code or b"").decode("utf-8", "replace")
    elif c in expect_error:
        errors[c] = (code or b"").decode("utf-8", "replace")
    else:
        unexpected += 1
consumer.close()

print(json.dumps({
    "kinds": kinds,
    "good": len(good),
    "answered_ok": sum(1 for code in answered.values() if not code),
    "answered_error": {c: code for c, code in answered.items() if code},
    "missing": sorted(f"p{good[c][0]}-seq{good[c][1]}" for c in good if c not in answered),
    "error_codes": sorted(set(errors.values())),
    "error_missing": sorted(kind for c, kind in expect_error.items() if c not in errors),
    "unexpected_replies": unexpected,
}), flush=True)
