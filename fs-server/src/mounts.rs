//! The mounts fs-server reaches files through: a descriptor per mount id (what
//! open_by_handle_at needs), and the policy of which mounts a lookup may enter.
//!
//! FUSE mounts (the super-root `/...` included, so `/.../ws1/.../ws1` cannot loop),
//! /proc, /sys, /dev and the other kernel pseudo file systems are never entered: a
//! lookup of their mount point answers ENOENT and readdir leaves them out. Other mounts
//! are entered when `fs.cross_mounts` is set, else they are treated the same way.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::sys;

/// One line of /proc/self/mountinfo, the parts fs-server uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub id: i32,
    pub mount_point: PathBuf,
    pub fstype: String,
}

/// File-system types whose mounts are never entered.
const NEVER: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "bpf",
    "pstore",
    "configfs",
    "mqueue",
    "binfmt_misc",
    "efivarfs",
    "autofs",
    "nsfs",
    "hugetlbfs",
    "selinuxfs",
    "rpc_pipefs",
];

/// Whether a lookup may cross into this mount.
pub fn may_enter(info: &MountInfo, cross_mounts: bool) -> bool {
    if info.fstype == "fuse" || info.fstype.starts_with("fuse.") || info.fstype == "fuseblk" {
        return false;
    }
    if info.fstype.starts_with("fuse") || NEVER.contains(&info.fstype.as_str()) {
        return false;
    }
    for p in ["/proc", "/sys", "/dev"] {
        if info.mount_point.starts_with(p) {
            return false;
        }
    }
    cross_mounts
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
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

/// Parses /proc/self/mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || sep + 1 >= fields.len() {
            continue;
        }
        let Ok(id) = fields[0].parse() else { continue };
        out.push(MountInfo {
            id,
            mount_point: PathBuf::from(unescape(fields[4])),
            fstype: fields[sep + 1].to_string(),
        });
    }
    out
}

/// Descriptors of the mounts handles were minted on, and their mountinfo.
#[derive(Default)]
pub struct Mounts {
    fds: Mutex<HashMap<i32, Arc<OwnedFd>>>,
    info: Mutex<HashMap<i32, MountInfo>>,
}

impl Mounts {
    fn reload_info(&self) {
        match std::fs::read_to_string("/proc/self/mountinfo") {
            Ok(text) => {
                let mut info = self.info.lock().expect("mount info lock");
                info.clear();
                for m in parse_mountinfo(&text) {
                    info.insert(m.id, m);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read /proc/self/mountinfo"),
        }
    }

    /// What /proc/self/mountinfo says of a mount id (re-read on a miss).
    pub fn info(&self, id: i32) -> Option<MountInfo> {
        if let Some(m) = self.info.lock().expect("mount info lock").get(&id) {
            return Some(m.clone());
        }
        self.reload_info();
        self.info.lock().expect("mount info lock").get(&id).cloned()
    }

    /// Remembers a descriptor on mount `id` (any object on it but not O_PATH).
    pub fn register(&self, id: i32, fd: OwnedFd) {
        self.fds
            .lock()
            .expect("mount fds lock")
            .entry(id)
            .or_insert_with(|| Arc::new(fd));
    }

    /// A descriptor on mount `id`: remembered, or (after a restart) opened from its
    /// mount point and checked to be that very mount.
    pub fn fd(&self, id: i32) -> std::io::Result<Arc<OwnedFd>> {
        if let Some(fd) = self.fds.lock().expect("mount fds lock").get(&id) {
            return Ok(fd.clone());
        }
        let info = self.info(id).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("mount {id} no longer exists"),
            )
        })?;
        let fd = open_mount_fd(&info.mount_point)?;
        let st = sys::fstatx(fd.as_fd(), true)?;
        if st.stx_mnt_id != id as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "mount {id} at {} is covered by another mount",
                    info.mount_point.display()
                ),
            ));
        }
        self.register(id, fd);
        Ok(self.fds.lock().expect("mount fds lock")[&id].clone())
    }
}

/// Opens a mount point for open_by_handle_at, which refuses O_PATH descriptors. Mount
/// points are usually directories; a file bind-mounted over a file is opened read-only
/// without blocking; anything else (a device, a fifo) is refused rather than opened.
pub fn open_mount_fd(p: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let probe = sys::openat(sys::cwd(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    let st = sys::fstatx(probe.as_fd(), true)?;
    match st.stx_mode as u32 & libc::S_IFMT {
        libc::S_IFDIR => sys::reopen(probe.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY),
        libc::S_IFREG => sys::reopen(
            probe.as_fd(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
        ),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("mount point {} is not a directory or file", p.display()),
        )),
    }
}

/// Opens a directory path O_PATH (used for volume roots).
pub fn open_dir_path(p: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    sys::openat(sys::cwd(), &c, libc::O_PATH | libc::O_DIRECTORY, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:50 / /... rw,nosuid,nodev,relatime shared:1 - fuse.ferry ferry rw,user_id=0
41 27 0:51 / /mnt/with\\040space rw - tmpfs tmpfs rw
42 24 0:24 / /dev/pts rw - devpts devpts rw";

    #[test]
    fn mountinfo_is_parsed() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 5);
        assert_eq!(m[2].fstype, "fuse.ferry");
        assert_eq!(m[2].mount_point, PathBuf::from("/..."));
        assert_eq!(m[3].mount_point, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn pseudo_and_fuse_mounts_are_never_entered() {
        let m = parse_mountinfo(SAMPLE);
        assert!(!may_enter(&m[0], true), "/proc entered");
        assert!(!may_enter(&m[2], true), "FUSE super-root entered");
        assert!(!may_enter(&m[4], true), "/dev/pts entered");
        assert!(
            may_enter(&m[3], true),
            "tmpfs not entered with cross_mounts"
        );
        assert!(
            !may_enter(&m[3], false),
            "tmpfs entered without cross_mounts"
        );
    }
}
