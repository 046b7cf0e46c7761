//! Copy-on-write engines.

pub mod uffd;
