//! The cluster: nodes that keep a program running on one of them and its images on the others
//! (DESIGN.md section 13). One file per concern; imports go one way: commands → agent →
//! replicate/etcd → the image crate.

pub mod replicate;
