//! The test apps themselves, without the shim: each keeps its contract (READY, PHASE 2, PASS,
//! exit status 0) and prints exactly the same thing on every uninterrupted run. Everything the
//! end-to-end tests conclude rests on this.

use procfs::{CpuInfo, Current};
use snapshim_testapps::{bail, uninterrupted_run, AppSpec, Context, Result, Session};

/// More than any stdio buffer (C: 4 KiB, Python and the Rust app: 8 KiB), so at a checkpoint
/// some output is already in the file and some still in memory.
const MIN_STDOUT: usize = 12 * 1024;

fn deterministic(name: &str, runs: usize) -> Result<()> {
    let spec = AppSpec::named(name)?;
    let first = uninterrupted_run(&spec, false)?;
    if first.stdout.len() < MIN_STDOUT {
        bail!(
            "{name} prints only {} bytes; it should print at least {MIN_STDOUT}",
            first.stdout.len()
        );
    }
    eprintln!(
        "{name}: {} bytes of stdout, {:?} from READY to exit",
        first.stdout.len(),
        first.ready_to_exit
    );
    for run in 2..=runs {
        let again = uninterrupted_run(&spec, false)?;
        if again.stdout != first.stdout {
            bail!(
                "{name}: run {run} printed something else than run 1: {}",
                snapshim_testapps::diff_summary(&first.stdout, &again.stdout)
            );
        }
        for ((file, a), (_, b)) in first.files.iter().zip(&again.files) {
            if a != b {
                bail!(
                    "{name}: run {run} wrote a different {file}: {}",
                    snapshim_testapps::diff_summary(a, b)
                );
            }
        }
    }
    Ok(())
}

#[test]
fn single_uninterrupted_runs_are_deterministic() -> Result<()> {
    deterministic("single", 2)
}

#[test]
fn single_rs_uninterrupted_runs_are_deterministic() -> Result<()> {
    deterministic("single-rs", 2)
}

#[test]
fn threads_uninterrupted_runs_are_deterministic() -> Result<()> {
    // Scheduling differs from run to run; the output must not.
    deterministic("threads", 3)
}

#[test]
fn fpu_uninterrupted_runs_are_deterministic() -> Result<()> {
    deterministic("fpu", 2)
}

/// build.rs compiles fpu with -mavx2 when the CPU has AVX2; then the app must really hold ymm
/// registers, not fall back to xmm.
#[test]
fn fpu_holds_the_widest_registers_this_cpu_has() -> Result<()> {
    let width = env!("SNAPSHIM_TESTAPPS_FPU_WIDTH");
    let cpu_has_avx2 = CpuInfo::current()
        .context("read /proc/cpuinfo")?
        .flags(0)
        .is_some_and(|flags| flags.contains(&"avx2"));
    if cpu_has_avx2 != (width == "ymm") {
        bail!(
            "the CPU {} AVX2 but fpu was built for {width}",
            if cpu_has_avx2 { "has" } else { "lacks" }
        );
    }
    let run = uninterrupted_run(&AppSpec::named("fpu")?.arg("2"), false)?;
    let head = String::from_utf8_lossy(&run.stdout[..run.stdout.len().min(200)]).into_owned();
    if !head.contains(&format!("16 {width} registers")) {
        bail!("fpu does not say it holds {width} registers: {head:?}");
    }
    Ok(())
}

#[test]
fn signals_uninterrupted_runs_are_deterministic() -> Result<()> {
    deterministic("signals", 2)
}

#[test]
fn files_uninterrupted_runs_are_deterministic() -> Result<()> {
    let spec = AppSpec::named("files")?;
    let run = uninterrupted_run(&spec, false)?;
    let (name, out) = &run.files[0];
    if out.len() < 2 << 20 {
        bail!("files wrote only {} bytes to {name}", out.len());
    }
    deterministic("files", 2)
}

#[test]
fn events_uninterrupted_runs_are_deterministic() -> Result<()> {
    // Timer ticks and the order of ready events differ from run to run; the output must not.
    deterministic("events", 2)
}

#[test]
fn threads_py_uninterrupted_runs_are_deterministic() -> Result<()> {
    deterministic("threads-py", 2)
}

#[test]
fn deleted_uninterrupted_runs_are_deterministic() -> Result<()> {
    // Inode numbers and the names of its deleted files differ from run to run; the output
    // must not.
    deterministic("deleted", 2)
}

#[test]
fn allocs_uninterrupted_runs_are_deterministic() -> Result<()> {
    // Three threads allocate at once: the allocator's choices differ from run to run, the
    // output must not.
    deterministic("allocs", 2)
}

/// A FAIL must be visible: a broken invariant gives exit status 1 and `FAIL: reason` on stdout,
/// which the harness reports. (Here: a round count the app refuses.)
#[test]
fn a_failing_app_says_fail_and_exits_1() -> Result<()> {
    let session = Session::new(AppSpec::named("single")?.arg("1"))?;
    let fin = session.spawn_without_shim()?.finish()?;
    fin.assert_exit_code(1)?;
    let out = std::fs::read_to_string(session.stdout_path())?;
    if !out.starts_with("FAIL: rounds must be in") || !fin.stderr.contains("FAIL: ") {
        bail!(
            "expected FAIL on stdout and stderr; stdout {out:?}, stderr {:?}",
            fin.stderr
        );
    }
    match fin.assert_same_output_as_uninterrupted() {
        Ok(()) => bail!("a failed run passed as identical output"),
        Err(e) if e.to_string().contains("exit status 1") => {}
        Err(e) => bail!("unexpected failure: {e}"),
    }
    session.passed();
    Ok(())
}
