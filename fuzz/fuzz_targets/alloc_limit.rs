//! A per-allocation limit for the fuzz targets. libFuzzer's `-malloc_limit_mb` works through a
//! sanitizer's malloc hooks, and scripts/fuzz builds without a sanitizer, so the limit is kept
//! here: an allocation larger than [`LIMIT`] fails, and Rust's allocation-failure handler
//! aborts ("memory allocation of N bytes failed"), which libFuzzer reports as a crash with its
//! input. Growth by many small allocations is caught by `-rss_limit_mb`.

use std::alloc::{GlobalAlloc, Layout, System};

/// The largest single allocation an input may cause (scripts/fuzz passes the same figure to
/// libFuzzer as `-malloc_limit_mb`).
pub const LIMIT: usize = 512 << 20;

pub struct Limited;

// SAFETY: every call is forwarded to `System` unchanged, or refused with a null pointer, which
// `GlobalAlloc` allows.
unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > LIMIT {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Limited = Limited;
