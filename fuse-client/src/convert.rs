//! Conversions between the file-service protocol and fuser's types: attributes,
//! times, file kinds, credentials, errnos.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::fsproto::{Attr, Creds, FileKind, FsError, SetTime, Time};
use fuser::{Errno, FileAttr, FileType, INodeNo, TimeOrNow};

/// `st_blksize` reported for every file: the largest request (1 MiB).
pub const PREFERRED_IO: u32 = 1 << 20;

/// fuser's file type for a protocol file kind.
pub fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

/// A protocol time as a `SystemTime` (times before 1970 included).
pub fn system_time(t: Time) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(t.nanos as u64)
    }
}

/// A `SystemTime` as a protocol time.
pub fn proto_time(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut secs = -(d.as_secs() as i64);
            let mut nanos = d.subsec_nanos();
            if nanos > 0 {
                secs -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            Time { secs, nanos }
        }
    }
}

/// A setattr time.
pub fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(proto_time(t)),
    }
}

/// The attributes the kernel sees for our inode `ino`.
pub fn file_attr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.ctime),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        // The preferred I/O size: one full request, as NFS reports its rsize/wsize,
        // so that cp and stdio move 1 MiB per call instead of one page.
        blksize: a.blksize.max(PREFERRED_IO),
        flags: 0,
    }
}

/// The errno a protocol error becomes at the FUSE boundary (EIO if it carries none).
pub fn errno(e: &FsError) -> Errno {
    if e.errno > 0 {
        Errno::from_i32(e.errno)
    } else {
        Errno::EIO
    }
}

/// The caller's supplementary groups, from `/proc/<pid>/status`. Empty when the pid
/// is not visible (0: another pid namespace) or already gone.
pub fn groups_of(pid: u32) -> Vec<u32> {
    if pid == 0 {
        return Vec::new();
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    parse_groups(&status)
}

fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the thread `pid` has gone or has a signal pending that it neither blocks
/// nor ignores: a blocking lock request of such a caller should give up with EINTR
/// (fuser cannot pass the kernel's interrupts on).
pub fn caller_interrupted(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => pending_unblocked(&status),
        Err(_) => true,
    }
}

fn pending_unblocked(status: &str) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let pending = field("SigPnd:") | field("ShdPnd:");
    pending & !field("SigBlk:") & !field("SigIgn:") != 0
}

/// The credentials of a FUSE request.
pub fn creds(req: &fuser::Request) -> Creds {
    Creds {
        uid: req.uid(),
        gid: req.gid(),
        groups: groups_of(req.pid()),
        pid: req.pid(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_before_and_after_the_epoch() {
        for t in [
            Time { secs: 0, nanos: 0 },
            Time {
                secs: 1_700_000_000,
                nanos: 123,
            },
            Time {
                secs: -5,
                nanos: 250_000_000,
            },
        ] {
            assert_eq!(
                proto_time(system_time(t)),
                t,
                "time {t:?} changed on the way"
            );
        }
    }

    #[test]
    fn groups_line_is_parsed() {
        let status = "Name:\tbash\nGroups:\t4 24 27 \nVmPeak:\t1 kB\n";
        assert_eq!(parse_groups(status), vec![4, 24, 27]);
        assert!(parse_groups("Name: x\n").is_empty());
    }

    #[test]
    fn own_groups_are_read_from_proc() {
        let me = std::process::id();
        // Whatever they are, reading them must not fail for a live pid.
        let _ = groups_of(me);
        assert!(groups_of(0).is_empty());
    }

    #[test]
    fn pending_signals_count_unless_blocked_or_ignored() {
        let st = |pnd: &str, blk: &str, ign: &str| {
            format!("SigQ:\t0/1\nSigPnd:\t{pnd}\nShdPnd:\t0000000000000000\nSigBlk:\t{blk}\nSigIgn:\t{ign}\n")
        };
        assert!(!pending_unblocked(&st("0000000000000000", "0", "0")));
        assert!(
            pending_unblocked(&st("0000000000000100", "0", "0")),
            "SIGKILL pending"
        );
        assert!(
            !pending_unblocked(&st("0000000000000002", "0000000000000002", "0")),
            "blocked"
        );
        assert!(
            !pending_unblocked(&st("0000000000000002", "0", "0000000000000002")),
            "ignored"
        );
        assert!(
            !caller_interrupted(std::process::id()),
            "this test has nothing pending"
        );
        assert!(!caller_interrupted(0));
    }

    #[test]
    fn errno_zero_becomes_eio() {
        assert_eq!(errno(&FsError::new(0, "x")).code(), libc::EIO);
        assert_eq!(errno(&FsError::new(libc::ENOENT, "x")).code(), libc::ENOENT);
    }
}
