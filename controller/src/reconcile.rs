//! The controller's core and its reconcile loop.
//!
//! One pass: mark nodes whose lease ran out as lost and put their jobs back to waiting; advance
//! job states from what agents reported; run the [`scheduler`]; persist every decision (store
//! first, compare-and-swap); then send each agent the difference between what it should run and
//! what it said it runs. Passes run on every event that can change a decision (a submit, a
//! cancel, a registration, a shard status, a power change, the last acknowledgement owed); the
//! periodic tick runs one only when time itself changes a decision, and at least every 30 ticks.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, Mutex, Notify};
use tokio::time::Instant;
use watt_proto::v1 as pb;

use crate::jobs::{Hold, JobRecord, JobState, JobTable};
use crate::metrics::Metrics;
use crate::power::acks::AckTracker;
use crate::power::planner::GpuWork;
use crate::power::table::PowerTable;
use crate::power_control::PowerState;
use crate::registry::{NodeState, Registry, ShardKey};
use crate::scheduler::{self, RunningJob, ShardAssignment};
use crate::spec::{FieldError, JobSpec};
use crate::store::{Store, StoreError};

/// Why a job is off its GPUs for lack of power (it resumes when power returns).
const POWER_PAUSED: &str = "paused: the power budget cannot hold it at its minimum cap";
/// Why a job waits although GPUs are free.
const POWER_WAITING: &str = "waiting for power: the budget cannot hold it at its minimum cap";

/// Rendezvous ports handed to jobs' rank 0, as torchrun's default 29500 and up.
const MASTER_PORTS: std::ops::Range<u16> = 29_500..30_500;

/// The first rendezvous port not in `used` (rank 0 of other jobs on the same node). A node runs
/// at most as many jobs as it has GPUs, far fewer than the range holds.
fn pick_master_port(used: &HashSet<u16>) -> u16 {
    MASTER_PORTS.clone().find(|p| !used.contains(p)).unwrap_or(MASTER_PORTS.start)
}

/// A decided change to one job, and the event that announces it once stored (none for a
/// changed waiting reason).
#[derive(Debug)]
struct Change {
    record: JobRecord,
    event: Option<JobEvent>,
    message: String,
}

/// What a stored change announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobEvent {
    /// Its node was lost: back to waiting.
    Rescheduling,
    Preempted,
    /// Off its GPUs for lack of power.
    Paused,
    Shrunk,
    Placed,
    Grown,
    /// Its shards' reports moved it to this state.
    Reached(JobState),
}

impl JobEvent {
    fn as_str(self) -> &'static str {
        match self {
            JobEvent::Rescheduling => "rescheduling",
            JobEvent::Preempted => "preempted",
            JobEvent::Paused => "paused",
            JobEvent::Shrunk => "shrunk",
            JobEvent::Placed => "placed",
            JobEvent::Grown => "grown",
            JobEvent::Reached(state) => state.as_str(),
        }
    }
}

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
}

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("no job named {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug)]
pub struct Controller {
    pub store: Arc<dyn Store>,
    pub jobs: Mutex<JobTable>,
    pub registry: Registry,
    pub events: broadcast::Sender<pb::Event>,
    pub metrics: Metrics,
    pub settings: Settings,
    /// The most recent events, for `ListEvents`.
    history: std::sync::Mutex<std::collections::VecDeque<pb::Event>>,
    /// Sources, site, and the bookkeeping of cap orders. Locked after `jobs`.
    pub power: Mutex<PowerState>,
    /// The latest power status, for `GetPowerStatus` and `WatchPower`.
    pub power_status: tokio::sync::watch::Sender<pb::PowerStatus>,
    wake: Notify,
    /// Acknowledgements owed since the last pass: see [`crate::power::acks`].
    pub acks: AckTracker,
    /// Workers' progress by job.
    pub progress: crate::progress::ProgressBook,
    /// When a job cooling down after a resize may next grow (0: none is): see [`crate::regrow`].
    pub(crate) regrow_due_unix_ms: AtomicI64,
    /// No growth attempt before this, after one that found no room.
    pub(crate) regrow_next_attempt_ms: AtomicI64,
    /// Measured draw against the limit: see [`crate::power::meter`].
    pub meter: std::sync::Mutex<crate::power::meter::Meter>,
    /// The clock every deadline is on (see [`crate::clock`]).
    pub clock: crate::clock::Clock,
}

/// How many recent events `ListEvents` can return.
pub const EVENT_HISTORY: usize = 1_000;

pub fn unix_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Controller {
    /// Load every job from `store`.
    pub async fn new(store: Arc<dyn Store>, settings: Settings, metrics: Metrics) -> Result<Arc<Self>, StoreError> {
        let jobs = JobTable::load(store.clone()).await?;
        let power = PowerTable::load(store.clone()).await?;
        let power_state = PowerState::load(power, store.as_ref()).await?;
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
        tracing::info!(
            jobs = jobs.len(),
            sources = power_state.table.sources().count(),
            "Loaded jobs and power sources from the store."
        );
        let (power_status, _) = tokio::sync::watch::channel(pb::PowerStatus::default());
        let (events, _) = broadcast::channel(4096);
        Ok(Arc::new(Controller {
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
            regrow_due_unix_ms: AtomicI64::new(0),
            regrow_next_attempt_ms: AtomicI64::new(0),
            meter: std::sync::Mutex::new(crate::power::meter::Meter::new(settings.settle_time)),
            clock: crate::clock::Clock::new(Instant::now()),
        }))
    }

    /// Ask for a reconcile pass soon.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn emit(&self, kind: &str, name: &str, reason: &str, message: String) {
        tracing::info!(kind, name, reason, "{message}");
        let event =
            pb::Event { unix_ms: unix_ms(), kind: kind.into(), name: name.into(), reason: reason.into(), message };
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
        status
    }

    /// Recent events, oldest first.
    pub fn recent_events(&self) -> Vec<pb::Event> {
        self.history.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    pub async fn submit(&self, spec: JobSpec) -> Result<pb::Job, RequestError> {
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
        let mut jobs = self.jobs.lock().await;
        if let Some(existing) = jobs.get(&spec.name) {
            return Err(FieldError::new(
                "name",
                format!("{:?} is taken by an existing job ({})", spec.name, existing.state.as_str()),
            )
            .into());
        }
        let record = match jobs.create(spec, unix_ms()).await {
            Ok(record) => record,
            Err(StoreError::Conflict { key }) if key.starts_with(crate::jobs::JOBS_PREFIX) => {
                return Err(FieldError::new("name", "is taken by an existing job").into());
            }
            Err(e) => return Err(e.into()),
        };
        drop(jobs);
        self.emit(
            "job",
            &record.spec.name,
            "submitted",
            format!("priority {}, sequence {}", record.spec.priority, record.sequence),
        );
        self.wake();
        Ok(self.job_proto(&record))
    }

    pub async fn cancel(&self, name: &str) -> Result<pb::Job, RequestError> {
        let mut jobs = self.jobs.lock().await;
        let mut record = jobs.get(name).cloned().ok_or_else(|| RequestError::NotFound(name.into()))?;
        if !record.state.is_terminal() {
            self.unplace(&mut record, "cancelled".into(), None);
            record.state = JobState::Cancelled;
            jobs.update(record.clone()).await?;
            self.emit("job", name, "cancelled", "cancelled by request".into());
            self.wake();
        }
        Ok(self.job_proto(&record))
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
        job.progress = progress;
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
        loop {
            let woken = tokio::select! {
                _ = tick.tick() => false,
                () = self.wake.notified() => true,
                () = &mut shutdown => return,
            };
            since_full += 1;
            // A full pass at least every 30 ticks regardless, as a backstop.
            if woken || since_full >= 30 || self.time_changes_something().await {
                since_full = 0;
                self.reconcile_once().await;
            }
        }
    }

    /// Whether a pass now could decide something the last one did not, with no event since.
    async fn time_changes_something(&self) -> bool {
        let now = Instant::now();
        let now_ms = self.clock.ms(now);
        // Resizes and ramps are stored with wall times: they mean the same after a restart.
        let wall_ms = unix_ms();
        let regrow_due = self.regrow_due_unix_ms.load(Ordering::Relaxed);
        if regrow_due != 0 && wall_ms >= regrow_due {
            return true; // A job's resize cool-down ran out.
        }
        {
            let power = self.power.lock().await;
            if power.table.sources().any(|s| s.effective_watts(wall_ms) < s.available_watts) {
                return true; // Ramping.
            }
        }
        let lease = self.settings.node_lease;
        let nodes = self.registry.lock();
        nodes.values().any(|e| {
            let lease_ran_out = !e.lost && e.state(now, lease) == NodeState::Lost;
            let failsafe_passed =
                !e.power.reachable && e.power.failsafed(now_ms) && e.power.gpus.iter().any(|g| g.in_flight.is_some());
            let resend_due = e.power.reachable
                && e.power
                    .gpus
                    .iter()
                    .any(|g| g.in_flight.is_some_and(|f| now_ms - f.sent_ms >= crate::power::planner::RESEND_AFTER_MS));
            lease_ran_out || failsafe_passed || resend_due
        })
    }

    /// One pass. Errors are logged and retried on the next pass: nothing half-applied is lost,
    /// because every decision is stored before it is sent.
    pub async fn reconcile_once(&self) {
        let started = Instant::now();
        let mut jobs = self.jobs.lock().await;
        let now = Instant::now();
        let lease = self.settings.node_lease;

        // 1. Nodes whose lease ran out.
        let (lost, newly_lost) = {
            let mut nodes = self.registry.lock();
            let mut lost = HashSet::new();
            let mut newly = Vec::new();
            for entry in nodes.values_mut() {
                if entry.state(now, lease) == NodeState::Lost {
                    if !entry.lost {
                        entry.lost = true;
                        entry.session = None;
                        newly.push(entry.name.clone());
                    }
                    lost.insert(entry.name.clone());
                }
            }
            (lost, newly)
        };
        for node in &newly_lost {
            self.emit("node", node, "lost", format!("not heard from for {}", humantime::format_duration(lease)));
        }

        // 2. Jobs with a shard on a lost node go back to waiting (all shards: gang), and
        // 3. shard reports move active jobs along.
        let mut changes: Vec<Change> = Vec::new();
        for job in jobs.iter().filter(|j| j.state.is_active()) {
            if let Some(shard) = job.shards.iter().find(|s| lost.contains(&s.node)) {
                let mut record = job.clone();
                let lost = format!("node {} was lost; waiting to be rescheduled", shard.node);
                self.unplace(&mut record, lost, Some(Hold::NodeLost));
                let message = record.message.clone();
                changes.push(Change { record, event: Some(JobEvent::Rescheduling), message });
            } else if let Some(record) = self.advance(job) {
                let message = record.message.clone();
                changes.push(Change { event: Some(JobEvent::Reached(record.state)), record, message });
            }
        }
        self.apply(&mut jobs, changes).await;

        // 4. Schedule.
        let nodes = self.registry.schedulable(now, lease);
        let running: Vec<RunningJob> = jobs
            .iter()
            .filter(|j| j.state.is_active())
            .map(|j| RunningJob { request: j.request(), shards: j.shards.clone() })
            .collect();
        let pending: Vec<_> = jobs.iter().filter(|j| j.state == JobState::Pending).map(JobRecord::request).collect();
        let scheduled_at = Instant::now();
        let plan = scheduler::schedule(&nodes, &running, &pending);
        self.metrics.scheduling_duration.observe(scheduled_at.elapsed().as_secs_f64());

        // 5. Power admission over what would run: new starts the budget cannot hold wait, running
        // jobs it cannot hold shrink or pause.
        let mut power = self.power.lock().await;
        let preempted: HashSet<String> = plan.preemptions.iter().map(|p| p.job.clone()).collect();
        let starting: Vec<(String, Vec<ShardAssignment>)> =
            plan.starts.iter().map(|s| (s.job.clone(), s.shards.clone())).collect();
        let admission = self.admit(&power, &jobs, &preempted, &starting);
        let mut admission = admission;
        let verdict: HashMap<String, (bool, u32)> = admission
            .allocation
            .as_ref()
            .map(|a| a.jobs.iter().map(|j| (j.name.clone(), (j.paused, j.shards))).collect())
            .unwrap_or_default();

        // 6. Apply in one ordered batch: preemptions first (their GPUs are what starts stand
        // on), then power pauses and shrinks, then starts, then changed waiting reasons.
        let mut changes: Vec<Change> = Vec::new();
        for p in &plan.preemptions {
            let Some(mut record) = jobs.get(&p.job).cloned() else { continue };
            self.unplace(&mut record, format!("preempted by higher-priority job {}", p.by), Some(Hold::Preempted));
            record.preemptions += 1;
            changes.push(Change { record, event: Some(JobEvent::Preempted), message: format!("by {}", p.by) });
        }
        for job in jobs.iter().filter(|j| j.state.is_active() && !preempted.contains(&j.spec.name)) {
            match verdict.get(&job.spec.name) {
                Some(&(true, _)) => {
                    let mut record = job.clone();
                    self.unplace(&mut record, POWER_PAUSED.into(), Some(Hold::PowerPaused));
                    changes.push(Change {
                        record,
                        event: Some(JobEvent::Paused),
                        message: "the power budget cannot hold it".into(),
                    });
                }
                Some(&(false, keep)) if (keep as usize) < job.shards.len() => {
                    let mut record = job.clone();
                    record.shards.truncate(keep as usize);
                    record.epoch += 1;
                    record.resized_unix_ms = unix_ms();
                    record.state = JobState::Starting;
                    record.message = format!("shrunk to {keep} shard(s): the power budget cannot hold more");
                    let message = record.message.clone();
                    changes.push(Change { record, event: Some(JobEvent::Shrunk), message });
                }
                _ => {}
            }
        }
        // Nothing started, stopped, paused or shrunk: a shrunk job may grow back.
        let quiet = changes.is_empty() && plan.starts.is_empty();
        let mut ports: HashMap<String, HashSet<u16>> = HashMap::new();
        for job in jobs.iter().filter(|j| j.state.is_active()) {
            if let Some(first) = job.shards.first() {
                ports.entry(first.node.clone()).or_default().insert(job.master_port);
            }
        }
        for mut start in plan.starts {
            let Some(mut record) = jobs.get(&start.job).cloned() else { continue };
            match verdict.get(&start.job) {
                Some(&(true, _)) => {
                    if record.hold != Some(Hold::PowerWaiting) {
                        record.message = POWER_WAITING.into();
                        record.hold = Some(Hold::PowerWaiting);
                        changes.push(Change { record, event: None, message: String::new() });
                    }
                    continue;
                }
                Some(&(false, keep)) => start.shards.truncate(keep as usize),
                None => {}
            }
            let used = ports.entry(start.shards[0].node.clone()).or_default();
            record.master_port = pick_master_port(used);
            used.insert(record.master_port);
            record.state = JobState::Starting;
            record.epoch += 1;
            record.resized_unix_ms = unix_ms();
            let summary = placement_summary(&start.shards);
            record.shards = start.shards;
            record.message = format!("placed: {summary}");
            record.hold = None;
            changes.push(Change { record, event: Some(JobEvent::Placed), message: summary });
        }
        for waiting in plan.waiting {
            let Some(record) = jobs.get(&waiting.job) else { continue };
            // A reason of its own (preempted, node lost, power) stands over the scheduler's.
            if record.message != waiting.reason && record.hold.is_none() {
                let mut record = record.clone();
                record.message = waiting.reason;
                changes.push(Change { record, event: None, message: String::new() });
            }
        }
        self.apply(&mut jobs, changes).await;

        // 7. Growth of a job below its size, when everything else is settled.
        if quiet {
            if let Some(record) = self.regrow(&power, &jobs, &nodes, &admission, unix_ms()) {
                let message = record.message.clone();
                self.apply(&mut jobs, vec![Change { record, event: Some(JobEvent::Grown), message }]).await;
                admission = self.admit(&power, &jobs, &HashSet::new(), &[]);
            }
        }

        // 8. Caps toward the allocation, through the planner: at most one order per node, each
        // with an epoch reserved in the store first. The reservation is renewed while half a
        // block is still left, so a store that stops answering leaves ~500,000 orders — cuts
        // included — before any waits on it.
        let nodes_known = self.registry.lock().len() as u64;
        let wanted = nodes_known + crate::power::epochs::BLOCK / 2;
        if let Err(e) = power.epochs.reserve(self.store.as_ref(), wanted).await {
            tracing::warn!(error = %e, "Cannot reserve cap-order epochs in the store; orders wait for it.");
        }
        self.enforce(&mut power, &jobs, admission);
        drop(power);

        // 9. Shard orders to agents.
        self.send_orders(&jobs);
        self.metrics.observe(&jobs, &self.registry, now, lease);
        self.metrics.observe_progress(&jobs, &self.progress);
        drop(jobs);
        self.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    }

    /// A rendezvous port on `node` that no other active job's rank 0 there uses.
    pub(crate) fn free_master_port(&self, jobs: &JobTable, node: &str, except: &str) -> u16 {
        let used: HashSet<u16> = jobs
            .iter()
            .filter(|j| {
                j.state.is_active() && j.spec.name != except && j.shards.first().is_some_and(|s| s.node == node)
            })
            .map(|j| j.master_port)
            .collect();
        pick_master_port(&used)
    }

    /// Store `changes` in order (see [`JobTable::update_all`]) and announce the ones stored.
    /// What could not be stored is logged and decided again on the next pass.
    async fn apply(&self, jobs: &mut JobTable, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let records = changes.iter().map(|c| c.record.clone()).collect();
        let (stored, error) = jobs.update_all(records).await;
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
            self.emit("job", &change.record.spec.name, event.as_str(), change.message);
        }
    }

    /// The next state of an active job from its shards' reports, if it changes.
    fn advance(&self, job: &JobRecord) -> Option<JobRecord> {
        let nodes = self.registry.lock();
        let states: Vec<Option<pb::ShardState>> =
            (0..job.shards.len()).map(|i| reported_state(&nodes, job, i)).collect();
        drop(nodes);
        let all = |want: pb::ShardState| states.iter().all(|s| *s == Some(want));
        let mut next = job.clone();
        if let Some(i) = states.iter().position(|s| *s == Some(pb::ShardState::Failed)) {
            self.unplace(&mut next, format!("shard {i} on {} failed", job.shards[i].node), None);
            if let Some(why) = next.last_run.get(i).map(describe_end).filter(|w| !w.is_empty()) {
                next.message = format!("shard {i} on {} {why}", job.shards[i].node);
            }
            next.state = JobState::Failed;
        } else if all(pb::ShardState::Succeeded) {
            self.unplace(&mut next, "every shard finished".into(), None);
            next.state = JobState::Succeeded;
        } else if job.state == JobState::Starting && all(pb::ShardState::Running) {
            next.state = JobState::Running;
            next.message = format!("running {} shard(s)", job.shards.len());
        } else {
            return None;
        }
        Some(next)
    }

    /// Take `record` off its GPUs, keeping where it ran and how each shard ended.
    fn unplace(&self, record: &mut JobRecord, message: String, hold: Option<Hold>) {
        let nodes = self.registry.lock();
        let job = record.spec.name.clone();
        record.unplace(message, hold, unix_ms(), &|node, shard| {
            nodes.get(node).and_then(|n| n.shard_statuses.get(&(job.clone(), shard))).cloned()
        });
    }

    /// Send every connected agent what it lacks: starts for shards it should run, stops for
    /// shards it runs that it should not. Cheap when nothing changed: an order is built only for
    /// a shard that is neither reported running at its epoch nor already sent.
    fn send_orders(&self, jobs: &JobTable) {
        let mut nodes = self.registry.lock();
        let addresses: HashMap<String, String> = jobs
            .iter()
            .filter(|j| j.state.is_active())
            .filter_map(|j| j.shards.first())
            .filter_map(|s| {
                // A node expected but not registered yet has no address to give.
                let e = nodes.get(&s.node).filter(|e| e.session.is_some() || e.address.is_some())?;
                Some((s.node.clone(), e.address.map(|a| a.to_string()).unwrap_or_else(|| e.name.clone())))
            })
            .collect();
        // (node, job, shard) -> epoch, for the stop pass below.
        let mut wanted: HashMap<&str, HashMap<ShardKey, u64>> = HashMap::new();
        for job in jobs.iter().filter(|j| j.state.is_active()) {
            // Rank 0's node not registered (after a controller restart, before it is back): its
            // address is unknown, and ranks told an empty MASTER_ADDR could never meet. Starts
            // wait for it; what runs keeps running.
            let master = addresses.get(&job.shards[0].node);
            for (i, shard) in job.shards.iter().enumerate() {
                let key = (job.spec.name.clone(), i as u32);
                wanted.entry(shard.node.as_str()).or_default().insert(key.clone(), job.epoch);
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
                };
                let message = pb::ControllerMessage { body: Some(pb::controller_message::Body::ShardOrder(order)) };
                // A full queue is retried next pass: it is not marked sent.
                if session.tx.try_send(Ok(message)).is_ok() {
                    entry.sent.insert(key, (job.epoch, pb::ShardAction::Start));
                }
            }
        }
        // Stop what runs (or was ordered to) but should not: another epoch, or not placed here.
        let empty = HashMap::new();
        for entry in nodes.values_mut() {
            let Some(session) = &entry.session else { continue };
            let want = wanted.get(entry.name.as_str()).unwrap_or(&empty);
            let is_stale = |key: &ShardKey, epoch: u64| {
                want.get(key) != Some(&epoch) && entry.sent.get(key) != Some(&(epoch, pb::ShardAction::Stop))
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
                if want.get(&key) == Some(&epoch) || entry.sent.get(&key) == Some(&(epoch, pb::ShardAction::Stop)) {
                    continue;
                }
                let stop = pb::ShardOrder {
                    epoch,
                    job: key.0.clone(),
                    shard: key.1,
                    action: pb::ShardAction::Stop as i32,
                    ..Default::default()
                };
                let message = pb::ControllerMessage { body: Some(pb::controller_message::Body::ShardOrder(stop)) };
                if session.tx.try_send(Ok(message)).is_ok() {
                    entry.sent.insert(key, (epoch, pb::ShardAction::Stop));
                }
            }
        }
    }
}

/// What the agent running shard `i` of `job` last reported of it at the job's current epoch.
fn reported_state(
    nodes: &HashMap<String, crate::registry::NodeEntry>,
    job: &JobRecord,
    i: usize,
) -> Option<pb::ShardState> {
    nodes
        .get(&job.shards.get(i)?.node)?
        .shards
        .get(&(job.spec.name.clone(), i as u32))
        .filter(|(epoch, _)| *epoch == job.epoch)
        .map(|(_, state)| *state)
}

/// "exited 3 after 1 restart", else the agent's words, or "" when nothing is known.
fn describe_end(o: &crate::jobs::ShardOutcome) -> String {
    watt_common::shard_end::describe(o.exit_code, o.signal, o.restarts).unwrap_or_else(|| o.message.clone())
}

/// "4 shards on gpu-a [0,1], gpu-b [0,1], ..." — short enough for an event line.
fn placement_summary(shards: &[crate::scheduler::ShardAssignment]) -> String {
    let mut per_node: Vec<(String, usize)> = Vec::new();
    for s in shards {
        match per_node.iter_mut().find(|(n, _)| *n == s.node) {
            Some((_, count)) => *count += 1,
            None => per_node.push((s.node.clone(), 1)),
        }
    }
    let nodes: Vec<String> = per_node.iter().take(8).map(|(n, c)| format!("{n}×{c}")).collect();
    let more = if per_node.len() > 8 { format!(" and {} more nodes", per_node.len() - 8) } else { String::new() };
    format!("{} shard(s) on {}{more}", shards.len(), nodes.join(", "))
}
