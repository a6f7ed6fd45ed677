//! The file operations, as blocking functions over the [`Server`](crate::server::Server)
//! state: `meta` (lookup, attributes, statfs), `dir` (readdir and namespace changes),
//! `data` (open, create, read, write, fsync).

pub mod data;
pub mod dir;
pub mod meta;
