//! An epoll instance (`epoll_create(2)`) and what it watches.

use serde::{Deserialize, Serialize};

/// Every registration, in the order fdinfo lists them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Epoll {
    pub watches: Vec<EpollWatch>,
}

/// One registration: `epoll_ctl(ADD, fd, {events, data})`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EpollWatch {
    /// A descriptor of the program that is the watched file. Usually the number it was
    /// registered with; when that number was closed (or reused) since, another descriptor of
    /// the same open file.
    pub fd: i32,
    /// The events as the kernel keeps them: `EPOLLIN`..., `EPOLLET`, `EPOLLONESHOT` (with no
    /// event bit left once it fired), `EPOLLEXCLUSIVE`, `EPOLLWAKEUP`.
    pub events: u32,
    pub data: u64,
}
