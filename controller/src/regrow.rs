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
//! is waiting for the GPUs it would take. Pure: [`crate::decide`] calls it with its view.

use crate::jobs::{JobRecord, JobState};
use crate::power::admission::{admit, Admission, PowerView, Run};
use crate::power::curve::Curve;
use crate::scheduler::{self, RunningJob, Schedulable, ShardAssignment};

/// After an attempt that found no room, wait this long before trying again: an attempt runs the
/// scheduler and the allocator, which is not free on a large cluster.
pub const RETRY_AFTER_MS: i64 = 2_000;

/// Growth's own clock: when it may next try.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegrowTimes {
    /// When a job cooling down after a resize may next grow (0: none is). A pass is due then even
    /// if nothing else happens.
    pub due_unix_ms: i64,
    /// No attempt before this, after one that found no room.
    pub next_attempt_unix_ms: i64,
}

/// What one look at growth decided.
#[derive(Debug, Clone, Default)]
pub struct Growth {
    /// The job to grow, at its new size and epoch (with `from` its size before).
    pub grown: Option<(JobRecord, usize)>,
    pub times: RegrowTimes,
}

/// The job to grow now, if any. `jobs` are the jobs as this pass decided them; `admission` this
/// pass's allocation of what runs; `nodes` what the scheduler may place on.
pub fn regrow<N: Schedulable>(
    power: &PowerView,
    jobs: &[&JobRecord],
    nodes: &[N],
    admission: &Admission,
    regrow_after_ms: i64,
    times: RegrowTimes,
    now_ms: i64,
) -> Growth {
    let mut growth = Growth { grown: None, times };
    let Some(allocation) = admission.allocation.as_ref() else { return growth };
    let settled = allocation.fits && allocation.jobs.iter().all(|j| j.within_flex);
    if !settled || now_ms < times.next_attempt_unix_ms {
        return growth;
    }
    let waiting_priority = jobs.iter().filter(|j| j.state == JobState::Pending).map(|j| j.spec.priority).max();
    let mut candidates: Vec<&JobRecord> = jobs
        .iter()
        .copied()
        .filter(|j| j.state == JobState::Running && j.stopping.is_none() && (j.shards.len() as u32) < j.spec.shards.max)
        .filter(|j| waiting_priority.is_none_or(|p| p < j.spec.priority))
        .collect();
    candidates.sort_by(|a, b| b.spec.priority.cmp(&a.spec.priority).then(a.sequence.cmp(&b.sequence)));
    let due = |j: &JobRecord| j.resized_unix_ms + regrow_after_ms;
    growth.times.due_unix_ms = candidates.iter().map(|j| due(j)).filter(|&t| t > now_ms).min().unwrap_or(0);
    let Some(job) = candidates.iter().copied().find(|j| due(j) <= now_ms) else { return growth };

    // A necessary condition, cheap: the headroom holds one more shard within the job's flex.
    let Some(cap_now) = allocation.jobs.iter().find(|a| a.name == job.spec.name).map(|a| a.cap_watts) else {
        return growth;
    };
    let idle = power.site.idle_gpu_watts;
    let curve: Curve = power.curves.get(&job.spec.name).map_or_else(Curve::default, |c| c.flex_curve);
    let one_shard = f64::from(job.spec.gpus_per_shard) * (curve.cap_for_speed(1.0 - job.spec.flex, cap_now) - idle);
    if admission.budget_watts - allocation.total_watts < one_shard {
        return growth;
    }

    match try_grow(power, jobs, nodes, job) {
        None => growth.times.next_attempt_unix_ms = now_ms + RETRY_AFTER_MS,
        Some(shards) => {
            let mut record = job.clone();
            let from = record.shards.len();
            record.master_port = crate::decide::free_master_port(jobs, &shards[0].node, &record.spec.name);
            record.shards = shards;
            record.epoch += 1;
            record.state = JobState::Starting;
            record.resized_unix_ms = now_ms;
            growth.grown = Some((record, from));
        }
    }
    growth
}

/// The largest placement of `job` above its current size that the GPUs and the budget hold with
/// nothing else paused, shrunk or slowed beyond its flex.
fn try_grow<N: Schedulable>(
    power: &PowerView,
    jobs: &[&JobRecord],
    nodes: &[N],
    job: &JobRecord,
) -> Option<Vec<ShardAssignment>> {
    let current = job.shards.len() as u32;
    let others: Vec<&JobRecord> =
        jobs.iter().copied().filter(|j| j.state.is_active() && j.spec.name != job.spec.name).collect();
    let running: Vec<RunningJob> = others
        .iter()
        .map(|j| RunningJob { request: j.request(), shards: j.shards.as_slice().into(), at: None })
        .collect();
    let mut request = job.request();
    request.shards.min = current + 1;
    let plan = scheduler::schedule(nodes, &running, &[request]);
    if !plan.preemptions.is_empty() {
        return None;
    }
    let placed = plan.starts.into_iter().find(|s| s.job == job.spec.name)?.shards;

    let sizes: std::collections::HashMap<&str, usize> =
        others.iter().map(|j| (j.spec.name.as_str(), j.shards.len())).collect();
    let holds = |n: usize| {
        let mut runs: Vec<Run> = others.iter().map(|j| Run::as_placed(j, None)).collect();
        runs.push(Run { job, shards: &placed[..n], at: None });
        let admission = admit(power, &runs);
        admission.allocation.is_some_and(|a| {
            a.fits
                && a.jobs.iter().all(|j| {
                    let wanted =
                        if j.name == job.spec.name { n } else { sizes.get(j.name.as_str()).copied().unwrap_or(0) };
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
