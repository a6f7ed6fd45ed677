//! Kernel knobs outside the FUSE protocol that decide throughput (FUSE-NOTES "Kernel
//! limits"): the request-size cap, read before mounting, and the mount's readahead,
//! set after mounting. Failures are logged and ignored: the mount works without them,
//! only slower.

use std::path::Path;

/// sysctl `fs.fuse.max_pages_limit`: the largest request, in pages, any FUSE
/// connection may negotiate; read when a connection is made.
const MAX_PAGES_LIMIT: &str = "/proc/sys/fs/fuse/max_pages_limit";

/// Pages per request we want: 256 x 4 KiB = 1 MiB reads and writes.
pub const WANTED_MAX_PAGES: u64 = 256;

/// Readahead of the mount, in KiB.
pub const READ_AHEAD_KB: u64 = 4096;

/// Raises `fs.fuse.max_pages_limit` to [`WANTED_MAX_PAGES`] if it is lower.
pub fn raise_max_pages_limit() {
    match std::fs::read_to_string(MAX_PAGES_LIMIT) {
        Ok(text) => {
            let current: u64 = text.trim().parse().unwrap_or(0);
            if current >= WANTED_MAX_PAGES {
                tracing::debug!(current, "fs.fuse.max_pages_limit already large enough");
                return;
            }
            match std::fs::write(MAX_PAGES_LIMIT, WANTED_MAX_PAGES.to_string()) {
                Ok(()) => tracing::info!(
                    from = current,
                    to = WANTED_MAX_PAGES,
                    "raised fs.fuse.max_pages_limit for 1 MiB requests"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot raise fs.fuse.max_pages_limit to {WANTED_MAX_PAGES}; requests stay small (run as root)"
                ),
            }
        }
        Err(e) => tracing::debug!(error = %e, "no fs.fuse.max_pages_limit on this kernel"),
    }
}

/// The `major:minor` device of the mount at `mountpoint`, from /proc/self/mountinfo
/// (the last mount there wins, as the kernel stacks them).
pub fn mount_device(mountpoint: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.to_str()?;
    text.lines().rev().find_map(|line| {
        let mut f = line.split(' ');
        let dev = f.nth(2)?;
        let _root = f.next()?;
        let mp = f.next()?;
        (unescape_mountinfo(mp) == want).then(|| dev.to_string())
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &s[i + 1..i + 4];
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Raises the readahead of the mount whose device is `dev` (`major:minor`).
pub fn raise_read_ahead(dev: &str) {
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&path, READ_AHEAD_KB.to_string()) {
        Ok(()) => tracing::debug!(%path, kb = READ_AHEAD_KB, "raised readahead"),
        Err(e) => {
            tracing::warn!(%path, error = %e, "cannot raise readahead; large reads stay slower")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/..."), "/...");
        assert_eq!(unescape_mountinfo("/x\\"), "/x\\");
    }
}
