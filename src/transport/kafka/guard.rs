//! Checks a broker response against the shape of its message before kafka-protocol
//! decodes it.
//!
//! kafka-protocol 0.18 reserves `Vec::with_capacity(n)` for an array as soon as it
//! has read the count `n` from the wire (`protocol/types.rs`, `Array` and
//! `CompactArray`), so four bytes claiming two billion topics ask for gigabytes
//! before the first element is read. Strings and byte fields are safe there: they
//! are split off the buffer only when that many bytes are present.
//!
//! The check walks the response by a description of each message's fields per
//! version (transcribed from kafka-protocol's generated decoders, and tested against
//! them below) without allocating, and accepts it only if every array's elements
//! are really there. An array that passes holds at most one element per byte, so
//! what kafka-protocol then reserves is bounded by the response size (itself capped
//! by the connection) times the size of one decoded element, as for an honest
//! response of that length.
//!
//! A response kind or version without a description is refused: decoding it
//! unchecked is what this module exists to prevent, and a new call fails its first
//! test rather than going out unguarded.

use kafka_protocol::messages::ApiKey;

/// One field's wire type.
#[derive(Debug, Clone, Copy)]
enum Ty {
    /// A fixed-width field (integers, booleans, UUIDs) of this many bytes.
    Fixed(usize),
    /// A string: `i16` length, or unsigned varint length + 1 in flexible versions.
    Str,
    /// Bytes: `i32` length, or unsigned varint length + 1 in flexible versions.
    Bytes,
    /// A nested structure.
    Struct(&'static Shape),
    /// An array: `i32` count, or unsigned varint count + 1 in flexible versions.
    Array(&'static Ty),
}

const I8: Ty = Ty::Fixed(1);
const BOOL: Ty = Ty::Fixed(1);
const I16: Ty = Ty::Fixed(2);
const I32: Ty = Ty::Fixed(4);
const I64: Ty = Ty::Fixed(8);
const UUID: Ty = Ty::Fixed(16);

/// A field present in versions `from..=to`.
#[derive(Debug, Clone, Copy)]
struct Field {
    ty: Ty,
    from: i16,
    to: i16,
}

/// A tagged field kafka-protocol decodes (rather than keeping as raw bytes), in
/// versions `from..=to`.
#[derive(Debug, Clone, Copy)]
struct Tagged {
    tag: u32,
    ty: Ty,
    from: i16,
    to: i16,
}

/// A structure: its fields in wire order, then (in flexible versions) its tagged
/// fields.
#[derive(Debug)]
struct Shape {
    fields: &'static [Field],
    tagged: &'static [Tagged],
}

/// A response message: its top-level shape, the versions kafka-protocol decodes and
/// the first flexible version (compact lengths, tagged fields).
struct Message {
    shape: &'static Shape,
    versions: (i16, i16),
    flexible: i16,
}

const ANY: i16 = i16::MAX;
const NEVER: i16 = i16::MAX;

const fn all(ty: Ty) -> Field {
    Field { ty, from: 0, to: ANY }
}
const fn since(from: i16, ty: Ty) -> Field {
    Field { ty, from, to: ANY }
}
const fn until(to: i16, ty: Ty) -> Field {
    Field { ty, from: 0, to }
}
const fn between(from: i16, to: i16, ty: Ty) -> Field {
    Field { ty, from, to }
}
const fn tag(tag: u32, from: i16, ty: Ty) -> Tagged {
    Tagged { tag, ty, from, to: ANY }
}
const fn shape(fields: &'static [Field]) -> Shape {
    Shape { fields, tagged: &[] }
}

mod shapes {
    use super::*;

    // ApiVersions (flexible from v3).
    pub(super) static API_VERSION: Shape = shape(&[all(I16), all(I16), all(I16)]);
    pub(super) static FEATURE: Shape = shape(&[since(3, Ty::Str), since(3, I16), since(3, I16)]);
    pub(super) static API_VERSIONS: Shape = Shape {
        fields: &[all(I16), all(Ty::Array(&Ty::Struct(&API_VERSION))), since(1, I32)],
        tagged: &[
            tag(0, 3, Ty::Array(&Ty::Struct(&FEATURE))),
            tag(1, 3, I64),
            tag(2, 3, Ty::Array(&Ty::Struct(&FEATURE))),
            tag(3, 3, BOOL),
        ],
    };

    // SASL (handshake never flexible, authenticate from v2).
    pub(super) static SASL_HANDSHAKE: Shape = shape(&[all(I16), all(Ty::Array(&Ty::Str))]);
    pub(super) static SASL_AUTHENTICATE: Shape = shape(&[all(I16), all(Ty::Str), all(Ty::Bytes), since(1, I64)]);

    // FindCoordinator (flexible from v3; a coordinator array from v4).
    pub(super) static COORDINATOR: Shape =
        shape(&[since(4, Ty::Str), since(4, I32), since(4, Ty::Str), since(4, I32), since(4, I16), since(4, Ty::Str)]);
    pub(super) static FIND_COORDINATOR: Shape = shape(&[
        since(1, I32),
        until(3, I16),
        between(1, 3, Ty::Str),
        until(3, I32),
        until(3, Ty::Str),
        until(3, I32),
        since(4, Ty::Array(&Ty::Struct(&COORDINATOR))),
    ]);

    // Group membership.
    pub(super) static JOIN_MEMBER: Shape = shape(&[all(Ty::Str), since(5, Ty::Str), all(Ty::Bytes)]);
    pub(super) static JOIN_GROUP: Shape = shape(&[
        since(2, I32),
        all(I16),
        all(I32),
        since(7, Ty::Str),
        all(Ty::Str),
        all(Ty::Str),
        since(9, BOOL),
        all(Ty::Str),
        all(Ty::Array(&Ty::Struct(&JOIN_MEMBER))),
    ]);
    pub(super) static SYNC_GROUP: Shape =
        shape(&[since(1, I32), all(I16), since(5, Ty::Str), since(5, Ty::Str), all(Ty::Bytes)]);
    pub(super) static HEARTBEAT: Shape = shape(&[since(1, I32), all(I16)]);
    pub(super) static LEAVE_MEMBER: Shape = shape(&[since(3, Ty::Str), since(3, Ty::Str), since(3, I16)]);
    pub(super) static LEAVE_GROUP: Shape =
        shape(&[since(1, I32), all(I16), since(3, Ty::Array(&Ty::Struct(&LEAVE_MEMBER)))]);

    // Offsets.
    pub(super) static COMMIT_PARTITION: Shape = shape(&[all(I32), all(I16)]);
    pub(super) static COMMIT_TOPIC: Shape =
        shape(&[until(9, Ty::Str), since(10, UUID), all(Ty::Array(&Ty::Struct(&COMMIT_PARTITION)))]);
    pub(super) static OFFSET_COMMIT: Shape = shape(&[since(3, I32), all(Ty::Array(&Ty::Struct(&COMMIT_TOPIC)))]);

    pub(super) static FETCHED_OFFSET: Shape =
        shape(&[until(7, I32), until(7, I64), between(5, 7, I32), until(7, Ty::Str), until(7, I16)]);
    pub(super) static FETCHED_TOPIC: Shape =
        shape(&[until(7, Ty::Str), until(7, Ty::Array(&Ty::Struct(&FETCHED_OFFSET)))]);
    pub(super) static GROUP_OFFSET: Shape =
        shape(&[since(8, I32), since(8, I64), since(8, I32), since(8, Ty::Str), since(8, I16)]);
    pub(super) static GROUP_TOPIC: Shape =
        shape(&[between(8, 9, Ty::Str), since(10, UUID), since(8, Ty::Array(&Ty::Struct(&GROUP_OFFSET)))]);
    pub(super) static FETCHED_GROUP: Shape =
        shape(&[since(8, Ty::Str), since(8, Ty::Array(&Ty::Struct(&GROUP_TOPIC))), since(8, I16)]);
    pub(super) static OFFSET_FETCH: Shape = shape(&[
        since(3, I32),
        until(7, Ty::Array(&Ty::Struct(&FETCHED_TOPIC))),
        between(2, 7, I16),
        since(8, Ty::Array(&Ty::Struct(&FETCHED_GROUP))),
    ]);

    // Metadata (flexible from v9).
    pub(super) static BROKER: Shape = shape(&[all(I32), all(Ty::Str), all(I32), since(1, Ty::Str)]);
    pub(super) static PARTITION: Shape = shape(&[
        all(I16),
        all(I32),
        all(I32),
        since(7, I32),
        all(Ty::Array(&I32)),
        all(Ty::Array(&I32)),
        since(5, Ty::Array(&I32)),
    ]);
    pub(super) static TOPIC: Shape = shape(&[
        all(I16),
        all(Ty::Str),
        since(10, UUID),
        since(1, BOOL),
        all(Ty::Array(&Ty::Struct(&PARTITION))),
        since(8, I32),
    ]);
    pub(super) static METADATA: Shape = shape(&[
        since(3, I32),
        all(Ty::Array(&Ty::Struct(&BROKER))),
        since(2, Ty::Str),
        since(1, I32),
        all(Ty::Array(&Ty::Struct(&TOPIC))),
        between(8, 10, I32),
        since(13, I16),
    ]);

    // Produce (flexible from v9).
    pub(super) static BATCH_ERROR: Shape = shape(&[since(8, I32), since(8, Ty::Str)]);
    pub(super) static PRODUCE_LEADER: Shape = shape(&[since(10, I32), since(10, I32)]);
    pub(super) static PRODUCE_ENDPOINT: Shape =
        shape(&[since(10, I32), since(10, Ty::Str), since(10, I32), since(10, Ty::Str)]);
    pub(super) static PRODUCED_PARTITION: Shape = Shape {
        fields: &[
            all(I32),
            all(I16),
            all(I64),
            all(I64),
            since(5, I64),
            since(8, Ty::Array(&Ty::Struct(&BATCH_ERROR))),
            since(8, Ty::Str),
        ],
        tagged: &[tag(0, 10, Ty::Struct(&PRODUCE_LEADER))],
    };
    pub(super) static PRODUCED_TOPIC: Shape =
        shape(&[until(12, Ty::Str), since(13, UUID), all(Ty::Array(&Ty::Struct(&PRODUCED_PARTITION)))]);
    pub(super) static PRODUCE: Shape = Shape {
        fields: &[all(Ty::Array(&Ty::Struct(&PRODUCED_TOPIC))), all(I32)],
        tagged: &[tag(0, 10, Ty::Array(&Ty::Struct(&PRODUCE_ENDPOINT)))],
    };

    // Fetch (flexible from v12).
    pub(super) static ABORTED: Shape = shape(&[all(I64), all(I64)]);
    pub(super) static EPOCH_END: Shape = shape(&[since(12, I32), since(12, I64)]);
    pub(super) static FETCH_LEADER: Shape = shape(&[since(12, I32), since(12, I32)]);
    pub(super) static SNAPSHOT: Shape = shape(&[all(I64), all(I32)]);
    pub(super) static FETCH_ENDPOINT: Shape =
        shape(&[since(16, I32), since(16, Ty::Str), since(16, I32), since(16, Ty::Str)]);
    pub(super) static FETCHED_PARTITION: Shape = Shape {
        fields: &[
            all(I32),
            all(I16),
            all(I64),
            all(I64),
            since(5, I64),
            all(Ty::Array(&Ty::Struct(&ABORTED))),
            since(11, I32),
            all(Ty::Bytes),
        ],
        tagged: &[
            tag(0, 12, Ty::Struct(&EPOCH_END)),
            tag(1, 12, Ty::Struct(&FETCH_LEADER)),
            tag(2, 12, Ty::Struct(&SNAPSHOT)),
        ],
    };
    pub(super) static FETCHED_TOPIC_DATA: Shape =
        shape(&[until(12, Ty::Str), since(13, UUID), all(Ty::Array(&Ty::Struct(&FETCHED_PARTITION)))]);
    pub(super) static FETCH: Shape = Shape {
        fields: &[all(I32), since(7, I16), since(7, I32), all(Ty::Array(&Ty::Struct(&FETCHED_TOPIC_DATA)))],
        tagged: &[tag(0, 16, Ty::Array(&Ty::Struct(&FETCH_ENDPOINT)))],
    };

    // ListOffsets (flexible from v6).
    pub(super) static LISTED_PARTITION: Shape = shape(&[all(I32), all(I16), all(I64), all(I64), since(4, I32)]);
    pub(super) static LISTED_TOPIC: Shape = shape(&[all(Ty::Str), all(Ty::Array(&Ty::Struct(&LISTED_PARTITION)))]);
    pub(super) static LIST_OFFSETS: Shape = shape(&[since(2, I32), all(Ty::Array(&Ty::Struct(&LISTED_TOPIC)))]);

    // CreateTopics (flexible from v5).
    pub(super) static TOPIC_CONFIG: Shape =
        shape(&[since(5, Ty::Str), since(5, Ty::Str), since(5, BOOL), since(5, I8), since(5, BOOL)]);
    pub(super) static CREATED_TOPIC: Shape = Shape {
        fields: &[
            all(Ty::Str),
            since(7, UUID),
            all(I16),
            all(Ty::Str),
            since(5, I32),
            since(5, I16),
            since(5, Ty::Array(&Ty::Struct(&TOPIC_CONFIG))),
        ],
        tagged: &[tag(0, 5, I16)],
    };
    pub(super) static CREATE_TOPICS: Shape = shape(&[all(I32), all(Ty::Array(&Ty::Struct(&CREATED_TOPIC)))]);

    // InitProducerId (flexible from v2).
    pub(super) static INIT_PRODUCER_ID: Shape =
        shape(&[all(I32), all(I16), all(I64), all(I16), since(6, I64), since(6, I16)]);
}

/// The description of the response to `key`, if this client decodes it.
fn message(key: ApiKey) -> Option<Message> {
    use shapes::*;
    let m = |shape, from, to, flexible| Some(Message { shape, versions: (from, to), flexible });
    match key {
        ApiKey::ApiVersions => m(&API_VERSIONS, 0, 4, 3),
        ApiKey::SaslHandshake => m(&SASL_HANDSHAKE, 0, 1, NEVER),
        ApiKey::SaslAuthenticate => m(&SASL_AUTHENTICATE, 0, 2, 2),
        ApiKey::FindCoordinator => m(&FIND_COORDINATOR, 0, 6, 3),
        ApiKey::JoinGroup => m(&JOIN_GROUP, 0, 9, 6),
        ApiKey::SyncGroup => m(&SYNC_GROUP, 0, 5, 4),
        ApiKey::Heartbeat => m(&HEARTBEAT, 0, 4, 4),
        ApiKey::LeaveGroup => m(&LEAVE_GROUP, 0, 5, 4),
        ApiKey::OffsetCommit => m(&OFFSET_COMMIT, 2, 10, 8),
        ApiKey::OffsetFetch => m(&OFFSET_FETCH, 1, 10, 6),
        ApiKey::Metadata => m(&METADATA, 0, 13, 9),
        ApiKey::Produce => m(&PRODUCE, 3, 13, 9),
        ApiKey::Fetch => m(&FETCH, 4, 18, 12),
        ApiKey::InitProducerId => m(&INIT_PRODUCER_ID, 0, 6, 2),
        ApiKey::ListOffsets => m(&LIST_OFFSETS, 1, 10, 6),
        ApiKey::CreateTopics => m(&CREATE_TOPICS, 2, 7, 5),
        _ => None,
    }
}

/// Why a response was refused.
pub(crate) type Refusal = String;

/// Accepts `body` (a response after its header) only if it has the shape of the
/// response to API `key` at `version` with every array's elements present.
/// Allocates nothing.
pub(crate) fn check(key: i16, version: i16, body: &[u8]) -> Result<(), Refusal> {
    let api = ApiKey::try_from(key).map_err(|_| format!("unknown API key {key}"))?;
    let msg = message(api).ok_or_else(|| format!("no bounded decoder for {api:?} responses"))?;
    if version < msg.versions.0 || version > msg.versions.1 {
        return Err(format!("no bounded decoder for {api:?} v{version}"));
    }
    let mut walk = Walk { data: body, version, flexible: version >= msg.flexible };
    walk.shape(msg.shape).map_err(|e| format!("{api:?} v{version} response: {e}"))
}

struct Walk<'a> {
    data: &'a [u8],
    version: i16,
    flexible: bool,
}

impl Walk<'_> {
    fn shape(&mut self, shape: &Shape) -> Result<(), Refusal> {
        for f in shape.fields {
            if (f.from..=f.to).contains(&self.version) {
                self.ty(f.ty)?;
            }
        }
        if self.flexible {
            self.tags(shape.tagged)?;
        }
        Ok(())
    }

    fn ty(&mut self, ty: Ty) -> Result<(), Refusal> {
        match ty {
            Ty::Fixed(n) => self.skip(n),
            Ty::Str => {
                let n = self.length(false)?;
                self.skip(n)
            }
            Ty::Bytes => {
                let n = self.length(true)?;
                self.skip(n)
            }
            Ty::Struct(shape) => self.shape(shape),
            Ty::Array(element) => {
                let n = self.length(true)?;
                // Every element takes at least a byte: a count the rest cannot hold
                // is refused before walking it.
                if n > self.data.len() {
                    return Err(format!("{n} array elements in {} bytes", self.data.len()));
                }
                for _ in 0..n {
                    let before = self.data.len();
                    self.ty(*element)?;
                    if self.data.len() == before {
                        return Err("an array element of no bytes".into());
                    }
                }
                Ok(())
            }
        }
    }

    /// The tagged-field section: tags kafka-protocol decodes are walked by their
    /// shape, which must fill exactly the size the tag declares (the decoder reads
    /// them from the response itself, not from a slice of that size); others are
    /// kept as bytes by the decoder, which checks their size.
    fn tags(&mut self, known: &[Tagged]) -> Result<(), Refusal> {
        let count = self.uvarint()?;
        for _ in 0..count {
            let tag = self.uvarint()?;
            let size = usize::try_from(self.uvarint()?).map_err(|_| "tag size overflows".to_string())?;
            if size > self.data.len() {
                return Err(format!("tagged field of {size} bytes in {}", self.data.len()));
            }
            let (value, rest) = self.data.split_at(size);
            if let Some(t) = known.iter().find(|t| t.tag == tag && (t.from..=t.to).contains(&self.version)) {
                let mut inner = Walk { data: value, version: self.version, flexible: self.flexible };
                inner.ty(t.ty)?;
                if !inner.data.is_empty() {
                    return Err(format!("tagged field {tag} is {size} bytes, its value {}", size - inner.data.len()));
                }
            }
            self.data = rest;
        }
        Ok(())
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], Refusal> {
        let (head, rest) = self.data.split_first_chunk::<N>().ok_or_else(|| "truncated".to_string())?;
        self.data = rest;
        Ok(*head)
    }

    fn skip(&mut self, n: usize) -> Result<(), Refusal> {
        if n > self.data.len() {
            return Err(format!("field of {n} bytes in {}", self.data.len()));
        }
        self.data = &self.data[n..];
        Ok(())
    }

    /// A length or count, 0 for null. Flexible versions write an unsigned varint
    /// of length + 1 (0 for null); others an `i32` (`wide`) or `i16`, -1 for null
    /// and other negatives refused, as kafka-protocol does.
    fn length(&mut self, wide: bool) -> Result<usize, Refusal> {
        if self.flexible {
            return Ok(self.uvarint()?.saturating_sub(1) as usize);
        }
        let n = if wide { i32::from_be_bytes(self.take()?) } else { i32::from(i16::from_be_bytes(self.take()?)) };
        match n {
            -1 => Ok(0),
            n => usize::try_from(n).map_err(|_| format!("negative length {n}")),
        }
    }

    /// An unsigned varint of at most 32 bits, as kafka-protocol reads them.
    fn uvarint(&mut self) -> Result<u32, Refusal> {
        let mut value: u32 = 0;
        for shift in (0..35).step_by(7) {
            let [byte] = self.take::<1>()?;
            value |= u32::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 32 bits".into())
    }
}

/// Checks `body` as the response to API `key` at `version`, then decodes it with
/// kafka-protocol: what the connection does, as one call for the property tests
/// and fuzz targets.
pub(crate) fn decode(key: i16, version: i16, mut body: bytes::Bytes) -> Result<Box<dyn std::fmt::Debug>, Refusal> {
    check(key, version, &body)?;
    decode_unchecked(key, version, &mut body)
}

/// kafka-protocol's decoder of the response to `key`, leaving in `body` what it did
/// not read.
fn decode_unchecked(key: i16, version: i16, body: &mut bytes::Bytes) -> Result<Box<dyn std::fmt::Debug>, Refusal> {
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::Decodable;
    fn boxed<T: Decodable + std::fmt::Debug + 'static>(
        body: &mut bytes::Bytes,
        version: i16,
    ) -> Result<Box<dyn std::fmt::Debug>, Refusal> {
        T::decode(body, version).map(|t| Box::new(t) as Box<dyn std::fmt::Debug>).map_err(|e| e.to_string())
    }
    let api = ApiKey::try_from(key).map_err(|_| format!("unknown API key {key}"))?;
    let b = body;
    match api {
        ApiKey::ApiVersions => boxed::<ApiVersionsResponse>(b, version),
        ApiKey::SaslHandshake => boxed::<SaslHandshakeResponse>(b, version),
        ApiKey::SaslAuthenticate => boxed::<SaslAuthenticateResponse>(b, version),
        ApiKey::FindCoordinator => boxed::<FindCoordinatorResponse>(b, version),
        ApiKey::JoinGroup => boxed::<JoinGroupResponse>(b, version),
        ApiKey::SyncGroup => boxed::<SyncGroupResponse>(b, version),
        ApiKey::Heartbeat => boxed::<HeartbeatResponse>(b, version),
        ApiKey::LeaveGroup => boxed::<LeaveGroupResponse>(b, version),
        ApiKey::OffsetCommit => boxed::<OffsetCommitResponse>(b, version),
        ApiKey::OffsetFetch => boxed::<OffsetFetchResponse>(b, version),
        ApiKey::Metadata => boxed::<MetadataResponse>(b, version),
        ApiKey::Produce => boxed::<ProduceResponse>(b, version),
        ApiKey::Fetch => boxed::<FetchResponse>(b, version),
        ApiKey::InitProducerId => boxed::<InitProducerIdResponse>(b, version),
        ApiKey::ListOffsets => boxed::<ListOffsetsResponse>(b, version),
        ApiKey::CreateTopics => boxed::<CreateTopicsResponse>(b, version),
        other => Err(format!("no bounded decoder for {other:?} responses")),
    }
}

/// The API keys and versions this module describes, for tests and fuzz targets.
pub(crate) fn described() -> Vec<(i16, i16)> {
    let mut out = Vec::new();
    for key in 0..=i16::from(u8::MAX) {
        if let Some(m) = ApiKey::try_from(key).ok().and_then(message) {
            out.extend((m.versions.0..=m.versions.1).map(|v| (key, v)));
        }
    }
    out
}

/// A response of `key` at `version` with every field and known tagged field
/// present, arrays of two elements, and a unique marker in every string and bytes
/// field, built from this module's descriptions.
pub(crate) fn sample(key: i16, version: i16) -> Option<(Vec<u8>, Vec<String>)> {
    let msg = message(ApiKey::try_from(key).ok()?)?;
    let mut s = Sample { out: Vec::new(), markers: Vec::new(), version, flexible: version >= msg.flexible };
    s.shape(msg.shape);
    Some((s.out, s.markers))
}

struct Sample {
    out: Vec<u8>,
    markers: Vec<String>,
    version: i16,
    flexible: bool,
}

impl Sample {
    fn shape(&mut self, shape: &Shape) {
        for f in shape.fields {
            if (f.from..=f.to).contains(&self.version) {
                self.ty(f.ty);
            }
        }
        if self.flexible {
            let tags: Vec<&Tagged> = shape.tagged.iter().filter(|t| (t.from..=t.to).contains(&self.version)).collect();
            self.uvarint(tags.len());
            for t in tags {
                let mut inner = Sample { out: Vec::new(), markers: Vec::new(), version: self.version, flexible: true };
                inner.ty(t.ty);
                self.uvarint(t.tag as usize);
                self.uvarint(inner.out.len());
                self.out.extend(inner.out);
                self.markers.extend(inner.markers);
            }
        }
    }

    fn ty(&mut self, ty: Ty) {
        match ty {
            Ty::Fixed(n) => self.out.extend(std::iter::repeat_n(0u8, n)),
            Ty::Str | Ty::Bytes => {
                let marker = format!("m{:04}", self.markers.len());
                if self.flexible {
                    self.uvarint(marker.len() + 1);
                } else if matches!(ty, Ty::Str) {
                    self.out.extend((marker.len() as i16).to_be_bytes());
                } else {
                    self.out.extend((marker.len() as i32).to_be_bytes());
                }
                self.out.extend(marker.as_bytes());
                self.markers.push(marker);
            }
            Ty::Struct(shape) => self.shape(shape),
            Ty::Array(element) => {
                if self.flexible {
                    self.uvarint(3);
                } else {
                    self.out.extend(2i32.to_be_bytes());
                }
                self.ty(*element);
                self.ty(*element);
            }
        }
    }

    fn uvarint(&mut self, mut n: usize) {
        while n >= 0x80 {
            self.out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        self.out.push(n as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// The descriptions are the decoders' shapes: a sample built from a description
    /// decodes with kafka-protocol, which reads every byte of it and finds every
    /// marker where the description put it.
    #[test]
    fn every_described_response_decodes_as_described() {
        let described = described();
        assert_eq!(described.len(), 126, "{described:?}");
        for (key, version) in described {
            let (bytes, markers) = sample(key, version).expect("described");
            let what = format!("{:?} v{version}", ApiKey::try_from(key));
            check(key, version, &bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut body = Bytes::from(bytes);
            let decoded = decode_unchecked(key, version, &mut body).unwrap_or_else(|e| panic!("{what}: {e}"));
            let text = format!("{decoded:?}");
            for m in &markers {
                assert!(text.contains(m.as_str()), "{what}: marker {m} missing from {text}");
            }
            assert_eq!(body.len(), 0, "{what}: kafka-protocol left {} bytes", body.len());
        }
    }
}
