//! The controller's Prometheus metrics: nodes, GPUs and jobs by state, sessions, and how long
//! scheduling and reconciling take.

use prometheus::{
    Counter, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};
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
    /// A pass's time by phase (see [`ReconcilePhase`]).
    pub reconcile_phase: HistogramVec,
    pub placements: IntCounter,
    pub preemptions: IntCounter,
    /// By basis: `counted` (Watt's accounting) and `measured` (the meter).
    pub budget_violations: IntCounterVec,
    pub overdraw_seconds: Counter,
    pub overdraw_worst: Gauge,
    /// How fast counted power moved, W/s, over the last `window` ("1s", "60s").
    pub ramp: GaugeVec,
    /// The site's ramp limit, W/s (0: none).
    pub ramp_limit: Gauge,
    /// Power swings over the last 10 s analyzed (see [`crate::swings`]): the site's, and each
    /// running job's, with each band's share of the variation.
    pub swing: Gauge,
    pub swing_band: GaugeVec,
    pub job_swing: GaugeVec,
    pub job_swing_band: GaugeVec,
    /// The band share above which `WattPowerSwing` fires (`--swing-alert-share`).
    pub swing_alert: Gauge,
    pub infeasible: IntGauge,
    pub unenforced_nodes: IntGauge,
    pub foreign_gpus: IntGauge,
    /// Nodes by enforcement mode.
    pub enforce_modes: IntGaugeVec,
    pub power_event_ack: Histogram,
    pub power: GaugeVec,
    pub source_watts: GaugeVec,
    /// Per power domain: its limit, what it counts, what it draws (`watt_power_domain_watts`).
    pub domain_watts: GaugeVec,
    pub failsafe_nodes: IntGauge,
    pub unacknowledged_nodes: IntGauge,
    /// 1 while a power event is being carried out (see [`crate::power::acks::AckTracker`]).
    pub power_event_open: IntGauge,
    /// 1 while the gRPC port listens off loopback in plain text (`--insecure`).
    pub insecure_listener: IntGauge,
    /// Calls refused, by gRPC code: `unauthenticated` or `permission_denied`.
    pub refused_calls: IntCounterVec,
    /// Store writes that failed (conflicts aside), and whether the last one succeeded.
    pub store_errors: IntCounter,
    pub store_up: IntGauge,
    /// 1 while this controller leads (see [`crate::leadership`]), and the term it leads or led in.
    pub leader: IntGauge,
    pub term: IntGauge,
    /// 1 while this controller caretakes its term (invariant 11).
    pub caretaker: IntGauge,
    /// Where the warm copy of etcd stands (see [`crate::store::replica`]).
    pub replica_revision: IntGauge,
    pub replica_in_sync: IntGauge,
    pub term_load_seconds: GaugeVec,
    /// Per running job, from its workers' progress reports: step, steps/s, samples/s, J/step.
    pub job_progress: [GaugeVec; 4],
    /// Per running job, its learned speed curve (see [`crate::speed_curves`]).
    pub job_curve: [GaugeVec; 4],
    /// Per job the allocation holds: shards kept and the cap of every GPU (0 while paused).
    pub job_shards: GaugeVec,
    pub job_cap: GaugeVec,
    /// 1 for each job that has not ended, labelled with its state (ended jobs leave the metric).
    pub job_state: IntGaugeVec,
    /// The OpenADR VEN and the grid's windows (see [`crate::openadr`]).
    pub grid: crate::openadr::GridMetrics,
    /// The state `job_state` shows for each job: a pass changes only the jobs that moved (a
    /// thousand label lookups every pass cost more than the rest of the books).
    job_state_shown: std::sync::Arc<std::sync::Mutex<crate::NameMap<String, JobState>>>,
    /// The jobs `job_shards` and `job_cap` show: set in place each time, and only the jobs the
    /// allocation no longer holds removed (not every one cleared and made again).
    job_power_shown: std::sync::Arc<std::sync::Mutex<crate::NameSet<String>>>,
}

/// The per-job speed-curve metrics, in the order of [`Metrics::job_curve`].
const JOB_CURVE: [(&str, &str); 4] = [
    ("watt_job_speed_at_60_percent_cap_ratio", "A running job's learned speed at 60% of its GPUs' maximum cap, relative to its speed at the maximum."),
    ("watt_job_speed_at_80_percent_cap_ratio", "A running job's learned speed at 80% of its GPUs' maximum cap, relative to its speed at the maximum."),
    ("watt_job_speed_curve_exponent", "The exponent of a running job's learned speed curve, speed = (cap / max)^exponent: 0 flat (memory-bound), 1 in proportion to the cap."),
    ("watt_job_speed_curve_observations", "Windows of steady caps a running job's speed curve was measured over."),
];

/// The per-job progress metrics, in the order of [`Metrics::job_progress`].
const JOB_PROGRESS: [(&str, &str); 4] = [
    ("watt_job_step", "Steps a running job has completed, as its rank 0 reports."),
    ("watt_job_steps_per_second", "A running job's steps per second over the last 30 s."),
    ("watt_job_samples_per_second", "A running job's samples per second over the last 30 s."),
    ("watt_job_energy_per_step_joules", "Energy drawn by a running job's GPUs per step, over the last 30 s."),
];

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
            HistogramOpts::new(
                "watt_scheduling_duration_seconds",
                "Time of one decision: scheduler, power admission, growth.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new("watt_reconcile_duration_seconds", "Time of one reconcile pass, store writes included.")
                .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let reconcile_phase = HistogramVec::new(
            HistogramOpts::new(
                "watt_reconcile_phase_seconds",
                "Time of one reconcile pass by phase: view (gather), decide, store, caps, orders, books.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["phase"],
        )?;
        let placements = IntCounter::new("watt_shard_placements_total", "Shards placed by the scheduler.")?;
        let preemptions = IntCounter::new("watt_job_preemptions_total", "Jobs preempted for higher-priority ones.")?;
        let budget_violations = IntCounterVec::new(
            Opts::new(
                "watt_budget_violations_total",
                "Budget violations, by basis: counted (Watt's accounting above the limit with every decrease acknowledged) or measured (measured draw above the limit past the settle time, on a feasible budget). Must stay 0.",
            ),
            &["basis"],
        )?;
        for basis in ["counted", "measured"] {
            budget_violations.with_label_values(&[basis]);
        }
        let overdraw_seconds = Counter::new(
            "watt_power_overdraw_seconds_total",
            "Seconds measured draw spent above the limit past the settle time after a power event.",
        )?;
        let overdraw_worst = Gauge::new(
            "watt_power_overdraw_worst_watts",
            "The largest measured overdraw past the settle time since the controller started.",
        )?;
        let ramp = GaugeVec::new(
            Opts::new(
                "watt_power_ramp_watts_per_second",
                "How fast counted power moved over the last window (1s, 60s), W/s; negative while falling. Rises are held under the site's ramp_up.",
            ),
            &["window"],
        )?;
        let ramp_limit = Gauge::new(
            "watt_power_ramp_limit_watts_per_second",
            "The site's ramp_up limit on counted power, W/s; 0 when none is set.",
        )?;
        registry.register(Box::new(ramp.clone()))?;
        let swing = Gauge::new(
            "watt_power_swing_watts",
            "The site's GPU power swing over the last 10 s analyzed (sampled at 10 Hz): p95 − p5.",
        )?;
        let swing_band = GaugeVec::new(
            Opts::new(
                "watt_power_swing_band_ratio",
                "Share of the site's GPU power variation over the last 10 s in each band (0.1-1Hz, 1-5Hz).",
            ),
            &["band"],
        )?;
        let job_swing = GaugeVec::new(
            Opts::new(
                "watt_job_power_swing_watts",
                "A running job's GPU power swing over the last 10 s analyzed: p95 − p5.",
            ),
            &["job"],
        )?;
        let job_swing_band = GaugeVec::new(
            Opts::new(
                "watt_job_power_swing_band_ratio",
                "Share of a running job's GPU power variation over the last 10 s in each band (0.1-1Hz, 1-5Hz).",
            ),
            &["job", "band"],
        )?;
        let swing_alert = Gauge::new(
            "watt_power_swing_alert_ratio",
            "The share of the site's power variation in one band above which WattPowerSwing fires (--swing-alert-share).",
        )?;
        for m in [&swing, &swing_alert] {
            registry.register(Box::new(m.clone()))?;
        }
        for m in [&swing_band, &job_swing, &job_swing_band] {
            registry.register(Box::new(m.clone()))?;
        }
        registry.register(Box::new(ramp_limit.clone()))?;
        let infeasible = IntGauge::new(
            "watt_power_infeasible",
            "1 while the limit is below what the cluster draws with every job paused (watt_power_watts{what=\"floor\"}).",
        )?;
        let unenforced_nodes =
            IntGauge::new("watt_power_unenforced_nodes", "Nodes that do not enforce caps (dry-run or off).")?;
        let foreign_gpus = IntGauge::new(
            "watt_power_foreign_gpus",
            "GPUs drawing above idle with no Watt shard on them, counted at their caps.",
        )?;
        let enforce_modes = IntGaugeVec::new(
            Opts::new(
                "watt_controller_nodes_by_enforce_mode",
                "Registered nodes by enforcement mode: on, dry-run, off.",
            ),
            &["mode"],
        )?;
        let power_event_ack = Histogram::with_opts(
            HistogramOpts::new(
                "watt_power_event_to_ack_seconds",
                "From a power source or site change to every cap it moved acknowledged.",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
        )?;
        let power = GaugeVec::new(
            Opts::new(
                "watt_power_watts",
                "Cluster power by what: available, limit (after reserve and PUE), budget (for GPUs), allocated, counted, drawn (GPUs), measured (GPUs and non-GPU, as the meter judges it), non_gpu, floor (every job paused), foreign (GPUs with processes Watt did not start), unenforced_excess (nodes not enforcing, above their orders).",
            ),
            &["what"],
        )?;
        let source_watts =
            GaugeVec::new(Opts::new("watt_power_source_watts", "What each source supplies now."), &["source", "kind"])?;
        let domain_watts = GaugeVec::new(
            Opts::new(
                "watt_power_domain_watts",
                "Per power domain (feed, row, rack) and its level under the site: the limit in force, its breaker's rating × derating, the counted power of its nodes, and their measured draw.",
            ),
            &["domain", "parent", "level", "what"],
        )?;
        let failsafe_nodes =
            IntGauge::new("watt_power_failsafe_nodes", "Unreachable nodes counted at their failsafe caps.")?;
        let unacknowledged_nodes =
            IntGauge::new("watt_power_unacknowledged_nodes", "Nodes with a cap order sent and not yet acknowledged.")?;
        let power_event_open = IntGauge::new(
            "watt_power_event_open",
            "1 while a power event's caps are still being ordered or acknowledged (increases waiting their turn included); 0 once every cap it moved is acknowledged.",
        )?;
        let insecure_listener = IntGauge::new(
            "watt_controller_insecure_listener",
            "1 while the gRPC port listens off loopback without TLS (--insecure): credentials cross the network in plain text.",
        )?;
        let refused_calls = IntCounterVec::new(
            Opts::new(
                "watt_controller_refused_calls_total",
                "gRPC calls refused before any service saw them, by code.",
            ),
            &["code"],
        )?;
        let store_errors = IntCounter::new(
            "watt_store_errors_total",
            "Store writes that failed (a full disk, an unreachable etcd); compare-and-swap conflicts are not counted.",
        )?;
        let store_up = IntGauge::new(
            "watt_store_up",
            "1 while the store's last write succeeded, 0 after one failed (until one succeeds again).",
        )?;
        let leader = IntGauge::new(
            "watt_controller_leader",
            "1 while this controller leads and issues orders; 0 while it follows (or elects).",
        )?;
        let caretaker = IntGauge::new(
            "watt_controller_caretaker",
            "1 while this controller cares for the term it led, out of touch with the store: it only lowers caps (invariant 11).",
        )?;
        let term_load_seconds = GaugeVec::new(
            Opts::new(
                "watt_controller_term_load_seconds",
                "How long loading the last term won took, by where it loaded from (warm_copy or store).",
            ),
            &["from"],
        )?;
        let replica_revision = IntGauge::new(
            "watt_controller_replica_revision",
            "The etcd revision through which this controller's warm copy of the store is complete.",
        )?;
        let replica_in_sync = IntGauge::new(
            "watt_controller_replica_in_sync",
            "1 while etcd confirmed the warm copy caught up within the last 5 s.",
        )?;
        let term = IntGauge::new(
            "watt_controller_term",
            "The term this controller leads in, or last led in; 0 if it never led. Terms only grow.",
        )?;
        let gauge = |(name, help): (&str, &str)| GaugeVec::new(Opts::new(name, help), &["job"]);
        let job_progress =
            [gauge(JOB_PROGRESS[0])?, gauge(JOB_PROGRESS[1])?, gauge(JOB_PROGRESS[2])?, gauge(JOB_PROGRESS[3])?];
        for g in &job_progress {
            registry.register(Box::new(g.clone()))?;
        }
        let job_curve = [gauge(JOB_CURVE[0])?, gauge(JOB_CURVE[1])?, gauge(JOB_CURVE[2])?, gauge(JOB_CURVE[3])?];
        for g in &job_curve {
            registry.register(Box::new(g.clone()))?;
        }
        let job_shards = GaugeVec::new(
            Opts::new("watt_job_shards", "Shards the power allocation keeps for each placed job (0 while paused)."),
            &["job"],
        )?;
        let job_cap = GaugeVec::new(
            Opts::new("watt_job_cap_watts", "The power cap of every GPU of each placed job (0 while paused)."),
            &["job"],
        )?;
        let job_state = IntGaugeVec::new(
            Opts::new(
                "watt_job_state",
                "1 for each job not ended yet, labelled with its state: pending, starting, running.",
            ),
            &["job", "state"],
        )?;
        registry.register(Box::new(job_state.clone()))?;
        registry.register(Box::new(job_shards.clone()))?;
        registry.register(Box::new(job_cap.clone()))?;
        registry.register(Box::new(nodes.clone()))?;
        registry.register(Box::new(gpus.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(scheduling_duration.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(reconcile_phase.clone()))?;
        registry.register(Box::new(placements.clone()))?;
        registry.register(Box::new(preemptions.clone()))?;
        registry.register(Box::new(budget_violations.clone()))?;
        registry.register(Box::new(overdraw_seconds.clone()))?;
        registry.register(Box::new(overdraw_worst.clone()))?;
        registry.register(Box::new(infeasible.clone()))?;
        registry.register(Box::new(unenforced_nodes.clone()))?;
        registry.register(Box::new(foreign_gpus.clone()))?;
        registry.register(Box::new(enforce_modes.clone()))?;
        registry.register(Box::new(power_event_ack.clone()))?;
        registry.register(Box::new(power.clone()))?;
        registry.register(Box::new(source_watts.clone()))?;
        registry.register(Box::new(domain_watts.clone()))?;
        registry.register(Box::new(failsafe_nodes.clone()))?;
        registry.register(Box::new(unacknowledged_nodes.clone()))?;
        registry.register(Box::new(power_event_open.clone()))?;
        registry.register(Box::new(insecure_listener.clone()))?;
        registry.register(Box::new(refused_calls.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        registry.register(Box::new(store_up.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(term.clone()))?;
        registry.register(Box::new(caretaker.clone()))?;
        registry.register(Box::new(replica_revision.clone()))?;
        registry.register(Box::new(term_load_seconds.clone()))?;
        registry.register(Box::new(replica_in_sync.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        let grid = crate::openadr::GridMetrics::register(&registry)?;
        Ok(Metrics {
            grid,
            registry,
            nodes,
            gpus,
            jobs,
            sessions,
            scheduling_duration,
            reconcile_duration,
            reconcile_phase,
            placements,
            preemptions,
            budget_violations,
            overdraw_seconds,
            overdraw_worst,
            ramp,
            ramp_limit,
            swing,
            swing_band,
            job_swing,
            job_swing_band,
            swing_alert,
            infeasible,
            unenforced_nodes,
            foreign_gpus,
            enforce_modes,
            power_event_ack,
            power,
            source_watts,
            domain_watts,
            failsafe_nodes,
            unacknowledged_nodes,
            power_event_open,
            insecure_listener,
            refused_calls,
            store_errors,
            store_up,
            leader,
            caretaker,
            replica_revision,
            replica_in_sync,
            term_load_seconds,
            term,
            job_progress,
            job_curve,
            job_shards,
            job_cap,
            job_state,
            job_state_shown: Default::default(),
            job_power_shown: Default::default(),
        })
    }

    /// Refresh the power gauges from a status.
    /// The swings of the last window; jobs no longer in it leave the per-job metrics.
    pub fn observe_swings(&self, report: &crate::swings::SwingReport) {
        use crate::power::swing::BANDS;
        if let Some(site) = report.site {
            self.swing.set(site.swing_watts);
            for (band, share) in BANDS.iter().zip(site.band_shares) {
                self.swing_band.with_label_values(&[band.name]).set(share);
            }
        }
        self.job_swing.reset();
        self.job_swing_band.reset();
        for (job, s) in &report.jobs {
            self.job_swing.with_label_values(&[job]).set(s.swing_watts);
            for (band, share) in BANDS.iter().zip(s.band_shares) {
                self.job_swing_band.with_label_values(&[job.as_str(), band.name]).set(share);
            }
        }
    }

    /// Every power domain's figures, with its level in the tree (1: directly under the site),
    /// for a dashboard row per level; a removed domain's series go (the tree bounds the labels).
    /// `limit` is the limit in force (the breaker's, or less: the sources feeding it, a grid
    /// event), `breaker` the rating × derating.
    pub fn observe_domains(&self, domains: &[watt_proto::v1::DomainStatus]) {
        self.domain_watts.reset();
        // Parents come before children: each level is its parent's plus one.
        let mut levels: Vec<usize> = Vec::with_capacity(domains.len());
        for d in domains {
            let parent = usize::try_from(d.parent_index).ok().and_then(|p| levels.get(p).copied()).unwrap_or(0);
            levels.push(parent + 1);
        }
        for (d, level) in domains.iter().zip(&levels) {
            let Some(domain) = &d.domain else { continue };
            let parent = if domain.parent.is_empty() { "site" } else { domain.parent.as_str() };
            let level = level.to_string();
            for (what, value) in [
                ("limit", d.effective_limit_watts),
                ("breaker", domain.limit_watts),
                ("counted", d.counted_watts),
                ("measured", d.measured_watts),
            ] {
                self.domain_watts.with_label_values(&[domain.name.as_str(), parent, level.as_str(), what]).set(value);
            }
        }
    }

    pub fn observe_power(&self, s: &watt_proto::v1::PowerStatus) {
        self.ramp_limit.set(s.site.and_then(|site| site.ramp_up_watts_per_second).unwrap_or(0.0));
        self.ramp.with_label_values(&["1s"]).set(s.ramp_1s_watts_per_second);
        self.ramp.with_label_values(&["60s"]).set(s.ramp_60s_watts_per_second);
        for (what, value) in [
            ("available", s.available_watts),
            ("limit", s.limit_watts),
            ("budget", s.budget_watts),
            ("allocated", s.allocated_watts),
            ("counted", s.counted_watts),
            ("drawn", s.drawn_watts),
            ("non_gpu", s.non_gpu_watts),
            ("floor", s.floor_watts),
            ("foreign", s.foreign_watts),
            ("unenforced_excess", s.unenforced_excess_watts),
        ] {
            self.power.with_label_values(&[what]).set(value);
        }
        self.source_watts.reset();
        for source in &s.sources {
            let kind =
                watt_proto::v1::SourceKind::try_from(source.kind).unwrap_or_default().as_str_name().to_lowercase();
            let kind = kind.trim_start_matches("source_kind_").to_string();
            self.source_watts.with_label_values(&[source.name.as_str(), kind.as_str()]).set(source.effective_watts);
        }
        {
            let mut shown = self.job_power_shown.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let listed: crate::NameSet<&str> = s.jobs.iter().map(|j| j.name.as_str()).collect();
            shown.retain(|name| {
                let keep = listed.contains(name.as_str());
                if !keep {
                    let _ = self.job_shards.remove_label_values(&[name]);
                    let _ = self.job_cap.remove_label_values(&[name]);
                }
                keep
            });
            for job in &s.jobs {
                self.job_shards.with_label_values(&[job.name.as_str()]).set(f64::from(job.shards));
                self.job_cap.with_label_values(&[job.name.as_str()]).set(job.cap_watts);
                if !shown.contains(job.name.as_str()) {
                    shown.insert(job.name.clone());
                }
            }
        }
        self.observe_domains(&s.domains);
        self.failsafe_nodes.set(i64::from(s.failsafe_nodes));
        self.infeasible.set(i64::from(s.infeasible));
        self.unenforced_nodes.set(i64::from(s.unenforced_nodes));
        self.foreign_gpus.set(i64::from(s.foreign_gpus));
        self.unacknowledged_nodes.set(i64::from(s.unacknowledged_nodes));
    }

    /// Running jobs' progress; jobs that stopped running leave the metrics (bounded labels).
    pub fn observe_progress(
        &self,
        jobs: &JobTable,
        book: &crate::progress::ProgressBook,
        curves: &crate::speed_curves::SpeedCurves,
    ) {
        for g in self.job_progress.iter().chain(&self.job_curve) {
            g.reset();
        }
        for job in jobs.iter().filter(|j| j.state.is_active()) {
            let name = job.spec.name.as_str();
            if let Some(p) = book.job(name) {
                self.set_progress(name, &p);
            }
            if let Some(c) = curves.describe(name, true) {
                let values = [c.speed_at_60_percent, c.speed_at_80_percent, c.exponent, f64::from(c.observations)];
                for (g, v) in self.job_curve.iter().zip(values) {
                    g.with_label_values(&[name]).set(v);
                }
            }
        }
        book.retain(|name| jobs.get(name).is_some());
        curves.retain(|name| jobs.get(name).is_some_and(|j| !j.state.is_terminal()));
    }

    /// One job's progress metrics, as its rank 0 reports (between passes too).
    pub fn set_progress(&self, job: &str, p: &watt_proto::v1::JobProgress) {
        let values = [p.step as f64, p.steps_per_second, p.samples_per_second, p.energy_per_step_joules];
        for (g, v) in self.job_progress.iter().zip(values) {
            g.with_label_values(&[job]).set(v);
        }
    }

    /// Refresh the gauges from the controller's state.
    pub fn observe(&self, jobs: &JobTable, registry: &NodeRegistry, now: Instant, lease: std::time::Duration) {
        for state in JobState::ALL {
            self.jobs.with_label_values(&[state.as_str()]).set(jobs.iter().filter(|j| j.state == state).count() as i64);
        }
        {
            let mut shown = self.job_state_shown.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut live = 0;
            for job in jobs.iter().filter(|j| !j.state.is_terminal()) {
                live += 1;
                let name = job.spec.name.as_str();
                if let Some(&before) = shown.get(name) {
                    if before == job.state {
                        continue;
                    }
                    let _ = self.job_state.remove_label_values(&[name, before.as_str()]);
                }
                self.job_state.with_label_values(&[name, job.state.as_str()]).set(1);
                shown.insert(name.to_owned(), job.state);
            }
            if shown.len() > live {
                // Some ended (or are gone): they leave the metric.
                shown.retain(|name, state| {
                    let still = jobs.get(name).is_some_and(|j| j.state == *state && !j.state.is_terminal());
                    if !still {
                        let _ = self.job_state.remove_label_values(&[name.as_str(), state.as_str()]);
                    }
                    still
                });
            }
        }
        let allocated: usize =
            jobs.iter().filter(|j| j.state.is_active()).flat_map(|j| j.shards.iter()).map(|s| s.gpus.len()).sum();
        let nodes = registry.lock();
        let mut counts = [0i64; 3];
        let mut modes = [0i64; 3];
        let mut ready_gpus = 0;
        let mut sessions = 0;
        for entry in nodes.values() {
            modes[match entry.enforce_mode {
                watt_proto::v1::EnforceMode::DryRun => 1,
                watt_proto::v1::EnforceMode::Off => 2,
                _ => 0,
            }] += 1;
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
        for (mode, count) in ["on", "dry-run", "off"].into_iter().zip(modes) {
            self.enforce_modes.with_label_values(&[mode]).set(count);
        }
        self.gpus.with_label_values(&["allocated"]).set(allocated as i64);
        self.gpus.with_label_values(&["free"]).set(ready_gpus.saturating_sub(allocated) as i64);
        self.sessions.set(sessions as i64);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::jobs::JobRecord;
    use crate::spec::JobSpec;
    use crate::store::file::FileStore;

    /// The jobs `watt_job_state` shows, as (job, state).
    fn shown(metrics: &Metrics) -> Vec<(String, String)> {
        let mut shown: Vec<(String, String)> = prometheus::core::Collector::collect(&metrics.job_state)[0]
            .get_metric()
            .iter()
            .map(|m| {
                let label = |name: &str| m.get_label().iter().find(|l| l.name() == name).unwrap().value().to_string();
                (label("job"), label("state"))
            })
            .collect();
        shown.sort();
        shown
    }

    #[tokio::test]
    async fn job_state_shows_each_live_job_once_in_its_state_and_ended_jobs_leave() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path().join("s.redb")).unwrap());
        let jobs = crate::jobs::SharedJobs::new(JobTable::load(store.as_ref()).await.unwrap());
        let writer = crate::jobs::JobStore::new(store);
        let turn = writer.writing().await;
        let spec = |name: &str| {
            JobSpec::from_manifest(&format!(
                "name: {name}\nshards: {{min: 1, max: 1}}\ngpus_per_shard: 1\ncommand: [x]\n"
            ))
            .unwrap()
        };
        let a = writer.create(&turn, &jobs, spec("a"), 0, "test").await.unwrap();
        let b = writer.create(&turn, &jobs, spec("b"), 0, "test").await.unwrap();
        let metrics = Metrics::new().unwrap();
        let registry = NodeRegistry::default();
        let observe =
            |jobs: &JobTable| metrics.observe(jobs, &registry, Instant::now(), std::time::Duration::from_secs(10));
        observe(&*jobs.lock().await);
        let pending = |job: &str| (job.to_string(), "pending".to_string());
        assert_eq!(shown(&metrics), vec![pending("a"), pending("b")]);

        writer.update(&turn, &jobs, JobRecord { state: JobState::Running, ..a }).await.unwrap();
        writer.update(&turn, &jobs, JobRecord { state: JobState::Cancelled, ..b }).await.unwrap();
        observe(&*jobs.lock().await);
        assert_eq!(shown(&metrics), vec![("a".to_string(), "running".to_string())], "a moved; b ended");
        observe(&*jobs.lock().await);
        assert_eq!(shown(&metrics).len(), 1, "a pass with no change changes nothing");
    }

    #[test]
    fn job_power_gauges_follow_the_allocation_and_jobs_it_no_longer_holds_leave() {
        let metrics = Metrics::new().unwrap();
        let job = |name: &str, cap_watts: f64| watt_proto::v1::JobPower {
            name: name.into(),
            cap_watts,
            shards: 2,
            ..Default::default()
        };
        let caps = |metrics: &Metrics| {
            let mut caps: Vec<(String, f64)> = prometheus::core::Collector::collect(&metrics.job_cap)[0]
                .get_metric()
                .iter()
                .map(|m| (m.get_label()[0].value().to_string(), m.get_gauge().get_value()))
                .collect();
            caps.sort_by(|a, b| a.0.cmp(&b.0));
            caps
        };
        let status = |jobs| watt_proto::v1::PowerStatus { jobs, ..Default::default() };
        metrics.observe_power(&status(vec![job("a", 500.0), job("b", 600.0)]));
        assert_eq!(caps(&metrics), vec![("a".into(), 500.0), ("b".into(), 600.0)]);
        metrics.observe_power(&status(vec![job("b", 450.0)]));
        assert_eq!(caps(&metrics), vec![("b".into(), 450.0)], "b's cap moved; a left");
        let shards = prometheus::core::Collector::collect(&metrics.job_shards)[0].get_metric().len();
        assert_eq!(shards, 1, "job_shards follows the same jobs");
    }
}
