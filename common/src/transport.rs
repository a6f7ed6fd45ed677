//! The transport every Ferry RPC runs over: TCP, the cluster-key handshake, then
//! length-delimited bincode frames carrying tarpc messages.
//!
//! Frames are capped ([`DEFAULT_MAX_FRAME`]); an oversized frame or one that does not
//! decode ends that one connection with a logged error and nothing else changes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tarpc::serde_transport::Transport;
use tarpc::server::BaseChannel;
use tarpc::tokio_serde::formats::Bincode;
use tarpc::{ClientMessage, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tracing::Instrument;

use crate::auth::{client_handshake, server_handshake, ClusterKey, HandshakeError};

/// Largest frame accepted by default: a 1 MiB write or read plus headroom, with room
/// for readdir batches. Larger frames are refused.
pub const DEFAULT_MAX_FRAME: usize = 8 << 20;

/// A tarpc transport over an authenticated TCP stream.
pub type RpcTransport<In, Out> = Transport<TcpStream, In, Out, Bincode<In, Out>>;

/// Why a connection to a peer could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: HandshakeError,
    },
}

/// Wraps an authenticated stream into a tarpc transport with a frame cap.
pub fn frame<In, Out>(stream: TcpStream, max_frame: usize) -> RpcTransport<In, Out>
where
    In: for<'de> Deserialize<'de>,
    Out: Serialize,
{
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_codec();
    tarpc::serde_transport::new(Framed::new(stream, codec), Bincode::default())
}

/// Connects to a peer's service, proves the key, and returns the framed transport and
/// the peer's proven name.
pub async fn connect<In, Out>(
    addr: SocketAddr,
    key: &ClusterKey,
    my_name: &str,
    max_frame: usize,
) -> Result<(RpcTransport<In, Out>, String), ConnectError>
where
    In: for<'de> Deserialize<'de>,
    Out: Serialize,
{
    let (stream, peer) = connect_stream(addr, key, my_name).await?;
    Ok((frame(stream, max_frame), peer))
}

/// Connects to a peer and proves the key; returns the raw stream (for a caller that
/// writes a preamble before framing it) and the peer's proven name.
pub async fn connect_stream(
    addr: SocketAddr,
    key: &ClusterKey,
    my_name: &str,
) -> Result<(TcpStream, String), ConnectError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ConnectError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    let peer = client_handshake(&mut stream, key, my_name)
        .await
        .map_err(|source| ConnectError::Handshake { addr, source })?;
    Ok((stream, peer))
}

/// Accepts one connection and authenticates it. Returns `None` (after logging why)
/// when the peer fails the handshake; the caller just accepts the next one.
pub async fn accept_authenticated(
    stream: TcpStream,
    peer_addr: SocketAddr,
    key: &ClusterKey,
    my_name: &str,
) -> Option<(TcpStream, String)> {
    let mut stream = stream;
    let _ = stream.set_nodelay(true);
    match server_handshake(&mut stream, key, my_name).await {
        Ok(peer) => {
            tracing::debug!(%peer_addr, %peer, "peer authenticated");
            Some((stream, peer))
        }
        Err(e) => {
            tracing::warn!(%peer_addr, error = %e, "refused connection: handshake failed");
            None
        }
    }
}

/// Binds a listener, with a message that names the address on failure.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// A tarpc server channel over an authenticated connection, as
/// [`serve_authenticated`] hands it over.
pub type ServerChannel<Req, Resp> =
    BaseChannel<Req, Resp, RpcTransport<ClientMessage<Req>, Response<Resp>>>;

/// Serves authenticated tarpc connections on `listener` until `shutdown` completes.
///
/// Each accepted connection runs in a task of its own, inside the span `span` makes
/// from the peer's address: the handshake on `key` as `my_name`
/// ([`accept_authenticated`]; a peer that fails it is dropped), then a
/// [`ServerChannel`] framed with [`DEFAULT_MAX_FRAME`], which `requests` turns, with
/// the peer's proven name, into the stream of its requests (`channel.execute(..)` of
/// the service for that peer); each request runs in a task of its own. An accept
/// error is logged and the next accept tried 50 ms later. Connections already
/// accepted go on after `shutdown`; only the accepting stops.
pub async fn serve_authenticated<Req, Resp, Reqs>(
    listener: TcpListener,
    key: ClusterKey,
    my_name: String,
    span: impl Fn(SocketAddr) -> tracing::Span,
    requests: impl Fn(ServerChannel<Req, Resp>, String) -> Reqs + Send + Sync + 'static,
    shutdown: impl Future<Output = ()>,
) where
    Req: for<'de> Deserialize<'de> + Send + 'static,
    Resp: Serialize + Send + 'static,
    Reqs: Stream + Send + 'static,
    Reqs::Item: Future<Output = ()> + Send + 'static,
{
    let shared = Arc::new((key, my_name, requests));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            acc = listener.accept() => match acc {
                Ok((stream, peer_addr)) => {
                    let shared = shared.clone();
                    let conn = async move {
                        let (key, my_name, requests) = &*shared;
                        let Some((stream, peer)) =
                            accept_authenticated(stream, peer_addr, key, my_name).await
                        else {
                            return;
                        };
                        let channel = BaseChannel::with_defaults(frame(stream, DEFAULT_MAX_FRAME));
                        requests(channel, peer)
                            .for_each(|fut| async {
                                tokio::spawn(fut);
                            })
                            .await;
                    };
                    tokio::spawn(conn.instrument(span(peer_addr)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}
