//! A nesting limit around a serde `Deserializer` that has none of its own.
//!
//! bincode decodes a recursive type (an expression tree, a list built of
//! `Option<Box<Self>>`) by recursing once per level, and a level costs a few bytes on
//! the wire. So a crafted record well under a megabyte runs a worker thread out of
//! stack, and a stack overflow aborts the whole process: no `catch_unwind` stops it,
//! every partition of the server goes down with it, and the record is read again
//! after a restart. serde_json refuses input nested deeper than 128; [`Limited`] does
//! the same for any deserializer. Each compound value entered (sequence, tuple, map,
//! struct, enum, `Some`, newtype) counts one level, and scalars none.
//!
//! It wraps every way the deserializer can be entered again (visitors, their
//! sequence, map and enum accesses, and the seeds those take), so a type cannot reach
//! the inner deserializer without passing the count.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};

/// Compound values nested inside each other that a decode accepts, as serde_json.
pub(crate) const MAX_DEPTH: usize = 128;

/// `inner`, refusing values nested more than `left` compound values deeper.
pub(crate) struct Limited<D> {
    inner: D,
    left: usize,
}

impl<D> Limited<D> {
    /// `inner` with [`MAX_DEPTH`] levels to go.
    pub(crate) fn new(inner: D) -> Self {
        Limited { inner, left: MAX_DEPTH }
    }
}

/// Deserializes a `T` through [`Limited`], for decoders that take a seed rather than a
/// deserializer of ours (bincode's `seed_decode_from_slice`, which keeps its borrowing
/// fast path and counts the bytes read).
pub(crate) struct Limit<T>(std::marker::PhantomData<fn() -> T>);

impl<T> Limit<T> {
    pub(crate) fn new() -> Self {
        Limit(std::marker::PhantomData)
    }
}

impl<'de, T: de::Deserialize<'de>> DeserializeSeed<'de> for Limit<T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        T::deserialize(Limited::new(deserializer))
    }
}

macro_rules! forward_deserialize {
    ($($method:ident),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
            self.inner.$method(Visit { inner: visitor, left: self.left })
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Limited<D> {
    type Error = D::Error;

    forward_deserialize!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any,
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_unit_struct(name, Visit { inner: visitor, left: self.left })
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_newtype_struct(name, Visit { inner: visitor, left: self.left })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_tuple(len, Visit { inner: visitor, left: self.left })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_tuple_struct(name, len, Visit { inner: visitor, left: self.left })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_struct(name, fields, Visit { inner: visitor, left: self.left })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_enum(name, variants, Visit { inner: visitor, left: self.left })
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

/// A visitor that counts the compound value it is handed, if any.
struct Visit<V> {
    inner: V,
    left: usize,
}

impl<V> Visit<V> {
    /// The levels left inside a compound value entered here.
    fn deeper<E: de::Error>(&self) -> Result<usize, E> {
        self.left.checked_sub(1).ok_or_else(|| E::custom(format_args!("nested deeper than {MAX_DEPTH} levels")))
    }
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty)),* $(,)?) => {$(
        fn $method<E: de::Error>(self, v: $ty) -> Result<Self::Value, E> {
            self.inner.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Visit<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visit!(
        visit_bool(bool),
        visit_i8(i8),
        visit_i16(i16),
        visit_i32(i32),
        visit_i64(i64),
        visit_i128(i128),
        visit_u8(u8),
        visit_u16(u16),
        visit_u32(u32),
        visit_u64(u64),
        visit_u128(u128),
        visit_f32(f32),
        visit_f64(f64),
        visit_char(char),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String),
        visit_bytes(&[u8]),
        visit_borrowed_bytes(&'de [u8]),
        visit_byte_buf(Vec<u8>),
    );

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        let left = self.deeper()?;
        self.inner.visit_some(Limited { inner: deserializer, left })
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        let left = self.deeper()?;
        self.inner.visit_newtype_struct(Limited { inner: deserializer, left })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        let left = self.deeper()?;
        self.inner.visit_seq(Access { inner: seq, left })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let left = self.deeper()?;
        self.inner.visit_map(Access { inner: map, left })
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        let left = self.deeper()?;
        self.inner.visit_enum(Access { inner: data, left })
    }
}

/// The parts of a compound value, each read at the compound value's depth.
struct Access<A> {
    inner: A,
    left: usize,
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Access<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Self::Error> {
        self.inner.next_element_seed(Seed { inner: seed, left: self.left })
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Access<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Self::Error> {
        self.inner.next_key_seed(Seed { inner: seed, left: self.left })
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, Self::Error> {
        self.inner.next_value_seed(Seed { inner: seed, left: self.left })
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Access<A> {
    type Error = A::Error;
    type Variant = Access<A::Variant>;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self::Variant), Self::Error> {
        let left = self.left;
        let (value, variant) = self.inner.variant_seed(Seed { inner: seed, left })?;
        Ok((value, Access { inner: variant, left }))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Access<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, Self::Error> {
        self.inner.newtype_variant_seed(Seed { inner: seed, left: self.left })
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Self::Error> {
        self.inner.tuple_variant(len, Visit { inner: visitor, left: self.left })
    }

    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], visitor: V) -> Result<V::Value, Self::Error> {
        self.inner.struct_variant(fields, Visit { inner: visitor, left: self.left })
    }
}

/// A part's seed, handed the inner deserializer with the count around it.
struct Seed<S> {
    inner: S,
    left: usize,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.inner.deserialize(Limited { inner: deserializer, left: self.left })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// A chain of `Some`s: two levels per link (the newtype and its option).
    #[derive(Deserialize, Debug)]
    struct Link(#[allow(dead_code)] Option<Box<Link>>);

    fn chain(links: usize) -> Result<Link, bincode::error::DecodeError> {
        // bincode writes `Some` as 1 and `None` as 0.
        let mut bytes = vec![1u8; links];
        bytes.push(0);
        let mut decoder = bincode::serde::BorrowedSerdeDecoder::from_slice(&bytes, bincode::config::standard(), ());
        Link::deserialize(Limited::new(decoder.as_deserializer()))
    }

    #[test]
    fn values_up_to_the_limit_pass_and_deeper_ones_are_refused() {
        // The outermost `Link` and each of its `Some`s: 2 * links + 1 compound values.
        let deepest = (MAX_DEPTH - 1) / 2;
        assert!(chain(deepest).is_ok());
        let err = chain(deepest + 1).unwrap_err();
        assert!(err.to_string().contains("nested deeper than 128 levels"), "{err}");
    }

    #[test]
    fn every_kind_of_value_passes_through_unchanged() {
        #[derive(Deserialize, Debug, PartialEq)]
        enum Kind {
            Unit,
            Newtype(Option<u8>),
            Tuple(i64, String),
            Struct { bytes: Vec<u8>, map: std::collections::BTreeMap<String, f64> },
        }
        #[derive(Deserialize, Debug, PartialEq)]
        struct Wrapper(Vec<Kind>);
        let text = r#"["Unit", {"Newtype": 7}, {"Newtype": null}, {"Tuple": [-3, "x"]}, {"Struct": {"bytes": [1, 2], "map": {"a": 1.5}}}]"#;
        let got = Wrapper::deserialize(Limited::new(&mut serde_json::Deserializer::from_str(text))).unwrap();
        let map = std::collections::BTreeMap::from([("a".to_string(), 1.5)]);
        assert_eq!(
            got,
            Wrapper(vec![
                Kind::Unit,
                Kind::Newtype(Some(7)),
                Kind::Newtype(None),
                Kind::Tuple(-3, "x".into()),
                Kind::Struct { bytes: vec![1, 2], map },
            ])
        );
    }
}
