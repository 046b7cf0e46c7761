//! Character devices, capture side: reopened by path (`/dev/null`, `/dev/urandom`...), but for
//! terminals, which belong to whoever restores the program (inherited).

use alloc::string::String;

use snapshim_image::{CharDevice, FdKind, Inherited};

pub fn capture(path: String) -> FdKind {
    if path.starts_with("/dev/pts/") || path.starts_with("/dev/tty") || path == "/dev/console" {
        FdKind::Inherited(Inherited { desc: path })
    } else {
        FdKind::CharDevice(CharDevice { path })
    }
}
