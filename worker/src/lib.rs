//! `watt-worker`, the reference training workload: what a Watt job runs on machines without
//! GPUs, with the same contract as a PyTorch script under `torchrun`.
//!
//! - [`config`]: flags and the torchrun environment.
//! - [`rendezvous`] and [`ring`]: ranks meet at `MASTER_ADDR:MASTER_PORT` and average gradients by
//!   a ring all-reduce over TCP.
//! - [`data`] and [`model`]: a deterministic synthetic data set; logistic regression or an MLP.
//! - [`train`]: data-parallel SGD with a fixed global batch, resumable at any world size.
//! - [`checkpoint`]: atomic, checksummed checkpoints. [`progress`]: reports to the agent.

pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod data;
pub mod model;
pub mod progress;
pub mod rendezvous;
pub mod ring;
pub mod train;
