//! Descriptors the image does not rebuild, capture side: the standard ones (0-2) are inherited
//! from whoever restores the program; any other of a kind snapshim does not know is recorded as
//! unsupported, with what the kernel calls it.

use alloc::string::String;

use snapshim_image::{FdKind, Inherited, Unsupported};

pub fn capture(fd: i32, desc: String) -> FdKind {
    if fd <= 2 {
        FdKind::Inherited(Inherited { desc })
    } else {
        FdKind::Unsupported(Unsupported { desc })
    }
}
