//! The checkpoint/restore engine: freeze ([`freeze`]), read the layout ([`maps`]) and
//! fds ([`fdinfo`]), run syscalls inside the target ([`inject`]), write and read images
//! ([`image`]); [`dump`] and [`restore`] put them together.

pub mod areawatch;
pub mod dump;
pub mod fdinfo;
pub mod freeze;
pub mod handoff;
pub mod image;
pub mod inject;
pub mod late;
pub mod maps;
pub mod procfs;
pub mod regs;
pub mod restore;
#[cfg(test)]
pub(crate) mod testproc;
pub mod throttle;
pub mod track;
