//! The power half of the reconcile pass's shell: enforcement (the allocation that
//! [`crate::decide`] admitted, moved to through the transition planner as cap orders), then the
//! power status everyone reads; and the meter's shell.
//!
//! The decisions are the pure [`crate::power::admission`], [`allocate`] and [`plan`]; this module
//! gathers the planner's inputs from the registry, sends its orders, and keeps the books: the cap
//! epoch, when the last power event happened (for event-to-acknowledged latency), budget
//! violations, and whether the limit can be met at all. Nodes that do not enforce are counted at
//! what they run under; their draw above their orders is reported apart and is not Watt's
//! violation.

use tokio::time::Instant;
use watt_proto::v1 as pb;

use crate::jobs::JobTable;
use crate::power::admission::Admission;
use crate::power::allocator::allocate;
use crate::power::epochs::Epochs;
use crate::power::meter::{Reading, Verdict};
use crate::power::planner::{self, GpuWork, NodeCaps, Order, Phase};
use crate::power::table::PowerTable;
use crate::power::{Site, SourceKind};
use crate::reconcile::{unix_ms, Controller};
use crate::registry::{NodeEntry, NodeState, OwedAcks};

/// Increases go out in waves of at most this many nodes, a wave once the one before it is
/// acknowledged; within a wave each agent steps up after a random delay below
/// [`INCREASE_SPREAD_MS`]. So a thousand nodes never raise their caps in the same instant.
pub const MAX_INCREASE_NODES_PER_PASS: usize = 1_000;
pub const INCREASE_SPREAD_MS: u32 = 100;

#[derive(Debug)]
pub struct PowerState {
    pub table: PowerTable,
    /// Cap orders carry these: strictly increasing, also across restarts (see [`Epochs`]).
    pub epochs: Epochs,
    violating: bool,
    infeasible: bool,
    /// What the last pass that moved caps admitted, and the site it showed.
    last: Option<Admission>,
    shown_site: Option<Site>,
    /// Passes that moved caps: marks which nodes' targets a pass has reset.
    passes: u64,
    /// Increases wait on the site's ramp limit: time alone frees them (see
    /// [`crate::power::ramp`]).
    pub(crate) ramp_holding: bool,
}

impl PowerState {
    /// Sources and site from `table`; epochs resumed from the store's mark.
    pub async fn load(table: PowerTable, store: &dyn crate::store::Store) -> Result<Self, crate::store::StoreError> {
        // Before marks, controllers started at the wall clock in microseconds.
        let epochs = Epochs::load(store, (unix_ms().max(0) as u64) * 1_000).await?;
        Ok(PowerState {
            table,
            epochs,
            violating: false,
            infeasible: false,
            last: None,
            shown_site: None,
            passes: 0,
            ramp_holding: false,
        })
    }
}

impl Controller {
    /// Move every node toward the allocation's caps through the planner, send the orders, and
    /// publish the power status.
    ///
    /// Cost follows change: when nothing it reads changed since the last time it ran — the
    /// admission, the jobs' placements (`placements_changed`), the nodes' power state (sessions,
    /// acknowledgements, shard states, GPU work), and no increase is waiting its turn — there is
    /// nothing to order and the status stands; `full` runs it regardless (time-driven passes:
    /// resends, failsafe deadlines, ramps).
    ///
    /// `deciding`: jobs whose new records this pass decided and has not stored yet. A GPU of such
    /// a job gets the job's cap only where the decided record keeps it too; one it leaves (a
    /// shrink, a pause, a preemption) is lowered now, and one it takes waits until the record is
    /// stored — so caps move before the store is written only downwards.
    pub fn enforce(
        &self,
        power: &mut PowerState,
        jobs: &JobTable,
        deciding: Option<&crate::NameMap<&str, &crate::jobs::JobRecord>>,
        admission: Admission,
        placements_changed: bool,
        full: bool,
    ) {
        {
            let mut nodes = self.registry.lock();
            let power_changed = nodes.take_power_changed();
            let unchanged = !full
                && !power_changed
                && !placements_changed
                && !nodes.owed().more_to_order
                && power.last.as_ref() == Some(&admission)
                && power.shown_site == Some(power.table.site());
            if unchanged {
                return;
            }
        }
        power.last = Some(admission.clone());
        let now = Instant::now();
        // Deadlines on the monotonic clock; sources' ramps and the status' time on the wall's.
        let now_ms = self.clock.ms(now);
        let wall_ms = unix_ms();
        let site = power.table.site();
        power.shown_site = Some(site);
        let idle = site.idle_gpu_watts;
        let allocation = admission.allocation.unwrap_or_else(|| allocate(admission.budget_watts, &[], 0.0, idle));
        let caps: crate::NameMap<&str, f64> =
            allocation.jobs.iter().filter(|j| !j.paused).map(|j| (j.name.as_str(), j.cap_watts)).collect();
        let mut nodes = self.registry.lock();
        // Work, caps in flight and overheads move on every node below.
        nodes.every_budget_changed();
        // Each GPU's target: the cap of the job placed on it (NaN: none), then below. A node's
        // targets are reset when this pass first touches them (`targets_pass`), so nodes without
        // a job are not walked an extra time to clear them.
        power.passes += 1;
        let pass = power.passes;
        for job in jobs.iter().filter(|j| j.state.is_active()) {
            let Some(&cap) = caps.get(job.spec.name.as_str()) else { continue };
            let decided = deciding.and_then(|d| d.get(job.spec.name.as_str()));
            if decided.is_some_and(|d| !d.state.is_active()) {
                continue;
            }
            for s in &job.shards {
                let Some(e) = nodes.get_mut(&s.node) else { continue };
                e.reset_cap_targets(pass);
                for &index in &s.gpus {
                    let kept =
                        decided.is_none_or(|d| d.shards.iter().any(|k| k.node == s.node && k.gpus.contains(&index)));
                    if let (true, Some(k)) = (kept, e.gpu_position(index)) {
                        e.cap_targets[k] = cap;
                    }
                }
            }
        }
        // One walk over every node, in one order (positions in it name nodes in orders below):
        // at 50,000 nodes each walk over the registry is a cache miss or more per node, so the
        // state, the targets, phase 1 of the plan (decreases, sent at once) and the books are
        // done for a node while it is in cache. This is `planner::plan` fused with the walk.
        let mut entries: Vec<&mut NodeEntry> = nodes.values_mut().collect();
        let mut failsafe_nodes = 0;
        // GPUs whose shard was taken off them and is still stopping: they count at their caps
        // until their agent says it stopped, above what the allocation gave them (idle).
        let mut draining = 0usize;
        let mut decreases_planned = false;
        let mut decrease_outstanding = false;
        let mut sender = OrderSender {
            epochs: &mut power.epochs,
            term: self.term,
            caretaking: self.caretaking(),
            now_ms,
            out_of_epochs: false,
            unsent: 0,
            withheld: 0,
        };
        let tree = power.table.tree().clone();
        let domain_limits = power.table.domain_limits(wall_ms);
        let mut books = Books::new(tree.len());
        // Per node (as `entries`), the power domains it is in: none without a tree.
        let mut paths: Vec<Vec<u32>> = Vec::new();
        let mut buffer = Vec::new();
        for (position, e) in entries.iter_mut().enumerate() {
            e.reset_cap_targets(pass);
            let reachable = e.state(now, self.settings.node_lease) == NodeState::Ready;
            e.power.reachable = reachable;
            e.power.failsafe_at_ms = self.clock.ms(e.last_seen) + e.failsafe_after_ms;
            e.power.overhead_watts = e.non_gpu_watts_or(site.node_overhead_watts);
            let reported = e.reported_busy();
            for (k, g) in e.power.gpus.iter_mut().enumerate() {
                let cap = Some(e.cap_targets[k]).filter(|c| !c.is_nan());
                if cap.is_some() || reported.contains(&g.index) {
                    g.work = GpuWork::Watt;
                    e.above_idle_since[k] = None;
                    draining += usize::from(cap.is_none());
                } else if g.work == GpuWork::Watt {
                    // Its shard ended: idle until telemetry taken from now on says otherwise (see
                    // FOREIGN_AFTER). What it drew under its shard is not its idle draw.
                    g.work = GpuWork::Idle;
                    g.measured_watts = 0.0;
                    e.readings_valid_from[k] = Some(now);
                }
                // GPUs without a Watt shard are parked at their minimum.
                e.cap_targets[k] = cap.unwrap_or(g.min_watts).clamp(g.min_watts, g.max_watts);
            }
            if e.power.failsafed(now_ms) {
                failsafe_nodes += 1;
            }
            if let Some(caps) = planner::decreases(&e.power, &e.cap_targets, now_ms, &mut buffer) {
                decreases_planned = true;
                sender.send(e, &Order { node: position, phase: Phase::Decrease, caps });
            }
            decrease_outstanding |= e.power.decrease_outstanding(now_ms);
            if !tree.is_empty() {
                paths.push(e.domain_path(&tree).to_vec());
            }
            books.add(e, paths.get(position).map_or(&[], Vec::as_slice), now_ms, idle);
        }
        // What is counted now is in force from now: the ramp's windows start from it.
        self.ramp.lock().unwrap_or_else(std::sync::PoisonError::into_inner).record(now_ms, books.counted);
        // Phase 2, when nothing is lowered and nothing waits to be: increases within the headroom,
        // and within the site's ramp limit.
        if !decreases_planned && !decrease_outstanding {
            let ceiling = site.ramp_up_watts_per_second.map_or(f64::INFINITY, |ramp| {
                self.ramp.lock().unwrap_or_else(std::sync::PoisonError::into_inner).ceiling(now_ms, ramp)
            });
            let (snapshot, targets): (Vec<&NodeCaps>, Vec<&[f64]>) =
                entries.iter().map(|e| (&e.power, e.cap_targets.as_slice())).unzip();
            // Each power domain's headroom under its limit (invariant 13).
            let mut room = planner::DomainRoom {
                paths: paths.iter().map(Vec::as_slice).collect(),
                headroom: domain_limits.iter().zip(&books.domains).map(|(limit, b)| limit - b.counted).collect(),
            };
            let orders = planner::increases_within(
                &snapshot,
                &targets,
                admission.limit_watts.min(ceiling),
                now_ms,
                idle,
                MAX_INCREASE_NODES_PER_PASS,
                &mut room,
            );
            drop(room);
            drop((snapshot, targets));
            if !orders.is_empty() {
                for order in &orders {
                    if let Some(e) = entries.get_mut(order.node) {
                        sender.send(e, order);
                    }
                }
                // The books are read after the orders went out.
                books = Books::new(tree.len());
                for (position, e) in entries.iter().enumerate() {
                    books.add(e, paths.get(position).map_or(&[], Vec::as_slice), now_ms, idle);
                }
            }
        }
        // The walk is `plan` fused: debug builds (every system test) check that, with every order
        // sent, `plan` on what the pass leaves finds no decrease left to send.
        if cfg!(debug_assertions) && sender.unsent == 0 {
            let (snapshot, targets): (Vec<&NodeCaps>, Vec<&[f64]>) =
                entries.iter().map(|e| (&e.power, e.cap_targets.as_slice())).unzip();
            let left = planner::plan(&snapshot, &targets, admission.limit_watts, now_ms, idle, usize::MAX);
            let decreases_left = left.iter().filter(|o| o.phase == Phase::Decrease).count();
            assert_eq!(decreases_left, 0, "the pass left decreases unsent: {left:?}");
        }
        drop(entries);
        if sender.withheld > 0 {
            // Increases above what the store records wait for their ceilings (invariant 9).
            self.power_writer.ceilings_wanted();
        }
        let Books {
            counted,
            foreign_gpus,
            foreign_watts,
            outstanding,
            drawn,
            unacknowledged,
            owing,
            more_to_order,
            unenforced,
            domains: domain_books,
        } = books;
        self.ramp.lock().unwrap_or_else(std::sync::PoisonError::into_inner).record(now_ms, counted);
        power.ramp_holding = site.ramp_up_watts_per_second.is_some() && more_to_order;
        let owed = OwedAcks { nodes: owing, more_to_order };
        nodes.set_owed(owed);
        self.acks.after_pass(owed, &self.metrics);
        drop(nodes);

        // A violation: settled (no decrease outstanding, no shard taken off its GPUs still
        // stopping) above the limit although the allocation fits. Counted once per episode.
        // Nodes that do not enforce count at their orders here: what they draw above them is
        // theirs, reported apart. The meter judges the transitions.
        let counted_as_ordered = counted - unenforced.counted_excess_watts;
        let violating = !outstanding
            && draining == 0
            && allocation.fits
            && counted_as_ordered > admission.limit_watts * (1.0 + 1e-9) + 1e-6;
        if violating && !power.violating {
            self.metrics.budget_violations.with_label_values(&["counted"]).inc();
            tracing::error!(
                counted,
                limit = admission.limit_watts,
                "Counted power is above the limit with every decrease acknowledged."
            );
        }
        power.violating = violating;

        // Infeasible: the limit is below what the cluster draws with every job paused.
        let infeasible = admission.limit_watts.is_finite() && admission.floor_watts > admission.limit_watts + 1e-6;
        let infeasible_note = infeasible.then(|| {
            format!(
                "infeasible: with every job paused this cluster draws at least {}, above the {} limit — power nodes off or raise the limit",
                show_kw(admission.floor_watts),
                show_kw(admission.limit_watts)
            )
        });
        if infeasible != power.infeasible {
            match &infeasible_note {
                Some(note) => {
                    tracing::error!(floor = admission.floor_watts, limit = admission.limit_watts, "{note}");
                    self.emit("power", "site", "infeasible", note.clone());
                }
                None => self.emit("power", "site", "feasible", "the limit can be met again".into()),
            }
        }
        power.infeasible = infeasible;
        let mut notes = if admission.available_watts.is_infinite() {
            vec!["no power source is configured: power is not limited (wattctl power set-source)".into()]
        } else {
            allocation.notes.clone()
        };
        notes.extend(infeasible_note);
        if unenforced.nodes > 0 {
            notes.push(format!(
                "unenforced: {} node(s) do not enforce caps (dry-run or off), {} above their orders",
                unenforced.nodes,
                show_kw(unenforced.measured_excess_watts)
            ));
        }
        if foreign_gpus > 0 {
            notes.push(format!(
                "{foreign_gpus} GPU(s) run processes Watt did not start: counted at their caps ({})",
                show_kw(foreign_watts)
            ));
        }

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
                    swing: None,
                }
            })
            .collect();
        job_power.sort_by(|a, b| a.name.cmp(&b.name));
        let swings = self.last_swings.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for j in &mut job_power {
            j.swing = swings.jobs.get(&j.name).copied().map(swing_proto);
        }
        let status = pb::PowerStatus {
            sources: power
                .table
                .sources()
                .map(|s| pb::PowerSource {
                    name: s.name.clone(),
                    kind: source_kind(s.kind) as i32,
                    available_watts: s.available_watts,
                    ramp_watts_per_second: s.ramp_watts_per_second,
                    effective_watts: s.effective_watts(wall_ms),
                    domain: s.domain.clone().unwrap_or_default(),
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
            notes,
            budget_violations: self.metrics.budget_violations.with_label_values(&["counted"]).get(),
            unix_ms: wall_ms,
            caretaker_term: if self.caretaking() { self.term } else { 0 },
            unenforced_nodes: unenforced.nodes,
            unenforced_excess_watts: unenforced.measured_excess_watts,
            floor_watts: admission.floor_watts,
            infeasible,
            foreign_gpus,
            foreign_watts,
            swing: swings.site.map(swing_proto),
            domains: domain_status(&power.table, &tree, &domain_limits, &domain_books),
            grid_windows: power.table.grid().windows.iter().map(|w| grid_window_proto(w, wall_ms)).collect(),
            ramp_1s_watts_per_second: self.ramp_rate(now_ms, 1_000),
            ramp_60s_watts_per_second: self.ramp_rate(now_ms, 60_000),
            // The meter's figures (see `Controller::look_at_the_meter`) carry over between passes.
            ..self.meter_fields()
        };
        self.metrics.observe_power(&status);
        self.power_status.send_replace(status);
    }
}

/// A window of the grid's schedule as the status shows it.
fn grid_window_proto(w: &crate::power::grid::GridWindow, now_unix_ms: i64) -> pb::GridWindow {
    use crate::power::grid::{GridLimit, GridTarget};
    let (limit_watts, share) = match w.limit {
        GridLimit::Watts(watts) => (watts, 0.0),
        GridLimit::Share(share) => (0.0, share),
    };
    pb::GridWindow {
        event: w.event.clone(),
        interval: w.interval,
        program: w.program.clone(),
        event_name: w.event_name.clone().unwrap_or_default(),
        domain: match &w.target {
            GridTarget::Site => String::new(),
            GridTarget::Domain(d) => d.clone(),
        },
        limit_watts,
        share,
        start_unix_ms: w.start_unix_ms,
        end_unix_ms: w.end_unix_ms,
        in_force: w.in_force(now_unix_ms),
    }
}

/// Every power domain as the status shows it, parents before children.
fn domain_status(
    table: &crate::power::table::PowerTable,
    tree: &crate::power::domains::DomainTree,
    limits: &[f64],
    books: &[DomainBooks],
) -> Vec<pb::DomainStatus> {
    let stored: crate::NameMap<&str, &crate::power::domains::Domain> =
        table.domains().map(|d| (d.name.as_str(), d)).collect();
    tree.domains
        .iter()
        .zip(books)
        .zip(limits)
        .map(|((d, b), &limit)| pb::DomainStatus {
            domain: stored.get(d.name.as_str()).map(|s| domain_proto(s)),
            effective_limit_watts: limit,
            counted_watts: b.counted,
            measured_watts: b.measured,
            nodes: b.nodes,
            gpus: b.gpus,
            parent_index: d.parent.map_or(-1, |p| p as i32),
        })
        .collect()
}

pub fn domain_proto(d: &crate::power::domains::Domain) -> pb::PowerDomain {
    pb::PowerDomain {
        name: d.name.clone(),
        parent: d.parent.clone().unwrap_or_default(),
        limit_watts: d.limit_watts,
        selector: d.selector.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// What the power status reports of the nodes, added up node by node.
#[derive(Debug, Default)]
struct Books {
    counted: f64,
    foreign_gpus: u32,
    foreign_watts: f64,
    /// A decrease is sent and not acknowledged somewhere.
    outstanding: bool,
    drawn: f64,
    unacknowledged: usize,
    /// Reachable nodes that owe an acknowledgement.
    owing: usize,
    /// Targets not yet ordered: increases that wait for headroom or their turn.
    more_to_order: bool,
    unenforced: Unenforced,
    /// Per power domain (positions in the tree): its nodes counted, drawn, and how many.
    domains: Vec<DomainBooks>,
}

#[derive(Debug, Default, Clone, Copy)]
struct DomainBooks {
    counted: f64,
    measured: f64,
    nodes: u32,
    gpus: u32,
}

impl Books {
    fn new(domains: usize) -> Self {
        Books { domains: vec![DomainBooks::default(); domains], ..Books::default() }
    }

    /// Add node `e`, in the power domains of `path`.
    fn add(&mut self, e: &NodeEntry, path: &[u32], now_ms: i64, idle: f64) {
        let p = &e.power;
        let failsafe = p.failsafed(now_ms);
        let counted = p.counted_watts(now_ms, idle);
        self.counted += counted;
        for &d in path {
            let domain = &mut self.domains[d as usize];
            domain.counted += counted;
            domain.measured += e.drawn_gpu_watts() + p.overhead_watts;
            domain.nodes += 1;
            domain.gpus += p.gpus.len() as u32;
        }
        for g in p.gpus.iter().filter(|g| g.work == GpuWork::Foreign) {
            self.foreign_gpus += 1;
            self.foreign_watts += g.counted_under(if failsafe { g.failsafe_watts } else { g.upper() }, idle);
        }
        self.outstanding |= p.decrease_outstanding(now_ms);
        self.drawn += e.drawn_gpu_watts();
        if e.owes_ack() {
            self.unacknowledged += 1;
            self.owing += usize::from(p.reachable);
        }
        self.more_to_order |= p.reachable
            && p.gpus.iter().zip(&e.cap_targets).any(|(g, &t)| match g.in_flight {
                Some(f) => f.target != t,
                None => g.acked_watts != t,
            });
        self.unenforced.add(p, idle);
    }
}

/// Sends cap orders, each with the next epoch, on the node's session.
struct OrderSender<'a> {
    epochs: &'a mut Epochs,
    /// The leader's term, on every order.
    term: u64,
    /// A caretaker sends decreases only (invariant 11).
    caretaking: bool,
    now_ms: i64,
    /// None reserved (the store refused the mark): the rest are sent on a later pass.
    out_of_epochs: bool,
    /// Orders not sent: no session, no epoch, or a full queue (sent on a later pass).
    unsent: usize,
    /// Increases not sent until the store records their ceilings, or a leader leads again
    /// (also counted in `unsent`).
    withheld: usize,
}

impl OrderSender<'_> {
    fn send(&mut self, e: &mut NodeEntry, order: &Order) {
        if order.phase == Phase::Increase && (self.caretaking || !e.increase_recorded(&order.caps)) {
            self.withheld += 1;
            self.unsent += 1;
            return;
        }
        let Some(session) = e.session.as_ref().filter(|_| !self.out_of_epochs) else {
            self.unsent += 1;
            return;
        };
        let Some(epoch) = self.epochs.take() else {
            self.out_of_epochs = true;
            self.unsent += 1;
            return;
        };
        let message = pb::ControllerMessage {
            body: Some(pb::controller_message::Body::CapOrder(pb::CapOrder {
                epoch,
                phase: match order.phase {
                    Phase::Decrease => pb::TransitionPhase::Decrease,
                    Phase::Increase => pb::TransitionPhase::Increase,
                } as i32,
                caps: order.caps.iter().map(|&(index, watts)| pb::GpuCap { index, watts }).collect(),
                spread_ms: if order.phase == Phase::Increase { INCREASE_SPREAD_MS } else { 0 },
                term: self.term,
            })),
        };
        // A full queue is retried next pass: not marked sent.
        if session.tx.try_send(Ok(message)).is_ok() {
            planner::mark_sent(&mut e.power, order, epoch, self.now_ms);
        } else {
            self.unsent += 1;
        }
    }
}

/// Nodes that do not enforce caps.
#[derive(Debug, Default)]
pub(crate) struct Unenforced {
    pub nodes: u32,
    /// Their measured GPU draw above the caps they were ordered.
    pub measured_excess_watts: f64,
    /// What budget safety counts for them above those caps.
    pub counted_excess_watts: f64,
}

impl Unenforced {
    /// Count `n` if it does not enforce.
    fn add(&mut self, n: &NodeCaps, idle: f64) {
        if n.enforcing {
            return;
        }
        self.nodes += 1;
        self.counted_excess_watts += n.unenforced_excess_watts(idle);
        self.measured_excess_watts +=
            n.gpus.iter().filter_map(|g| Some((g.measured_watts - g.answered_watts?).max(0.0))).sum::<f64>();
    }
}

/// "12.3 kW" for notes and events.
pub fn show_kw(watts: f64) -> String {
    format!("{:.1} kW", watts / 1_000.0)
}

fn finite(w: f64) -> f64 {
    if w.is_finite() {
        w
    } else {
        0.0
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

pub fn swing_proto(s: crate::power::swing::Swing) -> pb::PowerSwing {
    pb::PowerSwing {
        swing_watts: s.swing_watts,
        share_0_1_to_1_hz: s.band_shares[0],
        share_1_to_5_hz: s.band_shares[1],
        mean_watts: s.mean_watts,
    }
}

pub fn site_proto(site: &Site) -> pb::Site {
    pb::Site {
        reserve_ratio: site.reserve_ratio,
        pue: site.pue,
        node_overhead_watts: site.node_overhead_watts,
        idle_gpu_watts: site.idle_gpu_watts,
        ramp_up_watts_per_second: site.ramp_up_watts_per_second,
        ramp_down_watts_per_second: site.ramp_down_watts_per_second,
    }
}

impl Controller {
    /// How fast counted power moved over the window ending at `now_ms`, W/s.
    fn ramp_rate(&self, now_ms: i64, window_ms: i64) -> f64 {
        self.ramp.lock().unwrap_or_else(std::sync::PoisonError::into_inner).rate(now_ms, window_ms)
    }

    /// The swings of the last window, per job and for the site: metrics, and the status (readers
    /// see it; watchers are not woken for it).
    pub fn look_at_the_swings(&self, now_unix_ms: i64) {
        let report = self.swings.analyze(now_unix_ms);
        self.metrics.observe_swings(&report);
        self.power_status.send_if_modified(|s| {
            s.swing = report.site.map(swing_proto);
            for j in &mut s.jobs {
                j.swing = report.jobs.get(&j.name).copied().map(swing_proto);
            }
            false
        });
        *self.last_swings.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = report;
    }

    /// Counted power stands between passes: the ramp's rates move with time alone. Shown in the
    /// status (readers see it; watchers are not woken for it) and the metrics.
    fn look_at_the_ramp(&self, now_ms: i64) {
        let counted = self.power_status.borrow().counted_watts;
        self.ramp.lock().unwrap_or_else(std::sync::PoisonError::into_inner).record(now_ms, counted);
        let (second, minute) = (self.ramp_rate(now_ms, 1_000), self.ramp_rate(now_ms, 60_000));
        self.metrics.ramp.with_label_values(&["1s"]).set(second);
        self.metrics.ramp.with_label_values(&["60s"]).set(minute);
        self.power_status.send_if_modified(|s| {
            s.ramp_1s_watts_per_second = second;
            s.ramp_60s_watts_per_second = minute;
            false
        });
    }
}

/// How often the meter looks at measured draw: a few times per telemetry interval.
pub const METER_PERIOD: std::time::Duration = std::time::Duration::from_millis(250);

impl Controller {
    /// One look at the meter: measured draw of every node against the limit in force (see
    /// [`crate::power::meter`]). Cheap: one walk over the registry, no store, no power lock.
    pub fn look_at_the_meter(&self) {
        let now = Instant::now();
        self.look_at_the_ramp(self.clock.ms(now));
        let (limit, feasible, limited, site_overhead, idle, domains) = {
            let s = self.power_status.borrow();
            let site = s.site.unwrap_or_default();
            let domains = s.domains.len();
            (
                s.limit_watts,
                !s.infeasible,
                !s.sources.is_empty(),
                site.node_overhead_watts,
                site.idle_gpu_watts,
                domains,
            )
        };
        let lease = self.settings.node_lease;
        // Per power domain, what its nodes draw (their paths as the last pass worked them out).
        let mut domain_measured = vec![0.0; domains];
        let (measured, taken_at) = {
            let nodes = self.registry.lock();
            let mut measured = 0.0;
            let mut oldest: Option<Instant> = None;
            // One walk, on the figures each node keeps at hand: at 50,000 nodes this runs 200,000
            // node visits a second under the lock every session message needs.
            let mut unenforced = Unenforced::default();
            for e in nodes.values() {
                unenforced.add(&e.power, idle);
                if e.telemetry.is_none() {
                    continue;
                }
                let node = e.drawn_gpu_watts() + e.non_gpu_watts_or(site_overhead);
                measured += node;
                for &d in e.known_domain_path() {
                    if let Some(w) = domain_measured.get_mut(d as usize) {
                        *w += node;
                    }
                }
                if e.state(now, lease) == NodeState::Ready {
                    if let Some(at) = e.telemetry_taken_at {
                        oldest = Some(oldest.map_or(at, |o: Instant| o.min(at)));
                    }
                }
            }
            (measured - unenforced.measured_excess_watts, oldest.unwrap_or(now))
        };
        let verdict = {
            let mut meter = self.meter.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let before = meter.overdraw_seconds;
            let verdict = if limited {
                meter.look(Reading {
                    now,
                    measured_watts: measured,
                    limit_watts: limit,
                    taken_at,
                    last_event: self.acks.last_power_event(),
                    feasible,
                })
            } else {
                Verdict::Fine
            };
            self.metrics.overdraw_seconds.inc_by(meter.overdraw_seconds - before);
            self.metrics.overdraw_worst.set(meter.worst_overdraw_watts);
            self.metrics.power.with_label_values(&["measured"]).set(measured);
            let (violations, seconds, worst) = (meter.violations, meter.overdraw_seconds, meter.worst_overdraw_watts);
            // Watchers hear of the meter only when its verdict changes; readers see it always.
            self.power_status.send_if_modified(|s| {
                let news = s.measured_violations != violations || (s.overdraw_seconds == 0.0) != (seconds == 0.0);
                s.measured_watts = measured;
                for (d, w) in s.domains.iter_mut().zip(&domain_measured) {
                    d.measured_watts = *w;
                }
                if !s.domains.is_empty() {
                    self.metrics.observe_domains(&s.domains);
                }
                s.measured_violations = violations;
                s.overdraw_seconds = seconds;
                s.worst_overdraw_watts = worst;
                news
            });
            verdict
        };
        if verdict == (Verdict::Violation { new: true }) {
            self.metrics.budget_violations.with_label_values(&["measured"]).inc();
            let message = format!(
                "measured draw {} is above the {} limit past the settle time",
                show_kw(measured),
                show_kw(limit)
            );
            tracing::error!(measured, limit, "{message}");
            self.emit("power", "site", "violation", message);
        }
    }

    /// The meter's figures in the status, as the last look left them.
    fn meter_fields(&self) -> pb::PowerStatus {
        let s = self.power_status.borrow();
        pb::PowerStatus {
            measured_watts: s.measured_watts,
            measured_violations: s.measured_violations,
            overdraw_seconds: s.overdraw_seconds,
            worst_overdraw_watts: s.worst_overdraw_watts,
            ..pb::PowerStatus::default()
        }
    }

    /// Look at the meter every [`METER_PERIOD`] until `shutdown`.
    pub async fn run_meter(self: std::sync::Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(METER_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => self.look_at_the_meter(),
                () = &mut shutdown => return,
            }
            // Swings once a second: a 10 s window moves little in a quarter of one.
            ticks += 1;
            if ticks % 4 == 0 {
                self.look_at_the_swings(unix_ms());
            }
        }
    }

    /// A GPU started, or stopped, drawing above idle with no Watt shard on it.
    pub fn emit_gpu_work(&self, node: &str, change: &crate::registry::WorkChange) {
        let (reason, message) = match change.work {
            GpuWork::Foreign => (
                "foreign-gpu",
                format!(
                    "GPU {} draws {:.0} W with no Watt shard on it (a process Watt did not start): counted at its cap",
                    change.gpu, change.measured_watts
                ),
            ),
            GpuWork::Idle | GpuWork::Watt => {
                ("foreign-gpu-gone", format!("GPU {} is back to idle ({:.0} W)", change.gpu, change.measured_watts))
            }
        };
        self.emit("node", node, reason, message);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::metrics::Metrics;
    use crate::reconcile::Settings;
    use crate::store::file::FileStore;

    async fn controller(dir: &std::path::Path) -> Arc<Controller> {
        let store: Arc<dyn crate::store::Store> = Arc::new(FileStore::open(dir.join("s.redb")).unwrap());
        let settings = Settings {
            node_lease: Duration::from_secs(15),
            reconcile_interval: Duration::from_secs(1),
            telemetry_interval: Duration::from_secs(1),
            regrow_after: Duration::from_secs(30),
            settle_time: Duration::from_secs(2),
            retention: crate::retention::Retention { keep_for: Duration::from_secs(7 * 86_400), keep_count: 10_000 },
            limits: crate::retention::JobLimits { per_principal: 1_000, total: 100_000 },
            speed_curves: crate::speed_curves::CurvePolicy::Learned,
            swing_alert_share: 0.5,
        };
        Controller::new(store, settings, Metrics::new().unwrap(), 1).await.unwrap()
    }

    fn register(failsafe_after_ms: u32) -> pb::Register {
        pb::Register {
            node_name: "n1".into(),
            gpus: vec![pb::GpuInventory {
                index: 0,
                power_limit: Some(pb::PowerLimitRange { min_watts: 200.0, max_watts: 700.0, default_watts: 700.0 }),
                current_limit_watts: 700.0,
                failsafe_watts: 200.0,
                ..Default::default()
            }],
            failsafe_after_ms,
            enforce_mode: pb::EnforceMode::On as i32,
            ..Default::default()
        }
    }

    /// Node n1 opens a session now: its id, and where its orders go.
    fn connect(
        c: &Controller,
        failsafe_after_ms: u32,
    ) -> (u64, tokio::sync::mpsc::Receiver<Result<pb::ControllerMessage, tonic::Status>>) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let alive = Arc::new(AtomicBool::new(true));
        let now_unix_ms = crate::reconcile::unix_ms();
        (c.registry.register(&register(failsafe_after_ms), None, tx, alive, Instant::now(), now_unix_ms), rx)
    }

    /// The probe, through a whole pass: a job whose curve is unsure, at a cap that has not moved
    /// for over a minute while power is short, has its cap lowered within its flex for a window;
    /// `describe` says so.
    #[tokio::test]
    async fn an_unsure_curve_at_a_steady_cap_is_probed_within_its_flex_where_power_is_short() {
        use crate::power::table::{PowerChange, SourceUpdate};
        use crate::power::SourceKind;
        let dir = tempfile::tempdir().unwrap();
        let c = controller(dir.path()).await;
        let (_session, _rx) = connect(&c, 5_000);
        let admin = crate::auth::Principal {
            name: "ops".into(),
            role: watt_common::auth::Role::Admin,
            credential: crate::auth::Credential::Token,
        };
        let manifest = "name: j\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\ncommand: [train]\nflex: 0.3\n";
        c.submit(crate::spec::JobSpec::from_manifest(manifest).unwrap(), &admin).await.unwrap();
        let grid = SourceUpdate {
            name: "grid".into(),
            kind: SourceKind::Grid,
            available_watts: 600.0,
            ramp_watts_per_second: None,
            domain: None,
        };
        c.change_power(&PowerChange::SetSource(grid)).await.unwrap();
        c.reconcile_once().await;
        let cap = || c.power_status.borrow().jobs.iter().find(|j| j.name == "j").map(|j| j.cap_watts);
        // 95% of 600 W for its one GPU.
        assert_eq!(cap(), Some(570.0));
        // Seventy seconds of progress at that cap, ending now.
        let now = crate::reconcile::unix_ms();
        for s in 0..70 {
            c.speed_curves.record(&pb::ShardProgress {
                job: "j".into(),
                shard: 0,
                epoch: 1,
                step: s * 10,
                unix_ms: now - 70_000 + s as i64 * 1_000,
                cap_watts: Some(570.0),
                ..Default::default()
            });
        }
        c.reconcile_once().await;
        let probed = cap().unwrap();
        assert!((probed - 570.0 * (1.0 - crate::power::allocator::PROBE_STEP)).abs() < 1e-6, "{probed}");
        let curve = c.job("j").await.unwrap().speed_curve.unwrap();
        assert!(curve.probing, "{curve:?}");
    }

    /// Invariant 1 for an unreachable node, decided on the paused clock: it counts at its caps
    /// until its agent's failsafe deadline (its last word + `failsafe_after`), at its failsafe
    /// caps after — whatever the wall clock does meanwhile.
    #[tokio::test(start_paused = true)]
    async fn an_unreachable_node_is_at_its_failsafe_caps_exactly_once_its_deadline_passed() {
        let dir = tempfile::tempdir().unwrap();
        let c = controller(dir.path()).await;
        let (session, _rx) = connect(&c, 5_000);
        c.reconcile_once().await;
        assert_eq!(c.power_status.borrow().failsafe_nodes, 0);
        c.registry.disconnect("n1", session);
        tokio::time::advance(Duration::from_millis(4_900)).await;
        c.reconcile_once().await;
        assert_eq!(c.power_status.borrow().failsafe_nodes, 0, "not before its deadline");
        tokio::time::advance(Duration::from_millis(200)).await;
        c.reconcile_once().await;
        assert_eq!(c.power_status.borrow().failsafe_nodes, 1, "at its failsafe caps after it");
    }
}
