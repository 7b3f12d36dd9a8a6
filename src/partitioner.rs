//! Key → partition, exactly as the Java client's default partitioner does it.
//!
//! A keyed record goes to `(murmur2(key) & 0x7fffffff) % partitions`, so a Rust
//! service and a Java service that key by the same bytes land on the same partition,
//! and therefore on the same consumer.
//!
//! ```
//! use kafka_rpc::partitioner::{murmur2, partition_for_key};
//! assert_eq!(murmur2(b"21"), -973932308);
//! assert_eq!(partition_for_key(b"store-42", 12), partition_for_key(b"store-42", 12));
//! ```

/// Kafka's 32-bit murmur2 hash (seed `0x9747b28c`), as `org.apache.kafka.common.utils.Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);

    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        // Java's switch falls through from case 3 to case 1.
        if tail.len() == 3 {
            h ^= (tail[2] as u32) << 16;
        }
        if tail.len() >= 2 {
            h ^= (tail[1] as u32) << 8;
        }
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client's default partitioner picks for `key` among
/// `partitions` partitions. `partitions` must be positive; 0 is treated as 1.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn matches_java_vectors() {
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            (b"abc", 479470107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input), *expected, "murmur2({:?})", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn partition_is_positive_hash_mod_count() {
        // -973932308 & 0x7fffffff = 1173551340; mod 12 = 0 ... computed independently below.
        let positive = (-973932308i32 & 0x7fff_ffff) as i64;
        assert_eq!(partition_for_key(b"21", 12) as i64, positive % 12);
        assert!((0..7).contains(&partition_for_key(b"foobar", 7)));
        assert_eq!(partition_for_key(b"anything", 0), 0);
    }
}
