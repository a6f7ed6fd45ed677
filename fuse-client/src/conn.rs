//! One fs-server as this client sees it: a requests connection (we call
//! [`FileService`]) and a callbacks connection (the server calls [`CacheCallback`]),
//! re-established transparently when the server restarts.
//!
//! Set-up: TCP connect, cluster-key handshake, the [`ChannelKind::Requests`] byte,
//! `register(my_node, token)`; then a second connection with the
//! [`ChannelKind::Callbacks`] byte and the token, on which we serve the callbacks.
//!
//! Every call goes through [`ServerConn::call`]: on a transport failure (connection
//! reset, server gone, deadline passed) it drops the connection, reconnects with
//! backoff, re-registers, and sends the call again, until `reconnect_timeout` has
//! passed since the first failure; then the call fails with EIO. File handles and
//! [`common::fsproto::OpenFile`]s stay valid across a server restart, so a retried call
//! means the same thing as the first one.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use common::auth::{client_handshake, ClusterKey, HandshakeError};
use common::fsproto::{CacheCallback, ChannelKind, FileServiceClient, FsError, FsResult};
use futures::StreamExt;
use tarpc::client::RpcError;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::TcpStream;

/// How long one TCP connect may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of an ordinary call.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// Connection attempts are at least this far apart, whatever the number of calls
/// waiting.
const RETRY_SPACING: Duration = Duration::from_millis(100);
/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What the callbacks connection delivers, and what a reconnect means, to the rest of
/// the client.
pub trait CallbackSink: Send + Sync + 'static {
    /// The server asks to drop cached pages and attributes of its file `ino`.
    /// The returned future resolves once the kernel has dropped them.
    fn invalidate(
        &self,
        server: &str,
        ino: u64,
        uncached: bool,
    ) -> futures::future::BoxFuture<'static, ()>;
    /// The server asks to drop the cached entry `name` in its directory `parent_ino`.
    fn invalidate_entry(&self, server: &str, parent_ino: u64, name: Vec<u8>);
    /// The connection was re-established after a loss: the server may have restarted
    /// and missed telling us of changes, so cached data of its files is suspect.
    fn reconnected(&self, server: &str);
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to fs-server {node} at {addr}: {source}")]
    Connect {
        node: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("fs-server {node} at {addr} did not accept the connection within {CONNECT_TIMEOUT:?}")]
    Timeout { node: String, addr: SocketAddr },
    #[error("handshake with fs-server {node} at {addr} failed: {source}")]
    Handshake {
        node: String,
        addr: SocketAddr,
        source: HandshakeError,
    },
    #[error("fs-server {node} at {addr} refused register: {source}")]
    Register {
        node: String,
        addr: SocketAddr,
        source: FsError,
    },
    #[error("fs-server {node} at {addr} failed during set-up: {source}")]
    Rpc {
        node: String,
        addr: SocketAddr,
        source: RpcError,
    },
    /// Another call tried to connect a moment ago and failed; not tried again yet.
    #[error("{last} (tried {ago:?} ago)")]
    Recent {
        last: String,
        ago: Duration,
        refused: bool,
    },
}

impl ConnectError {
    /// Nothing listens at the address (the server is not running).
    pub fn is_refused(&self) -> bool {
        match self {
            ConnectError::Connect { source, .. } => {
                source.kind() == std::io::ErrorKind::ConnectionRefused
            }
            ConnectError::Recent { refused, .. } => *refused,
            _ => false,
        }
    }
}

struct State {
    /// Bumped on every new connection, so that a failure seen on an old one does not
    /// tear down its successor.
    generation: u64,
    client: Option<FileServiceClient>,
    callbacks: Option<tokio::task::JoinHandle<()>>,
    /// Whether we were ever connected (a later connection is a *re*connect).
    ever_connected: bool,
    /// The last failed connection attempt: calls queued behind it do not each wait
    /// for a connect timeout of their own.
    last_failure: Option<(Instant, String, bool)>,
}

/// One fs-server.
pub struct ServerConn {
    node: String,
    addr: SocketAddr,
    key: ClusterKey,
    my_node: String,
    max_frame: usize,
    reconnect_timeout: Duration,
    sink: Weak<dyn CallbackSink>,
    state: tokio::sync::Mutex<State>,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("node", &self.node)
            .field("addr", &self.addr)
            .finish()
    }
}

impl ServerConn {
    pub fn new(
        node: String,
        addr: SocketAddr,
        key: ClusterKey,
        my_node: String,
        max_frame: usize,
        reconnect_timeout: Duration,
        sink: Weak<dyn CallbackSink>,
    ) -> Arc<ServerConn> {
        Arc::new(ServerConn {
            node,
            addr,
            key,
            my_node,
            max_frame,
            reconnect_timeout,
            sink,
            state: tokio::sync::Mutex::new(State {
                generation: 0,
                client: None,
                callbacks: None,
                ever_connected: false,
                last_failure: None,
            }),
        })
    }

    /// The server's node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Sends a call, reconnecting and retrying on transport failures for up to the
    /// configured reconnect timeout.
    pub async fn call<T, F, Fut>(self: &Arc<Self>, what: &'static str, f: F) -> FsResult<T>
    where
        F: Fn(FileServiceClient, Context) -> Fut,
        Fut: Future<Output = Result<FsResult<T>, RpcError>>,
    {
        self.call_with(what, CALL_DEADLINE, self.reconnect_timeout, f)
            .await
    }

    /// [`ServerConn::call`] with an explicit per-attempt deadline and total patience.
    pub async fn call_with<T, F, Fut>(
        self: &Arc<Self>,
        what: &'static str,
        deadline: Duration,
        patience: Duration,
        f: F,
    ) -> FsResult<T>
    where
        F: Fn(FileServiceClient, Context) -> Fut,
        Fut: Future<Output = Result<FsResult<T>, RpcError>>,
    {
        let mut first_failure: Option<Instant> = None;
        let mut backoff = Duration::from_millis(20);
        // Short-patience calls (discovery) stay quiet: a node being down is normal
        // for them, and nobody listening means it is down, not restarting.
        let quiet = patience < self.reconnect_timeout;
        loop {
            let mut refused = false;
            let failure = match self.client().await {
                Ok((generation, client)) => {
                    let mut ctx = tarpc::context::current();
                    ctx.deadline = Instant::now() + deadline;
                    match f(client, ctx).await {
                        Ok(result) => return result,
                        Err(e) => {
                            // A broken connection is dropped and made again; a call
                            // that only ran out of time (slow or stopped server)
                            // leaves it, and the session's opens and locks, alone.
                            if !matches!(e, RpcError::DeadlineExceeded | RpcError::Server(_)) {
                                self.connection_lost(generation).await;
                            }
                            format!("call failed: {e}")
                        }
                    }
                }
                Err(e) => {
                    refused = e.is_refused();
                    e.to_string()
                }
            };
            let first = first_failure.is_none();
            let since = *first_failure.get_or_insert_with(Instant::now);
            if since.elapsed() >= patience || (quiet && refused) {
                if quiet {
                    tracing::debug!(server = %self.node, addr = %self.addr, op = what, error = %failure, "fs-server did not answer");
                } else {
                    tracing::error!(
                        server = %self.node, addr = %self.addr, op = what, error = %failure,
                        "giving up after {patience:?} without fs-server; answering EIO"
                    );
                }
                return Err(FsError::new(
                    libc::EIO,
                    format!(
                        "{what}: fs-server {} at {} unreachable for {patience:?} ({failure}); check that it runs",
                        self.node, self.addr
                    ),
                ));
            }
            if first && !quiet {
                tracing::warn!(
                    server = %self.node, addr = %self.addr, op = what, error = %failure,
                    "fs-server unavailable; retrying for up to {patience:?}"
                );
            } else {
                tracing::debug!(server = %self.node, op = what, error = %failure, "still retrying");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The current client, connecting first if there is none.
    async fn client(self: &Arc<Self>) -> Result<(u64, FileServiceClient), ConnectError> {
        let mut state = self.state.lock().await;
        if let Some(client) = &state.client {
            return Ok((state.generation, client.clone()));
        }
        if let Some((at, last, refused)) = &state.last_failure {
            if at.elapsed() < RETRY_SPACING {
                return Err(ConnectError::Recent {
                    last: last.clone(),
                    ago: at.elapsed(),
                    refused: *refused,
                });
            }
        }
        let generation = state.generation + 1;
        let (client, callbacks) = match self.connect(generation).await {
            Ok(c) => c,
            Err(e) => {
                state.last_failure = Some((Instant::now(), e.to_string(), e.is_refused()));
                return Err(e);
            }
        };
        state.last_failure = None;
        state.generation = generation;
        state.client = Some(client.clone());
        if let Some(old) = state.callbacks.replace(callbacks) {
            old.abort();
        }
        let reconnect = state.ever_connected;
        state.ever_connected = true;
        drop(state);
        if reconnect {
            tracing::info!(server = %self.node, addr = %self.addr, "reconnected to fs-server");
            if let Some(sink) = self.sink.upgrade() {
                sink.reconnected(&self.node);
            }
        } else {
            tracing::info!(server = %self.node, addr = %self.addr, "connected to fs-server");
        }
        Ok((generation, client))
    }

    /// Forgets the connection of `generation` (if it is still the current one), and
    /// reconnects in the background so that the server can call us back again even
    /// if no call comes.
    async fn connection_lost(self: &Arc<Self>, generation: u64) {
        let mut state = self.state.lock().await;
        if state.generation == generation && state.client.is_some() {
            tracing::warn!(server = %self.node, addr = %self.addr, "lost the connection to fs-server");
            state.client = None;
            if let Some(cb) = state.callbacks.take() {
                cb.abort();
            }
            let me = self.clone();
            tokio::spawn(me.reconnect_in_background());
        }
    }

    /// Boxed (and declared `Send`) to cut the type cycle connect -> callbacks task ->
    /// connection_lost -> reconnect -> connect.
    fn reconnect_in_background(self: Arc<Self>) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            let start = Instant::now();
            let mut backoff = Duration::from_millis(50);
            while start.elapsed() < self.reconnect_timeout {
                tokio::time::sleep(backoff).await;
                if self.client().await.is_ok() {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        })
    }

    async fn open_stream(&self, kind: ChannelKind, token: u64) -> Result<TcpStream, ConnectError> {
        let node = || self.node.clone();
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| ConnectError::Timeout {
                node: node(),
                addr: self.addr,
            })?
            .map_err(|source| ConnectError::Connect {
                node: node(),
                addr: self.addr,
                source,
            })?;
        let _ = stream.set_nodelay(true);
        client_handshake(&mut stream, &self.key, &self.my_node)
            .await
            .map_err(|source| ConnectError::Handshake {
                node: node(),
                addr: self.addr,
                source,
            })?;
        kind.write_preamble(&mut stream, token)
            .await
            .map_err(|source| ConnectError::Connect {
                node: node(),
                addr: self.addr,
                source,
            })?;
        Ok(stream)
    }

    async fn connect(
        self: &Arc<Self>,
        generation: u64,
    ) -> Result<(FileServiceClient, tokio::task::JoinHandle<()>), ConnectError> {
        let mut token = [0u8; 8];
        getrandom::fill(&mut token).expect("the kernel's random source works");
        let token = u64::from_le_bytes(token);

        let stream = self.open_stream(ChannelKind::Requests, token).await?;
        let transport = common::transport::frame(stream, self.max_frame);
        let client = FileServiceClient::new(tarpc::client::Config::default(), transport).spawn();
        let mut ctx = tarpc::context::current();
        ctx.deadline = Instant::now() + CONNECT_TIMEOUT;
        client
            .register(ctx, self.my_node.clone(), token)
            .await
            .map_err(|source| ConnectError::Rpc {
                node: self.node.clone(),
                addr: self.addr,
                source,
            })?
            .map_err(|source| ConnectError::Register {
                node: self.node.clone(),
                addr: self.addr,
                source,
            })?;

        let stream = self.open_stream(ChannelKind::Callbacks, token).await?;
        let transport = common::transport::frame(stream, self.max_frame);
        let server = CallbackServer {
            node: self.node.clone(),
            sink: self.sink.clone(),
        };
        let me = Arc::downgrade(self);
        let callbacks = tokio::spawn(async move {
            BaseChannel::with_defaults(transport)
                .execute(server.serve())
                .for_each(|call| async {
                    tokio::spawn(call);
                })
                .await;
            // The server closed the callbacks connection: without it we may cache
            // stale data, so treat it like losing the server.
            if let Some(conn) = me.upgrade() {
                tracing::warn!(server = %conn.node, "callbacks connection closed");
                conn.connection_lost(generation).await;
            }
        });
        Ok((client, callbacks))
    }
}

/// Serves the server's callbacks on the callbacks connection.
#[derive(Clone)]
struct CallbackServer {
    node: String,
    sink: Weak<dyn CallbackSink>,
}

/// Longest a callback waits for the kernel to drop pages before answering anyway.
const INVALIDATE_WAIT: Duration = Duration::from_secs(5);

impl CacheCallback for CallbackServer {
    async fn invalidate(self, _: Context, ino: u64, uncached: bool) {
        tracing::debug!(server = %self.node, ino, uncached, "invalidate callback");
        if let Some(sink) = self.sink.upgrade() {
            let done = sink.invalidate(&self.node, ino, uncached);
            drop(sink);
            if tokio::time::timeout(INVALIDATE_WAIT, done).await.is_err() {
                tracing::warn!(server = %self.node, ino, "kernel did not drop cached pages within {INVALIDATE_WAIT:?}");
            }
        }
    }

    async fn invalidate_entry(self, _: Context, parent_ino: u64, name: Vec<u8>) {
        tracing::debug!(server = %self.node, parent_ino, name = %String::from_utf8_lossy(&name), "invalidate_entry callback");
        if let Some(sink) = self.sink.upgrade() {
            sink.invalidate_entry(&self.node, parent_ino, name);
        }
    }
}

/// Sends one file-service call through a `ServerConn`, cloning the named arguments
/// for each attempt: `rpc!(conn, lookup(creds, parent, name))`.
macro_rules! rpc {
    ($conn:expr, $method:ident($($arg:ident),* $(,)?)) => {
        $conn.call(stringify!($method), move |c, ctx| {
            $(let $arg = ::std::clone::Clone::clone(&$arg);)*
            async move { c.$method(ctx, $($arg),*).await }
        })
    };
}
pub(crate) use rpc;
