//! The gang scheduler: a pure function from (nodes, running jobs, pending jobs) to a plan of
//! starts and preemptions. No clock, no I/O; the reconcile loop applies its plan.
//!
//! Policy:
//! - **Order.** Pending jobs are considered by priority (highest first), then submission order.
//! - **Gang.** A job starts with every shard placed or not at all; each shard's GPUs sit on one
//!   node. An elastic job starts at the largest shard count in `[min, max]` that fits.
//! - **Packing.** A job goes onto the fewest nodes: one node if any can hold every shard (the
//!   fullest such node: best fit), else the emptiest nodes first and the remainder best-fit. This
//!   keeps whole nodes free for large jobs. Within a node, the lowest-numbered free GPUs.
//! - **Preemption.** A job that does not fit may preempt running jobs of strictly lower priority
//!   (lowest priority first, newest first among equals) — only if that makes it fit, and only as
//!   many as it needs. Preempted jobs go back to waiting and resume from their checkpoint.
//! - **Backfill** (Kueue's "BestEffortFIFO"): when a job cannot start, later jobs that fit still
//!   start. Lower-priority backfill never delays a higher-priority job, which preempts it when it
//!   can start; within one priority a stream of small jobs can delay a large one, the price of
//!   not leaving GPUs idle without run-time estimates.
//!
//! - **Runtimes.** A job that names a training runtime goes only onto nodes whose agent offers
//!   it; while no node does, it waits saying so (nothing is preempted for it in vain).
//!
//! Capacity is indexed by free-GPU count per node, so one placement costs O(GPUs per node), not
//! O(nodes): the scheduler places thousands of shards a second at 25,000 nodes. A job that
//! names a runtime is placed by a walk over the nodes that may hold it instead.

use std::borrow::Cow;

use crate::spec::ShardRange;
use crate::NameMap;

/// A schedulable node: its name, the GPU indices jobs may use, the runtimes its agent offers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    pub name: String,
    pub gpus: Vec<u32>,
    pub runtimes: Vec<String>,
}

/// Anything the scheduler can place on: a [`Node`], or the decision's own view of a node, read
/// where it lies rather than copied into a `Node` each pass.
pub trait Schedulable {
    fn name(&self) -> &str;
    /// The GPU indices jobs may use (any order; duplicates count once).
    fn gpus(&self) -> &[u32];
    /// Whether its agent offers shards the training runtime `runtime`.
    fn offers(&self, runtime: &str) -> bool;
}

impl Schedulable for Node {
    fn name(&self) -> &str {
        &self.name
    }
    fn gpus(&self) -> &[u32] {
        &self.gpus
    }
    fn offers(&self, runtime: &str) -> bool {
        self.runtimes.iter().any(|r| r == runtime)
    }
}

impl<T: Schedulable + ?Sized> Schedulable for &T {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn gpus(&self) -> &[u32] {
        (**self).gpus()
    }
    fn offers(&self, runtime: &str) -> bool {
        (**self).offers(runtime)
    }
}

/// What the scheduler needs to know of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    pub name: String,
    pub priority: i64,
    /// Submission order: FIFO within a priority.
    pub sequence: u64,
    pub shards: ShardRange,
    pub gpus_per_shard: u32,
    /// The training runtime its shards need (`None`: any node).
    pub runtime: Option<String>,
}

/// One shard's place: a node and GPUs on it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardAssignment {
    pub node: String,
    pub gpus: Vec<u32>,
}

/// A job holding GPUs: its shards borrowed from its record where the caller has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningJob<'a> {
    pub request: JobRequest,
    pub shards: Cow<'a, [ShardAssignment]>,
    /// Where each shard's node is in the `nodes` given to [`schedule`], when the caller knows it
    /// (then no shard is looked up by name: at 25,000 nodes that lookup is most of a call).
    pub at: Option<&'a [Option<usize>]>,
}

impl RunningJob<'_> {
    /// Where shard `i`'s node is in `nodes` (`None`: not one of them).
    fn node_of<N: Schedulable>(&self, i: usize, nodes: &Locator<'_, N>) -> Option<usize> {
        let hint = self.at.and_then(|at| at.get(i).copied().flatten());
        nodes.find(&self.shards[i].node, hint)
    }
}

/// Finds a node's position in `nodes`: from the caller's hint when it has one, by name otherwise
/// (the index by name is built on first need only).
struct Locator<'a, N> {
    nodes: &'a [N],
    by_name: std::cell::OnceCell<NameMap<&'a str, usize>>,
}

impl<'a, N: Schedulable> Locator<'a, N> {
    fn new(nodes: &'a [N]) -> Self {
        Locator { nodes, by_name: std::cell::OnceCell::new() }
    }

    fn find(&self, name: &str, hint: Option<usize>) -> Option<usize> {
        if let Some(at) = hint.filter(|&at| at < self.nodes.len()) {
            debug_assert_eq!(self.nodes[at].name(), name, "a position hint names another node");
            return Some(at);
        }
        let by_name = self.by_name.get_or_init(|| self.nodes.iter().enumerate().map(|(i, n)| (n.name(), i)).collect());
        by_name.get(name).copied()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub job: String,
    pub shards: Vec<ShardAssignment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preemption {
    pub job: String,
    pub by: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub job: String,
    pub reason: WaitReason,
}

/// Why the scheduler left a job waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitReason {
    /// Zero GPUs a shard, zero shards, or a minimum above the maximum (validation keeps these out).
    InvalidRequest,
    /// Not enough GPUs free, even after preempting every lower-priority job it may.
    NoRoom { min_shards: usize, gpus_per_shard: usize, fit_now: usize },
    /// No ready node's agent offers the runtime it names.
    NoRuntime { runtime: String },
}

impl std::fmt::Display for WaitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitReason::InvalidRequest => f.write_str("invalid request"),
            WaitReason::NoRoom { min_shards, gpus_per_shard, fit_now } => write!(
                f,
                "waiting for room: needs {min_shards} shard(s) of {gpus_per_shard} GPU(s) on one node each; {fit_now} fit now"
            ),
            WaitReason::NoRuntime { runtime } => write!(
                f,
                "waiting for a node that offers runtime {runtime}: no ready node's agent does (its --runtimes, the chart's agent.runtimes)"
            ),
        }
    }
}

/// What to do: apply preemptions first (their GPUs are what some starts stand on), then starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub preemptions: Vec<Preemption>,
    pub starts: Vec<Start>,
    pub waiting: Vec<Waiting>,
}

/// Free GPUs per node, indexed by how many each node has free. Built once per call in flat
/// buffers (no allocation per node): at 25,000 nodes that is most of what a call costs.
struct Capacity<'a, N> {
    nodes: &'a [N],
    buf: Buffers,
    /// Whether nodes are in their buckets yet: the running jobs' GPUs are taken first, and the
    /// buckets filled once after, not moved between buckets for every shard.
    linked: bool,
}

/// A [`Capacity`]'s buffers. Those of the last one dropped on a thread are kept for the next:
/// a pass builds one over every node (megabytes at 25,000 nodes), and memory the allocator
/// handed back to the system between passes is faulted in again, page by page, on the next.
#[derive(Default)]
struct Buffers {
    /// Every node's GPUs, ascending and distinct: node `i`'s are `all[start[i]..start[i + 1]]`.
    all: Vec<u32>,
    start: Vec<usize>,
    /// Node `i`'s free GPUs, ascending: `free[start[i]..start[i] + free_len[i]]`, a subset of its
    /// GPUs, so it always fits in the same room.
    free: Vec<u32>,
    free_len: Vec<usize>,
    /// buckets[f] = nodes with exactly f free GPUs.
    buckets: Vec<Vec<usize>>,
    /// Where each node sits in its bucket.
    slot: Vec<usize>,
}

thread_local! {
    static SPARE: std::cell::RefCell<Buffers> = std::cell::RefCell::default();
}

impl<N> Drop for Capacity<'_, N> {
    fn drop(&mut self) {
        let spare = std::mem::take(&mut self.buf);
        SPARE.with(|cell| {
            if let Ok(mut kept) = cell.try_borrow_mut() {
                *kept = spare;
            }
        });
    }
}

impl<'a, N: Schedulable> Capacity<'a, N> {
    fn new(nodes: &'a [N]) -> Self {
        let Buffers { mut all, mut start, mut free, mut free_len, mut buckets, mut slot } =
            SPARE.with(|cell| cell.try_borrow_mut().map(|mut kept| std::mem::take(&mut *kept)).unwrap_or_default());
        all.clear();
        start.clear();
        for n in nodes {
            start.push(all.len());
            let gpus = n.gpus();
            if gpus.windows(2).all(|w| w[0] < w[1]) {
                all.extend_from_slice(gpus); // As agents list them: ascending, no copy to sort.
            } else {
                let mut sorted = gpus.to_vec();
                sorted.sort_unstable();
                sorted.dedup();
                all.extend(sorted);
            }
        }
        start.push(all.len());
        free_len.clear();
        free_len.extend(start.windows(2).map(|w| w[1] - w[0]));
        let most = free_len.iter().copied().max().unwrap_or(0);
        free.clear();
        free.extend_from_slice(&all);
        buckets.iter_mut().for_each(Vec::clear);
        buckets.resize_with(most + 1, Vec::new);
        slot.clear();
        slot.resize(nodes.len(), 0);
        Capacity { nodes, buf: Buffers { all, start, free, free_len, buckets, slot }, linked: false }
    }

    /// Put every node in the bucket of its free GPUs: from now on every change moves it.
    fn link_all(&mut self) {
        self.linked = true;
        for i in 0..self.nodes.len() {
            self.link(i);
        }
    }

    fn free_of(&self, node: usize) -> &[u32] {
        let from = self.buf.start[node];
        &self.buf.free[from..from + self.buf.free_len[node]]
    }

    fn unlink(&mut self, node: usize) {
        if !self.linked {
            return;
        }
        let bucket = &mut self.buf.buckets[self.buf.free_len[node]];
        let at = self.buf.slot[node];
        bucket.swap_remove(at);
        if let Some(&moved) = bucket.get(at) {
            self.buf.slot[moved] = at;
        }
    }

    fn link(&mut self, node: usize) {
        if !self.linked {
            return;
        }
        let f = self.buf.free_len[node];
        self.buf.slot[node] = self.buf.buckets[f].len();
        self.buf.buckets[f].push(node);
    }

    /// Mark `gpus` on `node` used. Returns false (and changes nothing) if any is not free.
    fn take(&mut self, node: usize, gpus: &[u32]) -> bool {
        let from = self.buf.start[node];
        let len = self.buf.free_len[node];
        // Shards list their GPUs ascending, as the free ones are: one merge checks them all.
        let ascending = gpus.windows(2).all(|w| w[0] < w[1]);
        let free = &self.buf.free[from..from + len];
        let all_free = if ascending {
            let mut rest = free.iter();
            gpus.iter().all(|g| rest.by_ref().any(|f| f == g))
        } else {
            gpus.iter().all(|g| free.binary_search(g).is_ok())
        };
        if !all_free {
            return false;
        }
        self.unlink(node);
        let mut kept = 0;
        for i in from..from + len {
            let g = self.buf.free[i];
            let taken = if ascending { gpus.binary_search(&g).is_ok() } else { gpus.contains(&g) };
            if !taken {
                self.buf.free[from + kept] = g;
                kept += 1;
            }
        }
        self.buf.free_len[node] = kept;
        self.link(node);
        true
    }

    /// Mark `gpus` on `node` free again: those the node has and that are not free already.
    fn give_back(&mut self, node: usize, gpus: &[u32]) {
        self.unlink(node);
        let (from, to) = (self.buf.start[node], self.buf.start[node + 1]);
        for g in gpus {
            let len = self.buf.free_len[node];
            let free = &mut self.buf.free[from..to];
            let Err(at) = free[..len].binary_search(g) else { continue };
            if self.buf.all[from..to].binary_search(g).is_err() {
                continue; // Not one of its GPUs.
            }
            free.copy_within(at..len, at + 1);
            free[at] = *g;
            self.buf.free_len[node] = len + 1;
        }
        self.link(node);
    }

    /// How many shards of `g` GPUs fit right now on nodes offering `runtime` (any node: `None`),
    /// counted up to `cap`.
    fn shards_that_fit(&self, g: usize, cap: usize, runtime: Option<&str>) -> usize {
        let mut total = 0;
        for f in (g..self.buf.buckets.len()).rev() {
            total += match runtime {
                None => self.buf.buckets[f].len(),
                Some(r) => self.buf.buckets[f].iter().filter(|&&n| self.nodes[n].offers(r)).count(),
            } * (f / g);
            if total >= cap {
                return cap;
            }
        }
        total
    }

    /// A node with exactly `f` free GPUs offering `runtime` (any: `None`), the last linked first.
    fn in_bucket(&self, f: usize, runtime: Option<&str>) -> Option<usize> {
        let bucket = &self.buf.buckets[f];
        match runtime {
            None => bucket.last().copied(),
            Some(r) => bucket.iter().rev().copied().find(|&n| self.nodes[n].offers(r)),
        }
    }

    /// Place `k` shards of `g` GPUs on nodes offering `runtime`, fewest nodes first. Caller
    /// checked that they fit.
    fn place(&mut self, k: usize, g: usize, runtime: Option<&str>) -> Vec<ShardAssignment> {
        let mut shards = Vec::with_capacity(k);
        let mut remaining = k;
        while remaining > 0 {
            // One node that holds the rest: the fullest such (best fit).
            let best_fit =
                (remaining * g..self.buf.buckets.len()).find_map(|f| self.in_bucket(f, runtime).map(|n| (n, f)));
            let (node, count) = match best_fit {
                Some((node, _)) => (node, remaining),
                None => {
                    // Otherwise the emptiest node, filled completely.
                    let emptiest =
                        (g..self.buf.buckets.len()).rev().find_map(|f| self.in_bucket(f, runtime).map(|n| (n, f)));
                    let Some((node, f)) = emptiest else {
                        break; // Unreachable when the caller checked capacity.
                    };
                    (node, f / g)
                }
            };
            let gpus: Vec<u32> = self.free_of(node)[..count * g].to_vec();
            self.take(node, &gpus);
            for chunk in gpus.chunks(g) {
                shards.push(ShardAssignment { node: self.nodes[node].name().to_owned(), gpus: chunk.to_vec() });
            }
            remaining -= count;
        }
        shards
    }
}

/// Decide which pending jobs start where, and which running jobs are preempted for them.
///
/// Running jobs whose shards name unknown nodes or GPUs are taken as they are (their GPUs are
/// not free); the caller moves jobs off lost nodes before calling.
pub fn schedule<N: Schedulable>(nodes: &[N], running: &[RunningJob], pending: &[JobRequest]) -> Plan {
    if pending.is_empty() {
        return Plan::default(); // Nothing to place, so nothing to preempt for.
    }
    let mut capacity = Capacity::new(nodes);
    let locate = Locator::new(nodes);
    for job in running {
        for (i, shard) in job.shards.iter().enumerate() {
            if let Some(node) = job.node_of(i, &locate) {
                capacity.take(node, &shard.gpus);
            }
        }
    }
    capacity.link_all();
    // Preemption candidates: lowest priority first, newest first among equals.
    let mut victims: Vec<&RunningJob<'_>> = running.iter().collect();
    victims
        .sort_by(|a, b| a.request.priority.cmp(&b.request.priority).then(b.request.sequence.cmp(&a.request.sequence)));
    let mut preempted = vec![false; victims.len()];

    let mut order: Vec<&JobRequest> = pending.iter().collect();
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.sequence.cmp(&b.sequence)));

    let mut plan = Plan::default();
    // Whether any ready node offers a runtime: one walk over the nodes per runtime named.
    let mut offered: NameMap<&str, bool> = NameMap::default();
    for job in order {
        let g = job.gpus_per_shard as usize;
        let (min, max) = (job.shards.min as usize, job.shards.max as usize);
        if g == 0 || min == 0 || min > max {
            plan.waiting.push(Waiting { job: job.name.clone(), reason: WaitReason::InvalidRequest });
            continue;
        }
        let runtime = job.runtime.as_deref();
        if let Some(r) = runtime {
            let any = *offered.entry(r).or_insert_with(|| nodes.iter().any(|n| !n.gpus().is_empty() && n.offers(r)));
            if !any {
                plan.waiting
                    .push(Waiting { job: job.name.clone(), reason: WaitReason::NoRuntime { runtime: r.into() } });
                continue;
            }
        }
        if capacity.shards_that_fit(g, min, runtime) < min {
            let freed = preempt_for(job, &mut capacity, &locate, &victims, &mut preempted);
            if freed.is_empty() {
                let free_shards = capacity.shards_that_fit(g, usize::MAX, runtime);
                plan.waiting.push(Waiting {
                    job: job.name.clone(),
                    reason: WaitReason::NoRoom { min_shards: min, gpus_per_shard: g, fit_now: free_shards },
                });
                continue;
            }
            for victim in freed {
                plan.preemptions.push(Preemption { job: victim, by: job.name.clone() });
            }
        }
        let k = capacity.shards_that_fit(g, max, runtime);
        plan.starts.push(Start { job: job.name.clone(), shards: capacity.place(k, g, runtime) });
    }
    plan
}

/// Preempt the fewest lower-priority jobs that make `job` fit at its minimum. Returns their
/// names (empty: preempting cannot make it fit, and nothing was changed).
fn preempt_for<N: Schedulable>(
    job: &JobRequest,
    capacity: &mut Capacity<'_, N>,
    locate: &Locator<'_, N>,
    victims: &[&RunningJob<'_>],
    preempted: &mut [bool],
) -> Vec<String> {
    let (g, min, runtime) = (job.gpus_per_shard as usize, job.shards.min as usize, job.runtime.as_deref());
    let release = |capacity: &mut Capacity<'_, N>, victim: &RunningJob<'_>| {
        for (i, shard) in victim.shards.iter().enumerate() {
            if let Some(node) = victim.node_of(i, locate) {
                capacity.give_back(node, &shard.gpus);
            }
        }
    };
    let retake = |capacity: &mut Capacity<'_, N>, victim: &RunningJob<'_>| {
        for (i, shard) in victim.shards.iter().enumerate() {
            if let Some(node) = victim.node_of(i, locate) {
                capacity.take(node, &shard.gpus);
            }
        }
    };
    let mut chosen = Vec::new();
    for (i, victim) in victims.iter().enumerate() {
        if victim.request.priority >= job.priority {
            break;
        }
        if preempted[i] {
            continue;
        }
        release(capacity, victim);
        chosen.push(i);
        if capacity.shards_that_fit(g, min, runtime) >= min {
            break;
        }
    }
    if capacity.shards_that_fit(g, min, runtime) < min {
        for &i in &chosen {
            retake(capacity, victims[i]);
        }
        return Vec::new();
    }
    // Spare every victim the job turns out not to need (the last one released is needed).
    let mut needed = Vec::new();
    for &i in chosen.iter().rev() {
        retake(capacity, victims[i]);
        if capacity.shards_that_fit(g, min, runtime) >= min {
            continue; // Fits without preempting this one: it keeps running.
        }
        release(capacity, victims[i]);
        needed.push(i);
    }
    needed.sort_unstable();
    needed
        .into_iter()
        .map(|i| {
            preempted[i] = true;
            victims[i].request.name.clone()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use proptest::prelude::*;

    use super::*;

    fn nodes(n: usize, gpus: u32) -> Vec<Node> {
        (0..n).map(|i| Node { name: format!("n{i}"), gpus: (0..gpus).collect(), runtimes: Vec::new() }).collect()
    }

    fn job(name: &str, priority: i64, sequence: u64, min: u32, max: u32, g: u32) -> JobRequest {
        JobRequest {
            name: name.into(),
            priority,
            sequence,
            shards: ShardRange { min, max },
            gpus_per_shard: g,
            runtime: None,
        }
    }

    fn run(plan: &Plan, pending: &[JobRequest]) -> Vec<RunningJob<'static>> {
        plan.starts
            .iter()
            .map(|s| RunningJob {
                request: pending.iter().find(|j| j.name == s.job).unwrap().clone(),
                shards: s.shards.clone().into(),
                at: None,
            })
            .collect()
    }

    #[test]
    fn a_job_goes_onto_the_fewest_nodes_and_leaves_whole_nodes_free() {
        let mut cluster = nodes(3, 8);
        cluster[1].gpus = vec![0, 1, 2, 3, 4, 5]; // n1 has 6 GPUs
        let plan = schedule(&cluster, &[], &[job("a", 0, 0, 1, 1, 4)]);
        assert_eq!(plan.starts[0].shards, vec![ShardAssignment { node: "n1".into(), gpus: vec![0, 1, 2, 3] }]);
        let plan = schedule(&cluster, &[], &[job("b", 0, 0, 3, 3, 4)]);
        let used: HashSet<_> = plan.starts[0].shards.iter().map(|s| s.node.clone()).collect();
        assert_eq!(used.len(), 2, "3 shards of 4 GPUs fit on two 8-GPU nodes: {plan:?}");
    }

    #[test]
    fn elastic_jobs_start_as_large_as_fits() {
        let plan = schedule(&nodes(2, 8), &[], &[job("e", 0, 0, 1, 10, 4)]);
        assert_eq!(plan.starts[0].shards.len(), 4);
        let plan = schedule(&nodes(1, 8), &[], &[job("e", 0, 0, 3, 10, 4)]);
        assert!(plan.starts.is_empty() && plan.waiting[0].job == "e", "min 3 shards of 4 cannot fit 8 GPUs");
    }

    #[test]
    fn a_higher_priority_job_preempts_the_lowest_newest_only_as_needed() {
        let cluster = nodes(2, 8);
        let running = vec![
            RunningJob {
                request: job("old-low", 1, 1, 1, 1, 8),
                shards: vec![ShardAssignment { node: "n0".into(), gpus: (0..8).collect() }].into(),
                at: None,
            },
            RunningJob {
                request: job("new-low", 1, 2, 1, 1, 8),
                shards: vec![ShardAssignment { node: "n1".into(), gpus: (0..8).collect() }].into(),
                at: None,
            },
        ];
        let plan = schedule(&cluster, &running, &[job("urgent", 5, 3, 1, 1, 8)]);
        assert_eq!(plan.preemptions, vec![Preemption { job: "new-low".into(), by: "urgent".into() }]);
        assert_eq!(plan.starts[0].shards[0].node, "n1");
        // Equal priority never preempts.
        let plan = schedule(&cluster, &running, &[job("peer", 1, 3, 1, 1, 8)]);
        assert!(plan.preemptions.is_empty() && plan.starts.is_empty());
        // Preemption that cannot make room preempts nothing.
        let plan = schedule(&cluster, &running, &[job("huge", 9, 3, 3, 3, 8)]);
        assert!(plan.preemptions.is_empty() && plan.starts.is_empty() && plan.waiting.len() == 1);
    }

    #[test]
    fn a_nodes_gpus_count_once_in_any_order_and_a_preempted_job_frees_only_gpus_the_node_has() {
        let cluster = vec![Node { name: "n0".into(), gpus: vec![3, 1, 1, 2, 0], runtimes: Vec::new() }];
        let plan = schedule(&cluster, &[], &[job("a", 0, 0, 1, 1, 4)]);
        assert_eq!(plan.starts[0].shards[0].gpus, vec![0, 1, 2, 3]);
        assert!(schedule(&cluster, &[], &[job("b", 0, 0, 1, 1, 5)]).starts.is_empty(), "4 distinct GPUs");

        // Preempting a job whose record names a GPU the node lacks (9) frees no GPU 9.
        let cluster = vec![Node { name: "n0".into(), gpus: vec![0, 1, 2, 3], runtimes: Vec::new() }];
        let holding = |name: &str, sequence, gpus: Vec<u32>| RunningJob {
            request: job(name, 0, sequence, 1, 1, gpus.len() as u32),
            shards: vec![ShardAssignment { node: "n0".into(), gpus }].into(),
            at: None,
        };
        let running = vec![holding("low", 0, vec![0, 1, 2, 3]), holding("ghost", 1, vec![9])];
        let plan = schedule(&cluster, &running, &[job("high", 5, 2, 1, 1, 1)]);
        assert_eq!(plan.preemptions, vec![Preemption { job: "low".into(), by: "high".into() }]);
        assert_eq!(plan.starts[0].shards[0].gpus, vec![0]);
    }

    #[test]
    fn running_shards_take_their_gpus_in_any_order_and_never_a_gpu_taken_already() {
        let cluster = nodes(1, 8);
        let holding = |name: &str, gpus: Vec<u32>| RunningJob {
            request: job(name, 9, 0, 1, 1, gpus.len() as u32),
            shards: vec![ShardAssignment { node: "n0".into(), gpus }].into(),
            at: Some(&[Some(0)]),
        };
        // Ascending (one merge), out of order (one search each), and one asking for a GPU the
        // first took: it takes nothing, not even its free GPU 7.
        let running = vec![holding("a", vec![0, 2, 4]), holding("b", vec![5, 1]), holding("c", vec![4, 7])];
        let plan = schedule(&cluster, &running, &[job("next", 0, 1, 1, 1, 3)]);
        assert_eq!(plan.starts[0].shards[0].gpus, vec![3, 6, 7]);
        assert!(schedule(&cluster, &running, &[job("more", 0, 1, 1, 1, 4)]).starts.is_empty(), "three free");
    }

    #[test]
    fn a_call_after_a_larger_one_sees_only_its_own_cluster() {
        // Calls on one thread reuse their buffers: nothing of the last cluster may be left.
        let first = schedule(&nodes(40, 8), &[], &[job("wide", 0, 0, 40, 40, 8)]);
        assert_eq!(first.starts[0].shards.len(), 40);
        let plan = schedule(&nodes(2, 4), &[], &[job("big", 0, 0, 1, 1, 8), job("fits", 0, 1, 2, 2, 4)]);
        assert_eq!(plan.waiting.len(), 1, "no 8-GPU node in a cluster of two 4-GPU nodes");
        let fits = &plan.starts[0].shards;
        assert_eq!(
            fits.iter().map(|s| (s.node.as_str(), s.gpus.clone())).collect::<Vec<_>>(),
            vec![("n1", vec![0, 1, 2, 3]), ("n0", vec![0, 1, 2, 3])]
        );
    }

    #[test]
    fn fifo_within_a_priority_and_backfill_behind_a_blocked_job() {
        let pending = vec![job("big", 0, 1, 3, 3, 8), job("small", 0, 2, 1, 1, 4), job("first", 0, 0, 1, 1, 4)];
        let plan = schedule(&nodes(2, 8), &[], &pending);
        let started: Vec<_> = plan.starts.iter().map(|s| s.job.as_str()).collect();
        assert_eq!(started, vec!["first", "small"], "first by order; big is blocked; small backfills");
        assert_eq!(plan.waiting[0].job, "big");
    }

    /// Runtimes nodes may offer ("a", "b") and jobs may ask for (also "c", which none offers).
    const RUNTIMES: [&str; 3] = ["a", "b", "c"];

    fn cluster_strategy() -> impl Strategy<Value = (Vec<Node>, Vec<JobRequest>, Vec<JobRequest>)> {
        let node = (prop::sample::select(vec![2u32, 4, 8]), 0usize..4);
        let nodes = prop::collection::vec(node, 1..8).prop_map(|sizes| {
            sizes
                .into_iter()
                .enumerate()
                .map(|(i, (n, offered))| Node {
                    name: format!("n{i}"),
                    gpus: (0..n).collect(),
                    // 0: none, 1: a, 2: b, 3: both.
                    runtimes: RUNTIMES[..2]
                        .iter()
                        .enumerate()
                        .filter(|(r, _)| offered & (1 << r) != 0)
                        .map(|(_, r)| r.to_string())
                        .collect(),
                })
                .collect::<Vec<_>>()
        });
        // Most jobs name no runtime; the rest one of the three.
        let one = (0i64..4, 1u32..4, 0u32..3, prop::sample::select(vec![1u32, 2, 4, 8]), 0usize..6);
        let jobs = prop::collection::vec(one, 0..12);
        (nodes, jobs.clone(), jobs).prop_map(|(nodes, first, second)| {
            let mk = |offset: u64, v: Vec<(i64, u32, u32, u32, usize)>| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (p, min, extra, g, runtime))| JobRequest {
                        runtime: RUNTIMES.get(runtime).map(|r| r.to_string()),
                        ..job(&format!("j{}", offset + i as u64), p, offset + i as u64, min, min + extra, g)
                    })
                    .collect::<Vec<_>>()
            };
            (nodes, mk(0, first), mk(100, second))
        })
    }

    /// Place the first wave on an empty cluster, then schedule the second wave against it.
    fn two_waves(nodes: &[Node], first: &[JobRequest], second: &[JobRequest]) -> (Vec<RunningJob<'static>>, Plan) {
        let initial = schedule(nodes, &[], first);
        let running = run(&initial, first);
        let plan = schedule(nodes, &running, second);
        (running, plan)
    }

    /// Can `job` fit in free GPUs plus those of running jobs with lower priority?
    fn fits_with_all_lower_removed(nodes: &[Node], running: &[RunningJob], job: &JobRequest) -> bool {
        let keep: Vec<RunningJob> = running.iter().filter(|r| r.request.priority >= job.priority).cloned().collect();
        let mut probe = job.clone();
        probe.shards.max = probe.shards.min;
        !schedule(nodes, &keep, &[probe]).starts.is_empty()
    }

    proptest! {
        #[test]
        fn no_gpu_is_ever_double_booked((nodes, first, second) in cluster_strategy()) {
            let (running, plan) = two_waves(&nodes, &first, &second);
            let preempted: HashSet<_> = plan.preemptions.iter().map(|p| p.job.clone()).collect();
            let mut used = HashSet::new();
            let still_running = running.iter().filter(|r| !preempted.contains(&r.request.name)).flat_map(|r| r.shards.iter());
            for shard in still_running.chain(plan.starts.iter().flat_map(|s| s.shards.iter())) {
                let node = nodes.iter().find(|n| n.name == shard.node).expect("known node");
                for gpu in &shard.gpus {
                    prop_assert!(node.gpus.contains(gpu), "GPU {gpu} not on {}", node.name);
                    prop_assert!(used.insert((shard.node.clone(), *gpu)), "GPU {gpu} on {} booked twice", shard.node);
                }
            }
        }

        #[test]
        fn a_shard_is_never_placed_on_a_node_lacking_its_runtime_and_a_runtime_none_offers_is_said((nodes, first, second) in cluster_strategy()) {
            let (running, plan) = two_waves(&nodes, &first, &second);
            let placed = running.iter().map(|r| (&r.request, r.shards.as_ref())).chain(
                plan.starts.iter().map(|s| (second.iter().find(|j| j.name == s.job).unwrap(), s.shards.as_slice())),
            );
            for (job, shards) in placed {
                let Some(runtime) = &job.runtime else { continue };
                for shard in shards {
                    let node = nodes.iter().find(|n| n.name == shard.node).unwrap();
                    prop_assert!(node.offers(runtime), "{} (runtime {runtime}) placed on {} offering {:?}", job.name, node.name, node.runtimes);
                }
            }
            for waiting in &plan.waiting {
                let job = second.iter().find(|j| j.name == waiting.job).unwrap();
                let offered = job.runtime.as_ref().is_none_or(|r| nodes.iter().any(|n| n.offers(r)));
                let said = matches!(&waiting.reason, WaitReason::NoRuntime { runtime } if Some(runtime) == job.runtime.as_ref());
                prop_assert_eq!(said, !offered, "{}: {}", job.name, waiting.reason);
            }
            for job in &second {
                if job.runtime.as_deref() == Some("c") {
                    prop_assert!(plan.waiting.iter().any(|w| w.job == job.name), "{} needs a runtime no node has", job.name);
                }
            }
        }

        #[test]
        fn gangs_are_all_or_none_and_within_their_range((nodes, first, second) in cluster_strategy()) {
            let (_, plan) = two_waves(&nodes, &first, &second);
            for start in &plan.starts {
                let spec = second.iter().find(|j| j.name == start.job).unwrap();
                let n = start.shards.len() as u32;
                prop_assert!(spec.shards.min <= n && n <= spec.shards.max, "{} started {n} shards of {:?}", spec.name, spec.shards);
                for shard in &start.shards {
                    prop_assert_eq!(shard.gpus.len() as u32, spec.gpus_per_shard, "a shard's GPUs are on one node");
                }
            }
            let started: HashSet<_> = plan.starts.iter().map(|s| s.job.clone()).collect();
            let waiting: HashSet<_> = plan.waiting.iter().map(|w| w.job.clone()).collect();
            prop_assert!(started.is_disjoint(&waiting));
            prop_assert_eq!(started.len() + waiting.len(), second.len(), "every pending job is started or waiting");
        }

        #[test]
        fn a_lower_priority_job_never_runs_while_a_higher_one_that_would_fit_waits((nodes, first, second) in cluster_strategy()) {
            let (running, plan) = two_waves(&nodes, &first, &second);
            let preempted: HashSet<_> = plan.preemptions.iter().map(|p| p.job.clone()).collect();
            let mut after: Vec<RunningJob> = running.into_iter().filter(|r| !preempted.contains(&r.request.name)).collect();
            after.extend(run(&plan, &second));
            for waiting in &plan.waiting {
                let w = second.iter().find(|j| j.name == waiting.job).unwrap();
                if after.iter().any(|r| r.request.priority < w.priority) {
                    prop_assert!(!fits_with_all_lower_removed(&nodes, &after, w), "{} waits but would fit", w.name);
                }
            }
        }

        #[test]
        fn preemption_happens_only_when_it_makes_the_job_fit((nodes, first, second) in cluster_strategy()) {
            let (running, plan) = two_waves(&nodes, &first, &second);
            let started: HashSet<_> = plan.starts.iter().map(|s| s.job.clone()).collect();
            let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for p in &plan.preemptions {
                by.entry(p.by.clone()).or_default().push(p.job.clone());
            }
            for (preemptor, victims) in by {
                prop_assert!(started.contains(&preemptor), "{preemptor} preempted {victims:?} but did not start");
                let prio = second.iter().find(|j| j.name == preemptor).unwrap().priority;
                for v in &victims {
                    let victim = running.iter().find(|r| &r.request.name == v).unwrap();
                    prop_assert!(victim.request.priority < prio, "{v} is not lower priority than {preemptor}");
                }
            }
        }
    }
}
