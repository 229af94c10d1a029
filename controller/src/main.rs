//! The `watt-controller` binary: flags, logging, signals, exit codes. Everything else is the library.

use std::process::ExitCode;

use clap::Parser;
use watt_common::{logging, signal};
use watt_controller::config::Args;
use watt_controller::{app, ControllerError};

/// mimalloc, not glibc's malloc: every agent message is decoded into fresh allocations and freed
/// when the next one replaces it, on whichever worker thread; see BENCHMARKS.md for the ratio.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match args.resolve() {
        Ok(config) => config,
        Err(e) => return fail(&ControllerError::from(e)),
    };
    if args.check_config {
        #[allow(clippy::print_stdout)]
        {
            println!("configuration OK\n{config:#?}");
        }
        return ExitCode::SUCCESS;
    }
    logging::init(config.log_format);
    raise_open_files_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().thread_name("watt-controller").enable_all().build()
    {
        Ok(runtime) => runtime,
        Err(source) => return fail(&ControllerError::Io { context: "cannot start the async runtime", source }),
    };
    let result = runtime.block_on(async {
        let listener = app::bind(config.listen).await?;
        let metrics_listener = app::bind(config.metrics_addr).await?;
        app::run(config, listener, metrics_listener, signal::shutdown()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Every agent holds a connection: allow as many open files as the system lets this process
/// have (the soft limit is often 1,024 while the hard one is far higher).
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "Raised the open-files limit."),
            Err(e) => tracing::warn!(error = %e, soft, "Cannot raise the open-files limit."),
        },
        Ok((soft, _)) => tracing::info!(limit = soft, "Open-files limit (one per agent connection)."),
        Err(e) => tracing::warn!(error = %e, "Cannot read the open-files limit."),
    }
}

fn fail(e: &ControllerError) -> ExitCode {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("watt-controller: error: {e}");
    }
    ExitCode::from(e.exit_code())
}
