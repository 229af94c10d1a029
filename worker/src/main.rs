//! The `watt-worker` binary: flags, environment, signals, exit codes.
//!
//! Exit codes: 0 all steps done; 143 stopped by SIGTERM/SIGINT after a checkpoint (as a process
//! killed by SIGTERM reports, so a supervisor treats it as retryable); 1 the run failed (a peer
//! died, a checkpoint cannot be written); 2 bad flags or environment.

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use watt_worker::config::{Args, Placement};
use watt_worker::train::{self, Outcome, TrainError};

fn main() -> ExitCode {
    let args = Args::parse();
    let placement = match args.validate().and_then(|()| Placement::from_env(|k| std::env::var(k).ok())) {
        Ok(p) => p,
        Err(e) => return fail(&e.to_string(), 2),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, stop.clone()) {
            return fail(&format!("cannot handle signal {signal}: {e}"), 1);
        }
    }
    match train::run(&args, &placement, &stop) {
        Ok(Outcome::Finished { .. }) => ExitCode::SUCCESS,
        Ok(Outcome::Stopped { .. })
        | Err(TrainError::Rendezvous(watt_worker::rendezvous::RendezvousError::Stopped)) => ExitCode::from(143),
        Err(e) => fail(&format!("rank {}: {e}", placement.rank), 1),
    }
}

fn fail(message: &str, code: u8) -> ExitCode {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("watt-worker: error: {message}");
    }
    ExitCode::from(code)
}
