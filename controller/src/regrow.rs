//! Growing elastic jobs back. A job running below its `shards.max` — shrunk when power fell, or
//! placed small because GPUs were short — is restarted at a larger size once free GPUs and the
//! power budget allow it.
//!
//! "Allow" is strict, so that growing never undoes what the power engine just did: with the
//! larger job the allocation must fit, pause and shrink nothing, and keep every job within its
//! flex. Since the allocator spends all the budget on caps before anything else, that means power
//! came back far enough for every job to run unslowed with room for more shards. Growth follows
//! the sources' ramps because admission counts only the power a source has ramped to.
//!
//! A resize costs the job a checkpoint and a restart, so a job grows straight to the largest size
//! that fits, at most once per `regrow_after`, and only when no job of equal or higher priority
//! is waiting for the GPUs it would take.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use crate::jobs::{JobRecord, JobState, JobTable};
use crate::power::curve::Curve;
use crate::power_control::{Admission, PowerState};
use crate::reconcile::Controller;
use crate::scheduler::{self, Node, RunningJob};

/// After an attempt that found no room, wait this long before trying again: an attempt runs the
/// scheduler and the allocator, which is not free on a large cluster.
const RETRY_AFTER_MS: i64 = 2_000;

impl Controller {
    /// The job to grow now, already at its new size and epoch, if any. `admission` is this pass's
    /// allocation of what runs; `nodes` what the scheduler may place on.
    pub(crate) fn regrow(
        &self,
        power: &PowerState,
        jobs: &JobTable,
        nodes: &[Node],
        admission: &Admission,
        now_ms: i64,
    ) -> Option<JobRecord> {
        let allocation = admission.allocation.as_ref()?;
        let settled = allocation.fits && allocation.jobs.iter().all(|j| j.within_flex);
        if !settled || now_ms < self.regrow_next_attempt_ms.load(Ordering::Relaxed) {
            return None;
        }
        let waiting_priority = jobs.iter().filter(|j| j.state == JobState::Pending).map(|j| j.spec.priority).max();
        let mut candidates: Vec<&JobRecord> = jobs
            .iter()
            .filter(|j| j.state == JobState::Running && (j.shards.len() as u32) < j.spec.shards.max)
            .filter(|j| waiting_priority.is_none_or(|p| p < j.spec.priority))
            .collect();
        candidates.sort_by(|a, b| b.spec.priority.cmp(&a.spec.priority).then(a.sequence.cmp(&b.sequence)));
        let regrow_after = self.settings.regrow_after.as_millis() as i64;
        let due = |j: &JobRecord| j.resized_unix_ms + regrow_after;
        // The next time a cooling-down job may grow: a pass is due then even if nothing else happens.
        let next_due = candidates.iter().map(|j| due(j)).filter(|&t| t > now_ms).min().unwrap_or(0);
        self.regrow_due_unix_ms.store(next_due, Ordering::Relaxed);
        let job = *candidates.iter().find(|j| due(j) <= now_ms)?;

        // A necessary condition, cheap: the headroom holds one more shard within the job's flex.
        let cap_now = allocation.jobs.iter().find(|a| a.name == job.spec.name)?.cap_watts;
        let idle = power.table.site().idle_gpu_watts;
        let one_shard =
            f64::from(job.spec.gpus_per_shard) * (Curve::default().cap_for_speed(1.0 - job.spec.flex, cap_now) - idle);
        if admission.budget_watts - allocation.total_watts < one_shard {
            return None;
        }

        let grown = self.try_grow(power, jobs, nodes, job);
        if grown.is_none() {
            self.regrow_next_attempt_ms.store(now_ms + RETRY_AFTER_MS, Ordering::Relaxed);
        }
        grown.map(|shards| {
            let mut record = job.clone();
            let from = record.shards.len();
            record.master_port = self.free_master_port(jobs, &shards[0].node, &record.spec.name);
            record.shards = shards;
            record.epoch += 1;
            record.state = JobState::Starting;
            record.resized_unix_ms = now_ms;
            record.message = format!("grown from {from} to {} shard(s): power and GPUs allow it", record.shards.len());
            record
        })
    }

    /// The largest placement of `job` above its current size that the GPUs and the budget hold
    /// with nothing else paused, shrunk or slowed beyond its flex.
    fn try_grow(
        &self,
        power: &PowerState,
        jobs: &JobTable,
        nodes: &[Node],
        job: &JobRecord,
    ) -> Option<Vec<scheduler::ShardAssignment>> {
        let current = job.shards.len() as u32;
        let others: Vec<RunningJob> = jobs
            .iter()
            .filter(|j| j.state.is_active() && j.spec.name != job.spec.name)
            .map(|j| RunningJob { request: j.request(), shards: j.shards.clone() })
            .collect();
        let mut request = job.request();
        request.shards.min = current + 1;
        let plan = scheduler::schedule(nodes, &others, &[request]);
        if !plan.preemptions.is_empty() {
            return None;
        }
        let placed = plan.starts.into_iter().find(|s| s.job == job.spec.name)?.shards;

        let me: HashSet<String> = HashSet::from([job.spec.name.clone()]);
        let holds = |n: usize| {
            let starting = [(job.spec.name.clone(), placed[..n].to_vec())];
            let admission = self.admit(power, jobs, &me, &starting);
            admission.allocation.is_some_and(|a| {
                a.fits
                    && a.jobs.iter().all(|j| {
                        let wanted =
                            if j.name == job.spec.name { n } else { jobs.get(&j.name).map_or(0, |r| r.shards.len()) };
                        j.within_flex && j.shards as usize == wanted
                    })
            })
        };
        // Largest n in [current + 1, placed] that holds: what holds at n holds below it.
        let (mut lo, mut hi) = (current as usize, placed.len());
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if holds(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        (lo > current as usize).then(|| placed[..lo].to_vec())
    }
}
