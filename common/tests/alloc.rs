//! `common::alloc` in a process of its own (the allocator's counters are global:
//! other tests freeing mapped blocks meanwhile would blur them).

/// Chunks glibc has mapped on their own right now.
fn mapped_chunks() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2() }.hblks
}

#[test]
fn a_large_buffer_comes_from_the_heap_not_a_mapping_of_its_own() {
    common::alloc::keep_large_buffers();
    // 16 MiB: past glibc's own threshold (128 KiB, raised only to the size of a
    // mapped block once freed), under ours.
    let before = mapped_chunks();
    let buf = vec![1u8; 16 << 20];
    // Used, so that the allocation is not optimised away.
    std::hint::black_box(&buf);
    let during = mapped_chunks();
    drop(buf);
    assert_eq!(during, before, "a 16 MiB buffer was mapped on its own");
}
