//! Quiesce: the helper signals every other thread and waits until each has parked in the
//! quiesce handler (`park.rs`).
#![allow(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::*;

use super::park;
use crate::engine::uffd;
use crate::objects::signals;
use crate::objects::threads::{self, SLOTS};
use crate::state;
use crate::sys;

/// Parks every thread but this one. Returns how many parked.
pub fn quiesce() -> Result<usize, String> {
    let me = sys::gettid();
    let pid = sys::getpid();
    let sig = state::QUIESCE_SIG.load(Relaxed);
    threads::NEXT_SLOT.store(0, Relaxed);
    signals::reset_pending();
    park::PARKED.store(0, Relaxed);
    park::RESUMED.store(0, Relaxed);
    park::NOTED.store(0, Relaxed);
    park::ACTIVE.store(1, SeqCst);
    let deadline = sys::monotonic_ns() + 10_000_000_000;
    let mut signaled: Vec<i32> = Vec::new();
    let mut gone: Vec<i32> = Vec::new();
    loop {
        let tasks = sys::list_numeric_dir(b"/proc/self/task\0")
            .map_err(|e| alloc::format!("cannot list threads: errno {e}"))?;
        let mut new = 0;
        for t in tasks {
            if t != me
                && t != uffd::server_tid()
                && !signaled.contains(&t)
                && !gone.contains(&t)
                && !is_zombie(t)
            {
                if sys::tgkill(pid, t, sig).is_ok() {
                    signaled.push(t);
                    new += 1;
                } else {
                    gone.push(t);
                }
            }
        }
        if new == 0
            && park::PARKED.load(Acquire) as usize
                >= signaled.len() - gone_signaled(&signaled, &gone)
        {
            break;
        }
        // Wait for the signaled threads; drop the ones that exited instead of parking.
        loop {
            let parked = park::PARKED.load(Acquire);
            if parked as usize >= signaled.len() - gone_signaled(&signaled, &gone) {
                break;
            }
            sys::futex_wait(&park::PARKED, parked, Some(20_000_000));
            if sys::monotonic_ns() > deadline {
                let stuck: Vec<i32> = signaled
                    .iter()
                    .copied()
                    .filter(|t| !gone.contains(t) && !parked_tid(*t))
                    .collect();
                return Err(alloc::format!(
                    "thread(s) {stuck:?} did not stop within 10 s (blocking signal {sig}?)"
                ));
            }
            for &t in &signaled {
                if !gone.contains(&t) && !parked_tid(t) && is_zombie(t) {
                    gone.push(t);
                }
            }
        }
    }
    let n = threads::NEXT_SLOT.load(Acquire) as usize;
    if n > threads::MAX_THREADS {
        return Err(alloc::format!("more than {} threads", threads::MAX_THREADS));
    }
    Ok(n)
}

fn gone_signaled(signaled: &[i32], gone: &[i32]) -> usize {
    signaled.iter().filter(|t| gone.contains(t)).count()
}

fn parked_tid(t: i32) -> bool {
    let n = (threads::NEXT_SLOT.load(Acquire) as usize).min(threads::MAX_THREADS);
    SLOTS[..n].iter().any(|s| s.tid.load(Relaxed) == t)
}

fn task_path(t: i32, leaf: &str) -> Vec<u8> {
    alloc::format!("/proc/self/task/{t}{leaf}\0").into_bytes()
}

/// The task has exited: a zombie, dead, or already gone from /proc.
fn is_zombie(t: i32) -> bool {
    let mut buf = Vec::new();
    if sys::read_file(&task_path(t, "/stat"), &mut buf).is_err() {
        return true;
    }
    let text = String::from_utf8_lossy(&buf);
    text.rfind(')')
        .and_then(|i| text[i + 1..].split_whitespace().next())
        .is_some_and(|s| s == "Z" || s == "X")
}
