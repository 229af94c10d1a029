//! The `watt-agent` binary: flags, logging, signals, exit codes. Everything else is the library.

use std::process::ExitCode;

use clap::Parser;
use watt_agent::config::{AgentConfig, Args};
use watt_agent::supervisor::cgroup;
use watt_agent::{app, AgentError};
use watt_common::{logging, signal};

fn main() -> ExitCode {
    // A shard's first process: join its cgroup, take its user, become the job's command.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == cgroup::EXEC_ARG) {
        let why = cgroup::exec_in_group(&argv[2..]);
        #[allow(clippy::print_stderr)]
        {
            eprintln!("watt-agent: {why}");
        }
        return ExitCode::from(127);
    }
    let args = Args::parse();
    let config = match args.resolve() {
        Ok(config) => config,
        Err(e) => return fail(&AgentError::from(e)),
    };
    if args.check_config {
        // A reader that stops early (`| head`) is not an error worth a panic.
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "configuration OK\n{config:#?}");
        return ExitCode::SUCCESS;
    }
    logging::init(config.log_format);
    // Before any thread starts (the attribute is per thread, inherited by threads and processes
    // made after): every shard inherits it, so no setuid program gives a job's process more than
    // it started with.
    if let Err(e) = nix::sys::prctl::set_no_new_privs() {
        tracing::warn!(error = %e, "Cannot set no-new-privileges; shards may gain privileges through setuid programs.");
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn run(config: AgentConfig) -> Result<(), AgentError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // Scrapes and the sampler's timer need little; GPU calls run on the blocking pool.
        .worker_threads(2)
        .thread_name("watt-agent")
        .enable_all()
        .build()
        .map_err(|source| AgentError::Io { context: "cannot start the async runtime", source })?;
    runtime.block_on(async {
        let backend = tokio::task::block_in_place(|| app::open_backend(&config))?;
        let listener = app::bind(&config).await?;
        app::run(config, backend, listener, signal::shutdown()).await
    })
}

/// One line on stderr, and the exit code that goes with the error.
fn fail(e: &AgentError) -> ExitCode {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("watt-agent: error: {e}");
    }
    ExitCode::from(e.exit_code())
}
