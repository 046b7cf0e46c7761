//! Pure parsing and formatting helpers: durations, signal names, the shim's reply line, sizes
//! and times. No I/O here, so every function is unit-tested beside its code.

use std::time::Duration;

#[cfg(test)]
use snapshim_image::settings::TRIGGER_NAMES;
pub use snapshim_image::settings::{parse_duration, parse_signal, signal_name};

/// A duration for `--interval`: valid and not zero. Returns the text unchanged, since it is
/// passed to the shim as given.
pub fn interval_arg(s: &str) -> Result<String, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(1) {
        return Err("the interval must be at least 1ms".into());
    }
    Ok(s.trim().to_string())
}

/// A checkpoint signal for `--signal`: one the shim accepts as `SNAPSHIM_SIGNAL`, in any case.
/// Returns the text in upper case (`usr1` becomes `USR1`), the form the shim reads.
pub fn signal_arg(s: &str) -> Result<String, String> {
    let upper = s.trim().to_ascii_uppercase();
    parse_signal(&upper)?;
    Ok(upper)
}

/// What the shim wrote back to `snapshim checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Committed(Committed),
    Failed(String),
}

/// The statistics of a committed checkpoint, from an `ok` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub path: String,
    /// Size of the image file.
    pub bytes: u64,
    pub pause_us: u64,
    pub total_us: u64,
    /// Resident memory of the process at the checkpoint.
    pub resident: u64,
    /// Time from the program's release to the commit, and the copy-on-write engine (shims that
    /// report them).
    pub flush_us: Option<u64>,
    pub engine: Option<String>,
    /// Pages the program copied before the writer stored them.
    pub copied: Option<u64>,
    /// `full` or `delta` (shims with incremental checkpoints).
    pub kind: Option<String>,
}

/// Parses the shim's one-line reply (without or with its newline):
///
/// ```text
/// ok path=<abs image path> bytes=<n> pause_us=<n> total_us=<n> resident=<n>
/// err <message>
/// ```
///
/// The path may contain spaces, so the numeric `key=value` fields are taken from the right;
/// unknown numeric fields are ignored, so the shim may add some later.
pub fn parse_reply(line: &str) -> Result<Reply, String> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line == "err" {
        return Ok(Reply::Failed("no reason given".into()));
    }
    if let Some(msg) = line.strip_prefix("err ") {
        let msg = msg.trim();
        return Ok(Reply::Failed(if msg.is_empty() {
            "no reason given".into()
        } else {
            msg.to_string()
        }));
    }
    let garbage = || format!("unexpected reply from the shim: {line:?}");
    let rest = line.strip_prefix("ok ").ok_or_else(garbage)?;
    let (mut bytes, mut pause_us, mut total_us, mut resident) = (None, None, None, None);
    let (mut flush_us, mut engine, mut copied, mut kind) = (None, None, None, None);
    let mut head = rest;
    while let Some((before, field)) = head.rsplit_once(' ') {
        let Some((key, value)) = field.split_once('=') else {
            break;
        };
        if key.starts_with("path") || !key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            break;
        }
        let slot = match key {
            "bytes" => &mut bytes,
            "pause_us" => &mut pause_us,
            "total_us" => &mut total_us,
            "resident" => &mut resident,
            "flush_us" => &mut flush_us,
            "copied" => &mut copied,
            "engine" | "kind" => {
                let text = if key == "engine" {
                    &mut engine
                } else {
                    &mut kind
                };
                *text = Some(value.to_string());
                head = before;
                continue;
            }
            _ => {
                // A field a newer shim added: skipped, whatever its value.
                head = before;
                continue;
            }
        };
        let Ok(value) = value.parse::<u64>() else {
            break;
        };
        if slot.replace(value).is_some() {
            return Err(garbage());
        }
        head = before;
    }
    let path = head.strip_prefix("path=").ok_or_else(garbage)?;
    match (bytes, pause_us, total_us, resident) {
        (Some(bytes), Some(pause_us), Some(total_us), Some(resident)) if !path.is_empty() => {
            Ok(Reply::Committed(Committed {
                path: path.to_string(),
                bytes,
                pause_us,
                total_us,
                resident,
                flush_us,
                engine,
                copied,
                kind,
            }))
        }
        _ => Err(garbage()),
    }
}

/// `1536` → `1.5 KiB`; bytes below 1 KiB are written exactly.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Microseconds as milliseconds, with the precision that matters at that size.
pub fn format_ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// `YYYY-MM-DD HH:MM:SS` for `ns` nanoseconds since the epoch, shifted by `offset_secs` (the
/// local time zone's offset from UTC).
pub fn format_time(ns: u64, offset_secs: i64) -> String {
    let secs = (ns / 1_000_000_000) as i64 + offset_secs;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day number (days since 1970-01-01), after Howard Hinnant's
/// `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 2s "), Ok(Duration::from_secs(2)));
    }

    #[test]
    fn bad_durations_are_refused() {
        for bad in [
            "",
            "s",
            "10x",
            "ten",
            "-5s",
            "1e3",
            "5 s",
            "1.2.3s",
            "10min",
            "99999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn interval_is_passed_as_given_but_not_zero() {
        assert_eq!(interval_arg("10m"), Ok("10m".to_string()));
        assert_eq!(interval_arg("90"), Ok("90".to_string()));
        assert!(interval_arg("0").is_err());
        assert!(interval_arg("0ms").is_err());
        assert!(interval_arg("0.0001s").is_err());
        assert_eq!(interval_arg("1ms"), Ok("1ms".to_string()));
        assert!(interval_arg("soon").is_err());
    }

    #[test]
    fn signal_names_numbers_and_realtime() {
        assert_eq!(parse_signal("USR2"), Ok(libc::SIGUSR2));
        assert_eq!(parse_signal("SIGUSR2"), Ok(libc::SIGUSR2));
        assert_eq!(parse_signal("SIGUSR1"), Ok(libc::SIGUSR1));
        assert_eq!(parse_signal("HUP"), Ok(libc::SIGHUP));
        assert_eq!(parse_signal(" URG "), Ok(libc::SIGURG));
        assert_eq!(parse_signal("12"), Ok(12));
        assert_eq!(parse_signal("15"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("RTMIN"), Ok(libc::SIGRTMIN()));
        assert_eq!(parse_signal("RTMIN+3"), Ok(libc::SIGRTMIN() + 3));
        assert_eq!(parse_signal("SIGRTMIN+3"), Ok(libc::SIGRTMIN() + 3));
        assert_eq!(parse_signal("RTMAX-1"), Ok(libc::SIGRTMAX() - 1));
        assert_eq!(parse_signal("RTMAX"), Ok(libc::SIGRTMAX()));
    }

    #[test]
    fn unusable_signals_are_refused() {
        for bad in [
            "", "0", "-1", "65", "KILL", "SIGSTOP", "9", "19", "USR3", "RTMIN-1", "RTMIN+99",
            "RTMAX+1", "RTMIN3", "32", "SIG", "SEGV", "11", "CHLD", "ABRT", "TERM", "INT",
            // The shim reads names in upper case only.
            "usr1", "sigusr2",
        ] {
            assert!(parse_signal(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn signal_arg_is_upper_cased() {
        assert_eq!(signal_arg("usr1"), Ok("USR1".to_string()));
        assert_eq!(signal_arg("rtmin+2"), Ok("RTMIN+2".to_string()));
        assert!(signal_arg("kill").is_err());
        assert!(signal_arg("term").is_err());
    }

    #[test]
    fn signal_names_round_trip() {
        assert_eq!(signal_name(libc::SIGUSR2), "SIGUSR2");
        assert_eq!(signal_name(libc::SIGIO), "SIGIO");
        assert_eq!(signal_name(libc::SIGRTMIN()), "SIGRTMIN");
        assert_eq!(signal_name(libc::SIGRTMIN() + 3), "SIGRTMIN+3");
        assert_eq!(signal_name(32), "SIG32");
        for name in TRIGGER_NAMES {
            let n = parse_signal(name).unwrap();
            assert_eq!(signal_name(n), format!("SIG{name}"));
        }
        for n in libc::SIGRTMIN()..=libc::SIGRTMAX() {
            assert_eq!(parse_signal(&signal_name(n)), Ok(n));
        }
    }

    #[test]
    fn ok_reply_is_parsed() {
        let r = parse_reply(
            "ok path=/data/img/app/ckpt-00000002.snap bytes=1052672 pause_us=1830 \
             total_us=48211 resident=4194304 flush_us=46381 copied=12 engine=fork kind=delta\n",
        );
        assert_eq!(
            r,
            Ok(Reply::Committed(Committed {
                path: "/data/img/app/ckpt-00000002.snap".into(),
                bytes: 1052672,
                pause_us: 1830,
                total_us: 48211,
                resident: 4194304,
                flush_us: Some(46381),
                engine: Some("fork".into()),
                copied: Some(12),
                kind: Some("delta".into()),
            }))
        );
    }

    #[test]
    fn ok_reply_with_spaces_in_path_and_extra_fields() {
        let r = parse_reply(
            "ok path=/tmp/my images/a=1/ckpt-00000001.snap bytes=1 resident=4 pause_us=2 \
             total_us=3 pages=7 mode=new-words",
        )
        .unwrap();
        let Reply::Committed(c) = r else {
            panic!("not committed: {r:?}")
        };
        assert_eq!(c.path, "/tmp/my images/a=1/ckpt-00000001.snap");
        assert_eq!((c.bytes, c.pause_us, c.total_us, c.resident), (1, 2, 3, 4));
    }

    #[test]
    fn err_reply_carries_the_message() {
        assert_eq!(
            parse_reply("err cannot write /x/.ckpt.tmp: No space left on device\n"),
            Ok(Reply::Failed(
                "cannot write /x/.ckpt.tmp: No space left on device".into()
            ))
        );
        assert_eq!(
            parse_reply("err\n"),
            Ok(Reply::Failed("no reason given".into()))
        );
        assert_eq!(
            parse_reply("err   "),
            Ok(Reply::Failed("no reason given".into()))
        );
    }

    #[test]
    fn garbage_replies_are_refused() {
        for bad in [
            "",
            "\n",
            "ok",
            "OK path=/x bytes=1 pause_us=2 total_us=3 resident=4",
            "ok path=/x bytes=1 pause_us=2 total_us=3",
            "ok path= bytes=1 pause_us=2 total_us=3 resident=4",
            "ok /x bytes=1 pause_us=2 total_us=3 resident=4",
            "ok path=/x bytes=one pause_us=2 total_us=3 resident=4",
            "ok path=/x bytes=1 bytes=1 pause_us=2 total_us=3 resident=4",
            "error: something",
            "\u{0}\u{1}binary",
        ] {
            assert!(parse_reply(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(4 << 20), "4.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn milliseconds_keep_useful_precision() {
        assert_eq!(format_ms(1234), "1.23 ms");
        assert_eq!(format_ms(48_211), "48.2 ms");
        assert_eq!(format_ms(2_500_400), "2500 ms");
    }

    #[test]
    fn times_are_calendar_dates() {
        assert_eq!(format_time(0, 0), "1970-01-01 00:00:00");
        // 2024-02-29 12:34:56 UTC, a leap day.
        assert_eq!(
            format_time(1_709_210_096_000_000_123, 0),
            "2024-02-29 12:34:56"
        );
        assert_eq!(
            format_time(1_709_210_096_000_000_000, 3600),
            "2024-02-29 13:34:56"
        );
        assert_eq!(format_time(0, -60), "1969-12-31 23:59:00");
    }
}
