//! The C allocator's set-up for daemons that move data in large buffers.
//!
//! Every RPC that carries file data allocates buffers of up to a few MiB (a 1 MiB
//! read or write, its bincode frame, the frame's read buffer). glibc serves
//! allocations above its mmap threshold (128 KiB at first, raised only as freed
//! blocks show the need) with a fresh mmap, freed by munmap: every such buffer
//! then costs a page fault and a zeroed page per 4 KiB, and the unmap. Measured
//! with `perf` on fs-server taking 1 MiB writes through `/...`: a fifth to a third
//! of its samples were in those faults, none with the thresholds below; its CPU
//! per GiB written fell from 1.39-1.46 s to 1.26 s.

/// Above this, allocations are still mapped on their own (nothing here asks for
/// more than a frame, [`crate::transport::DEFAULT_MAX_FRAME`]).
const MMAP_THRESHOLD: usize = 64 << 20;

/// Free memory at the top of a heap is given back to the kernel only past this.
const TRIM_THRESHOLD: usize = 128 << 20;

/// Makes the allocator keep and reuse the buffers of data-moving RPCs instead of
/// mapping and unmapping each (see the module comment). Call early in `main`.
/// Failures only leave glibc's defaults in place.
pub fn keep_large_buffers() {
    // SAFETY: mallopt only sets allocator parameters; any value is accepted or
    // refused (returning 0), and it may be called while other threads allocate.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
    };
    if !ok {
        tracing::debug!("mallopt refused the thresholds: glibc's defaults stay");
    }
}
