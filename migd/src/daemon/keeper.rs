//! Starting and speaking to a keeper process (`migrate internal-keep`, see
//! [`super::helpers`]): it dumps a process into the store and holds it frozen until
//! told to thaw it, kill it, or keep it as the shadow. Used by migd (a foreign process
//! moving on) and by home-proxy (a process leaving its home).

use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};
use tokio::sync::mpsc;

/// A running keeper.
pub struct Keeper {
    pub child: Child,
    /// Lines to the keeper (`commit-shadow`, `commit-kill`, `abort`, `exit <status>`).
    pub to: mpsc::UnboundedSender<String>,
    /// Lines from the keeper after `dumped` (`signal <n>`, `gone <status>`, `error ..`).
    pub lines: Lines<BufReader<ChildStdout>>,
}

/// What the dump wrote.
#[derive(Debug, Clone, Copy)]
pub struct Dumped {
    pub bytes: u64,
    pub dump_ms: f64,
}

impl Keeper {
    /// Starts `exe internal-keep` for `pid` and waits until the image is written (the
    /// process then stays frozen). On error the process runs on untouched.
    pub async fn start(
        exe: &Path,
        pid: i32,
        images: &Path,
        enter: bool,
    ) -> Result<(Keeper, Dumped), String> {
        let mut child = tokio::process::Command::new(exe)
            .arg("internal-keep")
            .arg("--pid")
            .arg(pid.to_string())
            .arg("--images")
            .arg(images)
            .args(if enter { &["--enter"][..] } else { &[][..] })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (to, mut to_rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(l) = to_rx.recv().await {
                if stdin.write_all(format!("{l}\n").as_bytes()).await.is_err() {
                    break;
                }
                let _ = stdin.flush().await;
            }
        });
        let mut keeper = Keeper {
            child,
            to,
            lines: BufReader::new(stdout).lines(),
        };
        let first = keeper.lines.next_line().await.ok().flatten();
        match first.as_deref().and_then(|l| l.strip_prefix("dumped ")) {
            Some(rest) => {
                let mut it = rest.split_whitespace();
                let bytes = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                let dump_ms = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
                Ok((keeper, Dumped { bytes, dump_ms }))
            }
            None => {
                let why = first
                    .as_deref()
                    .and_then(|l| l.strip_prefix("error "))
                    .unwrap_or("the keeper ended without a word")
                    .to_string();
                let _ = keeper.child.wait().await;
                Err(format!("{why} (pid {pid} runs on where it was)"))
            }
        }
    }

    /// Sends a line to the keeper (ignored if it is gone).
    pub fn send(&self, line: &str) {
        let _ = self.to.send(line.to_string());
    }

    /// Tells the keeper how to end and waits for it.
    pub async fn end(mut self, line: &str) {
        self.send(line);
        drop(self.to);
        let _ = self.child.wait().await;
    }
}
