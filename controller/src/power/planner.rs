//! The transition planner and budget accounting: how the cluster moves from the caps in force to
//! the allocator's targets without drawing more than it may on the way.
//!
//! Accounting (invariant 1, every GPU counts): a GPU with a Watt shard counts at the highest cap
//! it may be drawing under — the cap it last acknowledged, or a higher one ordered and not yet
//! acknowledged. A lower cap counts only once acknowledged. A node that cannot be reached keeps
//! counting at those caps until its failsafe deadline has passed; after it, the agent has set its
//! failsafe caps by itself (it heard nothing for `failsafe_after`), and it counts at those. A GPU
//! with no work counts at the larger of `idle_gpu_watts` and its measured draw (never above its
//! cap); one drawing above idle with no Watt shard — someone else's process — counts at its cap
//! (or its draw, if higher).
//!
//! A node that does not enforce (dry-run or off) answers orders with the caps it really runs
//! under: it counts at those, has no failsafe (it sets nothing), and an order it answered is not
//! sent again until its target changes.
//!
//! Planning (invariant 2): every decrease is sent at once; increases wait until no decrease is
//! outstanding anywhere, then go out only as far as the headroom under the limit allows, and at
//! most `max_increase_nodes` nodes per pass, so that a thousand nodes never step up in the same
//! instant. Pure: state and time in, orders out. Times are milliseconds on the controller's
//! monotonic [`crate::clock::Clock`].

use std::borrow::Borrow;

/// An order sent and not yet acknowledged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InFlight {
    /// The cap ordered.
    pub target: f64,
    /// The highest cap the GPU may be at until this order is acknowledged: the target, or a
    /// higher cap of an earlier order that was never acknowledged.
    pub upper: f64,
    pub epoch: u64,
    pub sent_ms: i64,
}

/// An order not acknowledged this long is sent again (same cap, new epoch): acknowledgements
/// ride a reliable stream, but a session can drop between the order and its answer.
pub const RESEND_AFTER_MS: i64 = 2_000;

#[derive(Debug, Clone, PartialEq)]
pub struct GpuCap {
    pub index: u32,
    pub min_watts: f64,
    pub max_watts: f64,
    /// What the agent set when it lost the controller (by default the minimum).
    pub failsafe_watts: f64,
    /// The cap the agent last acknowledged as in force.
    pub acked_watts: f64,
    pub in_flight: Option<InFlight>,
    pub work: GpuWork,
    /// Its draw as last reported (0 before the first report).
    pub measured_watts: f64,
    /// A node that does not enforce answered an order for this cap: not sent again.
    pub answered_watts: Option<f64>,
}

/// What a GPU is doing, as the accounting sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuWork {
    /// No Watt shard, drawing no more than idle.
    #[default]
    Idle,
    /// A Watt shard is placed on it, or its agent reports one running.
    Watt,
    /// Drawing above idle with no Watt shard: a process Watt did not start.
    Foreign,
}

impl GpuCap {
    /// A GPU with `acked_watts` in force, nothing in flight, measured or answered yet.
    pub fn new(
        index: u32,
        min_watts: f64,
        max_watts: f64,
        failsafe_watts: f64,
        acked_watts: f64,
        work: GpuWork,
    ) -> Self {
        GpuCap {
            index,
            min_watts,
            max_watts,
            failsafe_watts,
            acked_watts,
            in_flight: None,
            work,
            measured_watts: 0.0,
            answered_watts: None,
        }
    }

    /// The highest cap this GPU may be drawing under.
    pub fn upper(&self) -> f64 {
        self.acked_watts.max(self.in_flight.map_or(0.0, |f| f.upper))
    }

    /// Whether `target` still has to be ordered: not already acknowledged, and not ordered
    /// recently enough to wait for.
    fn needs(&self, target: f64, now_ms: i64) -> bool {
        if self.answered_watts == Some(target) {
            return false;
        }
        match self.in_flight {
            Some(f) if f.target == target && now_ms - f.sent_ms < RESEND_AFTER_MS => false,
            Some(_) => true,
            // A node that does not enforce reads back its own limit, so a target that meets it
            // is still ordered once: its answer then names the order it now runs against,
            // instead of an older, lower one it would seem to overdraw forever.
            None => target != self.acked_watts || self.answered_watts.is_some(),
        }
    }

    fn counted(&self, failsafe: bool, idle_allowance: f64) -> f64 {
        self.counted_under(if failsafe { self.failsafe_watts } else { self.upper() }, idle_allowance)
    }

    /// What this GPU counts under `cap`, for its work.
    pub fn counted_under(&self, cap: f64, idle_allowance: f64) -> f64 {
        self.counted_as(self.work, cap, idle_allowance)
    }

    /// What this GPU would count under `cap` doing `work`.
    pub fn counted_as(&self, work: GpuWork, cap: f64, idle_allowance: f64) -> f64 {
        match work {
            GpuWork::Watt => cap,
            GpuWork::Foreign => cap.max(self.measured_watts),
            GpuWork::Idle => cap.min(idle_allowance.max(self.measured_watts)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeCaps {
    pub name: String,
    pub gpus: Vec<GpuCap>,
    /// Everything on the node that is not a GPU.
    pub overhead_watts: f64,
    pub reachable: bool,
    /// When an unreachable node's agent has gone to its failsafe caps by itself.
    pub failsafe_at_ms: i64,
    /// The agent sets the caps it is ordered (`--enforce on`); otherwise it only answers.
    pub enforcing: bool,
}

impl NodeCaps {
    /// A reachable node that enforces, with no failsafe deadline yet.
    pub fn new(name: String, gpus: Vec<GpuCap>, overhead_watts: f64) -> Self {
        NodeCaps { name, gpus, overhead_watts, reachable: true, failsafe_at_ms: i64::MAX, enforcing: true }
    }

    /// Unreachable for longer than its failsafe deadline: at failsafe caps by now. A node that
    /// does not enforce sets no failsafe caps either.
    pub fn failsafed(&self, now_ms: i64) -> bool {
        self.enforcing && !self.reachable && now_ms >= self.failsafe_at_ms
    }

    /// A node that does not enforce: what it counts above the caps it was ordered.
    pub fn unenforced_excess_watts(&self, idle_allowance: f64) -> f64 {
        if self.enforcing {
            return 0.0;
        }
        self.gpus
            .iter()
            .filter_map(|g| {
                let ordered = g.answered_watts?;
                Some((g.counted_under(g.upper(), idle_allowance) - g.counted_under(ordered, idle_allowance)).max(0.0))
            })
            .sum()
    }

    pub fn counted_watts(&self, now_ms: i64, idle_allowance: f64) -> f64 {
        let failsafe = self.failsafed(now_ms);
        self.overhead_watts + self.gpus.iter().map(|g| g.counted(failsafe, idle_allowance)).sum::<f64>()
    }

    /// A decrease that is sent and not acknowledged, on a node that may still be drawing above it.
    pub fn decrease_outstanding(&self, now_ms: i64) -> bool {
        !self.failsafed(now_ms) && self.gpus.iter().any(|g| g.in_flight.is_some_and(|f| f.target < g.upper()))
    }
}

/// Σ counted watts of every node.
pub fn counted_watts<N: Borrow<NodeCaps>>(nodes: &[N], now_ms: i64, idle_allowance: f64) -> f64 {
    nodes.iter().map(|n| n.borrow().counted_watts(now_ms, idle_allowance)).sum()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Decrease,
    Increase,
}

/// Caps to order on one node: (GPU index, watts).
#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    /// Where the node is in the `nodes` given to [`plan`].
    pub node: usize,
    pub phase: Phase,
    pub caps: Vec<(u32, f64)>,
}

/// The orders to send now. `targets[n][i]` is the target cap of `nodes[n].gpus[i]`;
/// `limit_watts` is what counted draw must stay under (available × (1 − reserve) / PUE).
///
/// Phase 1 ([`decreases`]) on every node; phase 2 ([`increases`]) only when phase 1 orders
/// nothing and no decrease is outstanding anywhere. The shell runs the same two phases fused
/// with its walk over the registry (see `Controller::enforce`).
pub fn plan<N: Borrow<NodeCaps>, T: AsRef<[f64]>>(
    nodes: &[N],
    targets: &[T],
    limit_watts: f64,
    now_ms: i64,
    idle_allowance: f64,
    max_increase_nodes: usize,
) -> Vec<Order> {
    plan_within(nodes, targets, limit_watts, now_ms, idle_allowance, max_increase_nodes, &mut DomainRoom::default())
}

/// [`plan`], with increases also within every power domain's headroom.
pub fn plan_within<N: Borrow<NodeCaps>, T: AsRef<[f64]>>(
    nodes: &[N],
    targets: &[T],
    limit_watts: f64,
    now_ms: i64,
    idle_allowance: f64,
    max_increase_nodes: usize,
    domains: &mut DomainRoom,
) -> Vec<Order> {
    let mut orders = Vec::new();
    let mut buffer = Vec::new();
    for (n, node) in nodes.iter().map(Borrow::borrow).enumerate() {
        if let Some(caps) = decreases(node, row(targets, n), now_ms, &mut buffer) {
            orders.push(Order { node: n, phase: Phase::Decrease, caps });
        }
    }
    if !orders.is_empty() || nodes.iter().any(|n| n.borrow().decrease_outstanding(now_ms)) {
        return orders;
    }
    increases_within(nodes, targets, limit_watts, now_ms, idle_allowance, max_increase_nodes, domains)
}

/// `targets[n]`, or no targets.
fn row<T: AsRef<[f64]>>(targets: &[T], n: usize) -> &[f64] {
    targets.get(n).map_or(&[], AsRef::as_ref)
}

/// Phase 1 on one node: the caps to lower now, every one at once — `None` if there are none or
/// the node cannot be reached. `buffer` gathers them, so that a pass that orders nothing on a node
/// allocates nothing for it.
pub fn decreases(
    node: &NodeCaps,
    targets: &[f64],
    now_ms: i64,
    buffer: &mut Vec<(u32, f64)>,
) -> Option<Vec<(u32, f64)>> {
    if !node.reachable {
        return None;
    }
    buffer.clear();
    buffer.extend(
        node.gpus
            .iter()
            .zip(targets)
            .filter_map(|(g, &t)| (t < g.upper() && g.needs(t, now_ms)).then_some((g.index, t))),
    );
    (!buffer.is_empty()).then(|| buffer.clone())
}

/// What the power domains leave for increases (invariant 13): per node (as the nodes planned
/// over), the domains it is in; per domain, the headroom under its limit now.
#[derive(Debug, Clone, Default)]
pub struct DomainRoom<'a> {
    pub paths: Vec<&'a [u32]>,
    pub headroom: Vec<f64>,
}

impl DomainRoom<'_> {
    /// The room node `n`'s domains leave (infinite in none).
    fn of(&self, n: usize) -> f64 {
        let path = self.paths.get(n).copied().unwrap_or_default();
        path.iter().map(|&d| self.headroom[d as usize]).fold(f64::INFINITY, f64::min)
    }

    fn take(&mut self, n: usize, watts: f64) {
        for &d in self.paths.get(n).copied().unwrap_or_default() {
            self.headroom[d as usize] -= watts;
        }
    }
}

/// Phase 2: increases, within the headroom under `limit_watts`, on at most `max_increase_nodes`
/// nodes, in node order. Only once no decrease is planned or outstanding anywhere (see [`plan`]).
pub fn increases<N: Borrow<NodeCaps>, T: AsRef<[f64]>>(
    nodes: &[N],
    targets: &[T],
    limit_watts: f64,
    now_ms: i64,
    idle_allowance: f64,
    max_increase_nodes: usize,
) -> Vec<Order> {
    increases_within(
        nodes,
        targets,
        limit_watts,
        now_ms,
        idle_allowance,
        max_increase_nodes,
        &mut DomainRoom::default(),
    )
}

/// [`increases`], each node's also within the headroom of every power domain it is in.
pub fn increases_within<N: Borrow<NodeCaps>, T: AsRef<[f64]>>(
    nodes: &[N],
    targets: &[T],
    limit_watts: f64,
    now_ms: i64,
    idle_allowance: f64,
    max_increase_nodes: usize,
    domains: &mut DomainRoom,
) -> Vec<Order> {
    let mut orders = Vec::new();
    let mut site_headroom = limit_watts - counted_watts(nodes, now_ms, idle_allowance);
    for (n, node) in nodes.iter().map(Borrow::borrow).enumerate().filter(|(_, node)| node.reachable) {
        if orders.len() >= max_increase_nodes || site_headroom <= 0.0 {
            break;
        }
        // A node in a full domain waits; the next one, elsewhere, may still rise.
        let headroom = site_headroom.min(domains.of(n));
        if headroom <= 0.0 {
            continue;
        }
        let targets = row(targets, n);
        let raise = |(g, &t): (&GpuCap, &f64)| (t >= g.upper() && g.needs(t, now_ms)).then_some(t);
        let caps: Vec<(u32, f64)> =
            node.gpus.iter().zip(targets).filter_map(|(g, t)| raise((g, t)).map(|t| (g.index, t))).collect();
        if caps.is_empty() {
            continue;
        }
        // What the node counts once the increase is sent: it counts from that moment.
        let mut raised = node.clone();
        for (g, t) in raised.gpus.iter_mut().zip(targets) {
            if let Some(t) = raise((g, t)) {
                g.in_flight = Some(InFlight { target: t, upper: t, epoch: 0, sent_ms: now_ms });
            }
        }
        let before = node.counted_watts(now_ms, idle_allowance);
        let cost = raised.counted_watts(now_ms, idle_allowance) - before;
        if cost <= headroom {
            site_headroom -= cost;
            domains.take(n, cost);
            orders.push(Order { node: n, phase: Phase::Increase, caps });
            continue;
        }
        // Not all of it fits (a ramp limit, or headroom another node took): each GPU goes the
        // same share of its way, as far as the headroom allows, and the rest on later passes.
        // Steps too small to be worth an order wait for more headroom.
        let share = headroom / cost;
        if headroom < MIN_PARTIAL_STEP_WATTS * caps.len() as f64 {
            if headroom < site_headroom {
                continue; // Its domain is nearly full; the site may still have room elsewhere.
            }
            break;
        }
        let partial: Vec<(u32, f64)> = caps
            .iter()
            .map(|&(index, t)| {
                let from = node.gpus.iter().find(|g| g.index == index).map_or(t, GpuCap::upper);
                (index, (from + share * (t - from)).floor().clamp(from.min(t), t))
            })
            .collect();
        for (g, &(_, t)) in raised.gpus.iter_mut().filter(|g| caps.iter().any(|c| c.0 == g.index)).zip(&partial) {
            g.in_flight = Some(InFlight { target: t, upper: t, epoch: 0, sent_ms: now_ms });
        }
        let cost = raised.counted_watts(now_ms, idle_allowance) - before;
        if cost <= headroom && cost > 0.0 {
            site_headroom -= cost;
            domains.take(n, cost);
            orders.push(Order { node: n, phase: Phase::Increase, caps: partial });
        }
        if headroom < site_headroom {
            continue; // Its domain is full now; the site may still have room elsewhere.
        }
        break;
    }
    orders
}

/// The least a partial increase raises per GPU, on average: smaller steps wait for headroom.
pub const MIN_PARTIAL_STEP_WATTS: f64 = 5.0;

/// Record that `order` was sent with `epoch` at `now`.
pub fn mark_sent(node: &mut NodeCaps, order: &Order, epoch: u64, now_ms: i64) {
    for &(index, watts) in &order.caps {
        if let Some(g) = node.gpus.iter_mut().find(|g| g.index == index) {
            // Until acknowledged, the GPU may still be at an earlier, higher, unacknowledged cap.
            let upper = watts.max(g.in_flight.map_or(0.0, |f| f.upper));
            g.in_flight = Some(InFlight { target: watts, upper, epoch, sent_ms: now_ms });
        }
    }
}

/// Record an acknowledgement: `applied` are the caps in force after the order of `epoch`.
///
/// An acknowledgement of an older order that already shows the cap in flight clears it too:
/// agents apply orders in epoch order and ignore older ones, so once the target is in force no
/// earlier, higher cap can come back. Without this a loaded cluster whose acknowledgements take
/// longer than [`RESEND_AFTER_MS`] would chase its own resends.
///
/// `enforced: false` (a dry-run or off agent) records the answer: the GPU counts at what it
/// reads back, and the order's target is not sent again.
pub fn apply_ack(node: &mut NodeCaps, epoch: u64, applied: &[(u32, f64)], enforced: bool) {
    node.enforcing = enforced;
    for &(index, watts) in applied {
        if let Some(g) = node.gpus.iter_mut().find(|g| g.index == index) {
            g.acked_watts = watts;
            let answered = g.in_flight.filter(|f| f.epoch <= epoch).map(|f| f.target);
            if g.in_flight.is_some_and(|f| f.epoch <= epoch || f.target == watts) {
                g.in_flight = None;
            }
            if enforced {
                g.answered_watts = None;
            } else if answered.is_some() {
                g.answered_watts = answered;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::power::allocator::{allocate, JobLoad};
    use crate::power::curve::Curve;

    const IDLE: f64 = 100.0;

    fn node(name: &str, gpus: u32, cap: f64) -> NodeCaps {
        let gpus = (0..gpus).map(|index| GpuCap::new(index, 200.0, 700.0, 200.0, cap, GpuWork::Watt)).collect();
        NodeCaps::new(name.into(), gpus, 0.0)
    }

    #[test]
    fn an_increase_that_does_not_fit_goes_part_of_the_way_and_the_rest_later() {
        // Two nodes of 4 GPUs at 300 W, both to 700 W: 3.2 kW of increases, 1 kW of headroom.
        let mut nodes = vec![node("a", 4, 300.0), node("b", 4, 300.0)];
        let targets = vec![vec![700.0; 4], vec![700.0; 4]];
        let counted = counted_watts(&nodes, 0, IDLE);
        let orders = increases(&nodes, &targets, counted + 1_000.0, 0, IDLE, 100);
        assert_eq!(orders, vec![Order { node: 0, phase: Phase::Increase, caps: (0..4).map(|i| (i, 550.0)).collect() }]);
        mark_sent(&mut nodes[0], &orders[0], 1, 0);
        assert_eq!(counted_watts(&nodes, 0, IDLE), counted + 1_000.0, "to the headroom, not beyond");
        // Headroom too small to be worth an order: nothing, and nothing is lost — the target stands.
        let counted = counted_watts(&nodes, 0, IDLE);
        assert!(increases(&nodes, &targets, counted + 19.0, 0, IDLE, 100).is_empty());
        let orders = increases(&nodes, &targets, counted + 800.0, 10, IDLE, 100);
        assert_eq!(orders[0].caps, (0..4).map(|i| (i, 700.0)).collect::<Vec<_>>(), "a's last 600 W fit: {orders:?}");
        assert_eq!(orders[1].caps, (0..4).map(|i| (i, 350.0)).collect::<Vec<_>>(), "b starts on the rest: {orders:?}");
    }

    #[test]
    fn decreases_go_first_and_increases_wait_for_their_acknowledgement() {
        let mut nodes = vec![node("a", 2, 700.0), node("b", 2, 300.0)];
        let targets = vec![vec![400.0, 400.0], vec![600.0, 600.0]];
        let orders = plan(&nodes, &targets, 10_000.0, 0, IDLE, 100);
        assert_eq!(orders, vec![Order { node: 0, phase: Phase::Decrease, caps: vec![(0, 400.0), (1, 400.0)] }]);
        mark_sent(&mut nodes[0], &orders[0], 1, 0);
        assert_eq!(counted_watts(&nodes, 0, IDLE), 2_000.0, "a counts at 700 W until it acknowledges");
        assert!(plan(&nodes, &targets, 10_000.0, 0, IDLE, 100).is_empty(), "no increase while a decrease is out");
        apply_ack(&mut nodes[0], 1, &[(0, 400.0), (1, 400.0)], true);
        let orders = plan(&nodes, &targets, 10_000.0, 0, IDLE, 100);
        assert_eq!(orders[0].phase, Phase::Increase);
        mark_sent(&mut nodes[1], &orders[0], 2, 0);
        assert_eq!(counted_watts(&nodes, 0, IDLE), 2_000.0, "an increase counts from the moment it is sent");
    }

    #[test]
    fn an_unreachable_node_counts_at_its_old_cap_until_its_failsafe_deadline() {
        let mut nodes = vec![node("a", 1, 700.0), node("b", 1, 200.0)];
        nodes[0].reachable = false;
        nodes[0].gpus[0].in_flight = Some(InFlight { target: 300.0, upper: 300.0, epoch: 1, sent_ms: 9_000 });
        nodes[0].failsafe_at_ms = 10_000;
        let targets = vec![vec![300.0], vec![600.0]];
        assert_eq!(counted_watts(&nodes, 9_999, IDLE), 900.0);
        assert!(plan(&nodes, &targets, 1_000.0, 9_999, IDLE, 100).is_empty(), "its decrease is still outstanding");
        assert_eq!(counted_watts(&nodes, 10_000, IDLE), 400.0, "past the deadline: at its failsafe cap");
        let orders = plan(&nodes, &targets, 1_000.0, 10_000, IDLE, 100);
        assert_eq!(orders, vec![Order { node: 1, phase: Phase::Increase, caps: vec![(0, 600.0)] }]);
    }

    #[test]
    fn a_late_acknowledgement_of_the_same_cap_settles_a_resent_order() {
        let mut nodes = vec![node("a", 1, 700.0)];
        let targets = vec![vec![400.0]];
        let first = plan(&nodes, &targets, 1e9, 0, IDLE, 10);
        mark_sent(&mut nodes[0], &first[0], 1, 0);
        // No answer within the resend time: the same cap goes out again, at a new epoch.
        let again = plan(&nodes, &targets, 1e9, RESEND_AFTER_MS, IDLE, 10);
        assert_eq!(again, first);
        mark_sent(&mut nodes[0], &again[0], 2, RESEND_AFTER_MS);
        // The first order's acknowledgement arrives: the cap in force is the target.
        apply_ack(&mut nodes[0], 1, &[(0, 400.0)], true);
        assert_eq!(nodes[0].gpus[0].in_flight, None);
        assert!(plan(&nodes, &targets, 1e9, RESEND_AFTER_MS + 1, IDLE, 10).is_empty());
    }

    #[test]
    fn increases_are_staggered_and_held_to_the_headroom() {
        let nodes: Vec<NodeCaps> = (0..10).map(|i| node(&format!("n{i}"), 1, 200.0)).collect();
        let targets: Vec<Vec<f64>> = (0..10).map(|_| vec![700.0]).collect();
        assert_eq!(plan(&nodes, &targets, 1e9, 0, IDLE, 3).len(), 3, "at most 3 nodes per pass");
        // Headroom for two increases of 500 W only.
        assert_eq!(plan(&nodes, &targets, 2_000.0 + 1_000.0, 0, IDLE, 100).len(), 2);
    }

    #[test]
    fn a_node_that_does_not_enforce_is_answered_once_per_target_and_counts_at_what_it_runs_under() {
        let mut nodes = vec![node("dry", 2, 700.0)];
        nodes[0].enforcing = false;
        let targets = vec![vec![400.0, 400.0]];
        let orders = plan(&nodes, &targets, 10_000.0, 0, IDLE, 10);
        assert_eq!(orders.len(), 1);
        mark_sent(&mut nodes[0], &orders[0], 1, 0);
        // It answers with the limits it reads back: nothing changed.
        apply_ack(&mut nodes[0], 1, &[(0, 700.0), (1, 700.0)], false);
        assert_eq!(counted_watts(&nodes, 0, IDLE), 1_400.0, "counted at what it really runs under");
        assert_eq!(nodes[0].unenforced_excess_watts(IDLE), 600.0, "300 W above each order");
        for later in [1, RESEND_AFTER_MS, 10 * RESEND_AFTER_MS] {
            assert!(plan(&nodes, &targets, 10_000.0, later, IDLE, 10).is_empty(), "answered: not sent again");
        }
        assert!(!nodes[0].decrease_outstanding(0));
        // A new target is ordered once.
        let lower = vec![vec![300.0, 300.0]];
        let orders = plan(&nodes, &lower, 10_000.0, 1, IDLE, 10);
        assert_eq!(orders[0].caps, vec![(0, 300.0), (1, 300.0)]);
        // A target that meets the limit it reads back is ordered once too, so that its excess is
        // judged against the order it runs against now, not against the 300 W before.
        let mark = |nodes: &mut Vec<NodeCaps>, orders: &[Order], epoch: u64| {
            mark_sent(&mut nodes[0], &orders[0], epoch, 2);
            apply_ack(&mut nodes[0], epoch, &[(0, 700.0), (1, 700.0)], false);
        };
        mark(&mut nodes, &orders, 2);
        let full = vec![vec![700.0, 700.0]];
        let orders = plan(&nodes, &full, 10_000.0, 3, IDLE, 10);
        assert_eq!(orders[0].caps, vec![(0, 700.0), (1, 700.0)]);
        mark(&mut nodes, &orders, 3);
        assert_eq!(nodes[0].unenforced_excess_watts(IDLE), 0.0, "running at its order");
        assert!(plan(&nodes, &full, 10_000.0, 4 + 10 * RESEND_AFTER_MS, IDLE, 10).is_empty(), "and once only");
        // Unreachable past its failsafe deadline it is still at its own caps: it sets nothing.
        nodes[0].reachable = false;
        nodes[0].failsafe_at_ms = 0;
        assert!(!nodes[0].failsafed(1) && counted_watts(&nodes, 1, IDLE) == 1_400.0);
    }

    #[test]
    fn every_gpu_counts_idle_ones_at_the_larger_of_the_allowance_and_their_draw_foreign_ones_at_their_cap() {
        let mut n = node("n", 3, 200.0);
        n.gpus[0].work = GpuWork::Idle;
        n.gpus[0].measured_watts = 70.0;
        n.gpus[1].work = GpuWork::Idle;
        n.gpus[1].measured_watts = 130.0;
        n.gpus[2].work = GpuWork::Foreign;
        n.gpus[2].measured_watts = 198.0;
        assert_eq!(n.counted_watts(0, IDLE), 100.0 + 130.0 + 200.0);
        n.gpus[2].acked_watts = 700.0;
        assert_eq!(n.counted_watts(0, IDLE), 100.0 + 130.0 + 700.0, "a foreign load counts at its cap");
        n.gpus[1].measured_watts = 900.0;
        assert_eq!(n.gpus[1].counted_under(200.0, IDLE), 200.0, "never above its cap");
    }

    /// An order an agent applied: (epoch, caps), its acknowledgement on the way.
    type Sent = (u64, Vec<(u32, f64)>);

    /// A node reconnects and registers with the caps in force: its failsafe caps if its
    /// deadline passed, else the last ones it applied; what it had not acknowledged is gone.
    fn reconnect(node: &mut NodeCaps, in_force: &mut [f64], unacked: &mut Vec<Sent>, now: i64) {
        let at_failsafe = node.failsafed(now);
        for (k, g) in node.gpus.iter_mut().enumerate() {
            if at_failsafe {
                in_force[k] = g.failsafe_watts;
            }
            g.acked_watts = in_force[k];
            g.in_flight = None;
        }
        unacked.clear();
        node.reachable = true;
    }

    /// Send `orders` as the controller does: each with the next epoch, applied by its agent at
    /// once, its acknowledgement on its way.
    fn send(
        nodes: &mut [NodeCaps],
        orders: &[Order],
        epoch: &mut u64,
        now: i64,
        in_force: &mut [Vec<f64>],
        unacked: &mut [Vec<Sent>],
    ) {
        for order in orders {
            let i = order.node;
            *epoch += 1;
            mark_sent(&mut nodes[i], order, *epoch, now);
            for &(gpu, w) in &order.caps {
                in_force[i][gpu as usize] = w;
            }
            unacked[i].push((*epoch, order.caps.clone()));
        }
    }

    /// A random run: budget changes, acks delayed or lost, nodes unreachable and back, time.
    #[derive(Debug, Clone)]
    enum Step {
        Budget(f64),
        Deliver {
            node: usize,
            lose: bool,
        },
        Cut(usize),
        Heal(usize),
        /// What the node's GPUs without work draw now (above idle: someone else's process).
        Draw(usize, f64),
        Wait(i64),
        /// A job arrives, or finishes.
        Toggle(usize),
        /// A job's learned speed curve moves (its exponent, and the one its flex is kept on).
        /// Job j's curve and flex curve learned anew, and whether it is to be probed.
        Relearn(usize, f64, f64, bool),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0.2f64..1.0).prop_map(Step::Budget),
            (0usize..6, prop::bool::weighted(0.2)).prop_map(|(node, lose)| Step::Deliver { node, lose }),
            (0usize..6).prop_map(Step::Cut),
            (0usize..6).prop_map(Step::Heal),
            (0usize..6, prop_oneof![Just(70.0), 90.0f64..260.0]).prop_map(|(n, w)| Step::Draw(n, w)),
            (100i64..6_000).prop_map(Step::Wait),
            (0usize..3).prop_map(Step::Toggle),
            (0usize..3, 0.02f64..0.95, 0.0f64..0.3, prop::bool::ANY)
                .prop_map(|(j, e, margin, probe)| Step::Relearn(j, e, margin, probe)),
        ]
    }

    /// Node i holds shard i % 2 of job i / 2 (when that job is there): targets from the
    /// allocation, and which GPUs work.
    fn targets_for(nodes: &mut [NodeCaps], alloc: &crate::power::allocator::Allocation) -> Vec<Vec<f64>> {
        let mut targets = Vec::new();
        for (i, n) in nodes.iter_mut().enumerate() {
            let name = format!("j{}", i / 2);
            let working =
                alloc.jobs.iter().find(|j| j.name == name).is_some_and(|j| !j.paused && (i % 2 == 0 || j.shards == 2));
            let j = alloc.jobs.iter().find(|j| j.name == name);
            for g in &mut n.gpus {
                g.work = classify(working, g.measured_watts);
            }
            let Some(j) = j else {
                targets.push(vec![200.0; 4]);
                continue;
            };
            targets.push(vec![if working { j.cap_watts } else { 200.0 }; 4]);
        }
        targets
    }

    /// As the controller classifies: a shard's GPUs work for Watt; others above idle are foreign.
    fn classify(working: bool, measured: f64) -> GpuWork {
        if working {
            GpuWork::Watt
        } else if measured > IDLE {
            GpuWork::Foreign
        } else {
            GpuWork::Idle
        }
    }

    /// Placed GPUs of `running` (node i holds shard i % 2 of job i / 2), and every other GPU at
    /// its floor: what the allocator must leave for GPUs outside its jobs.
    fn others_watts(nodes: &[NodeCaps], running: &[JobLoad]) -> f64 {
        nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| !running.iter().any(|j| j.name == format!("j{}", i / 2)))
            .flat_map(|(_, n)| n.gpus.iter())
            .map(|g| g.counted_as(classify(false, g.measured_watts), g.min_watts, IDLE))
            .sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn budget_safety_and_decrease_before_increase_hold_at_every_step_through_cuts_arrivals_lost_acks_cut_links_and_learned_curves(steps in prop::collection::vec(step(), 1..60)) {
            const FAILSAFE_MS: i64 = 10_000;
            let mut nodes: Vec<NodeCaps> = (0..6).map(|i| node(&format!("n{i}"), 4, 200.0)).collect();
            // Three 2-node jobs of 1×4 GPUs... each node holds one 4-GPU shard of some job.
            let mut jobs: Vec<JobLoad> = (0..3).map(|j| JobLoad {
                name: format!("j{j}"), priority: j, sequence: j as u64, flex: 0.1 * j as f64, gpus_per_shard: 4,
                shards: 2, min_shards: 1, cap_min: 200.0, cap_max: 700.0, curve: Curve::default(), flex_curve: Curve::default(), probe: false,
                given_up_watts: Vec::new(),
            }).collect();
            let mut present = [true; 3];
            let full = 24.0 * 700.0;
            let mut limit = full;
            let mut now = 0i64;
            let mut epoch = 0u64;
            // Orders delivered to (and applied by) agents, waiting for their ack to come back.
            let mut unacked: Vec<Vec<Sent>> = vec![Vec::new(); 6];
            // The caps each agent has in force.
            let mut in_force: Vec<Vec<f64>> = vec![vec![200.0; 4]; 6];
            let mut last_heard = [0i64; 6];
            for s in steps {
                match s {
                    Step::Budget(share) => limit = full * share,
                    Step::Deliver { node, lose } => {
                        if nodes[node].reachable && !unacked[node].is_empty() {
                            let (e, caps) = unacked[node].remove(0);
                            if !lose { apply_ack(&mut nodes[node], e, &caps, true); last_heard[node] = now; }
                        }
                    }
                    Step::Cut(n) => { nodes[n].reachable = false; nodes[n].failsafe_at_ms = last_heard[n] + FAILSAFE_MS; }
                    Step::Heal(n) => {
                        if !nodes[n].reachable {
                            reconnect(&mut nodes[n], &mut in_force[n], &mut unacked[n], now);
                            last_heard[n] = now;
                        }
                    }
                    Step::Toggle(j) => {
                        present[j] = !present[j];
                        // Watt's job takes its nodes back: whatever else ran there is gone.
                        if present[j] {
                            for g in nodes[2 * j..2 * j + 2].iter_mut().flat_map(|n| n.gpus.iter_mut()) { g.measured_watts = 0.0; }
                        }
                    }
                    // Someone else's load, on a node whose job is gone (a placed job's GPUs are Watt's).
                    Step::Draw(n, w) => if !present[n / 2] { for g in &mut nodes[n].gpus { g.measured_watts = w; } },
                    Step::Relearn(j, exponent, margin, probe) => {
                        jobs[j].curve = Curve { exponent };
                        jobs[j].flex_curve = Curve { exponent: (exponent + margin).min(0.95) };
                        jobs[j].probe = probe;
                    }
                    Step::Wait(ms) => {
                        now += ms;
                        for (i, n) in nodes.iter().enumerate() { if n.reachable { last_heard[i] = now; } }
                    }
                }
                // The controller's pass: allocate, plan, send.
                let running: Vec<JobLoad> = jobs.iter().zip(present).filter(|(_, p)| *p).map(|(j, _)| j.clone()).collect();
                let others = others_watts(&nodes, &running);
                let targets = targets_for(&mut nodes, &allocate(limit, &running, others, IDLE));
                let before = counted_watts(&nodes, now, IDLE);
                let outstanding = nodes.iter().any(|n| n.decrease_outstanding(now));
                let orders = plan(&nodes, &targets, limit, now, IDLE, 2);
                for order in &orders {
                    let i = order.node;
                    for &(gpu, w) in &order.caps {
                        let g = nodes[i].gpus.iter().find(|g| g.index == gpu).unwrap();
                        prop_assert!(w >= g.min_watts && w <= g.max_watts, "cap {w} outside [{}, {}]", g.min_watts, g.max_watts);
                    }
                    if order.phase == Phase::Increase {
                        prop_assert!(!outstanding, "an increase was planned while a decrease was outstanding");
                        prop_assert!(orders.iter().all(|o| o.phase == Phase::Increase), "increases and decreases in one pass");
                    }
                    epoch += 1;
                    mark_sent(&mut nodes[i], order, epoch, now);
                    for &(gpu, w) in &order.caps { in_force[i][gpu as usize] = w; }
                    unacked[i].push((epoch, order.caps.clone()));
                }
                let after = counted_watts(&nodes, now, IDLE);
                // Increases never create or deepen an overrun: over the limit, counted draw only falls.
                if orders.iter().any(|o| o.phase == Phase::Increase) {
                    prop_assert!(after <= limit + 1e-6, "an increase took counted draw to {after} W over the limit {limit} W");
                }
                prop_assert!(after <= before + 1e-6 || after <= limit + 1e-6, "counted draw rose from {before} to {after} W over the limit {limit} W");
            }
            // Deliver everything and heal: the cluster settles under the limit.
            for i in 0..6 {
                if !nodes[i].reachable {
                    reconnect(&mut nodes[i], &mut in_force[i], &mut unacked[i], now);
                }
            }
            let mut fits = true;
            for _ in 0..20 {
                now += RESEND_AFTER_MS;
                for i in 0..6 { for (e, caps) in unacked[i].drain(..) { apply_ack(&mut nodes[i], e, &caps, true); } }
                let running: Vec<JobLoad> = jobs.iter().zip(present).filter(|(_, p)| *p).map(|(j, _)| j.clone()).collect();
                let others = others_watts(&nodes, &running);
                let allocation = allocate(limit, &running, others, IDLE);
                fits = allocation.fits;
                let targets = targets_for(&mut nodes, &allocation);
                let orders = plan(&nodes, &targets, limit, now, IDLE, 6);
                send(&mut nodes, &orders, &mut epoch, now, &mut in_force, &mut unacked);
            }
            // Feasible (the floor — every job paused, foreign loads at their caps — fits): settled
            // under the limit.
            let settled = counted_watts(&nodes, now, IDLE);
            prop_assert!(!fits || settled <= limit + 1e-6, "settled at {settled} W over the limit {limit} W: {nodes:?}");
        }
    }

    #[derive(Debug, Clone)]
    enum DomainStep {
        /// Domain d's limit becomes this share of its nodes' full power.
        Limit(usize, f64),
        Deliver(usize),
        Cut(usize),
        Heal(usize),
        Wait(i64),
    }

    fn domain_step() -> impl Strategy<Value = DomainStep> {
        prop_oneof![
            (0usize..3, 0.3f64..1.2).prop_map(|(d, share)| DomainStep::Limit(d, share)),
            (0usize..6).prop_map(DomainStep::Deliver),
            (0usize..6).prop_map(DomainStep::Cut),
            (0usize..6).prop_map(DomainStep::Heal),
            (100i64..4_000).prop_map(DomainStep::Wait),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Invariant 13: with a row over two racks, each job spanning both racks (job j on nodes
        /// 2j and 2j + 1; rack 0 holds the even nodes, rack 1 the odd ones), through domain
        /// limits cut and raised, lost acknowledgements and cut links — increases never take a
        /// domain's counted power over its limit, over its limit a domain's counted power only
        /// falls, and once everything is delivered every domain settles under its limit.
        #[test]
        fn every_domain_keeps_its_limit_at_every_step(steps in prop::collection::vec(domain_step(), 1..50)) {
            use crate::power::domain_allocation::{allocate_within_domains, DomainLoad};
            const FAILSAFE_MS: i64 = 10_000;
            let mut nodes: Vec<NodeCaps> = (0..6).map(|i| node(&format!("n{i}"), 4, 200.0)).collect();
            let jobs: Vec<JobLoad> = (0..3).map(|j| JobLoad {
                name: format!("j{j}"), priority: j, sequence: j as u64, flex: 0.2, gpus_per_shard: 4,
                shards: 2, min_shards: 2, cap_min: 200.0, cap_max: 700.0, curve: Curve::default(),
                flex_curve: Curve::default(), probe: false, given_up_watts: Vec::new(),
            }).collect();
            // Domain 0: the row (every node); 1: rack 0 (even nodes); 2: rack 1 (odd nodes).
            let paths: Vec<Vec<u32>> = (0..6).map(|i| vec![0, 1 + (i % 2) as u32]).collect();
            let in_domain = |d: usize, n: usize| paths[n].contains(&(d as u32));
            let spreads: Vec<Vec<Vec<u32>>> = (0..3).map(|j| vec![paths[2 * j].clone(), paths[2 * j + 1].clone()]).collect();
            let mut limits = [24.0 * 700.0, 12.0 * 700.0, 12.0 * 700.0];
            let mut now = 0i64;
            let mut epoch = 0u64;
            let mut unacked: Vec<Vec<Sent>> = vec![Vec::new(); 6];
            let mut in_force: Vec<Vec<f64>> = vec![vec![200.0; 4]; 6];
            let mut last_heard = [0i64; 6];
            let domain_counted = |nodes: &[NodeCaps], now: i64| -> Vec<f64> {
                (0..3).map(|d| (0..6).filter(|&n| in_domain(d, n)).map(|n| nodes[n].counted_watts(now, IDLE)).sum()).collect()
            };
            let pass = |nodes: &mut Vec<NodeCaps>, limits: &[f64; 3], now: i64, max: usize| -> (Vec<Order>, bool) {
                let domains: Vec<DomainLoad> = limits.iter().map(|&l| DomainLoad { limit_watts: l, others_watts: 0.0 }).collect();
                let allocation = allocate_within_domains(f64::INFINITY, &jobs, &spreads, 0.0, IDLE, &domains);
                let targets = targets_for(nodes, &allocation);
                let counted = domain_counted(nodes, now);
                let mut room = DomainRoom {
                    paths: paths.iter().map(Vec::as_slice).collect(),
                    headroom: (0..3).map(|d| limits[d] - counted[d]).collect(),
                };
                (plan_within(nodes, &targets, f64::INFINITY, now, IDLE, max, &mut room), allocation.fits)
            };
            for s in steps {
                match s {
                    DomainStep::Limit(d, share) => {
                        let full = if d == 0 { 24.0 * 700.0 } else { 12.0 * 700.0 };
                        limits[d] = full * share;
                    }
                    DomainStep::Deliver(n) => {
                        if nodes[n].reachable && !unacked[n].is_empty() {
                            let (e, caps) = unacked[n].remove(0);
                            apply_ack(&mut nodes[n], e, &caps, true);
                            last_heard[n] = now;
                        }
                    }
                    DomainStep::Cut(n) => { nodes[n].reachable = false; nodes[n].failsafe_at_ms = last_heard[n] + FAILSAFE_MS; }
                    DomainStep::Heal(n) => {
                        if !nodes[n].reachable {
                            reconnect(&mut nodes[n], &mut in_force[n], &mut unacked[n], now);
                            last_heard[n] = now;
                        }
                    }
                    DomainStep::Wait(ms) => {
                        now += ms;
                        for (i, n) in nodes.iter().enumerate() { if n.reachable { last_heard[i] = now; } }
                    }
                }
                let before = domain_counted(&nodes, now);
                let (orders, _) = pass(&mut nodes, &limits, now, 2);
                send(&mut nodes, &orders, &mut epoch, now, &mut in_force, &mut unacked);
                let after = domain_counted(&nodes, now);
                let increased = orders.iter().any(|o| o.phase == Phase::Increase);
                for d in 0..3 {
                    if increased {
                        prop_assert!(after[d] <= limits[d] + 1e-6 || after[d] <= before[d] + 1e-6,
                            "an increase took domain {d} to {} W over its {} W limit", after[d], limits[d]);
                    }
                    prop_assert!(after[d] <= before[d] + 1e-6 || after[d] <= limits[d] + 1e-6,
                        "domain {d} rose from {} to {} W over its {} W limit", before[d], after[d], limits[d]);
                }
            }
            // Everything delivered, every link healed: each domain settles under its limit.
            for i in 0..6 {
                if !nodes[i].reachable {
                    reconnect(&mut nodes[i], &mut in_force[i], &mut unacked[i], now);
                }
            }
            let mut fits = true;
            for _ in 0..20 {
                now += RESEND_AFTER_MS;
                for i in 0..6 { for (e, caps) in unacked[i].drain(..) { apply_ack(&mut nodes[i], e, &caps, true); } }
                let (orders, f) = pass(&mut nodes, &limits, now, 6);
                fits = f;
                send(&mut nodes, &orders, &mut epoch, now, &mut in_force, &mut unacked);
            }
            let settled = domain_counted(&nodes, now);
            for d in 0..3 {
                prop_assert!(!fits || settled[d] <= limits[d] + 1e-6, "domain {d} settled at {} W over its {} W limit", settled[d], limits[d]);
            }
        }
    }
}
