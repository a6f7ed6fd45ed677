//! Ferry's shared ground: everything two daemons must agree on.
//!
//! This crate owns the node configuration file ([`config`]), the mutual
//! challenge-response handshake on the cluster key ([`auth`]), the framed bincode
//! transport every tarpc service runs over ([`transport`]), the RPC service traits and
//! their wire types ([`fsproto`] for the file service, [`migproto`] for migd and
//! home-proxy), the tracing set-up every binary calls first ([`logging`]) and the
//! signal daemons stop on ([`shutdown`]), and the allocator set-up of daemons that
//! move data ([`alloc`]).
//!
//! It owns no daemon logic: `fs-server`, `fuse-client`, `migd` and `home-proxy`
//! depend on it; it depends on none of them.

pub mod alloc;
pub mod auth;
pub mod config;
pub mod fault;
pub mod fsproto;
pub mod logging;
pub mod migproto;
pub mod shutdown;
pub mod transport;
