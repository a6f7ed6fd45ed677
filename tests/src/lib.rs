//! The local-cluster harness: not yet written.
