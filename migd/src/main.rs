use clap::Parser;
use migd::cli::{Cli, Cmd};

fn main() -> anyhow::Result<()> {
    common::logging::init("migd");
    common::alloc::keep_large_buffers();
    let cli = Cli::parse();
    match (cli.cmd, cli.config) {
        (
            Some(Cmd::Dump {
                pid,
                images,
                leave_running,
                json,
                precopy,
                precopy_rounds,
                precopy_stop_below,
                precopy_throttle,
            }),
            _,
        ) => {
            if precopy {
                let opts = migd::engine::track::PrecopyOptions {
                    max_rounds: precopy_rounds,
                    stop_below_bytes: precopy_stop_below,
                    throttle_max_percent: precopy_throttle,
                    ..Default::default()
                };
                migd::cli::run_dump_precopy(pid, images, leave_running, json, &opts)
            } else {
                migd::cli::run_dump_opts(pid, images, leave_running, json)
            }
        }
        (
            Some(Cmd::Restore {
                images,
                detach,
                inherit_fd,
                json,
                lazy,
                store_bound,
                prefetch_delay_ms,
                no_prefetch,
                readahead,
                prefetch_mib_per_sec,
                eager,
                warm_mib,
            }),
            _,
        ) => {
            let code = if lazy {
                let l = migd::cli::LazyArgs {
                    store_bound,
                    prefetch_delay_ms,
                    no_prefetch,
                    readahead,
                    prefetch_mib_per_sec,
                    eager,
                    warm_mib,
                };
                migd::cli::run_restore_lazy(images, detach, &inherit_fd, json, &l)?
            } else {
                migd::cli::run_restore_full(images, detach, &inherit_fd, json)?
            };
            std::process::exit(code)
        }
        (
            Some(Cmd::InternalLazyResume {
                stub,
                fd,
                images,
                store_bound,
            }),
            _,
        ) => {
            let code = migd::cli::run_lazy_resume(stub, fd, images, store_bound)?;
            std::process::exit(code)
        }
        (None, Some(config)) => migd::cli::run_daemon(config),
        (None, None) => {
            anyhow::bail!("nothing to do: give a subcommand (dump, restore) or --config FILE")
        }
    }
}
