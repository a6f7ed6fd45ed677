//! `migrate PID HOST`, `migrate PID home`, `migrate --list`: asks this node's migd to
//! move a process, or lists the migrated processes. The hidden `internal-*`
//! subcommands are the helper processes migd starts itself.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use common::migproto::{LocalReply, LocalRequest, Mode, ProcessEntry};
use migd::engine::restore::lazy::LazyOptions;
use migd::engine::track::PrecopyOptions;
use std::path::PathBuf;

/// Move a running process to another node of the Ferry cluster, or list them.
#[derive(Debug, Parser)]
#[command(name = "migrate", version, args_conflicts_with_subcommands = true)]
struct Args {
    /// The process to move (its pid on this node).
    pid: Option<i32>,
    /// Where to: a node name, or `home`.
    dest: Option<String>,
    /// How pages move: stop-copy (freeze, flush all, restore all), precopy (rounds
    /// while it runs, short freeze), lazy (freeze, pages fault in at the
    /// destination), or precopy+lazy.
    #[arg(long, value_enum, default_value = "precopy+lazy")]
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
    /// Pre-copy rounds, then lazy fault-in (the default).
    #[value(name = "precopy+lazy")]
    PrecopyLazy,
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
        /// Where to wait, once told `decided`, for a new peer that settles the
        /// commit if ours goes away (the process then stays frozen meanwhile).
        #[arg(long)]
        settle_socket: Option<PathBuf>,
        /// Pre-copy: at most this many rounds while the process runs.
        #[arg(long)]
        precopy_rounds: Option<u32>,
        /// Pre-copy: freeze once a round wrote at most this many bytes.
        #[arg(long, default_value_t = 8 << 20)]
        precopy_below: u64,
        /// Pre-copy: when rounds stop shrinking, hold the process frozen up to this
        /// share of the time (percent; 0: never).
        #[arg(long, default_value_t = 0)]
        precopy_throttle: u32,
        /// Lazy: write the pages served on demand after the freeze, in the
        /// background; the store may stay unwritable this many seconds.
        #[arg(long)]
        late_bound: Option<u64>,
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
        /// A file the process maps (home path): read into the page cache while
        /// the image is written.
        #[arg(long)]
        warm: Vec<PathBuf>,
        /// Lazy, after pre-copy: read at most this many MiB of the rounds' pages
        /// while the source writes the next (0: none).
        #[arg(long, default_value_t = 0)]
        warm_pages_mib: u64,
        /// Run the process at once; its pages fault in from the image.
        #[arg(long)]
        lazy: bool,
        /// Lazy: seconds a failing store may keep pages from the process.
        #[arg(long, default_value_t = 60)]
        store_bound: u64,
        /// Lazy: background prefetch cap in MiB/s (0: none).
        #[arg(long, default_value_t = 0)]
        prefetch_mib_per_sec: u64,
        /// The image was dumped at a host: the bytes it holds of pipes read from
        /// home were relayed already, and go into the process's new pipes.
        #[arg(long)]
        refill_input: bool,
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
            settle_socket,
            precopy_rounds,
            precopy_below,
            precopy_throttle,
            late_bound,
        }) => std::process::exit(migd::daemon::helpers::keeper_main(
            pid,
            &images,
            enter,
            socket.as_deref(),
            settle_socket.as_deref(),
            precopy_rounds.map(|max_rounds| PrecopyOptions {
                max_rounds,
                stop_below_bytes: precopy_below,
                throttle_max_percent: precopy_throttle,
                ..PrecopyOptions::default()
            }),
            late_bound.map(std::time::Duration::from_secs),
        )),
        Some(Internal::InternalRestore {
            images,
            home,
            superroot,
            stage,
            socket,
            warm,
            warm_pages_mib,
            lazy,
            store_bound,
            prefetch_mib_per_sec,
            refill_input,
        }) => std::process::exit(migd::daemon::helpers::restorer_main(
            &images,
            &home,
            &superroot,
            &stage,
            socket.as_deref(),
            migd::daemon::helpers::Restoring {
                warm: migd::daemon::helpers::Warming {
                    files: warm,
                    pages: warm_pages_mib << 20,
                },
                refill_input,
                lazy: lazy.then(|| LazyOptions {
                    store_bound: std::time::Duration::from_secs(store_bound),
                    prefetch_rate: prefetch_mib_per_sec << 20,
                    ..LazyOptions::default()
                }),
            },
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
            ModeArg::PrecopyLazy => Mode::PrecopyLazy,
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
