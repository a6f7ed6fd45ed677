//! `fuse-client --config FILE`: mounts the cluster's super-root and serves it until
//! SIGTERM or SIGINT, then unmounts.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Mounts Ferry's super-root "/..." (every volume of the cluster under one root).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The node's configuration file (TOML).
    #[arg(long)]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    common::logging::init("fuse-client");
    common::alloc::keep_large_buffers();
    let args = Args::parse();
    let config = common::config::NodeConfig::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fuse-client")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(fuse_client::run(config, common::shutdown::signal()))
        .context("fuse-client failed")?;
    Ok(())
}
