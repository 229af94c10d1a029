//! The controller's Prometheus metrics: nodes, GPUs and jobs by state, sessions, and how long
//! scheduling and reconciling take.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::time::Instant;

use crate::jobs::{JobState, JobTable};
use crate::registry::{NodeState, Registry as NodeRegistry};

#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub nodes: IntGaugeVec,
    pub gpus: IntGaugeVec,
    pub jobs: IntGaugeVec,
    pub sessions: IntGauge,
    pub scheduling_duration: Histogram,
    pub reconcile_duration: Histogram,
    pub placements: IntCounter,
    pub preemptions: IntCounter,
}

const LATENCY_BUCKETS: &[f64] = &[1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let nodes = IntGaugeVec::new(Opts::new("watt_controller_nodes", "Registered nodes by state."), &["state"])?;
        let gpus = IntGaugeVec::new(
            Opts::new("watt_controller_gpus", "GPUs on ready nodes: allocated to shards, or free."),
            &["state"],
        )?;
        let jobs = IntGaugeVec::new(Opts::new("watt_jobs", "Jobs by state."), &["state"])?;
        let sessions = IntGauge::new("watt_controller_sessions", "Open agent sessions.")?;
        let scheduling_duration = Histogram::with_opts(
            HistogramOpts::new("watt_scheduling_duration_seconds", "Time of one scheduler run.")
                .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new("watt_reconcile_duration_seconds", "Time of one reconcile pass, store writes included.")
                .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let placements = IntCounter::new("watt_shard_placements_total", "Shards placed by the scheduler.")?;
        let preemptions = IntCounter::new("watt_job_preemptions_total", "Jobs preempted for higher-priority ones.")?;
        registry.register(Box::new(nodes.clone()))?;
        registry.register(Box::new(gpus.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(scheduling_duration.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(placements.clone()))?;
        registry.register(Box::new(preemptions.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(Metrics {
            registry,
            nodes,
            gpus,
            jobs,
            sessions,
            scheduling_duration,
            reconcile_duration,
            placements,
            preemptions,
        })
    }

    /// Refresh the gauges from the controller's state.
    pub fn observe(&self, jobs: &JobTable, registry: &NodeRegistry, now: Instant, lease: std::time::Duration) {
        for state in JobState::ALL {
            self.jobs.with_label_values(&[state.as_str()]).set(jobs.iter().filter(|j| j.state == state).count() as i64);
        }
        let allocated: usize =
            jobs.iter().filter(|j| j.state.is_active()).flat_map(|j| j.shards.iter()).map(|s| s.gpus.len()).sum();
        let nodes = registry.lock();
        let mut counts = [0i64; 3];
        let mut ready_gpus = 0;
        let mut sessions = 0;
        for entry in nodes.values() {
            let state = entry.state(now, lease);
            counts[state as usize] += 1;
            if state == NodeState::Ready {
                ready_gpus += entry.gpus.len();
            }
            sessions += usize::from(entry.session.is_some());
        }
        for state in [NodeState::Ready, NodeState::Disconnected, NodeState::Lost] {
            self.nodes.with_label_values(&[state.as_str()]).set(counts[state as usize]);
        }
        self.gpus.with_label_values(&["allocated"]).set(allocated as i64);
        self.gpus.with_label_values(&["free"]).set(ready_gpus.saturating_sub(allocated) as i64);
        self.sessions.set(sessions as i64);
    }
}
