//! The shim's settings (`SNAPSHIM_*`), defined once: names, defaults, parsing and the warnings
//! for bad values ([`Settings::parse`], used by the shim at start-up), and the environment
//! `snapshim run` passes on ([`RunSettings::env`]), so the shim and the tools can never disagree
//! about what a value means.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// The variables, by name.
pub const DIR: &str = "SNAPSHIM_DIR";
pub const NAME: &str = "SNAPSHIM_NAME";
pub const SIGNAL: &str = "SNAPSHIM_SIGNAL";
pub const INTERVAL: &str = "SNAPSHIM_INTERVAL";
pub const KEEP: &str = "SNAPSHIM_KEEP";
pub const COW: &str = "SNAPSHIM_COW";
pub const INCREMENTAL: &str = "SNAPSHIM_INCREMENTAL";
pub const FULL_EVERY: &str = "SNAPSHIM_FULL_EVERY";
pub const FULL_FRACTION: &str = "SNAPSHIM_FULL_FRACTION";
pub const FAULT_AROUND: &str = "SNAPSHIM_FAULT_AROUND";
pub const COPY_AHEAD: &str = "SNAPSHIM_COPY_AHEAD";
pub const KEEP_STORE: &str = "SNAPSHIM_KEEP_STORE";
pub const HUGEPAGES: &str = "SNAPSHIM_HUGEPAGES";
pub const TWIN_FULL: &str = "SNAPSHIM_TWIN_FULL";
/// `SNAPSHIM_TCP_ESTABLISHED=1`: each checkpoint also captures the state of established TCP
/// connections with `TCP_REPAIR` (needs CAP_NET_ADMIN), so that `snapshim-restore
/// --tcp-established` can make them again alive; set by `snapshim run --tcp-established`.
pub const TCP_ESTABLISHED: &str = "SNAPSHIM_TCP_ESTABLISHED";
/// Set by `snapshim run` to its PID, which the program keeps: the shim of the process with
/// that PID says on stderr where its images go (again after each `exec`, as a script becomes
/// its interpreter); the programs it starts, with other PIDs, do not.
pub const ANNOUNCE: &str = "SNAPSHIM_ANNOUNCE";
/// `SNAPSHIM_GROUP=NAME` (`snapshim run --group NAME`): the program is a member of the
/// consistency group NAME, which `snapshim checkpoint --group NAME` checkpoints at one instant.
/// Only the tools read it (in `/proc/PID/environ`); the shim does not need to.
pub const GROUP: &str = "SNAPSHIM_GROUP";

/// Image directory when `SNAPSHIM_DIR` is not set (relative to the program's working directory).
pub const DEFAULT_DIR: &str = "snapshim-images";
/// Images kept when `SNAPSHIM_KEEP` is not set.
pub const DEFAULT_KEEP: u64 = 3;
/// `SNAPSHIM_FULL_EVERY` and `SNAPSHIM_FULL_FRACTION` when not set.
pub const DEFAULT_FULL_EVERY: u64 = 8;
pub const DEFAULT_FULL_FRACTION: f64 = 0.5;
/// The largest block the uffd engine saves around a write fault (`SNAPSHIM_FAULT_AROUND`).
pub const DEFAULT_FAULT_AROUND: u64 = 2 << 20;
/// Whether the uffd engine keeps its copy store between checkpoints (`SNAPSHIM_KEEP_STORE`):
/// no, the process's resident memory is back to what it was after each checkpoint (see
/// docs/benchmarks.md for what keeping it gains periodic checkpoints).
pub const DEFAULT_KEEP_STORE: bool = false;

/// `SNAPSHIM_COW`: the copy-on-write engine asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cow {
    /// The best one available: `uffd` where the process may use userfaultfd, else `fork`.
    Auto,
    Stop,
    Fork,
    Uffd,
}

/// `SNAPSHIM_INCREMENTAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incremental {
    /// Every image is a full one.
    Off,
    /// Delta images between full ones; the program takes a full image when the policy says so.
    On,
    /// Delta images; when the policy calls for a full image, a background `snapshim merge`
    /// folds the chain into one instead, while the program runs.
    Merge,
}

/// `SNAPSHIM_COPY_AHEAD`: whether the uffd engine's writer copies ahead of the program while
/// the device writes: when the program writes all over unsaved memory (`auto`), never (`off`),
/// or always (`always`, a testing aid: every flush takes that path).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CopyAhead {
    Auto,
    Off,
    Always,
}

/// The settings as the shim reads them from its environment at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `SNAPSHIM_DIR` (may be relative: to the program's working directory).
    pub dir: PathBuf,
    /// `SNAPSHIM_NAME`; None: the executable's file name.
    pub name: Option<String>,
    /// `SNAPSHIM_SIGNAL`, default [`default_signal`] (SIGRTMAX).
    pub signal: i32,
    /// `SNAPSHIM_INTERVAL` in milliseconds.
    pub interval_ms: Option<u64>,
    pub keep: u64,
    pub cow: Cow,
    pub incremental: Incremental,
    pub full_every: u64,
    pub full_fraction: f64,
    /// `SNAPSHIM_FAULT_AROUND` in bytes (given in KiB, at least 4); None: the engine's default.
    pub fault_around: Option<u64>,
    /// `SNAPSHIM_COPY_AHEAD`; None: not set (or not understood), the engine's default (auto).
    pub copy_ahead: Option<CopyAhead>,
    /// `SNAPSHIM_KEEP_STORE`: the uffd engine keeps its copy store (the memory it copies pages
    /// into during a flush) for the next checkpoint, given back lazily (`MADV_FREE`: it counts
    /// in the process's resident memory until the kernel needs it), instead of unmapping it
    /// after each flush.
    pub keep_store: bool,
    pub hugepages: bool,
    /// `SNAPSHIM_TWIN_FULL=1` (a testing aid): each delta also gets a full image of the same
    /// instant, `ckpt-N.twin` (not an image name: outside listings and retention).
    pub twin_full: bool,
    /// `SNAPSHIM_TCP_ESTABLISHED=1`: capture established TCP connections with `TCP_REPAIR`.
    pub tcp_established: bool,
    /// `SNAPSHIM_ANNOUNCE=PID`.
    pub announce: Option<u32>,
}

impl Settings {
    /// Reads the settings through `get` (the environment, in the shim). Empty values count as
    /// unset. Returns the settings and, in order, a warning for each value it could not use
    /// (the default is used instead); or, if checkpoints cannot run at all with these settings,
    /// why.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<(Settings, Vec<String>), String> {
        let env = |k: &str| get(k).filter(|v| !v.is_empty());
        let mut warnings = Vec::new();
        let dir = env(DIR)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        let name = env(NAME);
        let signal = match env(SIGNAL) {
            None => default_signal(),
            Some(s) => match parse_signal(&s) {
                Ok(n) => n,
                Err(_) => {
                    return Err(format!(
                        "{SIGNAL}={s} is not a signal snapshim can use; checkpoints are off"
                    ))
                }
            },
        };
        let interval_ms = match env(INTERVAL) {
            None => None,
            Some(s) => match parse_interval_ms(&s) {
                Some(ms) => Some(ms),
                None => {
                    warnings.push(format!(
                        "{INTERVAL}={s} is not a duration (like 30s, 10m); ignored"
                    ));
                    None
                }
            },
        };
        let keep = env(KEEP)
            .and_then(|s| s.parse().ok())
            .unwrap_or(DEFAULT_KEEP);
        let cow = match env(COW).as_deref() {
            None | Some("auto") => Cow::Auto,
            Some("fork") => Cow::Fork,
            Some("stop") => Cow::Stop,
            Some("uffd") => Cow::Uffd,
            Some(other) => {
                warnings.push(format!(
                    "{COW}={other} is not an engine (auto, uffd, fork, stop); using auto"
                ));
                Cow::Auto
            }
        };
        let incremental = match env(INCREMENTAL).as_deref() {
            None | Some("0") | Some("off") => Incremental::Off,
            Some("1") | Some("on") => Incremental::On,
            Some("merge") => Incremental::Merge,
            Some(other) => {
                warnings.push(format!(
                    "{INCREMENTAL}={other} is not a mode (off, on, merge); using off"
                ));
                Incremental::Off
            }
        };
        let full_every = env(FULL_EVERY)
            .and_then(|s| s.parse().ok())
            .filter(|&n: &u64| n >= 1)
            .unwrap_or(DEFAULT_FULL_EVERY);
        let full_fraction = env(FULL_FRACTION)
            .and_then(|s| s.parse().ok())
            .filter(|f: &f64| *f > 0.0)
            .unwrap_or(DEFAULT_FULL_FRACTION);
        let fault_around = match env(FAULT_AROUND) {
            None => None,
            Some(v) => match v.parse::<u64>() {
                Ok(kib) if kib >= 4 => Some(kib << 10),
                _ => {
                    warnings.push(format!(
                        "{FAULT_AROUND}={v} is not a size in KiB (4 or more); using {}",
                        DEFAULT_FAULT_AROUND >> 10
                    ));
                    None
                }
            },
        };
        let copy_ahead = match env(COPY_AHEAD).as_deref() {
            None | Some("auto") => Some(CopyAhead::Auto),
            Some("off") | Some("0") => Some(CopyAhead::Off),
            Some("always") => Some(CopyAhead::Always),
            Some(other) => {
                warnings.push(format!(
                    "{COPY_AHEAD}={other} is not a choice (auto, off, always); using auto"
                ));
                None
            }
        };
        let keep_store = match env(KEEP_STORE).as_deref() {
            None => DEFAULT_KEEP_STORE,
            Some("1") | Some("on") => true,
            Some("0") | Some("off") => false,
            Some(other) => {
                warnings.push(format!(
                    "{KEEP_STORE}={other} is not 0 or 1; using {}",
                    DEFAULT_KEEP_STORE as u8
                ));
                DEFAULT_KEEP_STORE
            }
        };
        let settings = Settings {
            dir,
            name,
            signal,
            interval_ms,
            keep,
            cow,
            incremental,
            full_every,
            full_fraction,
            fault_around,
            copy_ahead,
            keep_store,
            hugepages: env(HUGEPAGES).is_some_and(|v| v != "0"),
            twin_full: env(TWIN_FULL).is_some_and(|v| v != "0"),
            tcp_established: env(TCP_ESTABLISHED).is_some_and(|v| v != "0"),
            announce: env(ANNOUNCE).and_then(|v| v.parse().ok()),
        };
        Ok((settings, warnings))
    }
}

/// What `snapshim run` passes on to the shim: the values as given on its command line (the shim
/// parses and checks them, with [`Settings::parse`]); None: not passed (the shim's default, or
/// what the environment already says).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSettings {
    pub dir: Option<PathBuf>,
    pub name: Option<String>,
    pub interval: Option<String>,
    pub signal: Option<String>,
    pub keep: Option<u64>,
    pub incremental: Option<String>,
    pub full_every: Option<u64>,
    pub full_fraction: Option<f64>,
    pub keep_store: Option<bool>,
    /// `SNAPSHIM_TCP_ESTABLISHED=1` (`snapshim run --tcp-established`).
    pub tcp_established: bool,
    /// The PID whose shim says where its images go (`snapshim run`'s own).
    pub announce: Option<u32>,
    /// `SNAPSHIM_GROUP` (`snapshim run --group`).
    pub group: Option<String>,
}

impl RunSettings {
    /// The environment variables to set, in a fixed order.
    pub fn env(&self) -> Vec<(&'static str, OsString)> {
        let mut v: Vec<(&'static str, OsString)> = Vec::new();
        if let Some(d) = &self.dir {
            v.push((DIR, d.clone().into_os_string()));
        }
        if let Some(n) = &self.name {
            v.push((NAME, n.into()));
        }
        if let Some(i) = &self.interval {
            v.push((INTERVAL, i.into()));
        }
        if let Some(s) = &self.signal {
            v.push((SIGNAL, s.into()));
        }
        if let Some(k) = self.keep {
            v.push((KEEP, k.to_string().into()));
        }
        if let Some(m) = &self.incremental {
            v.push((INCREMENTAL, m.into()));
        }
        if let Some(n) = self.full_every {
            v.push((FULL_EVERY, n.to_string().into()));
        }
        if let Some(f) = self.full_fraction {
            v.push((FULL_FRACTION, f.to_string().into()));
        }
        if let Some(k) = self.keep_store {
            v.push((KEEP_STORE, if k { "1" } else { "0" }.into()));
        }
        if self.tcp_established {
            v.push((TCP_ESTABLISHED, "1".into()));
        }
        if let Some(pid) = self.announce {
            v.push((ANNOUNCE, pid.to_string().into()));
        }
        if let Some(g) = &self.group {
            v.push((GROUP, g.into()));
        }
        v
    }
}

/// `SNAPSHIM_INTERVAL` in milliseconds (at least 1).
pub fn parse_interval_ms(s: &str) -> Option<u64> {
    let d = parse_duration(s).ok()?;
    Some(d.as_millis() as u64).filter(|&ms| ms > 0)
}

/// Parses a duration the way `SNAPSHIM_INTERVAL` and `--timeout` accept it: a non-negative
/// decimal number with an optional unit `ms`, `s`, `m` or `h`; a plain number means seconds.
///
/// ```text
/// 30s  10m  1h  500ms  90  1.5h
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "'{s}' is not a duration: the unit must be ms, s, m or h (e.g. 30s, 10m, 1h)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 30s, 10m, 1h, 500ms, or seconds)"))?;
    let secs = value * scale;
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("'{s}' is too long a duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Standard signal names, without the `SIG` prefix, for display.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// The signal names accepted in `SNAPSHIM_SIGNAL`.
pub const TRIGGER_NAMES: &[&str] = &["USR1", "USR2", "HUP", "PWR", "WINCH", "URG"];

/// Signals the shim refuses as a trigger: uncatchable, or raised by faults and by the C library.
const FORBIDDEN: &[i32] = &[
    libc::SIGKILL,
    libc::SIGSTOP,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
    libc::SIGCHLD,
];

/// Parses `SNAPSHIM_SIGNAL`:
/// `USR2` or `SIGUSR2` (also USR1, HUP, PWR, WINCH, URG; upper case), `RTMIN+n` or `RTMAX-n`
/// (relative to this C library's `SIGRTMIN`, the one the shim runs on), or a number; not a
/// signal that cannot be caught or that faults raise, nor one glibc keeps for itself.
///
/// This may refuse what the shim would take, never the other way round: a value the shim refuses
/// turns its checkpoints off, and the signal would then reach the program unhandled.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    let t = s.trim();
    let bare = t.strip_prefix("SIG").unwrap_or(t);
    let (rtmin, rtmax) = (libc::SIGRTMIN(), libc::SIGRTMAX());
    let not_a_signal = || {
        format!(
            "'{s}' is not a checkpoint signal (USR2, SIGUSR1, HUP, PWR, WINCH, URG, RTMIN+n, \
             RTMAX-n, or a number)"
        )
    };
    let signo = if let Ok(n) = bare.parse::<i32>() {
        n
    } else if let Some(rest) = bare.strip_prefix("RTMIN") {
        rtmin + rt_offset(rest, '+').ok_or_else(not_a_signal)?
    } else if let Some(rest) = bare.strip_prefix("RTMAX") {
        rtmax - rt_offset(rest, '-').ok_or_else(not_a_signal)?
    } else if TRIGGER_NAMES.contains(&bare) {
        SIGNALS
            .iter()
            .find(|(name, _)| *name == bare)
            .map(|&(_, n)| n)
            .ok_or_else(not_a_signal)?
    } else {
        return Err(not_a_signal());
    };
    if signo < 1 || signo > rtmax {
        return Err(format!("'{s}' is not a signal number (1 to {rtmax})"));
    }
    if FORBIDDEN.contains(&signo) {
        return Err(format!(
            "{} cannot be the checkpoint signal",
            signal_name(signo)
        ));
    }
    if signo > 31 && signo < rtmin {
        return Err(format!("signal {signo} is reserved by the C library"));
    }
    Ok(signo)
}

/// `""` → 0, `"+3"` → 3 (with `sign` `+`), within the real-time range.
fn rt_offset(rest: &str, sign: char) -> Option<i32> {
    if rest.is_empty() {
        return Some(0);
    }
    let n: i32 = rest.strip_prefix(sign)?.parse().ok()?;
    (0..=libc::SIGRTMAX() - libc::SIGRTMIN())
        .contains(&n)
        .then_some(n)
}

/// The checkpoint signal when `SNAPSHIM_SIGNAL` is not set: `SIGRTMAX`, a real-time signal
/// programs leave alone. (It was SIGUSR2, which HotSpot and ruby handle themselves: their
/// handlers never ran under the shim.) The quiesce signal is then `SIGRTMAX-1`, as before.
pub fn default_signal() -> i32 {
    libc::SIGRTMAX()
}

/// The symbol a shim exports when its checkpoint signal, without `SNAPSHIM_SIGNAL`, is
/// [`default_signal`]; an older shim without it uses SIGUSR2. `snapshim checkpoint` picks the
/// signal it checks and sends by it.
pub const RT_DEFAULT_SYMBOL: &str = "snapshim_checkpoint_signal_is_sigrtmax";

/// The shim's second signal, given its checkpoint signal `trigger`: `SIGRTMAX-1`, or `SIGRTMAX-2`
/// when the checkpoint signal is `SIGRTMAX-1`. The shim parks threads with it for a snapshot
/// (sent with `tgkill`), and `snapshim checkpoint` sends its requests with it (`sigqueue`): a
/// real-time signal queues, so concurrent requests are never merged as two pending instances of
/// a standard signal such as SIGUSR2 are. The shim and the tools both take it from here.
pub fn quiesce_signal(trigger: i32) -> i32 {
    let q = libc::SIGRTMAX() - 1;
    if q == trigger {
        q - 1
    } else {
        q
    }
}

/// The symbol a shim exports when it takes `snapshim checkpoint`'s requests on its
/// [`quiesce_signal`]. The tool looks for it in the library the program has mapped; a shim
/// without it (an older one, still running in a program started before an upgrade) ignores a
/// request sent that way, and is sent the checkpoint signal instead, as it expects.
pub const QUEUED_REQUESTS_SYMBOL: &str = "snapshim_requests_on_quiesce_signal";

/// The symbol a shim exports when it stops the program after a checkpoint asked with
/// [`STOP_AFTER_BIT`] (`snapshim checkpoint --kill`): the program stays parked from the pause
/// to the commit, then its live TCP connections are left silently and it is killed. For a shim
/// without it the tool kills the program itself once the image is committed.
pub const STOP_AFTER_SYMBOL: &str = "snapshim_stops_after_request";

/// In the descriptor half of a request's value (`sigqueue`): this checkpoint is the program's
/// last (`--kill`). Descriptor numbers never reach it.
pub const STOP_AFTER_BIT: u32 = 1 << 30;

/// The symbol a shim exports when it takes part in group checkpoints: a request whose value
/// has [`GROUP_BIT`] makes it meet the coordinator on the abstract socket
/// [`group_socket_name`]`(token)` once its threads are parked, and capture only when told `go`.
/// `snapshim checkpoint --group` refuses a member whose shim does not export it.
pub const GROUP_SYMBOL: &str = "snapshim_joins_group_checkpoints";

/// In the low half of a request's value: a group checkpoint; the high 32 bits are the
/// coordinator's token (see [`GROUP_SYMBOL`]). Descriptor numbers never reach it.
pub const GROUP_BIT: u32 = 1 << 29;

/// The abstract Unix socket name (without its leading NUL) on which the coordinator of a group
/// checkpoint with `token` listens. Abstract names live in the network namespace, which a
/// restored program shares with us even in its own PID and user namespaces.
pub fn group_socket_name(token: u32) -> String {
    format!("snapshim-group:{token:08x}")
}

/// The group protocol's lines. A member writes [`GROUP_READY`] once its image file is created
/// and its memory prepared (before its pause), and waits for [`GROUP_STOP`], which the
/// coordinator sends when every member is ready: the members' pauses then start together and
/// no member waits, stopped, while another prepares. Then it parks its threads, writes
/// [`GROUP_PARKED`] and waits for [`GROUP_GO`], sent when every member is parked: the instant of
/// the set. After the commit the member writes its usual reply line (`ok path=...` or
/// `err ...`) and closes.
pub const GROUP_READY: &[u8] = b"ready\n";
/// See [`GROUP_READY`].
pub const GROUP_STOP: &[u8] = b"stop\n";
/// See [`GROUP_READY`].
pub const GROUP_PARKED: &[u8] = b"parked\n";
/// See [`GROUP_READY`].
pub const GROUP_GO: &[u8] = b"go\n";

/// The usual name of a signal number: `SIGUSR2`, `SIGRTMIN+3`, or `SIG32` for numbers without
/// a name.
pub fn signal_name(signo: i32) -> String {
    if let Some((name, _)) = SIGNALS.iter().find(|&&(_, n)| n == signo) {
        return format!("SIG{name}");
    }
    let rtmin = libc::SIGRTMIN();
    if signo >= rtmin && signo <= libc::SIGRTMAX() {
        return match signo - rtmin {
            0 => "SIGRTMIN".into(),
            k => format!("SIGRTMIN+{k}"),
        };
    }
    format!("SIG{signo}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<(Settings, Vec<String>), String> {
        Settings::parse(|k| {
            pairs
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        let (s, warnings) = parse(&[]).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(s.dir, PathBuf::from(DEFAULT_DIR));
        assert_eq!(s.name, None);
        assert_eq!(s.signal, libc::SIGRTMAX());
        assert_eq!(quiesce_signal(s.signal), libc::SIGRTMAX() - 1);
        assert_eq!(s.interval_ms, None);
        assert_eq!(s.keep, DEFAULT_KEEP);
        assert_eq!(s.cow, Cow::Auto);
        assert_eq!(s.incremental, Incremental::Off);
        assert_eq!(s.full_every, DEFAULT_FULL_EVERY);
        assert_eq!(s.full_fraction, DEFAULT_FULL_FRACTION);
        assert_eq!(s.fault_around, None);
        assert_eq!(s.copy_ahead, Some(CopyAhead::Auto));
        assert_eq!(s.keep_store, DEFAULT_KEEP_STORE);
        assert!(!s.keep_store, "the copy store is given back by default");
        assert!(!s.hugepages && !s.twin_full && !s.tcp_established);
    }

    #[test]
    fn empty_values_count_as_unset() {
        let (s, warnings) = parse(&[(SIGNAL, ""), (COW, ""), (DIR, "")]).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(s, parse(&[]).unwrap().0);
    }

    #[test]
    fn values_are_parsed() {
        let (s, warnings) = parse(&[
            (DIR, "/tmp/x"),
            (NAME, "solver"),
            (SIGNAL, "USR1"),
            (INTERVAL, "1.5s"),
            (KEEP, "5"),
            (COW, "fork"),
            (INCREMENTAL, "merge"),
            (FULL_EVERY, "4"),
            (FULL_FRACTION, "0.25"),
            (FAULT_AROUND, "64"),
            (COPY_AHEAD, "always"),
            (KEEP_STORE, "1"),
            (HUGEPAGES, "1"),
            (TWIN_FULL, "0"),
        ])
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(s.dir, PathBuf::from("/tmp/x"));
        assert_eq!(s.name.as_deref(), Some("solver"));
        assert_eq!(s.signal, libc::SIGUSR1);
        assert_eq!(s.interval_ms, Some(1500));
        assert_eq!(s.keep, 5);
        assert_eq!(s.cow, Cow::Fork);
        assert_eq!(s.incremental, Incremental::Merge);
        assert_eq!((s.full_every, s.full_fraction), (4, 0.25));
        assert_eq!(s.fault_around, Some(64 << 10));
        assert_eq!(s.copy_ahead, Some(CopyAhead::Always));
        assert!(s.keep_store);
        assert!(s.hugepages && !s.twin_full);
    }

    #[test]
    fn bad_values_warn_in_order_and_fall_back() {
        let (s, warnings) = parse(&[
            (INTERVAL, "soon"),
            (COW, "magic"),
            (INCREMENTAL, "maybe"),
            (FULL_EVERY, "0"),
            (FAULT_AROUND, "2"),
            (COPY_AHEAD, "sometimes"),
            (KEEP_STORE, "yes"),
        ])
        .unwrap();
        assert_eq!(
            warnings,
            [
                "SNAPSHIM_INTERVAL=soon is not a duration (like 30s, 10m); ignored",
                "SNAPSHIM_COW=magic is not an engine (auto, uffd, fork, stop); using auto",
                "SNAPSHIM_INCREMENTAL=maybe is not a mode (off, on, merge); using off",
                "SNAPSHIM_FAULT_AROUND=2 is not a size in KiB (4 or more); using 2048",
                "SNAPSHIM_COPY_AHEAD=sometimes is not a choice (auto, off, always); using auto",
                "SNAPSHIM_KEEP_STORE=yes is not 0 or 1; using 0",
            ]
        );
        assert_eq!(s.interval_ms, None);
        assert_eq!(s.cow, Cow::Auto);
        assert_eq!(s.incremental, Incremental::Off);
        assert_eq!(s.full_every, DEFAULT_FULL_EVERY);
        assert_eq!(s.fault_around, None);
        assert_eq!(s.copy_ahead, None);
        assert!(!s.keep_store);
    }

    #[test]
    fn a_bad_signal_turns_checkpoints_off() {
        assert_eq!(
            parse(&[(SIGNAL, "KILL"), (COW, "magic")]).unwrap_err(),
            "SNAPSHIM_SIGNAL=KILL is not a signal snapshim can use; checkpoints are off"
        );
    }

    #[test]
    fn the_quiesce_signal_is_real_time_and_never_the_trigger() {
        let rtmax = libc::SIGRTMAX();
        assert_eq!(quiesce_signal(libc::SIGUSR2), rtmax - 1);
        assert_eq!(quiesce_signal(rtmax), rtmax - 1);
        assert_eq!(quiesce_signal(rtmax - 1), rtmax - 2);
        for trigger in [
            libc::SIGUSR1,
            libc::SIGHUP,
            libc::SIGRTMIN(),
            rtmax - 1,
            rtmax,
        ] {
            let q = quiesce_signal(trigger);
            assert!(q != trigger && q >= libc::SIGRTMIN(), "{trigger} -> {q}");
        }
    }

    #[test]
    fn run_settings_round_trip() {
        let run = RunSettings {
            dir: Some(PathBuf::from("/srv/ckpt")),
            name: Some("job".into()),
            interval: Some("10m".into()),
            signal: Some("SIGHUP".into()),
            keep: Some(7),
            incremental: Some("on".into()),
            full_every: Some(3),
            full_fraction: Some(0.75),
            keep_store: Some(true),
            tcp_established: true,
            announce: Some(77),
            group: Some("web".into()),
        };
        let env = run.env();
        let (s, warnings) = Settings::parse(|k| {
            env.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        })
        .unwrap();
        assert!(warnings.is_empty());
        assert_eq!(s.dir, PathBuf::from("/srv/ckpt"));
        assert_eq!(s.name.as_deref(), Some("job"));
        assert_eq!(s.interval_ms, Some(600_000));
        assert_eq!(s.signal, libc::SIGHUP);
        assert_eq!(s.keep, 7);
        assert_eq!(s.announce, Some(77));
        assert!(s.tcp_established);
        assert_eq!(s.incremental, Incremental::On);
        assert_eq!((s.full_every, s.full_fraction), (3, 0.75));
        assert!(s.keep_store);
        assert!(RunSettings::default().env().is_empty());
    }
}
