//! The controller's shell and its reconcile loop: the thin part around [`crate::decide`].
//!
//! One pass: gather a [`View`] of the cluster under the locks; [`decide`] (pure: every job
//! decision and its typed reason); store the decisions (store first, compare-and-swap, in order)
//! and announce them; move caps toward the admission's allocation ([`crate::power_control`]);
//! then send each agent the difference between what it should run and what it said it runs.
//! Passes run on every event that can change a decision (a submit, a
//! cancel, a registration, a shard status, a power change, the last acknowledgement owed), but
//! never back to back: after a pass the loop rests as long as it took, and the events meanwhile
//! make one pass. The periodic tick runs one only when time itself changes a decision, and at
//! least every 30 ticks.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, Mutex, Notify};
use tokio::time::Instant;
use watt_common::auth::Role;
use watt_proto::v1 as pb;

use crate::auth::Principal;
use crate::decide::{decide, JobChange, JobEvent, NodeView, Now, Reason, ShardReport, View};
use crate::jobs::{JobRecord, JobState, JobStore, JobTable, StopThen, Stopping};
use crate::metrics::Metrics;
use crate::power::acks::AckTracker;
use crate::power::admission::PowerView;
use crate::power::planner::GpuWork;
use crate::power::table::PowerTable;
use crate::power_control::PowerState;
use crate::registry::{NodeState, Registry, ShardKey};
use crate::regrow::RegrowTimes;
use crate::spec::{FieldError, JobSpec};
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// A node not heard from for this long is lost and its jobs are rescheduled.
    pub node_lease: Duration,
    pub reconcile_interval: Duration,
    pub telemetry_interval: Duration,
    /// An elastic job is resized at most once this often (see [`crate::regrow`]).
    pub regrow_after: Duration,
    /// How long after a power event measured draw may stay above the limit (see
    /// [`crate::power::meter`]).
    pub settle_time: Duration,
    /// How long ended jobs are kept, and how many (see [`crate::retention`]).
    pub retention: crate::retention::Retention,
    /// How many jobs a principal, and everyone, may have stored.
    pub limits: crate::retention::JobLimits,
    /// Which speed curves power is shared by (see [`crate::speed_curves`]).
    pub speed_curves: crate::speed_curves::CurvePolicy,
    /// The band share of power variation the swing alert fires above (see [`crate::swings`]).
    pub swing_alert_share: f64,
}

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("no job named {0:?}")]
    NotFound(String),
    /// The caller's role allows the call, but not on this object (someone else's job).
    #[error("{0}")]
    Forbidden(String),
    /// A limit on what may be stored is reached.
    #[error("{0}")]
    Exhausted(String),
    /// The job is not in a state the call needs (no such shard, no log yet).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug)]
pub struct Controller {
    /// Each run's rendezvous secret, for its shard orders.
    run_tokens: crate::run_tokens::RunTokens,
    /// Permissions to read shards' logs from agents, and each node's key to check them.
    pub(crate) log_grants: crate::log_grants::LogGrants,
    pub(crate) store: Arc<dyn Store>,
    /// Every job, in memory; never locked across a store write ([`JobStore`] writes).
    pub(crate) jobs: Mutex<JobTable>,
    pub(crate) job_store: JobStore,
    pub(crate) registry: Registry,
    pub(crate) events: broadcast::Sender<pb::Event>,
    pub(crate) metrics: Metrics,
    pub(crate) settings: Settings,
    /// The most recent events, for `ListEvents`.
    history: std::sync::Mutex<std::collections::VecDeque<pb::Event>>,
    /// Sources, site, and the bookkeeping of cap orders. Locked after `jobs`.
    pub(crate) power: Mutex<PowerState>,
    /// The latest power status, for `GetPowerStatus` and `WatchPower`.
    pub(crate) power_status: tokio::sync::watch::Sender<pb::PowerStatus>,
    wake: Notify,
    /// Acknowledgements owed since the last pass: see [`crate::power::acks`].
    pub(crate) acks: AckTracker,
    /// Workers' progress by job.
    pub(crate) progress: crate::progress::ProgressBook,
    /// Each job's speed curve, learned from that progress.
    pub(crate) speed_curves: crate::speed_curves::SpeedCurves,
    /// When growth may next be tried: see [`crate::regrow`].
    regrow: std::sync::Mutex<RegrowTimes>,
    /// The nodes' part of the view, kept between passes (only the pass uses it).
    kept_view: std::sync::Mutex<KeptView>,
    /// Every node's power at each sampling round, and the swings last found in it: see
    /// [`crate::swings`].
    pub(crate) swings: crate::swings::Swings,
    pub(crate) last_swings: std::sync::Mutex<crate::swings::SwingReport>,
    /// How this term's VEN stands with its VTN (see [`crate::openadr::ven`]); `None`: no VTN.
    pub(crate) grid_link: std::sync::Mutex<Option<pb::GridLink>>,
    /// Counted power over the last minute, for the site's ramp limit: see
    /// [`crate::power::ramp`]. Locked after `power`; the meter takes it alone.
    pub(crate) ramp: std::sync::Mutex<crate::power::ramp::CountedHistory>,
    /// A start waits on the site's ramp limit: time alone frees it.
    ramp_starts_held: std::sync::atomic::AtomicBool,
    /// A cancelled job's caps come down along the site's ramp-down: time alone moves them.
    ramp_downs_running: std::sync::atomic::AtomicBool,
    /// Measured draw against the limit: see [`crate::power::meter`].
    pub(crate) meter: std::sync::Mutex<crate::power::meter::Meter>,
    /// The clock every deadline is on (see [`crate::clock`]).
    pub(crate) clock: crate::clock::Clock,
    /// The term this controller leads in: every order carries it (invariant 9).
    pub(crate) term: u64,
    /// Power state applied from memory, on its way to the store (invariant 10).
    pub(crate) power_writer: crate::power_writer::PowerWriter,
    /// This controller lost touch with the store and cares for its term: passes lower caps
    /// and do nothing else (invariant 11). Read at every order sent.
    caretaking: std::sync::atomic::AtomicBool,
}

/// What storing a pass's changes did.
struct Applied {
    /// Every change was stored.
    all: bool,
    /// A stored change moved GPUs: a placement, an end or a resize.
    moved_gpus: bool,
}

/// How many recent events `ListEvents` can return.
pub const EVENT_HISTORY: usize = 1_000;

pub fn unix_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Controller {
    /// Load every job from `store`, to lead in `term`.
    pub async fn new(
        store: Arc<dyn Store>,
        settings: Settings,
        metrics: Metrics,
        term: u64,
    ) -> Result<Arc<Self>, StoreError> {
        Controller::load(store.as_ref(), store.clone(), settings, metrics, term).await
    }

    /// Load every job, source and cap ceiling from `from` (the store, or a follower's warm copy
    /// of it: see [`crate::store::replica`]), to lead in `term` writing to `store`; the shared
    /// keys and the epoch mark (a key each, made when absent) from `store` itself.
    pub async fn load(
        from: &dyn Store,
        store: Arc<dyn Store>,
        settings: Settings,
        metrics: Metrics,
        term: u64,
    ) -> Result<Arc<Self>, StoreError> {
        let jobs = JobTable::load(from).await?;
        let power = PowerTable::load(from).await?;
        metrics.swing_alert.set(settings.swing_alert_share);
        let power_state = PowerState::load(power, store.as_ref()).await?;
        let run_tokens = crate::run_tokens::RunTokens::load(store.as_ref()).await?;
        let log_grants = crate::log_grants::LogGrants::load(store.as_ref()).await?;
        let registry = Registry::default();
        // Telemetry that arrives before the first pass is judged against the stored site's idle
        // allowance, not 0.
        registry.set_idle_allowance(power_state.table.site().idle_gpu_watts);
        // Every node a placement stands on is known from the start (see `Registry::expect`).
        registry.expect(
            jobs.iter().filter(|j| j.state.is_active()).flat_map(|j| j.shards.iter().map(|s| s.node.clone())),
            Instant::now(),
            unix_ms(),
        );
        // Every node the store records a cap ceiling for counts at it until it registers with
        // this controller or its failsafe deadline passes: a leader that died may have raised it.
        let mut ceilings = Vec::new();
        for entry in from.list(crate::power::ceilings::CEILINGS_PREFIX).await? {
            ceilings.push(crate::power::ceilings::CeilingRecord::decode(&entry.key, &entry.value)?);
        }
        let clock = crate::clock::Clock::new(Instant::now());
        registry.expect_ceilings(ceilings, Instant::now(), clock.now_ms(), unix_ms());
        tracing::info!(
            jobs = jobs.len(),
            sources = power_state.table.sources().count(),
            "Loaded jobs and power sources from the store."
        );
        let (power_status, _) = tokio::sync::watch::channel(pb::PowerStatus::default());
        let (events, _) = broadcast::channel(4096);
        Ok(Arc::new(Controller {
            run_tokens,
            log_grants,
            job_store: JobStore::new(store.clone()),
            store,
            jobs: Mutex::new(jobs),
            registry,
            events,
            metrics,
            settings,
            history: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(EVENT_HISTORY)),
            power: Mutex::new(power_state),
            power_status,
            wake: Notify::new(),
            acks: AckTracker::default(),
            progress: crate::progress::ProgressBook::default(),
            speed_curves: crate::speed_curves::SpeedCurves::default(),
            regrow: std::sync::Mutex::new(RegrowTimes::default()),
            kept_view: std::sync::Mutex::new(KeptView::default()),
            meter: std::sync::Mutex::new(crate::power::meter::Meter::new(settings.settle_time)),
            ramp: std::sync::Mutex::new(crate::power::ramp::CountedHistory::default()),
            swings: crate::swings::Swings::default(),
            last_swings: std::sync::Mutex::new(crate::swings::SwingReport::default()),
            grid_link: std::sync::Mutex::new(None),
            ramp_starts_held: std::sync::atomic::AtomicBool::new(false),
            ramp_downs_running: std::sync::atomic::AtomicBool::new(false),
            clock,
            term,
            power_writer: crate::power_writer::PowerWriter::default(),
            caretaking: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Whether this controller only cares for its term (invariant 11): no order but a cap
    /// decrease, no change but one that lowers the budget.
    pub fn caretaking(&self) -> bool {
        self.caretaking.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Send no order but decreases from now on, telling no one: the term is ending.
    pub fn stop_ordering(&self) {
        self.caretaking.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Start or stop caretaking, and tell every agent in session (they refuse anything but a
    /// decrease from a caretaker, and look for a leader elsewhere meanwhile).
    pub fn set_caretaking(&self, caretaking: bool) {
        self.caretaking.store(caretaking, std::sync::atomic::Ordering::Release);
        let message = pb::ControllerMessage {
            body: Some(pb::controller_message::Body::Caretaking(pb::Caretaking { term: self.term, caretaking })),
        };
        for entry in self.registry.lock().values() {
            if let Some(session) = &entry.session {
                // A full queue: the agent hears it from the next order's refusal instead.
                let _ = session.tx.try_send(Ok(message.clone()));
            }
        }
        if !caretaking {
            self.wake();
        }
    }

    /// Ask for a reconcile pass soon.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn emit(&self, kind: &str, name: &str, reason: &str, message: String) {
        self.emit_by(kind, name, reason, message, None);
    }

    /// An event for a change `by` asked for (the audit trail), or the controller's own (`None`).
    pub fn emit_by(&self, kind: &str, name: &str, reason: &str, message: String, by: Option<&Principal>) {
        let by = by.map(ToString::to_string).unwrap_or_default();
        tracing::info!(kind, name, reason, by, "{message}");
        let event =
            pb::Event { unix_ms: unix_ms(), kind: kind.into(), name: name.into(), reason: reason.into(), message, by };
        {
            let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
            if history.len() == EVENT_HISTORY {
                history.pop_front();
            }
            history.push_back(event.clone());
        }
        let _ = self.events.send(event);
    }

    /// The latest power status with the measured draw as of now (telemetry moves between passes).
    pub fn power_status_now(&self) -> pb::PowerStatus {
        let mut status = self.power_status.borrow().clone();
        let nodes = self.registry.lock();
        status.drawn_watts = nodes.values().map(crate::registry::NodeEntry::drawn_gpu_watts).sum();
        status.change_unstored = self.power_writer.behind();
        status.caretaker_term = if self.caretaking() { self.term } else { 0 };
        status.grid_link = self.grid_link.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        status
    }

    /// Recent events, oldest first.
    pub fn recent_events(&self) -> Vec<pb::Event> {
        self.history.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    pub async fn submit(&self, spec: JobSpec, by: &Principal) -> Result<pb::Job, RequestError> {
        let largest = self.registry.largest_node_gpus();
        if largest > 0 && spec.gpus_per_shard as usize > largest {
            return Err(FieldError::new(
                "gpus_per_shard",
                format!(
                    "is {} but the largest node has {largest} GPUs; a shard's GPUs must sit on one node",
                    spec.gpus_per_shard
                ),
            )
            .into());
        }
        // One job write at a time: the limits and the name checked here still hold when it is
        // stored. The table is locked only to look.
        let turn = self.job_store.writing().await;
        {
            let jobs = self.jobs.lock().await;
            let limits = self.settings.limits;
            if jobs.len() >= limits.total {
                return Err(RequestError::Exhausted(format!(
                    "the controller holds {} jobs, its limit (--max-jobs); ended jobs are removed after --keep-ended",
                    jobs.len()
                )));
            }
            let live = jobs.iter().filter(|j| !j.state.is_terminal() && j.submitted_by == by.name).count();
            if live >= limits.per_principal {
                return Err(RequestError::Exhausted(format!(
                    "{by} has {live} jobs not ended, its limit (--max-jobs-per-principal)"
                )));
            }
            if let Some(existing) = jobs.get(&spec.name) {
                return Err(FieldError::new(
                    "name",
                    format!("{:?} is taken by an existing job ({})", spec.name, existing.state.as_str()),
                )
                .into());
            }
        }
        let record = match self.job_store.create(&turn, &self.jobs, spec, unix_ms(), &by.name).await {
            Ok(record) => record,
            Err(StoreError::Conflict { key }) if key.starts_with(crate::jobs::JOBS_PREFIX) => {
                return Err(FieldError::new("name", "is taken by an existing job").into());
            }
            Err(e) => return Err(e.into()),
        };
        drop(turn);
        self.emit_by(
            "job",
            &record.spec.name,
            "submitted",
            format!("priority {}, sequence {}", record.spec.priority, record.sequence),
            Some(by),
        );
        self.wake();
        Ok(self.job_proto(&record))
    }

    /// Cancel a job: its submitter's or, with the admin role, anyone's.
    pub async fn cancel(&self, name: &str, by: &Principal) -> Result<pb::Job, RequestError> {
        let turn = self.job_store.writing().await;
        let jobs = self.jobs.lock().await;
        let mut record = jobs.get(name).cloned().ok_or_else(|| RequestError::NotFound(name.into()))?;
        if by.role != Role::Admin && record.submitted_by != by.name {
            let owner = if record.submitted_by.is_empty() { "before principals existed" } else { "by another" };
            return Err(RequestError::Forbidden(format!(
                "{by} may cancel only its own jobs; job {name} was submitted {owner}{}",
                if record.submitted_by.is_empty() { String::new() } else { format!(" ({})", record.submitted_by) }
            )));
        }
        // Making room already: the same ramp goes on, and ends cancelled.
        if let Some(stopping) = record.stopping.as_mut().filter(|s| s.then == StopThen::MakeRoom) {
            stopping.then = StopThen::Cancel;
            let seconds = (stopping.until_unix_ms - unix_ms()).max(0) as f64 / 1_000.0;
            return self.cancel_along_the_ramp(turn, jobs, record, seconds, by).await;
        }
        if record.state.is_active() && record.stopping.is_none() {
            if let Some(stopping) = self.ramp_down_for(&record, &jobs).await {
                let seconds = (stopping.until_unix_ms - unix_ms()).max(0) as f64 / 1_000.0;
                record.stopping = Some(stopping);
                return self.cancel_along_the_ramp(turn, jobs, record, seconds, by).await;
            }
        }
        if !record.state.is_terminal() {
            {
                let reported = self.registry.lock();
                let job = record.spec.name.clone();
                record.unplace(None, unix_ms(), &|node, shard| {
                    reported.get(node).and_then(|n| n.shard_statuses.get(&(job.clone(), shard))).cloned()
                });
            }
            record.message = Reason::Cancelled.to_string();
            {
                let mut nodes = self.registry.lock();
                for shard in jobs.get(name).map(|j| j.shards.as_slice()).unwrap_or_default() {
                    nodes.orders_due(&shard.node);
                }
            }
            record.state = JobState::Cancelled;
            record.stopping = None;
            drop(jobs);
            self.job_store.update(&turn, &self.jobs, record.clone()).await?;
            self.emit_by("job", name, "cancelled", "cancelled by request".into(), Some(by));
            self.wake();
        }
        Ok(self.job_proto(&record))
    }

    /// Store a cancel whose caps come down along the site's ramp-down, ending in `seconds`.
    async fn cancel_along_the_ramp(
        &self,
        turn: crate::jobs::Writing<'_>,
        jobs: tokio::sync::MutexGuard<'_, JobTable>,
        mut record: JobRecord,
        seconds: f64,
        by: &Principal,
    ) -> Result<pb::Job, RequestError> {
        let name = record.spec.name.clone();
        record.message = format!(
            "cancelling: its caps come down along the site's ramp-down over {seconds:.1} s, then its shards stop"
        );
        drop(jobs);
        self.job_store.update(&turn, &self.jobs, record.clone()).await?;
        self.emit_by("job", &name, "cancelling", record.message.clone(), Some(by));
        self.ramp_downs_running.store(true, std::sync::atomic::Ordering::Relaxed);
        self.wake();
        Ok(self.job_proto(&record))
    }

    /// How a cancel of `record` ramps its caps down, when the site sets a ramp-down and the job
    /// runs above its GPUs' minimum: from its cap now to the highest minimum of its GPUs, at the
    /// site's rate for all its GPUs together, after the ramp-downs under way among `jobs`.
    async fn ramp_down_for(&self, record: &JobRecord, jobs: &JobTable) -> Option<Stopping> {
        let ramp = self.power.lock().await.table.site().ramp_down_watts_per_second?;
        let from = self.power_status.borrow().jobs.iter().find(|j| j.name == record.spec.name && !j.paused)?.cap_watts;
        let floor = {
            let nodes = self.registry.lock();
            record
                .shards
                .iter()
                .flat_map(|s| {
                    let e = nodes.get(&s.node);
                    s.gpus.iter().filter_map(move |i| e?.power.gpus.iter().find(|g| g.index == *i).map(|g| g.min_watts))
                })
                .fold(0.0f64, f64::max)
        };
        let gpus = record.shards.iter().map(|s| s.gpus.len()).sum::<usize>();
        let start = crate::jobs::ramp_downs_end(jobs.iter(), unix_ms());
        Stopping::along(ramp, gpus, from, floor, start, StopThen::Cancel)
    }

    /// Remove the ended jobs retention no longer keeps (see [`crate::retention`]).
    pub async fn remove_expired_jobs(&self) {
        if self.caretaking() {
            return;
        }
        let turn = self.job_store.writing().await;
        let expired = {
            let jobs = self.jobs.lock().await;
            crate::retention::expired(jobs.iter(), unix_ms(), self.settings.retention)
        };
        if expired.is_empty() {
            return;
        }
        match self.job_store.remove_ended(&turn, &self.jobs, &expired).await {
            Ok(removed) => {
                tracing::info!(removed, "Removed ended jobs past their retention.");
                self.emit(
                    "controller",
                    "retention",
                    "jobs-removed",
                    format!("{removed} ended job(s) past their retention removed"),
                );
            }
            Err(e) => tracing::warn!(error = %e, "Cannot remove ended jobs; trying again in a minute."),
        }
    }

    pub async fn job(&self, name: &str) -> Result<pb::Job, RequestError> {
        let jobs = self.jobs.lock().await;
        jobs.get(name).map(|r| self.job_proto(r)).ok_or_else(|| RequestError::NotFound(name.into()))
    }

    pub async fn list_jobs(&self) -> Vec<pb::Job> {
        let jobs = self.jobs.lock().await;
        let mut out: Vec<pb::Job> = jobs.iter().map(|r| self.job_proto(r)).collect();
        out.sort_by_key(|j| j.sequence);
        out
    }

    pub async fn list_nodes(&self) -> Vec<pb::Node> {
        let allocated = {
            let jobs = self.jobs.lock().await;
            let mut allocated: HashMap<String, Vec<u32>> = HashMap::new();
            for job in jobs.iter().filter(|j| j.state.is_active()) {
                for shard in &job.shards {
                    allocated.entry(shard.node.clone()).or_default().extend(&shard.gpus);
                }
            }
            allocated
        };
        let tree = self.power.lock().await.table.tree().clone();
        let now = Instant::now();
        let now_ms = self.clock.ms(now);
        let site = self.power_status.borrow().site.unwrap_or_default();
        let idle = self.registry.idle_allowance();
        let nodes = self.registry.lock();
        let mut out: Vec<pb::Node> = nodes
            .values()
            .map(|e| {
                let mut gpus = allocated.get(&e.name).cloned().unwrap_or_default();
                gpus.sort_unstable();
                let failsafe = e.power.failsafed(now_ms);
                let accounting = e
                    .power
                    .gpus
                    .iter()
                    .map(|g| {
                        let cap = if failsafe { g.failsafe_watts } else { g.upper() };
                        pb::GpuAccount {
                            index: g.index,
                            work: match g.work {
                                GpuWork::Idle => pb::GpuWork::Idle,
                                GpuWork::Watt => pb::GpuWork::Watt,
                                GpuWork::Foreign => pb::GpuWork::Foreign,
                            } as i32,
                            counted_watts: g.counted_under(cap, idle),
                            cap_watts: cap,
                        }
                    })
                    .collect();
                pb::Node {
                    name: e.name.clone(),
                    state: match e.state(now, self.settings.node_lease) {
                        NodeState::Ready => pb::NodeState::Ready,
                        NodeState::Disconnected => pb::NodeState::Disconnected,
                        NodeState::Lost => pb::NodeState::Lost,
                    } as i32,
                    gpus: e.gpus.clone(),
                    allocated_gpus: gpus,
                    last_seen_unix_ms: e.last_seen_unix_ms,
                    agent_version: e.agent_version.clone(),
                    telemetry: e.telemetry.clone(),
                    http_address: match (e.address, e.http_port) {
                        (Some(ip), port) if port > 0 => std::net::SocketAddr::new(ip, port).to_string(),
                        _ => String::new(),
                    },
                    enforce_mode: e.enforce_mode as i32,
                    non_gpu_power_watts: e.non_gpu_watts_or(site.node_overhead_watts),
                    accounting,
                    logs_url: e.logs_url().unwrap_or_default(),
                    labels: e.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    domains: tree.path(&e.labels).iter().map(|&i| tree.domains[i as usize].name.clone()).collect(),
                    runtimes: e.runtimes.clone(),
                    shard_exec: e.shard_exec as i32,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The job with each shard's last reported state at the job's current epoch.
    fn job_proto(&self, record: &JobRecord) -> pb::Job {
        let progress = self.progress.job(&record.spec.name);
        let nodes = self.registry.lock();
        let mut job = record.to_proto(|i| reported_state(&nodes, record, i).unwrap_or(pb::ShardState::Unspecified));
        for (placement, shard) in job.shards.iter_mut().zip(&record.shards) {
            let status =
                nodes.get(&shard.node).and_then(|e| e.shard_statuses.get(&(record.spec.name.clone(), placement.shard)));
            if let Some(status) = status.filter(|s| s.epoch == record.epoch) {
                placement.message.clone_from(&status.message);
            }
        }
        job.progress = progress;
        let in_use = self.settings.speed_curves == crate::speed_curves::CurvePolicy::Learned;
        job.speed_curve = self.speed_curves.describe(&record.spec.name, in_use);
        job
    }

    /// Reconcile until `shutdown` resolves.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(self.settings.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Every event that can change a decision wakes the loop. The periodic tick runs a pass
        // only when time itself changes something: a lease or a failsafe deadline runs out, a
        // source ramps, an order is due to be resent. At 25,000 nodes an idle pass is not free.
        let mut since_full = 0u32;
        let mut last_pass_ms = unix_ms();
        loop {
            // The grid's next window start or end: a pass at that moment, not at the next tick
            // (an event's start is a cut, carried out within a second of it).
            let grid_change = self.power.lock().await.table.grid().next_change_after(last_pass_ms);
            let until_grid = grid_change.map(|at| Duration::from_millis((at - unix_ms()).max(0) as u64));
            let woken = tokio::select! {
                _ = tick.tick() => false,
                () = self.wake.notified() => true,
                () = sleep_or_never(until_grid) => {
                    // Timed from the window's start, not from when the loop got to it.
                    let late = Duration::from_millis((unix_ms() - grid_change.unwrap_or(0)).max(0) as u64);
                    self.acks.power_event_at(Instant::now().checked_sub(late).unwrap_or_else(Instant::now));
                    true
                }
                () = &mut shutdown => return,
            };
            since_full += 1;
            // A full pass at least every 30 ticks regardless, as a backstop.
            // A pass that time calls for looks at everything; one an event woke, at what changed.
            let full = since_full >= 30 || (!woken && self.time_changes_something(last_pass_ms).await);
            if woken || full {
                last_pass_ms = unix_ms();
                since_full = 0;
                let started = Instant::now();
                self.reconcile(full).await;
                // Passes never run back to back: after one, the loop rests as long as it took, and
                // events meanwhile are taken together by the next. A pass holds the registry for
                // most of its time, and every session message needs it: in a registration storm
                // at 100,000 nodes, back-to-back passes would leave the sessions little of it.
                // A power call does not wait on this: it runs its own pass.
                let rest = tokio::time::sleep(started.elapsed());
                tokio::select! {
                    () = rest => {}
                    () = &mut shutdown => return,
                }
            }
        }
    }

    /// Whether a pass now could decide something the last one did not, with no event since.
    async fn time_changes_something(&self, last_pass_unix_ms: i64) -> bool {
        let now = Instant::now();
        let now_ms = self.clock.ms(now);
        // Resizes and ramps are stored with wall times: they mean the same after a restart.
        let wall_ms = unix_ms();
        let regrow_due = self.regrow.lock().unwrap_or_else(std::sync::PoisonError::into_inner).due_unix_ms;
        if regrow_due != 0 && wall_ms >= regrow_due {
            return true; // A job's resize cool-down ran out.
        }
        if self.settings.speed_curves == crate::speed_curves::CurvePolicy::Learned
            && self.speed_curves.probe_due(wall_ms)
        {
            return true; // A probe of a job's curve starts or ends.
        }
        {
            let power = self.power.lock().await;
            // Ramping now, or at the last pass (which then showed a step short of the top).
            let ramping = |s: &crate::power::Source| s.effective_watts(last_pass_unix_ms) < s.available_watts;
            if power.table.sources().any(ramping) {
                return true;
            }
            if power.table.grid_moves(last_pass_unix_ms, wall_ms) {
                return true; // A grid window starts, ends or lifts.
            }
            if power.ramp_holding
                || self.ramp_starts_held.load(std::sync::atomic::Ordering::Relaxed)
                || self.ramp_downs_running.load(std::sync::atomic::Ordering::Relaxed)
            {
                return true; // Increases or a start wait on the site's ramp, or caps ramp down.
            }
        }
        let lease = self.settings.node_lease;
        let nodes = self.registry.lock();
        let due = nodes.values().any(|e| {
            let lease_ran_out = !e.lost && e.state(now, lease) == NodeState::Lost;
            let failsafe_passed =
                !e.power.reachable && e.power.failsafed(now_ms) && e.power.gpus.iter().any(|g| g.in_flight.is_some());
            let resend_due = e.power.reachable
                && e.power
                    .gpus
                    .iter()
                    .any(|g| g.in_flight.is_some_and(|f| now_ms - f.sent_ms >= crate::power::planner::RESEND_AFTER_MS));
            lease_ran_out || failsafe_passed || resend_due
        });
        due
    }

    /// The snapshot [`decide`] reads, gathered under the registry lock (released before
    /// deciding): the jobs not ended, and, from `kept` brought up to date, every node with its
    /// lease, what each active shard's node reported of it, and the budget's inputs. `full`:
    /// read every job's reports again, not only those that changed.
    fn view<'a>(
        &self,
        jobs: &'a JobTable,
        table: &PowerTable,
        kept: &'a mut KeptView,
        now: Now,
        full: bool,
    ) -> View<'a> {
        let site = table.site();
        // No source configured: power is not managed, and nothing limits the budget.
        let available =
            if table.sources().next().is_none() { f64::INFINITY } else { table.available_watts(now.wall_ms) };
        let live: Vec<&JobRecord> = jobs.iter().filter(|j| !j.state.is_terminal()).collect();
        // Telemetry judges idle draw by the allowance it reads under the registry lock: set
        // before the view reads the nodes, so no reading is judged by a stale one after it.
        self.registry.set_idle_allowance(site.idle_gpu_watts);
        let mut nodes = self.registry.lock();
        let rebuilt = kept.bring_up_to_date(&mut nodes, available, site, table.tree(), &self.clock);
        kept.power.now_unix_ms = now.wall_ms;
        kept.power.domain_limits = table.domain_limits(now.wall_ms);
        // The site's ramp limit: what starts may add at once.
        kept.power.ramp = match site.ramp_up_watts_per_second {
            None => crate::power::admission::RampRoom::default(),
            Some(ramp) => {
                let history = self.ramp.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let counted = history.latest().unwrap_or(0.0);
                crate::power::admission::RampRoom {
                    now_watts: (history.ceiling(now.mono_ms, ramp) - counted).max(0.0),
                    per_second_watts: ramp,
                }
            }
        };
        // Each job's curve, where power is shared by them and one moved or a probe started or
        // ended (rebuilt views start with none).
        if self.settings.speed_curves == crate::speed_curves::CurvePolicy::Learned {
            self.speed_curves.tick(now.wall_ms);
            let generation = self.speed_curves.generation();
            if rebuilt || kept.curves_generation != Some(generation) {
                kept.power.curves = self.speed_curves.curves();
                kept.curves_generation = Some(generation);
            }
        }
        let changed = nodes.take_reports_changed();
        kept.late_ends =
            changed.iter().filter(|n| jobs.get(n).is_some_and(JobRecord::awaits_late_end)).cloned().collect();
        kept.read_reports(&nodes, &live, (!full && !rebuilt).then_some(&changed));
        drop(nodes);
        View {
            jobs: live,
            nodes: &kept.nodes,
            reports: &kept.reports,
            placed_at: &kept.placed_at,
            power: &kept.power,
            lease_ms: self.settings.node_lease.as_millis() as i64,
            regrow_after_ms: self.settings.regrow_after.as_millis() as i64,
            regrow: *self.regrow.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        }
    }

    /// One pass: gather the view, [`decide`], store the decisions, then send. Errors are logged
    /// and retried on the next pass: nothing half-applied is lost, because every decision is
    /// stored before it is sent.
    pub async fn reconcile_once(&self) {
        self.reconcile(true).await;
    }

    /// A pass for a change its caller waits on (a power call answers with the status after it).
    /// Like a pass an event wakes, it looks at what changed: a cut's pass at 50,000 nodes does
    /// not also walk every node's shard orders.
    pub async fn reconcile_after_change(&self) {
        self.reconcile(false).await;
    }

    /// One pass; `full`: look at every node's shard orders, not only those that may have changed.
    ///
    /// Three steps, so that no power decision waits on the store (ARCHITECTURE.md, invariant
    /// 10): decide, and move caps for the jobs as they stand, under the locks and with no store
    /// I/O — a cut's decreases go out here; store the decisions, holding only the job writer's
    /// turn; then caps again for the placements just stored (their increases), and shard orders.
    async fn reconcile(&self, full: bool) {
        let started = Instant::now();
        let mut phase = Phases::new(&self.metrics);
        let now = Now { mono_ms: self.clock.ms(Instant::now()), wall_ms: unix_ms() };
        let (settle, place, admission, due, mut read, late_ends) = {
            let jobs = self.jobs.lock().await;
            let mut power = self.power.lock().await;
            let (decisions, late_ends) = {
                let mut kept = self.kept_view.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let view = self.view(&jobs, &power.table, &mut kept, now, full);
                phase.done("view");
                let decided_at = Instant::now();
                let decisions = decide(&view, now);
                self.metrics.scheduling_duration.observe(decided_at.elapsed().as_secs_f64());
                (decisions, std::mem::take(&mut kept.late_ends))
            };
            phase.done("decide");
            self.speed_curves.set_power_short(decisions.admission.allocation.as_ref().is_some_and(|a| a.short));
            *self.regrow.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = decisions.regrow;

            // Nodes whose lease ran out: no session from now on, until they register again.
            if !decisions.newly_lost.is_empty() {
                self.registry.mark_lost(&decisions.newly_lost);
                let lease = humantime::format_duration(self.settings.node_lease);
                for node in &decisions.newly_lost {
                    self.emit("node", node, "lost", format!("not heard from for {lease}"));
                }
            }
            // The nodes whose orders this pass may change: where changed jobs ran and will run.
            let mut due = self.registry.lock().take_orders_due();
            for change in decisions.settle.iter().chain(&decisions.place) {
                let before = jobs.get(&change.record.spec.name).map(|j| j.shards.as_slice()).unwrap_or_default();
                for shard in before.iter().chain(&change.record.shards) {
                    if !due.contains(&shard.node) {
                        due.insert(shard.node.clone());
                    }
                }
            }
            // The versions these decisions were made on: their writes expect them.
            let read: crate::NameMap<String, crate::store::Version> = decisions
                .settle
                .iter()
                .chain(&decisions.place)
                .filter_map(|c| jobs.version(&c.record.spec.name).map(|v| (c.record.spec.name.clone(), v)))
                .collect();

            // Caps toward the allocation, for the placements as stored: at most one order per
            // node, each with an epoch already reserved (the power writer keeps half a block
            // ahead, so a store that stops answering leaves ~500,000 orders before any waits).
            let wanted = self.registry.lock().len() as u64 + crate::power::epochs::BLOCK / 2;
            if power.epochs.available() < wanted {
                self.power_writer.nudge();
            }
            // The decided records, the later of each job's: caps leave the GPUs they give up now.
            let deciding: crate::NameMap<&str, &JobRecord> = decisions
                .settle
                .iter()
                .chain(&decisions.place)
                .map(|c| (c.record.spec.name.as_str(), &c.record))
                .collect();
            let placements_moving = deciding
                .values()
                .any(|d| jobs.get(&d.spec.name).is_none_or(|j| j.state != d.state || j.shards != d.shards));
            self.enforce(&mut power, &jobs, Some(&deciding), decisions.admission.clone(), placements_moving, full);
            phase.done("caps");
            (decisions.settle, decisions.place, decisions.admission, due, read, late_ends)
        };
        if self.caretaking() {
            // A caretaker stores nothing and orders no shard: its pass ends with the decreases.
            self.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
            return;
        }

        // Store the decisions, `place` only once `settle` is (it was decided on top of it).
        let mut placements_stored = false;
        if !settle.is_empty() || !place.is_empty() {
            let turn = self.job_store.writing().await;
            let settled = self.apply(&turn, &mut read, settle).await;
            placements_stored |= settled.moved_gpus;
            if settled.all {
                placements_stored |= self.apply(&turn, &mut read, place).await.moved_gpus;
            }
        }
        if !late_ends.is_empty() {
            self.record_late_ends(&late_ends).await;
        }
        phase.done("store");

        let jobs = self.jobs.lock().await;
        // Time alone frees a start the site's ramp limit holds: the tick runs passes for it.
        let held = jobs.iter().any(|j| j.hold == Some(crate::jobs::Hold::RampWaiting) && !j.state.is_active());
        self.ramp_starts_held.store(held, std::sync::atomic::Ordering::Relaxed);
        let stopping = jobs.iter().any(|j| j.stopping.is_some() && j.state.is_active());
        self.ramp_downs_running.store(stopping, std::sync::atomic::Ordering::Relaxed);
        if placements_stored {
            // A placement, an end or a resize stored: its caps (increases included) now.
            let mut power = self.power.lock().await;
            self.enforce(&mut power, &jobs, None, admission, true, false);
        }
        // Shard orders to agents.
        self.send_orders(&jobs, (!full).then_some(&due));
        phase.done("orders");
        self.metrics.observe(&jobs, &self.registry, Instant::now(), self.settings.node_lease);
        self.metrics.observe_progress(&jobs, &self.progress, &self.speed_curves);
        drop(jobs);
        phase.done("books");
        self.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    }

    /// Store how shards of runs already off their GPUs ended, as their agents now report it, so
    /// an ended job says "exited 143" rather than the "running" it was recorded with. A write
    /// that fails is logged; the job then keeps the outcome it was recorded with.
    async fn record_late_ends(&self, names: &[String]) {
        let turn = self.job_store.writing().await;
        let records: Vec<JobRecord> = {
            let jobs = self.jobs.lock().await;
            let nodes = self.registry.lock();
            names
                .iter()
                .filter_map(|name| {
                    let mut record = jobs.get(name)?.clone();
                    let mut changed = false;
                    for (node, shard) in record.last_run.iter().map(|o| (o.node.clone(), o.shard)).collect::<Vec<_>>() {
                        let status = nodes.get(&node).and_then(|e| e.shard_statuses.get(&(name.clone(), shard)));
                        changed |= status.is_some_and(|s| record.fold_late_end(&node, s));
                    }
                    changed.then_some(record)
                })
                .collect()
        };
        for record in records {
            let name = record.spec.name.clone();
            if let Err(e) = self.job_store.update(&turn, &self.jobs, record).await {
                tracing::warn!(job = %name, error = %e, "Cannot store how the shards of its last run ended.");
            }
        }
    }

    /// Store `changes` in order (see [`JobStore::update_all`]; `read`: the versions they were
    /// decided on), each with its reason as the job's message, and announce the ones stored.
    /// What could not be stored is logged and decided again on the next pass.
    async fn apply(
        &self,
        turn: &crate::jobs::Writing<'_>,
        read: &mut crate::NameMap<String, crate::store::Version>,
        changes: Vec<JobChange>,
    ) -> Applied {
        if changes.is_empty() {
            return Applied { all: true, moved_gpus: false };
        }
        // A changed waiting reason moves no GPU; a placement, an end or a resize may.
        let moved_gpus = {
            let jobs = self.jobs.lock().await;
            changes.iter().any(|c| {
                jobs.get(&c.record.spec.name).is_none_or(|j| j.state != c.record.state || j.shards != c.record.shards)
            })
        };
        let records = changes
            .iter()
            .map(|c| {
                let mut record = c.record.clone();
                record.message = c.reason.to_string();
                record
            })
            .collect();
        let (stored, error) = self.job_store.update_all(turn, &self.jobs, records, read).await;
        let all = error.is_none();
        if let Some(e) = error {
            tracing::warn!(error = %e, stored, unstored = changes.len() - stored, "Cannot store job changes; will retry.");
        }
        for change in changes.into_iter().take(stored) {
            let Some(event) = change.event else { continue };
            match event {
                JobEvent::Preempted => self.metrics.preemptions.inc(),
                JobEvent::Placed => self.metrics.placements.inc_by(change.record.shards.len() as u64),
                _ => {}
            }
            self.emit("job", &change.record.spec.name, event.as_str(), change.reason.event_text());
        }
        Applied { all, moved_gpus: moved_gpus && stored > 0 }
    }

    /// Send connected agents what they lack: starts for shards they should run, stops for shards
    /// they run that they should not. Cost follows change: only the nodes in `due` (or every node,
    /// with `None`) are looked at, with every job that has a shard on one of them; an order is
    /// built only for a shard that is neither reported running at its epoch nor already sent.
    fn send_orders(&self, jobs: &JobTable, due: Option<&crate::NameSet<String>>) {
        if self.caretaking() {
            return;
        }
        let in_scope = |node: &str| due.is_none_or(|d| d.contains(node));
        let scoped: Vec<&JobRecord> =
            jobs.iter().filter(|j| j.state.is_active() && j.shards.iter().any(|s| in_scope(&s.node))).collect();
        let mut nodes = self.registry.lock();
        let addresses: HashMap<String, String> = scoped
            .iter()
            .filter_map(|j| j.shards.first())
            .filter_map(|s| {
                // A node expected but not registered yet has no address to give.
                let e = nodes.get(&s.node).filter(|e| e.session.is_some() || e.address.is_some())?;
                Some((s.node.clone(), e.address.map(|a| a.to_string()).unwrap_or_else(|| e.name.clone())))
            })
            .collect();
        // Nodes whose queue was full: looked at again next pass.
        let mut retry: Vec<String> = Vec::new();
        // Per node, the (job, shard, epoch) it should run, for the stop pass below: borrowed, and
        // a short list (a node runs a shard or a few), so a full pass allocates no key per shard.
        let mut wanted: crate::NameMap<&str, Vec<(&str, u32, u64)>> = crate::NameMap::default();
        for job in scoped {
            // Rank 0's node not registered (after a controller restart, before it is back): its
            // address is unknown, and ranks told an empty MASTER_ADDR could never meet. Starts
            // wait for it; what runs keeps running.
            let master = addresses.get(&job.shards[0].node);
            let mut key: ShardKey = (job.spec.name.clone(), 0);
            for (i, shard) in job.shards.iter().enumerate() {
                key.1 = i as u32;
                wanted.entry(shard.node.as_str()).or_default().push((job.spec.name.as_str(), key.1, job.epoch));
                let Some(master) = master else { continue };
                let Some(entry) = nodes.get_mut(&shard.node) else { continue };
                let Some(session) = &entry.session else { continue };
                let running_now = matches!(entry.shards.get(&key), Some((e, pb::ShardState::Running | pb::ShardState::Starting)) if *e == job.epoch);
                if running_now || entry.sent.get(&key) == Some(&(job.epoch, pb::ShardAction::Start)) {
                    continue;
                }
                let order = pb::ShardOrder {
                    epoch: job.epoch,
                    job: job.spec.name.clone(),
                    shard: i as u32,
                    action: pb::ShardAction::Start as i32,
                    rank: i as u32,
                    world_size: job.shards.len() as u32,
                    gpu_indices: shard.gpus.clone(),
                    master_addr: master.clone(),
                    master_port: u32::from(job.master_port),
                    command: job.spec.command.clone(),
                    env: job.spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    workdir: job.spec.workdir.clone().unwrap_or_default(),
                    checkpoint_dir: job.spec.checkpoint_dir.clone().unwrap_or_default(),
                    max_restarts: job.spec.max_restarts,
                    grace_period_ms: job.spec.stop_grace_ms,
                    run_token: self.run_tokens.token(&job.spec.name, job.epoch),
                    term: self.term,
                    runtime: job.spec.runtime.clone().unwrap_or_default(),
                };
                let message = pb::ControllerMessage { body: Some(pb::controller_message::Body::ShardOrder(order)) };
                // A full queue is retried next pass: it is not marked sent.
                if session.tx.try_send(Ok(message)).is_ok() {
                    entry.sent.insert(key.clone(), (job.epoch, pb::ShardAction::Start));
                } else {
                    retry.push(shard.node.clone());
                }
            }
        }
        // Stop what runs (or was ordered to) but should not: another epoch, or not placed here.
        for entry in nodes.values_mut() {
            if !in_scope(&entry.name) {
                continue;
            }
            let Some(session) = &entry.session else { continue };
            let want = wanted.get(entry.name.as_str()).map(Vec::as_slice).unwrap_or_default();
            let is_stale = |key: &ShardKey, epoch: u64| {
                !wants(want, key, epoch) && entry.sent.get(key) != Some(&(epoch, pb::ShardAction::Stop))
            };
            let any_stale =
                entry.shards.iter().any(|(k, (e, s))| {
                    matches!(s, pb::ShardState::Running | pb::ShardState::Starting) && is_stale(k, *e)
                }) || entry.sent.iter().any(|(k, (e, a))| *a == pb::ShardAction::Start && is_stale(k, *e));
            if !any_stale {
                continue;
            }
            let mut stale: Vec<(ShardKey, u64)> = entry
                .shards
                .iter()
                .filter(|(_, (_, s))| matches!(s, pb::ShardState::Running | pb::ShardState::Starting))
                .map(|(k, (e, _))| (k.clone(), *e))
                .collect();
            stale.extend(
                entry.sent.iter().filter(|(_, (_, a))| *a == pb::ShardAction::Start).map(|(k, (e, _))| (k.clone(), *e)),
            );
            for (key, epoch) in stale {
                if wants(want, &key, epoch) || entry.sent.get(&key) == Some(&(epoch, pb::ShardAction::Stop)) {
                    continue;
                }
                let stop = pb::ShardOrder {
                    epoch,
                    job: key.0.clone(),
                    shard: key.1,
                    action: pb::ShardAction::Stop as i32,
                    term: self.term,
                    ..Default::default()
                };
                let message = pb::ControllerMessage { body: Some(pb::controller_message::Body::ShardOrder(stop)) };
                if session.tx.try_send(Ok(message)).is_ok() {
                    entry.sent.insert(key, (epoch, pb::ShardAction::Stop));
                } else {
                    retry.push(entry.name.clone());
                }
            }
        }
        for node in retry {
            nodes.orders_due(&node);
        }
    }
}

/// Whether a node that should run `want` (job, shard, epoch) should run shard `key` at `epoch`.
/// Sleep for `duration`, or forever when there is none.
async fn sleep_or_never(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn wants(want: &[(&str, u32, u64)], key: &ShardKey, epoch: u64) -> bool {
    want.contains(&(key.0.as_str(), key.1, epoch))
}

/// What the agent running shard `i` of `job` last reported of it at the job's current epoch.
fn reported_state(nodes: &crate::registry::Nodes, job: &JobRecord, i: usize) -> Option<pb::ShardState> {
    nodes
        .get(&job.shards.get(i)?.node)?
        .shards
        .get(&(job.spec.name.clone(), i as u32))
        .filter(|(epoch, _)| *epoch == job.epoch)
        .map(|(_, state)| *state)
}

/// Times a pass's phases into `watt_reconcile_phase_seconds`.
struct Phases<'a> {
    metrics: &'a Metrics,
    since: Instant,
}

impl<'a> Phases<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        Phases { metrics, since: Instant::now() }
    }

    fn done(&mut self, phase: &str) {
        let now = Instant::now();
        self.metrics.reconcile_phase.with_label_values(&[phase]).observe((now - self.since).as_secs_f64());
        self.since = now;
    }
}

/// The nodes' part of [`View`], kept between passes so that a pass copies only what changes:
/// rebuilt (in name order) when a node is added or replaced, otherwise brought up to date in
/// place — leases, sessions, what each GPU counts parked, non-GPU draw — without allocating.
/// Shard reports are read again only for jobs that are new, placed anew, or reported since.
#[derive(Debug, Default)]
struct KeptView {
    /// The registry's generation it was built at (`None`: never built).
    generation: Option<u64>,
    nodes: Vec<NodeView>,
    power: PowerView,
    reports: HashMap<String, Vec<Option<ShardReport>>>,
    /// Per active job, where each shard's node is in `nodes`, read with its reports.
    placed_at: HashMap<String, Vec<Option<usize>>>,
    /// The submission and epoch each job's reports and positions were read at: a placement
    /// never changes within one (every start, shrink and growth takes a new epoch).
    report_epochs: HashMap<String, (u64, u64)>,
    /// The speed curves' generation `power.curves` holds.
    curves_generation: Option<u64>,
    /// Jobs off their GPUs whose shards' reports moved since the last pass: how the shards
    /// of their last run ended may have come in (see [`JobRecord::fold_late_end`]).
    late_ends: Vec<String>,
}

impl KeptView {
    /// Every active job's reports, read again where `changed` (every job with `None`) names the
    /// job or its placement changed since they were read.
    fn read_reports(
        &mut self,
        registry: &crate::registry::Nodes,
        live: &[&JobRecord],
        changed: Option<&crate::NameSet<String>>,
    ) {
        let active: HashMap<&str, &JobRecord> =
            live.iter().filter(|j| j.state.is_active()).map(|j| (j.spec.name.as_str(), *j)).collect();
        self.reports.retain(|name, _| active.contains_key(name.as_str()));
        self.placed_at.retain(|name, _| active.contains_key(name.as_str()));
        self.report_epochs.retain(|name, _| active.contains_key(name.as_str()));
        for (name, job) in active {
            let read_at = (job.sequence, job.epoch);
            let fresh = self.report_epochs.get(name) == Some(&read_at) && changed.is_some_and(|c| !c.contains(name));
            if fresh {
                continue;
            }
            let mut key: ShardKey = (job.spec.name.clone(), 0);
            let mut at = Vec::with_capacity(job.shards.len());
            let shards = job
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let e = registry.get(&s.node);
                    at.push(e.map(|e| e.view_position));
                    key.1 = i as u32;
                    let &(epoch, state) = e?.shards.get(&key)?;
                    Some(ShardReport { epoch, state, status: e?.shard_statuses.get(&key).cloned() })
                })
                .collect();
            self.report_epochs.insert(key.0.clone(), read_at);
            self.placed_at.insert(key.0.clone(), at);
            self.reports.insert(key.0, shards);
        }
    }

    /// Returns whether it was rebuilt. Otherwise every node's lease and session are copied, and
    /// its budget figures read again only where they may have changed (see
    /// [`crate::registry::NodeEntry::take_budget_changed`]): at 25,000 nodes that read is most
    /// of what a view costs.
    fn bring_up_to_date(
        &mut self,
        registry: &mut crate::registry::Nodes,
        available_watts: f64,
        site: crate::power::Site,
        tree: &Arc<crate::power::domains::DomainTree>,
        clock: &crate::clock::Clock,
    ) -> bool {
        let every_budget_changed = registry.take_every_budget_changed() || self.power.site != site;
        self.power.available_watts = available_watts;
        self.power.site = site;
        let node_view = |e: &crate::registry::NodeEntry| NodeView {
            name: e.name.clone(),
            last_seen_ms: clock.ms(e.last_seen),
            connected: e.session.is_some(),
            marked_lost: e.lost,
            gpus: e.gpus.iter().map(|g| g.index).collect(),
            runtimes: e.runtimes.clone(),
        };
        if self.generation != Some(registry.generation()) || self.power.tree.id != tree.id {
            let mut names: Vec<String> = registry.values().map(|e| e.name.clone()).collect();
            names.sort();
            self.nodes.clear();
            self.power = PowerView::with_domains(available_watts, site, tree.clone());
            for (position, name) in names.iter().enumerate() {
                let Some(e) = registry.get_mut(name) else { continue };
                e.view_position = position;
                e.take_budget_changed();
                self.nodes.push(node_view(e));
                let domains = e.domain_path(tree).to_vec();
                self.power.add_node_in(&e.power, e.non_gpu_watts_or(site.node_overhead_watts), &domains);
            }
            self.generation = Some(registry.generation());
            return true;
        }
        for e in registry.values_mut() {
            let Some(node) = self.nodes.get_mut(e.view_position) else { continue };
            node.last_seen_ms = clock.ms(e.last_seen);
            node.connected = e.session.is_some();
            node.marked_lost = e.lost;
            if e.take_budget_changed() || every_budget_changed {
                self.power.refresh_node(e.view_position, &e.power, e.non_gpu_watts_or(site.node_overhead_watts));
            }
        }
        self.power.add_up();
        #[cfg(debug_assertions)]
        {
            // What was not read again must be what reading it would give.
            let mut fresh = PowerView::with_domains(available_watts, site, tree.clone());
            let mut by_position: Vec<&crate::registry::NodeEntry> = registry.values().collect();
            by_position.sort_by_key(|e| e.view_position);
            for e in by_position {
                fresh.add_node_in(&e.power, e.non_gpu_watts_or(site.node_overhead_watts), &tree.path(&e.labels));
            }
            assert!(fresh.same_figures(&self.power), "a node's budget figures changed without it being marked");
        }
        false
    }
}
