//! Transparent huge pages for large host buffers.
//!
//! A 2^19-token step allocates and frees buffers of hundreds of MiB; with 4 KiB pages every
//! first touch is a page fault, and on a virtual machine those faults cost up to 40% of the
//! run (measured: 1.19 M faults and 7.4 s of 16.9 s in system time for one LSH attention
//! forward+backward at 2^19). Advising the kernel to back them with 2 MiB pages cuts the
//! faults ~500-fold. Where transparent huge pages are off, or off Linux, this does nothing.

/// Buffers below this many bytes are left alone.
pub const MIN_BYTES: usize = 4 << 20;
const HUGE: usize = 2 << 20;

#[cfg(target_os = "linux")]
mod sys {
    use std::ffi::{c_int, c_void};

    pub const MADV_HUGEPAGE: c_int = 14;

    extern "C" {
        pub fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
    }
}

/// Advises huge pages for the 2 MiB-aligned interior of `[ptr, ptr + bytes)`.
pub fn advise(ptr: *const u8, bytes: usize) {
    if bytes < MIN_BYTES {
        return;
    }
    let start = (ptr as usize).next_multiple_of(HUGE);
    let end = (ptr as usize + bytes) / HUGE * HUGE;
    if end <= start {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: madvise only changes how the kernel backs pages of a range this process owns
    // (inside a live allocation); it never changes their contents. Its result is advisory.
    unsafe {
        sys::madvise(
            start as *mut std::ffi::c_void,
            end - start,
            sys::MADV_HUGEPAGE,
        );
    }
}
