//! migd: not yet written.
