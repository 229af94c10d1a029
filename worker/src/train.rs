//! The training loop: data-parallel SGD with a fixed global batch.
//!
//! Each step, every rank sums the gradient of the logistic loss over its share of the step's
//! samples; one all-reduce adds the shares up (with two more numbers riding along: the loss, and
//! whether any rank was asked to stop); every rank then takes the same step, `w −= lr × Σ∇ / B`.
//! Because the batch of step `s` is the same samples whatever the world size, a run resized or
//! restarted from a checkpoint follows the uninterrupted run's trajectory, up to the order of
//! floating-point additions.
//!
//! On resume, rank 0 alone reads the checkpoint and broadcasts it — an all-reduce where the other
//! ranks contribute zeros, which adds exactly — so only rank 0's node needs the checkpoint
//! directory. SIGTERM on any rank stops every rank after the same step, with a checkpoint.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::checkpoint::{self, Checkpoint, CheckpointError};
use crate::clock::Stopwatch;
use crate::config::{Args, Placement};
use crate::data::Dataset;
use crate::progress::Progress;
use crate::rendezvous::{Rendezvous, RendezvousError};
use crate::ring::{Ring, RingError};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    #[error("step {step}: {source}")]
    Collective { step: u64, source: RingError },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("checkpoint {path} holds a {found} model; this run is --model {wanted}")]
    WrongModel { path: String, found: String, wanted: String },
}

/// How a run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every step done.
    Finished { step: u64 },
    /// Stopped by a signal after `step`, with a checkpoint of it.
    Stopped { step: u64 },
}

/// Train from the newest checkpoint (or from the start) to `args.steps`.
pub fn run(args: &Args, placement: &Placement, stop: &std::sync::Arc<AtomicBool>) -> Result<Outcome, TrainError> {
    let rendezvous = Rendezvous {
        rank: placement.rank,
        world: placement.world,
        master_addr: placement.master_addr.clone(),
        master_port: placement.master_port,
        run: placement.run.clone(),
        token: placement.run_token.clone(),
        timeout: args.rendezvous_timeout,
        collective_timeout: args.collective_timeout,
        stop: stop.clone(),
    };
    let mut ring = rendezvous.connect()?;
    let model = args.model();
    let data = Dataset::new(args.seed, model.features, args.dataset_size);
    let n = model.param_count();
    let (mut step, mut params) = resume(args, placement, &mut ring)?;
    if placement.rank == 0 {
        log(&format!(
            "training {} ({n} parameters) from step {step} to {} on {} rank(s)",
            model.kind.name(),
            args.steps,
            ring.world()
        ));
    }

    let progress = Progress::new(placement.progress_socket.clone());
    let b = args.global_batch as f64;
    let mut x = vec![0.0; model.features];
    let mut hidden = vec![0.0; model.hidden];
    // Gradient sum, then the loss sum, then the stop vote.
    let mut buffer = vec![0.0; n + 2];
    while step < args.steps {
        let watch = Stopwatch::start();
        buffer.fill(0.0);
        let mut loss = 0.0;
        for index in Dataset::shard(step, args.global_batch, ring.rank(), ring.world()) {
            let y = data.sample(index, &mut x);
            loss += model.accumulate(&params, &x, y, &mut buffer[..n], &mut hidden);
        }
        buffer[n] = loss;
        buffer[n + 1] = f64::from(u8::from(stop.load(Ordering::Relaxed)));
        if !args.step_time.is_zero() {
            watch.pad_to(args.step_time.div_f64(speed(placement.speed_file.as_deref())));
        }
        ring.all_reduce_sum(&mut buffer).map_err(|source| TrainError::Collective { step, source })?;
        for (p, g) in params.iter_mut().zip(&buffer[..n]) {
            *p -= args.lr * g / b;
        }
        step += 1;

        let mean_loss = buffer[n] / b;
        let stopping = buffer[n + 1] > 0.0;
        progress.report(step, step * args.global_batch, mean_loss, &[("world_size", ring.world() as f64)]);
        if placement.rank == 0 && args.log_every > 0 && step % args.log_every == 0 {
            log(&format!("step {step} loss {mean_loss:.6}"));
        }
        if placement.rank == 0 && (step % args.checkpoint_every == 0 || step == args.steps || stopping) {
            if let Some(dir) = &placement.checkpoint_dir {
                checkpoint::save(dir, &Checkpoint { model, step, params: params.clone() })?;
            }
        }
        if stopping {
            if placement.rank == 0 {
                log(&format!("stopped after step {step}, checkpointed"));
            }
            return Ok(Outcome::Stopped { step });
        }
    }
    Ok(Outcome::Finished { step })
}

/// Rank 0 loads the newest good checkpoint and every rank receives it.
fn resume(args: &Args, placement: &Placement, ring: &mut Ring) -> Result<(u64, Vec<f64>), TrainError> {
    let model = args.model();
    let n = model.param_count();
    let mut buffer = vec![0.0; n + 1];
    if placement.rank == 0 {
        let found = match &placement.checkpoint_dir {
            Some(dir) => {
                let (found, skipped) = checkpoint::latest(dir)?;
                for s in skipped {
                    log(&format!("warning: skipping checkpoint {s}"));
                }
                found
            }
            None => None,
        };
        match found {
            Some(c) if c.model != model => {
                return Err(TrainError::WrongModel {
                    path: checkpoint::file_name(c.step),
                    found: format!(
                        "{} ({} features, {} hidden)",
                        c.model.kind.name(),
                        c.model.features,
                        c.model.hidden
                    ),
                    wanted: format!("{} --features {} --hidden {}", model.kind.name(), model.features, model.hidden),
                });
            }
            Some(c) => {
                log(&format!("resuming from {}", checkpoint::file_name(c.step)));
                buffer[0] = c.step as f64;
                buffer[1..].copy_from_slice(&c.params);
            }
            None => buffer[1..].copy_from_slice(&model.init(args.seed)),
        }
    }
    ring.all_reduce_sum(&mut buffer).map_err(|source| TrainError::Collective { step: 0, source })?;
    Ok((buffer[0] as u64, buffer[1..].to_vec()))
}

/// The simulated GPU's relative speed at its cap, as the agent writes it; 1 when unknown.
fn speed(file: Option<&Path>) -> f64 {
    file.and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite())
        .map_or(1.0, |s| s.clamp(0.05, 1.0))
}

fn log(line: &str) {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("watt-worker: {line}");
    }
}
