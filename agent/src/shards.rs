//! The shards this node has been ordered to run, keyed by (job, shard), with the order's epoch.
//!
//! Orders are idempotent by epoch: the same order twice changes nothing, an order older than the
//! newest one applied is ignored, and a stop names the epoch it stops. Running the worker
//! processes is the supervisor's job (next); for now an accepted start is reported as running.

use std::collections::BTreeMap;
use std::sync::Mutex;

use watt_proto::v1 as pb;

#[derive(Debug, Clone, PartialEq)]
pub struct ShardRecord {
    pub epoch: u64,
    pub state: pb::ShardState,
    pub order: pb::ShardOrder,
}

#[derive(Debug, Default)]
pub struct ShardTable {
    shards: Mutex<BTreeMap<(String, u32), ShardRecord>>,
}

impl ShardTable {
    /// Apply an order; returns the shard's status to report.
    pub fn apply(&self, order: &pb::ShardOrder) -> pb::ShardStatus {
        let key = (order.job.clone(), order.shard);
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let action = pb::ShardAction::try_from(order.action).unwrap_or_default();
        let current = shards.get(&key).cloned();
        let stale = current.as_ref().is_some_and(|c| order.epoch < c.epoch);
        if !stale {
            match action {
                pb::ShardAction::Start => {
                    let same =
                        current.as_ref().is_some_and(|c| c.epoch == order.epoch && c.state == pb::ShardState::Running);
                    if !same {
                        tracing::info!(job = %order.job, shard = order.shard, epoch = order.epoch, rank = order.rank,
                            world = order.world_size, gpus = ?order.gpu_indices, "Shard ordered to start.");
                        shards.insert(
                            key.clone(),
                            ShardRecord { epoch: order.epoch, state: pb::ShardState::Running, order: order.clone() },
                        );
                    }
                }
                pb::ShardAction::Stop => {
                    if let Some(record) = shards.get_mut(&key) {
                        if record.state != pb::ShardState::Stopped {
                            tracing::info!(job = %order.job, shard = order.shard, epoch = order.epoch, "Shard ordered to stop.");
                        }
                        record.state = pb::ShardState::Stopped;
                        record.epoch = order.epoch;
                    } else {
                        shards.insert(
                            key.clone(),
                            ShardRecord { epoch: order.epoch, state: pb::ShardState::Stopped, order: order.clone() },
                        );
                    }
                }
                pb::ShardAction::Unspecified => {}
            }
        }
        let record = shards.get(&key);
        pb::ShardStatus {
            job: order.job.clone(),
            shard: order.shard,
            epoch: record.map(|r| r.epoch).unwrap_or(order.epoch),
            state: record.map(|r| r.state).unwrap_or(pb::ShardState::Stopped) as i32,
            message: if stale { "stale order ignored".into() } else { String::new() },
            gpu_indices: record.map(|r| r.order.gpu_indices.clone()).unwrap_or_default(),
        }
    }

    /// Every shard's status, for a (re)registration.
    pub fn statuses(&self) -> Vec<pb::ShardStatus> {
        let shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        shards
            .iter()
            .map(|((job, shard), r)| pb::ShardStatus {
                job: job.clone(),
                shard: *shard,
                epoch: r.epoch,
                state: r.state as i32,
                message: String::new(),
                gpu_indices: r.order.gpu_indices.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(epoch: u64, action: pb::ShardAction) -> pb::ShardOrder {
        pb::ShardOrder { epoch, job: "j".into(), shard: 0, action: action as i32, ..Default::default() }
    }

    #[test]
    fn orders_are_idempotent_and_stale_ones_ignored() {
        let table = ShardTable::default();
        let s = table.apply(&order(2, pb::ShardAction::Start));
        assert_eq!((s.epoch, s.state), (2, pb::ShardState::Running as i32));
        assert_eq!(table.apply(&order(2, pb::ShardAction::Start)), s, "same order twice: same answer");
        let stale = table.apply(&order(1, pb::ShardAction::Stop));
        assert_eq!(
            (stale.epoch, stale.state),
            (2, pb::ShardState::Running as i32),
            "an older stop does not stop a newer start"
        );
        let stopped = table.apply(&order(2, pb::ShardAction::Stop));
        assert_eq!(stopped.state, pb::ShardState::Stopped as i32);
        let restarted = table.apply(&order(3, pb::ShardAction::Start));
        assert_eq!((restarted.epoch, restarted.state), (3, pb::ShardState::Running as i32));
        assert_eq!(table.statuses().len(), 1);
    }
}
