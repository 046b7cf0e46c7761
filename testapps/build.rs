//! Compiles the C test apps in `c/` into OUT_DIR with the system C compiler (`$CC`, else `cc`):
//! `cc -O2 -g -pthread -Wall -Wextra` (`C_FLAGS`, which `artifacts::c_app_linked` uses too for
//! the builds against other allocators), plus `-mavx2` for `fpu.c` when this machine's CPU has AVX2
//! (the app falls back to xmm registers without it). The harness finds the binaries through
//! `env!("OUT_DIR")`; `SNAPSHIM_TESTAPPS_FPU_WIDTH` tells it which registers `fpu` exercises.

use std::path::Path;
use std::process::Command;

#[rustfmt::skip]
const APPS: &[&str] = &[
    "single",
    "threads",
    "fpu",
    "signals",
    "files",
    "pattern",
    "ids",
    "wpasync",
    "incr",
    "allocs",
    "events",
    "sockserv",
    "sockreset",
    "sockfds",
    "creds",
    "waits",
    "usr2",
    "deleted",
    "timers",
    "tcpcount",
    "ticker",
];

/// The same as `C_FLAGS` in src/artifacts.rs (build scripts cannot import the crate).
const C_FLAGS: &[&str] = &["-O2", "-g", "-pthread", "-Wall", "-Wextra"];

fn main() {
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let avx2 = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "avx2"))
        })
        .unwrap_or(false);
    println!("cargo:rerun-if-changed=c");
    println!("cargo:rerun-if-env-changed=CC");
    println!(
        "cargo:rustc-env=SNAPSHIM_TESTAPPS_FPU_WIDTH={}",
        if avx2 { "ymm" } else { "xmm" }
    );
    for app in APPS {
        let src = Path::new("c").join(format!("{app}.c"));
        let bin = Path::new(&out_dir).join(app);
        let mut cmd = Command::new(&cc);
        cmd.args(C_FLAGS);
        if *app == "fpu" && avx2 {
            cmd.arg("-mavx2");
        }
        cmd.arg("-o").arg(&bin).arg(&src);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
        let diagnostics = String::from_utf8_lossy(&out.stderr);
        for line in diagnostics.lines() {
            println!("cargo:warning={app}.c: {line}");
        }
        if !out.status.success() {
            panic!(
                "compiling {} failed ({}):\n{diagnostics}",
                src.display(),
                out.status
            );
        }
    }
}
