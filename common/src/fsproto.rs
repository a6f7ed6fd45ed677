//! The file service: what fuse-client asks of fs-server, and the callbacks fs-server
//! makes to fuse-client.
//!
//! Objects are named by [`FileHandle`]s: opaque tokens minted by fs-server (a kernel
//! file handle from `name_to_handle_at` plus the volume, signed with a key derived from
//! the cluster key). They stay valid across an fs-server restart, as NFS handles do, and
//! a client cannot forge one that names a file outside a volume.
//!
//! Every request that touches a file's data or the namespace carries the caller's
//! [`Creds`]; fs-server performs it with those credentials.
//!
//! Open files are named by [`OpenFile`], which carries the handle and open flags beside
//! the server's open id, so that a restarted server can reopen a file it has never seen
//! and the client's read or write goes on.
//!
//! Caching follows Sprite: fs-server counts the opens of each file per client. When a
//! file becomes write-shared (open on two or more clients, at least one for writing),
//! fs-server calls every caching client back ([`CacheCallback::invalidate`]) and the
//! file is served uncached until the sharing ends. See `docs/protocol.md`.

// The tarpc-generated client and request types of FileService take up to 8
// arguments; clippy's too_many_arguments fires inside the macro expansion.
#![allow(clippy::too_many_arguments)]

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What a connection to fs-server carries. Right after the cluster-key handshake the
/// client writes one byte, the kind; a [`ChannelKind::Callbacks`] connection then writes
/// the 8-byte little-endian token it passed to [`FileService::register`] on its
/// requests connection. Then tarpc frames follow: on a requests connection the client
/// calls [`FileService`]; on a callbacks connection the *server* calls
/// [`CacheCallback`] and the client answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChannelKind {
    /// The client calls [`FileService`].
    Requests = 0,
    /// The server calls [`CacheCallback`]; followed by the 8-byte token.
    Callbacks = 1,
}

impl ChannelKind {
    /// The kind a preamble byte names, if any.
    pub fn from_byte(b: u8) -> Option<ChannelKind> {
        match b {
            0 => Some(ChannelKind::Requests),
            1 => Some(ChannelKind::Callbacks),
            _ => None,
        }
    }

    /// Writes the preamble: the kind byte, then `token` (LE) for callbacks.
    pub async fn write_preamble<S: AsyncWrite + Unpin>(
        self,
        s: &mut S,
        token: u64,
    ) -> std::io::Result<()> {
        let mut buf = vec![self as u8];
        if self == ChannelKind::Callbacks {
            buf.extend_from_slice(&token.to_le_bytes());
        }
        s.write_all(&buf).await
    }

    /// Reads a preamble: the kind and, for callbacks, the token (0 for requests).
    /// An unknown kind byte is `InvalidData`.
    pub async fn read_preamble<S: AsyncRead + Unpin>(
        s: &mut S,
    ) -> std::io::Result<(ChannelKind, u64)> {
        let b = s.read_u8().await?;
        match ChannelKind::from_byte(b) {
            Some(ChannelKind::Requests) => Ok((ChannelKind::Requests, 0)),
            Some(ChannelKind::Callbacks) => Ok((ChannelKind::Callbacks, s.read_u64_le().await?)),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown fs channel kind {b} (expected 0 = requests, 1 = callbacks)"),
            )),
        }
    }
}

/// An opaque, server-signed name for a file, directory or symlink.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileHandle(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// Who is asking: the credentials the server acts with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Caller's pid on the client node (for logs and lock owners only).
    pub pid: u32,
}

/// File types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// A timestamp: seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

/// What `stat` says of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    /// Stable identity of the file within the cluster (derived from the volume and the
    /// server's device and inode numbers).
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub kind: FileKind,
    /// Permission bits (the low 12 bits of st_mode).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// A looked-up name: its handle and attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub handle: FileHandle,
    pub attr: Attr,
}

/// A time to set: now, or a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    Now,
    At(Time),
}

/// The changes of a setattr; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// One directory entry; `entry` is filled for readdirplus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub kind: FileKind,
    /// Cookie to continue reading after this entry.
    pub cookie: u64,
    pub entry: Option<Entry>,
}

/// An open file as the client names it in data requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFile {
    /// The server's id for this open; unknown to a restarted server, which then
    /// reopens from `handle` and `flags`.
    pub id: u64,
    pub handle: FileHandle,
    /// The open(2) flags (O_ACCMODE, O_APPEND, ...).
    pub flags: i32,
}

/// How the client may cache an open file's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheMode {
    /// Cache pages; `keep` says the client's cached pages are still valid (the file
    /// did not change since the version the client last saw).
    Cached { keep: bool },
    /// The file is write-shared across nodes: no page cache, every read goes to the
    /// server.
    Uncached,
}

/// The answer to open and create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opened {
    pub id: u64,
    pub cache: CacheMode,
    pub attr: Attr,
}

/// File system statistics of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// A POSIX byte-range lock (or a whole-file flock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub start: u64,
    /// Last byte, inclusive (u64::MAX: to end of file).
    pub end: u64,
    /// libc::F_RDLCK, F_WRLCK or F_UNLCK.
    pub typ: i32,
    /// Pid of the holder, as reported to getlk callers.
    pub pid: u32,
}

/// A volume of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    /// The node whose fs-server serves it.
    pub node: String,
}

/// A file-service error: an errno the client hands to the kernel, plus what failed,
/// for the logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{what}: {}", std::io::Error::from_raw_os_error(*errno))]
pub struct FsError {
    pub errno: i32,
    pub what: String,
}

impl FsError {
    pub fn new(errno: i32, what: impl Into<String>) -> FsError {
        FsError {
            errno,
            what: what.into(),
        }
    }
}

/// Shorthand for results of the file service.
pub type FsResult<T> = Result<T, FsError>;

/// The file service fs-server offers on `ports.fs`.
#[tarpc::service]
pub trait FileService {
    /// Volumes this server exports.
    async fn volumes() -> Vec<VolumeInfo>;
    /// Root of a volume.
    async fn root(volume: String) -> FsResult<Entry>;
    /// Registers this connection as a client session; opens and locks are counted per
    /// session. `callback_token` pairs it with the callback connection the client opens
    /// next (see [`CacheCallback`]).
    async fn register(client_node: String, callback_token: u64) -> FsResult<()>;

    async fn lookup(creds: Creds, parent: FileHandle, name: Vec<u8>) -> FsResult<Entry>;
    async fn getattr(handle: FileHandle) -> FsResult<Attr>;
    async fn setattr(
        creds: Creds,
        handle: FileHandle,
        set: SetAttr,
        open: Option<OpenFile>,
    ) -> FsResult<Attr>;
    async fn readlink(creds: Creds, handle: FileHandle) -> FsResult<Vec<u8>>;
    /// Entries after `cookie` (0 = from the start), at most `max`; `plus` fills
    /// [`DirEntry::entry`]. An empty answer is the end.
    async fn readdir(
        creds: Creds,
        dir: FileHandle,
        cookie: u64,
        max: u32,
        plus: bool,
    ) -> FsResult<Vec<DirEntry>>;

    async fn mknod(
        creds: Creds,
        parent: FileHandle,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<Entry>;
    async fn mkdir(
        creds: Creds,
        parent: FileHandle,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
    ) -> FsResult<Entry>;
    async fn symlink(
        creds: Creds,
        parent: FileHandle,
        name: Vec<u8>,
        target: Vec<u8>,
    ) -> FsResult<Entry>;
    async fn link(
        creds: Creds,
        target: FileHandle,
        new_parent: FileHandle,
        new_name: Vec<u8>,
    ) -> FsResult<Entry>;
    async fn unlink(creds: Creds, parent: FileHandle, name: Vec<u8>) -> FsResult<()>;
    async fn rmdir(creds: Creds, parent: FileHandle, name: Vec<u8>) -> FsResult<()>;
    /// `flags`: RENAME_NOREPLACE / RENAME_EXCHANGE, as renameat2.
    async fn rename(
        creds: Creds,
        parent: FileHandle,
        name: Vec<u8>,
        new_parent: FileHandle,
        new_name: Vec<u8>,
        flags: u32,
    ) -> FsResult<()>;

    async fn open(creds: Creds, handle: FileHandle, flags: i32) -> FsResult<Opened>;
    async fn create(
        creds: Creds,
        parent: FileHandle,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> FsResult<(Entry, Opened)>;
    async fn read(
        creds: Creds,
        file: OpenFile,
        offset: u64,
        size: u32,
    ) -> FsResult<serde_bytes::ByteBuf>;
    /// Writes at `offset`, or at the end of file for O_APPEND opens (the server's end,
    /// not the client's idea of it). Returns bytes written.
    async fn write(
        creds: Creds,
        file: OpenFile,
        offset: u64,
        data: serde_bytes::ByteBuf,
    ) -> FsResult<u32>;
    async fn fsync(file: OpenFile, datasync: bool) -> FsResult<()>;
    /// Last close of this open on the client: drops the server's open and releases
    /// the locks of `lock_owner` taken through it.
    async fn release(file: OpenFile, lock_owner: Option<u64>) -> FsResult<()>;
    /// close(2) of one fd: POSIX locks of `lock_owner` on this file are released.
    async fn flush(file: OpenFile, lock_owner: u64) -> FsResult<()>;
    async fn statfs(handle: FileHandle) -> FsResult<StatFs>;

    async fn getlk(file: OpenFile, lock_owner: u64, lock: Lock) -> FsResult<Lock>;
    /// Takes or releases a lock. With `wait` the server waits for a conflicting lock
    /// to go (the call's deadline bounds it); without, it answers EAGAIN at once.
    /// `flock` selects flock(2) semantics (whole file, per open) over POSIX ones.
    async fn setlk(
        file: OpenFile,
        lock_owner: u64,
        lock: Lock,
        wait: bool,
        flock: bool,
    ) -> FsResult<()>;
}

/// The callbacks fs-server makes to each client, on a second connection the client
/// opens and announces with the token it passed to `register`.
#[tarpc::service]
pub trait CacheCallback {
    /// Drop cached pages and attributes of the file with this `ino`; if `uncached`,
    /// serve it uncached from now on until a later open is answered `Cached`.
    async fn invalidate(ino: u64, uncached: bool);
    /// Drop the cached entry `name` in directory `parent_ino` (renamed or removed
    /// by another client).
    async fn invalidate_entry(parent_ino: u64, name: Vec<u8>);
}

/// Connects to an fs-server, proves the key, writes the preamble (`token` is sent for
/// [`ChannelKind::Callbacks`] only), and returns the framed transport and the server's
/// proven name. For requests wrap it in a [`FileServiceClient`]; for callbacks serve
/// [`CacheCallback`] on it.
pub async fn connect_channel<In, Out>(
    addr: std::net::SocketAddr,
    key: &crate::auth::ClusterKey,
    my_name: &str,
    max_frame: usize,
    kind: ChannelKind,
    token: u64,
) -> Result<(crate::transport::RpcTransport<In, Out>, String), crate::transport::ConnectError>
where
    In: for<'de> Deserialize<'de>,
    Out: Serialize,
{
    let (mut stream, peer) = crate::transport::connect_stream(addr, key, my_name).await?;
    kind.write_preamble(&mut stream, token)
        .await
        .map_err(|source| crate::transport::ConnectError::Connect { addr, source })?;
    Ok((crate::transport::frame(stream, max_frame), peer))
}
