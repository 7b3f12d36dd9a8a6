//! mimalloc as a global allocator, for the load generator and the benchmarks.
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOCATOR: kafka_rpc_testkit::alloc::PlainMiMalloc = kafka_rpc_testkit::alloc::PlainMiMalloc;
//! # fn main() {}
//! ```

use std::alloc::{GlobalAlloc, Layout};

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
