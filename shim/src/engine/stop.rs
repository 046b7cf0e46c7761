//! The stop engine (`SNAPSHIM_COW=stop`): the program stays parked while the whole image is
//! written, so nothing can change the snapshot and nothing needs protecting; the pause grows
//! with memory. Also used for small delta images, whose written pages go into the page cache
//! during the pause faster than a fork would copy the page tables.

/// Runs `write` with every program thread still parked, then `release`s them; the commit
/// (fsync, rename) comes after, while the program runs.
pub fn write_parked<T>(write: impl FnOnce() -> T, release: impl FnOnce()) -> T {
    let r = write();
    release();
    r
}
