//! Hostile length prefixes cost no memory: with a counting global allocator, reading frames
//! from arbitrary byte streams — including a 4 GiB length prefix — never allocates more than
//! the frame limit at once. (Its own test binary, so the allocator counts only this.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use peerfs_proto::frame::{FrameError, read_frame};
use proptest::prelude::*;

/// Passes everything to the system allocator, remembering the largest single request made
/// while armed.
struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds GlobalAlloc's contract;
// the bookkeeping only touches atomics and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same layout, forwarded as received.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout (via the methods here).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same layout, forwarded as received.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr`/`layout` describe a live System allocation; arguments forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    if ARMED.load(Ordering::Relaxed) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Reads every frame of `bytes`; returns the largest allocation made meanwhile.
fn largest_allocation_reading(rt: &tokio::runtime::Runtime, bytes: &[u8], max: usize) -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    rt.block_on(async {
        let mut input = bytes;
        while let Ok(Some(_)) = read_frame(&mut input, max).await {}
    });
    ARMED.store(false, Ordering::Relaxed);
    LARGEST.load(Ordering::Relaxed)
}

const MAX: usize = 4096;

/// Vec growth may round a payload buffer up to twice the limit at most.
const BOUND: usize = 2 * MAX + 1024;

// One test function only: the counters are global, and tests of one binary run in parallel.
#[test]
fn hostile_streams_never_allocate_beyond_the_limit() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");

    // A 4 GiB length prefix is refused before any payload buffer exists.
    let four_gib = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    let err = rt.block_on(async {
        let mut input = &four_gib[..];
        read_frame(&mut input, MAX).await
    });
    assert!(
        matches!(err, Err(FrameError::TooLarge { len, .. }) if len == u32::MAX as u64),
        "{err:?}"
    );
    let largest = largest_allocation_reading(&rt, &four_gib, MAX);
    assert!(largest < 1024, "a refused prefix allocated {largest} bytes");

    // A prefix just under the limit with few bytes behind it reserves little.
    let mut stalled = ((MAX - 1) as u32).to_be_bytes().to_vec();
    stalled.extend_from_slice(&[0; 8]);
    let largest = largest_allocation_reading(&rt, &stalled, MAX);
    assert!(largest <= BOUND, "{largest}");

    // Arbitrary streams, and streams of arbitrary prefixes.
    let mut runner = proptest::test_runner::TestRunner::default();
    runner
        .run(
            &prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..4096),
                proptest::collection::vec(any::<u32>(), 0..64)
                    .prop_map(|v| v.iter().flat_map(|x| x.to_be_bytes()).collect()),
            ],
            |bytes| {
                let largest = largest_allocation_reading(&rt, &bytes, MAX);
                prop_assert!(largest <= BOUND, "allocated {} bytes at once", largest);
                Ok(())
            },
        )
        .expect("property");
}
