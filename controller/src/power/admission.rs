//! Admission: which jobs the power budget can hold, and at how many shards. Pure: the budget's
//! inputs come in a [`PowerView`] gathered once per pass, so admission can run many times in a
//! pass (the decision, then growth's trials) without touching the registry.
//!
//! Every GPU counts (invariant 1, ARCHITECTURE.md): GPUs outside the jobs being allocated enter
//! the allocator as what they will count once parked at their minimum cap, and the floor — the
//! least the cluster can draw with every job paused — decides whether a limit is infeasible.

use crate::NameMap;

use crate::jobs::JobRecord;
use crate::power::allocator::{allocate, Allocation, JobLoad};
use crate::power::domain_allocation::{allocate_within_domains, DomainLoad, Spread};
use crate::power::domains::DomainTree;
use crate::power::planner::{GpuCap, GpuWork, NodeCaps};
use crate::power::speed_fit::FittedCurves;
use crate::power::{gpu_budget_watts, safe_limit_watts, Site};
use crate::scheduler::ShardAssignment;

/// One GPU as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuLimits {
    pub index: u32,
    pub min_watts: f64,
    pub max_watts: f64,
    /// What it counts parked (see [`parked_watts`]).
    pub parked_watts: f64,
}

/// The budget's inputs, as of one moment.
///
/// Kept between passes by the shell: a node's figures are refreshed in place when its inputs
/// change ([`PowerView::refresh_node`]), and the cluster's totals are added up again from the
/// per-node figures in node order ([`PowerView::add_up`]), so a view refreshed in place adds up
/// to exactly what one built from scratch does.
#[derive(Debug, Clone, Default)]
pub struct PowerView {
    /// What the sources supply now (ramps included); infinite when no source is configured.
    pub available_watts: f64,
    pub site: Site,
    /// Every node's draw besides its GPUs.
    pub non_gpu_watts: f64,
    /// Every GPU of the cluster parked.
    pub all_parked_watts: f64,
    /// Where each node is, by name.
    pub nodes: NameMap<String, usize>,
    /// Every node's GPUs, in one buffer: node `i`'s are `gpus[start[i]..start[i + 1]]`.
    gpus: Vec<GpuLimits>,
    start: Vec<usize>,
    /// Per node: its GPUs parked, and its draw besides them.
    node_parked_watts: Vec<f64>,
    node_non_gpu_watts: Vec<f64>,
    /// Each job's speed curves, by name; a job not here runs on the shared one.
    pub curves: crate::NameMap<String, FittedCurves>,
    /// The wall time of the view: where a cancelled job's caps are on their ramp down.
    pub now_unix_ms: i64,
    /// The site's ramp limit now: how much counted power may still rise this moment, and the
    /// most one second ever allows (both infinite without a limit). See [`crate::power::ramp`].
    pub ramp: RampRoom,
    /// The power domains (see [`crate::power::domains`]), and per node the ones it is in.
    pub tree: std::sync::Arc<DomainTree>,
    /// Each domain's limit in force now (see `PowerTable::domain_limits`); a domain not here
    /// has its breaker's.
    pub domain_limits: Vec<f64>,
    node_domains: Vec<Vec<u32>>,
    /// Per domain: its nodes' GPUs parked, and their draw besides GPUs.
    domain_parked_watts: Vec<f64>,
    domain_non_gpu_watts: Vec<f64>,
}

/// How much the site's ramp limit lets counted power rise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RampRoom {
    /// Now: the ceiling less what is counted.
    pub now_watts: f64,
    /// In a second with nothing else rising: one second of ramp.
    pub per_second_watts: f64,
}

impl Default for RampRoom {
    fn default() -> Self {
        RampRoom { now_watts: f64::INFINITY, per_second_watts: f64::INFINITY }
    }
}

impl PowerView {
    /// What starting `shards` adds to counted power at once: each GPU goes from what it counts
    /// parked to its minimum cap under a Watt shard (the rest of its cap is raised by the
    /// planner, along the ramp). A GPU not in the view adds nothing here (it is not counted).
    pub fn start_step_watts(&self, shards: &[ShardAssignment]) -> f64 {
        shards
            .iter()
            .filter_map(|s| self.node(&s.node, None).map(|gpus| (s, gpus)))
            .flat_map(|(s, gpus)| s.gpus.iter().filter_map(|i| gpus.iter().find(|g| g.index == *i)))
            .map(|g| (g.min_watts - g.parked_watts).max(0.0))
            .sum()
    }

    /// The lowest cap one cap can give every GPU of `shards`: the highest of their minimums
    /// (`None` when one is not in the view).
    pub fn floor_watts(&self, shards: &[ShardAssignment]) -> Option<f64> {
        let mut floor = 0.0f64;
        for s in shards {
            let gpus = self.node(&s.node, None)?;
            for i in &s.gpus {
                floor = floor.max(gpus.iter().find(|g| g.index == *i)?.min_watts);
            }
        }
        Some(floor)
    }
}

impl PowerView {
    /// No node yet.
    pub fn new(available_watts: f64, site: Site) -> Self {
        PowerView { available_watts, site, start: vec![0], ..PowerView::default() }
    }

    /// No node yet, under the power domains of `tree`.
    pub fn with_domains(available_watts: f64, site: Site, tree: std::sync::Arc<DomainTree>) -> Self {
        let n = tree.len();
        PowerView {
            tree,
            domain_parked_watts: vec![0.0; n],
            domain_non_gpu_watts: vec![0.0; n],
            ..PowerView::new(available_watts, site)
        }
    }

    /// Add a node in no power domain (see [`PowerView::add_node_in`]).
    pub fn add_node(&mut self, caps: &NodeCaps, non_gpu_watts: f64) {
        self.add_node_in(caps, non_gpu_watts, &[]);
    }

    /// Add a node: its GPUs' limits, what each counts parked, its non-GPU draw, and the power
    /// domains it is in (positions in `tree`).
    pub fn add_node_in(&mut self, caps: &NodeCaps, non_gpu_watts: f64, domains: &[u32]) {
        self.node_domains.push(domains.to_vec());
        self.add_node_figures(caps, non_gpu_watts);
        let (parked, non_gpu) = (self.node_parked_watts[self.node_parked_watts.len() - 1], non_gpu_watts);
        for &d in domains {
            self.domain_parked_watts[d as usize] += parked;
            self.domain_non_gpu_watts[d as usize] += non_gpu;
        }
    }

    fn add_node_figures(&mut self, caps: &NodeCaps, non_gpu_watts: f64) {
        if self.start.is_empty() {
            self.start.push(0);
        }
        let idle = self.site.idle_gpu_watts;
        let mut parked = 0.0;
        for g in &caps.gpus {
            let limits = GpuLimits {
                index: g.index,
                min_watts: g.min_watts,
                max_watts: g.max_watts,
                parked_watts: parked_watts(caps, g, idle),
            };
            parked += limits.parked_watts;
            self.gpus.push(limits);
        }
        self.nodes.insert(caps.name.clone(), self.node_parked_watts.len());
        self.start.push(self.gpus.len());
        self.node_parked_watts.push(parked);
        self.node_non_gpu_watts.push(non_gpu_watts);
        // The same sums, in the same order, as `add_up`.
        self.all_parked_watts += parked;
        self.non_gpu_watts += non_gpu_watts;
    }

    /// Refresh the node at `position` (as added, same GPUs) in place: what its GPUs count parked
    /// changes with their work, their draw and the node's enforcement. The totals wait for
    /// [`PowerView::add_up`].
    pub fn refresh_node(&mut self, position: usize, caps: &NodeCaps, non_gpu_watts: f64) {
        let idle = self.site.idle_gpu_watts;
        let (Some(&from), Some(&to)) = (self.start.get(position), self.start.get(position + 1)) else { return };
        let mut parked = 0.0;
        for (limits, g) in self.gpus[from..to].iter_mut().zip(&caps.gpus) {
            limits.parked_watts = parked_watts(caps, g, idle);
            parked += limits.parked_watts;
        }
        self.node_parked_watts[position] = parked;
        self.node_non_gpu_watts[position] = non_gpu_watts;
    }

    /// Add the cluster's totals up again from every node's figures, in node order.
    pub fn add_up(&mut self) {
        self.all_parked_watts = self.node_parked_watts.iter().fold(0.0, |sum, w| sum + w);
        self.non_gpu_watts = self.node_non_gpu_watts.iter().fold(0.0, |sum, w| sum + w);
        if !self.tree.is_empty() {
            self.domain_parked_watts.iter_mut().for_each(|w| *w = 0.0);
            self.domain_non_gpu_watts.iter_mut().for_each(|w| *w = 0.0);
            for (n, domains) in self.node_domains.iter().enumerate() {
                for &d in domains {
                    self.domain_parked_watts[d as usize] += self.node_parked_watts[n];
                    self.domain_non_gpu_watts[d as usize] += self.node_non_gpu_watts[n];
                }
            }
        }
    }

    /// How many nodes it holds.
    pub fn len(&self) -> usize {
        self.node_parked_watts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.node_parked_watts.is_empty()
    }

    /// The GPUs of the node `name`, at `hint` when the caller knows where it is.
    fn node(&self, name: &str, hint: Option<usize>) -> Option<&[GpuLimits]> {
        let at = self.position(name, hint)?;
        Some(&self.gpus[self.start[at]..self.start[at + 1]])
    }

    fn position(&self, name: &str, hint: Option<usize>) -> Option<usize> {
        let hint = hint.filter(|&at| at < self.len());
        debug_assert!(hint.is_none() || self.nodes.get(name) == hint.as_ref(), "a position hint names another node");
        hint.or_else(|| self.nodes.get(name).copied())
    }

    /// The power domains the node at `position` is in.
    fn domains_of(&self, position: usize) -> &[u32] {
        self.node_domains.get(position).map_or(&[], Vec::as_slice)
    }

    /// Every figure admission reads, for comparing two views.
    pub fn same_figures(&self, other: &PowerView) -> bool {
        self.gpus == other.gpus
            && self.node_parked_watts == other.node_parked_watts
            && self.node_non_gpu_watts == other.node_non_gpu_watts
            && self.all_parked_watts == other.all_parked_watts
            && self.non_gpu_watts == other.non_gpu_watts
            && self.node_domains == other.node_domains
            && self.domain_parked_watts == other.domain_parked_watts
            && self.domain_non_gpu_watts == other.domain_non_gpu_watts
    }
}

/// What the budget holds: the allocation, and per job what to do about it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Admission {
    pub allocation: Option<Allocation>,
    pub limit_watts: f64,
    pub budget_watts: f64,
    pub available_watts: f64,
    pub non_gpu_watts: f64,
    /// The least the cluster can draw: non-GPU draw, every job paused, every GPU at its floor.
    pub floor_watts: f64,
}

/// What a GPU outside the jobs being allocated counts once parked: idle or foreign, at its
/// minimum cap on a node that enforces, at the cap it runs under on one that does not.
pub fn parked_watts(node: &NodeCaps, g: &GpuCap, idle: f64) -> f64 {
    let cap = if node.enforcing { g.min_watts } else { g.upper() };
    let work = if g.work == GpuWork::Foreign { GpuWork::Foreign } else { GpuWork::Idle };
    g.counted_as(work, cap, idle)
}

/// A job that would run, on these shards.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    pub job: &'a JobRecord,
    pub shards: &'a [ShardAssignment],
    /// Where each shard's node is in the [`PowerView`], when the caller knows it (then no shard
    /// is looked up by name).
    pub at: Option<&'a [Option<usize>]>,
}

impl<'a> Run<'a> {
    /// `job` on the shards it holds.
    pub fn as_placed(job: &'a JobRecord, at: Option<&'a [Option<usize>]>) -> Self {
        Run { job, shards: &job.shards, at }
    }
}

/// The allocator over every job that would run, each with the shards it would run on.
pub fn admit(power: &PowerView, runs: &[Run<'_>]) -> Admission {
    let site = power.site;
    let available = power.available_watts;
    let limit = safe_limit_watts(available, &site);
    let idle = site.idle_gpu_watts;
    let mut in_jobs_parked = 0.0;
    let mut loads: Vec<JobLoad> = Vec::with_capacity(runs.len());
    let with_domains = !power.tree.is_empty();
    // Per job allocated: per shard, the domains its node is in; per domain, what its jobs'
    // GPUs count parked (they count as the jobs have them instead).
    let mut spreads: Vec<Spread> = Vec::new();
    let mut domain_in_jobs_parked = vec![0.0; if with_domains { power.tree.len() } else { 0 }];
    for &Run { job: record, shards, at } in runs {
        let mut cap_min: f64 = 0.0;
        let mut cap_max = f64::INFINITY;
        let mut parked = 0.0;
        let mut known = true;
        // Given up, a shard the job runs on now leaves GPUs with no process (the idle allowance);
        // one only proposed leaves its GPUs as they count now.
        let mut given_up_watts = Vec::with_capacity(shards.len());
        let mut spread: Spread = Vec::new();
        let mut shard_parked_each = Vec::new();
        'shards: for (i, s) in shards.iter().enumerate() {
            let hint = at.and_then(|at| at.get(i).copied().flatten());
            let Some(position) = power.position(&s.node, hint) else {
                known = false;
                break;
            };
            let node = &power.gpus[power.start[position]..power.start[position + 1]];
            if with_domains {
                spread.push(power.domains_of(position).to_vec());
            }
            let mut shard_parked = 0.0;
            for index in &s.gpus {
                let found = node.get(*index as usize).filter(|g| g.index == *index);
                let Some(g) = found.or_else(|| node.iter().find(|g| g.index == *index)) else {
                    known = false;
                    break 'shards;
                };
                cap_min = cap_min.max(g.min_watts);
                cap_max = cap_max.min(g.max_watts);
                shard_parked += g.parked_watts;
            }
            parked += shard_parked;
            shard_parked_each.push(shard_parked);
            // On the shards it holds (the same slice: no comparison needed), or on a proposal that
            // keeps this one where it is.
            let runs_there = record.state.is_active()
                && (std::ptr::eq(shards, record.shards.as_slice()) || record.shards.get(i) == Some(s));
            given_up_watts.push(if runs_there { s.gpus.len() as f64 * idle } else { shard_parked });
        }
        // A job on a node whose inventory is not known yet (expected after a restart, not back)
        // is not allocated: its GPUs are not in the view either.
        if !known {
            continue;
        }
        // A cancelled job ramping down may have no more than its ramp allows now.
        if let Some(stopping) = record.stopping {
            cap_max = cap_max.min(stopping.cap_at(power.now_unix_ms, cap_min)).max(cap_min);
        }
        if cap_min <= cap_max && cap_max.is_finite() {
            // Its GPUs count as the job has them, not parked among the others.
            in_jobs_parked += parked;
            for (in_domains, shard_parked) in spread.iter().zip(&shard_parked_each) {
                for &d in in_domains {
                    domain_in_jobs_parked[d as usize] += shard_parked;
                }
            }
            if with_domains {
                spreads.push(spread);
            }
            let curves = power.curves.get(&record.spec.name).copied().unwrap_or_default();
            loads.push(JobLoad {
                name: record.spec.name.clone(),
                priority: record.spec.priority,
                sequence: record.sequence,
                flex: record.spec.flex,
                gpus_per_shard: record.spec.gpus_per_shard,
                shards: shards.len() as u32,
                min_shards: record.spec.shards.min.min(shards.len() as u32),
                cap_min,
                cap_max,
                curve: curves.curve,
                flex_curve: curves.flex_curve,
                probe: curves.probe,
                given_up_watts,
            });
        }
    }
    let others = (power.all_parked_watts - in_jobs_parked).max(0.0);
    let given_up: f64 = loads.iter().flat_map(|l| &l.given_up_watts).sum();
    let budget = gpu_budget_watts(available, &site, power.non_gpu_watts);
    let allocation = if with_domains {
        let domains: Vec<DomainLoad> = (0..power.tree.len())
            .map(|d| DomainLoad {
                limit_watts: power.domain_limits.get(d).copied().unwrap_or(power.tree.domains[d].limit_watts),
                others_watts: power.domain_non_gpu_watts[d]
                    + (power.domain_parked_watts[d] - domain_in_jobs_parked[d]).max(0.0),
            })
            .collect();
        allocate_within_domains(budget, &loads, &spreads, others, idle, &domains)
    } else {
        allocate(budget, &loads, others, idle)
    };
    Admission {
        allocation: Some(allocation),
        limit_watts: limit,
        budget_watts: budget,
        available_watts: available,
        non_gpu_watts: power.non_gpu_watts,
        // Every job paused: every shard given up.
        floor_watts: power.non_gpu_watts + others + given_up,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, watts: [f64; 2]) -> NodeCaps {
        let gpus = (0..2).map(|i| GpuCap {
            measured_watts: watts[i],
            ..GpuCap::new(i as u32, 200.0, 700.0, 200.0, 700.0, GpuWork::Idle)
        });
        NodeCaps::new(name.into(), gpus.collect(), 0.0)
    }

    fn view(nodes: &[(NodeCaps, f64)]) -> PowerView {
        let site = Site { idle_gpu_watts: 100.0, ..Site::default() };
        let mut view = PowerView::new(10_000.0, site);
        for (caps, non_gpu) in nodes {
            view.add_node(caps, *non_gpu);
        }
        view
    }

    #[test]
    fn a_view_refreshed_in_place_adds_up_to_exactly_one_built_anew() {
        let mut nodes =
            vec![(node("a", [50.0, 50.0]), 300.0), (node("b", [50.0, 50.0]), 300.0), (node("c", [50.0, 50.0]), 300.0)];
        let mut kept = view(&nodes);
        assert_eq!(kept.all_parked_watts, 600.0, "six idle GPUs at their 100 W allowance");
        // One GPU of b draws above its allowance, b's other draw moves, c stops enforcing.
        nodes[1].0.gpus[1].measured_watts = 180.0;
        nodes[1].1 = 420.5;
        nodes[2].0.enforcing = false;
        nodes[2].0.gpus[0].work = GpuWork::Foreign;
        for (position, (caps, non_gpu)) in nodes.iter().enumerate().skip(1) {
            kept.refresh_node(position, caps, *non_gpu);
        }
        assert_eq!(kept.all_parked_watts, 600.0, "not added up yet");
        kept.add_up();
        let anew = view(&nodes);
        assert!(kept.same_figures(&anew), "{kept:?} vs {anew:?}");
        // A foreign GPU on a node that does not enforce counts at its 700 W cap.
        assert_eq!(kept.all_parked_watts, 100.0 + 100.0 + 100.0 + 180.0 + 700.0 + 100.0);
        assert_eq!(kept.non_gpu_watts, 300.0 + 420.5 + 300.0);
        assert_eq!(kept.node("b", Some(1)).map(|g| g[1].parked_watts), Some(180.0));
        assert_eq!(kept.node("c", None).map(|g| g[0].parked_watts), Some(700.0));
    }
}
