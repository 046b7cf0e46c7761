//! The shim's configuration: the settings read once at start-up from the environment (never
//! again: the program may change it), as `snapshim_image::settings` defines them, plus what the
//! process is. Imports no other module of the shim.

use std::path::PathBuf;
use std::sync::OnceLock;

pub use snapshim_image::settings::{CopyAhead, Cow, Incremental, Settings};

#[derive(Debug)]
pub struct Config {
    /// `$SNAPSHIM_DIR/$SNAPSHIM_NAME`: where this program's images go.
    pub image_dir: PathBuf,
    pub name: String,
    /// The user named the image directory (`SNAPSHIM_NAME`): if another instance holds it,
    /// checkpoints are refused instead of going to a directory beside it (see owner.rs).
    pub name_given: bool,
    /// `snapshim run` started this process (`SNAPSHIM_ANNOUNCE` is its PID): the shim says
    /// where the images go at start-up.
    pub announce: bool,
    pub trigger_signal: i32,
    pub quiesce_signal: i32,
    pub interval_ms: Option<u64>,
    pub keep: u64,
    pub engine: Cow,
    /// `SNAPSHIM_INCREMENTAL`, `SNAPSHIM_FULL_EVERY`, `SNAPSHIM_FULL_FRACTION` (see
    /// incremental/).
    pub incremental: Incremental,
    pub full_every: u64,
    pub full_fraction: f64,
    /// `SNAPSHIM_TWIN_FULL=1` (a testing aid): each delta also gets a full image of the same
    /// instant, `ckpt-N.twin` (not an image name: outside listings and retention).
    pub twin_full: bool,
    /// `SNAPSHIM_TCP_ESTABLISHED=1`: established TCP connections are captured alive.
    pub tcp_established: bool,
    pub exe: String,
    pub cmdline: Vec<String>,
    pub shim_path: String,
}

impl Config {
    /// The configuration of this process: `s` as read at start-up, its executable (as
    /// `/proc/self/exe` says), command line and this library's path.
    pub fn new(s: &Settings, exe: String, cmdline: Vec<String>, shim_path: String) -> Config {
        let base = if s.dir.is_absolute() {
            s.dir.clone()
        } else {
            std::env::current_dir().unwrap_or_default().join(&s.dir)
        };
        let name = s.name.clone().unwrap_or_else(|| {
            exe.rsplit('/')
                .next()
                .unwrap_or("program")
                .trim_end_matches(" (deleted)")
                .to_string()
        });
        Config {
            image_dir: base.join(&name),
            name,
            name_given: s.name.is_some(),
            announce: s.announce == Some(std::process::id()),
            trigger_signal: s.signal,
            // The internal quiesce signal, which also carries `snapshim checkpoint`'s requests.
            quiesce_signal: snapshim_image::settings::quiesce_signal(s.signal),
            interval_ms: s.interval_ms,
            keep: s.keep,
            engine: s.cow,
            incremental: s.incremental,
            full_every: s.full_every,
            full_fraction: s.full_fraction,
            twin_full: s.twin_full,
            tcp_established: s.tcp_established,
            exe,
            cmdline,
            shim_path,
        }
    }

    /// Whether images may be deltas, which depend on older images (retention follows chains).
    pub fn chains(&self) -> bool {
        self.incremental != Incremental::Off
    }
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// Keeps the configuration for the life of the process.
pub fn init(c: Config) -> &'static Config {
    CONFIG.get_or_init(|| c)
}
