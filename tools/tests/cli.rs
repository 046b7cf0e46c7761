//! The `snapshim` binary end to end, without the real shim or restorer:
//!
//! - `checkpoint` against a fake `libsnapshim.so` (tests/fake_shim.c) that answers the reply
//!   protocol as told by its environment, loaded into a host program that just waits; and
//!   against an older fake shim, which takes requests on its checkpoint signal only;
//! - `run` with that fake library, checking what the program gets in its environment;
//! - `inspect`, `verify` and `ls` on synthetic images written with `snapshim-image`;
//! - `restore` with `SNAPSHIM_RESTORE` pointing at a script.
//!
//! Needs `cc` (scripts/test.sh installs it).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, OnceLock};

use snapshim_image::{
    encode_metadata, CharDevice, FdKind, FdState, FileIdentity, Header, Metadata, PageRun, Process,
    Region, RegionKind, RegularFile, ShimInfo, SigAction, ThreadState, Unsupported, PAGE_SIZE,
};

const SNAPSHIM: &str = env!("CARGO_BIN_EXE_snapshim");

/// A fresh directory under cargo's scratch space, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "cli-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The fake shims and the host program, compiled once per test run.
struct Fixtures {
    lib: PathBuf,
    /// A shim from before requests came on the quiesce signal (also named libsnapshim.so).
    old_lib: PathBuf,
    host: PathBuf,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-shim");
        std::fs::create_dir_all(&dir).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
        std::fs::create_dir_all(dir.join("old")).unwrap();
        let lib = dir.join("libsnapshim.so");
        let old_lib = dir.join("old/libsnapshim.so");
        let host = dir.join("host");
        // Built under a private name, then renamed: another test run may be using the files.
        let tmp = |p: &Path| p.with_extension(format!("tmp{}", std::process::id()));
        let shared = ["-shared", "-fPIC", "-O1", "-pthread"];
        cc(&shared, &src.join("fake_shim.c"), &tmp(&lib));
        cc(
            &[&shared[..], &["-DOLD_SHIM"]].concat(),
            &src.join("fake_shim.c"),
            &tmp(&old_lib),
        );
        cc(&["-O1"], &src.join("host.c"), &tmp(&host));
        for p in [&lib, &old_lib, &host] {
            std::fs::rename(tmp(p), p).unwrap();
        }
        Fixtures { lib, old_lib, host }
    })
}

fn cc(flags: &[&str], src: &Path, out: &Path) {
    let status = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(src)
        .status()
        .expect(
            "cannot run cc: a C compiler is needed for these tests (scripts/test.sh installs one)",
        );
    assert!(status.success(), "cc failed on {}", src.display());
}

/// A running host program; killed and reaped when dropped.
struct Host {
    child: Child,
    pid: i32,
}

impl Host {
    /// Starts the host with the fake shim preloaded (if `with_shim`) and `env` added.
    fn start(with_shim: bool, env: &[(&str, &str)]) -> Host {
        let f = fixtures();
        Host::start_with(with_shim.then_some(&f.lib), env)
    }

    /// Starts the host with `lib` preloaded, if any, and `env` added.
    fn start_with(lib: Option<&PathBuf>, env: &[(&str, &str)]) -> Host {
        let mut cmd = Command::new(&fixtures().host);
        if let Some(lib) = lib {
            cmd.env("LD_PRELOAD", lib);
        }
        cmd.envs(env.iter().copied());
        Host::wait_ready(cmd)
    }

    fn wait_ready(mut cmd: Command) -> Host {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("host did not start: {line:?}"));
        Host { child, pid }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Whether SIGUSR2 or SIGRTMAX-1 is pending for the host (started with
    /// `HOST_BLOCK_SIGNALS`, which blocks both: a signal sent to it stays pending, so "never
    /// signalled" needs no waiting).
    fn signalled(&self) -> bool {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        let bit = (1u64 << (libc::SIGUSR2 - 1)) | (1u64 << (libc::SIGRTMAX() - 2));
        status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("SigPnd:")
                    .or_else(|| l.strip_prefix("ShdPnd:"))
            })
            .any(|mask| u64::from_str_radix(mask.trim(), 16).unwrap() & bit != 0)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn snapshim(args: &[&str]) -> Output {
    Command::new(SNAPSHIM).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn checkpoint(pid: i32, extra: &[&str]) -> Output {
    let pid = pid.to_string();
    let mut args = vec!["checkpoint", "--timeout", "20"];
    args.extend_from_slice(extra);
    args.push(&pid);
    snapshim(&args)
}

const OK_LINE: &str = "ok path=/tmp/img dir/app/ckpt-00000003.snap bytes=5242880 pause_us=1500 \
                       total_us=250000 resident=10485760";

#[test]
fn checkpoint_reports_a_committed_image() {
    let mut host = Host::start(true, &[("FAKE_REPLY", OK_LINE), ("FAKE_DELAY_MS", "300")]);
    let out = checkpoint(host.pid, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "checkpoint committed: /tmp/img dir/app/ckpt-00000003.snap\n  image 5.0 MiB (process \
         resident 10.0 MiB), pause 1.50 ms, total 250.0 ms\n"
    );
    assert!(host.alive());
    // A second checkpoint of the same process works as well.
    let out = checkpoint(host.pid, &["--quiet"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "/tmp/img dir/app/ckpt-00000003.snap\n");
}

#[test]
fn checkpoint_reads_a_reply_written_in_pieces() {
    let host = Host::start(true, &[("FAKE_REPLY", OK_LINE), ("FAKE_MODE", "split")]);
    let out = checkpoint(host.pid, &["-q"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn checkpoint_reports_the_shims_error() {
    let host = Host::start(
        true,
        &[(
            "FAKE_REPLY",
            "err cannot create /ro/app: Read-only file system",
        )],
    );
    let out = checkpoint(host.pid, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "snapshim: checkpoint of PID {} failed: cannot create /ro/app: Read-only file system\n",
            host.pid
        )
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn checkpoint_by_root_of_another_users_process() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to start a process as another user");
        return;
    }
    let f = fixtures();
    // Preloaded into the host only: setpriv itself cannot change credentials with the fake
    // shim's thread running (glibc aborts when threads end up with different ids).
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        "env",
    ])
    .arg(format!("LD_PRELOAD={}", f.lib.display()))
    .arg(&f.host)
    .env("FAKE_REPLY", OK_LINE);
    let host = Host::wait_ready(cmd);
    let out = checkpoint(host.pid, &["-q"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn checkpoint_refuses_a_garbled_reply() {
    let host = Host::start(true, &[("FAKE_REPLY", "hello")]);
    let out = checkpoint(host.pid, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("unexpected reply from the shim: \"hello\""),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn checkpoint_notices_the_process_exiting() {
    let host = Host::start(true, &[("FAKE_MODE", "exit"), ("FAKE_DELAY_MS", "300")]);
    let out = checkpoint(host.pid, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "snapshim: process {} exited before the checkpoint was committed\n",
            host.pid
        )
    );
}

#[test]
fn checkpoint_times_out() {
    let mut host = Host::start(true, &[("FAKE_MODE", "silent")]);
    let t = std::time::Instant::now();
    let out = snapshim(&["checkpoint", "--timeout", "1", &host.pid.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no outcome within 1.0 s"),
        "{}",
        text(&out.stderr)
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    assert!(host.alive());
}

#[test]
fn checkpoint_never_signals_a_process_without_the_shim() {
    let mut host = Host::start(false, &[("HOST_BLOCK_SIGNALS", "1")]);
    let out = checkpoint(host.pid, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "snapshim: process {} is not running under snapshim (libsnapshim.so is not loaded)\n",
            host.pid
        )
    );
    assert!(!host.signalled(), "the host was signalled");
    assert!(host.alive());
}

#[test]
fn checkpoint_uses_the_programs_snapshim_signal() {
    // The fake shims handle only the checkpoint signal named here (the current one also its
    // quiesce signal): SIGUSR2 would kill the host. The request goes with the quiesce signal
    // to the current shim and with the checkpoint signal to the older one.
    let f = fixtures();
    let (usr1, rtmin, rtmax) = (libc::SIGUSR1, libc::SIGRTMIN(), libc::SIGRTMAX());
    let number = usr1.to_string();
    for (name, trigger, quiesce) in [
        ("SIGUSR1", usr1, rtmax - 1),
        ("USR1", usr1, rtmax - 1),
        (number.as_str(), usr1, rtmax - 1),
        ("RTMIN+2", rtmin + 2, rtmax - 1),
        ("RTMAX-1", rtmax - 1, rtmax - 2),
    ] {
        for (lib, sent) in [(&f.lib, quiesce), (&f.old_lib, trigger)] {
            let dir = TempDir::new("signal");
            let log = dir.0.join("requests");
            let mut host = Host::start_with(
                Some(lib),
                &[
                    ("FAKE_REPLY", OK_LINE),
                    ("FAKE_SIGNO", &trigger.to_string()),
                    ("SNAPSHIM_SIGNAL", name),
                    ("FAKE_LOG", log.to_str().unwrap()),
                ],
            );
            let out = checkpoint(host.pid, &["-q"]);
            let what = format!("SNAPSHIM_SIGNAL={name}, {}", lib.display());
            assert_eq!(out.status.code(), Some(0), "{what}: {}", text(&out.stderr));
            assert_eq!(
                std::fs::read_to_string(&log).unwrap(),
                format!("signal {sent}\n"),
                "{what}"
            );
            assert!(host.alive(), "{what}");
        }
    }
}

#[test]
fn concurrent_checkpoints_are_each_answered() {
    // Eight requests at the same moment, each answered on its own (the fake shim answers every
    // request it receives): the quiesce signal queues, where a second SIGUSR2 sent while the
    // first is pending would be merged into it, and its sender never answered.
    let host = Host::start(true, &[("FAKE_REPLY", OK_LINE), ("FAKE_DELAY_MS", "50")]);
    let start = Arc::new(Barrier::new(8));
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let (start, pid) = (Arc::clone(&start), host.pid);
            std::thread::spawn(move || {
                start.wait();
                checkpoint(pid, &["-q"])
            })
        })
        .collect();
    for r in requests {
        let out = r.join().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "/tmp/img dir/app/ckpt-00000003.snap\n");
    }
}

#[test]
fn checkpoint_never_signals_a_shim_without_its_quiesce_handler() {
    // A current shim handles both signals or neither; this one handles only its checkpoint
    // signal, and the quiesce signal's default action would kill the host.
    let mut host = Host::start(
        true,
        &[("FAKE_NO_QUIESCE", "1"), ("HOST_BLOCK_SIGNALS", "1")],
    );
    let out = checkpoint(host.pid, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "snapshim: process {} does not handle {}: snapshim is loaded but its checkpoints \
             are off (the program's stderr says why); not signalling it\n",
            host.pid,
            snapshim_image::settings::signal_name(libc::SIGRTMAX() - 1)
        )
    );
    assert!(!host.signalled(), "the host was signalled");
    assert!(host.alive());
}

#[test]
fn checkpoint_refuses_an_unknown_snapshim_signal() {
    // The shim refuses these, turns checkpoints off, and leaves the signal unhandled.
    for bad in ["USR9", "usr1", "TERM"] {
        let mut host = Host::start(true, &[("SNAPSHIM_SIGNAL", bad)]);
        let out = checkpoint(host.pid, &[]);
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert!(err.contains(&format!("SNAPSHIM_SIGNAL={bad}")), "{err}");
        assert!(host.alive());
    }
}

#[test]
fn checkpoint_never_signals_a_shim_whose_checkpoints_are_off() {
    // Loaded, but handling SIGUSR1 instead of the SIGUSR2 the environment implies: as when
    // the real shim's set-up failed and it installed no handler.
    let usr1 = libc::SIGUSR1.to_string();
    let mut host = Host::start(true, &[("FAKE_SIGNO", &usr1), ("HOST_BLOCK_SIGNALS", "1")]);
    let out = checkpoint(host.pid, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "snapshim: process {} does not handle SIGUSR2: snapshim is loaded but its \
             checkpoints are off (the program's stderr says why); not signalling it\n",
            host.pid
        )
    );
    assert!(!host.signalled(), "the host was signalled");
    assert!(host.alive());
}

#[test]
fn checkpoint_of_a_missing_process() {
    let out = checkpoint(i32::MAX, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!("snapshim: no process with PID {}\n", i32::MAX)
    );
}

#[test]
fn run_sets_up_the_environment_and_keeps_the_pid() {
    let dir = TempDir::new("run");
    let f = fixtures();
    let child = Command::new(SNAPSHIM)
        .current_dir(&dir.0)
        .env("SNAPSHIM_LIB", &f.lib)
        .env("LD_PRELOAD", "/nonexistent/other.so")
        .env_remove("SNAPSHIM_NAME")
        .env_remove("SNAPSHIM_DIR")
        .args([
            "run",
            "--dir",
            "imgs",
            "--interval",
            "10m",
            "--keep",
            "2",
            "--signal",
            "usr1",
        ])
        .args(["--", "env"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let env = text(&out.stdout);
    let base = std::path::absolute(dir.0.join("imgs")).unwrap();
    for want in [
        format!("LD_PRELOAD={}:/nonexistent/other.so", f.lib.display()),
        format!("SNAPSHIM_DIR={}", base.display()),
        "SNAPSHIM_INTERVAL=10m".to_string(),
        "SNAPSHIM_KEEP=2".to_string(),
        "SNAPSHIM_SIGNAL=USR1".to_string(),
        // The shim itself says where its images go (testapps/tests/lineage.rs).
        format!("SNAPSHIM_ANNOUNCE={pid}"),
    ] {
        assert!(
            env.lines().any(|l| l == want),
            "{want} missing from:\n{env}"
        );
    }
    assert!(!env.contains("SNAPSHIM_NAME="), "{env}");

    // The program keeps snapshim's PID, and `checkpoint` reaches it.
    let mut cmd = Command::new(SNAPSHIM);
    cmd.env("SNAPSHIM_LIB", &f.lib)
        .env("FAKE_REPLY", OK_LINE)
        .args(["run", "--name", "named", "--dir"])
        .arg(&dir.0)
        .arg("--")
        .arg(&f.host);
    let host = Host::wait_ready(cmd);
    assert_eq!(host.pid as u32, host.child.id());
    let out = checkpoint(host.pid, &["-q"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn run_reports_a_missing_shim_or_program() {
    let out = Command::new(SNAPSHIM)
        .env("SNAPSHIM_LIB", "/no/such/libsnapshim.so")
        .args(["run", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "snapshim: cannot find libsnapshim.so: SNAPSHIM_LIB names /no/such/libsnapshim.so, \
         which is not a file\n"
    );
    let out = Command::new(SNAPSHIM)
        .env("SNAPSHIM_LIB", &fixtures().lib)
        .args(["run", "--", "no-such-program-xyz"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "snapshim: cannot run no-such-program-xyz: not found in PATH\n"
    );
}

#[test]
fn restore_execs_the_restorer_with_the_same_arguments() {
    let dir = TempDir::new("restore");
    let script = dir.0.join("fake-restore");
    std::fs::write(&script, "#!/bin/sh\necho \"restorer pid $$: $*\"\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let child = Command::new(SNAPSHIM)
        .env("SNAPSHIM_RESTORE", &script)
        .args(["restore", "--verbose", "/img/dir"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout),
        format!("restorer pid {pid}: --verbose /img/dir\n")
    );
}

// --- synthetic images -------------------------------------------------------------------------

/// Writes an image whose page data is `pages` pages of a pattern, stored as one run at
/// 0x11000 in an anonymous region, plus a File region mapping `mapped`.
fn write_image(path: &Path, seq: u64, mapped: &Path) {
    let pages = 2u64;
    let data: Vec<u8> = (0..pages * PAGE_SIZE)
        .map(|i| (i % 251) as u8 ^ seq as u8)
        .collect();
    let st = std::fs::metadata(mapped).unwrap();
    let identity = FileIdentity {
        size: st.len(),
        mtime_ns: st.mtime() * 1_000_000_000 + st.mtime_nsec(),
        inode: st.ino(),
    };
    let mapped = mapped.to_str().unwrap().to_string();
    let meta = Metadata {
        process: Process {
            pid: 4242,
            name: "app".into(),
            exe: "/usr/bin/app".into(),
            cmdline: vec!["app".into(), "--in".into(), "my file.dat".into()],
            cwd: "/home/u".into(),
            pause_ns: 1_500_000,
            resident_bytes: 64 << 20,
            sigactions: vec![
                SigAction {
                    signo: libc::SIGUSR2 as u32,
                    handler: 0x7f00_0000_1234,
                    flags: (libc::SA_SIGINFO | libc::SA_RESTART) as u64,
                    restorer: 0,
                    mask: 0,
                },
                SigAction {
                    signo: libc::SIGPIPE as u32,
                    handler: 1,
                    flags: 0,
                    restorer: 0,
                    mask: 0,
                },
                SigAction {
                    signo: libc::SIGINT as u32,
                    handler: 0,
                    flags: 0,
                    restorer: 0,
                    mask: 0,
                },
            ],
            ..Default::default()
        },
        shim: ShimInfo {
            path: "/opt/snapshim/libsnapshim.so".into(),
            resume_addr: 0x7f00_0000_0100,
            ..Default::default()
        },
        threads: vec![
            ThreadState {
                tid: 4242,
                fs_base: 0,
                ctx_rsp: 0x13f00,
                robust_head: 0,
                robust_len: 0,
                altstack_sp: 0,
                altstack_flags: 0,
                altstack_size: 0,
                sigmask: 0,
                name: "app".into(),
                helper: false,
            },
            ThreadState {
                tid: 4243,
                fs_base: 0,
                ctx_rsp: 0x13f00,
                robust_head: 0,
                robust_len: 0,
                altstack_sp: 0,
                altstack_flags: 0,
                altstack_size: 0,
                sigmask: 0,
                name: "snapshim".into(),
                helper: true,
            },
        ],
        regions: vec![
            Region {
                start: 0x10000,
                end: 0x14000,
                prot: 3,
                shared: false,
                kind: RegionKind::Anon,
                name: "[heap]".into(),
            },
            Region {
                start: 0x20000,
                end: 0x21000,
                prot: 5,
                shared: false,
                kind: RegionKind::File {
                    path: mapped.clone(),
                    offset: 0,
                    identity,
                },
                name: mapped,
            },
            Region {
                start: 0x7f00_0000_0000,
                end: 0x7f00_0000_2000,
                prot: 5,
                shared: false,
                kind: RegionKind::Anon,
                name: "/opt/snapshim/libsnapshim.so".into(),
            },
        ],
        runs: vec![PageRun {
            addr: 0x11000,
            pages,
            file_off: PAGE_SIZE,
            crc: crc32fast::hash(&data),
        }],
        fds: vec![
            FdState {
                fd: 0,
                flags: libc::O_RDONLY as u32,
                cloexec: false,
                kind: FdKind::CharDevice(CharDevice {
                    path: "/dev/null".into(),
                }),
            },
            FdState {
                fd: 1,
                flags: (libc::O_WRONLY | libc::O_APPEND) as u32,
                cloexec: false,
                kind: FdKind::RegularFile(RegularFile {
                    path: "/home/u/out.txt".into(),
                    offset: 120,
                    size: 120,
                    identity: FileIdentity::default(),
                }),
            },
            FdState {
                fd: 5,
                flags: libc::O_RDWR as u32,
                cloexec: true,
                kind: FdKind::Unsupported(Unsupported {
                    desc: "socket:[1234]".into(),
                }),
            },
        ],
        clock_boottime_ns: 0,
        build_ids: vec![],
        vdso: Default::default(),
        parent: None,
        inherited: Vec::new(),
        merged_from: None,
        lineage: None,
        credentials: Vec::new(),
    };
    let (meta, meta_crc) = encode_metadata(&meta);
    let mut h = Header::new(
        0x1234_5678_9abc_def0 + seq,
        1_700_000_000_000_000_000 + seq * 60_000_000_000,
    );
    h.data_len = data.len() as u64;
    h.meta_off = PAGE_SIZE + h.data_len;
    h.meta_len = meta.len() as u64;
    h.meta_crc = meta_crc;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&h.encode()).unwrap();
    f.write_all(&data).unwrap();
    f.write_all(&meta).unwrap();
}

/// base/app/ckpt-00000001.snap, ckpt-00000002.snap, latest -> ckpt-00000002.snap, and a
/// mapped file the images reference.
fn image_tree(tag: &str) -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new(tag);
    let mapped = dir.0.join("libmapped.so");
    std::fs::write(&mapped, vec![0x90u8; 5000]).unwrap();
    let app = dir.0.join("base/app");
    std::fs::create_dir_all(&app).unwrap();
    write_image(&app.join("ckpt-00000001.snap"), 1, &mapped);
    write_image(&app.join("ckpt-00000002.snap"), 2, &mapped);
    std::os::unix::fs::symlink("ckpt-00000002.snap", app.join("latest")).unwrap();
    (dir, app, mapped)
}

#[test]
fn inspect_describes_the_latest_image() {
    let (dir, app, _) = image_tree("inspect");
    let out = snapshim(&["inspect", dir.0.join("base").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    let latest = std::fs::canonicalize(app.join("ckpt-00000002.snap")).unwrap();
    for want in [
        format!("image      {}", latest.display()),
        format!("format     1.{},", snapshim_image::VERSION_MINOR),
        "id         123456789abcdef2, parent none (full image)".to_string(),
        "program    app, PID 4242".to_string(),
        "cmdline    app --in 'my file.dat'".to_string(),
        "memory     8.0 KiB stored, 64.0 MiB resident at the checkpoint".to_string(),
        "pause      1.50 ms".to_string(),
        "regions (3):".to_string(),
        "  000000010000-000000014000    16.0 KiB rw-  private anon                8.0 KiB  [heap]"
            .to_string(),
        "file @0x0".to_string(),
        "      4243  snapshim         snapshim helper".to_string(),
        "     1  wronly,append            file /home/u/out.txt (offset 120, size 120)".to_string(),
        "NOT RESTORABLE (the restore refuses it): socket:[1234]".to_string(),
        "signal handlers (2 not default):".to_string(),
        "  SIGUSR2      handler 0x7f0000001234 in /opt/snapshim/libsnapshim.so [SIGINFO,RESTART]"
            .to_string(),
        "  SIGPIPE      ignored".to_string(),
    ] {
        assert!(s.contains(&want), "{want:?} missing from:\n{s}");
    }
    assert!(!s.contains("SIGINT"), "{s}");
}

#[test]
fn verify_checks_pages_and_mapped_files() {
    let (_dir, app, mapped) = image_tree("verify");
    let out = snapshim(&["verify", app.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let latest = std::fs::canonicalize(app.join("ckpt-00000002.snap")).unwrap();
    let meta_len = snapshim_image::Image::open(&latest)
        .unwrap()
        .header
        .meta_len;
    assert_eq!(
        text(&out.stdout),
        format!(
            "ok: {}\n  header     format 1.{minor}, checksum ok\n  metadata   {meta_len} B, checksum \
             ok, consistent: 3 regions, 1 page run, 2 threads, 3 descriptors\n  page data  8.0 \
             KiB in 1 run, every checksum ok\n  files      1 mapped file present and unchanged\n",
            latest.display(),
            minor = snapshim_image::VERSION_MINOR
        )
    );

    // A changed mapped file is named.
    std::fs::write(&mapped, b"rebuilt").unwrap();
    let out = snapshim(&["verify", app.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "snapshim: {}: mapped file {} has changed since the checkpoint: size 5000 is now 7",
            latest.display(),
            mapped.display()
        )),
        "{err}"
    );
    std::fs::remove_file(&mapped).unwrap();
    let out = snapshim(&["verify", app.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is not available: No such file or directory"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn verify_finds_corrupted_pages() {
    let (_dir, app, _) = image_tree("corrupt");
    let img = app.join("ckpt-00000001.snap");
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[PAGE_SIZE as usize + 100] ^= 0xff;
    std::fs::write(&img, bytes).unwrap();
    let out = snapshim(&["verify", img.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "snapshim: {}: image page data is corrupted: run 0 (memory 0x11000-0x13000, file \
             offset 4096) fails its checksum\n",
            img.display()
        )
    );
    let out = snapshim(&["verify", "/no/such/image.snap"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "snapshim: cannot find /no/such/image.snap: No such file or directory (os error 2)\n"
    );
}

/// Each kind of damage gets its own one-line message and exit status 1 (the same messages the
/// restorer gives: testapps/tests/bad_input.rs checks both against real images).
#[test]
fn verify_names_each_kind_of_damage() {
    let (_dir, app, _) = image_tree("damage");
    let good_path = app.join("ckpt-00000001.snap");
    let good = std::fs::read(&good_path).unwrap();
    let img = snapshim_image::Image::open(&good_path).unwrap();
    let (h, meta) = (img.header.clone(), img.meta.clone());
    let n = good.len();
    let reheader = |change: &dyn Fn(&mut Header)| {
        let mut hh = h.clone();
        change(&mut hh);
        let mut b = good.clone();
        b[..PAGE_SIZE as usize].copy_from_slice(&hh.encode());
        b
    };
    let remeta = |bytes: &[u8]| {
        let mut b = good[..h.meta_off as usize].to_vec();
        b.extend_from_slice(bytes);
        let mut hh = h.clone();
        hh.meta_len = bytes.len() as u64;
        hh.meta_crc = crc32fast::hash(bytes);
        b[..PAGE_SIZE as usize].copy_from_slice(&hh.encode());
        b
    };
    let flip = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 0x04;
        b
    };
    let mut reserved = meta.clone();
    reserved.regions[2].start = snapshim_image::layout::RESERVED_START;
    reserved.regions[2].end = snapshim_image::layout::RESERVED_START + PAGE_SIZE;
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "empty",
            vec![],
            "image is truncated: the header needs 4096 bytes at offset 0, the file has 0".into(),
        ),
        (
            "cut-data",
            good[..5000].to_vec(),
            "image is truncated: the page data needs 8192 bytes at offset 4096, the file has 5000"
                .into(),
        ),
        (
            "cut-meta",
            good[..n - 10].to_vec(),
            format!(
                "image is truncated: the metadata needs {} bytes at offset {}, the file has {}",
                h.meta_len,
                h.meta_off,
                n - 10
            ),
        ),
        (
            "magic",
            flip(0),
            "not a snapshim image (bad magic number)".into(),
        ),
        (
            "arch",
            {
                let mut b = good.clone();
                b[8..16].copy_from_slice(b"aarch64\0");
                b
            },
            "image was taken on aarch64; this machine is x86_64".into(),
        ),
        (
            "version",
            {
                let mut b = good.clone();
                b[16..18].copy_from_slice(&9u16.to_le_bytes());
                b
            },
            format!(
                "image format version 9.{m} is newer than this build reads (1.0 to 1.{m})",
                m = snapshim_image::VERSION_MINOR
            ),
        ),
        (
            "header-crc",
            flip(25),
            "image header is corrupted (checksum mismatch)".into(),
        ),
        (
            "layout",
            reheader(&|h| h.data_off = 100),
            "image header is inconsistent: page data starts at offset 100, not on a page \
             boundary after the header"
                .into(),
        ),
        (
            "meta-crc",
            flip(h.meta_off as usize + 3),
            "image metadata is corrupted (checksum mismatch)".into(),
        ),
        (
            "decode",
            remeta(&[0xff; 16]),
            "image metadata does not decode: ".into(),
        ),
        (
            "inconsistent",
            remeta(&encode_metadata(&reserved).0),
            "image metadata is inconsistent: region 2 (0x6e000000-0x6e001000) is inside the \
             range 0x6e000000-0x7e000000 snapshim keeps for the restorer"
                .into(),
        ),
        (
            "run-crc",
            flip(PAGE_SIZE as usize + 3),
            "image page data is corrupted: run 0 (memory 0x11000-0x13000, file offset 4096) \
             fails its checksum"
                .into(),
        ),
    ];
    let mut seen = Vec::new();
    for (label, bytes, want) in cases {
        let path = app.join(format!("{label}.snap"));
        std::fs::write(&path, bytes).unwrap();
        let out = snapshim(&["verify", path.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{label}: {err}");
        assert!(out.stdout.is_empty(), "{label}: {}", text(&out.stdout));
        let prefix = format!("snapshim: {}: {want}", path.display());
        assert!(
            err.starts_with(&prefix),
            "{label}:\n{err}\nwanted\n{prefix}"
        );
        assert_eq!(err.lines().count(), 1, "{label}: {err}");
        assert!(
            !seen.contains(&want),
            "{label}: same message as another kind"
        );
        seen.push(want);
    }
}

#[test]
fn ls_lists_images_and_marks_latest() {
    let (dir, app, _) = image_tree("ls");
    std::fs::write(app.join("ckpt-00000003.snap"), b"garbage").unwrap();
    let base = dir.0.join("base");
    for arg in [&base, &app] {
        let out = snapshim(&["ls", arg.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let s = text(&out.stdout);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], format!("{}/", app.display()), "{s}");
        assert!(
            lines[1].starts_with("  ckpt-00000001.snap") && lines[1].contains(" KiB  20"),
            "{s}"
        );
        assert!(!lines[1].contains("latest"), "{s}");
        assert!(
            lines[2].starts_with("  ckpt-00000002.snap") && lines[2].ends_with("  <- latest"),
            "{s}"
        );
        assert!(
            lines[3].starts_with("  ckpt-00000003.snap") && lines[3].contains("unreadable: "),
            "{s}"
        );
        assert_eq!(lines.len(), 4, "{s}");
    }
    // $SNAPSHIM_DIR is the default.
    let out = Command::new(SNAPSHIM)
        .env("SNAPSHIM_DIR", &base)
        .arg("ls")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("<- latest"));

    let out = snapshim(&["ls", dir.0.join("nothing-here").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("snapshim: cannot list "),
        "{}",
        text(&out.stderr)
    );
    let empty = TempDir::new("ls-empty");
    let out = snapshim(&["ls", empty.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).starts_with("no snapshim images in "));
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["frobnicate"][..],
        &["checkpoint", "nope"],
        &["run", "--interval", "fast", "--", "true"],
        &["inspect"],
    ] {
        let out = snapshim(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

// --- snapshim check -----------------------------------------------------------------------------

#[test]
fn check_reports_every_feature_as_json_with_a_schema() {
    let f = fixtures();
    let out = Command::new(SNAPSHIM)
        .args(["check", "--json"])
        .env("SNAPSHIM_LIB", &f.lib)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["schema"], 1);
    let features = report["features"].as_array().unwrap();
    let names: Vec<&str> = features
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    for name in [
        "libsnapshim.so",
        "snapshim-restore",
        "userfaultfd write-protect",
        "userfaultfd WP_ASYNC",
        "PAGEMAP_SCAN",
        "user namespaces",
        "PID namespaces",
        "time namespaces",
        "kcmp",
        "TFD_IOC_SET_TICKS",
        "TCP_REPAIR",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    // The exit status is the verdict.
    assert_eq!(out.status.success(), report["ok"].as_bool().unwrap());
}

#[test]
fn check_fails_in_one_line_when_the_shim_is_missing() {
    let out = Command::new(SNAPSHIM)
        .arg("check")
        .env("SNAPSHIM_LIB", "/nonexistent/libsnapshim.so")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(
            "snapshim: checkpoint or restore cannot work here: missing libsnapshim.so"
        ),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("NO   libsnapshim.so"), "{stdout}");
}

// --- snapshim run refuses what the shim cannot enter -------------------------------------------

/// Runs `snapshim run -- PROG` and returns (exit code, stderr).
fn run_refused(prog: &Path) -> (Option<i32>, String) {
    let dir = TempDir::new("refuse-dir");
    let out = Command::new(SNAPSHIM)
        .args(["run", "--dir"])
        .arg(&dir.0)
        .arg("--")
        .arg(prog)
        .env("SNAPSHIM_LIB", &fixtures().lib)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_refuses_a_static_binary_and_a_script_it_interprets() {
    let dir = TempDir::new("static");
    let src = dir.0.join("s.c");
    std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
    let exe = dir.0.join("static-prog");
    cc(&["-static", "-O1"], &src, &exe);
    let (code, stderr) = run_refused(&exe);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("is statically linked") && stderr.contains("cannot enter it"),
        "{stderr}"
    );
    let script = dir.0.join("script");
    std::fs::write(&script, format!("#!{}\n", exe.display())).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, stderr) = run_refused(&script);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{} is statically linked", exe.display())),
        "{stderr}"
    );
}

#[test]
fn run_refuses_a_program_set_user_id_to_someone_else() {
    if !nix_is_root() {
        // CI runs as root: there, not being root is a broken set-up, not a reason to pass.
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root (to give a file away with the set-user-ID bit)"
        );
        eprintln!("skipped: needs root to give a file away with the set-user-ID bit");
        return;
    }
    let dir = TempDir::new("setuid");
    let exe = dir.0.join("suid-true");
    std::fs::copy(&fixtures().host, &exe).unwrap();
    std::os::unix::fs::chown(&exe, Some(65534), None).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let (code, stderr) = run_refused(&exe);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("is set-user-ID (user 65534)") && stderr.contains("ignores LD_PRELOAD"),
        "{stderr}"
    );
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

// --- --json ------------------------------------------------------------------------------------

fn json_of(out: &Output) -> serde_json::Value {
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)));
    // The schema version comes first, for a reader that checks it before anything else.
    assert!(
        text(&out.stdout)
            .trim_start()
            .starts_with("{\n  \"schema\": 1,"),
        "{}",
        text(&out.stdout)
    );
    doc
}

#[test]
fn inspect_and_ls_speak_json() {
    let (dir, app, _) = image_tree("json");
    std::fs::write(app.join("ckpt-00000003.snap"), b"garbage").unwrap();
    let out = snapshim(&["inspect", "--json", app.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let d = json_of(&out);
    assert_eq!(d["ok"], true);
    assert_eq!(d["id"], "123456789abcdef2");
    assert_eq!(d["program"]["pid"], 4242);
    assert_eq!(d["program"]["cmdline"][2], "my file.dat");
    assert_eq!(d["stored_bytes"], 8192);
    assert_eq!(d["pause_us"], 1500);
    assert_eq!(d["regions"].as_array().unwrap().len(), 3);
    assert_eq!(d["regions"][0]["stored_bytes"], 8192);
    assert_eq!(d["fds"][1]["kind"], "file");
    assert_eq!(d["fds"][2]["kind"], "unsupported");
    assert_eq!(d["signal_handlers"][1]["handler"], "ignored");

    let out = snapshim(&["ls", "--json", dir.0.join("base").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let d = json_of(&out);
    let images = d["dirs"][0]["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    assert_eq!(images[0]["file"], "ckpt-00000001.snap");
    assert_eq!(images[0]["kind"], "full");
    assert_eq!(images[0]["latest"], false);
    assert_eq!(images[1]["latest"], true);
    assert!(images[2]["error"].is_string(), "{d}");
    assert_eq!(
        d["dirs"][0]["latest"].as_str().unwrap(),
        std::fs::canonicalize(app.join("ckpt-00000002.snap"))
            .unwrap()
            .to_str()
            .unwrap()
    );
}

#[test]
fn a_failure_under_json_is_a_json_document_and_one_line() {
    let out = snapshim(&["inspect", "--json", "/no/such/image"]);
    assert_eq!(out.status.code(), Some(1));
    let d = json_of(&out);
    assert_eq!(d["ok"], false);
    assert!(
        d["error"].as_str().unwrap().contains("/no/such/image"),
        "{d}"
    );
    assert_eq!(text(&out.stderr).lines().count(), 1);
    let out = snapshim(&["checkpoint", "--json", "999999999"]);
    assert_eq!(json_of(&out)["error"], "no process with PID 999999999");
}
