//! Every job decision of a reconcile pass, in one pure function: [`decide`]`(view, now) ->`
//! [`Decisions`]. Where a job is placed, preempted, paused, shrunk, grown, failed or finished, and
//! why, is decided here and nowhere else.
//!
//! The [`View`] is a plain snapshot the shell (`reconcile.rs`) gathers under its locks: the jobs
//! not ended, the nodes with their leases, what each shard's node reported of it, and the power
//! budget's inputs. `decide` reads no clock, no store and no lock: time comes in as [`Now`], so
//! every time-dependent branch (a lease running out, a resize cool-down) is a unit test.
//!
//! The decisions come in two stages, stored in order: `settle` (nodes whose lease ran out, shard
//! reports) and `place` (preemptions, power pauses and shrinks, starts, waiting reasons, growth),
//! which was decided on top of `settle`, so the shell stores it only once `settle` is wholly
//! stored. Within `place`, preemptions come before the starts that stand on their GPUs. Each
//! change carries a typed [`Reason`], rendered to the job's message only where it is stored.

use std::collections::{HashMap, HashSet};
use std::fmt;

use watt_proto::v1 as pb;

use crate::jobs::{Hold, JobRecord, JobState, ShardOutcome, StopThen, Stopping};
use crate::power::admission::{admit, Admission, PowerView, Run};
use crate::regrow::{regrow, RegrowTimes};
use crate::scheduler::Preemption;
use crate::scheduler::{self, RunningJob, Schedulable, ShardAssignment, WaitReason};
use crate::{NameMap, NameSet};

/// Rendezvous ports handed to jobs' rank 0, as torchrun's default 29500 and up.
const MASTER_PORTS: std::ops::Range<u16> = 29_500..30_500;

/// The time a decision is made at: monotonic milliseconds for leases (see [`crate::clock`]),
/// wall milliseconds for what is stored (resizes, when a run ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono_ms: i64,
    pub wall_ms: i64,
}

/// A node as decisions see it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    /// When it was last heard from, on the monotonic clock.
    pub last_seen_ms: i64,
    /// It holds a session now.
    pub connected: bool,
    /// An earlier pass already declared it lost.
    pub marked_lost: bool,
    /// Its GPUs' indices.
    pub gpus: Vec<u32>,
    /// The training runtimes its agent offers.
    pub runtimes: Vec<String>,
}

impl NodeView {
    pub fn state(&self, now_ms: i64, lease_ms: i64) -> crate::registry::NodeState {
        use crate::registry::NodeState;
        if self.marked_lost || now_ms - self.last_seen_ms > lease_ms {
            NodeState::Lost
        } else if self.connected {
            NodeState::Ready
        } else {
            NodeState::Disconnected
        }
    }
}

/// A node as the scheduler sees it in one pass: every node of the view, at its position there
/// (so the shell's positions hold), offering its GPUs only while it is ready.
#[derive(Debug, Clone, Copy)]
struct Offer<'a> {
    node: &'a NodeView,
    ready: bool,
}

impl Schedulable for Offer<'_> {
    fn name(&self) -> &str {
        &self.node.name
    }
    fn gpus(&self) -> &[u32] {
        if self.ready {
            &self.node.gpus
        } else {
            &[]
        }
    }
    fn offers(&self, runtime: &str) -> bool {
        self.node.runtimes.iter().any(|r| r == runtime)
    }
}

/// What the node a shard is placed on last reported of it.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardReport {
    pub epoch: u64,
    pub state: pb::ShardState,
    /// The full status (exit code, signal, restarts), kept in the job's last run when it ends.
    pub status: Option<pb::ShardStatus>,
}

/// Everything [`decide`] reads.
#[derive(Debug, Clone)]
pub struct View<'a> {
    /// Every job not ended (pending or active), in any order: `decide` orders them by name.
    pub jobs: Vec<&'a JobRecord>,
    /// Every node the controller knows, in name order.
    pub nodes: &'a [NodeView],
    /// Per active job, per shard: what its node reported of it.
    pub reports: &'a HashMap<String, Vec<Option<ShardReport>>>,
    /// Per active job, where each shard's node is in `nodes` (the same position as in `power`),
    /// kept by the shell with the reports, so a pass looks up by name only the jobs that moved.
    /// A job missing here, or a `None`, is looked up by name.
    pub placed_at: &'a HashMap<String, Vec<Option<usize>>>,
    pub power: &'a PowerView,
    /// A node not heard from for longer is lost.
    pub lease_ms: i64,
    /// A job is resized at most once this often (see [`crate::regrow`]).
    pub regrow_after_ms: i64,
    pub regrow: RegrowTimes,
}

/// Why a job changed: rendered into its message where it is stored, never parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A node it ran on was lost: back to waiting.
    NodeLost {
        node: String,
    },
    /// A shard failed (`end`: how its process ended, when known).
    ShardFailed {
        shard: usize,
        node: String,
        end: Option<String>,
    },
    /// Every shard finished.
    Finished,
    /// Every shard is running.
    Running {
        shards: usize,
    },
    Preempted {
        by: String,
    },
    /// The budget cannot hold it at its minimum cap: off its GPUs until power returns.
    PowerPaused,
    /// The budget cannot hold all its shards.
    Shrunk {
        to: u32,
    },
    Placed {
        summary: String,
    },
    /// GPUs are free but the budget cannot hold it at its minimum cap.
    PowerWaiting,
    /// Its start would raise counted power by `step_watts` at once, more than the site's ramp
    /// limit allows now (`per_second_watts` in a quiet second).
    RampWaiting {
        step_watts: u64,
        per_second_watts: u64,
    },
    Grown {
        from: usize,
        to: usize,
    },
    /// The scheduler's reason.
    Waiting(WaitReason),
    Cancelled,
    /// A decrease Watt chose (`then`: a preemption, a pause or a shrink) waits while the job's
    /// caps come down along the site's ramp-down, over `ms`.
    RampingDown {
        ms: u64,
        then: Box<Reason>,
    },
    /// A start waits while `job`'s caps come down to make room.
    RampDownWaiting {
        job: String,
    },
    /// The room a ramp-down was making is no longer needed: the job stays, its caps rise again.
    RampDownCalledOff,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NodeLost { node } => write!(f, "node {node} was lost; waiting to be rescheduled"),
            Reason::ShardFailed { shard, node, end: Some(end) } => write!(f, "shard {shard} on {node} {end}"),
            Reason::ShardFailed { shard, node, end: None } => write!(f, "shard {shard} on {node} failed"),
            Reason::Finished => f.write_str("every shard finished"),
            Reason::Running { shards } => write!(f, "running {shards} shard(s)"),
            Reason::Preempted { by } => write!(f, "preempted by higher-priority job {by}"),
            Reason::PowerPaused => f.write_str("paused: the power budget cannot hold it at its minimum cap"),
            Reason::Shrunk { to } => write!(f, "shrunk to {to} shard(s): the power budget cannot hold more"),
            Reason::Placed { summary } => write!(f, "placed: {summary}"),
            Reason::PowerWaiting => f.write_str("waiting for power: the budget cannot hold it at its minimum cap"),
            Reason::RampWaiting { step_watts, per_second_watts } if step_watts > per_second_watts => write!(
                f,
                "waiting: its start alone raises counted power by {step_watts} W at once, more than the site's ramp limit allows in a second ({per_second_watts} W); raise ramp_up or make the job smaller"
            ),
            Reason::RampWaiting { step_watts, .. } => {
                write!(f, "waiting for the site's ramp limit: its start raises counted power by {step_watts} W")
            }
            Reason::Grown { from, to } => write!(f, "grown from {from} to {to} shard(s): power and GPUs allow it"),
            Reason::Waiting(why) => why.fmt(f),
            Reason::Cancelled => f.write_str("cancelled"),
            Reason::RampingDown { ms, then } => write!(
                f,
                "making room: its caps come down along the site's ramp-down over {:.1} s, then it is {then}",
                *ms as f64 / 1_000.0
            ),
            Reason::RampDownWaiting { job } => {
                write!(f, "waiting while job {job}'s caps come down along the site's ramp-down to make room")
            }
            Reason::RampDownCalledOff => {
                f.write_str("running on: the room its ramp-down was making is no longer needed")
            }
        }
    }
}

impl Reason {
    /// The text of the event that announces it.
    pub fn event_text(&self) -> String {
        match self {
            Reason::Preempted { by } => format!("by {by}"),
            Reason::PowerPaused => "the power budget cannot hold it".into(),
            Reason::Placed { summary } => summary.clone(),
            other => other.to_string(),
        }
    }
}

/// What a stored change announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEvent {
    /// Its node was lost: back to waiting.
    Rescheduling,
    Preempted,
    /// Off its GPUs for lack of power.
    Paused,
    Shrunk,
    Placed,
    Grown,
    /// Its caps began coming down along the site's ramp-down, to make room.
    RampingDown,
    /// Its shards' reports moved it to this state.
    Reached(JobState),
}

impl JobEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            JobEvent::Rescheduling => "rescheduling",
            JobEvent::Preempted => "preempted",
            JobEvent::Paused => "paused",
            JobEvent::Shrunk => "shrunk",
            JobEvent::Placed => "placed",
            JobEvent::Grown => "grown",
            JobEvent::RampingDown => "ramping-down",
            JobEvent::Reached(state) => state.as_str(),
        }
    }
}

/// One decided change to a job: its next record, the event it announces once stored (none for a
/// changed waiting reason), and why.
#[derive(Debug, Clone)]
pub struct JobChange {
    pub record: JobRecord,
    pub event: Option<JobEvent>,
    pub reason: Reason,
}

/// What one pass decided.
#[derive(Debug, Default)]
pub struct Decisions {
    /// Nodes whose lease ran out since the last pass.
    pub newly_lost: Vec<String>,
    /// Jobs off lost nodes, and jobs moved along by their shards' reports.
    pub settle: Vec<JobChange>,
    /// Decided on top of `settle`: preemptions, then power pauses and shrinks, then starts, then
    /// changed waiting reasons; or, when nothing else changed, one job grown.
    pub place: Vec<JobChange>,
    /// The budget over what runs once `place` is stored: the caps the power half moves toward.
    pub admission: Admission,
    /// When growth may next be tried.
    pub regrow: RegrowTimes,
    /// The scheduler placed nothing and the budget took nothing away.
    pub scheduler_idle: bool,
}

/// The jobs as this pass has decided them so far: the view's, with this pass's changes over them.
struct Jobs<'a> {
    order: &'a [&'a JobRecord],
    changed: NameMap<String, JobRecord>,
}

impl<'a> Jobs<'a> {
    fn get(&self, name: &str) -> Option<&JobRecord> {
        self.changed.get(name).or_else(|| {
            let i = self.order.binary_search_by(|j| j.spec.name.as_str().cmp(name)).ok()?;
            Some(self.order[i])
        })
    }

    fn iter(&self) -> impl Iterator<Item = &JobRecord> + '_ {
        self.order.iter().map(|j| self.changed.get(&j.spec.name).unwrap_or(j))
    }

    fn set(&mut self, record: JobRecord) {
        self.changed.insert(record.spec.name.clone(), record);
    }
}

/// Every job decision of one pass (see the module header).
pub fn decide(view: &View, now: Now) -> Decisions {
    let mut jobs_sorted: Vec<&JobRecord> = view.jobs.clone();
    jobs_sorted.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    let mut jobs = Jobs { order: &jobs_sorted, changed: NameMap::default() };

    // 1. Nodes whose lease ran out: every job with a shard on one goes back to waiting (all its
    // shards: gang). The others move along by what their shards reported.
    let lost: NameSet<&str> = view
        .nodes
        .iter()
        .filter(|n| n.state(now.mono_ms, view.lease_ms) == crate::registry::NodeState::Lost)
        .map(|n| n.name.as_str())
        .collect();
    let newly_lost: Vec<String> = view
        .nodes
        .iter()
        .filter(|n| !n.marked_lost && lost.contains(n.name.as_str()))
        .map(|n| n.name.clone())
        .collect();
    let mut settle = Vec::new();
    for job in jobs.iter().filter(|j| j.state.is_active()) {
        let on_lost = if lost.is_empty() { None } else { job.shards.iter().find(|s| lost.contains(s.node.as_str())) };
        if let Some(shard) = on_lost {
            let mut record = job.clone();
            unplace(&mut record, Some(Hold::NodeLost), view, now);
            settle.push(JobChange {
                record,
                event: Some(JobEvent::Rescheduling),
                reason: Reason::NodeLost { node: shard.node.clone() },
            });
        } else if let Some((record, reason)) = advance(job, view, now) {
            settle.push(JobChange { event: Some(JobEvent::Reached(record.state)), record, reason });
        } else if job.stopping.is_some_and(|s| s.then == StopThen::Cancel && now.wall_ms >= s.until_unix_ms) {
            // Its caps came down along the site's ramp-down: now its shards stop.
            let mut record = job.clone();
            unplace(&mut record, None, view, now);
            record.state = JobState::Cancelled;
            record.stopping = None;
            settle.push(JobChange {
                record,
                event: Some(JobEvent::Reached(JobState::Cancelled)),
                reason: Reason::Cancelled,
            });
        }
    }
    for change in &settle {
        jobs.set(change.record.clone());
    }

    // 2. Schedule what waits onto the ready nodes.
    let offers: Vec<Offer> = view
        .nodes
        .iter()
        .map(|node| Offer { node, ready: node.state(now.mono_ms, view.lease_ms) == crate::registry::NodeState::Ready })
        .collect();
    let at = |j: &JobRecord| view.placed_at.get(&j.spec.name).map(Vec::as_slice);
    let running: Vec<RunningJob> = jobs
        .iter()
        .filter(|j| j.state.is_active())
        .map(|j| RunningJob { request: j.request(), shards: j.shards.as_slice().into(), at: at(j) })
        .collect();
    let pending: Vec<_> = jobs.iter().filter(|j| j.state == JobState::Pending).map(JobRecord::request).collect();
    let plan = scheduler::schedule(&offers, &running, &pending);

    // 3. Power admission over what would run: new starts the budget cannot hold wait, running
    // jobs it cannot hold shrink or pause.
    let preempted: NameSet<&str> = plan.preemptions.iter().map(|p| p.job.as_str()).collect();
    let admission = {
        let mut runs: Vec<Run> = jobs
            .iter()
            .filter(|j| j.state.is_active() && !preempted.contains(j.spec.name.as_str()))
            .map(|j| Run::as_placed(j, at(j)))
            .collect();
        runs.extend(
            plan.starts.iter().filter_map(|s| Some(Run { job: jobs.get(&s.job)?, shards: &s.shards, at: None })),
        );
        admit(view.power, &runs)
    };
    let verdict: NameMap<&str, (bool, u32)> = admission
        .allocation
        .as_ref()
        .map(|a| a.jobs.iter().map(|j| (j.name.as_str(), (j.paused, j.shards))).collect())
        .unwrap_or_default();

    // 4. Decreases Watt chose rather than had to come down along the site's ramp-down first
    // (invariant 12): while one does, its job keeps its GPUs and nothing starts.
    let power_decreased: Vec<&JobRecord> = jobs
        .iter()
        .filter(|j| j.state.is_active() && !preempted.contains(j.spec.name.as_str()))
        .filter(|j| {
            verdict.get(j.spec.name.as_str()).is_some_and(|&(paused, keep)| paused || (keep as usize) < j.shards.len())
        })
        .collect();
    let room = make_room(&jobs, view, now, &plan.preemptions, &power_decreased, &verdict);
    let making_room = !room.later.is_empty();
    // The decreases that happen now: this pass's, or, while room is being made (no start), those
    // the budget of what runs makes regardless and those whose ramp is done.
    // (Every pass reads the verdict itself: only a pass making room builds another map.)
    let merged: NameMap<&str, (bool, u32)>;
    let decrease: &NameMap<&str, (bool, u32)> = match &room.without_starts {
        Some(now_verdict) if making_room => {
            let mut decrease: NameMap<&str, (bool, u32)> = now_verdict.clone();
            for j in &power_decreased {
                let name = j.spec.name.as_str();
                if !decrease.contains_key(name) && !room.later.contains(name) {
                    decrease.insert(name, verdict[name]);
                }
            }
            merged = decrease;
            &merged
        }
        _ => &verdict,
    };

    // 5. In one ordered batch: preemptions first (their GPUs are what starts stand on), then
    // power pauses and shrinks, then ramp-downs begun and called off, then starts, then changed
    // waiting reasons.
    let mut place = Vec::new();
    for p in plan.preemptions.iter().filter(|p| !room.later.contains(p.job.as_str())) {
        let Some(mut record) = jobs.get(&p.job).cloned() else { continue };
        unplace(&mut record, Some(Hold::Preempted), view, now);
        record.preemptions += 1;
        place.push(JobChange {
            record,
            event: Some(JobEvent::Preempted),
            reason: Reason::Preempted { by: p.by.clone() },
        });
    }
    for job in jobs.iter().filter(|j| j.state.is_active() && !preempted.contains(j.spec.name.as_str())) {
        if room.later.contains(job.spec.name.as_str()) {
            continue;
        }
        match decrease.get(job.spec.name.as_str()) {
            Some(&(true, _)) => {
                let mut record = job.clone();
                unplace(&mut record, Some(Hold::PowerPaused), view, now);
                place.push(JobChange { record, event: Some(JobEvent::Paused), reason: Reason::PowerPaused });
            }
            Some(&(false, keep)) if (keep as usize) < job.shards.len() => {
                let mut record = job.clone();
                record.shards.truncate(keep as usize);
                record.epoch += 1;
                record.resized_unix_ms = now.wall_ms;
                record.state = JobState::Starting;
                place.push(JobChange { record, event: Some(JobEvent::Shrunk), reason: Reason::Shrunk { to: keep } });
            }
            _ => {}
        }
    }
    place.extend(room.begun);
    // A ramp-down making room no decrease wants any more is called off: the job runs on.
    let wanted: NameSet<&str> =
        preempted.iter().copied().chain(power_decreased.iter().map(|j| j.spec.name.as_str())).collect();
    for job in jobs.iter().filter(|j| j.state.is_active() && !wanted.contains(j.spec.name.as_str())) {
        if job.stopping.is_some_and(|s| s.then == StopThen::MakeRoom) {
            let mut record = job.clone();
            record.stopping = None;
            place.push(JobChange { record, event: None, reason: Reason::RampDownCalledOff });
        }
    }
    // Nothing started, stopped, paused or shrunk: a shrunk job may grow back.
    let quiet = place.is_empty() && plan.starts.is_empty() && !making_room;
    let mut ports: NameMap<&str, HashSet<u16>> = NameMap::default();
    for job in jobs.iter().filter(|j| j.state.is_active()) {
        if let Some(first) = job.shards.first() {
            ports.entry(first.node.as_str()).or_default().insert(job.master_port);
        }
    }
    // What the site's ramp limit lets starts add at once this pass.
    let mut ramp_room = view.power.ramp.now_watts;
    for start in &plan.starts {
        let Some(mut record) = jobs.get(&start.job).cloned() else { continue };
        if let Some(job) = room.later.iter().min() {
            let reason = Reason::RampDownWaiting { job: job.clone() };
            if record.hold != Some(Hold::RampDownWaiting) || record.message != reason.to_string() {
                record.hold = Some(Hold::RampDownWaiting);
                place.push(JobChange { record, event: None, reason });
            }
            continue;
        }
        let mut shards = start.shards.clone();
        match verdict.get(start.job.as_str()) {
            Some(&(true, _)) => {
                if record.hold != Some(Hold::PowerWaiting) {
                    record.hold = Some(Hold::PowerWaiting);
                    place.push(JobChange { record, event: None, reason: Reason::PowerWaiting });
                }
                continue;
            }
            Some(&(false, keep)) => shards.truncate(keep as usize),
            None => {}
        }
        let step = view.power.start_step_watts(&shards);
        if step > ramp_room {
            let reason = Reason::RampWaiting {
                step_watts: step.round() as u64,
                per_second_watts: view.power.ramp.per_second_watts.round() as u64,
            };
            if record.hold != Some(Hold::RampWaiting) || record.message != reason.to_string() {
                record.hold = Some(Hold::RampWaiting);
                place.push(JobChange { record, event: None, reason });
            }
            continue;
        }
        ramp_room -= step;
        let used = ports.entry(start.shards[0].node.as_str()).or_default();
        record.master_port = pick_master_port(used);
        used.insert(record.master_port);
        record.state = JobState::Starting;
        record.epoch += 1;
        record.resized_unix_ms = now.wall_ms;
        let summary = placement_summary(&shards);
        record.shards = shards;
        record.hold = None;
        place.push(JobChange { record, event: Some(JobEvent::Placed), reason: Reason::Placed { summary } });
    }
    for waiting in &plan.waiting {
        let Some(record) = jobs.get(&waiting.job) else { continue };
        // A reason of its own (preempted, node lost, power) stands over the scheduler's.
        let reason = Reason::Waiting(waiting.reason.clone());
        if record.hold.is_none() && record.message != reason.to_string() {
            place.push(JobChange { record: record.clone(), event: None, reason });
        }
    }

    // While room is being made nothing starts: the caps are for what runs once this batch is
    // stored, the jobs ramping down at their caps on the ramp.
    let admission = if making_room {
        let changed: NameMap<&str, &JobRecord> =
            place.iter().map(|c| (c.record.spec.name.as_str(), &c.record)).collect();
        let runs: Vec<Run> = jobs
            .iter()
            .map(|j| match changed.get(j.spec.name.as_str()) {
                Some(record) => Run::as_placed(record, None),
                None => Run::as_placed(j, at(j)),
            })
            .filter(|run| run.job.state.is_active())
            .collect();
        admit(view.power, &runs)
    } else {
        admission
    };

    // 6. Growth of a job below its size, when everything else is settled.
    let mut decisions = Decisions { newly_lost, settle, place, admission, regrow: view.regrow, scheduler_idle: quiet };
    if quiet {
        let current: Vec<&JobRecord> = jobs.iter().collect();
        let growth =
            regrow(view.power, &current, &offers, &decisions.admission, view.regrow_after_ms, view.regrow, now.wall_ms);
        decisions.regrow = growth.times;
        if let Some((record, from)) = growth.grown {
            let to = record.shards.len();
            let runs: Vec<Run> = current
                .iter()
                .map(|j| if j.spec.name == record.spec.name { (&record, None) } else { (*j, at(j)) })
                .filter(|(j, _)| j.state.is_active())
                .map(|(j, at)| Run::as_placed(j, at))
                .collect();
            decisions.admission = admit(view.power, &runs);
            decisions.place.push(JobChange {
                record,
                event: Some(JobEvent::Grown),
                reason: Reason::Grown { from, to },
            });
        }
    }
    for change in decisions.settle.iter_mut().chain(decisions.place.iter_mut()) {
        match change.record.stopping.map(|s| s.then) {
            // A cancelled job ramping down that anything else takes off its GPUs (a lost node, a
            // preemption, a pause for power) is cancelled: it never waits to run again.
            Some(StopThen::Cancel) if !change.record.state.is_active() => {
                change.record.state = JobState::Cancelled;
                change.record.stopping = None;
                change.record.hold = None;
                change.event = Some(JobEvent::Reached(JobState::Cancelled));
                change.reason = Reason::Cancelled;
            }
            // The room is made (or it went off its GPUs anyway): the ramp is over.
            Some(StopThen::MakeRoom) if !change.record.state.is_active() || change.event == Some(JobEvent::Shrunk) => {
                change.record.stopping = None;
            }
            _ => {}
        }
    }
    decisions
}

/// What the site's ramp-down makes of a pass's decreases.
struct Room<'a> {
    /// Jobs whose decrease waits while their caps come down (by name).
    later: NameSet<String>,
    /// Ramp-downs begun this pass.
    begun: Vec<JobChange>,
    /// The pauses and shrinks of a pass with no start (the budget of what runs now): those
    /// happen whatever Watt chooses. Worked out only when a decrease could be chosen.
    without_starts: Option<NameMap<&'a str, (bool, u32)>>,
}

/// Which of a pass's decreases — `preemptions`, and `power_decreased`, the running jobs the
/// budget (`verdict`) pauses or shrinks — Watt chose rather than had to, and so first come down
/// along the site's ramp-down (invariant 12). A preemption is always chosen; a pause or shrink
/// is chosen when the budget of what runs now, without this pass's starts, would not make it (a
/// source cut is never slowed). A chosen decrease happens at once when its ramp is done, would
/// take under [`crate::jobs::SHORTEST_RAMP_DOWN_MS`], or the site sets no ramp-down. Each ramp
/// starts when the ones under way end, so that together they keep the site's rate.
fn make_room<'a>(
    jobs: &'a Jobs,
    view: &View,
    now: Now,
    preemptions: &[Preemption],
    power_decreased: &[&JobRecord],
    verdict: &NameMap<&str, (bool, u32)>,
) -> Room<'a> {
    let mut room = Room { later: NameSet::default(), begun: Vec::new(), without_starts: None };
    let Some(rate) = view.power.site.ramp_down_watts_per_second.filter(|r| *r > 0.0) else { return room };
    if preemptions.is_empty() && power_decreased.is_empty() {
        return room;
    }
    let at = |j: &JobRecord| view.placed_at.get(&j.spec.name).map(Vec::as_slice);
    let runs: Vec<Run> = jobs.iter().filter(|j| j.state.is_active()).map(|j| Run::as_placed(j, at(j))).collect();
    let budget = admit(view.power, &runs);
    let allocated: NameMap<&str, &crate::power::allocator::JobAllocation> =
        budget.allocation.iter().flat_map(|a| &a.jobs).map(|j| (j.name.as_str(), j)).collect();
    let forced = |j: &JobRecord| {
        allocated.get(j.spec.name.as_str()).is_some_and(|a| a.paused || (a.shards as usize) < j.shards.len())
    };
    let mut starts_at = crate::jobs::ramp_downs_end(jobs.iter(), now.wall_ms);
    let chosen = preemptions.iter().map(|p| (p.job.as_str(), Reason::Preempted { by: p.by.clone() })).chain(
        power_decreased.iter().map(|j| {
            let name = j.spec.name.as_str();
            match verdict.get(name) {
                Some(&(false, keep)) => (name, Reason::Shrunk { to: keep }),
                _ => (name, Reason::PowerPaused),
            }
        }),
    );
    for (name, then) in chosen {
        let Some(job) = jobs.get(name) else { continue };
        if forced(job) {
            continue;
        }
        if let Some(stopping) = job.stopping {
            if now.wall_ms < stopping.until_unix_ms {
                room.later.insert(name.to_string());
            }
            continue;
        }
        let from = allocated.get(name).map(|a| a.cap_watts);
        let floor = view.power.floor_watts(&job.shards);
        let gpus = job.shards.iter().map(|s| s.gpus.len()).sum();
        let Some(stopping) = from
            .zip(floor)
            .and_then(|(from, floor)| Stopping::along(rate, gpus, from, floor, starts_at, StopThen::MakeRoom))
        else {
            continue;
        };
        starts_at = stopping.until_unix_ms;
        let mut record = job.clone();
        record.stopping = Some(stopping);
        let ms = (stopping.until_unix_ms - now.wall_ms).max(0) as u64;
        room.later.insert(name.to_string());
        room.begun.push(JobChange {
            record,
            event: Some(JobEvent::RampingDown),
            reason: Reason::RampingDown { ms, then: Box::new(then) },
        });
    }
    room.without_starts = Some(
        allocated
            .iter()
            .filter_map(|(name, a)| {
                let job = jobs.get(name)?;
                forced(job).then_some((job.spec.name.as_str(), (a.paused, a.shards)))
            })
            .collect(),
    );
    room
}

/// The next state of an active job from its shards' reports, if it changes. The record is
/// copied only then: every pass asks this of every active job.
fn advance(job: &JobRecord, view: &View, now: Now) -> Option<(JobRecord, Reason)> {
    let reports = view.reports.get(&job.spec.name);
    let state = |i: usize| reported(reports, job, i);
    let all = |want: pb::ShardState| (0..job.shards.len()).all(|i| state(i) == Some(want));
    if let Some(i) = (0..job.shards.len()).find(|&i| state(i) == Some(pb::ShardState::Failed)) {
        let mut next = job.clone();
        unplace(&mut next, None, view, now);
        next.state = JobState::Failed;
        let end = next.last_run.get(i).map(describe_end).filter(|w| !w.is_empty());
        Some((next, Reason::ShardFailed { shard: i, node: job.shards[i].node.clone(), end }))
    } else if all(pb::ShardState::Succeeded) {
        let mut next = job.clone();
        unplace(&mut next, None, view, now);
        next.state = JobState::Succeeded;
        Some((next, Reason::Finished))
    } else if job.state == JobState::Starting && all(pb::ShardState::Running) {
        let mut next = job.clone();
        next.state = JobState::Running;
        Some((next, Reason::Running { shards: job.shards.len() }))
    } else {
        None
    }
}

/// What the node running shard `i` of `job` last reported of it (`reports`: the job's) at the
/// job's current epoch.
fn reported(reports: Option<&Vec<Option<ShardReport>>>, job: &JobRecord, i: usize) -> Option<pb::ShardState> {
    let report = reports?.get(i)?.as_ref()?;
    (report.epoch == job.epoch).then_some(report.state)
}

/// Take `record` off its GPUs, keeping where it ran and how each shard ended.
fn unplace(record: &mut JobRecord, hold: Option<Hold>, view: &View, now: Now) {
    let reports = view.reports.get(&record.spec.name);
    record.unplace(hold, now.wall_ms, &|_node, shard| reports?.get(shard as usize)?.as_ref()?.status.clone());
}

/// "exited 3 after 1 restart", else the agent's words, or "" when nothing is known.
fn describe_end(o: &ShardOutcome) -> String {
    watt_common::shard_end::describe(o.exit_code, o.signal, o.restarts).unwrap_or_else(|| o.message.clone())
}

/// The first rendezvous port not in `used` (rank 0 of other jobs on the same node). A node runs
/// at most as many jobs as it has GPUs, far fewer than the range holds.
pub fn pick_master_port(used: &HashSet<u16>) -> u16 {
    MASTER_PORTS.clone().find(|p| !used.contains(p)).unwrap_or(MASTER_PORTS.start)
}

/// A rendezvous port on `node` that no other active job's rank 0 there uses.
pub fn free_master_port(jobs: &[&JobRecord], node: &str, except: &str) -> u16 {
    let used: HashSet<u16> = jobs
        .iter()
        .filter(|j| j.state.is_active() && j.spec.name != except && j.shards.first().is_some_and(|s| s.node == node))
        .map(|j| j.master_port)
        .collect();
    pick_master_port(&used)
}

/// "4 shards on gpu-a×2, gpu-b×2" — short enough for an event line.
fn placement_summary(shards: &[ShardAssignment]) -> String {
    let mut per_node: Vec<(&str, usize)> = Vec::new();
    for s in shards {
        match per_node.iter_mut().find(|(n, _)| *n == s.node) {
            Some((_, count)) => *count += 1,
            None => per_node.push((&s.node, 1)),
        }
    }
    let nodes: Vec<String> = per_node.iter().take(8).map(|(n, c)| format!("{n}×{c}")).collect();
    let more = if per_node.len() > 8 { format!(" and {} more nodes", per_node.len() - 8) } else { String::new() };
    format!("{} shard(s) on {}{more}", shards.len(), nodes.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::planner::{GpuCap, GpuWork, NodeCaps};
    use crate::power::Site;
    use crate::spec::{JobSpec, ShardRange};

    const LEASE_MS: i64 = 10_000;
    const REGROW_AFTER_MS: i64 = 30_000;

    fn record(name: &str, priority: i64, shards: (u32, u32), state: JobState, placed: &[&str]) -> JobRecord {
        let spec = JobSpec {
            name: name.into(),
            priority,
            shards: ShardRange { min: shards.0, max: shards.1 },
            gpus_per_shard: 8,
            command: vec!["train".into()],
            env: Default::default(),
            workdir: None,
            checkpoint_dir: None,
            flex: 0.0,
            max_restarts: 0,
            stop_grace_ms: 1_000,
            runtime: None,
        };
        JobRecord {
            state,
            epoch: u64::from(!placed.is_empty()),
            shards: placed.iter().map(|n| ShardAssignment { node: (*n).into(), gpus: (0..8).collect() }).collect(),
            master_port: if placed.is_empty() { 0 } else { 29_500 },
            ..JobRecord::new_for_tests(spec)
        }
    }

    /// A cluster of 8-GPU nodes (200–700 W each GPU), all heard from at time 0.
    struct Cluster {
        jobs: Vec<JobRecord>,
        nodes: Vec<NodeView>,
        reports: HashMap<String, Vec<Option<ShardReport>>>,
        placed_at: HashMap<String, Vec<Option<usize>>>,
        /// Per node, what each of its GPUs draws (0 W when not listed).
        drawing: HashMap<String, f64>,
        available_watts: f64,
        regrow: RegrowTimes,
        ramp: crate::power::admission::RampRoom,
        site: Site,
    }

    impl Cluster {
        fn new(nodes: &[&str]) -> Self {
            Cluster {
                jobs: Vec::new(),
                nodes: nodes
                    .iter()
                    .map(|n| NodeView {
                        name: (*n).into(),
                        last_seen_ms: 0,
                        connected: true,
                        marked_lost: false,
                        gpus: (0..8).collect(),
                        runtimes: Vec::new(),
                    })
                    .collect(),
                reports: HashMap::new(),
                placed_at: HashMap::new(),
                drawing: HashMap::new(),
                available_watts: f64::INFINITY,
                regrow: RegrowTimes::default(),
                ramp: crate::power::admission::RampRoom::default(),
                site: Site::default(),
            }
        }

        fn report(&mut self, job: &str, states: &[(u64, pb::ShardState, Option<pb::ShardStatus>)]) {
            let reports = states.iter().map(|(epoch, state, status)| {
                Some(ShardReport { epoch: *epoch, state: *state, status: status.clone() })
            });
            self.reports.insert(job.into(), reports.collect());
        }

        fn decide(&self, mono_ms: i64, wall_ms: i64) -> Decisions {
            let mut power = PowerView::new(self.available_watts, self.site);
            for n in &self.nodes {
                let measured_watts = self.drawing.get(&n.name).copied().unwrap_or(0.0);
                let gpu =
                    |index| GpuCap { measured_watts, ..GpuCap::new(index, 200.0, 700.0, 200.0, 700.0, GpuWork::Idle) };
                let gpus = n.gpus.iter().map(|&index| gpu(index)).collect();
                let caps = NodeCaps::new(n.name.clone(), gpus, 0.0);
                power.add_node(&caps, 0.0);
            }
            power.ramp = self.ramp;
            power.now_unix_ms = wall_ms;
            let view = View {
                jobs: self.jobs.iter().collect(),
                nodes: &self.nodes,
                reports: &self.reports,
                placed_at: &self.placed_at,
                power: &power,
                lease_ms: LEASE_MS,
                regrow_after_ms: REGROW_AFTER_MS,
                regrow: self.regrow,
            };
            decide(&view, Now { mono_ms, wall_ms })
        }
    }

    impl Cluster {
        /// Where each active job's shards' nodes are, as the shell keeps it.
        fn locate_placements(&mut self) {
            let at = |node: &str| self.nodes.iter().position(|n| n.name == node);
            self.placed_at = self
                .jobs
                .iter()
                .filter(|j| j.state.is_active())
                .map(|j| (j.spec.name.clone(), j.shards.iter().map(|s| at(&s.node)).collect()))
                .collect();
        }
    }

    fn only(changes: &[JobChange]) -> &JobChange {
        assert_eq!(changes.len(), 1, "{changes:#?}");
        &changes[0]
    }

    #[test]
    fn a_node_is_lost_the_moment_its_lease_runs_out_and_its_jobs_go_back_to_waiting() {
        let mut c = Cluster::new(&["a", "b"]);
        c.nodes[1].last_seen_ms = 5_000; // b is heard from later: it stays.
        c.jobs.push(record("train", 0, (2, 2), JobState::Running, &["a", "b"]));

        let d = c.decide(LEASE_MS, 0);
        assert!(d.newly_lost.is_empty() && d.settle.is_empty(), "not before the lease ran out: {d:?}");

        let d = c.decide(LEASE_MS + 1, 7);
        assert_eq!(d.newly_lost, vec!["a".to_string()]);
        let change = only(&d.settle);
        assert_eq!(change.reason, Reason::NodeLost { node: "a".into() });
        assert_eq!(change.event, Some(JobEvent::Rescheduling));
        assert_eq!(change.record.state, JobState::Pending);
        assert_eq!(change.record.hold, Some(Hold::NodeLost));
        assert!(change.record.shards.is_empty());
        assert_eq!(change.record.last_run.len(), 2, "where it ran is kept");
        assert_eq!(change.record.last_run[0].ended_unix_ms, 7);
        assert_eq!(change.reason.to_string(), "node a was lost; waiting to be rescheduled");

        c.nodes[0].marked_lost = true;
        let d = c.decide(LEASE_MS + 2, 0);
        assert!(d.newly_lost.is_empty(), "announced once");
        assert_eq!(only(&d.settle).reason, Reason::NodeLost { node: "a".into() });
    }

    #[test]
    fn shard_reports_at_the_jobs_epoch_move_it_to_running_succeeded_or_failed() {
        use pb::ShardState::{Failed, Running, Starting, Succeeded};
        let mut c = Cluster::new(&["a", "b"]);
        c.jobs.push(record("train", 0, (2, 2), JobState::Starting, &["a", "b"]));

        c.report("train", &[(1, Running, None), (1, Starting, None)]);
        assert!(c.decide(0, 0).settle.is_empty(), "one shard still starting");

        c.report("train", &[(1, Running, None), (0, Running, None)]);
        assert!(c.decide(0, 0).settle.is_empty(), "a report of an older run does not count");

        c.report("train", &[(1, Running, None), (1, Running, None)]);
        let d = c.decide(0, 0);
        let change = only(&d.settle);
        assert_eq!(change.reason, Reason::Running { shards: 2 });
        assert_eq!(change.event, Some(JobEvent::Reached(JobState::Running)));

        c.jobs[0].state = JobState::Running;
        c.report("train", &[(1, Succeeded, None), (1, Succeeded, None)]);
        let d = c.decide(0, 0);
        let change = only(&d.settle);
        assert_eq!((change.record.state, &change.reason), (JobState::Succeeded, &Reason::Finished));
        assert!(change.record.shards.is_empty());

        let status =
            pb::ShardStatus { epoch: 1, state: Failed as i32, exit_code: Some(3), restarts: 1, ..Default::default() };
        c.report("train", &[(1, Running, None), (1, Failed, Some(status))]);
        let d = c.decide(0, 0);
        let change = only(&d.settle);
        assert_eq!(change.record.state, JobState::Failed);
        assert_eq!(
            change.reason,
            Reason::ShardFailed { shard: 1, node: "b".into(), end: Some("exited 3 after 1 restart".into()) }
        );
        assert_eq!(change.reason.to_string(), "shard 1 on b exited 3 after 1 restart");
        assert_eq!(change.record.last_run[1].exit_code, Some(3));

        c.report("train", &[(1, Failed, None), (1, Running, None)]);
        let d = c.decide(0, 0);
        assert_eq!(only(&d.settle).reason, Reason::ShardFailed { shard: 0, node: "a".into(), end: None });
        assert_eq!(only(&d.settle).reason.to_string(), "shard 0 on a failed");
    }

    #[test]
    fn a_waiting_job_is_placed_on_ready_nodes_only() {
        let mut c = Cluster::new(&["a", "b"]);
        c.nodes[0].connected = false; // disconnected, lease not run out: not placed on
        c.jobs.push(record("train", 0, (1, 1), JobState::Pending, &[]));
        let d = c.decide(0, 42);
        let change = only(&d.place);
        assert_eq!(change.event, Some(JobEvent::Placed));
        assert_eq!(change.reason, Reason::Placed { summary: "1 shard(s) on b×1".into() });
        assert_eq!(change.reason.to_string(), "placed: 1 shard(s) on b×1");
        let r = &change.record;
        assert_eq!((r.state, r.epoch, r.master_port, r.resized_unix_ms), (JobState::Starting, 1, 29_500, 42));
        assert_eq!(r.shards[0].node, "b");
        assert!(!d.scheduler_idle);
    }

    #[test]
    fn a_job_that_does_not_fit_waits_with_the_schedulers_reason_unless_it_has_its_own() {
        let mut c = Cluster::new(&["a"]);
        c.jobs.push(record("big", 0, (2, 2), JobState::Pending, &[]));
        let d = c.decide(0, 0);
        let change = only(&d.place);
        let room = WaitReason::NoRoom { min_shards: 2, gpus_per_shard: 8, fit_now: 1 };
        assert_eq!((change.event, &change.reason), (None, &Reason::Waiting(room)));
        assert_eq!(
            change.reason.to_string(),
            "waiting for room: needs 2 shard(s) of 8 GPU(s) on one node each; 1 fit now"
        );

        c.jobs[0].message = change.reason.to_string();
        assert!(c.decide(0, 0).place.is_empty(), "the same reason is not stored again");

        c.jobs[0].message = Reason::Preempted { by: "x".into() }.to_string();
        c.jobs[0].hold = Some(Hold::Preempted);
        assert!(c.decide(0, 0).place.is_empty(), "its own reason stands over the scheduler's");
    }

    #[test]
    fn a_higher_priority_job_preempts_and_the_preemption_is_stored_before_its_start() {
        let mut c = Cluster::new(&["a"]);
        c.jobs.push(record("low", 0, (1, 1), JobState::Running, &["a"]));
        c.jobs.push(record("high", 5, (1, 1), JobState::Pending, &[]));
        let d = c.decide(0, 0);
        assert_eq!(d.place.len(), 2, "{:#?}", d.place);
        let (preempt, start) = (&d.place[0], &d.place[1]);
        assert_eq!(preempt.reason, Reason::Preempted { by: "high".into() });
        assert_eq!(preempt.reason.event_text(), "by high");
        assert_eq!((preempt.record.hold, preempt.record.preemptions), (Some(Hold::Preempted), 1));
        assert_eq!(preempt.record.state, JobState::Pending);
        assert_eq!((start.record.spec.name.as_str(), start.event), ("high", Some(JobEvent::Placed)));
    }

    #[test]
    fn a_budget_below_a_jobs_minimum_pauses_it_and_holds_new_starts() {
        // 8 GPUs at their 200 W minimum are 1,600 W; the limit is 95% of 1,000 W.
        let mut c = Cluster::new(&["a", "b"]);
        c.available_watts = 1_000.0;
        c.jobs.push(record("running", 0, (1, 1), JobState::Running, &["a"]));
        c.jobs.push(record("new", 0, (1, 1), JobState::Pending, &[]));
        let d = c.decide(0, 0);
        let paused = d.place.iter().find(|ch| ch.record.spec.name == "running").expect("paused");
        assert_eq!((paused.event, &paused.reason), (Some(JobEvent::Paused), &Reason::PowerPaused));
        assert_eq!((paused.record.state, paused.record.hold), (JobState::Pending, Some(Hold::PowerPaused)));
        let held = d.place.iter().find(|ch| ch.record.spec.name == "new").expect("held");
        assert_eq!((held.event, &held.reason), (None, &Reason::PowerWaiting));
        assert_eq!(held.record.hold, Some(Hold::PowerWaiting));
        assert_eq!(held.record.state, JobState::Pending, "not started");

        // Next pass: the paused job, back in the queue, is held for power like the new one.
        c.jobs[0] = paused.record.clone();
        c.jobs[1] = held.record.clone();
        let d = c.decide(0, 0);
        let change = only(&d.place);
        assert_eq!((change.record.spec.name.as_str(), &change.reason), ("running", &Reason::PowerWaiting));
        c.jobs[0] = change.record.clone();
        let d = c.decide(0, 0);
        assert!(d.place.is_empty(), "a job already held for power is not changed again: {:?}", d.place);
    }

    #[test]
    fn a_cancelled_job_keeps_its_gpus_with_its_cap_along_the_ramp_down_then_ends() {
        let mut c = Cluster::new(&["a", "b"]);
        c.available_watts = 1e6;
        let mut job = record("j", 0, (1, 1), JobState::Running, &["a"]);
        job.stopping = Some(Stopping {
            since_unix_ms: 1_000,
            until_unix_ms: 5_000,
            from_cap_watts: 700.0,
            then: StopThen::Cancel,
        });
        c.jobs.push(job);
        c.locate_placements();
        c.report("j", &[(1, pb::ShardState::Running, None)]);
        // Half way: it still runs, at half way between 700 W and its 200 W minimum.
        let d = c.decide(0, 3_000);
        assert!(d.settle.is_empty() && d.place.is_empty(), "{:?} {:?}", d.settle, d.place);
        let cap = d.admission.allocation.unwrap().jobs[0].cap_watts;
        assert!((cap - 450.0).abs() < 1e-6, "{cap}");
        // At the end of the ramp: cancelled, off its GPUs.
        let d = c.decide(0, 5_000);
        let done = only(&d.settle);
        assert_eq!((done.record.state, done.reason.clone()), (JobState::Cancelled, Reason::Cancelled));
        assert!(done.record.shards.is_empty() && done.record.stopping.is_none());
        // Taken off its GPUs by anything else meanwhile (its node lost): cancelled, not pending.
        c.nodes[0].last_seen_ms = -LEASE_MS - 1;
        let d = c.decide(0, 2_000);
        let lost = only(&d.settle);
        assert_eq!((lost.record.state, lost.record.hold), (JobState::Cancelled, None));
    }

    impl Cluster {
        /// Store a pass's changes, as the shell does.
        fn store(&mut self, d: &Decisions) {
            for change in d.settle.iter().chain(&d.place) {
                let at = self.jobs.iter().position(|j| j.spec.name == change.record.spec.name).expect("known job");
                self.jobs[at] = change.record.clone();
                self.jobs[at].message = change.reason.to_string();
            }
            self.locate_placements();
        }

        fn cap_of(d: &Decisions, job: &str) -> f64 {
            let allocation = d.admission.allocation.as_ref().expect("allocated");
            allocation.jobs.iter().find(|j| j.name == job).expect("allocated job").cap_watts
        }
    }

    fn change<'d>(changes: &'d [JobChange], job: &str) -> &'d JobChange {
        changes.iter().find(|c| c.record.spec.name == job).unwrap_or_else(|| panic!("no change to {job}: {changes:#?}"))
    }

    /// "high" (priority 5) waits for node a, where "low" runs; the site ramps down at 2 kW/s.
    fn one_node_preemption_at_2_kw_per_second() -> Cluster {
        let mut c = Cluster::new(&["a"]);
        c.site.ramp_down_watts_per_second = Some(2_000.0);
        c.jobs.push(record("low", 0, (1, 1), JobState::Running, &["a"]));
        c.jobs.push(record("high", 5, (1, 1), JobState::Pending, &[]));
        c.locate_placements();
        c
    }

    #[test]
    fn a_preemption_waits_while_the_victims_caps_come_down_along_the_ramp_down() {
        // 8 GPUs from 700 W to their 200 W minimum at 2 kW/s: 2 s.
        let mut c = one_node_preemption_at_2_kw_per_second();
        let d = c.decide(0, 1_000);
        let low = change(&d.place, "low");
        assert_eq!(low.event, Some(JobEvent::RampingDown));
        let then = Box::new(Reason::Preempted { by: "high".into() });
        assert_eq!(low.reason, Reason::RampingDown { ms: 2_000, then });
        assert_eq!(
            low.reason.to_string(),
            "making room: its caps come down along the site's ramp-down over 2.0 s, then it is preempted by higher-priority job high"
        );
        assert_eq!((low.record.state, low.record.shards.len()), (JobState::Running, 1), "it keeps its GPUs");
        let stopping = low.record.stopping.expect("ramping down");
        assert_eq!((stopping.since_unix_ms, stopping.until_unix_ms, stopping.then), (1_000, 3_000, StopThen::MakeRoom));
        let high = change(&d.place, "high");
        assert_eq!(high.reason, Reason::RampDownWaiting { job: "low".into() });
        assert_eq!((high.record.state, high.record.hold), (JobState::Pending, Some(Hold::RampDownWaiting)));
        assert!(!d.scheduler_idle);
        assert_eq!(Cluster::cap_of(&d, "low"), 700.0);
        c.store(&d);

        // Half way: nothing changes, its cap is half way down.
        let d = c.decide(0, 2_000);
        assert!(d.place.is_empty(), "{:#?}", d.place);
        assert!((Cluster::cap_of(&d, "low") - 450.0).abs() < 1e-6);

        // The ramp is done: preempted, and the start stands on its GPUs in the same batch.
        let d = c.decide(0, 3_000);
        let low = change(&d.place, "low");
        assert_eq!((low.event, &low.reason), (Some(JobEvent::Preempted), &Reason::Preempted { by: "high".into() }));
        assert_eq!(
            (low.record.state, low.record.hold, low.record.stopping),
            (JobState::Pending, Some(Hold::Preempted), None)
        );
        let high = change(&d.place, "high");
        assert_eq!((high.event, high.record.state), (Some(JobEvent::Placed), JobState::Starting));
    }

    #[test]
    fn a_ramp_down_making_room_no_one_needs_any_more_is_called_off() {
        let mut c = one_node_preemption_at_2_kw_per_second();
        let d = c.decide(0, 1_000);
        c.store(&d);
        // The job it made room for is cancelled before the ramp is done.
        c.jobs.retain(|j| j.spec.name != "high");
        let d = c.decide(0, 2_000);
        let low = only(&d.place);
        assert_eq!((low.event, &low.reason), (None, &Reason::RampDownCalledOff));
        assert_eq!((low.record.state, low.record.stopping), (JobState::Running, None));
        c.store(&d);
        assert_eq!(Cluster::cap_of(&c.decide(0, 2_100), "low"), 700.0, "its cap may rise again");
    }

    fn ramps_of(c: &Cluster, job: &str) -> (i64, i64) {
        let job = c.jobs.iter().find(|j| j.spec.name == job).expect("known job");
        job.stopping.map(|s| (s.since_unix_ms, s.until_unix_ms)).expect("ramping down")
    }

    #[test]
    fn ramp_downs_begun_together_follow_one_another_so_together_they_keep_the_rate() {
        let mut c = Cluster::new(&["a", "b"]);
        c.site.ramp_down_watts_per_second = Some(2_000.0);
        c.jobs.push(record("low-a", 0, (1, 1), JobState::Running, &["a"]));
        c.jobs.push(record("low-b", 0, (1, 1), JobState::Running, &["b"]));
        c.jobs.push(record("high", 5, (2, 2), JobState::Pending, &[]));
        c.locate_placements();
        let d = c.decide(0, 1_000);
        let mut ramps: Vec<(i64, i64)> = ["low-a", "low-b"]
            .iter()
            .map(|j| change(&d.place, j).record.stopping.expect("ramping down"))
            .map(|s| (s.since_unix_ms, s.until_unix_ms))
            .collect();
        ramps.sort();
        assert_eq!(ramps, vec![(1_000, 3_000), (3_000, 5_000)]);
        c.store(&d);
        // The second holds its cap until its turn.
        let d = c.decide(0, 2_000);
        let caps = [Cluster::cap_of(&d, "low-a"), Cluster::cap_of(&d, "low-b")];
        assert!(caps.contains(&700.0) && caps.iter().any(|c| (c - 450.0).abs() < 1e-6), "{caps:?}");
        // The first done, the second not: the first goes, the start still waits.
        let (first, second) = if ramps_of(&c, "low-a").0 == 1_000 { ("low-a", "low-b") } else { ("low-b", "low-a") };
        let d = c.decide(0, 3_500);
        assert_eq!(change(&d.place, first).event, Some(JobEvent::Preempted));
        assert!(d.place.iter().all(|ch| ch.record.spec.name != second), "{:#?}", d.place);
        assert!(d.place.iter().all(|ch| ch.event != Some(JobEvent::Placed)), "{:#?}", d.place);
        c.store(&d);
        let d = c.decide(0, 5_000);
        assert_eq!(change(&d.place, second).event, Some(JobEvent::Preempted));
        assert_eq!(change(&d.place, "high").event, Some(JobEvent::Placed));
    }

    #[test]
    fn a_pause_a_start_causes_ramps_down_first_but_a_cut_pauses_at_once() {
        // Both jobs at their minimum are 3,200 W; the limit, 95% of 3,000 W, holds one and the
        // other node's GPUs idle (2,400 W). The higher-priority start takes the power.
        let mut c = Cluster::new(&["a", "b"]);
        c.available_watts = 3_000.0;
        c.site.ramp_down_watts_per_second = Some(100.0);
        c.jobs.push(record("low", 0, (1, 1), JobState::Running, &["a"]));
        c.jobs.push(record("high", 5, (1, 1), JobState::Pending, &[]));
        c.locate_placements();
        let d = c.decide(0, 0);
        let low = change(&d.place, "low");
        let Reason::RampingDown { ms, then } = &low.reason else { panic!("{:?}", low.reason) };
        assert_eq!(**then, Reason::PowerPaused);
        // From 2,050 W / 8 to 200 W, 8 GPUs at 100 W/s.
        assert_eq!(*ms, 4_500);
        assert_eq!(change(&d.place, "high").reason, Reason::RampDownWaiting { job: "low".into() });
        c.store(&d);
        let d = c.decide(0, 4_500);
        assert_eq!(change(&d.place, "low").reason, Reason::PowerPaused);
        assert_eq!(change(&d.place, "high").event, Some(JobEvent::Placed));

        // A source cut the running job alone no longer fits: paused at once, not along the ramp.
        let mut c = Cluster::new(&["a", "b"]);
        c.available_watts = 2_000.0;
        c.site.ramp_down_watts_per_second = Some(100.0);
        c.jobs.push(record("low", 0, (1, 1), JobState::Running, &["a"]));
        c.locate_placements();
        let d = c.decide(0, 0);
        let low = only(&d.place);
        assert_eq!((low.event, &low.reason), (Some(JobEvent::Paused), &Reason::PowerPaused));
    }

    proptest::proptest! {
        /// With power to spare, every decrease is chosen (preemptions): each job preempted first
        /// had its caps brought down along the site's ramp-down over at least the time its GPUs
        /// take at that rate, no two ramps ran at once, and no job was lost on the way.
        #[test]
        fn chosen_decreases_wait_for_their_ramp_and_ramps_never_overlap(
            arrivals in proptest::collection::vec((0i64..10, 1u32..=2, 0usize..30), 1..8),
            rate in 500.0f64..20_000.0,
        ) {
            let mut c = Cluster::new(&["a", "b", "c"]);
            c.site.ramp_down_watts_per_second = Some(rate);
            let mut windows: NameMap<String, Vec<(i64, i64)>> = NameMap::default();
            for step in 0..60 {
                let wall = step as i64 * 250;
                for (i, &(priority, shards, at)) in arrivals.iter().enumerate() {
                    if at == step {
                        c.jobs.push(record(&format!("j{i}"), priority, (shards, shards), JobState::Pending, &[]));
                    }
                }
                let before = c.jobs.clone();
                let d = c.decide(0, wall);
                for ch in d.settle.iter().chain(&d.place) {
                    let name = &ch.record.spec.name;
                    let prior = before.iter().find(|j| &j.spec.name == name).expect("known job");
                    match ch.event {
                        Some(JobEvent::Preempted) => {
                            let gpus = prior.shards.iter().map(|s| s.gpus.len()).sum::<usize>() as f64;
                            let needed_ms = (gpus * 500.0 / rate * 1_000.0).ceil();
                            if needed_ms >= crate::jobs::SHORTEST_RAMP_DOWN_MS {
                                let s = prior.stopping.expect("ramped down first");
                                proptest::prop_assert_eq!(s.then, StopThen::MakeRoom);
                                proptest::prop_assert!(s.until_unix_ms <= wall);
                                proptest::prop_assert!((s.until_unix_ms - s.since_unix_ms) as f64 >= needed_ms);
                            }
                        }
                        Some(JobEvent::RampingDown) => {
                            let s = ch.record.stopping.expect("a ramp");
                            proptest::prop_assert!(s.since_unix_ms >= wall);
                            windows.entry(name.clone()).or_default().push((s.since_unix_ms, s.until_unix_ms));
                        }
                        _ if ch.reason == Reason::RampDownCalledOff => {
                            let last = windows.get_mut(name).and_then(|w| w.last_mut()).expect("a ramp to call off");
                            last.1 = last.1.min(wall);
                        }
                        _ => {}
                    }
                }
                c.store(&d);
                let states: Vec<JobState> = c.jobs.iter().map(|j| j.state).collect();
                proptest::prop_assert!(states.iter().all(|s| !s.is_terminal()), "{states:?}");
            }
            let mut all: Vec<(i64, i64)> = windows.into_values().flatten().filter(|(a, b)| a < b).collect();
            all.sort();
            for pair in all.windows(2) {
                proptest::prop_assert!(pair[0].1 <= pair[1].0, "overlapping ramps {pair:?}");
            }
        }
    }

    #[test]
    fn a_start_waits_for_the_site_ramp_and_one_no_second_of_ramp_can_hold_says_so() {
        // One shard of 8 GPUs: from 100 W idle to its 200 W minimum cap, a step of 800 W.
        let mut c = Cluster::new(&["a"]);
        c.jobs.push(record("j", 0, (1, 1), JobState::Pending, &[]));
        c.ramp = crate::power::admission::RampRoom { now_watts: 500.0, per_second_watts: 1_000.0 };
        let d = c.decide(0, 0);
        let held = only(&d.place);
        assert_eq!(held.reason, Reason::RampWaiting { step_watts: 800, per_second_watts: 1_000 });
        assert_eq!((held.record.state, held.record.hold), (JobState::Pending, Some(Hold::RampWaiting)));
        assert!(held.reason.to_string().starts_with("waiting for the site's ramp limit"), "{}", held.reason);
        c.jobs[0] = held.record.clone();
        c.jobs[0].message = held.reason.to_string();
        assert!(c.decide(0, 0).place.is_empty(), "held once, not rewritten every pass");
        // A second later there is room: it starts.
        c.ramp.now_watts = 1_000.0;
        let started = only(&c.decide(0, 0).place).clone();
        assert_eq!((started.event, started.record.state), (Some(JobEvent::Placed), JobState::Starting));
        // A start no second of ramp can hold waits, and says what to change.
        c.jobs[0] = record("j", 0, (1, 1), JobState::Pending, &[]);
        c.ramp = crate::power::admission::RampRoom { now_watts: 600.0, per_second_watts: 600.0 };
        let reason = only(&c.decide(0, 0).place).reason.to_string();
        assert!(reason.contains("more than the site's ramp limit allows in a second (600 W)"), "{reason}");
    }

    #[test]
    fn a_job_paused_for_power_is_not_started_again_on_the_same_figures() {
        // a's GPUs still draw 200 W (a shard just left them): parked, they count 200 W each. The
        // scheduler proposes the elastic job on b then a; power keeps one shard, on b, and the
        // one it leaves on a counts what a's GPUs count now, as it would once the job runs on b
        // alone: 1,600 + 1,600 W, above the 2,850 W limit. Counting the left shard at the 100 W
        // idle allowance (2,400 W) started it, and the next pass paused it again, and again.
        let mut c = Cluster::new(&["a", "b"]);
        c.available_watts = 3_000.0;
        c.drawing.insert("a".into(), 200.0);
        let mut job = record("elastic", 0, (1, 2), JobState::Pending, &[]);
        job.hold = Some(Hold::PowerPaused);
        c.jobs.push(job);
        let d = c.decide(0, 0);
        let change = only(&d.place);
        assert_eq!((change.event, &change.reason), (None, &Reason::PowerWaiting), "{change:?}");
        assert_eq!(change.record.state, JobState::Pending);

        // As running on b alone, the same budget pauses it: the two figures agree.
        c.jobs[0] = record("elastic", 0, (1, 2), JobState::Running, &["b"]);
        let d = c.decide(0, 0);
        assert_eq!(only(&d.place).reason, Reason::PowerPaused);
    }

    #[test]
    fn a_budget_that_holds_fewer_shards_shrinks_an_elastic_job() {
        // Two shards at the minimum: 3,200 W. One shard at its minimum and the other node's
        // GPUs idle (100 W each): 2,400 W. The limit, 95% of 2,700 W, holds only the second.
        let mut c = Cluster::new(&["a", "b"]);
        c.available_watts = 2_700.0;
        c.jobs.push(record("elastic", 0, (1, 2), JobState::Running, &["a", "b"]));
        let d = c.decide(0, 9);
        let change = only(&d.place);
        assert_eq!((change.event, &change.reason), (Some(JobEvent::Shrunk), &Reason::Shrunk { to: 1 }));
        assert_eq!(change.record.shards.len(), 1);
        assert_eq!((change.record.epoch, change.record.resized_unix_ms), (2, 9));
        assert_eq!(change.record.state, JobState::Starting);
    }

    #[test]
    fn a_shrunk_job_grows_back_once_its_cool_down_ran_out_and_nothing_else_changed() {
        let mut c = Cluster::new(&["a", "b"]);
        let mut job = record("elastic", 0, (1, 2), JobState::Running, &["a"]);
        job.resized_unix_ms = 1_000;
        c.jobs.push(job);

        let d = c.decide(0, 1_000 + REGROW_AFTER_MS - 1);
        assert!(d.place.is_empty(), "not during its cool-down: {:?}", d.place);
        assert_eq!(d.regrow.due_unix_ms, 1_000 + REGROW_AFTER_MS, "a pass is due when it ends");

        let d = c.decide(0, 1_000 + REGROW_AFTER_MS);
        let change = only(&d.place);
        assert_eq!((change.event, &change.reason), (Some(JobEvent::Grown), &Reason::Grown { from: 1, to: 2 }));
        assert_eq!((change.record.shards.len(), change.record.epoch), (2, 2));
        let allocation = d.admission.allocation.expect("admitted");
        assert_eq!(allocation.jobs[0].shards, 2, "the caps are for the grown job");

        // Something else changing in the same pass (a job placed) holds growth back.
        c.nodes.push(NodeView {
            name: "c".into(),
            last_seen_ms: 0,
            connected: true,
            marked_lost: false,
            gpus: (0..8).collect(),
            runtimes: Vec::new(),
        });
        c.jobs.push(record("other", 0, (1, 1), JobState::Pending, &[]));
        let d = c.decide(0, 1_000 + REGROW_AFTER_MS);
        assert!(d.place.iter().all(|ch| ch.event != Some(JobEvent::Grown)), "{:?}", d.place);
    }

    #[test]
    fn where_shards_are_is_a_shortcut_that_never_changes_a_decision() {
        // Preemption, a lost node, a shrink and a start in one pass, decided with and without
        // the positions the shell keeps.
        let mut c = Cluster::new(&["a", "b", "c", "d", "e"]);
        c.nodes[3].last_seen_ms = -LEASE_MS - 1; // d: lease ran out
        c.available_watts = 16_000.0;
        c.jobs.push(record("low", 0, (1, 1), JobState::Running, &["a"]));
        c.jobs.push(record("elastic", 1, (1, 2), JobState::Running, &["b", "c"]));
        c.jobs.push(record("on-lost", 1, (1, 1), JobState::Running, &["d"]));
        c.jobs.push(record("urgent", 5, (2, 2), JobState::Pending, &[]));
        let by_name = format!("{:?}", c.decide(0, 0));
        c.locate_placements();
        assert_eq!(c.placed_at["elastic"], vec![Some(1), Some(2)]);
        let by_position = format!("{:?}", c.decide(0, 0));
        assert_eq!(by_name, by_position);
        assert!(by_name.contains("Preempted") && by_name.contains("NodeLost"), "{by_name}");
    }

    #[test]
    fn growth_that_found_no_room_waits_before_trying_again() {
        let mut c = Cluster::new(&["a"]);
        c.jobs.push(record("elastic", 0, (1, 2), JobState::Running, &["a"]));
        let d = c.decide(0, REGROW_AFTER_MS);
        assert!(d.place.is_empty());
        assert_eq!(d.regrow.next_attempt_unix_ms, REGROW_AFTER_MS + crate::regrow::RETRY_AFTER_MS);
    }

    #[test]
    fn rank_zero_ports_differ_between_jobs_on_one_node() {
        let used: HashSet<u16> = [29_500, 29_501].into();
        assert_eq!(pick_master_port(&used), 29_502);
        let a = record("a", 0, (1, 1), JobState::Running, &["n"]);
        assert_eq!(free_master_port(&[&a], "n", "b"), 29_501);
        assert_eq!(free_master_port(&[&a], "n", "a"), 29_500, "its own port is free to it");
    }
}
