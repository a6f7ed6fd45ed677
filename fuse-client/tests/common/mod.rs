//! Test bench for fuse-client: in-process fs-servers on 127.0.0.1 exporting temp
//! directories, and fuse-client mounts of them, each "node" with its own runtime so
//! that a server can be crashed (its runtime dropped, every socket closed at once)
//! and started again on the same port.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::auth::ClusterKey;
use common::config::{NodeConfig, NodeEntry, VolumeConfig};

/// The node that runs the fs-server in these tests.
pub const SERVER: &str = "ws1";
/// The volume it exports.
pub const VOLUME: &str = "vol";

/// A temp directory with a cluster key, an exported tree and room for mountpoints.
pub struct Bench {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Bench {
    pub fn new() -> Bench {
        if std::env::var_os("RUST_LOG").is_some() {
            ::common::logging::init("fuse-client-test");
        }
        let dir = tempfile::Builder::new()
            .prefix("ferry-fc-")
            .tempdir()
            .expect("can make a temp dir");
        std::fs::write(dir.path().join("key"), b"fuse-client test cluster key 0123")
            .expect("can write the key");
        std::fs::create_dir(dir.path().join("export")).expect("can make the export dir");
        Bench {
            dir,
            port: free_port(),
        }
    }

    /// The exported directory, as the server sees it.
    pub fn export(&self) -> PathBuf {
        self.dir.path().join("export")
    }

    pub fn key(&self) -> ClusterKey {
        ClusterKey::load(&self.dir.path().join("key")).expect("key loads")
    }

    /// The config of node `name` (ws1 is the server at 127.0.0.1; client nodes live
    /// at 127.0.0.<n> where nothing listens).
    pub fn config(&self, name: &str) -> NodeConfig {
        let nodes = ["ws1", "ws2", "ws3"]
            .iter()
            .enumerate()
            .map(|(i, n)| NodeEntry {
                name: n.to_string(),
                addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, i as u8 + 1)),
            })
            .collect();
        let mut c = NodeConfig {
            node: name.to_string(),
            key_file: self.dir.path().join("key"),
            nodes,
            ports: Default::default(),
            fs: Default::default(),
            fuse: Default::default(),
            migd: Default::default(),
        };
        c.ports.fs = self.port;
        c.fs.export_root = false;
        c.fs.volumes = vec![VolumeConfig {
            name: VOLUME.to_string(),
            path: self.export(),
        }];
        c.fuse.mountpoint = self.dir.path().join(format!("mnt-{name}"));
        c.fuse.reconnect_timeout_secs = 60;
        c.validate().expect("test config is valid");
        c
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("can bind a port");
    l.local_addr().unwrap().port()
}

/// An fs-server running on its own runtime.
pub struct Server {
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    pub fn start(config: NodeConfig) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("test-fs-server")
            .build()
            .expect("runtime");
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), config.ports.fs);
        let listener = rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => break l,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("bind {addr}: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("cannot bind fs-server port {addr}: {e}"),
                }
            }
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(async move {
            if let Err(e) = fs_server::run(config, listener, async {
                let _ = rx.await;
            })
            .await
            {
                panic!("fs-server failed to start: {e}");
            }
        });
        Server {
            rt: Some(rt),
            stop: Some(tx),
        }
    }

    /// Like kill -9 as far as the network sees it: every task and socket of the
    /// server goes at once, nothing is shut down cleanly.
    pub fn crash(mut self) {
        self.stop.take();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// A fuse-client mount of one node, on its own runtime.
pub struct Client {
    mounted: Option<fuse_client::Mounted>,
    rt: Option<tokio::runtime::Runtime>,
    pub root: PathBuf,
}

impl Client {
    pub fn mount(bench: &Bench, node: &str) -> Client {
        Client::mount_with(bench, node, |_| {})
    }

    /// Mounts with a changed config (e.g. a short reconnect timeout).
    pub fn mount_with(bench: &Bench, node: &str, change: impl FnOnce(&mut NodeConfig)) -> Client {
        let mut config = bench.config(node);
        change(&mut config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name(format!("test-fc-{node}"))
            .build()
            .expect("runtime");
        let options = fuse_client::MountOptions {
            mountpoint: None,
            unmount_watcher: false,
            threads: 2,
        };
        let mounted = rt
            .block_on(fuse_client::mount(&config, bench.key(), options))
            .unwrap_or_else(|e| panic!("mount of node {node} failed: {e}"));
        Client {
            root: mounted.mountpoint().to_path_buf(),
            mounted: Some(mounted),
            rt: Some(rt),
        }
    }

    /// Number of inodes the client holds for the kernel.
    pub fn known_inodes(&self) -> usize {
        self.mounted.as_ref().map_or(0, |m| m.known_inodes())
    }

    /// `/.../vol` on this node.
    pub fn vol(&self) -> PathBuf {
        self.root.join(VOLUME)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            if let Err(e) = m.unmount() {
                eprintln!("unmount: {e}");
            }
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// Whether `path` is a mountpoint in this mount namespace.
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let want = path.to_str().expect("utf-8 path");
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

/// Waits (up to a generous bound, not a timing assertion) for `cond`.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
