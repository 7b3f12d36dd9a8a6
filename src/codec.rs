//! Payload encodings. A [`Codec`] turns request and response values into record bytes.
//!
//! Two are built in: [`Bincode`] (the default: compact and fast) and [`Json`] (for
//! peers in other languages). Each request carries its content type in a header and
//! the server answers in the same one, so one server serves both kinds of caller.
//!
//! ```
//! use kafka_rpc::codec::{Codec, ContentType};
//! let bytes = ContentType::Json.encode(&vec![1u32, 2, 3]).unwrap();
//! assert_eq!(bytes, b"[1,2,3]");
//! let back: Vec<u32> = ContentType::Json.decode(&bytes).unwrap();
//! assert_eq!(back, [1, 2, 3]);
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The most memory a bincode decode may claim, whatever its input. Bincode length
/// prefixes are checked against a limit derived from the input (see [`Bincode`]) and
/// never above this one.
pub const MAX_DECODE_BYTES: usize = 16 * 1024 * 1024;

/// How many times its own size a bincode input may claim in memory while decoding.
/// Valid payloads stay well under it (a small varint that decodes to a `u64` claims 8×,
/// an empty `String` in a `Vec` 24×); a forged length prefix cannot buy more.
const BINCODE_EXPANSION: usize = 32;

/// Failures to encode or decode a payload.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value could not be encoded.
    #[error("encode ({content_type}): {reason}")]
    Encode {
        /// Codec content type.
        content_type: &'static str,
        /// What the codec said.
        reason: String,
    },
    /// The bytes are not a valid encoding of the expected type.
    #[error("decode ({content_type}): {reason}")]
    Decode {
        /// Codec content type.
        content_type: &'static str,
        /// What the codec said.
        reason: String,
    },
    /// The content type named by a record is not one this build knows.
    #[error("unsupported content type `{0}`")]
    Unsupported(String),
}

/// A way of turning values into bytes and back.
pub trait Codec {
    /// The MIME-style name carried in the `kafka_rpc-content-type` header.
    const CONTENT_TYPE: &'static str;
    /// Encodes `value`.
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError>;
    /// Decodes a `T` from untrusted bytes, never allocating more than the input justifies.
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError>;
}

/// Bincode 2 with its standard (varint) configuration and a decode limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bincode;

impl Codec for Bincode {
    const CONTENT_TYPE: &'static str = "application/x-bincode";

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
        let failed = |e: bincode::error::EncodeError| CodecError::Encode { content_type: Self::CONTENT_TYPE, reason: e.to_string() };
        // Sized first, then written into a vector of exactly that size: a record's value
        // is a `Bytes`, which needs a bookkeeping allocation of its own for a vector with
        // spare room. Sizing a small message costs less than that allocation and its free.
        let mut size = bincode::enc::write::SizeWriter::default();
        bincode::serde::encode_into_writer(value, &mut size, bincode::config::standard()).map_err(failed)?;
        let mut bytes = vec![0; size.bytes_written];
        let written = bincode::serde::encode_into_slice(value, &mut bytes, bincode::config::standard()).map_err(failed)?;
        bytes.truncate(written);
        Ok(bytes)
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        // Bincode reserves a string's or byte vector's claimed length before reading it,
        // so its limit is all that stands between a six-byte record and a 15 MiB
        // allocation. The limit is a type parameter: pick the smallest of a few that
        // covers BINCODE_EXPANSION times the input.
        const KIB_64: usize = 64 * 1024;
        const MIB_1: usize = 1024 * 1024;
        let wanted = bytes.len().saturating_mul(BINCODE_EXPANSION);
        let decoded = if wanted <= KIB_64 {
            bincode_decode::<T, KIB_64>(bytes)
        } else if wanted <= MIB_1 {
            bincode_decode::<T, MIB_1>(bytes)
        } else if wanted <= 4 * MIB_1 {
            bincode_decode::<T, { 4 * MIB_1 }>(bytes)
        } else {
            bincode_decode::<T, MAX_DECODE_BYTES>(bytes)
        };
        let fail = |reason: String| CodecError::Decode { content_type: Self::CONTENT_TYPE, reason };
        let (value, read) = decoded.map_err(|e| fail(e.to_string()))?;
        if read != bytes.len() {
            return Err(fail(format!("{} trailing bytes", bytes.len() - read)));
        }
        Ok(value)
    }
}

/// Decodes `T` from the front of `bytes` and says how many bytes it took. Through
/// [`Limited`](crate::nesting::Limited): bincode has no nesting limit of its own, and a
/// deeply nested record would overflow the decoding thread's stack.
fn bincode_decode<T: DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Result<(T, usize), bincode::error::DecodeError> {
    let config = bincode::config::standard().with_limit::<LIMIT>();
    bincode::serde::seed_decode_from_slice(crate::nesting::Limit::<T>::new(), bytes, config)
}

/// JSON via serde_json, for interop with Spring, NestJS and anything else.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl Codec for Json {
    const CONTENT_TYPE: &'static str = "application/json";

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
        let mut bytes = serde_json::to_vec(value).map_err(|e| CodecError::Encode {
            content_type: Self::CONTENT_TYPE,
            reason: e.to_string(),
        })?;
        // The vector grew by doubling; a record's value keeps its whole allocation, up to
        // twice what a broker's retention counts for it.
        bytes.shrink_to_fit();
        Ok(bytes)
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError::Decode {
            content_type: Self::CONTENT_TYPE,
            reason: e.to_string(),
        })
    }
}

/// The codec of one record, chosen at run time from its content-type header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ContentType {
    /// [`Bincode`].
    #[default]
    Bincode,
    /// [`Json`].
    Json,
}

impl ContentType {
    /// The header value naming this content type.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Bincode => Bincode::CONTENT_TYPE,
            ContentType::Json => Json::CONTENT_TYPE,
        }
    }

    /// Parses a content-type header value. Parameters after `;` are ignored.
    pub fn parse(value: &[u8]) -> Result<Self, CodecError> {
        // Every kafka-rpc record carries one of the two names exactly as written here;
        // comparing bytes first skips the UTF-8 check, split and trim for them, which
        // were a few hundred instructions on each request and each reply.
        for content_type in [ContentType::Bincode, ContentType::Json] {
            if value == content_type.as_str().as_bytes() {
                return Ok(content_type);
            }
        }
        let text = std::str::from_utf8(value).unwrap_or("");
        let essence = text.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case(Bincode::CONTENT_TYPE) {
            Ok(ContentType::Bincode)
        } else if essence.eq_ignore_ascii_case(Json::CONTENT_TYPE) {
            Ok(ContentType::Json)
        } else {
            // A header can be as large as a record: keep only a short, printable excerpt.
            Err(CodecError::Unsupported(crate::error::excerpt(value, crate::error::MAX_ECHO)))
        }
    }

    /// Encodes `value` with this codec.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        match self {
            ContentType::Bincode => Bincode::encode(value),
            ContentType::Json => Json::encode(value),
        }
    }

    /// Decodes a `T` with this codec.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        match self {
            ContentType::Bincode => Bincode::decode(bytes),
            ContentType::Json => Json::decode(bytes),
        }
    }

    /// Decodes a record's value (`None`: the record has none) as any peer of this codec
    /// writes it. JSON is read as NestJS's parser reads it: no value is `null` (a handler
    /// that returned nothing), and a value that is not JSON is a string (NestJS writes
    /// strings unquoted). Valid JSON of another type stays an error.
    pub(crate) fn decode_value<T: DeserializeOwned>(self, value: Option<&[u8]>) -> Result<T, CodecError> {
        match (self, value) {
            (ContentType::Json, None) => self.decode(b"null"),
            (ContentType::Json, Some(value)) => self.decode(value).or_else(|e| match std::str::from_utf8(value) {
                Ok(text) if serde_json::from_slice::<serde::de::IgnoredAny>(value).is_err() => {
                    serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(|_| e)
                }
                _ => Err(e),
            }),
            (ContentType::Bincode, value) => self.decode(value.unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Sample {
        id: u64,
        name: String,
        tags: Vec<String>,
    }

    #[test]
    fn the_input_derived_limit_still_decodes_valid_payloads_of_every_size() {
        // Small varints expand 8x into u64s; empty strings 24x into Strings: both under
        // the expansion the limit allows, at each of its sizes.
        for n in [10usize, 5_000, 100_000] {
            let numbers: Vec<u64> = (0..n as u64).map(|i| i % 100).collect();
            assert_eq!(Bincode::decode::<Vec<u64>>(&Bincode::encode(&numbers).unwrap()).unwrap(), numbers);
            let empties = vec![String::new(); n];
            assert_eq!(Bincode::decode::<Vec<String>>(&Bincode::encode(&empties).unwrap()).unwrap(), empties);
        }
        let big = vec![7u8; 3 * 1024 * 1024];
        assert_eq!(Bincode::decode::<Vec<u8>>(&Bincode::encode(&big).unwrap()).unwrap(), big);
    }

    #[test]
    fn encodings_hold_no_spare_room() {
        let large: Vec<u64> = (0..10_000).collect();
        for content_type in [ContentType::Bincode, ContentType::Json] {
            let bytes = content_type.encode(&large).unwrap();
            assert_eq!(bytes.capacity(), bytes.len(), "{content_type:?}");
        }
    }

    #[test]
    fn both_codecs_round_trip() {
        let value = Sample { id: 7, name: "store".into(), tags: vec!["a".into(), "b".into()] };
        for ct in [ContentType::Bincode, ContentType::Json] {
            let bytes = ct.encode(&value).unwrap();
            assert_eq!(ct.decode::<Sample>(&bytes).unwrap(), value, "{ct:?}");
        }
    }

    #[test]
    fn forged_length_prefix_is_rejected_without_allocating() {
        // Varint 0xFD = u64 follows; claim u64::MAX elements for a Vec<u64>.
        let mut forged = vec![0xFDu8];
        forged.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = Bincode::decode::<Vec<u64>>(&forged).unwrap_err();
        assert!(matches!(err, CodecError::Decode { .. }), "{err}");

        // A string that claims 1 GiB of bytes but carries three.
        let mut forged = vec![0xFCu8];
        forged.extend_from_slice(&(1u32 << 30).to_le_bytes());
        forged.extend_from_slice(b"abc");
        assert!(Bincode::decode::<String>(&forged).is_err());
    }

    /// The example in docs/wire-format.md.
    #[test]
    fn bincode_bytes_match_the_wire_format_doc() {
        #[derive(serde::Serialize)]
        #[allow(dead_code)]
        enum Trigger {
            RiderShortage,
            BadWeather,
        }
        #[derive(serde::Serialize)]
        struct Reduce {
            store_id: u64,
            trigger: Trigger,
            radius_m: u32,
            seq: u64,
        }
        let bytes = Bincode::encode(&Reduce { store_id: 42, trigger: Trigger::BadWeather, radius_m: 1800, seq: 7 }).unwrap();
        assert_eq!(bytes, [0x2a, 0x01, 0xfb, 0x08, 0x07, 0x07]);
    }

    /// A recursive request type (an expression tree, a linked list) and a crafted
    /// bincode payload: 4 bytes per level, 200,000 levels in an 800 KB record, under
    /// the 1 MiB record limit. Run on a thread with tokio's default 2 MiB worker stack.
    #[test]
    fn deeply_nested_bincode_is_a_typed_error_not_a_stack_overflow() {
        #[derive(serde::Serialize, serde::Deserialize, Debug)]
        #[allow(dead_code)]
        enum Shape {
            Unit,
            Pair(u32, String),
            Bytes(Vec<u8>),
            Nested { items: Vec<Vec<u64>>, map: std::collections::BTreeMap<String, Vec<u8>>, next: Option<Box<Shape>> },
        }
        // Nested (variant 3), items: [], map: {}, next: Some(...) — repeated; then Unit.
        let mut payload = [3u8, 0, 0, 1].repeat(200_000);
        payload.push(0);
        let outcome = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || match Bincode::decode::<Shape>(&payload) {
                Ok(shape) => {
                    std::mem::forget(shape); // dropping it would recurse too
                    "decoded"
                }
                Err(_) => "error",
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(outcome, "error", "a 200,000-deep payload must be refused, as serde_json refuses depth > 128");
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = Bincode::encode(&5u32).unwrap();
        bytes.push(0);
        assert!(Bincode::decode::<u32>(&bytes).is_err());
    }

    #[test]
    fn content_type_parsing_is_tolerant_of_parameters() {
        assert_eq!(ContentType::parse(b"application/json; charset=utf-8").unwrap(), ContentType::Json);
        assert_eq!(ContentType::parse(b"Application/X-Bincode").unwrap(), ContentType::Bincode);
        assert!(matches!(ContentType::parse(b"text/xml"), Err(CodecError::Unsupported(_))));
    }
}
