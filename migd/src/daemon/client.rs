//! The `migrate` command's side of the local socket.

use common::migproto::{LocalReply, LocalRequest};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Why migd could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach migd at {path}: {source} (is migd running on this node?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to migd at {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("migd at {path} ended the conversation without an answer (see its log)")]
    NoAnswer { path: String },
}

/// Sends one request; calls `progress` for each progress line; returns the final one.
pub fn request(
    socket: &Path,
    req: &LocalRequest,
    mut progress: impl FnMut(&str, u64),
) -> Result<LocalReply, ClientError> {
    let path = socket.display().to_string();
    let io = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: path.clone(),
        source,
    })?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    for l in BufReader::new(s).lines() {
        let l = l.map_err(io)?;
        match serde_json::from_str::<LocalReply>(&l) {
            Ok(LocalReply::Progress { phase, bytes }) => progress(&phase, bytes),
            Ok(other) => return Ok(other),
            Err(e) => tracing::warn!(line = %l, error = %e, "unreadable line from migd"),
        }
    }
    Err(ClientError::NoAnswer { path })
}
