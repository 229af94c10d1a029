//! The shards this node has been ordered to run, keyed by (job, shard), with the order's epoch
//! and the state the supervisor last reported.
//!
//! Orders are idempotent by epoch: the same order twice changes nothing, an order older than the
//! newest one applied is ignored, and a stop names the epoch it stops. Starting and stopping
//! processes is the [`Supervisor`]'s; every state it reports is recorded here and queued for the
//! controller, and a (re)registration sends them all.
//!
//! On simulated GPUs this table is also what puts load on them: a GPU with an active shard runs
//! the training profile, one without idles (see [`crate::gpu::sim`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use watt_proto::v1 as pb;

use crate::gpu::sim::{SimBackend, SimWorkload};
use crate::progress::{ProgressSink, WorkerProgress};
use crate::sampler::NodeSnapshot;
use crate::supervisor::{LastExit, Launch, Report, Supervisor};

/// The workload a shard's order asks the simulated GPUs for; balanced when it names none, and
/// when it names one that does not exist (said in the log).
fn sim_workload(order: &pb::ShardOrder) -> SimWorkload {
    let Some(value) = order.env.get(SimWorkload::ENV) else { return SimWorkload::Balanced };
    SimWorkload::parse(value).unwrap_or_else(|| {
        tracing::warn!(
            job = %order.job,
            "{}={value:?} is not a simulated workload (balanced, compute-bound, memory-bound); running it balanced",
            SimWorkload::ENV
        );
        SimWorkload::Balanced
    })
}

/// The GPUs' activity averaged, for the wire; none when no GPU has a performance monitor.
fn mean_activity(gpus: &[crate::gpu::GpuActivity]) -> Option<pb::GpuActivity> {
    if gpus.is_empty() {
        return None;
    }
    let n = gpus.len() as f64;
    let mean = |share: fn(&crate::gpu::GpuActivity) -> f64| gpus.iter().map(share).sum::<f64>() / n;
    Some(pb::GpuActivity {
        sm_active: mean(|a| a.sm_active),
        sm_occupancy: mean(|a| a.sm_occupancy),
        tensor_active: mean(|a| a.tensor_active),
        dram_active: mean(|a| a.dram_active),
        fp16_active: mean(|a| a.fp16_active),
        fp32_active: mean(|a| a.fp32_active),
        fp64_active: mean(|a| a.fp64_active),
    })
}

/// The job's simulated step length in 100 ms ticks (`WATT_SIM_STEP_PERIOD`, e.g. `1s`), 0.2–60 s;
/// none when it names none, or a value that is not such a duration (said in the log).
fn sim_step_ticks(order: &pb::ShardOrder) -> Option<u32> {
    let value = order.env.get("WATT_SIM_STEP_PERIOD")?;
    match humantime::parse_duration(value) {
        Ok(d) if (0.2..=60.0).contains(&d.as_secs_f64()) => Some((d.as_secs_f64() * 10.0).round() as u32),
        _ => {
            tracing::warn!(job = %order.job, "WATT_SIM_STEP_PERIOD={value:?} is not a duration between 200ms and 60s; each GPU keeps its own step");
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShardRecord {
    pub epoch: u64,
    pub state: pb::ShardState,
    pub message: String,
    pub order: pb::ShardOrder,
    /// The worker's latest report, and whether the controller has had it.
    pub progress: Option<WorkerProgress>,
    pub progress_sent: bool,
    /// The speed last written to the shard's speed file (simulated GPUs).
    pub speed: Option<f64>,
    /// What its steps are bound by on simulated GPUs (the job's `WATT_SIM_WORKLOAD`), and how
    /// long one takes there in 100 ms ticks (`WATT_SIM_STEP_PERIOD`; none: each GPU's own).
    pub workload: SimWorkload,
    pub step_ticks: Option<u32>,
    pub last_exit: LastExit,
}

impl ShardRecord {
    fn new(order: &pb::ShardOrder, state: pb::ShardState, message: &str) -> Self {
        ShardRecord {
            epoch: order.epoch,
            state,
            message: message.into(),
            order: order.clone(),
            progress: None,
            progress_sent: true,
            speed: None,
            workload: sim_workload(order),
            step_ticks: sim_step_ticks(order),
            last_exit: LastExit::default(),
        }
    }

    fn status(&self, job: &str, shard: u32) -> pb::ShardStatus {
        pb::ShardStatus {
            job: job.to_owned(),
            shard,
            epoch: self.epoch,
            state: self.state as i32,
            message: self.message.clone(),
            gpu_indices: self.order.gpu_indices.clone(),
            exit_code: self.last_exit.code,
            signal: self.last_exit.signal,
            restarts: self.last_exit.restarts,
        }
    }
}

#[derive(Debug)]
pub struct ShardTable {
    shards: Mutex<BTreeMap<(String, u32), ShardRecord>>,
    supervisor: Arc<Supervisor>,
    grace: Duration,
    node_cpus: usize,
    /// Simulated GPUs, loaded by the shards placed on them.
    sim: Option<Arc<SimBackend>>,
    updates: mpsc::UnboundedSender<pb::ShardStatus>,
    /// Status changes not yet sent; the session holds it while connected.
    pub pending: tokio::sync::Mutex<mpsc::UnboundedReceiver<pb::ShardStatus>>,
}

fn active(state: pb::ShardState) -> bool {
    matches!(state, pb::ShardState::Starting | pb::ShardState::Running | pb::ShardState::Stopping)
}

impl ShardTable {
    pub fn new(supervisor: Arc<Supervisor>, grace: Duration, sim: Option<Arc<SimBackend>>) -> Arc<Self> {
        let (updates, pending) = mpsc::unbounded_channel();
        let node_cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Arc::new(ShardTable {
            shards: Mutex::new(BTreeMap::new()),
            supervisor,
            grace,
            node_cpus,
            sim,
            updates,
            pending: tokio::sync::Mutex::new(pending),
        })
    }

    pub fn supervisor(&self) -> &Arc<Supervisor> {
        &self.supervisor
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, u32), ShardRecord>> {
        self.shards.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Apply an order; returns the shard's status to report.
    pub fn apply(self: &Arc<Self>, order: &pb::ShardOrder) -> pb::ShardStatus {
        let key = (order.job.clone(), order.shard);
        let action = pb::ShardAction::try_from(order.action).unwrap_or_default();
        let mut launch = None;
        let mut stop = None;
        let mut old_run = None;
        let stale;
        {
            let mut shards = self.lock();
            let current = shards.get(&key).cloned();
            stale = current.as_ref().is_some_and(|c| order.epoch < c.epoch);
            if !stale {
                match action {
                    pb::ShardAction::Start => {
                        // The same epoch again (a resend, a reconnect): whatever it became stands.
                        let same = current.as_ref().is_some_and(|c| c.epoch == order.epoch);
                        if !same {
                            tracing::info!(job = %order.job, shard = order.shard, epoch = order.epoch, rank = order.rank,
                                world = order.world_size, gpus = ?order.gpu_indices, "Shard ordered to start.");
                            shards.insert(key.clone(), ShardRecord::new(order, pb::ShardState::Starting, "starting"));
                            launch = Some(Launch {
                                order: order.clone(),
                                grace: self.grace,
                                node_cpus: self.node_cpus,
                                simulated: self.sim.is_some(),
                            });
                        }
                    }
                    pb::ShardAction::Stop => match shards.get_mut(&key) {
                        Some(record) if record.epoch == order.epoch && active(record.state) => {
                            if record.state != pb::ShardState::Stopping {
                                tracing::info!(job = %order.job, shard = order.shard, epoch = order.epoch, "Shard ordered to stop.");
                                record.state = pb::ShardState::Stopping;
                                record.message = "stopping".into();
                                stop = Some(record.epoch);
                            }
                        }
                        Some(record) if record.epoch == order.epoch => {}
                        other => {
                            // A stop newer than what runs here ends that run too.
                            if let Some(r) = other.filter(|r| active(r.state)) {
                                old_run = Some(r.epoch);
                            }
                            shards.insert(key.clone(), ShardRecord::new(order, pb::ShardState::Stopped, "not running"));
                        }
                    },
                    pb::ShardAction::Unspecified => {}
                }
            }
        }
        if launch.is_some() || stop.is_some() || old_run.is_some() {
            self.load_sim_gpus();
        }
        if let Some(launch) = launch {
            self.supervisor.start(launch, self.clone());
        }
        if let Some(epoch) = old_run {
            self.supervisor.stop(&order.job, order.shard, epoch);
        }
        if let Some(epoch) = stop {
            if !self.supervisor.stop(&order.job, order.shard, epoch) {
                self.report(
                    &order.job,
                    order.shard,
                    epoch,
                    pb::ShardState::Stopped,
                    "not running".into(),
                    LastExit::default(),
                );
            }
        }
        let shards = self.lock();
        match shards.get(&key) {
            Some(record) => {
                let mut status = record.status(&order.job, order.shard);
                if stale {
                    status.message = "stale order ignored".into();
                }
                status
            }
            None => pb::ShardStatus {
                job: order.job.clone(),
                shard: order.shard,
                epoch: order.epoch,
                state: pb::ShardState::Stopped as i32,
                ..Default::default()
            },
        }
    }

    /// Every shard's status, for a (re)registration.
    pub fn statuses(&self) -> Vec<pb::ShardStatus> {
        self.lock().iter().map(|((job, shard), r)| r.status(job, *shard)).collect()
    }

    /// Which job each GPU with an active shard runs.
    pub fn gpu_jobs(&self) -> BTreeMap<u32, String> {
        self.lock()
            .iter()
            .filter(|(_, r)| active(r.state))
            .flat_map(|((job, _), r)| r.order.gpu_indices.iter().map(move |&gpu| (gpu, job.clone())))
            .collect()
    }

    /// Simulated GPUs: every GPU of a shard starting, running or stopping trains; the rest idle.
    fn load_sim_gpus(&self) {
        let Some(sim) = &self.sim else { return };
        let shards = self.lock();
        let busy: std::collections::HashMap<u32, (SimWorkload, Option<u32>)> = shards
            .values()
            .filter(|r| active(r.state))
            .flat_map(|r| r.order.gpu_indices.iter().map(|&gpu| (gpu, (r.workload, r.step_ticks))))
            .collect();
        drop(shards);
        for gpu in crate::gpu::GpuBackend::gpus(sim.as_ref()) {
            let load = busy.get(&gpu.index).copied();
            sim.set_training_steps(gpu.index, load.map(|(w, _)| w), load.and_then(|(_, s)| s));
        }
    }
}

impl ShardTable {
    /// Progress the controller has not had yet, with the energy its GPUs have drawn so far, the
    /// lowest cap in force on them and what they were doing: what the controller learns each
    /// job's speed curve from.
    pub fn take_progress(&self, snapshot: &NodeSnapshot) -> Vec<pb::ShardProgress> {
        fn of<'a>(
            snapshot: &'a NodeSnapshot,
            gpus: &'a [u32],
        ) -> impl Iterator<Item = &'a crate::sampler::GpuReading> + 'a {
            snapshot.inventory.iter().zip(&snapshot.gpus).filter(|(info, _)| gpus.contains(&info.index)).map(|(_, r)| r)
        }
        let mut shards = self.lock();
        shards
            .iter_mut()
            .filter(|(_, r)| !r.progress_sent)
            .filter_map(|((job, shard), r)| {
                r.progress_sent = true;
                let p = r.progress.as_ref()?;
                let gpus = &r.order.gpu_indices;
                let caps = of(snapshot, gpus).filter_map(|reading| reading.sample.as_ref()?.power_limit_watts);
                let activity: Vec<_> =
                    of(snapshot, gpus).filter_map(|reading| reading.sample.as_ref()?.activity).collect();
                Some(pb::ShardProgress {
                    job: job.clone(),
                    shard: *shard,
                    epoch: r.epoch,
                    step: p.step,
                    samples: p.samples,
                    loss: p.loss,
                    extra: p.extra.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                    energy_joules: of(snapshot, gpus).filter_map(|reading| reading.energy_joules_total).sum(),
                    unix_ms: p.unix_ms,
                    cap_watts: caps.reduce(f64::min),
                    activity: mean_activity(&activity),
                })
            })
            .collect()
    }

    /// Simulated GPUs: write each running shard's speed at its GPUs' caps (the slowest GPU sets
    /// the pace of a synchronous step), on its workload's true curve, where it changed, for
    /// `watt-worker --step-time`.
    pub fn publish_speeds(&self, snapshot: &NodeSnapshot) {
        if self.sim.is_none() {
            return;
        }
        let mut shards = self.lock();
        for ((job, shard), r) in shards.iter_mut().filter(|(_, r)| active(r.state)) {
            let curve = r.workload.curve();
            let speed = snapshot
                .inventory
                .iter()
                .zip(&snapshot.gpus)
                .filter(|(info, _)| r.order.gpu_indices.contains(&info.index))
                .filter_map(|(info, reading)| {
                    let cap = reading.sample.as_ref()?.power_limit_watts?;
                    Some(curve.speed(cap, info.power_limit.max_watts))
                })
                .fold(1.0f64, f64::min);
            if r.speed.is_none_or(|s| (s - speed).abs() > 1e-4) {
                let path = self.supervisor.dirs().speed_path(job, *shard);
                if std::fs::write(&path, format!("{speed:.6}\n")).is_ok() {
                    r.speed = Some(speed);
                }
            }
        }
    }
}

impl ProgressSink for ShardTable {
    fn progress(&self, job: &str, shard: u32, epoch: u64, progress: WorkerProgress) {
        let mut shards = self.lock();
        if let Some(r) = shards.get_mut(&(job.to_owned(), shard)).filter(|r| r.epoch == epoch) {
            r.progress = Some(progress);
            r.progress_sent = false;
        }
    }
}

impl Report for ShardTable {
    fn report(&self, job: &str, shard: u32, epoch: u64, state: pb::ShardState, message: String, last: LastExit) {
        let mut shards = self.lock();
        let Some(record) = shards.get_mut(&(job.to_owned(), shard)) else { return };
        if record.epoch != epoch {
            return; // A newer order replaced this run.
        }
        let load_changed = active(record.state) != active(state);
        record.state = state;
        record.message = message;
        record.last_exit = last;
        let _ = self.updates.send(record.status(job, shard));
        drop(shards);
        if load_changed {
            self.load_sim_gpus();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(epoch: u64, action: pb::ShardAction) -> pb::ShardOrder {
        pb::ShardOrder {
            epoch,
            job: "j".into(),
            shard: 0,
            action: action as i32,
            command: vec!["sleep".into(), "30".into()],
            gpu_indices: vec![0],
            ..Default::default()
        }
    }

    /// The next status queued for the controller in `state`.
    async fn next(table: &ShardTable, state: pb::ShardState) -> pb::ShardStatus {
        let mut pending = table.pending.lock().await;
        loop {
            let status = tokio::time::timeout(Duration::from_secs(10), pending.recv())
                .await
                .unwrap_or_else(|_| panic!("no {state:?} status"))
                .unwrap_or_else(|| panic!("channel closed"));
            if status.state == state as i32 {
                return status;
            }
        }
    }

    #[tokio::test]
    async fn orders_are_idempotent_stale_ones_ignored_and_a_newer_stop_ends_an_older_run() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let table = ShardTable::new(Arc::new(Supervisor::new(dir.path().to_owned())), Duration::from_secs(2), None);
        let s = table.apply(&order(2, pb::ShardAction::Start));
        assert_eq!((s.epoch, s.state), (2, pb::ShardState::Starting as i32));
        next(&table, pb::ShardState::Running).await;
        let again = table.apply(&order(2, pb::ShardAction::Start));
        assert_eq!(
            (again.epoch, again.state),
            (2, pb::ShardState::Running as i32),
            "same order twice: no second start"
        );
        let stale = table.apply(&order(1, pb::ShardAction::Stop));
        assert_eq!(
            (stale.epoch, stale.state),
            (2, pb::ShardState::Running as i32),
            "an older stop does not stop a newer start"
        );
        let stopping = table.apply(&order(2, pb::ShardAction::Stop));
        assert_eq!(stopping.state, pb::ShardState::Stopping as i32);
        next(&table, pb::ShardState::Stopped).await;

        // A new run, then a stop newer than it (the agent missed the start of epoch 4): it ends.
        table.apply(&order(3, pb::ShardAction::Start));
        next(&table, pb::ShardState::Running).await;
        let pid = table.supervisor.dirs().pid_path("j", 0);
        assert!(pid.exists());
        let s = table.apply(&order(4, pb::ShardAction::Stop));
        assert_eq!((s.epoch, s.state), (4, pb::ShardState::Stopped as i32));
        let t0 = tokio::time::Instant::now();
        while pid.exists() {
            assert!(t0.elapsed() < Duration::from_secs(10), "the older run was not stopped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(table.statuses().len(), 1);
    }
}
