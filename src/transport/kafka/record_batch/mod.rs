//! Kafka's v2 record batch: our records written as one ([`encode`], what a produce
//! request carries) and a fetch answer's batches read back ([`decode`]). Both keep a
//! record's headers as the list Kafka defines, in which a name may repeat, where
//! kafka-protocol's record keeps a map.

pub(crate) mod decode;
pub(crate) mod encode;
