//! `cluster`: starts, enters and stops a local Ferry cluster (see the `ferry_tests` crate).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cluster",
    about = "A local Ferry cluster: nodes in namespaces on this machine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start nodes ws1..wsN with their daemons.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Cluster directory: configs, key, logs, state, the nodes' /tmp and the store.
        #[arg(long)]
        dir: PathBuf,
        /// Map root of client nodes to nobody on every fs-server.
        #[arg(long)]
        squash_root: bool,
    },
    /// Run a command inside a node; exits with its status (128+N if killed by signal N).
    Exec {
        #[arg(long)]
        dir: PathBuf,
        /// Run detached as a daemon logging to this file; print its host pid.
        #[arg(long, hide = true)]
        detach_log: Option<PathBuf>,
        /// Node name (ws1, ws2, ...).
        node: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<OsString>,
    },
    /// Stop everything a cluster started (also after a crash). Idempotent.
    Down {
        #[arg(long, required_unless_present = "stale")]
        dir: Option<PathBuf>,
        /// Instead: stop every cluster whose nodes are gone but whose bridge is left.
        #[arg(long)]
        stale: bool,
    },
    /// Print the recorded state of a cluster.
    Status {
        #[arg(long)]
        dir: PathBuf,
    },
    /// A node's pid 1 (started by `up`).
    #[command(hide = true)]
    NodeInit {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node: String,
        #[arg(long)]
        tmp: PathBuf,
        #[arg(long)]
        keep: Vec<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::NodeInit {
            dir: _,
            node,
            tmp,
            keep,
        } => {
            // No logging set-up here: this process forks at once.
            ferry_tests::node::run(&ferry_tests::node::NodeInit {
                name: node,
                tmp,
                keep,
            })
            .context("node-init failed")?;
            Ok(())
        }
        Cmd::Exec {
            dir,
            detach_log,
            node,
            cmd,
        } => {
            let detached = detach_log.is_some();
            let req = ferry_tests::ExecRequest {
                dir,
                node,
                argv: cmd,
                detach_log,
            };
            let code = ferry_tests::exec_in_node(&req).map_err(|e| {
                eprintln!("cluster exec: {e}");
                e
            });
            match code {
                Ok(pid) if detached => {
                    println!("{pid}");
                    Ok(())
                }
                Ok(code) => std::process::exit(code),
                Err(_) => std::process::exit(125),
            }
        }
        Cmd::Up {
            nodes,
            dir,
            squash_root,
        } => {
            common::logging::init("cluster");
            let mut opts = ferry_tests::UpOptions::new(nodes, dir);
            if squash_root {
                opts.configure = Some(Box::new(|c| c.fs.squash_root = true));
            }
            let state = ferry_tests::up(&opts)?;
            for n in &state.nodes {
                let running: Vec<String> = n
                    .daemons
                    .iter()
                    .map(|d| match (d.pid, &d.absent) {
                        (Some(p), None) => format!("{} ({p})", d.name),
                        (Some(p), Some(why)) => format!("{} ({p}, {why})", d.name),
                        (None, Some(why)) => format!("{} absent: {why}", d.name),
                        (None, None) => format!("{} absent", d.name),
                    })
                    .collect();
                println!(
                    "{} {} pid1={} {}",
                    n.name,
                    n.addr,
                    n.holder,
                    running.join(", ")
                );
            }
            println!(
                "cluster up: {} nodes on {} in {}",
                state.nodes.len(),
                state.bridge,
                state.dir.display()
            );
            Ok(())
        }
        Cmd::Down { dir, stale } => {
            common::logging::init("cluster");
            if stale {
                for (d, r) in ferry_tests::down::down_stale() {
                    match r {
                        Ok(_) => println!("cluster down: stale cluster {} cleaned", d.display()),
                        Err(e) => eprintln!("cluster down: {}: {e}", d.display()),
                    }
                }
                return Ok(());
            }
            let dir = dir.expect("clap requires --dir without --stale");
            let r = ferry_tests::down(&dir)?;
            println!(
                "cluster down: {} daemons stopped, {} nodes stopped, links deleted: {} ({})",
                r.daemons_stopped,
                r.nodes_stopped,
                if r.links_deleted.is_empty() {
                    "none".to_string()
                } else {
                    r.links_deleted.join(" ")
                },
                dir.display()
            );
            Ok(())
        }
        Cmd::Status { dir } => {
            let dir = dir.canonicalize().unwrap_or(dir);
            let s = ferry_tests::ClusterState::load(&dir)?;
            print!("{}", toml::to_string_pretty(&s)?);
            Ok(())
        }
    }
}
