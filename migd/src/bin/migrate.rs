//! `migrate PID HOST`, `migrate PID home`, `migrate --list`: asks this node's migd to
//! move a process, or lists the migrated processes. The hidden `internal-*`
//! subcommands are the helper processes migd starts itself.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use common::migproto::{LocalReply, LocalRequest, Mode, ProcessEntry};
use std::path::PathBuf;

/// Move a running process to another node of the Ferry cluster, or list them.
#[derive(Debug, Parser)]
#[command(name = "migrate", version, args_conflicts_with_subcommands = true)]
struct Args {
    /// The process to move (its pid on this node).
    pid: Option<i32>,
    /// Where to: a node name, or `home`.
    dest: Option<String>,
    /// How pages move (only stop-copy is implemented yet).
    #[arg(long, value_enum, default_value = "stop-copy")]
    mode: ModeArg,
    /// List the migrated processes whose home is here and the foreign ones running here.
    #[arg(long)]
    list: bool,
    /// Machine-readable output (one JSON object on stdout).
    #[arg(long)]
    json: bool,
    /// Node configuration file (for migd's socket) [default: $FERRY_CONFIG, else
    /// /etc/ferry/node.toml].
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    internal: Option<Internal>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    StopCopy,
    Precopy,
    Lazy,
}

#[derive(Debug, Subcommand)]
enum Internal {
    /// (migd's helper) dump a process and hold it frozen.
    #[command(hide = true)]
    InternalKeep {
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        images: PathBuf,
        #[arg(long)]
        enter: bool,
        /// Where to wait for a new peer after commit if ours goes away.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// (migd's helper) restore a process under its home's file view.
    #[command(hide = true)]
    InternalRestore {
        #[arg(long)]
        images: PathBuf,
        #[arg(long)]
        home: String,
        #[arg(long)]
        superroot: PathBuf,
        #[arg(long)]
        stage: PathBuf,
        /// Where to wait for a new peer if ours goes away.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

fn main() {
    common::logging::init("migrate");
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("migrate: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    match args.internal {
        Some(Internal::InternalKeep {
            pid,
            images,
            enter,
            socket,
        }) => std::process::exit(migd::daemon::helpers::keeper_main(
            pid,
            &images,
            enter,
            socket.as_deref(),
        )),
        Some(Internal::InternalRestore {
            images,
            home,
            superroot,
            stage,
            socket,
        }) => std::process::exit(migd::daemon::helpers::restorer_main(
            &images,
            &home,
            &superroot,
            &stage,
            socket.as_deref(),
        )),
        None => {}
    }
    let path = args
        .config
        .or_else(|| std::env::var_os("FERRY_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/etc/ferry/node.toml"));
    let config = common::config::NodeConfig::load(&path)
        .context("migrate needs the node's config (--config or FERRY_CONFIG)")?;
    let socket = config.migd.socket.clone();
    let req = if args.list {
        LocalRequest::List
    } else {
        let (Some(pid), Some(dest)) = (args.pid, args.dest.clone()) else {
            bail!("usage: migrate PID HOST | migrate PID home | migrate --list");
        };
        let mode = match args.mode {
            ModeArg::StopCopy => Mode::StopCopy,
            ModeArg::Precopy => Mode::Precopy,
            ModeArg::Lazy => Mode::Lazy,
        };
        LocalRequest::Migrate { pid, dest, mode }
    };
    let reply = migd::daemon::client::request(&socket, &req, |phase, bytes| {
        if bytes > 0 {
            eprintln!("migrate: {phase} ({bytes} bytes)");
        } else {
            eprintln!("migrate: {phase}");
        }
    })?;
    match reply {
        LocalReply::Done(o) => {
            if args.json {
                println!("{}", serde_json::to_string(&o)?);
            } else {
                println!(
                    "runs on {} (pid {} there): {} bytes moved, frozen {:.1} ms",
                    o.host, o.host_pid, o.bytes, o.freeze_ms
                );
            }
        }
        LocalReply::List { home, foreign } => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "home": home, "foreign": foreign })
                );
            } else {
                print_table("migrated processes whose home is here", &home);
                print_table("foreign processes running here", &foreign);
            }
        }
        LocalReply::Error { message } => bail!("{message}"),
        LocalReply::Progress { .. } => unreachable!("progress is not final"),
    }
    Ok(())
}

fn print_table(title: &str, rows: &[ProcessEntry]) {
    println!("{title}:");
    if rows.is_empty() {
        println!("  (none)");
        return;
    }
    println!(
        "  {:>7} {:>8} {:<16} {:<8} {:<8} {:>12}",
        "PID", "HOST PID", "COMMAND", "HOME", "HOST", "SINCE"
    );
    let now = migd::daemon::now_secs();
    for r in rows {
        println!(
            "  {:>7} {:>8} {:<16} {:<8} {:<8} {:>10}s ago",
            r.pid,
            r.host_pid,
            r.comm,
            r.home,
            r.host,
            now.saturating_sub(r.since)
        );
    }
}
