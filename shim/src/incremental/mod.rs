//! Incremental checkpoints (`SNAPSHIM_INCREMENTAL`): dirty-page tracking (`dirty.rs`), the
//! delta-or-full policy (`policy.rs`) and the background merger (`merger.rs`); retention, which
//! must follow chains, is part of the commit (`pipeline/commit.rs`).
//!
//! One userfaultfd, opened once with `UFFD_FEATURE_WP_ASYNC` (and `UFFD_USER_MODE_ONLY` where a
//! normal one is refused, as for unprivileged users), has the program's private anonymous
//! regions registered in write-protect mode for good. With WP_ASYNC the kernel resolves a write
//! to a protected page by itself (it clears the page's protection bit, ~1 us, nobody reads the
//! userfaultfd), so the bit records "not written since it was last protected". In each pause:
//!
//! 1. every trackable region of the memory map is registered (again: a no-op for a registered
//!    one; a region mapped since the last checkpoint is new, and all its pages count as written
//!    on its first scan);
//! 2. one `PAGEMAP_SCAN` per region with `PAGE_IS_WRITTEN` and `PM_SCAN_WP_MATCHING` returns the
//!    pages written since the last scan and protects them again in the same walk.
//!
//! For a delta image the written pages are stored (those holding data: present and not the
//! shared zero page, or swapped), the written pages without data are holes (zero), and the rest
//! of the region is inherited from the parent. For a full image the scan only re-protects.
//!
//! What the kernel reports was checked on this kernel by `testapps/c/wpasync.c` (run by
//! `testapps/tests/incremental.rs`): a discarded page (`MADV_DONTNEED`) counts as written (it is
//! zero now); a page the kernel writes (`read()` into it) counts as written; pages moved by
//! `mremap` or in a region mapped anew at the same address lose their registration and count as
//! written once registered again; a never-written page read in (the shared zero page) stays
//! unwritten; a scan over a region that is not registered fails (`PM_SCAN_CHECK_WPASYNC`),
//! which is why every region is registered before it is scanned.
//!
//! Untracked regions (private file mappings, shared memory, a restored program's memory still
//! mapped from its image, anything the kernel refuses to register) are stored in every delta
//! exactly as in a full image.

pub mod dirty;
pub mod merger;
pub mod policy;

pub use dirty::{before_mremap, own_fd, Tracked};
pub use policy::Delta;

/// In a restored process: the userfaultfd is gone with the old process; a new one is opened
/// at the next checkpoint, which is a full image.
pub fn after_restore() {
    policy::forget();
    dirty::reset();
}
