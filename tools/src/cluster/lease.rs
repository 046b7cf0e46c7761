//! A lease kept alive by a thread of its own, and the fence that stops the program when it
//! cannot be.
//!
//! Timing (the argument docs/internals.md makes in full): etcd expires a lease TTL after the
//! last keepalive *it received*, which is after we *sent* it. The renewer sends one every
//! TTL/6 and remembers when it sent the last one that succeeded (`sent_ok`). The watcher looks
//! every TTL/20: once `now − sent_ok > TTL − margin` (margin = TTL/4), it SIGKILLs the fenced
//! program before anyone else can hold the key, since no other node can take the leader key
//! before `sent_ok + TTL`. Both run apart from the agent's main loop, which may be busy
//! (pushing, activating) or blocked on a dead etcd endpoint.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::etcd::Etcd;
use super::program::kill_tree;

/// A lease and what it protects.
pub struct Lease {
    id: AtomicI64,
    ttl: Duration,
    sent_ok: Mutex<Instant>,
    /// The lease is gone or was given up: the owner must grant a new one.
    lost: AtomicBool,
    /// The program (PID) to kill when the lease is in danger; 0 for none.
    fenced_pid: AtomicU32,
    /// Run once the fence has killed the program (logs the event when it happens).
    on_fire: Mutex<Option<Note>>,
    /// `on_fire` ran.
    noted: AtomicBool,
    stop: AtomicBool,
}

/// What the fence does after the kill, on the lease's thread.
pub type Note = Box<dyn FnOnce() + Send>;

impl Lease {
    /// Grants a lease of `ttl` (whole seconds, at least 1) and starts its renewer and watcher.
    pub fn grant(etcd: &Etcd, ttl: Duration) -> Result<Arc<Lease>, String> {
        let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let sent = Instant::now();
        let (id, granted) = etcd.grant(secs)?;
        let lease = Arc::new(Lease {
            id: AtomicI64::new(id),
            ttl: Duration::from_secs(granted.max(1) as u64),
            sent_ok: Mutex::new(sent),
            lost: AtomicBool::new(false),
            fenced_pid: AtomicU32::new(0),
            on_fire: Mutex::new(None),
            noted: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        // Each request may take up to a quarter of the TTL, per endpoint.
        let client = etcd.with_timeout(lease.ttl / 4);
        let l = lease.clone();
        thread::spawn(move || l.renew(client));
        let l = lease.clone();
        thread::spawn(move || l.watch());
        Ok(lease)
    }

    pub fn id(&self) -> i64 {
        self.id.load(Ordering::Relaxed)
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The lease expired, was revoked, or the fence fired: keys on it are gone or going.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Protect `pid` (0: nothing) with this lease: it is killed when the lease is in danger.
    pub fn fence(&self, pid: u32) {
        *self.on_fire.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.fenced_pid.store(pid, Ordering::SeqCst);
    }

    /// [`fence`](Self::fence), and `note` runs right after the kill, on the lease's thread: the
    /// event is logged when the program stops, however busy the agent's loop is.
    pub fn fence_noting(&self, pid: u32, note: Note) {
        *self.on_fire.lock().unwrap_or_else(|e| e.into_inner()) = Some(note);
        self.fenced_pid.store(pid, Ordering::SeqCst);
    }

    /// The fence killed a program and its note ran.
    pub fn noted(&self) -> bool {
        self.noted.load(Ordering::SeqCst)
    }

    /// The last keepalive that succeeded was sent recently (within half the TTL): a key put on
    /// this lease now has nearly the whole TTL before the fence could fire.
    pub fn fresh(&self) -> bool {
        self.since_ok() < self.ttl / 2
    }

    /// How long before etcd could expire the lease the fence fires.
    pub fn margin(&self) -> Duration {
        self.ttl / 4
    }

    /// Stops the threads and revokes the lease (its keys go at once).
    pub fn release(&self, etcd: &Etcd) {
        self.stop.store(true, Ordering::SeqCst);
        self.lost.store(true, Ordering::SeqCst);
        let _ = etcd.revoke(self.id());
    }

    fn renew(&self, client: Etcd) {
        // TTL/6, not TTL/3: when the etcd leader dies, no keepalive succeeds until a new one
        // is elected, and the fence fires TTL − TTL/4 after the last success; renewing twice
        // as often leaves an election about 1.2 s instead of 0.8 s at TTL 2 s (the test with
        // the leader's etcd member killed fenced a healthy leader at TTL/3).
        let period = self.ttl / 6;
        while !self.stop.load(Ordering::Relaxed) && !self.lost() {
            let sent = Instant::now();
            match client.keepalive(self.id()) {
                Ok(ttl) if ttl > 0 => {
                    *self.sent_ok.lock().unwrap_or_else(|e| e.into_inner()) = sent;
                }
                Ok(_) => {
                    // Expired: whatever it protected must stop now.
                    self.lost.store(true, Ordering::SeqCst);
                    self.fire();
                    return;
                }
                Err(_) => {} // the watcher decides; try again soon
            }
            let next = sent + period;
            let retry = Instant::now() + period / 4;
            let wake = if self.since_ok() < period {
                next
            } else {
                retry
            };
            thread::sleep(wake.saturating_duration_since(Instant::now()));
        }
    }

    fn since_ok(&self) -> Duration {
        self.sent_ok
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    fn watch(&self) {
        let tick = self.ttl / 20;
        while !self.stop.load(Ordering::Relaxed) {
            if self.since_ok() > self.ttl - self.margin() {
                self.lost.store(true, Ordering::SeqCst);
                self.fire();
                return;
            }
            if self.lost() {
                return;
            }
            thread::sleep(tick);
        }
    }

    /// Kills the protected program, if any, and runs its note.
    fn fire(&self) {
        let pid = self.fenced_pid.swap(0, Ordering::SeqCst);
        if pid == 0 {
            return;
        }
        kill_tree(pid);
        let note = self
            .on_fire
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(note) = note {
            note();
            self.noted.store(true, Ordering::SeqCst);
        }
    }
}
