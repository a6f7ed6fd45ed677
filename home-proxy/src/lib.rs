//! home-proxy: not yet written.
