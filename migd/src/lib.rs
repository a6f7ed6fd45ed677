//! migd: the migration daemon and its checkpoint/restore engine.
//!
//! This crate owns the engine that extracts a running process's state into an image
//! and rebuilds it elsewhere ([`engine`]), using kernel interfaces only (ptrace,
//! process_vm_readv/writev, /proc, pidfd_getfd, clone3 set_tid). `migd dump` and
//! `migd restore` expose the engine alone. The daemon mode (load reporting, migration
//! RPC) will talk to home-proxy and fs-server through `common`'s service traits.
//! Raw syscalls and `unsafe` live in [`sys`] only.

pub mod cli;
pub mod daemon;
pub mod engine;
pub mod phases;
pub mod sys;
