//! The node's power at every sample, for the controller's power-swing monitoring: each round's
//! GPU power summed over the node and over each job's GPUs here, kept until the session sends
//! them, in one compact message a second (`PowerTrace`).
//!
//! Only an agent sampling at the driver's 10 Hz (`--sample-interval 100ms`; the chart and
//! `wattctl up` set it) keeps a trace: the swings the grid cares about (0.1–5 Hz) need that
//! rate, so the trace carries every round, not the once-a-second telemetry. At most a minute is
//! kept while no session takes it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use watt_proto::v1 as pb;

use crate::sampler::NodeSnapshot;
use crate::shards::ShardTable;

/// Traces are sent only by agents sampling at least this often: the driver updates power every
/// 100 ms, and the controller's 1–5 Hz band needs all of it.
pub const FINEST_USEFUL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Rounds kept while no session takes them: a minute at 10 Hz.
const MAX_ROUNDS: usize = 600;

#[derive(Debug, Clone, PartialEq)]
struct Round {
    unix_ms: i64,
    node_watts: f64,
    jobs: BTreeMap<String, f64>,
}

/// Rounds not sent yet.
#[derive(Debug, Default)]
pub struct PowerTrace {
    rounds: Mutex<Vec<Round>>,
}

impl PowerTrace {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Round>> {
        self.rounds.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take one round: every GPU that answered, summed; and per job, its GPUs (`gpu_jobs`: which
    /// job each busy GPU runs).
    pub fn record(&self, snapshot: &NodeSnapshot, gpu_jobs: &BTreeMap<u32, String>) {
        let mut round = Round { unix_ms: snapshot.unix_ms, node_watts: 0.0, jobs: BTreeMap::new() };
        for (info, reading) in snapshot.inventory.iter().zip(&snapshot.gpus) {
            let Some(watts) = reading.sample.as_ref().map(|s| s.power_watts).filter(|w| w.is_finite()) else {
                continue;
            };
            round.node_watts += watts;
            if let Some(job) = gpu_jobs.get(&info.index) {
                *round.jobs.entry(job.clone()).or_default() += watts;
            }
        }
        let mut rounds = self.lock();
        if rounds.last().is_some_and(|r| r.unix_ms >= round.unix_ms) {
            return;
        }
        rounds.push(round);
        if rounds.len() > MAX_ROUNDS {
            let excess = rounds.len() - MAX_ROUNDS;
            rounds.drain(..excess);
        }
    }

    /// Everything recorded since the last take, as one message; none if nothing was.
    pub fn take(&self) -> Option<pb::PowerTrace> {
        let rounds = std::mem::take(&mut *self.lock());
        let first = rounds.first()?.unix_ms;
        let names: std::collections::BTreeSet<&String> = rounds.iter().flat_map(|r| r.jobs.keys()).collect();
        Some(pb::PowerTrace {
            start_unix_ms: first,
            offsets_ms: rounds.iter().map(|r| (r.unix_ms - first).clamp(0, i64::from(u32::MAX)) as u32).collect(),
            node_watts: rounds.iter().map(|r| r.node_watts as f32).collect(),
            jobs: names
                .into_iter()
                .map(|job| pb::JobTrace {
                    job: job.clone(),
                    watts: rounds.iter().map(|r| r.jobs.get(job).copied().unwrap_or(0.0) as f32).collect(),
                })
                .collect(),
        })
    }
}

/// Record every round the sampler publishes until `stop` turns true.
pub async fn collect(
    mut snapshots: watch::Receiver<Arc<NodeSnapshot>>,
    shards: Arc<ShardTable>,
    trace: Arc<PowerTrace>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        let snapshot = snapshots.borrow_and_update().clone();
        if snapshot.round > 0 {
            trace.record(&snapshot, &shards.gpu_jobs());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuInfo, GpuSample, PowerLimitConstraints};
    use crate::sampler::GpuReading;

    fn snapshot(unix_ms: i64, watts: &[f64]) -> NodeSnapshot {
        let inventory: Arc<[GpuInfo]> = (0..watts.len() as u32)
            .map(|index| GpuInfo {
                index,
                uuid: format!("GPU-{index}"),
                model: "sim".into(),
                pci_bus_id: String::new(),
                device: String::new(),
                memory_total_bytes: 0,
                power_limit: PowerLimitConstraints { min_watts: 200.0, max_watts: 700.0, default_watts: 700.0 },
            })
            .collect();
        let mut s = NodeSnapshot::empty(inventory);
        s.unix_ms = unix_ms;
        s.round = 1;
        s.gpus = watts
            .iter()
            .map(|&w| GpuReading {
                sample: Some(GpuSample { power_watts: w, ..GpuSample::default() }),
                ..GpuReading::default()
            })
            .collect();
        s
    }

    #[test]
    fn rounds_are_summed_per_node_and_per_job_and_taken_once() {
        let trace = PowerTrace::default();
        assert_eq!(trace.take(), None);
        let jobs: BTreeMap<u32, String> = [(0, "a".to_string()), (1, "a".to_string()), (2, "b".to_string())].into();
        trace.record(&snapshot(1_000, &[700.0, 650.0, 300.0, 80.0]), &jobs);
        trace.record(&snapshot(1_100, &[250.0, 240.0, 310.0, 80.0]), &jobs);
        trace.record(&snapshot(1_100, &[1.0, 1.0, 1.0, 1.0]), &jobs); // the same round again: kept once
        let t = trace.take().unwrap();
        assert_eq!((t.start_unix_ms, t.offsets_ms.clone()), (1_000, vec![0, 100]));
        assert_eq!(t.node_watts, vec![1_730.0, 880.0]);
        assert_eq!(t.jobs.len(), 2);
        assert_eq!((t.jobs[0].job.as_str(), t.jobs[0].watts.clone()), ("a", vec![1_350.0, 490.0]));
        assert_eq!((t.jobs[1].job.as_str(), t.jobs[1].watts.clone()), ("b", vec![300.0, 310.0]));
        assert_eq!(trace.take(), None, "taken once");
        for i in 0..(MAX_ROUNDS as i64 + 50) {
            trace.record(&snapshot(10_000 + 100 * i, &[1.0]), &BTreeMap::new());
        }
        let t = trace.take().unwrap();
        assert_eq!(t.node_watts.len(), MAX_ROUNDS, "a minute at most");
        assert_eq!(t.start_unix_ms, 10_000 + 100 * 50, "the oldest dropped");
    }
}
