//! The transport every Ferry RPC runs over: TCP, the cluster-key handshake, then
//! length-delimited bincode frames carrying tarpc messages.
//!
//! Frames are capped ([`DEFAULT_MAX_FRAME`]); an oversized frame or one that does not
//! decode ends that one connection with a logged error and nothing else changes.
//!
//! A frame is a 4-byte big-endian length, then the message in bincode 1's default
//! encoding: the format of tarpc's own bincode transport, which [`FrameCodec`]
//! replaces to serialize each message once, straight into the connection's write
//! buffer (tarpc's serializes into a buffer of its own, which its framing layer then
//! copies: for a 1 MiB read or write, one more copy and a fresh 1 MiB allocation on
//! each side that sends data).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bincode1::Options;
use bytes::{BufMut, BytesMut};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tarpc::server::BaseChannel;
use tarpc::{ClientMessage, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Decoder, Encoder, Framed};
use tracing::Instrument;

use crate::auth::{client_handshake, server_handshake, ClusterKey, HandshakeError};

/// Largest frame accepted by default: a 1 MiB write or read plus headroom, with room
/// for readdir batches. Larger frames are refused.
pub const DEFAULT_MAX_FRAME: usize = 8 << 20;

/// A tarpc transport over an authenticated TCP stream: a stream of `In` messages and
/// a sink of `Out` ones.
pub type RpcTransport<In, Out> = Framed<TcpStream, FrameCodec<In, Out>>;

/// The bincode 1 options of every frame (those tarpc's bincode transport uses).
fn wire() -> impl Options {
    bincode1::DefaultOptions::new()
}

/// Length-delimited bincode frames (see the module comment): decodes `In`, encodes
/// `Out`, refusing frames longer than the cap either way.
pub struct FrameCodec<In, Out> {
    max_frame: usize,
    _messages: std::marker::PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    pub fn new(max_frame: usize) -> FrameCodec<In, Out> {
        FrameCodec {
            max_frame,
            _messages: std::marker::PhantomData,
        }
    }

    fn too_long(&self, len: usize, what: &str) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{what} frame of {len} bytes is longer than the limit of {} bytes",
                self.max_frame
            ),
        )
    }
}

/// Bytes of a frame's length prefix.
const LEN_BYTES: usize = 4;

impl<In: for<'de> Deserialize<'de>, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> std::io::Result<Option<In>> {
        let Some(head) = src.get(..LEN_BYTES) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(head.try_into().expect("4 bytes")) as usize;
        if len > self.max_frame {
            return Err(self.too_long(len, "incoming"));
        }
        if src.len() < LEN_BYTES + len {
            // Room for the whole frame at once, not in doublings.
            src.reserve(LEN_BYTES + len - src.len());
            return Ok(None);
        }
        let frame = src.split_to(LEN_BYTES + len);
        wire()
            .deserialize(&frame[LEN_BYTES..])
            .map(Some)
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("a frame that does not decode: {e}"),
                )
            })
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = std::io::Error;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> std::io::Result<()> {
        // Sized first (a walk that copies nothing), so that the buffer grows once
        // rather than doubling, copying what it holds each time, while it fills.
        let size = wire()
            .serialized_size(&item)
            .map_err(|e| std::io::Error::other(format!("sizing a frame: {e}")))?
            as usize;
        if size > self.max_frame {
            return Err(self.too_long(size, "outgoing"));
        }
        dst.reserve(LEN_BYTES + size);
        let start = dst.len();
        dst.put_u32(size as u32);
        wire().serialize_into(dst.writer(), &item).map_err(|e| {
            dst.truncate(start);
            std::io::Error::other(format!("encoding a frame: {e}"))
        })?;
        debug_assert_eq!(
            dst.len() - start - LEN_BYTES,
            size,
            "bincode's size is exact"
        );
        Ok(())
    }
}

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
    Framed::new(stream, FrameCodec::new(max_frame))
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

#[cfg(test)]
mod tests {
    use super::*;

    type Codec = FrameCodec<(u32, serde_bytes::ByteBuf), (u32, serde_bytes::ByteBuf)>;

    fn msg(n: u32, data: &[u8]) -> (u32, serde_bytes::ByteBuf) {
        (n, serde_bytes::ByteBuf::from(data.to_vec()))
    }

    #[test]
    fn frames_are_a_big_endian_length_then_bincode_1s_default_encoding() {
        let mut c = Codec::new(1 << 20);
        let mut buf = BytesMut::new();
        c.encode(msg(5, b"ab"), &mut buf).unwrap();
        // Varint 5, varint length 2, the bytes: tarpc's bincode transport's format.
        assert_eq!(&buf[..], &[0, 0, 0, 4, 5, 2, b'a', b'b']);
    }

    #[test]
    fn a_large_message_comes_back_whole_and_a_partial_frame_waits() {
        let mut c = Codec::new(2 << 20);
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7) as u8).collect();
        let mut buf = BytesMut::new();
        c.encode(msg(9, &data), &mut buf).unwrap();
        c.encode(msg(10, b"next"), &mut buf).unwrap();
        let mut part = buf.split_to(1000);
        assert!(c.decode(&mut part).unwrap().is_none(), "not all there yet");
        part.unsplit(buf);
        let mut all = part;
        assert_eq!(c.decode(&mut all).unwrap(), Some(msg(9, &data)));
        assert_eq!(c.decode(&mut all).unwrap(), Some(msg(10, b"next")));
        assert!(c.decode(&mut all).unwrap().is_none());
        assert!(all.is_empty());
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors_that_name_the_cause() {
        let mut c = Codec::new(64);
        let mut buf = BytesMut::new();
        let e = c.encode(msg(1, &[0u8; 100]), &mut buf).unwrap_err();
        assert!(e.to_string().contains("limit of 64 bytes"), "{e}");
        assert!(buf.is_empty(), "nothing of a refused frame is queued");

        let mut big = BytesMut::from(&[0u8, 0, 1, 0][..]);
        let e = c.decode(&mut big).unwrap_err();
        assert!(e.to_string().contains("256 bytes"), "{e}");

        // A length that fits, then bytes that are no such message (a varint that
        // never ends).
        let mut junk = BytesMut::from(&[0u8, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        let e = c.decode(&mut junk).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    }
}
