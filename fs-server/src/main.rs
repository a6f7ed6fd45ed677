//! `fs-server --config FILE`: serves this node's volumes on `ports.fs` of its address.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use common::config::NodeConfig;

/// Serves this node's volumes to the Ferry cluster.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Node configuration file (TOML).
    #[arg(long, default_value = "/etc/ferry/node.toml")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::logging::init("fs-server");
    common::alloc::keep_large_buffers();
    let args = Args::parse();
    let config = NodeConfig::load(&args.config)?;
    let addr = config.fs_addr(config.me());
    let listener = common::transport::bind(addr)
        .await
        .with_context(|| format!("fs-server of node {}", config.node))?;
    fs_server::run(config, listener, common::shutdown::signal())
        .await
        .context("fs-server failed to start")?;
    Ok(())
}
