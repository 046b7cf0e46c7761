//! The end-to-end test harness for snapshim, and the test apps it drives.
//!
//! Every scenario has the same shape:
//!
//! ```text
//!  App::spawn ─► READY ─► pause ─► snapshim checkpoint PID ─► kill -9 ─► snapshim-restore IMAGE
//!  LD_PRELOAD=libsnapshim.so       (random     (image committed,      (+ text appended    │
//!  stdout → out.txt (file)          moment)     path printed)          to output files)   ▼
//!  stderr → pipe we read                                                        wait for exit 0,
//!                                                 out.txt and output files == uninterrupted run
//! ```
//!
//! Written so that a test reads like its scenario:
//!
//! ```no_run
//! # use snapshim_testapps::*;
//! # fn main() -> Result<()> {
//! let app = App::spawn("threads")?.wait_ready()?.pause_randomly()?;
//! let img = app.checkpoint()?;
//! app.kill()?;
//! img.restore()?.finish()?.assert_same_output_as_uninterrupted()
//! # }
//! ```
//!
//! The reference output of each app comes from two uninterrupted runs, one without and one with
//! the shim, which must agree. The apps are in `c/` (built by build.rs), `src/bin/` and `py/`;
//! their contract is in testapps/README.md.
//!
//! Environment: `SNAPSHIM_TEST_SEED` replays random checkpoint moments, `SNAPSHIM_TEST_TIMEOUT`
//! (seconds, default 120) bounds every wait, `SNAPSHIM_TEST_KEEP` keeps session directories.
//! Other `SNAPSHIM_*` variables (an engine choice, say) reach the apps unchanged. With `CI` set,
//! a test whose needs (root, userfaultfd, ...) the machine does not meet fails instead of
//! being skipped (see [`needs`]).
#![deny(unsafe_code)]

use std::fmt;

pub mod apps;
pub mod artifacts;
pub mod cluster;
pub mod diff;
pub mod needs;
pub mod nodes;
pub mod process;
pub mod rng;
pub mod scenario;

pub use apps::{AppSpec, APP_NAMES, PYTHON};
pub use artifacts::{artifacts, Artifacts};
pub use diff::diff_summary;
pub use process::{is_root, Captured};
pub use scenario::{
    expect_clean_refusal, reference, uninterrupted_run, App, Finished, Running, Session, Snapshot,
};

/// Why a scenario failed: a message meant to be read as is (Debug prints it verbatim, so a test
/// returning `Err` shows the whole multi-line report).
pub struct Failure(String);

pub type Result<T> = std::result::Result<T, Failure>;

impl Failure {
    pub fn new(msg: impl Into<String>) -> Failure {
        Failure(msg.into())
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure(e.to_string())
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Failure {
        Failure(s)
    }
}

impl From<&str> for Failure {
    fn from(s: &str) -> Failure {
        Failure(s.to_string())
    }
}

/// Adds what was being done to an error.
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Failure(format!("{what}: {e}")))
    }
}

/// `return Err(Failure)` with a formatted message.
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::Failure::new(format!($($t)*)))
    };
}
