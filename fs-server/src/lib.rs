//! fs-server: serves a node's volumes to the cluster over tarpc/TCP.
//!
//! It owns the server side of `common::fsproto::FileService`: NFS-style file handles
//! that survive a restart ([`handle`]), confinement of every name beneath its volume
//! root and the mount policy ([`mounts`]), each request performed with the caller's
//! credentials ([`sys::CredGuard`]), durable unbuffered writes, POSIX and flock locks
//! across clients ([`locks`]), and Sprite-style write-sharing callbacks ([`state`]).
//! It does not own the client side (fuse-client) nor the wire types (common).
//!
//! Connections: each TCP connection passes the cluster-key handshake, then announces a
//! `ChannelKind` (`common::fsproto`): requests (this server answers FileService calls,
//! many at once), or the callback channel of a registered session (this server calls
//! `CacheCallback` on it).

pub mod handle;
pub mod locks;
pub mod mounts;
pub mod ops;
pub mod server;
pub mod service;
pub mod state;
pub mod sys;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::config::NodeConfig;
use common::fsproto::{CacheCallbackClient, ChannelKind, FileService};
use futures::StreamExt;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::Instrument;

pub use server::{Server, StartError};

/// How long a client may take to announce its channel kind after the handshake.
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Runs an fs-server for `config` on `listener` until `shutdown` completes: reads the
/// cluster key, opens the volumes, serves.
pub async fn run(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let key = config.load_key()?;
    let srv = Server::new(config, key)?;
    serve(srv, listener, shutdown).await;
    Ok(())
}

/// Serves connections until `shutdown` completes; then stops accepting and closes
/// every connection (open files and locks of the sessions are released).
pub async fn serve(srv: Arc<Server>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, node = %srv.config.node, "fs-server listening");
    }
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            acc = listener.accept() => match acc {
                Ok((stream, addr)) => {
                    // The span tags tarpc's own messages (e.g. a bad frame) with the peer.
                    let span = tracing::info_span!("fs_conn", peer = %addr);
                    conns.spawn(connection(srv.clone(), stream, addr).instrument(span));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    tracing::info!(connections = conns.len(), "fs-server shutting down");
    conns.shutdown().await;
}

/// Ends a session when its connection task ends, however it ends.
struct SessionGuard {
    srv: Arc<Server>,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.srv.state.remove_session(self.id);
    }
}

async fn connection(srv: Arc<Server>, stream: TcpStream, addr: SocketAddr) {
    let Some((mut stream, peer)) =
        common::transport::accept_authenticated(stream, addr, &srv.key, &srv.config.node).await
    else {
        return;
    };
    let kind = match tokio::time::timeout(PREAMBLE_TIMEOUT, ChannelKind::read_preamble(&mut stream))
        .await
    {
        Ok(Ok(k)) => k,
        Ok(Err(e)) => {
            tracing::warn!(%addr, %peer, error = %e, "refused connection: bad channel preamble");
            return;
        }
        Err(_) => {
            tracing::warn!(%addr, %peer, "refused connection: no channel preamble in time");
            return;
        }
    };
    let max = srv.config.fs.max_frame_bytes;
    match kind {
        (ChannelKind::Requests, _) => {
            let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%addr, node = %peer, session = id, "requests connection");
            let session = Arc::new(state::Session {
                id,
                peer: peer.clone(),
                addr,
            });
            srv.state.add_session(session.clone());
            let _guard = SessionGuard {
                srv: srv.clone(),
                id,
            };
            let transport = common::transport::frame(stream, max);
            let conn = service::Conn {
                srv: srv.clone(),
                session,
            };
            BaseChannel::with_defaults(transport)
                .execute(conn.serve())
                .for_each(|fut| async {
                    tokio::spawn(fut);
                })
                .await;
            tracing::info!(%addr, node = %peer, session = id, "requests connection closed");
        }
        (ChannelKind::Callbacks, token) => {
            tracing::info!(%addr, node = %peer, "callback connection");
            let transport = common::transport::frame(stream, max);
            let client = CacheCallbackClient::new(tarpc::client::Config::default(), transport);
            let dispatch = client.dispatch;
            srv.state.attach_callback(token, client.client);
            if let Err(e) = dispatch.await {
                tracing::info!(%addr, node = %peer, error = %e, "callback connection ended");
            } else {
                tracing::info!(%addr, node = %peer, "callback connection closed");
            }
            srv.state.detach_callback(token);
        }
    }
}
