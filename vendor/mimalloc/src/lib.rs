// Copyright 2019 Octavian Oncescu

#![no_std]

//! A drop-in global allocator wrapper around the [mimalloc](https://github.com/microsoft/mimalloc) allocator.
//! Mimalloc is a general purpose, performance oriented allocator built by Microsoft.
//!
//! ## Usage
//! ```rust,ignore
//! use mimalloc::MiMalloc;
//!
//! #[global_allocator]
//! static GLOBAL: MiMalloc = MiMalloc;
//! ```
//!
//! ## Usage with secure mode
//! Using secure mode adds guard pages,
//! randomized allocation, encrypted free lists, etc. The performance penalty is usually
//! around 10% according to [mimalloc's](https://github.com/microsoft/mimalloc)
//! own benchmarks.
//!
//! To enable secure mode, put in `Cargo.toml`:
//! ```toml
//! [dependencies]
//! mimalloc = { version = "*", features = ["secure"] }
//! ```

extern crate libmimalloc_sys as ffi;

#[cfg(feature = "extended")]
mod extended;

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;
use ffi::*;

/// Drop-in mimalloc global allocator.
///
/// ## Usage
/// ```rust,ignore
/// use mimalloc::MiMalloc;
///
/// #[global_allocator]
/// static GLOBAL: MiMalloc = MiMalloc;
/// ```
pub struct MiMalloc;

/// ficus patch: the alignment every mimalloc block has. Blocks come in sizes that are
/// multiples of the word, laid out from a page start aligned to 16 bytes
/// (`MI_PAGE_MIN_START_BLOCK_ALIGN`), so a plain `mi_malloc` already satisfies any alignment
/// up to the word; only a larger one needs the `_aligned` calls.
const WORD_ALIGN: usize = core::mem::size_of::<usize>();

// ficus patch: every call went through the `_aligned` functions. In mimalloc 3 their fast
// path serves a block only from a page of its size class that already has free blocks;
// otherwise, for a size that is not a power of two or is over 1 KiB, they over-allocate into
// a larger class instead of starting a page of the block's own, so such classes never got a
// page and every such block took the slow path (a 48-byte `Box` a 64-byte block). Most
// allocations ask for no more than word alignment: they now take the plain calls, which any
// block satisfies.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD_ALIGN {
            mi_malloc(layout.size()) as *mut u8
        } else {
            mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD_ALIGN {
            mi_zalloc(layout.size()) as *mut u8
        } else {
            mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi_free(ptr as *mut c_void);
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= WORD_ALIGN {
            mi_realloc(ptr as *mut c_void, new_size) as *mut u8
        } else {
            mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ficus patch: the tests below cover the choice between the plain and the aligned calls.

    #[test]
    fn a_word_aligned_block_is_not_over_allocated() {
        extern "C" {
            fn mi_usable_size(p: *const c_void) -> usize;
        }
        unsafe {
            let layout = Layout::from_size_align(48, 8).unwrap();
            let ptr = MiMalloc.alloc(layout);
            // mimalloc has 48-byte blocks; the aligned call over-allocated a 64-byte one.
            assert_eq!(mi_usable_size(ptr as *const c_void), 48);
            MiMalloc.dealloc(ptr, layout);
        }
    }

    #[test]
    fn every_alignment_is_honoured() {
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 3, 8, 12, 24, 40, 48, 56, 100, 1000, 1100, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                let aligned = |p: *mut u8| !p.is_null() && p as usize % align == 0;
                unsafe {
                    let ptr = MiMalloc.alloc(layout);
                    assert!(aligned(ptr), "alloc {size} bytes, align {align}");
                    ptr.write_bytes(0xa5, size);
                    let grown = MiMalloc.realloc(ptr, layout, size * 3 + 1);
                    assert!(aligned(grown), "realloc {size} bytes, align {align}");
                    assert!(
                        (0..size).all(|i| *grown.add(i) == 0xa5),
                        "realloc kept the bytes"
                    );
                    MiMalloc.dealloc(grown, layout);

                    let zeroed = MiMalloc.alloc_zeroed(layout);
                    assert!(aligned(zeroed), "alloc_zeroed {size} bytes, align {align}");
                    assert!((0..size).all(|i| *zeroed.add(i) == 0), "zeroed");
                    MiMalloc.dealloc(zeroed, layout);
                }
            }
        }
    }

    #[test]
    fn it_frees_allocated_memory() {
        unsafe {
            let layout = Layout::from_size_align(8, 8).unwrap();
            let alloc = MiMalloc;

            let ptr = alloc.alloc(layout);
            alloc.dealloc(ptr, layout);
        }
    }

    #[test]
    fn it_frees_allocated_big_memory() {
        unsafe {
            let layout = Layout::from_size_align(1 << 20, 32).unwrap();
            let alloc = MiMalloc;

            let ptr = alloc.alloc(layout);
            alloc.dealloc(ptr, layout);
        }
    }

    #[test]
    fn it_frees_zero_allocated_memory() {
        unsafe {
            let layout = Layout::from_size_align(8, 8).unwrap();
            let alloc = MiMalloc;

            let ptr = alloc.alloc_zeroed(layout);
            alloc.dealloc(ptr, layout);
        }
    }

    #[test]
    fn it_frees_zero_allocated_big_memory() {
        unsafe {
            let layout = Layout::from_size_align(1 << 20, 32).unwrap();
            let alloc = MiMalloc;

            let ptr = alloc.alloc_zeroed(layout);
            alloc.dealloc(ptr, layout);
        }
    }

    #[test]
    fn it_frees_reallocated_memory() {
        unsafe {
            let layout = Layout::from_size_align(8, 8).unwrap();
            let alloc = MiMalloc;

            let ptr = alloc.alloc(layout);
            let ptr = alloc.realloc(ptr, layout, 16);
            alloc.dealloc(ptr, layout);
        }
    }

    #[test]
    fn it_frees_reallocated_big_memory() {
        unsafe {
            let layout = Layout::from_size_align(1 << 20, 32).unwrap();
            let alloc = MiMalloc;

            let ptr = alloc.alloc(layout);
            let ptr = alloc.realloc(ptr, layout, 2 << 20);
            alloc.dealloc(ptr, layout);
        }
    }
}
