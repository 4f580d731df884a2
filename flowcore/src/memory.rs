//! What one node may allocate: a per-thread count of live heap bytes, kept by [`Counting`], a
//! wrapper around the process's allocator, and read by the nodes that run untrusted code on a
//! thread of their own (`script`), which stop when their share passes
//! [`Limits::max_node_memory_bytes`](crate::Limits::max_node_memory_bytes).
//!
//! Install it in the binary; without it, [`thread_live_bytes`] stays 0 and no node is stopped
//! for its memory (the other limits still hold):
//!
//! ```
//! #[global_allocator]
//! static ALLOCATOR: flowcore::memory::Counting<std::alloc::System> =
//!     flowcore::memory::Counting(std::alloc::System);
//!
//! let before = flowcore::memory::thread_live_bytes();
//! let block = vec![0u8; 1 << 20];
//! assert!(flowcore::memory::thread_live_bytes() - before >= 1 << 20);
//! drop(block);
//! ```

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;

thread_local! {
    // A const-initialized `Cell` of a plain integer: no lazy initialization and no destructor,
    // so reading it from inside the allocator never allocates.
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

/// Bytes allocated minus bytes freed on this thread since it started (negative when it freed
/// what others allocated). The difference of two readings is what the thread's work in between
/// still holds.
pub fn thread_live_bytes() -> i64 {
    LIVE.with(Cell::get)
}

fn count(delta: i64) {
    // `try_with`: during a thread's teardown the slot may be gone; the count is then moot.
    let _ = LIVE.try_with(|live| live.set(live.get().wrapping_add(delta)));
}

fn size(layout: Layout) -> i64 {
    i64::try_from(layout.size()).unwrap_or(i64::MAX)
}

/// A global allocator that counts each thread's live bytes, around allocator `A`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counting<A>(pub A);

// SAFETY: every call is passed to `A` unchanged with the caller's layout and pointer; the only
// addition is the update of a thread-local integer, which neither allocates nor unwinds.
#[allow(unsafe_code)]
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(size(layout));
        // SAFETY: the caller's contract is `A`'s.
        unsafe { self.0.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(size(layout));
        // SAFETY: as above.
        unsafe { self.0.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-size(layout));
        // SAFETY: as above.
        unsafe { self.0.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(i64::try_from(new_size).unwrap_or(i64::MAX) - size(layout));
        // SAFETY: as above.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}
