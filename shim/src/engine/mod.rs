//! Copy-on-write engines (`SNAPSHIM_COW`): what keeps the snapshot exact while the image is
//! written, and [`choose`], the one place an engine is chosen.
//!
//! - `uffd` ([`uffd`]): memory is write-protected with a userfaultfd during the pause and
//!   written by the writer while the program runs; pages the program is about to change are
//!   copied first. The default (`auto`) where the process may use userfaultfd.
//! - `stop` ([`stop`]): the program stays parked until every page is written; the pause grows
//!   with memory.
//! - `fork` ([`fork`]): during the pause the writer captures descriptors and process state,
//!   then forks a child with a raw `clone` whose exit signal is 0 (the program never sees a
//!   SIGCHLD, and its `wait(-1)` cannot reap it). The kernel makes the child's memory a
//!   copy-on-write view frozen at that instant; the program is released at once and the child
//!   writes the image from its view. The pause is the page-table copy (about 18 ms per GiB of
//!   4 KiB pages, almost nothing for huge pages); the program pays a page copy on its first
//!   write to each page while the child lives. Works for every user.
//!
//! All run on the writer stack with the scratch allocator; the forked child never returns into
//! program code: it ends with `exit_group`.

use crate::config::{Config, Cow, Incremental};
use crate::sys;

pub mod fork;
pub mod stop;
pub mod uffd;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Stop,
    Fork,
    Uffd,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Stop => "stop",
            Engine::Fork => "fork",
            Engine::Uffd => "uffd",
        }
    }
}

/// The moments of a checkpoint at which the engine may change.
pub enum Moment<'a> {
    /// A checkpoint starts.
    Start,
    /// The uffd engine could not be set up, before or during the pause: why.
    UffdUnavailable(&'a str),
    /// The image is a delta; `small`: its written pages are few enough to write during the
    /// pause (see `incremental::policy::pause_write`).
    Delta { small: bool },
    /// The uffd snapshot was not exact (memory released behind the shim's back): why. The
    /// checkpoint is taken again.
    Retry(&'a str),
}

/// The engine for the checkpoint at `moment`: the only place an engine is chosen. Says on
/// stderr why when it falls back from the uffd engine.
pub fn choose(cfg: &Config, moment: Moment) -> Engine {
    match moment {
        Moment::Start => {
            let asked = match cfg.engine {
                Cow::Auto if uffd::available() => Engine::Uffd,
                Cow::Auto | Cow::Fork => Engine::Fork,
                Cow::Stop => Engine::Stop,
                Cow::Uffd => Engine::Uffd,
            };
            match asked {
                // The synchronous uffd engine cannot register what the tracking userfaultfd of
                // incremental mode holds: full images use fork there.
                Engine::Uffd if cfg.incremental != Incremental::Off => Engine::Fork,
                Engine::Uffd if !uffd::available() => {
                    let _ = sys::write_all(
                        2,
                        b"snapshim: SNAPSHIM_COW=uffd: this process may not use userfaultfd \
                          (vm.unprivileged_userfaultfd=0?); using fork\n",
                    );
                    Engine::Fork
                }
                e => e,
            }
        }
        Moment::UffdUnavailable(msg) => {
            let text = alloc::format!("snapshim: uffd engine unavailable ({msg}); using fork\n");
            let _ = sys::write_all(2, text.as_bytes());
            Engine::Fork
        }
        // Few written pages are written out during the pause (into the page cache: about as
        // fast as copying them), many by a forked writer. The twin full image needs the fork.
        Moment::Delta { small } if small && !cfg.twin_full => Engine::Stop,
        Moment::Delta { .. } => Engine::Fork,
        Moment::Retry(msg) => {
            let text = alloc::format!(
                "snapshim: the uffd snapshot was not exact ({msg}); taking it again with fork\n"
            );
            let _ = sys::write_all(2, text.as_bytes());
            Engine::Fork
        }
    }
}
