//! The shards this node has been ordered to run, keyed by (job, shard), with the order's epoch
//! and the state the supervisor last reported.
//!
//! Orders are idempotent by epoch: the same order twice changes nothing, an order older than the
//! newest one applied is ignored, and a stop names the epoch it stops. Starting and stopping
//! processes is the [`Supervisor`]'s; every state it reports is recorded here and queued for the
//! controller, and a (re)registration sends them all.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use watt_proto::v1 as pb;

use crate::supervisor::{Launch, Report, Supervisor};

#[derive(Debug, Clone, PartialEq)]
pub struct ShardRecord {
    pub epoch: u64,
    pub state: pb::ShardState,
    pub message: String,
    pub order: pb::ShardOrder,
}

#[derive(Debug)]
pub struct ShardTable {
    shards: Mutex<BTreeMap<(String, u32), ShardRecord>>,
    supervisor: Arc<Supervisor>,
    grace: Duration,
    node_cpus: usize,
    updates: mpsc::UnboundedSender<pb::ShardStatus>,
    /// Status changes not yet sent; the session holds it while connected.
    pub pending: tokio::sync::Mutex<mpsc::UnboundedReceiver<pb::ShardStatus>>,
}

fn active(state: pb::ShardState) -> bool {
    matches!(state, pb::ShardState::Starting | pb::ShardState::Running | pb::ShardState::Stopping)
}

impl ShardTable {
    pub fn new(supervisor: Arc<Supervisor>, grace: Duration) -> Arc<Self> {
        let (updates, pending) = mpsc::unbounded_channel();
        let node_cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Arc::new(ShardTable {
            shards: Mutex::new(BTreeMap::new()),
            supervisor,
            grace,
            node_cpus,
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
                            shards.insert(
                                key.clone(),
                                ShardRecord {
                                    epoch: order.epoch,
                                    state: pb::ShardState::Starting,
                                    message: "starting".into(),
                                    order: order.clone(),
                                },
                            );
                            launch =
                                Some(Launch { order: order.clone(), grace: self.grace, node_cpus: self.node_cpus });
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
                        _ => {
                            shards.insert(
                                key.clone(),
                                ShardRecord {
                                    epoch: order.epoch,
                                    state: pb::ShardState::Stopped,
                                    message: "not running".into(),
                                    order: order.clone(),
                                },
                            );
                        }
                    },
                    pb::ShardAction::Unspecified => {}
                }
            }
        }
        if let Some(launch) = launch {
            self.supervisor.start(launch, self.clone());
        }
        if let Some(epoch) = stop {
            if !self.supervisor.stop(&order.job, order.shard, epoch) {
                self.report(&order.job, order.shard, epoch, pb::ShardState::Stopped, "not running".into());
            }
        }
        let shards = self.lock();
        let record = shards.get(&key);
        pb::ShardStatus {
            job: order.job.clone(),
            shard: order.shard,
            epoch: record.map(|r| r.epoch).unwrap_or(order.epoch),
            state: record.map(|r| r.state).unwrap_or(pb::ShardState::Stopped) as i32,
            message: if stale {
                "stale order ignored".into()
            } else {
                record.map(|r| r.message.clone()).unwrap_or_default()
            },
            gpu_indices: record.map(|r| r.order.gpu_indices.clone()).unwrap_or_default(),
        }
    }

    /// Every shard's status, for a (re)registration.
    pub fn statuses(&self) -> Vec<pb::ShardStatus> {
        self.lock()
            .iter()
            .map(|((job, shard), r)| pb::ShardStatus {
                job: job.clone(),
                shard: *shard,
                epoch: r.epoch,
                state: r.state as i32,
                message: r.message.clone(),
                gpu_indices: r.order.gpu_indices.clone(),
            })
            .collect()
    }
}

impl Report for ShardTable {
    fn report(&self, job: &str, shard: u32, epoch: u64, state: pb::ShardState, message: String) {
        let mut shards = self.lock();
        let Some(record) = shards.get_mut(&(job.to_owned(), shard)) else { return };
        if record.epoch != epoch {
            return; // A newer order replaced this run.
        }
        record.state = state;
        record.message = message.clone();
        let status = pb::ShardStatus {
            job: job.to_owned(),
            shard,
            epoch,
            state: state as i32,
            message,
            gpu_indices: record.order.gpu_indices.clone(),
        };
        let _ = self.updates.send(status);
    }
}
