//! The cluster-key handshake: mutual challenge-response before any RPC.
//!
//! Every TCP connection between Ferry daemons opens with this exchange; nothing else is
//! read from a peer until it has proved that it holds the cluster key, and the peer
//! learns the same of us. The key itself never crosses the wire.
//!
//! ```text
//! client -> server  HELLO   magic "FERRY\x01" | client nonce (32) | name len (1) | name
//! server -> client  CHALL   server nonce (32) | HMAC(key, "srv" | cn | sn | client name) | name len | name
//! client -> server  PROOF   HMAC(key, "cli" | sn | cn | server name)
//! server -> client  VERDICT 1 byte: 1 = accepted, 0 = refused
//! ```
//!
//! HMAC is HMAC-SHA256. Fresh nonces on both sides make a recorded exchange useless for
//! a replay. A refusal is logged on both sides with the peer's address and claimed name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MAGIC: &[u8; 6] = b"FERRY\x01";
const NONCE: usize = 32;
const MAC: usize = 32;
/// How long a peer may take to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

type HmacSha256 = Hmac<Sha256>;

/// The shared secret of a cluster.
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// Why the cluster key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read cluster key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cluster key file {path} holds {len} bytes; it needs at least 16 (e.g. `head -c 32 /dev/urandom > {path}`)")]
    TooShort { path: PathBuf, len: usize },
}

impl ClusterKey {
    /// Wraps key bytes (tests; daemons use [`ClusterKey::load`]).
    pub fn from_bytes(bytes: &[u8]) -> ClusterKey {
        ClusterKey(bytes.to_vec())
    }

    /// Reads a key file: any bytes, at least 16 of them.
    pub fn load(path: &Path) -> Result<ClusterKey, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        if bytes.len() < 16 {
            return Err(KeyError::TooShort {
                path: path.to_owned(),
                len: bytes.len(),
            });
        }
        Ok(ClusterKey(bytes))
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> [u8; MAC] {
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(label);
        for p in parts {
            m.update(&(p.len() as u32).to_le_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    fn verify(&self, label: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(label);
        for p in parts {
            m.update(&(p.len() as u32).to_le_bytes());
            m.update(p);
        }
        m.verify_slice(tag).is_ok()
    }

    /// A keyed digest of `data` under a purpose label, for tokens the server hands out
    /// and must later recognise as its own (e.g. file handles).
    pub fn sign(&self, purpose: &[u8], data: &[u8]) -> [u8; 32] {
        self.mac(purpose, &[data])
    }

    /// Checks a tag made by [`ClusterKey::sign`], in constant time.
    pub fn check(&self, purpose: &[u8], data: &[u8], tag: &[u8]) -> bool {
        self.verify(purpose, &[data], tag)
    }
}

/// Why a handshake failed. Both sides log it; the connection is then dropped.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer did not complete the handshake within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    #[error("connection failed during the handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer is not a Ferry daemon (bad magic bytes)")]
    NotFerry,
    #[error("peer {peer:?} does not hold this cluster's key (its proof did not verify)")]
    WrongKey { peer: String },
    #[error("peer {peer:?} refused us: we do not hold the key it expects (check key_file on both nodes)")]
    RefusedByPeer { peer: String },
    #[error("peer sent a malformed name")]
    BadName,
}

fn nonce() -> [u8; NONCE] {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).expect("the kernel's random source works");
    n
}

async fn read_name<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, HandshakeError> {
    let len = s.read_u8().await? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    let name = String::from_utf8(buf).map_err(|_| HandshakeError::BadName)?;
    crate::config::check_name(&name).map_err(|_| HandshakeError::BadName)?;
    Ok(name)
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    let bytes = &name.as_bytes()[..name.len().min(255)];
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

/// Runs the client side of the handshake. Returns the server's name.
pub async fn client_handshake<S>(
    stream: &mut S,
    key: &ClusterKey,
    my_name: &str,
) -> Result<String, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let cn = nonce();
        let mut hello = Vec::with_capacity(64);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&cn);
        put_name(&mut hello, my_name);
        stream.write_all(&hello).await?;

        let mut sn = [0u8; NONCE];
        stream.read_exact(&mut sn).await?;
        let mut tag = [0u8; MAC];
        stream.read_exact(&mut tag).await?;
        let server = read_name(stream).await?;
        if !key.verify(b"srv", &[&cn, &sn, my_name.as_bytes()], &tag) {
            // Tell the server we refuse, then drop it.
            let _ = stream.write_all(&[0u8; MAC]).await;
            return Err(HandshakeError::WrongKey { peer: server });
        }
        let proof = key.mac(b"cli", &[&sn, &cn, server.as_bytes()]);
        stream.write_all(&proof).await?;
        match stream.read_u8().await {
            Ok(1) => Ok(server),
            _ => Err(HandshakeError::RefusedByPeer { peer: server }),
        }
    })
    .await
    .map_err(|_| HandshakeError::Timeout)?
}

/// Runs the server side of the handshake. Returns the client's claimed (and proven)
/// name.
pub async fn server_handshake<S>(
    stream: &mut S,
    key: &ClusterKey,
    my_name: &str,
) -> Result<String, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut magic = [0u8; 6];
        stream.read_exact(&mut magic).await?;
        if &magic != MAGIC {
            return Err(HandshakeError::NotFerry);
        }
        let mut cn = [0u8; NONCE];
        stream.read_exact(&mut cn).await?;
        let client = read_name(stream).await?;

        let sn = nonce();
        let mut chall = Vec::with_capacity(96);
        chall.extend_from_slice(&sn);
        chall.extend_from_slice(&key.mac(b"srv", &[&cn, &sn, client.as_bytes()]));
        put_name(&mut chall, my_name);
        stream.write_all(&chall).await?;

        let mut proof = [0u8; MAC];
        stream.read_exact(&mut proof).await?;
        if !key.verify(b"cli", &[&sn, &cn, my_name.as_bytes()], &proof) {
            let _ = stream.write_all(&[0]).await;
            return Err(HandshakeError::WrongKey { peer: client });
        }
        stream.write_all(&[1]).await?;
        Ok(client)
    })
    .await
    .map_err(|_| HandshakeError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(
        ck: &[u8],
        sk: &[u8],
    ) -> (
        Result<String, HandshakeError>,
        Result<String, HandshakeError>,
    ) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let ck = ClusterKey::from_bytes(ck);
        let sk = ClusterKey::from_bytes(sk);
        let c = async move { client_handshake(&mut a, &ck, "ws2").await };
        let s = async move { server_handshake(&mut b, &sk, "ws1").await };
        tokio::join!(c, s)
    }

    #[tokio::test]
    async fn same_key_is_accepted_both_ways() {
        let (c, s) = run(b"0123456789abcdef", b"0123456789abcdef").await;
        assert_eq!(c.unwrap(), "ws1");
        assert_eq!(s.unwrap(), "ws2");
    }

    #[tokio::test]
    async fn wrong_key_is_refused_on_both_sides() {
        let (c, s) = run(b"0123456789abcdef", b"fedcba9876543210").await;
        assert!(matches!(c, Err(HandshakeError::WrongKey { .. })), "{c:?}");
        assert!(s.is_err(), "server must not accept: {s:?}");
    }

    #[tokio::test]
    async fn garbage_is_not_ferry() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let key = ClusterKey::from_bytes(b"0123456789abcdef");
        let r = server_handshake(&mut b, &key, "ws1").await;
        assert!(matches!(r, Err(HandshakeError::NotFerry)), "{r:?}");
    }

    #[test]
    fn signed_tokens_verify_only_unchanged() {
        let key = ClusterKey::from_bytes(b"0123456789abcdef");
        let tag = key.sign(b"fh", b"handle");
        assert!(key.check(b"fh", b"handle", &tag));
        assert!(!key.check(b"fh", b"handlf", &tag));
        assert!(!key.check(b"xx", b"handle", &tag));
    }
}
