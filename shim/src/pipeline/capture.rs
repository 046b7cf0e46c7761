//! Capture: during the pause (every other thread parked), what only the running process can
//! tell, read into one [`Captured`] value that the flush and the commit take as it is.
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;

use snapshim_image::{BuildId, Credentials, FdState, Lineage, Process, ThreadState, VdsoImage};

use crate::config::Config;
use crate::objects::memory::{self, MapsEntry};
use crate::objects::threads::{self, HELPER_SLOT, SLOTS};
use crate::objects::{self, process};
use crate::sys::{self, sc};

/// What only the running process can tell: read during the pause.
pub struct Captured {
    pub maps: Vec<MapsEntry>,
    pub fds: Vec<FdState>,
    pub process: Process,
    pub threads: Vec<ThreadState>,
    /// Format 1.4: each thread's credentials.
    pub credentials: Vec<Credentials>,
    /// CLOCK_BOOTTIME read right after `process.clock_monotonic_ns`.
    pub boottime_ns: u64,
    /// Format 1.2: build-ids of the mapped files, and the vDSO (see objects/memory.rs).
    pub build_ids: Vec<BuildId>,
    pub vdso: VdsoImage,
    /// The identity the image gets (chosen during the pause, so the helper knows it).
    pub image_id: u64,
    /// Set for a delta image (incremental checkpoints, see incremental/).
    pub delta: Option<crate::incremental::Delta>,
    /// Who writes the image (owner.rs).
    pub lineage: Option<Lineage>,
}

impl Captured {
    /// The same snapshot as a full image (for `SNAPSHIM_TWIN_FULL`, see commit::write_twin).
    pub fn as_full(&self) -> Captured {
        Captured {
            maps: self.maps.clone(),
            fds: self.fds.clone(),
            process: self.process.clone(),
            threads: self.threads.clone(),
            credentials: self.credentials.clone(),
            boottime_ns: self.boottime_ns,
            build_ids: self.build_ids.clone(),
            vdso: self.vdso.clone(),
            image_id: random_id(),
            delta: None,
            lineage: self.lineage.clone(),
        }
    }
}

/// Captures the process's state (every other thread parked). `image_fd`, the image being
/// written, is not part of it.
pub fn capture(cfg: &Config, nthreads: usize, image_fd: i32) -> Result<Captured, String> {
    // Mappings of images and of vanished files are stored like anonymous memory.
    let maps = memory::mark_unmappable_files(
        &memory::read_maps()
            .map_err(|e| alloc::format!("cannot read /proc/self/maps: errno {e}"))?,
    );
    let mut fds = objects::fds(crate::engine::uffd::is_own_fd);
    let lock = crate::owner::LOCK_FD.load(core::sync::atomic::Ordering::Relaxed);
    let group = super::group::own_fd();
    fds.retain(|f| {
        f.fd != crate::incremental::own_fd() && f.fd != image_fd && f.fd != lock && f.fd != group
    });
    process::check_no_children(&[crate::incremental::merger::running()])?;
    let process = process::capture(cfg);
    objects::timers::capture_posix_timers()?;
    objects::signals::check_pending()?;
    let boottime_ns = sys::clock_ns(libc::CLOCK_BOOTTIME);
    let n = nthreads.min(threads::MAX_THREADS);
    let mut threads: Vec<ThreadState> = SLOTS[..n]
        .iter()
        .map(|s| threads::thread_state(s, false))
        .collect();
    threads.push(threads::thread_state(&HELPER_SLOT, true));
    let credentials = SLOTS[..n]
        .iter()
        .chain([&HELPER_SLOT])
        .map(threads::credentials)
        .collect::<Result<Vec<_>, _>>()?;
    let build_ids = memory::build_ids(&maps);
    let vdso = memory::vdso(&maps);
    Ok(Captured {
        maps,
        fds,
        process,
        threads,
        credentials,
        boottime_ns,
        build_ids,
        vdso,
        image_id: random_id(),
        delta: None,
        lineage: crate::owner::lineage(),
    })
}

fn random_id() -> u64 {
    let mut v = 0u64;
    // SAFETY: getrandom writes 8 bytes into v.
    unsafe { sc!(libc::SYS_getrandom, &mut v as *mut u64, 8, 0) };
    v
}
