//! A directory the program had open: reopened with `O_DIRECTORY`.

use snapshim_image::{Directory, FdState};

use super::{Prepare, Prepared};

pub fn prepare(cx: &Prepare, f: &FdState, d: &Directory) -> Result<Prepared, String> {
    cx.reopen(f, &d.path, libc::O_DIRECTORY).map(Prepared::At)
}
