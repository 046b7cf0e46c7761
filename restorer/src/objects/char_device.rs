//! A character device the program had open (`/dev/null`, `/dev/urandom`...): reopened by path.

use snapshim_image::{CharDevice, FdState};

use super::{Prepare, Prepared};

pub fn prepare(cx: &Prepare, f: &FdState, d: &CharDevice) -> Result<Prepared, String> {
    cx.reopen(f, &d.path, 0).map(Prepared::At)
}
