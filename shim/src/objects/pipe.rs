//! Pipes, capture side: a pipe whose two ends are both the program's is recreated with the
//! bytes it buffered (read without losing them: drained and put straight back); a pipe with one
//! end elsewhere goes to something outside and is inherited.
#![allow(unsafe_code)]

use alloc::vec::Vec;

use snapshim_image::{FdKind, FdState, Inherited, Pipe};

use crate::sys::{self, sc};

/// The pipe ends seen so far: (inode, fd, read end).
pub type Ends = Vec<(u64, i32, bool)>;

/// A pipe end, noted in `ends` so that [`pair_up`] can find its other end.
pub fn capture(fd: i32, flags: u32, st: &libc::stat, ends: &mut Ends) -> FdKind {
    let read_end = flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32;
    ends.push((st.st_ino, fd, read_end));
    FdKind::Pipe(Pipe {
        id: st.st_ino,
        read_end,
        data: Vec::new(),
    })
}

/// A pipe is ours only if both ends are here; else it goes to something outside.
pub fn pair_up(out: &mut [FdState], pipes: &Ends) {
    for st in out.iter_mut() {
        if let FdKind::Pipe(Pipe { id, read_end, .. }) = st.kind {
            let other = pipes.iter().find(|p| p.0 == id && p.2 != read_end);
            match other {
                None => {
                    st.kind = FdKind::Inherited(Inherited {
                        desc: alloc::format!("pipe:[{id}]"),
                    })
                }
                Some(&(_, wfd, _)) if read_end => {
                    let data = drain_and_refill(st.fd, wfd);
                    st.kind = FdKind::Pipe(Pipe { id, read_end, data });
                }
                Some(_) => {}
            }
        }
    }
}

/// Takes the bytes buffered in a pipe (both ends are ours, every other thread is parked) and
/// puts them straight back, keeping a copy for the image.
fn drain_and_refill(rfd: i32, wfd: i32) -> Vec<u8> {
    let mut avail: i32 = 0;
    // SAFETY: FIONREAD writes an int.
    unsafe { sc!(libc::SYS_ioctl, rfd, libc::FIONREAD, &mut avail as *mut i32) };
    if avail <= 0 {
        return Vec::new();
    }
    let mut data = alloc::vec![0u8; avail as usize];
    let mut got = 0;
    while got < data.len() {
        match sys::read(rfd, &mut data[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    data.truncate(got);
    let _ = sys::write_all(wfd, &data);
    data
}
