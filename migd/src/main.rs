use clap::Parser;
use migd::cli::{Cli, Cmd};

fn main() -> anyhow::Result<()> {
    common::logging::init("migd");
    let cli = Cli::parse();
    match (cli.cmd, cli.config) {
        (
            Some(Cmd::Dump {
                pid,
                images,
                leave_running,
            }),
            _,
        ) => migd::cli::run_dump(pid, images, leave_running),
        (
            Some(Cmd::Restore {
                images,
                detach,
                inherit_fd,
            }),
            _,
        ) => {
            let code = migd::cli::run_restore_inheriting(images, detach, &inherit_fd)?;
            std::process::exit(code)
        }
        (None, Some(config)) => migd::cli::run_daemon(config),
        (None, None) => {
            anyhow::bail!("nothing to do: give a subcommand (dump, restore) or --config FILE")
        }
    }
}
