//! Typed requests: what a call sends, what it gets back, and how it is keyed.
//!
//! A [`Request`] names its dispatch type (the server routes on it), its response type,
//! and its partition key. Requests with the same key land on the same partition and
//! are handled one after another, in the order they were sent.
//!
//! ```
//! use kafka_rpc::request::{PartitionKey, Request};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct GetRadius { store_id: u64 }
//!
//! impl Request for GetRadius {
//!     const TYPE: &'static str = "delivery.radius.get";
//!     type Response = u32;
//!     fn key(&self) -> Option<Vec<u8>> { Some(self.store_id.key_bytes()) }
//! }
//! assert_eq!(GetRadius { store_id: 1 }.key().unwrap(), 1u64.to_be_bytes());
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A request type that a server can dispatch and a client can send.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a request type",
    note = "derive it: `#[derive(Serialize, Deserialize, Request)] #[request(type = \"...\", response = ...)]`"
)]
pub trait Request: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The dispatch name carried in the `kafka_rpc-type` header, e.g. `"delivery.radius.reduce"`.
    const TYPE: &'static str;
    /// What the handler answers with.
    type Response: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Partition key bytes. `None` spreads requests over partitions round-robin.
    fn key(&self) -> Option<Vec<u8>>;
}

/// A value that turns into partition-key bytes deterministically.
///
/// The encodings match the Java client's standard serializers, so a Java producer
/// keyed by the same value picks the same partition: strings as UTF-8, integers as
/// fixed-width big-endian, UUIDs as their hyphenated text (Java's `UUIDSerializer`).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as a partition key",
    label = "a request's `key` field must implement `PartitionKey`",
    note = "strings, integers, UUIDs and byte vectors are partition keys; implement `PartitionKey` for `{Self}` or key by one of its fields"
)]
pub trait PartitionKey {
    /// The key bytes.
    fn key_bytes(&self) -> Vec<u8>;
}

impl PartitionKey for str {
    fn key_bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}

impl PartitionKey for String {
    fn key_bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}

impl PartitionKey for [u8] {
    fn key_bytes(&self) -> Vec<u8> {
        self.to_vec()
    }
}

impl PartitionKey for Vec<u8> {
    fn key_bytes(&self) -> Vec<u8> {
        self.clone()
    }
}

impl PartitionKey for uuid::Uuid {
    fn key_bytes(&self) -> Vec<u8> {
        self.hyphenated().to_string().into_bytes()
    }
}

impl<T: PartitionKey + ?Sized> PartitionKey for &T {
    fn key_bytes(&self) -> Vec<u8> {
        (**self).key_bytes()
    }
}

macro_rules! int_keys {
    ($($t:ty),*) => {$(
        impl PartitionKey for $t {
            fn key_bytes(&self) -> Vec<u8> {
                self.to_be_bytes().to_vec()
            }
        }
    )*};
}
int_keys!(i8, i16, i32, i64, i128, u8, u16, u32, u64, u128);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_java_serializers() {
        assert_eq!("store-1".key_bytes(), b"store-1");
        assert_eq!(String::from("x").key_bytes(), b"x");
        assert_eq!(258i32.key_bytes(), vec![0, 0, 1, 2]);
        assert_eq!(1i64.key_bytes(), vec![0, 0, 0, 0, 0, 0, 0, 1]);
        let id = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(id.key_bytes(), b"01234567-89ab-cdef-0123-456789abcdef");
    }
}
