//! Parsing of /proc/PID/fdinfo/FD and classification of /proc/PID/fd/FD link targets.
//! Pure: tested without a process.

use std::collections::BTreeMap;

/// The fields of one fdinfo file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdInfo {
    pub pos: u64,
    /// open(2) flags (octal in the file).
    pub flags: i32,
    pub mnt_id: u64,
    /// Every other "key: value" line (eventfd-count, tfd, ...), first value kept.
    pub extra: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FdInfoError {
    #[error("fdinfo: missing or bad {0} field")]
    Field(&'static str),
}

pub fn parse_fdinfo(text: &str) -> Result<FdInfo, FdInfoError> {
    let mut info = FdInfo::default();
    let mut have_pos = false;
    let mut have_flags = false;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k {
            "pos" => {
                info.pos = v.parse().map_err(|_| FdInfoError::Field("pos"))?;
                have_pos = true;
            }
            "flags" => {
                info.flags = i32::from_str_radix(v, 8).map_err(|_| FdInfoError::Field("flags"))?;
                have_flags = true;
            }
            "mnt_id" => info.mnt_id = v.parse().map_err(|_| FdInfoError::Field("mnt_id"))?,
            _ => {
                info.extra
                    .entry(k.to_string())
                    .or_insert_with(|| v.to_string());
            }
        }
    }
    if !have_pos {
        return Err(FdInfoError::Field("pos"));
    }
    if !have_flags {
        return Err(FdInfoError::Field("flags"));
    }
    Ok(info)
}

/// What an fd's /proc link says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    /// An absolute path (possibly ending in " (deleted)").
    Path(String),
    Pipe(u64),
    Socket(u64),
    /// `anon_inode:[eventfd]` and friends: the name inside.
    AnonInode(String),
    Other(String),
}

pub fn classify_link(target: &str) -> LinkKind {
    fn inode(s: &str, prefix: &str) -> Option<u64> {
        s.strip_prefix(prefix)?
            .strip_prefix('[')?
            .strip_suffix(']')?
            .parse()
            .ok()
    }
    if let Some(i) = inode(target, "pipe:") {
        return LinkKind::Pipe(i);
    }
    if let Some(i) = inode(target, "socket:") {
        return LinkKind::Socket(i);
    }
    if let Some(rest) = target.strip_prefix("anon_inode:") {
        let name = rest.trim_start_matches('[').trim_end_matches(']');
        return LinkKind::AnonInode(name.to_string());
    }
    if target.starts_with('/') {
        return LinkKind::Path(target.to_string());
    }
    LinkKind::Other(target.to_string())
}

/// The "tfd:" lines of an epoll fdinfo: (target fd, events, data).
pub fn parse_epoll_targets(text: &str) -> Vec<(i32, u32, u64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("tfd:") else {
            continue;
        };
        let w: Vec<&str> = rest.split_whitespace().collect();
        let get = |key: &str| {
            w.iter()
                .position(|x| *x == key)
                .and_then(|i| w.get(i + 1))
                .copied()
        };
        let (Some(fd), Some(ev), Some(data)) = (w.first(), get("events:"), get("data:")) else {
            continue;
        };
        if let (Ok(fd), Ok(ev), Ok(data)) = (
            fd.parse(),
            u32::from_str_radix(ev, 16),
            u64::from_str_radix(data, 16),
        ) {
            out.push((fd, ev, data));
        }
    }
    out
}

/// A "(sec, nsec)" pair as timerfd fdinfo prints it.
pub fn parse_pair(v: &str) -> Option<(u64, u64)> {
    let (a, b) = v
        .trim()
        .strip_prefix('(')?
        .strip_suffix(')')?
        .split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_targets_and_timer_pairs_are_parsed() {
        let t = "pos:\t0\nflags:\t02\ntfd:        3 events:       19 data:                3  pos:0 ino:40f sdev:10\ntfd:       10 events: 80000001 data: ffffffffffffffff  pos:0 ino:1 sdev:1\n";
        assert_eq!(
            parse_epoll_targets(t),
            vec![(3, 0x19, 3), (10, 0x8000_0001, u64::MAX)]
        );
        assert_eq!(parse_pair(" (2, 999943464)"), Some((2, 999_943_464)));
    }

    #[test]
    fn fdinfo_pos_flags_are_parsed_octal_flags() {
        let i = parse_fdinfo("pos:\t4096\nflags:\t02100002\nmnt_id:\t25\nino:\t77\n").unwrap();
        assert_eq!(i.pos, 4096);
        assert_eq!(i.flags, 0o2100002);
        assert_eq!(i.flags & libc::O_CLOEXEC, libc::O_CLOEXEC);
        assert_eq!(i.flags & libc::O_ACCMODE, libc::O_RDWR);
        assert_eq!(i.mnt_id, 25);
        assert_eq!(i.extra.get("ino").map(String::as_str), Some("77"));
    }

    #[test]
    fn fdinfo_without_flags_is_an_error() {
        assert_eq!(parse_fdinfo("pos: 0\n"), Err(FdInfoError::Field("flags")));
    }

    #[test]
    fn links_are_classified() {
        assert_eq!(classify_link("pipe:[123]"), LinkKind::Pipe(123));
        assert_eq!(classify_link("socket:[9]"), LinkKind::Socket(9));
        assert_eq!(
            classify_link("anon_inode:[eventfd]"),
            LinkKind::AnonInode("eventfd".into())
        );
        assert_eq!(
            classify_link("anon_inode:inotify"),
            LinkKind::AnonInode("inotify".into())
        );
        assert_eq!(
            classify_link("/tmp/x (deleted)"),
            LinkKind::Path("/tmp/x (deleted)".into())
        );
    }
}
