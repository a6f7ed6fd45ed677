//! fuse-client: not yet written.
