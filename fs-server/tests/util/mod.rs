//! Shared set-up of the fs-server tests: a server in-process on 127.0.0.1 exporting a
//! temporary directory as volume "vol", and tarpc clients of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::auth::ClusterKey;
use common::config::NodeConfig;
use common::fsproto::{
    connect_channel, CacheCallback, ChannelKind, Creds, Entry, FileHandle, FileServiceClient,
    OpenFile, Opened,
};
use futures::StreamExt;
use tarpc::context::{self, Context};
use tarpc::server::{BaseChannel, Channel};
use tokio::sync::oneshot;

pub const KEY: &[u8] = b"test-cluster-key-0123456789";
pub const MAX_FRAME: usize = 8 << 20;

pub fn ctx() -> Context {
    context::current()
}

pub fn root() -> Creds {
    Creds {
        uid: 0,
        gid: 0,
        groups: vec![],
        pid: 1,
    }
}

pub fn user(uid: u32) -> Creds {
    Creds {
        uid,
        gid: uid,
        groups: vec![],
        pid: 1,
    }
}

/// A running fs-server over a temporary volume directory.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub config: NodeConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// The exported directory.
    pub fn vol(&self) -> PathBuf {
        self.dir.path().join("vol")
    }

    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut NodeConfig)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("vol")).unwrap();
        // Let every test uid walk to the volume.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            dir.path().join("vol"),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        let mut config = config_for(dir.path());
        tweak(&mut config);
        Self::start_in(dir, config).await
    }

    pub async fn start_in(dir: tempfile::TempDir, config: NodeConfig) -> TestServer {
        let key = ClusterKey::from_bytes(KEY);
        let srv = fs_server::Server::new(config.clone(), key).expect("server starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(fs_server::serve(srv, listener, async {
            let _ = rx.await;
        }));
        TestServer {
            dir,
            addr,
            config,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the server and hands back its directory (for a restart test).
    pub async fn stop(mut self) -> (tempfile::TempDir, NodeConfig) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
        let TestServer { dir, config, .. } = self;
        (dir, config)
    }

    pub async fn client(&self) -> FileServiceClient {
        client_with_key(self.addr, KEY)
            .await
            .expect("client connects")
    }

    pub async fn root_entry(&self, c: &FileServiceClient) -> Entry {
        c.root(ctx(), "vol".into())
            .await
            .unwrap()
            .expect("root of vol")
    }
}

pub fn config_for(dir: &Path) -> NodeConfig {
    let text = format!(
        r#"
node = "ws1"
key_file = "{}/key"
[[nodes]]
name = "ws1"
addr = "127.0.0.1"
[fs]
export_root = false
[[fs.volumes]]
name = "vol"
path = "{}/vol"
"#,
        dir.display(),
        dir.display()
    );
    let c: NodeConfig = toml::from_str(&text).expect("test config parses");
    c.validate().expect("test config valid");
    c
}

pub async fn client_with_key(
    addr: SocketAddr,
    key: &[u8],
) -> Result<FileServiceClient, common::transport::ConnectError> {
    let (t, _peer) = connect_channel(
        addr,
        &ClusterKey::from_bytes(key),
        "ws2",
        MAX_FRAME,
        ChannelKind::Requests,
        0,
    )
    .await?;
    Ok(FileServiceClient::new(tarpc::client::Config::default(), t).spawn())
}

/// Entry drops a callback channel was told: (parent ino, name).
pub type EntryLog = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// What a client's callback channel was told: invalidations, then entry drops.
#[derive(Clone, Default)]
pub struct Recorder(pub Arc<Mutex<Vec<(u64, bool)>>>, pub EntryLog);

impl CacheCallback for Recorder {
    async fn invalidate(self, _: Context, ino: u64, uncached: bool) {
        self.0.lock().unwrap().push((ino, uncached));
    }
    async fn invalidate_entry(self, _: Context, parent_ino: u64, name: Vec<u8>) {
        self.1.lock().unwrap().push((parent_ino, name));
    }
}

/// A registered session with a callback channel that records invalidations.
pub async fn session_with_callbacks(
    addr: SocketAddr,
    name: &str,
    token: u64,
) -> (FileServiceClient, Recorder) {
    let c = client_with_key(addr, KEY).await.unwrap();
    c.register(ctx(), name.to_string(), token)
        .await
        .unwrap()
        .unwrap();
    let (t, _) = connect_channel(
        addr,
        &ClusterKey::from_bytes(KEY),
        name,
        MAX_FRAME,
        ChannelKind::Callbacks,
        token,
    )
    .await
    .unwrap();
    let rec = Recorder::default();
    let serve = rec.clone();
    tokio::spawn(
        BaseChannel::with_defaults(t)
            .execute(serve.serve())
            .for_each(|f| async {
                tokio::spawn(f);
            }),
    );
    (c, rec)
}

pub fn of(h: &FileHandle, o: &Opened, flags: i32) -> OpenFile {
    OpenFile {
        id: o.id,
        handle: h.clone(),
        flags,
    }
}

/// Creates and opens `name` in `dir` as `creds`.
pub async fn create(
    c: &FileServiceClient,
    creds: &Creds,
    dir: &FileHandle,
    name: &str,
    mode: u32,
    flags: i32,
) -> (Entry, OpenFile, Opened) {
    let (e, o) = c
        .create(
            ctx(),
            creds.clone(),
            dir.clone(),
            name.into(),
            mode,
            0o022,
            flags,
        )
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("create {name}: {err}"));
    let f = of(&e.handle, &o, flags);
    (e, f, o)
}
