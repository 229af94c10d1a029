//! The power half of the reconcile pass: admission (which jobs the budget can hold, at how many
//! shards), then enforcement (the allocator's caps, moved to through the transition planner as
//! cap orders), then the power status everyone reads.
//!
//! The decisions are the pure [`allocate`] and [`plan`]; this module gathers their inputs from
//! the registry and the job table, sends their outputs, and keeps the books: the cap epoch, when
//! the last power event happened (for event-to-acknowledged latency), and budget violations.

use std::collections::{HashMap, HashSet};

use tokio::time::Instant;
use watt_proto::v1 as pb;

use crate::jobs::{JobRecord, JobTable};
use crate::power::allocator::{allocate, Allocation, JobLoad};
use crate::power::curve::Curve;
use crate::power::planner::{self, plan, NodeCaps, Phase};
use crate::power::table::PowerTable;
use crate::power::{safe_limit_watts, Site, SourceKind};
use crate::reconcile::{unix_ms, Controller};
use crate::registry::NodeState;
use crate::scheduler::ShardAssignment;

/// Increases go out in waves of at most this many nodes, a wave once the one before it is
/// acknowledged; within a wave each agent steps up after a random delay below
/// [`INCREASE_SPREAD_MS`]. So a thousand nodes never raise their caps in the same instant.
pub const MAX_INCREASE_NODES_PER_PASS: usize = 1_000;
pub const INCREASE_SPREAD_MS: u32 = 100;

#[derive(Debug)]
pub struct PowerState {
    pub table: PowerTable,
    /// Cap orders carry this, strictly increasing, also across controller restarts.
    cap_epoch: u64,
    violating: bool,
    pub last: Option<Allocation>,
}

impl PowerState {
    pub fn new(table: PowerTable) -> Self {
        // Start above any epoch an earlier run of the controller can have used.
        let cap_epoch = (unix_ms().max(0) as u64) * 1_000;
        PowerState { table, cap_epoch, violating: false, last: None }
    }
}

/// What the budget holds: the allocation, and per job what to do about it.
#[derive(Debug, Default)]
pub struct Admission {
    pub allocation: Option<Allocation>,
    pub limit_watts: f64,
    pub budget_watts: f64,
    pub available_watts: f64,
    pub non_gpu_watts: f64,
}

impl Controller {
    /// The allocator over every job that would run: the active ones not being preempted, and the
    /// scheduler's new starts (`starting`: name → shards).
    pub fn admit(
        &self,
        power: &PowerState,
        jobs: &JobTable,
        preempted: &HashSet<String>,
        starting: &[(String, Vec<ShardAssignment>)],
    ) -> Admission {
        let now_ms = unix_ms();
        let site = power.table.site();
        // No source configured: power is not managed, and nothing limits the budget.
        let unmanaged = power.table.sources().next().is_none();
        let available = if unmanaged { f64::INFINITY } else { power.table.available_watts(now_ms) };
        let limit = safe_limit_watts(available, &site);
        // Job loads are read under the registry lock (no copies of 200,000 GPU ranges); the
        // allocation itself runs after it is released.
        let (loads, non_gpu, total_gpus) = {
            let nodes = self.registry.lock();
            let non_gpu: f64 = nodes.values().map(|e| node_overhead(e.non_gpu_watts, &site)).sum();
            let total: u64 = nodes.values().map(|e| e.power.gpus.len() as u64).sum();
            let load = |record: &JobRecord, shards: &[ShardAssignment]| -> Option<JobLoad> {
                let mut cap_min: f64 = 0.0;
                let mut cap_max = f64::INFINITY;
                for s in shards {
                    let node = nodes.get(&s.node)?;
                    for index in &s.gpus {
                        let g = node.power.gpus.iter().find(|g| g.index == *index)?;
                        cap_min = cap_min.max(g.min_watts);
                        cap_max = cap_max.min(g.max_watts);
                    }
                }
                (cap_min <= cap_max && cap_max.is_finite()).then(|| JobLoad {
                    name: record.spec.name.clone(),
                    priority: record.spec.priority,
                    sequence: record.sequence,
                    flex: record.spec.flex,
                    gpus_per_shard: record.spec.gpus_per_shard,
                    shards: shards.len() as u32,
                    min_shards: record.spec.shards.min.min(shards.len() as u32),
                    cap_min,
                    cap_max,
                    curve: Curve::default(),
                })
            };
            let mut loads: Vec<JobLoad> = jobs
                .iter()
                .filter(|j| j.state.is_active() && !preempted.contains(&j.spec.name))
                .filter_map(|j| load(j, &j.shards))
                .collect();
            for (name, shards) in starting {
                if let Some(l) = jobs.get(name).and_then(|j| load(j, shards)) {
                    loads.push(l);
                }
            }
            (loads, non_gpu, total)
        };
        let budget = limit - non_gpu;
        Admission {
            allocation: Some(allocate(budget, &loads, total_gpus, site.idle_gpu_watts)),
            limit_watts: limit,
            budget_watts: budget,
            available_watts: available,
            non_gpu_watts: non_gpu,
        }
    }

    /// Move every node toward the allocation's caps through the planner, send the orders, and
    /// publish the power status.
    pub fn enforce(&self, power: &mut PowerState, jobs: &JobTable, admission: Admission) {
        let now = Instant::now();
        let now_ms = unix_ms();
        let site = power.table.site();
        let allocation =
            admission.allocation.unwrap_or_else(|| allocate(admission.budget_watts, &[], 0, site.idle_gpu_watts));
        let caps: HashMap<&str, f64> =
            allocation.jobs.iter().filter(|j| !j.paused).map(|j| (j.name.as_str(), j.cap_watts)).collect();
        // Node -> (GPU, cap of the job placed on it).
        let mut placed: HashMap<&str, Vec<(u32, f64)>> = HashMap::new();
        for job in jobs.iter().filter(|j| j.state.is_active()) {
            let Some(&cap) = caps.get(job.spec.name.as_str()) else { continue };
            for s in &job.shards {
                placed.entry(s.node.as_str()).or_default().extend(s.gpus.iter().map(|&g| (g, cap)));
            }
        }

        let mut nodes = self.registry.lock();
        let mut snapshot: Vec<NodeCaps> = Vec::with_capacity(nodes.len());
        let mut targets: Vec<Vec<f64>> = Vec::with_capacity(nodes.len());
        let mut failsafe_nodes = 0;
        for e in nodes.values_mut() {
            let reachable = e.state(now, self.settings.node_lease) == NodeState::Ready;
            e.power.reachable = reachable;
            e.power.failsafe_at_unix_ms = e.last_seen_unix_ms + e.failsafe_after_ms;
            e.power.overhead_watts = node_overhead(e.non_gpu_watts, &site);
            let reported = e.reported_busy();
            let on_node = placed.get(e.name.as_str()).map(Vec::as_slice).unwrap_or(&[]);
            let mut node_targets = Vec::with_capacity(e.power.gpus.len());
            for g in &mut e.power.gpus {
                let cap = on_node.iter().find(|(i, _)| *i == g.index).map(|&(_, c)| c);
                g.busy = cap.is_some() || reported.contains(&g.index);
                // Idle GPUs are parked at their minimum.
                node_targets.push(cap.unwrap_or(g.min_watts).clamp(g.min_watts, g.max_watts));
            }
            if e.power.failsafed(now_ms) {
                failsafe_nodes += 1;
            }
            targets.push(node_targets);
            snapshot.push(e.power.clone());
        }
        let orders =
            plan(&snapshot, &targets, admission.limit_watts, now_ms, site.idle_gpu_watts, MAX_INCREASE_NODES_PER_PASS);
        for order in &orders {
            let Some(e) = nodes.get_mut(&order.node) else { continue };
            let Some(session) = &e.session else { continue };
            power.cap_epoch += 1;
            let message = pb::ControllerMessage {
                body: Some(pb::controller_message::Body::CapOrder(pb::CapOrder {
                    epoch: power.cap_epoch,
                    phase: match order.phase {
                        Phase::Decrease => pb::TransitionPhase::Decrease,
                        Phase::Increase => pb::TransitionPhase::Increase,
                    } as i32,
                    caps: order.caps.iter().map(|&(index, watts)| pb::GpuCap { index, watts }).collect(),
                    spread_ms: if order.phase == Phase::Increase { INCREASE_SPREAD_MS } else { 0 },
                })),
            };
            // A full queue is retried next pass: not marked sent.
            if session.tx.try_send(Ok(message)).is_ok() {
                planner::mark_sent(&mut e.power, order, power.cap_epoch, now_ms);
            }
        }
        // The books, read in place after the orders went out.
        let counted: f64 = nodes.values().map(|e| e.power.counted_watts(now_ms, site.idle_gpu_watts)).sum();
        let outstanding = nodes.values().any(|e| e.power.decrease_outstanding(now_ms));
        let drawn: f64 = nodes
            .values()
            .filter_map(|e| e.telemetry.as_ref())
            .flat_map(|t| t.gpus.iter().filter(|g| g.up).map(|g| g.power_watts))
            .sum();
        let unacknowledged = nodes.values().filter(|e| e.power.gpus.iter().any(|g| g.in_flight.is_some())).count();
        let owing =
            nodes.values().filter(|e| e.power.reachable && e.power.gpus.iter().any(|g| g.in_flight.is_some())).count();
        // Targets not yet ordered: increases that wait for headroom or their turn.
        let more_to_order = nodes.values().zip(&targets).any(|(e, t)| {
            e.power.reachable
                && e.power.gpus.iter().zip(t).any(|(g, &t)| match g.in_flight {
                    Some(f) => f.target != t,
                    None => g.acked_watts != t,
                })
        });
        self.acks.after_pass(owing, more_to_order, &self.metrics);
        drop(nodes);

        // A violation: settled (no decrease outstanding) above the limit although the allocation
        // fits. Counted once per episode.
        let violating = !outstanding && allocation.fits && counted > admission.limit_watts * (1.0 + 1e-9) + 1e-6;
        if violating && !power.violating {
            self.metrics.budget_violations.inc();
            tracing::error!(
                counted,
                limit = admission.limit_watts,
                "Counted power is above the limit with every decrease acknowledged."
            );
        }
        power.violating = violating;

        let mut job_power: Vec<pb::JobPower> = allocation
            .jobs
            .iter()
            .map(|a| {
                let record = jobs.get(&a.name);
                pb::JobPower {
                    name: a.name.clone(),
                    cap_watts: if a.paused { 0.0 } else { a.cap_watts },
                    shards: if a.paused { 0 } else { a.shards },
                    gpus: if a.paused { 0 } else { a.shards * record.map(|r| r.spec.gpus_per_shard).unwrap_or(0) },
                    paused: a.paused,
                    shards_wanted: record.map(|r| r.spec.shards.max).unwrap_or(a.shards),
                }
            })
            .collect();
        job_power.sort_by(|a, b| a.name.cmp(&b.name));
        let status = pb::PowerStatus {
            sources: power
                .table
                .sources()
                .map(|s| pb::PowerSource {
                    name: s.name.clone(),
                    kind: source_kind(s.kind) as i32,
                    available_watts: s.available_watts,
                    ramp_watts_per_second: s.ramp_watts_per_second,
                    effective_watts: s.effective_watts(now_ms),
                })
                .collect(),
            site: Some(site_proto(&site)),
            // Unlimited shows as 0 on the wire (protobuf has no infinity in JSON).
            available_watts: finite(admission.available_watts),
            limit_watts: finite(admission.limit_watts),
            budget_watts: finite(admission.budget_watts),
            allocated_watts: allocation.total_watts,
            counted_watts: counted,
            drawn_watts: drawn,
            non_gpu_watts: admission.non_gpu_watts,
            jobs: job_power,
            failsafe_nodes,
            unacknowledged_nodes: unacknowledged as u32,
            notes: if admission.available_watts.is_infinite() {
                vec!["no power source is configured: power is not limited (wattctl power set-source)".into()]
            } else {
                allocation.notes.clone()
            },
            budget_violations: self.metrics.budget_violations.get(),
            unix_ms: now_ms,
        };
        self.metrics.observe_power(&status);
        power.last = Some(allocation);
        self.power_status.send_replace(status);
    }
}

fn finite(w: f64) -> f64 {
    if w.is_finite() {
        w
    } else {
        0.0
    }
}

/// A node's draw besides its GPUs: what it reports, else the site's default.
fn node_overhead(reported: f64, site: &Site) -> f64 {
    if reported > 0.0 {
        reported
    } else {
        site.node_overhead_watts
    }
}

pub fn source_kind(kind: SourceKind) -> pb::SourceKind {
    match kind {
        SourceKind::Grid => pb::SourceKind::Grid,
        SourceKind::Generator => pb::SourceKind::Generator,
        SourceKind::Battery => pb::SourceKind::Battery,
        SourceKind::Manual => pb::SourceKind::Manual,
    }
}

pub fn site_proto(site: &Site) -> pb::Site {
    pb::Site {
        reserve_ratio: site.reserve_ratio,
        pue: site.pue,
        node_overhead_watts: site.node_overhead_watts,
        idle_gpu_watts: site.idle_gpu_watts,
    }
}
