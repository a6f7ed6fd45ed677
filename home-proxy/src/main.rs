//! `home-proxy --config FILE`: the home side of this node's migrated processes, on
//! `ports.proxy` of its address.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Keeps the shadows of this node's migrated processes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Node configuration file (TOML).
    #[arg(long, default_value = "/etc/ferry/node.toml")]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    common::logging::init("home-proxy");
    common::alloc::keep_large_buffers();
    let args = Args::parse();
    let config = common::config::NodeConfig::load(&args.config)?;
    let node = config.node.clone();
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(home_proxy::run(config))
        .with_context(|| format!("home-proxy of node {node}"))?;
    Ok(())
}
