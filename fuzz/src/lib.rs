//! What the fuzz targets share: an allocator that stops the run on one
//! allocation larger than `LIMIT`. The targets are built without a
//! sanitizer (a C dependency's configure step cannot link one), so
//! libFuzzer's `-malloc_limit_mb` sees nothing; this does it instead.
//! A parser that sizes a buffer from what it reads, rather than from what
//! it has, is found here long before the machine runs out of memory.

use std::alloc::{GlobalAlloc, Layout, System};

/// No input of a few kilobytes needs one allocation this large.
pub const LIMIT: usize = 256 << 20;

pub struct Capped;

fn check(size: usize) {
    if size > LIMIT {
        // Not a panic: an allocator must not unwind. libFuzzer takes the
        // abort as a crash and keeps the input.
        eprintln!("==fuzz== one allocation of {size} bytes, more than the {LIMIT} allowed");
        std::process::abort();
    }
}

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        System.realloc(ptr, layout, new_size)
    }
}
