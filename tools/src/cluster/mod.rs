//! The cluster: nodes that keep a program running on one of them and its images on the others
//! (DESIGN.md section 13). One file per concern; imports go one way: commands (`node.rs`,
//! `service.rs`) → agent (`agent.rs`, `leader.rs`, `standby.rs`) → `lease.rs`, `program.rs`,
//! `view.rs`, `events.rs` → replicate / etcd (`etcd.rs`, `http.rs`, `keys.rs`) → the image
//! crate.

mod agent;
mod etcd;
mod events;
mod http;
mod keys;
mod leader;
mod lease;
pub mod node;
mod program;
pub mod replicate;
pub mod service;
mod standby;
mod view;
