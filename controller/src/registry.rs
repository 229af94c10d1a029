//! The node registry: every agent that has registered, its inventory and session, what it last
//! reported, and which orders this session has already been sent.
//!
//! Liveness is a lease on `last_seen`: a node that has not been heard from for `lease` is lost,
//! whether its TCP connection dropped or silently hung. Behind one `std::sync::Mutex`, held only
//! for map updates, never across an await: telemetry from 25,000 agents a second goes through it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use watt_proto::v1 as pb;

use crate::power::ceilings::CeilingRecord;
use crate::power::planner::{GpuCap, GpuWork, NodeCaps};

/// (job, shard)
pub type ShardKey = (String, u32);

/// An agent that does not say after how long it sets its failsafe caps is taken to use the
/// agent's default.
pub const DEFAULT_FAILSAFE_AFTER: Duration = Duration::from_secs(10);

/// After how long without the controller the agent that sent `register` sets its failsafe caps.
pub fn failsafe_after(register: &pb::Register) -> Duration {
    if register.failsafe_after_ms > 0 {
        Duration::from_millis(u64::from(register.failsafe_after_ms))
    } else {
        DEFAULT_FAILSAFE_AFTER
    }
}

/// A GPU without a Watt shard drawing above idle for this long runs someone else's process. A
/// shard's GPUs take a moment to fall to idle once it stops; this keeps that from looking foreign.
pub const FOREIGN_AFTER: Duration = Duration::from_secs(3);

/// A GPU's accounting changed from telemetry: it started or stopped drawing above idle with no
/// Watt shard on it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkChange {
    pub gpu: u32,
    pub work: GpuWork,
    pub measured_watts: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Ready,
    Disconnected,
    Lost,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Disconnected => "disconnected",
            NodeState::Lost => "lost",
        }
    }
}

#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub tx: mpsc::Sender<Result<pb::ControllerMessage, tonic::Status>>,
    /// Cleared when the session ends or is replaced; read without the registry lock.
    pub alive: Arc<AtomicBool>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct NodeEntry {
    pub name: String,
    pub gpus: Vec<pb::GpuInventory>,
    pub agent_version: String,
    pub boot_id: String,
    pub address: Option<IpAddr>,
    /// The agent's HTTP port (metrics); 0 when it did not say.
    pub http_port: u16,
    /// Where the agent serves its shards' logs, when it does.
    pub logs: Option<LogsEndpoint>,
    pub last_seen: Instant,
    pub last_seen_unix_ms: i64,
    pub session: Option<Session>,
    /// Set by the reconcile loop once the lease ran out; cleared when the node registers again.
    pub lost: bool,
    pub telemetry: Option<pb::Telemetry>,
    /// Σ of `telemetry`'s GPUs that answered, added up when it comes: the meter reads it four
    /// times a second on every node, and the sum is then one field, not a walk of the readings.
    drawn_gpu_watts: f64,
    /// What the agent last said of each shard: (epoch, state).
    pub shards: HashMap<ShardKey, (u64, pb::ShardState)>,
    /// Orders already sent in this session: (epoch, action). A new session starts empty, so
    /// everything is sent again after a reconnect; orders are idempotent by epoch.
    pub sent: HashMap<ShardKey, (u64, pb::ShardAction)>,
    /// The GPUs' caps as budget safety counts them: acknowledged, in flight, failsafe.
    pub power: NodeCaps,
    /// After this long without the controller, the agent sets its failsafe caps.
    pub failsafe_after_ms: i64,
    /// What the agent does with cap orders (`--enforce`), from its registration and answers.
    pub enforce_mode: pb::EnforceMode,
    /// When the latest telemetry's readings were taken, on this controller's clock.
    pub telemetry_taken_at: Option<Instant>,
    /// Per GPU (as in `power.gpus`): since when it draws above idle with no Watt shard.
    pub above_idle_since: Vec<Option<Instant>>,
    /// Per GPU: readings taken before this are from its last Watt shard, not of the GPU without
    /// work, and do not count as its idle draw.
    pub readings_valid_from: Vec<Option<Instant>>,
    /// The latest full status of each shard the agent reported (exit codes, restarts).
    pub shard_statuses: HashMap<ShardKey, pb::ShardStatus>,
    /// The GPUs of each shard the agent reported.
    pub shard_gpus: HashMap<ShardKey, Vec<u32>>,
    /// The node's own draw besides GPUs, as it reports it (0: not reported).
    pub non_gpu_watts: f64,
    /// Its labels (`--labels`): power domains select nodes by them.
    pub labels: crate::power::domains::Labels,
    /// The training runtimes its agent offers (`--runtimes`), and where its shards run.
    pub runtimes: Vec<String>,
    pub shard_exec: pb::ShardExec,
    /// The power domains it is in, parents first, as positions in the tree `domain_tree_id`.
    domain_path: Vec<u32>,
    domain_tree_id: Option<u64>,
    /// Per GPU (as in `power.gpus`): the cap it is moving to, as the last pass decided.
    pub cap_targets: Vec<f64>,
    /// The pass that last reset `cap_targets` (see [`NodeEntry::reset_cap_targets`]).
    targets_pass: u64,
    /// Where it is in the view kept between passes (see `Nodes::generation`).
    pub view_position: usize,
    /// What its GPUs count parked or its non-GPU draw may have changed since the view kept
    /// between passes last read them (see [`NodeEntry::take_budget_changed`]).
    budget_changed: bool,
    /// Per GPU (as in `power.gpus`): the cap ceiling the store holds for it (see
    /// [`crate::power::ceilings`]); empty: none recorded.
    pub recorded_ceilings: Vec<f64>,
    /// Ceilings to record before an increase above `recorded_ceilings` may go out.
    pub ceilings_wanted: Option<Vec<f64>>,
}

impl NodeEntry {
    /// The power domains it is in as the last pass worked them out (positions in the tree then
    /// in force): for readers that hold no tree, such as the meter.
    pub fn known_domain_path(&self) -> &[u32] {
        &self.domain_path
    }

    /// The power domains it is in, parents first, as positions in `tree` (worked out once per
    /// tree: its labels do not change within a registration).
    pub fn domain_path(&mut self, tree: &crate::power::domains::DomainTree) -> &[u32] {
        if self.domain_tree_id != Some(tree.id) {
            self.domain_path = tree.path(&self.labels);
            self.domain_tree_id = Some(tree.id);
        }
        &self.domain_path
    }

    /// The increase `caps` may go out: the store records a ceiling at or above each cap. If not,
    /// the ceilings it needs are wanted (see [`Nodes::ceilings_to_record`]).
    pub fn increase_recorded(&mut self, caps: &[(u32, f64)]) -> bool {
        if CeilingRecord::allows(&self.recorded_ceilings, &self.power, caps) {
            return true;
        }
        self.want_ceilings(caps);
        false
    }

    /// Want ceilings covering what may be in force now and `caps`, and at least what is recorded.
    fn want_ceilings(&mut self, caps: &[(u32, f64)]) {
        let wanted: Vec<f64> = self
            .power
            .gpus
            .iter()
            .enumerate()
            .map(|(k, g)| {
                let ordered = caps.iter().filter(|(i, _)| *i == g.index).map(|&(_, w)| w).fold(0.0, f64::max);
                let before = self.ceilings_wanted.as_ref().and_then(|w| w.get(k)).copied().unwrap_or(0.0);
                let recorded = self.recorded_ceilings.get(k).copied().unwrap_or(0.0);
                g.upper().max(ordered).max(before).max(recorded)
            })
            .collect();
        self.ceilings_wanted = Some(wanted);
    }

    /// GPUs of shards the agent reports running or starting: busy until it says they stopped.
    pub fn reported_busy(&self) -> Vec<u32> {
        self.shards
            .iter()
            .filter(|(_, (_, state))| matches!(state, pb::ShardState::Running | pb::ShardState::Starting))
            .filter_map(|(key, _)| self.shard_gpus.get(key))
            .flatten()
            .copied()
            .collect()
    }

    /// Clear the cap targets (NaN: none yet) the first time pass `pass` asks; later calls in the
    /// same pass keep what it set.
    pub fn reset_cap_targets(&mut self, pass: u64) {
        if self.targets_pass != pass {
            self.targets_pass = pass;
            self.cap_targets.clear();
            self.cap_targets.resize(self.power.gpus.len(), f64::NAN);
        }
    }

    /// Where GPU `index` is in `power.gpus` (agents list them in index order, so usually there).
    pub fn gpu_position(&self, index: u32) -> Option<usize> {
        let gpus = &self.power.gpus;
        match gpus.get(index as usize) {
            Some(g) if g.index == index => Some(index as usize),
            _ => gpus.iter().position(|g| g.index == index),
        }
    }

    /// Record a telemetry message received at `now`: each GPU's draw, the node's non-GPU draw,
    /// what a node that does not enforce really runs under; then which GPUs without a Watt shard
    /// draw above `idle_allowance` (foreign) or stopped doing so.
    pub fn observe_telemetry(&mut self, t: pb::Telemetry, now: Instant, idle_allowance: f64) -> Vec<WorkChange> {
        // What each GPU counts parked and the node's other draw, before: readings move them only
        // now and then (an idle GPU drawing above its allowance, a node that does not enforce),
        // and only then does the view kept between passes read this node again.
        let parked_before = self.parked_fingerprint(idle_allowance);
        self.telemetry_taken_at =
            Some(now.checked_sub(Duration::from_millis(u64::from(t.sample_age_ms))).unwrap_or(now));
        if let Some(w) = t.non_gpu_power_watts.filter(|w| w.is_finite() && *w >= 0.0) {
            self.non_gpu_watts = w;
        }
        let enforcing = self.power.enforcing;
        let taken_at = self.telemetry_taken_at.unwrap_or(now);
        let mut changes = Vec::new();
        for reading in &t.gpus {
            let Some(k) = self.power.gpus.iter().position(|g| g.index == reading.index) else { continue };
            let g = &mut self.power.gpus[k];
            if !reading.up || self.readings_valid_from[k].is_some_and(|from| taken_at < from) {
                continue;
            }
            g.measured_watts = reading.power_watts;
            if !enforcing && reading.power_limit_watts > 0.0 {
                g.acked_watts = reading.power_limit_watts;
            }
            let since = &mut self.above_idle_since[k];
            if g.work == GpuWork::Watt || reading.power_watts <= idle_allowance {
                *since = None;
                if g.work == GpuWork::Foreign {
                    g.work = GpuWork::Idle;
                    changes.push(WorkChange { gpu: g.index, work: g.work, measured_watts: reading.power_watts });
                }
                continue;
            }
            let since = *since.get_or_insert(now);
            if g.work == GpuWork::Idle && now.saturating_duration_since(since) >= FOREIGN_AFTER {
                g.work = GpuWork::Foreign;
                changes.push(WorkChange { gpu: g.index, work: g.work, measured_watts: reading.power_watts });
            }
        }
        self.drawn_gpu_watts = t.gpus.iter().filter(|g| g.up).map(|g| g.power_watts).sum();
        self.telemetry = Some(t);
        if self.parked_fingerprint(idle_allowance) != parked_before || !changes.is_empty() {
            self.budget_changed = true;
        }
        changes
    }

    /// Every GPU's parked figure and the non-GPU draw, bit for bit, folded into one number that
    /// changes when any of them does (FNV-1a over the bits: no allocation on a path taken 25,000
    /// times a second). A collision would leave the node unread until a pass moves caps, which
    /// marks every node — a time-driven pass does so at least every 30 ticks.
    fn parked_fingerprint(&self, idle_allowance: f64) -> u64 {
        let figures = self
            .power
            .gpus
            .iter()
            .map(|g| crate::power::admission::parked_watts(&self.power, g, idle_allowance))
            .chain([self.non_gpu_watts]);
        figures.fold(0xcbf2_9ce4_8422_2325, |hash, w| (hash ^ w.to_bits()).wrapping_mul(0x0100_0000_01b3))
    }

    /// Whether its budget figures may have changed since the last call (cleared).
    pub fn take_budget_changed(&mut self) -> bool {
        std::mem::take(&mut self.budget_changed)
    }

    /// An order to it has not been acknowledged yet.
    pub fn owes_ack(&self) -> bool {
        self.power.gpus.iter().any(|g| g.in_flight.is_some())
    }

    /// What the node's GPUs draw, as its last telemetry says (GPUs that answered; 0 before any).
    pub fn drawn_gpu_watts(&self) -> f64 {
        self.drawn_gpu_watts
    }

    /// The node's draw besides its GPUs: what its agent reports, else the site's default.
    pub fn non_gpu_watts_or(&self, site_default: f64) -> f64 {
        if self.non_gpu_watts > 0.0 {
            self.non_gpu_watts
        } else {
            site_default
        }
    }

    /// The URL of the agent's logs endpoint, as this controller reaches the node.
    pub fn logs_url(&self) -> Option<String> {
        let (ip, logs) = (self.address?, self.logs?);
        let scheme = if logs.tls { "https" } else { "http" };
        Some(format!("{scheme}://{}", std::net::SocketAddr::new(ip, logs.port)))
    }

    pub fn state(&self, now: Instant, lease: Duration) -> NodeState {
        if self.lost || now.saturating_duration_since(self.last_seen) > lease {
            NodeState::Lost
        } else if self.session.is_some() {
            NodeState::Ready
        } else {
            NodeState::Disconnected
        }
    }
}

/// The port an agent serves its shards' logs on, and whether over HTTPS with its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogsEndpoint {
    pub port: u16,
    pub tls: bool,
}

/// Acknowledgements owed since the last pass (see [`crate::power::acks`]): set by the pass, counted
/// down by the session handlers. They live inside the registry's lock, beside the orders they
/// count, so the two cannot disagree.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OwedAcks {
    /// Reachable nodes with an order not yet acknowledged.
    pub nodes: usize,
    /// The pass left target caps unordered (increases waiting for headroom or their turn).
    pub more_to_order: bool,
}

/// What an acknowledgement settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckEffect {
    /// The node still owes one, or the others do.
    Nothing,
    /// It was the last node owing one: what waited on those decreases may be sent.
    LastOwed { more_to_order: bool },
}

/// A message on one of a node's sessions, and when it came: every message on the node's current
/// session renews its lease, in the same look-up that hands the message's contents over (one
/// registry lock a message: at 50,000 nodes that is 50,000 telemetry messages a second).
#[derive(Debug, Clone, Copy)]
pub struct Heard {
    pub session: u64,
    pub at: Instant,
    pub unix_ms: i64,
}

/// `node`'s entry if `heard` came on its current session, marked as heard from then; `None` if
/// the session was replaced (its messages are ignored).
fn heard_from<'a>(
    map: &'a mut crate::NameMap<String, NodeEntry>,
    node: &str,
    heard: Heard,
) -> Option<&'a mut NodeEntry> {
    let e = map.get_mut(node).filter(|e| e.session.as_ref().map(|s| s.id) == Some(heard.session))?;
    e.last_seen = heard.at;
    e.last_seen_unix_ms = heard.unix_ms;
    Some(e)
}

/// Every node, behind the registry's lock. Nodes are added only by registering (or being
/// expected at start) and never removed; what the lock guards is reached through these methods.
#[derive(Debug, Default)]
pub struct Nodes {
    map: crate::NameMap<String, NodeEntry>,
    owed: OwedAcks,
    /// Nodes whose shard orders may be due since the last look: a new session, a shard that
    /// changed state, lost. The shell looks at these (and the nodes of jobs it changed) instead
    /// of every node; a full look now and then catches anything else.
    orders_due: crate::NameSet<String>,
    /// Counts nodes added or replaced (registered, expected): a view kept between passes is
    /// rebuilt when it changes, refreshed in place otherwise.
    generation: u64,
    /// Something budget accounting reads changed since the last pass moved caps: a session came
    /// or went, a node was lost, an acknowledgement, a shard's state, a GPU's work, what a node
    /// that does not enforce runs under.
    power_changed: bool,
    /// Jobs whose shards' reports came in since the last pass read them.
    reports_changed: crate::NameSet<String>,
    /// Every node's budget figures may have changed (the pass moved caps and work on all of
    /// them): the view kept between passes reads every node again.
    every_budget_changed: bool,
}

impl Nodes {
    pub fn get(&self, name: &str) -> Option<&NodeEntry> {
        self.map.get(name)
    }

    /// The ceiling records to write: every node whose wanted ceilings are above its recorded.
    pub fn ceilings_to_record(&self) -> Vec<CeilingRecord> {
        self.map
            .values()
            .filter_map(|e| {
                let wanted = e.ceilings_wanted.as_ref()?;
                let mut record = CeilingRecord::covering(&e.power, &[], e.failsafe_after_ms)?;
                for (g, &w) in record.gpus.iter_mut().zip(wanted) {
                    g.ceiling_watts = g.ceiling_watts.max(w);
                }
                Some(record)
            })
            .collect()
    }

    /// `records` are stored: increases up to them may go out (the next pass sends them).
    pub fn ceilings_recorded(&mut self, records: &[CeilingRecord]) {
        for record in records {
            let Some(e) = self.map.get_mut(&record.node) else { continue };
            if e.power.gpus.len() != record.gpus.len() {
                continue;
            }
            let recorded: Vec<f64> = record
                .ceilings()
                .iter()
                .enumerate()
                .map(|(k, &c)| c.max(e.recorded_ceilings.get(k).copied().unwrap_or(0.0)))
                .collect();
            let covered = e.ceilings_wanted.as_ref().is_none_or(|w| w.iter().zip(&recorded).all(|(w, r)| w <= r));
            e.recorded_ceilings = recorded;
            if covered {
                e.ceilings_wanted = None;
            }
        }
        self.power_changed = true;
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut NodeEntry> {
        self.map.get_mut(name)
    }

    pub fn values(&self) -> impl Iterator<Item = &NodeEntry> {
        self.map.values()
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut NodeEntry> {
        self.map.values_mut()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// After a pass sent its orders: how many reachable nodes owe an acknowledgement now.
    pub fn set_owed(&mut self, owed: OwedAcks) {
        self.owed = owed;
    }

    pub fn owed(&self) -> OwedAcks {
        self.owed
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether budget accounting's inputs changed since the last call.
    pub fn take_power_changed(&mut self) -> bool {
        std::mem::take(&mut self.power_changed)
    }

    /// The pass changed caps, orders or work on every node: each one's budget figures are read
    /// again by the next view.
    pub fn every_budget_changed(&mut self) {
        self.every_budget_changed = true;
    }

    /// Whether [`Nodes::every_budget_changed`] was called since the last call (cleared).
    pub fn take_every_budget_changed(&mut self) -> bool {
        std::mem::take(&mut self.every_budget_changed)
    }

    /// The jobs whose shards reported since the last call.
    pub fn take_reports_changed(&mut self) -> crate::NameSet<String> {
        std::mem::take(&mut self.reports_changed)
    }

    /// The nodes whose orders may be due, emptied.
    pub fn take_orders_due(&mut self) -> crate::NameSet<String> {
        std::mem::take(&mut self.orders_due)
    }

    /// Look at `node`'s orders again on the next pass (an order could not be queued).
    pub fn orders_due(&mut self, node: &str) {
        if !self.orders_due.contains(node) {
            self.orders_due.insert(node.to_string());
        }
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    nodes: Mutex<Nodes>,
    next_session: AtomicU64,
    /// The site's idle GPU allowance (f64 bits), as the last pass read it: telemetry compares
    /// each GPU's draw with it without taking the power lock.
    idle_allowance: AtomicU64,
}

impl Registry {
    pub fn idle_allowance(&self) -> f64 {
        f64::from_bits(self.idle_allowance.load(Ordering::Relaxed))
    }

    pub fn set_idle_allowance(&self, watts: f64) {
        self.idle_allowance.store(watts.to_bits(), Ordering::Relaxed);
    }

    pub fn lock(&self) -> MutexGuard<'_, Nodes> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A (re)registration: the node's new session replaces any old one. Returns the session id.
    pub fn register(
        &self,
        register: &pb::Register,
        address: Option<IpAddr>,
        tx: mpsc::Sender<Result<pb::ControllerMessage, tonic::Status>>,
        alive: Arc<AtomicBool>,
        now: Instant,
        now_unix_ms: i64,
    ) -> u64 {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        let shards = register
            .shards
            .iter()
            .map(|s| ((s.job.clone(), s.shard), (s.epoch, pb::ShardState::try_from(s.state).unwrap_or_default())))
            .collect();
        let gpus = register
            .gpus
            .iter()
            .map(|g| {
                let range = g.power_limit.unwrap_or_default();
                // An agent that does not say what is in force counts at its maximum.
                let in_force = if g.current_limit_watts > 0.0 { g.current_limit_watts } else { range.max_watts };
                let failsafe = if g.failsafe_watts > 0.0 { g.failsafe_watts } else { range.min_watts };
                GpuCap::new(g.index, range.min_watts, range.max_watts, failsafe, in_force, GpuWork::Idle)
            })
            .collect();
        let power = NodeCaps::new(register.node_name.clone(), gpus, register.non_gpu_power_watts);
        // An agent too old to say counts as enforcing: the conservative reading of its caps.
        let enforce_mode = match register.enforce_mode() {
            pb::EnforceMode::Unspecified => pb::EnforceMode::On,
            mode => mode,
        };
        let mut power = power;
        power.enforcing = enforce_mode == pb::EnforceMode::On;
        let failsafe_after_ms = failsafe_after(register).as_millis() as i64;
        let entry = NodeEntry {
            name: register.node_name.clone(),
            gpus: register.gpus.clone(),
            agent_version: register.agent_version.clone(),
            boot_id: register.boot_id.clone(),
            address,
            http_port: u16::try_from(register.http_port).unwrap_or(0),
            logs: u16::try_from(register.logs_port)
                .ok()
                .filter(|&port| port > 0)
                .map(|port| LogsEndpoint { port, tls: register.logs_tls }),
            last_seen: now,
            last_seen_unix_ms: now_unix_ms,
            session: Some(Session { id, tx, alive }),
            lost: false,
            telemetry: None,
            drawn_gpu_watts: 0.0,
            shard_gpus: register.shards.iter().map(|s| ((s.job.clone(), s.shard), s.gpu_indices.clone())).collect(),
            shards,
            sent: HashMap::new(),
            power,
            failsafe_after_ms,
            enforce_mode,
            telemetry_taken_at: None,
            above_idle_since: vec![None; register.gpus.len()],
            readings_valid_from: vec![None; register.gpus.len()],
            shard_statuses: register.shards.iter().map(|s| ((s.job.clone(), s.shard), s.clone())).collect(),
            non_gpu_watts: register.non_gpu_power_watts,
            labels: register.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            runtimes: register.runtimes.clone(),
            shard_exec: register.shard_exec(),
            domain_path: Vec::new(),
            domain_tree_id: None,
            cap_targets: Vec::new(),
            targets_pass: 0,
            view_position: usize::MAX,
            budget_changed: true,
            recorded_ceilings: Vec::new(),
            ceilings_wanted: None,
        };
        let mut entry = entry;
        let mut nodes = self.lock();
        // What the store records for the node stands while its GPUs are the same; the caps it
        // registers with must be recorded too before anything above them is sent.
        if let Some(old) = nodes.map.get(&register.node_name) {
            let same_gpus = old.power.gpus.len() == entry.power.gpus.len()
                && old.power.gpus.iter().zip(&entry.power.gpus).all(|(a, b)| a.index == b.index);
            if same_gpus {
                entry.recorded_ceilings = old.recorded_ceilings.clone();
            }
        }
        if CeilingRecord::covering(&entry.power, &entry.recorded_ceilings, entry.failsafe_after_ms).is_some() {
            entry.want_ceilings(&[]);
        }
        nodes.map.insert(register.node_name.clone(), entry);
        nodes.generation += 1;
        nodes.power_changed = true;
        nodes.orders_due(&register.node_name);
        id
    }

    /// Apply `f` to the node if `session` is still its current session; `None` otherwise (a
    /// newer session replaced it, and this one's messages no longer count).
    pub fn with_session<T>(&self, node: &str, session: u64, f: impl FnOnce(&mut NodeEntry) -> T) -> Option<T> {
        let mut nodes = self.lock();
        let entry = nodes.get_mut(node)?;
        (entry.session.as_ref().map(|s| s.id) == Some(session)).then(|| f(entry))
    }

    /// A message on `heard`'s session that the registry reads nothing else of. Returns false if
    /// the session was replaced.
    pub fn touch(&self, node: &str, heard: Heard) -> bool {
        heard_from(&mut self.lock().map, node, heard).is_some()
    }

    /// Nodes that hold placements in the store but have not registered with this run of the
    /// controller (it just started): known from now, without a session or inventory, so that one
    /// that never comes back is lost when its lease runs out and its jobs go back to waiting —
    /// instead of staying "running" on a node nobody hears from.
    pub fn expect(&self, nodes: impl IntoIterator<Item = String>, now: Instant, now_unix_ms: i64) {
        let mut known = self.lock();
        known.generation += 1;
        for name in nodes {
            known.map.entry(name.clone()).or_insert_with(|| NodeEntry {
                power: NodeCaps { reachable: false, ..NodeCaps::new(name.clone(), Vec::new(), 0.0) },
                name,
                gpus: Vec::new(),
                agent_version: String::new(),
                boot_id: String::new(),
                address: None,
                http_port: 0,
                logs: None,
                last_seen: now,
                last_seen_unix_ms: now_unix_ms,
                session: None,
                lost: false,
                telemetry: None,
                drawn_gpu_watts: 0.0,
                shards: HashMap::new(),
                sent: HashMap::new(),
                failsafe_after_ms: DEFAULT_FAILSAFE_AFTER.as_millis() as i64,
                enforce_mode: pb::EnforceMode::Unspecified,
                telemetry_taken_at: None,
                above_idle_since: Vec::new(),
                readings_valid_from: Vec::new(),
                shard_statuses: HashMap::new(),
                shard_gpus: HashMap::new(),
                non_gpu_watts: 0.0,
                labels: Default::default(),
                runtimes: Vec::new(),
                shard_exec: pb::ShardExec::Unspecified,
                domain_path: Vec::new(),
                domain_tree_id: None,
                cap_targets: Vec::new(),
                targets_pass: 0,
                view_position: usize::MAX,
                budget_changed: true,
                recorded_ceilings: Vec::new(),
                ceilings_wanted: None,
            });
        }
    }

    /// Nodes whose cap ceilings the store records (a controller that takes over): each counted
    /// at its ceilings until it registers with this controller or its failsafe deadline passes
    /// (see [`CeilingRecord::unheard_node`]).
    pub fn expect_ceilings(&self, records: Vec<CeilingRecord>, now: Instant, now_ms: i64, now_unix_ms: i64) {
        self.expect(records.iter().map(|r| r.node.clone()), now, now_unix_ms);
        let mut known = self.lock();
        for record in records {
            let Some(entry) = known.map.get_mut(&record.node) else { continue };
            entry.power = record.unheard_node(now_ms);
            entry.above_idle_since = vec![None; entry.power.gpus.len()];
            entry.readings_valid_from = vec![None; entry.power.gpus.len()];
            entry.failsafe_after_ms = record.failsafe_after_ms;
            entry.recorded_ceilings = record.ceilings();
            entry.budget_changed = true;
        }
        known.power_changed = true;
    }

    /// A cap acknowledgement on `session` (see [`crate::power::planner::apply_ack`]): the caps the
    /// agent reads back, whether it enforces them, its mode. Counts the node off the owed ones
    /// when it settles its last order. `None`: the session was replaced.
    pub fn acknowledge(
        &self,
        node: &str,
        heard: Heard,
        epoch: u64,
        applied: &[(u32, f64)],
        enforced: bool,
        mode: pb::EnforceMode,
    ) -> Option<AckEffect> {
        let mut nodes = self.lock();
        let Nodes { map, owed, power_changed, .. } = &mut *nodes;
        let e = heard_from(map, node, heard)?;
        *power_changed = true;
        let owed_before = e.owes_ack();
        crate::power::planner::apply_ack(&mut e.power, epoch, applied, enforced);
        e.budget_changed = true;
        e.enforce_mode = mode;
        if !(owed_before && !e.owes_ack() && e.power.reachable) || owed.nodes == 0 {
            return Some(AckEffect::Nothing);
        }
        owed.nodes -= 1;
        Some(if owed.nodes == 0 {
            AckEffect::LastOwed { more_to_order: owed.more_to_order }
        } else {
            AckEffect::Nothing
        })
    }

    /// A shard status on `session`. Returns whether the shard's state changed (`None`: the
    /// session was replaced).
    pub fn report_shard(
        &self,
        node: &str,
        heard: Heard,
        status: pb::ShardStatus,
        state: pb::ShardState,
    ) -> Option<bool> {
        let mut nodes = self.lock();
        let e = heard_from(&mut nodes.map, node, heard)?;
        let key = (status.job.clone(), status.shard);
        let key_job = status.job.clone();
        let changed = e.shards.insert(key.clone(), (status.epoch, state)) != Some((status.epoch, state));
        e.shard_statuses.insert(key, status);
        if !nodes.reports_changed.contains(&key_job) {
            nodes.reports_changed.insert(key_job);
        }
        if changed {
            nodes.orders_due(node);
            nodes.power_changed = true;
        }
        Some(changed)
    }

    /// Nodes whose lease ran out (decided by [`crate::decide`]): lost, without a session, until
    /// they register again.
    pub fn mark_lost(&self, names: &[String]) {
        let mut nodes = self.lock();
        for name in names {
            if let Some(e) = nodes.get_mut(name) {
                e.lost = true;
                e.session = None;
                nodes.orders_due(name);
                nodes.power_changed = true;
            }
        }
    }

    /// The session ended. The node keeps its lease until it runs out.
    pub fn disconnect(&self, node: &str, session: u64) {
        let mut nodes = self.lock();
        let Some(e) = nodes.map.get_mut(node).filter(|e| e.session.as_ref().map(|s| s.id) == Some(session)) else {
            return;
        };
        e.session = None;
        e.sent.clear();
        nodes.power_changed = true;
    }

    /// End `node`'s session, whichever it is, telling its agent `why` (its identity was reset).
    pub fn end_session(&self, node: &str, why: tonic::Status) {
        let mut nodes = self.lock();
        let Some(e) = nodes.map.get_mut(node) else { return };
        if let Some(session) = e.session.take() {
            let _ = session.tx.try_send(Err(why));
        }
        e.sent.clear();
        nodes.power_changed = true;
    }

    /// Telemetry on `session` (see [`NodeEntry::observe_telemetry`]): the GPUs whose work it
    /// changed. `None`: the session was replaced.
    pub fn observe_telemetry(&self, node: &str, heard: Heard, t: pb::Telemetry) -> Option<Vec<WorkChange>> {
        let mut nodes = self.lock();
        // Read under the lock: a pass that changes the allowance sets it before it reads the
        // nodes, so a reading either comes before that pass's view or is judged by the new one.
        let idle_allowance = self.idle_allowance();
        let e = heard_from(&mut nodes.map, node, heard)?;
        let changes = e.observe_telemetry(t, heard.at, idle_allowance);
        // A node that does not enforce counts at the limits it reads back, which telemetry moves.
        if !changes.is_empty() || !e.power.enforcing {
            nodes.power_changed = true;
        }
        Some(changes)
    }

    /// The most GPUs any registered node has (0 with no nodes).
    pub fn largest_node_gpus(&self) -> usize {
        self.lock().values().filter(|e| !e.lost).map(|e| e.gpus.len()).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::planner::InFlight;

    fn register(registry: &Registry, name: &str) -> u64 {
        let r = pb::Register {
            node_name: name.into(),
            gpus: vec![pb::GpuInventory {
                index: 0,
                power_limit: Some(pb::PowerLimitRange { min_watts: 200.0, max_watts: 700.0, default_watts: 700.0 }),
                current_limit_watts: 700.0,
                ..Default::default()
            }],
            enforce_mode: pb::EnforceMode::On as i32,
            ..Default::default()
        };
        let (tx, _rx) = mpsc::channel(1);
        registry.register(&r, None, tx, Arc::new(AtomicBool::new(true)), Instant::now(), 0)
    }

    /// A message on `session`, now.
    fn heard(session: u64) -> Heard {
        Heard { session, at: Instant::now(), unix_ms: 0 }
    }

    fn order(registry: &Registry, name: &str, epoch: u64) {
        let mut nodes = registry.lock();
        let g = &mut nodes.get_mut(name).unwrap().power.gpus[0];
        g.in_flight = Some(InFlight { target: 300.0, upper: 700.0, epoch, sent_ms: 0 });
    }

    #[tokio::test]
    async fn only_the_last_node_owing_an_acknowledgement_settles_the_event() {
        let registry = Registry::default();
        let a = register(&registry, "a");
        let b = register(&registry, "b");
        order(&registry, "a", 1);
        order(&registry, "b", 2);
        registry.lock().set_owed(OwedAcks { nodes: 2, more_to_order: true });
        let on = pb::EnforceMode::On;

        assert_eq!(registry.acknowledge("a", heard(a), 1, &[(0, 300.0)], true, on), Some(AckEffect::Nothing));
        // The same node again: it owed nothing more, so it does not count twice.
        assert_eq!(registry.acknowledge("a", heard(a), 1, &[(0, 300.0)], true, on), Some(AckEffect::Nothing));
        assert_eq!(registry.lock().owed().nodes, 1);
        // An older session's answer does not count.
        assert_eq!(registry.acknowledge("b", heard(b + 100), 2, &[(0, 300.0)], true, on), None);
        assert_eq!(
            registry.acknowledge("b", heard(b), 2, &[(0, 300.0)], true, on),
            Some(AckEffect::LastOwed { more_to_order: true })
        );
        assert_eq!(registry.lock().owed().nodes, 0);
        assert!(!registry.lock().get("b").unwrap().owes_ack());
    }

    #[tokio::test(start_paused = true)]
    async fn every_message_on_the_current_session_renews_the_lease_and_no_other_does() {
        let registry = Registry::default();
        let a = register(&registry, "a");
        let seen = |registry: &Registry| registry.lock().get("a").unwrap().last_seen_unix_ms;
        let at = |unix_ms| Heard { session: a, at: Instant::now(), unix_ms };
        tokio::time::advance(Duration::from_secs(5)).await;
        registry.observe_telemetry("a", at(1), telemetry(60.0, None)).unwrap();
        assert_eq!(seen(&registry), 1, "telemetry");
        assert_eq!(registry.lock().get("a").unwrap().drawn_gpu_watts(), 60.0);
        let mut down = telemetry(90.0, None);
        down.gpus[0].up = false;
        registry.observe_telemetry("a", at(1), down).unwrap();
        assert_eq!(registry.lock().get("a").unwrap().drawn_gpu_watts(), 0.0, "a GPU that did not answer draws nothing");
        registry.acknowledge("a", at(2), 1, &[(0, 300.0)], true, pb::EnforceMode::On).unwrap();
        assert_eq!(seen(&registry), 2, "an acknowledgement");
        let status = pb::ShardStatus { job: "j".into(), shard: 0, epoch: 1, ..Default::default() };
        registry.report_shard("a", at(3), status, pb::ShardState::Running).unwrap();
        assert_eq!(seen(&registry), 3, "a shard's status");
        assert!(registry.touch("a", at(4)));
        assert_eq!(seen(&registry), 4, "anything else");
        assert_eq!(registry.lock().get("a").unwrap().last_seen, Instant::now());
        // A replaced session's messages are dropped and renew nothing.
        let old = Heard { session: a + 1, at: Instant::now(), unix_ms: 9 };
        assert!(!registry.touch("a", old));
        assert!(registry.observe_telemetry("a", old, telemetry(60.0, None)).is_none());
        assert_eq!(seen(&registry), 4);
    }

    #[tokio::test]
    async fn a_node_gone_for_good_is_lost_once_and_loses_its_session() {
        let registry = Registry::default();
        register(&registry, "a");
        registry.expect(["a".to_string(), "gone".to_string()], Instant::now(), 0);
        assert_eq!(registry.lock().len(), 2, "an expected node is known; a registered one is not replaced");
        assert!(registry.lock().get("a").unwrap().session.is_some());
        registry.mark_lost(&["a".to_string()]);
        let nodes = registry.lock();
        let a = nodes.get("a").unwrap();
        assert!(a.lost && a.session.is_none());
        assert_eq!(a.state(Instant::now(), Duration::from_secs(60)), NodeState::Lost);
    }
    fn telemetry(watts: f64, non_gpu: Option<f64>) -> pb::Telemetry {
        pb::Telemetry {
            gpus: vec![pb::GpuTelemetry { index: 0, up: true, power_watts: watts, ..Default::default() }],
            non_gpu_power_watts: non_gpu,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn telemetry_has_the_view_read_a_node_again_only_when_what_it_counts_moved() {
        let registry = Registry::default();
        registry.set_idle_allowance(100.0);
        let a = register(&registry, "a");
        let changed = |registry: &Registry| registry.lock().get_mut("a").unwrap().take_budget_changed();
        assert!(changed(&registry), "a new node is read");
        assert!(!changed(&registry), "read once");
        // An idle GPU counts parked what it draws, but never less than its 100 W allowance: draw
        // that stays under the allowance leaves that figure where it is...
        for watts in [40.0, 95.0, 60.0] {
            registry.observe_telemetry("a", heard(a), telemetry(watts, None)).unwrap();
            assert!(!changed(&registry), "{watts} W moves nothing the budget counts");
        }
        // ...its non-GPU draw does not.
        registry.observe_telemetry("a", heard(a), telemetry(60.0, Some(350.0))).unwrap();
        assert!(changed(&registry), "the node's draw besides its GPUs moved");
        // Nor does an acknowledgement's.
        order(&registry, "a", 1);
        registry.acknowledge("a", heard(a), 1, &[(0, 300.0)], true, pb::EnforceMode::On).unwrap();
        assert!(changed(&registry), "an acknowledged cap is read again");
        // A GPU that does not enforce counts what it draws above its allowance, parked.
        registry.lock().get_mut("a").unwrap().power.enforcing = false;
        changed(&registry);
        registry.observe_telemetry("a", heard(a), telemetry(150.0, Some(350.0))).unwrap();
        assert!(changed(&registry), "150 W counts on a node that does not enforce");
        registry.observe_telemetry("a", heard(a), telemetry(150.0, Some(350.0))).unwrap();
        assert!(!changed(&registry), "the same reading again moves nothing");
    }
}
