//! Decompression of fetched record batches, bounded.
//!
//! A compressed batch is a few kilobytes on the wire but may claim gigabytes once
//! inflated (a decompression bomb: 1 GiB of zeros gzips to about 1 MiB). kafka-protocol's
//! decompressors inflate everything they are given, and its snappy one reserves the
//! size a block header claims before decompressing it. Here every codec stops at a
//! limit and reports the batch as too large, which the reader skips and counts like
//! any other unreadable batch.

use std::io::Read;

use bytes::Bytes;
use kafka_protocol::records::Compression;

/// The most bytes one record batch may inflate to: what a whole response may hold
/// (the connection's frame limit), so no batch costs more memory than a response.
pub(crate) const MAX_INFLATED: usize = super::connection::MAX_FRAME;

/// The largest zstd window accepted (2^26 = 64 MiB, the inflate limit): a frame's
/// header may ask the decoder for a window of up to 2 GiB, allocated before any
/// output is produced.
const ZSTD_WINDOW_LOG_MAX: u32 = 26;

/// The xerial framing Kafka's Java client writes around snappy blocks: an 8-byte
/// magic, then a version and a compatible-version `i32`.
const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER: usize = 16;

/// Inflates `raw` with `compression`, refusing output beyond `limit` bytes.
pub(crate) fn inflate(compression: Compression, raw: &[u8], limit: usize) -> Result<Bytes, String> {
    match compression {
        Compression::None => Ok(Bytes::copy_from_slice(raw)),
        Compression::Gzip => read_bounded(flate2::read::MultiGzDecoder::new(raw), limit, "gzip"),
        Compression::Lz4 => {
            let decoder = lz4::Decoder::new(raw).map_err(|e| format!("lz4: {e}"))?;
            read_bounded(decoder, limit, "lz4")
        }
        Compression::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::new(raw).map_err(|e| format!("zstd: {e}"))?;
            decoder.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(|e| format!("zstd: {e}"))?;
            read_bounded(decoder, limit, "zstd")
        }
        Compression::Snappy => snappy(raw, limit),
    }
}

/// Reads `reader` to its end, refusing it if it has more than `limit` bytes. The
/// buffer doubles as it fills but never past the limit (a plain `read_to_end` would
/// double a buffer just under the limit to twice it), then one more byte is probed.
fn read_bounded(mut reader: impl Read, limit: usize, codec: &str) -> Result<Bytes, String> {
    let fail = |e: std::io::Error| format!("{codec}: {e}");
    let mut out = Vec::new();
    let mut len = 0;
    loop {
        if len == out.len() {
            if len == limit {
                if reader.read(&mut [0u8; 1]).map_err(fail)? > 0 {
                    return Err(too_large(codec, limit));
                }
                break;
            }
            let grow = len.max(64 * 1024).min(limit - len);
            out.reserve_exact(grow);
            out.resize(len + grow, 0);
        }
        match reader.read(&mut out[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(e)),
        }
    }
    out.truncate(len);
    Ok(Bytes::from(out))
}

fn too_large(codec: &str, limit: usize) -> String {
    format!("{codec} batch inflates to more than {limit} bytes")
}

/// Snappy as Kafka clients write it: xerial-framed blocks (Java), or one raw block
/// (librdkafka may). Each block's claimed size is checked before it is reserved.
fn snappy(raw: &[u8], limit: usize) -> Result<Bytes, String> {
    let mut out = Vec::new();
    let block = |compressed: &[u8], out: &mut Vec<u8>| -> Result<(), String> {
        let size = snap::raw::decompress_len(compressed).map_err(|e| format!("snappy: {e}"))?;
        if size > limit.saturating_sub(out.len()) {
            return Err(too_large("snappy", limit));
        }
        let start = out.len();
        out.resize(start + size, 0);
        let n =
            snap::raw::Decoder::new().decompress(compressed, &mut out[start..]).map_err(|e| format!("snappy: {e}"))?;
        out.truncate(start + n);
        Ok(())
    };
    if !raw.starts_with(XERIAL_MAGIC) {
        block(raw, &mut out)?;
        return Ok(Bytes::from(out));
    }
    let mut rest = raw.get(XERIAL_HEADER..).ok_or("snappy: truncated xerial header")?;
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or("snappy: truncated block length")?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > tail.len() {
            return Err(format!("snappy: block of {len} bytes in {}", tail.len()));
        }
        let (compressed, tail) = tail.split_at(len);
        block(compressed, &mut out)?;
        rest = tail;
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};
    use kafka_protocol::compression::{Compressor, Gzip, Lz4, Snappy, Zstd};

    /// Compresses `plain` the way kafka-protocol's encoder does.
    fn compress(compression: Compression, plain: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        let fill = |b: &mut BytesMut| {
            b.put_slice(plain);
            Ok(())
        };
        match compression {
            Compression::None => out.put_slice(plain),
            Compression::Gzip => Gzip::compress(&mut out, fill).expect("compresses"),
            Compression::Snappy => Snappy::compress(&mut out, fill).expect("compresses"),
            Compression::Lz4 => Lz4::compress(&mut out, fill).expect("compresses"),
            Compression::Zstd => Zstd::compress(&mut out, fill).expect("compresses"),
        }
        out.to_vec()
    }

    const CODECS: [Compression; 4] = [Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];

    #[test]
    fn every_codec_inflates_what_kafka_protocol_compressed() {
        let plain: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for c in CODECS {
            let packed = compress(c, &plain);
            assert_eq!(inflate(c, &packed, plain.len()).as_deref(), Ok(&plain[..]), "{c:?}");
        }
    }

    #[test]
    fn a_bomb_is_refused_at_the_limit_by_every_codec() {
        // 16 MiB of zeros, a few KiB compressed; a 1 MiB limit.
        let plain = vec![0u8; 16 << 20];
        for c in CODECS {
            let packed = compress(c, &plain);
            assert!(packed.len() < 1 << 20, "{c:?} packs to {}", packed.len());
            let err = inflate(c, &packed, 1 << 20).expect_err("over the limit");
            assert!(err.contains("more than 1048576 bytes"), "{c:?}: {err}");
        }
    }

    #[test]
    fn a_snappy_block_claiming_4_gib_is_refused_before_reserving_it() {
        // A raw block whose header varint says 2^32 - 1 bytes, followed by nothing.
        let forged = [0xff, 0xff, 0xff, 0xff, 0x0f, 0x00];
        let err = inflate(Compression::Snappy, &forged, MAX_INFLATED).expect_err("refused");
        assert!(err.contains("more than"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_inflate_or_fail_within_the_limit(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            codec in 0usize..4,
        ) {
            if let Ok(out) = inflate(CODECS[codec], &data, 4096) {
                proptest::prop_assert!(out.len() <= 4096);
            }
        }
    }
}
