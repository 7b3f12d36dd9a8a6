//! Defaults that clients and servers share, in one place so neither takes them from the
//! other.

/// Partitions of a request or reply topic that a client or server creates when it is
/// missing and no count was given (`partitions(...)` on either builder).
pub const PARTITIONS: i32 = 8;
