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
    pub exe: String,
    pub cmdline: Vec<String>,
    pub shim_path: String,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

pub fn get() -> Option<&'static Config> {
    CONFIG.get()
}

pub fn init(c: Config) -> &'static Config {
    CONFIG.get_or_init(|| c)
}

/// Parses a signal given as a number, `USR2`, `SIGUSR2`, `RTMIN+3` or `RTMAX-1`.
pub fn parse_signal(s: &str) -> Option<i32> {
    let s = s.trim();
    let s = s.strip_prefix("SIG").unwrap_or(s);
    let (rtmin, rtmax) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let n = if let Ok(n) = s.parse::<i32>() {
        n
    } else if let Some(rest) = s.strip_prefix("RTMIN") {
        rtmin + rest.strip_prefix('+').map_or(Some(0), |k| k.parse().ok())?
    } else if let Some(rest) = s.strip_prefix("RTMAX") {
        rtmax - rest.strip_prefix('-').map_or(Some(0), |k| k.parse().ok())?
    } else {
        match s {
            "USR1" => libc::SIGUSR1,
            "USR2" => libc::SIGUSR2,
            "HUP" => libc::SIGHUP,
            "PWR" => libc::SIGPWR,
            "WINCH" => libc::SIGWINCH,
            "URG" => libc::SIGURG,
            _ => return None,
        }
    };
    // Signals that cannot be caught or that glibc keeps for itself are refused.
    let forbidden = [
        libc::SIGKILL,
        libc::SIGSTOP,
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGABRT,
        libc::SIGCHLD,
    ];
    ((1..=rtmax).contains(&n) && !forbidden.contains(&n) && !(32..rtmin).contains(&n)).then_some(n)
}

/// Parses `500ms`, `30s`, `10m`, `1h` or plain seconds into milliseconds.
pub fn parse_interval(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (s, 1000)
    };
    let v: f64 = num.trim().parse().ok()?;
    (v > 0.0 && v.is_finite())
        .then(|| (v * mult as f64) as u64)
        .filter(|&ms| ms > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn signals() {
        assert_eq!(parse_signal("USR2"), Some(libc::SIGUSR2));
        assert_eq!(parse_signal("SIGUSR1"), Some(libc::SIGUSR1));
        assert_eq!(parse_signal("RTMIN+2"), Some(libc::SIGRTMIN() + 2));
        assert_eq!(parse_signal("12"), Some(12));
        assert_eq!(parse_signal("KILL"), None);
        assert_eq!(parse_signal("9"), None);
        assert_eq!(parse_signal("33"), None);
    }
    #[test]
    fn intervals() {
        assert_eq!(parse_interval("500ms"), Some(500));
        assert_eq!(parse_interval("30s"), Some(30_000));
        assert_eq!(parse_interval("10m"), Some(600_000));
        assert_eq!(parse_interval("2"), Some(2000));
        assert_eq!(parse_interval("0"), None);
        assert_eq!(parse_interval("x"), None);
    }
}
