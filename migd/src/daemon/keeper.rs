//! Starting and speaking to a keeper process (`migrate internal-keep`, see
//! [`super::helpers`]): it dumps a process into the store and holds it frozen until
//! told to thaw it, kill it, or keep it as the shadow. Used by migd (a foreign process
//! moving on) and by home-proxy (a process leaving its home).

use common::migproto::{Handover, HoldPlan};
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, Lines};
use tokio::process::Child;
use tokio::sync::mpsc;

/// Where a helper's lines come from.
pub type LineSource = Lines<BufReader<Box<dyn AsyncRead + Send + Unpin>>>;

/// A running keeper.
pub struct Keeper {
    /// Our child (`None` for a keeper adopted through its socket after a restart).
    pub child: Option<Child>,
    /// Lines to the keeper (`commit-shadow`, `commit-kill`, `abort`, `exit <status>`).
    pub to: mpsc::UnboundedSender<String>,
    /// Lines from the keeper after `dumped` (`signal <n>`, `gone <status>`, `error ..`).
    pub lines: LineSource,
}

/// Sends the lines of a channel to `w`, one per line.
pub fn line_writer(
    mut w: impl AsyncWrite + Send + Unpin + 'static,
) -> mpsc::UnboundedSender<String> {
    let (to, mut rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(l) = rx.recv().await {
            if w.write_all(format!("{l}\n").as_bytes()).await.is_err() {
                break;
            }
            let _ = w.flush().await;
        }
    });
    to
}

/// The lines of `r`.
pub fn line_source(r: impl AsyncRead + Send + Unpin + 'static) -> LineSource {
    let b: Box<dyn AsyncRead + Send + Unpin> = Box::new(r);
    BufReader::new(b).lines()
}

/// Connects to a helper's socket (a helper whose first peer is gone listens there).
pub async fn connect_lines(
    socket: &Path,
) -> std::io::Result<(mpsc::UnboundedSender<String>, LineSource)> {
    let s = tokio::net::UnixStream::connect(socket).await?;
    let (r, w) = s.into_split();
    Ok((line_writer(w), line_source(r)))
}

/// `bytes` as lowercase hex: how the keeper's one-line protocol carries the
/// manifest's and the eager pages' bytes (`dumped ... <manifest> [<eager>]`).
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// The bytes `s` spells in hex ([`to_hex`]); `None` if it is not hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some((digit(p[0])? << 4) | digit(p[1])?))
        .collect()
}

/// What the dump wrote.
#[derive(Debug, Clone)]
pub struct Dumped {
    pub bytes: u64,
    /// The freeze: from the process stopped to the image written.
    pub dump_ms: f64,
    /// Pre-copy rounds written while it ran (0: none).
    pub rounds: u32,
    /// Bytes left for after the freeze (written by the keeper in the background).
    pub late_bytes: u64,
    /// The manifest's bytes as written and a lazy dump's eager pages, handed to
    /// the destination with `restore` (`None`: it reads the files in the store).
    pub handover: Option<Handover>,
}

impl Keeper {
    /// Starts `exe internal-keep` for `pid` and waits until the image is written (the
    /// process then stays frozen); with `precopy`, in rounds while it still runs.
    /// On error the process runs on untouched. `socket` is where it listens for a
    /// new peer once we are gone (after commit); `settle_socket` where it listens,
    /// once told `decided`, for a restarted peer that settles the commit (migd's
    /// keepers: the end of input after `decided` then holds the process frozen
    /// instead of making it the shadow).
    pub async fn start(
        exe: &Path,
        pid: i32,
        images: &Path,
        enter: bool,
        socket: Option<&Path>,
        settle_socket: Option<&Path>,
        plan: HoldPlan,
    ) -> Result<(Keeper, Dumped), String> {
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("internal-keep")
            .arg("--pid")
            .arg(pid.to_string())
            .arg("--images")
            .arg(images);
        if enter {
            cmd.arg("--enter");
        }
        if let Some(p) = plan.precopy {
            cmd.arg("--precopy-rounds")
                .arg(p.max_rounds.to_string())
                .arg("--precopy-below")
                .arg(p.stop_below_bytes.to_string())
                .arg("--precopy-throttle")
                .arg(p.throttle_max_percent.to_string());
        }
        if let Some(secs) = plan.late_bound_secs {
            cmd.arg("--late-bound").arg(secs.to_string());
        }
        if let Some(s) = socket {
            cmd.arg("--socket").arg(s);
        }
        if let Some(s) = settle_socket {
            cmd.arg("--settle-socket").arg(s);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let to = line_writer(child.stdin.take().expect("piped"));
        let lines = line_source(child.stdout.take().expect("piped"));
        let mut keeper = Keeper {
            child: Some(child),
            to,
            lines,
        };
        // `round <n> <bytes> <ms> <throttle%>` per pre-copy round, then `dumped` or `error`.
        let mut rounds = 0;
        let first = loop {
            let line = keeper.lines.next_line().await.ok().flatten();
            match line.as_deref().and_then(|l| l.strip_prefix("round ")) {
                Some(r) => {
                    rounds += 1;
                    tracing::info!(
                        pid,
                        round = r,
                        "pre-copy round written (n bytes ms throttle%)"
                    );
                }
                None => break line,
            }
        };
        match first.as_deref().and_then(|l| l.strip_prefix("dumped ")) {
            Some(rest) => {
                let mut it = rest.split_whitespace();
                let bytes = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                let dump_ms = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
                let late_bytes = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                let handover = it.next().and_then(from_hex).map(|manifest| Handover {
                    manifest,
                    eager: it.next().and_then(from_hex),
                });
                Ok((
                    keeper,
                    Dumped {
                        bytes,
                        dump_ms,
                        rounds,
                        late_bytes,
                        handover,
                    },
                ))
            }
            None => {
                let why = first
                    .as_deref()
                    .and_then(|l| l.strip_prefix("error "))
                    .unwrap_or("the keeper ended without a word")
                    .to_string();
                keeper.wait().await;
                Err(format!("{why} (pid {pid} runs on where it was)"))
            }
        }
    }

    /// Waits for the keeper's word that the image is faithful (`checked`, which
    /// follows `dumped`: see `engine::handoff::Held::checked`); nothing may run
    /// from the image before. On an error the keeper has thawed the original.
    pub async fn checked(&mut self) -> Result<(), String> {
        let line = self.lines.next_line().await.ok().flatten();
        match line.as_deref() {
            Some("checked") => Ok(()),
            Some(l) => Err(l.strip_prefix("error ").unwrap_or(l).to_string()),
            None => Err("the keeper ended before it checked the image".into()),
        }
    }

    /// Tells the keeper `decided` (a copy may run elsewhere from now on: the
    /// original must never thaw on its own) and waits until it says it took it, so
    /// that the decision is the keeper's before the commit goes out.
    pub async fn decided(&mut self) -> Result<(), String> {
        self.send("decided");
        loop {
            match self.lines.next_line().await {
                Ok(Some(l)) if l.trim() == "decided" => return Ok(()),
                Ok(Some(l)) => tracing::warn!(line = %l, "keeper, while waiting for `decided`"),
                Ok(None) | Err(_) => {
                    return Err("the keeper ended before it took the decision".into())
                }
            }
        }
    }

    /// Takes over a keeper whose first peer is gone, through its socket.
    pub async fn adopt(socket: &Path) -> std::io::Result<Keeper> {
        let (to, lines) = connect_lines(socket).await?;
        Ok(Keeper {
            child: None,
            to,
            lines,
        })
    }

    /// Waits until the keeper is gone (its output ends; our child is reaped).
    pub async fn wait(&mut self) {
        while let Ok(Some(_)) = self.lines.next_line().await {}
        if let Some(c) = self.child.as_mut() {
            let _ = c.wait().await;
        }
    }

    /// Sends a line to the keeper (ignored if it is gone).
    pub fn send(&self, line: &str) {
        let _ = self.to.send(line.to_string());
    }

    /// Tells the keeper how to end and waits for it.
    pub async fn end(mut self, line: &str) {
        self.send(line);
        if let Some(c) = self.child.as_mut() {
            let _ = c.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{from_hex, to_hex};

    #[test]
    fn hex_carries_any_bytes_and_refuses_what_is_not_hex() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&all)).as_deref(), Some(&all[..]));
        assert_eq!(to_hex(b"\x00\xff"), "00ff");
        assert_eq!(from_hex(""), Some(Vec::new()));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("+1"), None);
    }
}
