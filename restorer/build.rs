//! Builds the restorer's phase-2 blob (`blob/main.rs`): a freestanding, statically linked
//! executable at a fixed address inside the range every snapshim process keeps free. It is
//! compiled here with the same rustc, without std or libc, and embedded into snapshim-restore.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("blob");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    println!("cargo:rerun-if-changed=blob/main.rs");
    println!("cargo:rerun-if-changed=src/plan.rs");
    let base = format!("-Wl,--image-base={:#x}", 0x6e00_0000u64);
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "snapshim_blob",
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "relocation-model=static",
            "-C",
            "debug-assertions=off",
            "-C",
            "overflow-checks=off",
            "-C",
            "target-cpu=x86-64",
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-static",
            "-C",
            "link-arg=-Wl,-e,blob_main",
            "-C",
            "link-arg=-Wl,--build-id=none",
        ])
        .arg("-C")
        .arg(format!("link-arg={base}"))
        .arg("blob/main.rs")
        .arg("-o")
        .arg(&out)
        .status()
        .expect("cannot run rustc to build the restorer blob");
    assert!(status.success(), "building the restorer blob failed");
}
