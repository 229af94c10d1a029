//! The worker's configuration: training flags, and the torchrun environment the agent (or
//! `torchrun`, or a test) sets — `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`,
//! `TORCHELASTIC_RUN_ID` — plus Watt's `WATT_CHECKPOINT_DIR`, `WATT_PROGRESS_SOCKET` and
//! `WATT_SIM_SPEED_FILE`. Bad values are refused with the flag or variable named.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use watt_common::duration::parse as parse_duration;

use crate::model::{Model, ModelKind};

/// Watt's reference training worker: data-parallel SGD on a synthetic data set, gradients
/// averaged by a ring all-reduce over TCP, checkpoints, progress reports.
#[derive(Debug, Clone, Parser)]
#[command(name = "watt-worker", version, about, long_about = None)]
pub struct Args {
    /// Train until this many steps are done (counting steps done before a resume).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,

    /// Samples per step across all ranks; each rank takes its share.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub global_batch: u64,

    /// Learning rate.
    #[arg(long, default_value_t = 0.5)]
    pub lr: f64,

    /// Checkpoint every K steps (and on SIGTERM, and at the end).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: u64,

    #[arg(long, value_enum, default_value_t = ModelKind::Logreg)]
    pub model: ModelKind,

    /// Input features (the model's size grows with it: logreg has features + 1 parameters).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    pub features: u64,

    /// Hidden units of the MLP.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub hidden: u64,

    /// Samples in the synthetic data set.
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub dataset_size: u64,

    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// What one step's computation takes on a simulated GPU at full power; the worker pads its
    /// compute to this, stretched by the GPU's speed at its cap (`WATT_SIM_SPEED_FILE`).
    /// 0: as fast as the CPU computes.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub step_time: Duration,

    /// How long to wait for every rank to join.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub rendezvous_timeout: Duration,

    /// How long a collective may wait on a silent peer before the step fails.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub collective_timeout: Duration,

    /// Log a progress line every N steps (0: never).
    #[arg(long, default_value_t = 100)]
    pub log_every: u64,
}

/// Where this process sits in the job, from the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub rank: usize,
    pub world: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub run: String,
    /// `WATT_RUN_TOKEN`: the run's secret every rank proves it holds at the rendezvous.
    pub run_token: Option<String>,
    pub checkpoint_dir: Option<PathBuf>,
    pub progress_socket: Option<PathBuf>,
    pub speed_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid {name}: {message}")]
pub struct EnvError {
    pub name: &'static str,
    pub message: String,
}

impl Placement {
    /// Read the torchrun and Watt variables through `get` (the process environment in `main`).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let number = |name: &'static str, default: u64, max: u64| -> Result<u64, EnvError> {
            match get(name) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n <= max)
                    .ok_or(EnvError { name, message: format!("{v:?} is not a whole number up to {max}") }),
            }
        };
        let world = number("WORLD_SIZE", 1, 65_536)? as usize;
        if world == 0 {
            return Err(EnvError { name: "WORLD_SIZE", message: "must be at least 1".into() });
        }
        let rank = number("RANK", 0, 65_535)? as usize;
        if rank >= world {
            return Err(EnvError { name: "RANK", message: format!("{rank} is not below WORLD_SIZE {world}") });
        }
        let master_port = number("MASTER_PORT", 29_500, 65_535)? as u16;
        if world > 1 && master_port == 0 {
            return Err(EnvError { name: "MASTER_PORT", message: "must not be 0".into() });
        }
        let path = |name| get(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        Ok(Placement {
            rank,
            world,
            master_addr: get("MASTER_ADDR").filter(|v| !v.is_empty()).unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            run: get("TORCHELASTIC_RUN_ID").filter(|v| !v.is_empty()).unwrap_or_else(|| "none".into()),
            run_token: get("WATT_RUN_TOKEN").filter(|v| !v.is_empty()),
            checkpoint_dir: path("WATT_CHECKPOINT_DIR"),
            progress_socket: path("WATT_PROGRESS_SOCKET"),
            speed_file: path("WATT_SIM_SPEED_FILE"),
        })
    }
}

impl Args {
    pub fn model(&self) -> Model {
        Model { kind: self.model, features: self.features as usize, hidden: self.hidden as usize }
    }

    pub fn validate(&self) -> Result<(), EnvError> {
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 100.0) {
            return Err(EnvError { name: "--lr", message: format!("{} is not in (0, 100]", self.lr) });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_are_a_world_of_one() {
        let p = Placement::from_env(env(&[])).unwrap();
        assert_eq!((p.rank, p.world, p.master_port), (0, 1, 29_500));
        assert!(p.checkpoint_dir.is_none());
    }

    #[test]
    fn bad_variables_are_named() {
        for (pairs, name) in [
            (vec![("WORLD_SIZE", "0")], "WORLD_SIZE"),
            (vec![("WORLD_SIZE", "two")], "WORLD_SIZE"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "RANK"),
            (vec![("MASTER_PORT", "70000")], "MASTER_PORT"),
        ] {
            let e = Placement::from_env(env(&pairs)).unwrap_err();
            assert_eq!(e.name, name, "{pairs:?}: {e}");
        }
    }
}
