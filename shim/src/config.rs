//! Settings read once at start-up from the environment (never again: the app may change it).

use std::path::PathBuf;
use std::sync::OnceLock;

#[derive(Debug)]
pub struct Config {
    /// `$SNAPSHIM_DIR/$SNAPSHIM_NAME`: where this program's images go.
    pub image_dir: PathBuf,
    pub name: String,
    pub trigger_signal: i32,
    pub quiesce_signal: i32,
    pub interval_ms: Option<u64>,
    pub keep: u64,
    pub engine: crate::writer::Engine,
    /// `SNAPSHIM_INCREMENTAL`, `SNAPSHIM_FULL_EVERY`, `SNAPSHIM_FULL_FRACTION` (see track.rs).
    pub incremental: crate::track::Mode,
    pub full_every: u64,
    pub full_fraction: f64,
    /// `SNAPSHIM_TWIN_FULL=1` (a testing aid): each delta also gets a full image of the same
    /// instant, `ckpt-N.twin` (not an image name: outside listings and retention).
    pub twin_full: bool,
    pub exe: String,
    pub cmdline: Vec<String>,
    pub shim_path: String,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

pub fn init(c: Config) -> &'static Config {
    CONFIG.get_or_init(|| c)
}

/// `SNAPSHIM_SIGNAL`: one parser for the shim and the tools.
pub fn parse_signal(s: &str) -> Option<i32> {
    snapshim_image::settings::parse_signal(s).ok()
}

/// `SNAPSHIM_INTERVAL` in milliseconds (at least 1).
pub fn parse_interval(s: &str) -> Option<u64> {
    let d = snapshim_image::settings::parse_duration(s).ok()?;
    Some(d.as_millis() as u64).filter(|&ms| ms > 0)
}
