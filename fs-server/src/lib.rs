//! fs-server: not yet written.
