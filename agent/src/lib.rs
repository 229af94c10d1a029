//! `watt-agent`: Watt's per-node daemon.
//!
//! It reads every GPU on the node through a [`gpu::GpuBackend`] (NVML, or simulated GPUs when
//! there are none), samples them on a fixed interval ([`sampler`]), and exports what it read to
//! Prometheus ([`exporter`]), optionally under dcgm-exporter's names as well, with the node's
//! non-GPU draw ([`powercap`]). The power-cap [`enforcer`], the worker [`supervisor`] and the
//! session with the controller read the same snapshots. With `--controller`, [`session`] keeps a stream open to the
//! controller: registration, telemetry, and shard orders applied to the [`shards`] table.
//!
//! The binary in `main.rs` only parses flags, starts logging and calls [`app::run`].

pub mod app;
pub mod bootstrap;
pub mod config;
pub mod enforcer;
pub mod error;
pub mod exporter;
pub mod gpu;
pub mod host;
pub mod https;
pub mod logs;
pub mod node_labels;
pub mod power_trace;
pub mod powercap;
pub mod progress;
pub mod sampler;
pub mod session;
pub mod shards;
pub mod supervisor;

pub use error::AgentError;
