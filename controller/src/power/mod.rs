//! Power: where it comes from (sources, with ramp rates), what is left for GPUs (the budget),
//! how it is shared (the [`allocator`], on each job's [`speed_fit`]), and how the cluster moves from one allocation to the
//! next without ever drawing more than it may (the [`planner`]).
//!
//! Everything here is plain data and pure functions of it; times are passed in as Unix
//! milliseconds, never read from a clock.

pub mod acks;
pub mod admission;
pub mod allocator;
pub mod carried;
pub mod ceilings;
pub mod domain_allocation;
pub mod domains;
pub mod epochs;
pub mod grid;
pub mod meter;
/// The speed-vs-cap curve lives in `watt-common`: the agent's simulated GPUs pace workers by it.
pub use watt_common::curve;
pub mod planner;
pub mod ramp;
pub mod speed_fit;
pub mod swing;
pub mod table;

use serde::{Deserialize, Serialize};

/// Where power comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceKind {
    Grid,
    Generator,
    Battery,
    Manual,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Grid => "grid",
            SourceKind::Generator => "generator",
            SourceKind::Battery => "battery",
            SourceKind::Manual => "manual",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "grid" => Some(SourceKind::Grid),
            "generator" => Some(SourceKind::Generator),
            "battery" => Some(SourceKind::Battery),
            "manual" => Some(SourceKind::Manual),
            _ => None,
        }
    }
}

/// One power source as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub name: String,
    pub kind: SourceKind,
    /// What the source can supply once any ramp is done.
    pub available_watts: f64,
    /// How fast an increase may be taken up; `None`: at once. Decreases are always at once (a
    /// turbine trip does not ramp).
    pub ramp_watts_per_second: Option<f64>,
    /// Where the current ramp started: the supply in force at `ramp_start_unix_ms`.
    pub ramp_from_watts: f64,
    pub ramp_start_unix_ms: i64,
    /// The power domain (a feed) it supplies, whose nodes then draw no more than it gives;
    /// `None`: the site as a whole.
    #[serde(default)]
    pub domain: Option<String>,
}

impl Source {
    /// The power this source supplies at `now`.
    pub fn effective_watts(&self, now_unix_ms: i64) -> f64 {
        match self.ramp_watts_per_second {
            Some(rate) if self.available_watts > self.ramp_from_watts => {
                let seconds = (now_unix_ms - self.ramp_start_unix_ms).max(0) as f64 / 1000.0;
                (self.ramp_from_watts + rate * seconds).min(self.available_watts)
            }
            _ => self.available_watts,
        }
    }

    /// This source after an update to `available` at `now`: an increase ramps from what is in
    /// force now; a decrease applies at once.
    pub fn updated(&self, kind: SourceKind, available: f64, ramp: Option<f64>, now_unix_ms: i64) -> Source {
        Source {
            name: self.name.clone(),
            kind,
            available_watts: available,
            ramp_watts_per_second: ramp,
            ramp_from_watts: self.effective_watts(now_unix_ms).min(available),
            ramp_start_unix_ms: now_unix_ms,
            domain: self.domain.clone(),
        }
    }

    /// A source that did not exist: with a ramp it starts from nothing; without, at once.
    pub fn new(name: &str, kind: SourceKind, available: f64, ramp: Option<f64>, now_unix_ms: i64) -> Source {
        Source {
            name: name.into(),
            kind,
            available_watts: available,
            ramp_watts_per_second: ramp,
            ramp_from_watts: if ramp.is_some() { 0.0 } else { available },
            ramp_start_unix_ms: now_unix_ms,
            domain: None,
        }
    }
}

/// Site settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Site {
    /// Share of available power never allocated, for what moves faster than the controller.
    pub reserve_ratio: f64,
    /// Facility power per watt of IT power (cooling, conversion); 1.0 when sources are metered
    /// at the IT load.
    pub pue: f64,
    /// Draw of everything on a node that is not a GPU, when the node does not report its own.
    pub node_overhead_watts: f64,
    /// What a GPU with no work draws at most. Idle GPUs are parked at their minimum cap, but with
    /// no process on them they draw far less (an H100 idles near 70 W under a 200 W cap).
    pub idle_gpu_watts: f64,
    /// The fastest counted power may rise, W/s, over any second and any minute (see
    /// [`ramp`]): cap increases — restores, resumes, regrowth, a start's caps — are shaped to
    /// it. None: as fast as the planner's waves go.
    #[serde(default)]
    pub ramp_up_watts_per_second: Option<f64>,
    /// The fastest a job Watt chooses to stop (a cancel) has its caps lowered, W/s, before its
    /// shards get SIGTERM. None: at once. A source cut is never slowed by it.
    #[serde(default)]
    pub ramp_down_watts_per_second: Option<f64>,
}

impl Default for Site {
    fn default() -> Self {
        Site {
            reserve_ratio: 0.05,
            pue: 1.0,
            node_overhead_watts: 0.0,
            idle_gpu_watts: 100.0,
            ramp_up_watts_per_second: None,
            ramp_down_watts_per_second: None,
        }
    }
}

/// The budget for GPUs: available × (1 − reserve) / PUE − what every node draws besides GPUs.
pub fn gpu_budget_watts(available_watts: f64, site: &Site, non_gpu_watts: f64) -> f64 {
    safe_limit_watts(available_watts, site) - non_gpu_watts
}

/// The limit every counted draw must stay under: available × (1 − reserve) / PUE.
pub fn safe_limit_watts(available_watts: f64, site: &Site) -> f64 {
    available_watts * (1.0 - site.reserve_ratio) / site.pue
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increases_ramp_and_decreases_are_immediate() {
        let s = Source::new("gen", SourceKind::Generator, 10e6, Some(1e6), 0);
        assert_eq!(s.effective_watts(0), 0.0);
        assert_eq!(s.effective_watts(4_000), 4e6);
        assert_eq!(s.effective_watts(20_000), 10e6);
        let tripped = s.updated(SourceKind::Generator, 2e6, Some(1e6), 5_000);
        assert_eq!(tripped.effective_watts(5_000), 2e6, "a trip applies at once");
        let back = tripped.updated(SourceKind::Generator, 10e6, Some(1e6), 6_000);
        assert_eq!(back.effective_watts(6_000), 2e6);
        assert_eq!(back.effective_watts(9_000), 5e6, "regrowth follows the ramp from what was in force");
        let grid = Source::new("grid", SourceKind::Grid, 30e6, None, 0);
        assert_eq!(grid.effective_watts(0), 30e6);
    }

    #[test]
    fn the_budget_takes_reserve_pue_and_overhead() {
        let site = Site { reserve_ratio: 0.1, pue: 1.2, ..Site::default() };
        assert!((gpu_budget_watts(12e6, &site, 1e6) - 8e6).abs() < 1e-6);
    }
}
