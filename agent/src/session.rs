//! The agent's session with the controller: one bidirectional gRPC stream that registers the
//! node, sends telemetry summaries, answers shard orders with shard statuses, and reconnects
//! with exponential backoff and jitter when the controller goes away (so that a thousand agents
//! do not reconnect in the same instant after a controller restart).

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use watt_proto::v1 as pb;
use watt_proto::v1::agent_service_client::AgentServiceClient;

use tokio::time::Instant;

use crate::bootstrap::{self, NodeCertFiles};
use crate::config::ControllerCredentials;
use crate::enforcer::Enforcer;
use crate::exporter::SessionMetrics;
use crate::gpu::GpuInfo;
use crate::sampler::NodeSnapshot;
use crate::shards::ShardTable;

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The longest pause while the controllers answer but none leads (an election under way).
const NO_LEADER_RETRY: Duration = Duration::from_secs(1);
/// How often an agent whose controller caretakes looks for a leader elsewhere.
const LEADER_PROBE: Duration = Duration::from_secs(2);

/// Whether a caretaker (ARCHITECTURE.md, invariant 11) may send this: cap decreases only.
pub fn caretaker_may_send(body: &pb::controller_message::Body) -> bool {
    match body {
        pb::controller_message::Body::CapOrder(o) => o.phase == pb::TransitionPhase::Decrease as i32,
        pb::controller_message::Body::ShardOrder(_) => false,
        pb::controller_message::Body::Registered(_)
        | pb::controller_message::Body::Heartbeat(_)
        | pb::controller_message::Body::Caretaking(_) => true,
    }
}

/// The highest leader's term this agent has heard (ARCHITECTURE.md, invariant 9): a controller
/// of a lower term has been deposed, so its session is refused and its orders ignored, and the
/// orders of two terms never interleave.
#[derive(Debug, Default)]
pub struct Terms {
    highest: u64,
}

impl Terms {
    /// A session from a controller leading in `term`: whether to keep it.
    pub fn accept_session(&mut self, term: u64) -> bool {
        if term < self.highest {
            return false;
        }
        self.highest = term;
        true
    }

    /// Whether an order sent in `term` may be acted on. Term 0 is a controller from before
    /// terms, which only ever speaks alone.
    pub fn accept_order(&self, term: u64) -> bool {
        term >= self.highest || term == 0 && self.highest == 0
    }
}

/// How a session ended, when it did not end cleanly.
#[derive(Debug)]
enum SessionEnd {
    /// The controllers answered, and none leads.
    NoLeader(watt_common::client::FindLeaderError),
    Failed(tonic::Status),
}

impl From<tonic::Status> for SessionEnd {
    fn from(status: tonic::Status) -> Self {
        SessionEnd::Failed(status)
    }
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The controller's URL, or its replicas' URLs: the session goes to the one that leads.
    pub controllers: Vec<String>,
    pub credentials: ControllerCredentials,
    /// Where a bootstrapped node keeps its certificate and key.
    pub node_cert: NodeCertFiles,
    pub node_name: String,
    /// Distinguishes this run of the agent from a reconnect of the same run.
    pub boot_id: String,
    /// Where the agent serves metrics.
    pub http_port: u16,
    /// Where it serves shards' logs, and whether over HTTPS.
    pub logs_port: u16,
    pub logs_tls: bool,
    /// Who may read those logs: the session gives it the key grants are checked with.
    pub log_access: Arc<crate::logs::LogAccess>,
    pub metrics: SessionMetrics,
    /// The node's power at every round, sent once a second (see [`crate::power_trace`]).
    pub power_trace: Arc<crate::power_trace::PowerTrace>,
    /// The node's labels (`--labels`), sent with its registration.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The runtimes it offers and where shards run, sent with its registration too.
    pub runtimes: Vec<String>,
    pub shard_exec: crate::supervisor::ShardExec,
}

/// Keep a session open until `stop` turns true.
pub async fn run(
    config: SessionConfig,
    inventory: Arc<[GpuInfo]>,
    snapshots: watch::Receiver<Arc<NodeSnapshot>>,
    shards: Arc<ShardTable>,
    enforcer: Arc<Enforcer>,
    mut stop: watch::Receiver<bool>,
) {
    if config.credentials.tls_cert.is_none() {
        if let Some(token_file) = config.credentials.bootstrap_token_file.clone() {
            tokio::spawn(keep_renewed(config.clone(), token_file, stop.clone()));
        }
    }
    let mut backoff = BACKOFF_START;
    let mut terms = Terms::default();
    loop {
        let outcome = tokio::select! {
            r = session_once(&config, &inventory, snapshots.clone(), &shards, &enforcer, &mut terms) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        config.metrics.connected.set(0);
        match outcome {
            Ok(()) => {
                tracing::warn!(controllers = ?config.controllers, "Controller closed the session; reconnecting.");
                backoff = BACKOFF_START;
            }
            Err(SessionEnd::NoLeader(e)) => {
                // A controller answered, so the replicas are up and electing: ask again soon, as
                // a new leader's first orders wait for the agents to find it.
                tracing::warn!(error = %e, "No controller leads yet; asking again.");
                backoff = backoff.min(NO_LEADER_RETRY);
            }
            Err(SessionEnd::Failed(e)) => {
                tracing::warn!(controllers = ?config.controllers, error = %e, "Controller session failed; reconnecting.")
            }
        }
        // Equal jitter: anywhere from half to all of the backoff.
        let pause = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn inventory_proto(gpus: &[GpuInfo], in_force: &[f64], failsafe: &[f64]) -> Vec<pb::GpuInventory> {
    gpus.iter()
        .enumerate()
        .map(|(i, g)| pb::GpuInventory {
            current_limit_watts: in_force.get(i).copied().unwrap_or(g.power_limit.max_watts),
            failsafe_watts: failsafe.get(i).copied().unwrap_or(g.power_limit.min_watts),
            index: g.index,
            uuid: g.uuid.clone(),
            model: g.model.clone(),
            memory_total_bytes: g.memory_total_bytes,
            pci_bus_id: g.pci_bus_id.clone(),
            power_limit: Some(pb::PowerLimitRange {
                min_watts: g.power_limit.min_watts,
                max_watts: g.power_limit.max_watts,
                default_watts: g.power_limit.default_watts,
            }),
        })
        .collect()
}

/// A telemetry summary of the latest snapshot.
pub fn telemetry(snapshot: &NodeSnapshot) -> pb::Telemetry {
    pb::Telemetry {
        unix_ms: snapshot.unix_ms,
        gpus: snapshot
            .inventory
            .iter()
            .zip(&snapshot.gpus)
            .map(|(info, reading)| match &reading.sample {
                Some(s) => pb::GpuTelemetry {
                    index: info.index,
                    up: true,
                    power_watts: s.power_watts,
                    energy_joules_total: reading.energy_joules_total.unwrap_or(0.0),
                    power_limit_watts: s.power_limit_watts.unwrap_or(0.0),
                    enforced_power_limit_watts: s.enforced_power_limit_watts.unwrap_or(0.0),
                    utilization_ratio: s.utilization_ratio,
                    temperature_celsius: s.temperature_celsius,
                    memory_used_bytes: s.memory_used_bytes,
                    throttle_reasons: s.throttle_reasons.0,
                },
                None => pb::GpuTelemetry { index: info.index, up: false, ..Default::default() },
            })
            .collect(),
        host_cpu_utilization_ratio: snapshot.host.map(|h| h.cpu_utilization_ratio).unwrap_or(0.0),
        host_memory_used_bytes: snapshot.host.map(|h| h.memory_used_bytes).unwrap_or(0),
        non_gpu_power_watts: snapshot.node_power.map(|p| p.total_watts()),
        sample_age_ms: Instant::now().saturating_duration_since(snapshot.taken_at).as_millis().min(u128::from(u32::MAX))
            as u32,
    }
}

fn message(body: pb::agent_message::Body) -> pb::AgentMessage {
    pb::AgentMessage { body: Some(body) }
}

/// Renew a bootstrapped node's certificate while the agent runs, not only when a session
/// starts: a session can outlast the month before the certificate's end, and an expired
/// certificate renews nothing. The new one is used from the next connection on.
async fn keep_renewed(config: SessionConfig, token_file: std::path::PathBuf, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(bootstrap::RENEW_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !bootstrap::renewal_due(&config.node_cert) {
            continue;
        }
        let renewed = match config.credentials.load() {
            Ok(credentials) => bootstrap::node_credentials(
                &config.controllers,
                credentials,
                &token_file,
                &config.node_name,
                &config.node_cert,
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = renewed {
            tracing::warn!(error = %e, "Cannot renew this node's certificate; trying again later.");
        }
    }
}

/// One session, from connect to the stream's end.
async fn session_once(
    config: &SessionConfig,
    inventory: &[GpuInfo],
    snapshots: watch::Receiver<Arc<NodeSnapshot>>,
    shards: &Arc<ShardTable>,
    enforcer: &Arc<Enforcer>,
    terms: &mut Terms,
) -> Result<(), SessionEnd> {
    use watt_common::client::FindLeaderError;
    // Read at each connect: a renewed certificate or token is used from the next session on.
    let mut credentials = config.credentials.load().map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    if let (None, Some(token_file)) = (&credentials.cert, &config.credentials.bootstrap_token_file) {
        credentials = bootstrap::node_credentials(
            &config.controllers,
            credentials,
            token_file,
            &config.node_name,
            &config.node_cert,
        )
        .await
        .map_err(|e| match e {
            bootstrap::BootstrapError::Leader(e @ FindLeaderError::NoLeader { .. }) => SessionEnd::NoLeader(e),
            e => SessionEnd::Failed(tonic::Status::unavailable(e.to_string())),
        })?;
    }
    let service = watt_proto::v1::agent_service_server::SERVICE_NAME;
    let (controller, channel) = credentials
        .connect_leader(&config.controllers, service, |endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(3))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
        })
        .await
        .map_err(|e| match e {
            e @ FindLeaderError::NoLeader { .. } => SessionEnd::NoLeader(e),
            e => SessionEnd::Failed(tonic::Status::unavailable(e.to_string())),
        })?;
    let (tx, rx) = mpsc::channel(256);
    let in_force = {
        let e = enforcer.clone();
        tokio::task::spawn_blocking(move || e.in_force()).await.unwrap_or_default()
    };
    let register = pb::Register {
        node_name: config.node_name.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        boot_id: config.boot_id.clone(),
        gpus: inventory_proto(inventory, &in_force, enforcer.failsafe_caps()),
        non_gpu_power_watts: snapshots.borrow().node_power.map_or(0.0, |p| p.total_watts()),
        shards: shards.statuses(),
        failsafe_after_ms: enforcer.failsafe_after().as_millis() as u32,
        http_port: u32::from(config.http_port),
        logs_port: u32::from(config.logs_port),
        logs_tls: config.logs_tls,
        enforce_mode: enforcer.mode().to_proto() as i32,
        labels: config.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        runtimes: config.runtimes.clone(),
        shard_exec: match config.shard_exec {
            crate::supervisor::ShardExec::Agent => pb::ShardExec::Agent,
            crate::supervisor::ShardExec::Host { .. } => pb::ShardExec::Host,
        } as i32,
    };
    tx.send(message(pb::agent_message::Body::Register(register)))
        .await
        .map_err(|_| tonic::Status::internal("queue"))?;
    let mut inbound = AgentServiceClient::new(channel).session(ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(controller = %controller, node = %config.node_name, "Registered with the controller.");
    config.metrics.registrations.inc();
    config.metrics.connected.set(1);

    let mut interval = Duration::from_secs(1);
    let mut tick = tokio::time::interval(interval);
    // While the controller caretakes: a look for a leader elsewhere every LEADER_PROBE, on a
    // task of its own (a probe may wait seconds on a controller that does not answer).
    let mut caretaker = false;
    config.metrics.caretaker.set(0);
    let mut probe_tick = tokio::time::interval(LEADER_PROBE);
    let (leader_found_tx, mut leader_found) = mpsc::channel::<String>(1);
    // Dropped with the session: a probe under way is aborted.
    let mut probes = tokio::task::JoinSet::new();
    // Shard state changes from the supervisor, for as long as this session lasts.
    let mut updates = shards.pending.lock().await;
    loop {
        tokio::select! {
            Some(leader) = leader_found.recv() => {
                tracing::info!(caretaker = %controller, leader = %leader, "A controller leads elsewhere: leaving the caretaker for it.");
                return Ok(());
            }
            _ = probe_tick.tick(), if caretaker => {
                while probes.try_join_next().is_some() {}
                if probes.is_empty() {
                    let (credentials, urls, found) = (credentials.clone(), config.controllers.clone(), leader_found_tx.clone());
                    probes.spawn(async move {
                        let tune = |endpoint: tonic::transport::Endpoint| endpoint.connect_timeout(Duration::from_secs(3));
                        if let Ok((leader, _)) = credentials.connect_leader(&urls, service, tune).await {
                            let _ = found.try_send(leader);
                        }
                    });
                }
            }
            Some(status) = updates.recv() => {
                if tx.send(message(pb::agent_message::Body::ShardStatus(status))).await.is_err() {
                    return Ok(());
                }
            }
            incoming = inbound.message() => {
                let Some(m) = incoming? else { return Ok(()) };
                if let Some(pb::controller_message::Body::Registered(r)) = &m.body {
                    if !terms.accept_session(r.term) {
                        return Err(SessionEnd::Failed(tonic::Status::failed_precondition(format!(
                            "{controller} leads in term {}, older than term {} this agent has heard: it was deposed",
                            r.term, terms.highest
                        ))));
                    }
                    config.metrics.term.set(terms.highest as i64);
                }
                let order_term = match &m.body {
                    Some(pb::controller_message::Body::CapOrder(o)) => Some(o.term),
                    Some(pb::controller_message::Body::ShardOrder(o)) => Some(o.term),
                    _ => None,
                };
                if let Some(term) = order_term.filter(|&t| !terms.accept_order(t)) {
                    tracing::warn!(term, highest = terms.highest, "Ignored an order from a deposed leader.");
                    config.metrics.stale_term_orders.inc();
                    continue;
                }
                if let Some(pb::controller_message::Body::Caretaking(c)) = &m.body {
                    if c.term == terms.highest && c.caretaking != caretaker {
                        caretaker = c.caretaking;
                        config.metrics.caretaker.set(i64::from(caretaker));
                        if caretaker {
                            tracing::warn!(controller = %controller, term = c.term, "The controller lost touch with its store: obeying cap decreases only, looking for a leader elsewhere.");
                            probe_tick.reset();
                        } else {
                            tracing::info!(controller = %controller, term = c.term, "The controller leads again.");
                            probes.abort_all();
                        }
                    }
                }
                if caretaker && m.body.as_ref().is_some_and(|b| !caretaker_may_send(b)) {
                    tracing::warn!(controller = %controller, "Refused an order from a caretaker: only cap decreases are obeyed from one.");
                    config.metrics.caretaker_refused.inc();
                    continue;
                }
                enforcer.heard(Instant::now());
                match m.body {
                    Some(pb::controller_message::Body::Registered(r)) => {
                        if !r.log_grant_key.is_empty() {
                            config.log_access.set_key(r.log_grant_key);
                        }
                        let wanted = Duration::from_millis(u64::from(r.telemetry_interval_ms).max(100));
                        if wanted != interval {
                            interval = wanted;
                            tick = tokio::time::interval(interval);
                        }
                    }
                    Some(pb::controller_message::Body::ShardOrder(order)) => {
                        let status = shards.apply(&order);
                        if tx.send(message(pb::agent_message::Body::ShardStatus(status))).await.is_err() {
                            return Ok(());
                        }
                    }
                    Some(pb::controller_message::Body::CapOrder(order)) => {
                        config.metrics.cap_orders.inc();
                        let increase = order.phase == pb::TransitionPhase::Increase as i32;
                        if increase && order.spread_ms > 0 {
                            // Step up a random moment into the wave; a decrease that comes
                            // meanwhile is applied at once, and this order then is stale.
                            let delay = Duration::from_millis(rand::rng().random_range(0..u64::from(order.spread_ms)));
                            let (e, tx) = (enforcer.clone(), tx.clone());
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                if let Ok(ack) = tokio::task::spawn_blocking(move || e.apply(&order, Instant::now())).await {
                                    let _ = tx.send(message(pb::agent_message::Body::CapAck(ack))).await;
                                }
                            });
                            continue;
                        }
                        let e = enforcer.clone();
                        let ack = tokio::task::spawn_blocking(move || e.apply(&order, Instant::now()))
                            .await
                            .map_err(|e| tonic::Status::internal(e.to_string()))?;
                        if tx.send(message(pb::agent_message::Body::CapAck(ack))).await.is_err() {
                            return Ok(());
                        }
                    }
                    Some(pb::controller_message::Body::Heartbeat(_) | pb::controller_message::Body::Caretaking(_)) | None => {}
                }
            }
            _ = tick.tick() => {
                let snapshot = snapshots.borrow().clone();
                if snapshot.round > 0 && tx.send(message(pb::agent_message::Body::Telemetry(telemetry(&snapshot)))).await.is_err() {
                    return Ok(());
                }
                shards.publish_speeds(&snapshot);
                if let Some(trace) = config.power_trace.take() {
                    if tx.send(message(pb::agent_message::Body::PowerTrace(trace))).await.is_err() {
                        return Ok(());
                    }
                }
                for progress in shards.take_progress(&snapshot) {
                    if tx.send(message(pb::agent_message::Body::ShardProgress(progress))).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caretaker_is_obeyed_only_when_it_lowers_caps() {
        use pb::controller_message::Body;
        let order = |phase: pb::TransitionPhase| {
            Body::CapOrder(pb::CapOrder { phase: phase as i32, term: 3, ..Default::default() })
        };
        assert!(caretaker_may_send(&order(pb::TransitionPhase::Decrease)));
        assert!(!caretaker_may_send(&order(pb::TransitionPhase::Increase)));
        assert!(!caretaker_may_send(&order(pb::TransitionPhase::Unspecified)));
        assert!(!caretaker_may_send(&Body::ShardOrder(pb::ShardOrder::default())));
        assert!(caretaker_may_send(&Body::Heartbeat(pb::Heartbeat::default())));
    }

    #[test]
    fn a_deposed_leaders_session_and_orders_are_refused() {
        let mut terms = Terms::default();
        assert!(terms.accept_order(0), "a controller from before terms is obeyed");
        assert!(terms.accept_session(7));
        assert!(terms.accept_order(7) && terms.accept_order(9));
        assert!(!terms.accept_order(6) && !terms.accept_order(0), "older terms are ignored once 7 is heard");
        assert!(!terms.accept_session(5), "a session from term 5 after term 7 is refused");
        assert!(terms.accept_session(9));
        assert!(!terms.accept_order(7));
    }
}
