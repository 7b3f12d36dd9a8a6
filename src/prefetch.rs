//! Asking the processor for a record's memory a few records before it is touched.
//!
//! Why: a loop over records touches each one's `Arc` block and header vector. When those
//! are cold (a record retention evicts, written long ago) or in another core's cache (a
//! record another thread just appended), each touch waits for a miss, one after another.
//! Asked for ahead, the misses of several records overlap.

use std::sync::Arc;

use crate::transport::Record;

/// How many records ahead a record's own block is asked for.
const FAR: usize = 8;
/// How many records ahead its header vector is asked for: closer, because finding the
/// vector reads the record's block, which by then has arrived.
const NEAR: usize = FAR / 2;

/// Asks for the memory of the records `FAR` and `NEAR` places into `rest` (the records
/// after the one about to be touched); `record` finds the record in an item.
#[inline]
pub(crate) fn ahead<T>(rest: &[T], record: impl Fn(&T) -> &Arc<Record>) {
    if let Some(far) = rest.get(FAR) {
        // The block starts with the `Arc`'s two counts, which dropping it reads first.
        let counts = 2 * std::mem::size_of::<usize>();
        lines(Arc::as_ptr(record(far)).cast::<u8>().wrapping_sub(counts), counts + std::mem::size_of::<Record>());
    }
    if let Some(near) = rest.get(NEAR) {
        let headers = &record(near).headers;
        lines(headers.as_ptr().cast(), std::mem::size_of_val(headers.as_slice()));
    }
}

/// Asks for every cache line that holds a byte of the `bytes` bytes from `start`.
#[inline]
fn lines(start: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        const LINE: usize = 64;
        let first = start.wrapping_sub(start as usize % LINE);
        let end = start as usize + bytes;
        let mut line = first;
        while (line as usize) < end {
            // SAFETY: a prefetch is only a hint; it never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line.cast()) }
            line = line.wrapping_add(LINE);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, bytes);
}
