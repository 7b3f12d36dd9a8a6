//! Global allocators: mimalloc for the load generator and the benchmarks, and a
//! counting one for tests that bound memory.
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOCATOR: kafka_rpc_testkit::alloc::PlainMiMalloc = kafka_rpc_testkit::alloc::PlainMiMalloc;
//! # fn main() {}
//! ```
//!
//! ```no_run
//! use kafka_rpc_testkit::alloc::{live_bytes, peak_during, Counting};
//!
//! #[global_allocator]
//! static ALLOCATOR: Counting = Counting;
//!
//! # fn main() {
//! let before = live_bytes();
//! let (kept, peak) = peak_during(|| vec![0u8; 1 << 20]);
//! assert!(peak >= 1 << 20 && live_bytes() - before >= 1 << 20);
//! # drop(kept);
//! # }
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Bytes allocated and not freed on this thread, and the most at any time since
    /// the last [`peak_during`] began.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// The system allocator, counting per thread the bytes allocated and not yet freed.
/// Per thread, so a test measures what its own code keeps: run the code under test on
/// the test's thread (a current-thread runtime for async code).
#[derive(Debug, Clone, Copy, Default)]
pub struct Counting;

fn grew(by: isize) {
    // `try_with`: the allocator may be called while this thread's locals are torn down.
    let _ = LIVE.try_with(|live| {
        live.set(live.get() + by);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
    });
}

// SAFETY: forwards every call to the system allocator unchanged; the bookkeeping only
// touches const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size() as isize);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        grew(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Bytes this thread has allocated and not freed, under [`Counting`]; compare two
/// readings.
pub fn live_bytes() -> isize {
    LIVE.with(Cell::get)
}

/// Runs `f` and returns its value with the most memory it held at once on this thread
/// beyond what was live when it started, under [`Counting`].
pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = live_bytes();
    PEAK.with(|p| p.set(base));
    let value = f();
    let peak = PEAK.with(Cell::get) - base;
    (value, peak.max(0) as usize)
}

use libmimalloc_sys as mi;

/// mimalloc, called through its plain entry points for the alignments those guarantee.
///
/// Why not the mimalloc crate's `MiMalloc`: it calls the aligned entry points for
/// everything, and in mimalloc 3 an aligned allocation whose size class has no free
/// block at hand takes an over-allocating path for sizes that are not a power of two
/// (a larger block, aligned inside). That path was 5 % of an embedded round trip's
/// instructions (callgrind; docs/benchmarks.md, "Allocator"). Rust's `System`
/// allocator chooses between `malloc` and its aligned variant the same way.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainMiMalloc;

/// mimalloc's plain and aligned allocation functions.
type Plain = unsafe extern "C" fn(usize) -> *mut std::ffi::c_void;
type Aligned = unsafe extern "C" fn(usize, usize) -> *mut std::ffi::c_void;

impl PlainMiMalloc {
    /// A new block for `layout` from `plain` when that meets its alignment, else from
    /// `aligned`.
    ///
    /// # Safety
    /// As `GlobalAlloc::alloc`: `layout` has a non-zero size.
    #[inline]
    unsafe fn fresh(layout: Layout, plain: Plain, aligned: Aligned) -> *mut u8 {
        if Self::plain(layout.size(), layout.align()) {
            unsafe { plain(layout.size()).cast() }
        } else {
            unsafe { aligned(layout.size(), layout.align()).cast() }
        }
    }

    /// Whether `mi_malloc` already guarantees the alignment `align` for `size` bytes:
    /// it aligns every block to 16 bytes, or to its size when that is smaller.
    #[inline]
    fn plain(size: usize, align: usize) -> bool {
        const MIN_ALIGN: usize = 16;
        align <= MIN_ALIGN && align <= size
    }
}

// SAFETY: each method forwards to the mimalloc function made for it; `plain` picks the
// unaligned ones only where they meet the layout's alignment, and `mi_free` frees
// blocks from either.
unsafe impl GlobalAlloc for PlainMiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { Self::fresh(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { Self::fresh(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if Self::plain(new_size, layout.align()) {
            unsafe { mi::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            unsafe { mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_meets_its_layout() {
        let a = PlainMiMalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 3, 8, 15, 16, 24, 100, 336, 1000, 1025, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).expect("valid layout");
                // SAFETY: a non-zero size; each block is freed with the layout it was made with.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null() && p as usize % align == 0, "alloc {size} aligned {align}");
                    p.write_bytes(0xAB, size);
                    let p = a.realloc(p, layout, size * 3);
                    assert!(!p.is_null() && p as usize % align == 0, "realloc {size} aligned {align}");
                    assert_eq!(*p.add(size - 1), 0xAB, "realloc keeps the contents");
                    a.dealloc(p, Layout::from_size_align(size * 3, align).expect("valid layout"));
                    let z = a.alloc_zeroed(layout);
                    assert!(!z.is_null() && z as usize % align == 0, "zalloc {size} aligned {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|b| *b == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
