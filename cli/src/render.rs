//! One record as text, with the request-reply headers of kafka-rpc, Spring Kafka and
//! NestJS decoded for a human.
//!
//! This is a display, not the protocol: it shows malformed values instead of rejecting
//! them, and every header, known or not, because a reply that goes missing is usually
//! explained by a header that is there and wrong.

use std::fmt::Write as _;

use kafka_rpc::transport::ConsumedRecord;
use kafka_rpc::wire::names;

/// Most characters of a value or header shown; the rest is cut and marked.
const MAX_SHOWN: usize = 1024;

/// A record timestamp of -1 is Kafka's `NO_TIMESTAMP`: none was written.
const NO_TIMESTAMP: i64 = -1;

/// `record` of `topic` as a block of lines: a summary line, then one line per key,
/// header and value. `now_ms` dates deadlines (passed, or how long is left).
pub fn record(topic: &str, consumed: &ConsumedRecord, now_ms: i64) -> String {
    let r = &consumed.record;
    let mut out = format!(
        "{topic}/{}@{} {} {} {}\n",
        consumed.partition,
        consumed.offset,
        record_timestamp(r.timestamp_ms),
        kind(consumed),
        peer(consumed)
    );
    let _ = writeln!(out, "  key: {}", r.key.as_deref().map_or_else(|| "(none)".to_owned(), text_or_hex));
    for h in &r.headers {
        let _ = writeln!(out, "  {}: {}", escape(&h.key), header(&h.key, &h.value, r.timestamp_ms, now_ms));
    }
    let value = match r.value.as_deref() {
        None => "(null)".to_owned(),
        Some(v) => format!("({} bytes) {}", v.len(), text_or_hex(v)),
    };
    let _ = writeln!(out, "  value: {value}");
    out
}

fn has(consumed: &ConsumedRecord, name: &str) -> bool {
    consumed.record.header(name).is_some()
}

/// Request, reply, error reply, or a record outside request-reply (an event).
fn kind(consumed: &ConsumedRecord) -> &'static str {
    if has(consumed, names::REPLY_TOPIC) {
        "request"
    } else if has(consumed, names::ERROR_CODE) || has(consumed, names::NEST_ERROR) {
        "error-reply"
    } else if has(consumed, names::CORRELATION_ID) {
        "reply"
    } else {
        "event"
    }
}

/// Whose conventions the headers look like (see docs/interop.md): `kafka_rpc-*`
/// headers are ours, NestJS marks its records or sends a 36-character id, Spring a
/// 16-byte id or a type hint.
fn peer(consumed: &ConsumedRecord) -> &'static str {
    let id_len = consumed.record.header(names::CORRELATION_ID).map(|id| id.len());
    if has(consumed, names::TYPE) || has(consumed, names::ERROR_CODE) || has(consumed, names::CONTENT_TYPE) {
        "kafka-rpc"
    } else if has(consumed, names::NEST_IS_DISPOSED) || has(consumed, names::NEST_ERROR) || id_len == Some(36) {
        "nestjs"
    } else if has(consumed, names::SPRING_TYPE_ID) || id_len == Some(16) {
        "spring"
    } else {
        "unknown-peer"
    }
}

fn header(name: &str, value: &[u8], record_ms: i64, now_ms: i64) -> String {
    match name {
        names::CORRELATION_ID => match <[u8; 16]>::try_from(value) {
            Ok(bytes) => format!("{} (16 bytes)", uuid::Uuid::from_bytes(bytes).hyphenated()),
            Err(_) => format!("{} ({} bytes)", text_or_hex(value), value.len()),
        },
        names::REPLY_PARTITION => match int(value) {
            Some(p) => p.to_string(),
            None => format!("{} (not a partition number)", text_or_hex(value)),
        },
        names::DEADLINE => match int(value) {
            Some(deadline) => {
                // Any 8 bytes are a deadline here, and any i64 a record timestamp:
                // the differences saturate rather than overflow.
                let left = if deadline <= now_ms {
                    format!("passed {}", seconds(now_ms.saturating_sub(deadline)))
                } else {
                    format!("{} left", seconds(deadline.saturating_sub(now_ms)))
                };
                let after = if record_ms == NO_TIMESTAMP {
                    "the record has no timestamp".to_owned()
                } else {
                    format!("{} after the record's timestamp", seconds(deadline.saturating_sub(record_ms)))
                };
                format!("{} ({after}; {left})", timestamp(deadline))
            }
            None => format!("{} (not a deadline)", text_or_hex(value)),
        },
        names::NEST_IS_DISPOSED => format!("{} (end of the NestJS reply stream)", hex(value)),
        _ => text_or_hex(value),
    }
}

/// A number written as big-endian binary (4 or 8 bytes) or ASCII decimal, the two ways
/// peers write partitions and deadlines.
fn int(value: &[u8]) -> Option<i64> {
    if value.iter().all(u8::is_ascii_digit) && !value.is_empty() {
        return std::str::from_utf8(value).ok()?.parse().ok();
    }
    match value.len() {
        4 => Some(i32::from_be_bytes(value.try_into().ok()?) as i64),
        8 => Some(i64::from_be_bytes(value.try_into().ok()?)),
        _ => None,
    }
}

fn seconds(ms: i64) -> String {
    format!("{:.3} s", ms as f64 / 1000.0)
}

/// A record's timestamp: -1 is no timestamp, not a millisecond before 1970.
fn record_timestamp(ms: i64) -> String {
    if ms == NO_TIMESTAMP {
        return "(no timestamp)".to_owned();
    }
    timestamp(ms)
}

fn timestamp(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or_else(|| format!("{ms} ms"), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// UTF-8 text as text (control and invisible characters escaped, so one header stays
/// one line and shows what it holds), anything else as hex. A backslash is escaped too,
/// as `str::escape_debug` escapes it, so text that spells an escape (`\u{202e}`) never
/// reads as the character it names.
fn text_or_hex(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) => escape(text),
        Err(_) => hex(value),
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_SHOWN));
    for c in text.chars() {
        if out.len() >= MAX_SHOWN {
            out.push('…');
            break;
        }
        if c == '\\' {
            out.push_str("\\\\");
        } else if c.is_control() {
            out.extend(c.escape_default());
        } else if invisible(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Characters a terminal shows as nothing, or that change how what follows is shown:
/// bidirectional marks, embeddings, overrides and isolates (a right-to-left override
/// makes `txt.exe\u{202e}fdp` read as `txt.exepdf`), zero-width characters, the byte
/// order mark, line and paragraph separators, fillers, tags. (Not the variation
/// selectors, which emoji need and which reorder nothing.) Escaped like control characters, so a
/// hostile record cannot disguise what an operator reads (Trojan Source, CVE-2021-42574).
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{061c}'
            | '\u{115f}'..='\u{1160}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{3164}'
            | '\u{feff}'
            | '\u{ffa0}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{e0000}'..='\u{e007f}'
    )
}

fn hex(value: &[u8]) -> String {
    let shown = &value[..value.len().min(MAX_SHOWN / 2)];
    let mut out = String::from("0x");
    for b in shown {
        let _ = write!(out, "{b:02x}");
    }
    if shown.len() < value.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_rpc::transport::{Header, Record};
    use std::sync::Arc;

    fn consumed(headers: &[(&'static str, &[u8])]) -> ConsumedRecord {
        let headers = headers.iter().map(|(k, v)| Header { key: (*k).into(), value: v.to_vec().into() }).collect();
        ConsumedRecord {
            partition: 2,
            offset: 9,
            record: Arc::new(Record { key: None, value: Some(b"{\"a\":1}".to_vec().into()), headers, timestamp_ms: 1_000 }),
        }
    }

    #[test]
    fn native_request_headers_are_decoded() {
        let text = record(
            "t",
            &consumed(&[
                (names::CORRELATION_ID, &[0x11; 16]),
                (names::REPLY_TOPIC, b"t.replies"),
                (names::REPLY_PARTITION, &3i32.to_be_bytes()),
                (names::TYPE, b"math.add"),
                (names::DEADLINE, &6_000i64.to_be_bytes()),
            ]),
            2_000,
        );
        assert!(text.starts_with("t/2@9 1970-01-01T00:00:01.000Z request kafka-rpc\n"), "{text}");
        assert!(text.contains("kafka_correlationId: 11111111-1111-1111-1111-111111111111 (16 bytes)"), "{text}");
        assert!(text.contains("kafka_replyPartition: 3\n"), "{text}");
        assert!(
            text.contains("kafka_rpc-deadline: 1970-01-01T00:00:06.000Z (5.000 s after the record's timestamp; 4.000 s left)"),
            "{text}"
        );
        assert!(text.contains("value: (7 bytes) {\"a\":1}"), "{text}");
    }

    #[test]
    fn nest_replies_and_odd_values_stay_readable() {
        let text = record(
            "t",
            &consumed(&[
                (names::CORRELATION_ID, b"6a1b6c7e-0f6e-4f4e-9b7e-000000000001"),
                (names::NEST_ERROR, b"{\"message\":\"boom\"}"),
                (names::NEST_IS_DISPOSED, &[0]),
                ("x-binary", &[0xff, 0x00, b'\n']),
                ("x-text", b"two\nlines"),
            ]),
            0,
        );
        assert!(text.contains("error-reply nestjs"), "{text}");
        assert!(text.contains("x-binary: 0xff000a"), "{text}");
        assert!(text.contains("x-text: two\\nlines"), "{text}");
        assert_eq!(int(b"12"), Some(12), "NestJS writes partitions in ASCII");
        assert_eq!(int(b"zz"), None);
    }

    /// Kafka's `NO_TIMESTAMP`: a record written without one (an old producer, a
    /// message format before v1) carries -1, which is not an instant in 1969.
    #[test]
    fn a_record_without_a_timestamp_says_so() {
        let mut c = consumed(&[(names::DEADLINE, &6_000i64.to_be_bytes())]);
        c.record = Arc::new(Record { timestamp_ms: -1, ..(*c.record).clone() });
        let text = record("t", &c, 2_000);
        assert!(text.starts_with("t/2@9 (no timestamp) event unknown-peer\n"), "{text}");
        assert!(!text.contains("1969"), "{text}");
        assert!(
            text.contains("kafka_rpc-deadline: 1970-01-01T00:00:06.000Z (the record has no timestamp; 4.000 s left)"),
            "{text}"
        );
    }

    /// A hostile record must not disguise what an operator reads: bidirectional
    /// overrides and isolates (which reorder what follows them on a terminal), and the
    /// other invisible formatting characters, are shown escaped as `cat -v` shows
    /// control characters; in the key, header names and values alike.
    #[test]
    fn bidi_overrides_and_invisible_characters_are_escaped() {
        let mut c = consumed(&[("x-\u{202e}name", "txt.exe\u{202e}fdp".as_bytes()), ("x-isolate", "a\u{2067}b\u{2069}\u{200b}c\u{feff}".as_bytes())]);
        c.record = Arc::new(Record { key: Some("user\u{202d}1\u{200f}".as_bytes().to_vec().into()), ..(*c.record).clone() });
        let text = record("t", &c, 0);
        assert!(text.contains("x-\\u{202e}name: txt.exe\\u{202e}fdp\n"), "{text}");
        assert!(text.contains("x-isolate: a\\u{2067}b\\u{2069}\\u{200b}c\\u{feff}\n"), "{text}");
        assert!(text.contains("key: user\\u{202d}1\\u{200f}\n"), "{text}");
        let hidden = ['\u{202d}', '\u{202e}', '\u{2067}', '\u{2069}', '\u{200b}', '\u{200f}', '\u{feff}'];
        assert!(!text.contains(hidden), "{text:?}");
        // Printable text outside ASCII stays as it is.
        assert!(escape("grüße, 日本, مرحبا").eq("grüße, 日本, مرحبا"));
    }

    /// Text that spells an escape (a backslash, then `u{202e}` or `n`) must not print as
    /// the character it names, or an operator cannot tell a hostile override from its
    /// description: the backslash is escaped too, as `str::escape_debug` escapes it.
    #[test]
    fn text_spelling_an_escape_prints_apart_from_the_character() {
        let shown = |value: &[u8]| record("t", &consumed(&[("x", value)]), 0);
        let (hidden, spelled) = (shown("a\u{202e}b".as_bytes()), shown(br"a\u{202e}b"));
        assert_ne!(hidden, spelled);
        assert!(hidden.contains("x: a\\u{202e}b\n"), "{hidden}");
        assert!(spelled.contains(r"x: a\\u{202e}b"), "{spelled}");
        assert_ne!(shown(b"two\nlines"), shown(br"two\nlines"));
        assert_eq!(escape(r"C:\dir"), r"C:\\dir");
    }

    #[test]
    fn extreme_deadlines_and_timestamps_do_not_overflow() {
        // Any 8 bytes are a deadline to the display; the record's timestamp is the
        // producer's. Neither may overflow the differences shown.
        for (deadline, record_ms, now) in [(i64::MIN, 1_000, 2_000), (i64::MAX, -1_000, 0), (0, i64::MIN, i64::MAX)] {
            let mut c = consumed(&[(names::DEADLINE, &deadline.to_be_bytes())]);
            c.record = Arc::new(Record { timestamp_ms: record_ms, ..(*c.record).clone() });
            let text = record("t", &c, now);
            assert!(text.contains("kafka_rpc-deadline: "), "{text}");
        }
    }
}
