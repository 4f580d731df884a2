//! SQLite allocates through the process's global allocator (Rust's `#[global_allocator]`, which
//! the `flowcore` binary makes mimalloc) instead of the C library's `malloc`.
//!
//! Why: under load SQLite runs on the runtime's blocking threads, which come and go, and glibc
//! gives each its own arena. The memory SQLite frees stays in those arenas: in a soak, SQLite
//! held 3 MB while glibc's arenas grew from 13 to 19 MB between minutes 10 and 20 (BENCHMARKS.md,
//! "where the memory went"). One allocator for the whole process reuses what SQLite frees.
//!
//! Written here because neither diesel nor libsqlite3-sys offers the hook (sqlx has one, for its
//! own driver). It is SQLite's documented interface for this, `SQLITE_CONFIG_MALLOC`, set once
//! before the first connection of the process.

use std::alloc::Layout;
use std::ffi::{c_int, c_void};
use std::ptr::null_mut;

use libsqlite3_sys as ffi;

/// Room before each block for its size (which `xSize` and `xFree` need), keeping the block
/// aligned as `malloc`'s are.
const HEADER: usize = 16;
const ALIGN: usize = 16;

fn layout(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(HEADER)?, ALIGN).ok()
}

/// SQLite's `xMalloc`.
///
/// # Safety
/// Any `n`; the result is null or a block of at least `n` bytes for [`free`] and [`realloc`].
unsafe extern "C" fn malloc(n: c_int) -> *mut c_void {
    let Some(layout) = usize::try_from(n).ok().and_then(layout) else {
        return null_mut();
    };
    // SAFETY: the layout's size is at least HEADER, not zero.
    let base = unsafe { std::alloc::alloc(layout) };
    if base.is_null() {
        return null_mut();
    }
    // SAFETY: `base` holds HEADER + n bytes, aligned to 16 (enough for a usize); the block
    // handed out starts HEADER bytes in.
    unsafe {
        base.cast::<usize>().write(layout.size() - HEADER);
        base.add(HEADER).cast()
    }
}

/// The block's base and layout, from a pointer [`malloc`] or [`realloc`] returned.
///
/// # Safety
/// `p` is such a pointer, not freed.
unsafe fn block(p: *mut c_void) -> (*mut u8, Layout) {
    // SAFETY: `p` is HEADER bytes into a block whose first word is its size, per the caller.
    unsafe {
        let base = p.cast::<u8>().sub(HEADER);
        let size = base.cast::<usize>().read();
        (
            base,
            Layout::from_size_align_unchecked(size + HEADER, ALIGN),
        )
    }
}

/// SQLite's `xFree`.
///
/// # Safety
/// `p` is null or from [`malloc`] or [`realloc`], not freed.
unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    // SAFETY: per the caller; the layout is the one the block was allocated with.
    unsafe {
        let (base, layout) = block(p);
        std::alloc::dealloc(base, layout);
    }
}

/// SQLite's `xRealloc` (SQLite calls it with a block and a size above zero only).
///
/// # Safety
/// `p` is null or from [`malloc`] or [`realloc`], not freed. On null returned, `p` stays valid.
unsafe extern "C" fn realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    if p.is_null() {
        // SAFETY: any size.
        return unsafe { malloc(n) };
    }
    let Some(new) = usize::try_from(n).ok().and_then(layout) else {
        return null_mut();
    };
    // SAFETY: per the caller; `new.size()` is a valid size for ALIGN (checked by `layout`).
    unsafe {
        let (base, old) = block(p);
        let moved = std::alloc::realloc(base, old, new.size());
        if moved.is_null() {
            return null_mut();
        }
        moved.cast::<usize>().write(new.size() - HEADER);
        moved.add(HEADER).cast()
    }
}

/// SQLite's `xSize`: the size asked for the block (SQLite counts its memory with it).
///
/// # Safety
/// `p` is null or from [`malloc`] or [`realloc`], not freed.
unsafe extern "C" fn size(p: *mut c_void) -> c_int {
    if p.is_null() {
        return 0;
    }
    // SAFETY: per the caller.
    let (_, layout) = unsafe { block(p) };
    c_int::try_from(layout.size() - HEADER).unwrap_or(c_int::MAX)
}

/// SQLite's `xRoundup`: sizes as [`malloc`] gives them, a multiple of 8 as SQLite requires for
/// every size it asks (it caps them far below `c_int::MAX`; above `c_int::MAX - 7`, `n` as it is).
extern "C" fn roundup(n: c_int) -> c_int {
    n.checked_add(7).map_or(n, |n| n & !7)
}

extern "C" fn init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

extern "C" fn shutdown(_: *mut c_void) {}

/// Makes SQLite allocate through the global allocator, once per process, before its first
/// connection. Returns whether SQLite took it: `false` when something in the process used
/// SQLite first (it then keeps `malloc`; nothing else changes).
///
/// Invariant of this crate: every SQLite connection of the process opens after this call (all
/// go through [`SqlStore::connect`](super::SqlStore::connect)). `sqlite3_config` is not
/// thread-safe: a connection opening elsewhere at the same moment could see the allocator
/// change under blocks it already holds.
pub(crate) fn use_global_allocator() -> bool {
    static TAKEN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TAKEN.get_or_init(|| {
        let methods = ffi::sqlite3_mem_methods {
            xMalloc: Some(malloc),
            xFree: Some(free),
            xRealloc: Some(realloc),
            xSize: Some(size),
            xRoundup: Some(roundup),
            xInit: Some(init),
            xShutdown: Some(shutdown),
            pAppData: null_mut(),
        };
        // SAFETY: SQLITE_CONFIG_MALLOC takes a pointer to the methods and copies them. SQLite
        // refuses it (SQLITE_MISUSE, changing nothing) once initialized; before, no thread
        // uses SQLite yet (the invariant above; the OnceLock orders the callers of this). The
        // functions keep SQLite's contract: 8-byte aligned blocks, `xSize` of each, null on
        // failure.
        let config = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &raw const methods) };
        if config != ffi::SQLITE_OK {
            tracing::debug!(
                code = config,
                "SQLite was in use before flowcore: it keeps the C allocator"
            );
            return false;
        }
        // SAFETY: no argument; safe to call from any thread. On failure the methods stay set,
        // and the first connection initializes SQLite again with them.
        let init = unsafe { ffi::sqlite3_initialize() };
        if init != ffi::SQLITE_OK {
            tracing::warn!(
                code = init,
                "SQLite failed to initialize; it will try again"
            );
        }
        true
    })
}

/// Bytes that SQLite holds now in this process, over all its connections: page caches (each
/// bounded by its `cache_size`), prepared statements and schemas, as SQLite counts them (the
/// sizes asked, without the allocator's own overhead). Once
/// [`SqlStore::connect`](super::SqlStore::connect) made SQLite allocate through the global
/// allocator, these bytes are part of that allocator's heap. 0 before any SQLite database opens.
///
/// ```
/// let held = flowcore_store::sql::sqlite_memory_bytes();
/// println!("SQLite holds {} KiB", held / 1024);
/// ```
pub fn sqlite_memory_bytes() -> u64 {
    // SAFETY: reads one of SQLite's global counters under its mutex: no pointer, no state of a
    // connection (SQLITE_THREADSAFE=1, the bundled build's default). Before SQLite initialized,
    // the mutex is not there yet and the counter reads 0.
    let used = unsafe { ffi::sqlite3_memory_used() };
    u64::try_from(used).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_allocates_through_the_global_allocator() {
        assert!(use_global_allocator(), "nothing used SQLite before");
        let before = flowcore::memory::thread_live_bytes();
        // SAFETY: SQLite's own allocation functions, on blocks they return.
        unsafe {
            let p = ffi::sqlite3_malloc64(1 << 20);
            assert!(!p.is_null());
            assert!(
                flowcore::memory::thread_live_bytes() - before >= 1 << 20,
                "the global allocator counted SQLite's block"
            );
            assert_eq!(ffi::sqlite3_msize(p), 1 << 20);
            assert_eq!(p as usize % 8, 0, "aligned");
            p.cast::<u8>().write_bytes(7, 1 << 20);
            let q = ffi::sqlite3_realloc64(p, 3 << 20);
            assert!(!q.is_null());
            assert_eq!(ffi::sqlite3_msize(q), 3 << 20);
            assert_eq!(
                q.cast::<u8>().add((1 << 20) - 1).read(),
                7,
                "kept its bytes"
            );
            let r = ffi::sqlite3_realloc64(q, 100);
            assert!(!r.is_null());
            assert_eq!(ffi::sqlite3_msize(r), 104, "rounded up to 8");
            assert_eq!(
                r.cast::<u8>().add(99).read(),
                7,
                "a shrunk block kept its bytes"
            );
            ffi::sqlite3_free(r);
            ffi::sqlite3_free(null_mut());
        }
        assert_eq!(
            flowcore::memory::thread_live_bytes(),
            before,
            "every byte given back"
        );
        assert_eq!(roundup(c_int::MAX), c_int::MAX, "no overflow");
    }
}
