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

fn fail(e: &ControllerError) -> ExitCode {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("watt-controller: error: {e}");
    }
    ExitCode::from(e.exit_code())
}
