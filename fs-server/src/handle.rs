//! File handles: what fs-server hands clients to name files.
//!
//! ```text
//! version (1) = 1
//! volume name length (1) | volume name
//! mount id (4, LE)            the kernel's mount id (/proc/self/mountinfo, field 1)
//! handle type (4, LE)         from name_to_handle_at
//! handle length (1) | kernel handle bytes
//! tag (32)                    ClusterKey::sign("ferry-fh", everything above)
//! ```
//!
//! The kernel handle stays valid across an fs-server restart (as NFS handles do), so a
//! restarted server accepts the handles of its predecessor. The tag means a client
//! cannot make up a handle: only handles this cluster's servers minted, for files they
//! resolved beneath a volume root, verify.

use common::auth::ClusterKey;
use common::fsproto::{FileHandle, FsError};

use crate::sys::{KernelHandle, MAX_HANDLE_SZ};

const VERSION: u8 = 1;
const PURPOSE: &[u8] = b"ferry-fh";
const TAG: usize = 32;

/// A verified handle, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub volume: String,
    pub mount_id: i32,
    pub kernel: KernelHandle,
}

/// Builds and signs a handle.
pub fn encode(key: &ClusterKey, volume: &str, mount_id: i32, kernel: &KernelHandle) -> FileHandle {
    let mut b = Vec::with_capacity(16 + volume.len() + kernel.bytes.len() + TAG);
    b.push(VERSION);
    b.push(volume.len() as u8);
    b.extend_from_slice(volume.as_bytes());
    b.extend_from_slice(&mount_id.to_le_bytes());
    b.extend_from_slice(&kernel.handle_type.to_le_bytes());
    b.push(kernel.bytes.len() as u8);
    b.extend_from_slice(&kernel.bytes);
    let tag = key.sign(PURPOSE, &b);
    b.extend_from_slice(&tag);
    FileHandle(b)
}

fn forged(why: &str) -> FsError {
    FsError::new(
        libc::EBADF,
        format!("file handle refused: {why} (not minted by this cluster's fs-server)"),
    )
}

/// Checks the tag and takes a handle apart. A handle that was not minted with this
/// cluster's key, or was altered, is refused with EBADF.
pub fn decode(key: &ClusterKey, h: &FileHandle) -> Result<Decoded, FsError> {
    let b = &h.0;
    if b.len() < 1 + 1 + 4 + 4 + 1 + TAG {
        return Err(forged("too short"));
    }
    let (body, tag) = b.split_at(b.len() - TAG);
    if !key.check(PURPOSE, body, tag) {
        return Err(forged("tag does not verify"));
    }
    if body[0] != VERSION {
        return Err(forged("unknown version"));
    }
    let vlen = body[1] as usize;
    let mut at = 2;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], FsError> {
        let s = body.get(*at..*at + n).ok_or_else(|| forged("truncated"))?;
        *at += n;
        Ok(s)
    };
    let volume = String::from_utf8(take(&mut at, vlen)?.to_vec())
        .map_err(|_| forged("volume name is not UTF-8"))?;
    let mount_id = i32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4 bytes"));
    let handle_type = i32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4 bytes"));
    let hlen = take(&mut at, 1)?[0] as usize;
    if hlen > MAX_HANDLE_SZ {
        return Err(forged("kernel handle too long"));
    }
    let bytes = take(&mut at, hlen)?.to_vec();
    if at != body.len() {
        return Err(forged("trailing bytes"));
    }
    Ok(Decoded {
        volume,
        mount_id,
        kernel: KernelHandle { handle_type, bytes },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ClusterKey {
        ClusterKey::from_bytes(b"0123456789abcdef")
    }

    fn kh() -> KernelHandle {
        KernelHandle {
            handle_type: 1,
            bytes: vec![1, 2, 3, 4, 5, 6, 7, 8],
        }
    }

    #[test]
    fn handle_round_trips() {
        let h = encode(&key(), "ws1", 27, &kh());
        let d = decode(&key(), &h).unwrap();
        assert_eq!(d.volume, "ws1");
        assert_eq!(d.mount_id, 27);
        assert_eq!(d.kernel, kh());
    }

    #[test]
    fn every_altered_byte_is_refused() {
        let h = encode(&key(), "ws1", 27, &kh());
        for i in 0..h.0.len() {
            let mut bad = h.clone();
            bad.0[i] ^= 0x40;
            let e = decode(&key(), &bad).unwrap_err();
            assert_eq!(e.errno, libc::EBADF, "byte {i} altered was accepted");
        }
    }

    #[test]
    fn other_key_is_refused() {
        let h = encode(&key(), "ws1", 27, &kh());
        let other = ClusterKey::from_bytes(b"fedcba9876543210");
        assert!(decode(&other, &h).is_err());
        assert!(decode(&key(), &FileHandle(vec![])).is_err());
    }
}
