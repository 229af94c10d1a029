//! `AgentService.Session`: one bidirectional stream per agent. The first message registers the
//! node; after it come telemetry, shard statuses and cap acknowledgements. The controller
//! answers `Registered`, then sends shard orders from the reconcile loop through the session's
//! queue. A malformed message ends the session with `InvalidArgument` naming the field.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use watt_common::auth::Role;
use watt_proto::v1 as pb;
use watt_proto::v1::agent_message::Body;

use crate::auth::bootstrap::NodeSigner;
use crate::auth::Principal;
use crate::reconcile::{unix_ms, Controller};
use crate::registry::{AckEffect, Heard};

/// How many orders may wait for one agent before the reconcile loop holds back.
const SESSION_QUEUE: usize = 256;
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct AgentSessions {
    controller: Arc<Controller>,
    /// Signs node certificates, when the controller holds its client CA's key.
    signer: Option<Arc<NodeSigner>>,
}

impl AgentSessions {
    pub fn new(controller: Arc<Controller>, signer: Option<Arc<NodeSigner>>) -> Self {
        AgentSessions { controller, signer }
    }
}

fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field} {message}"))
}

/// The node-name rule (`watt_common::names::check_node`); `field` names the field in the error.
pub fn validate_node_name(field: &str, name: &str) -> Result<(), Status> {
    watt_common::names::check_node(name).map_err(|rule| invalid(field, rule))
}

/// Check a registration before anything of it is used.
pub fn validate_register(r: &pb::Register) -> Result<(), Status> {
    validate_node_name("register.node_name", &r.node_name)?;
    if r.gpus.len() > 1024 {
        return Err(invalid("register.gpus", format!("lists {} GPUs; the limit is 1024", r.gpus.len())));
    }
    let mut seen = HashSet::new();
    for (i, gpu) in r.gpus.iter().enumerate() {
        if !seen.insert(gpu.index) {
            return Err(invalid(&format!("register.gpus[{i}].index"), format!("{} appears twice", gpu.index)));
        }
        let Some(limit) = &gpu.power_limit else {
            return Err(invalid(&format!("register.gpus[{i}].power_limit"), "is required"));
        };
        if !(limit.min_watts > 0.0 && limit.min_watts <= limit.max_watts && limit.max_watts.is_finite()) {
            return Err(invalid(
                &format!("register.gpus[{i}].power_limit"),
                format!("must have 0 < min_watts ≤ max_watts (got {} and {})", limit.min_watts, limit.max_watts),
            ));
        }
    }
    if !(r.non_gpu_power_watts >= 0.0 && r.non_gpu_power_watts.is_finite()) {
        return Err(invalid("register.non_gpu_power_watts", format!("must be ≥ 0 (got {})", r.non_gpu_power_watts)));
    }
    if r.labels.len() > 64 {
        return Err(invalid("register.labels", format!("lists {} labels; the limit is 64", r.labels.len())));
    }
    for (key, value) in &r.labels {
        watt_common::names::check_label(key, value).map_err(|m| invalid("register.labels", m))?;
    }
    if r.runtimes.len() > 32 {
        return Err(invalid("register.runtimes", format!("lists {} runtimes; the limit is 32", r.runtimes.len())));
    }
    for (i, runtime) in r.runtimes.iter().enumerate() {
        watt_common::names::check_runtime(runtime).map_err(|m| invalid(&format!("register.runtimes[{i}]"), m))?;
    }
    Ok(())
}

impl AgentSessions {
    /// A node that proved itself with a certificate: the one the controller pinned for it, if
    /// it pinned one (see [`crate::auth::bootstrap`]).
    async fn check_pinned(&self, principal: &Principal, peer: &crate::tls::PeerInfo) -> Result<(), Status> {
        let (Some(signer), Some(certs)) = (&self.signer, &peer.certs) else { return Ok(()) };
        if principal.credential != crate::auth::Credential::Certificate {
            return Ok(());
        }
        let Some(leaf) = certs.first() else { return Ok(()) };
        signer.check_current(&principal.name, &crate::auth::bootstrap::fingerprint(leaf)).await
    }
}

/// A session may register only the node its credentials name: no agent takes over another
/// node's session, its shard orders or their environments.
pub fn check_identity(identity: Option<&Principal>, node_name: &str) -> Result<(), Status> {
    match identity {
        Some(p) if p.role == Role::Node && p.name == node_name => Ok(()),
        Some(p) => Err(Status::permission_denied(format!(
            "{p} may not register node {node_name:?}: a node's name comes from its credentials"
        ))),
        None => Err(Status::unauthenticated("no credentials: a node registers with its node certificate or token")),
    }
}

fn validate_shard_status(s: &pb::ShardStatus) -> Result<pb::ShardState, Status> {
    crate::spec::validate_name(&s.job).map_err(|e| invalid("shard_status.job", e.message))?;
    match pb::ShardState::try_from(s.state) {
        Ok(pb::ShardState::Unspecified) | Err(_) => {
            Err(invalid("shard_status.state", format!("is not a shard state (got {})", s.state)))
        }
        Ok(state) => Ok(state),
    }
}

/// A node's power trace: as many offsets as rounds, as many of each job's readings, finite
/// watts ≥ 0, at most a minute of rounds at 10 Hz and 64 jobs.
fn validate_trace(t: &pb::PowerTrace) -> Result<(), Status> {
    let rounds = t.node_watts.len();
    if rounds > 600 {
        return Err(invalid("power_trace.node_watts", format!("has {rounds} rounds; at most 600")));
    }
    if t.offsets_ms.len() != rounds {
        return Err(invalid(
            "power_trace.offsets_ms",
            format!("has {} offsets for {rounds} rounds", t.offsets_ms.len()),
        ));
    }
    if t.jobs.len() > 64 {
        return Err(invalid("power_trace.jobs", format!("has {} jobs; at most 64", t.jobs.len())));
    }
    let watts_ok = |w: &f32| w.is_finite() && *w >= 0.0;
    if !t.node_watts.iter().all(watts_ok) {
        return Err(invalid("power_trace.node_watts", "must be finite numbers ≥ 0"));
    }
    for j in &t.jobs {
        crate::spec::validate_name(&j.job).map_err(|e| invalid("power_trace.jobs.job", e.message))?;
        if j.watts.len() != rounds || !j.watts.iter().all(watts_ok) {
            return Err(invalid(
                "power_trace.jobs.watts",
                format!("must have {rounds} finite numbers ≥ 0 (job {:?})", j.job),
            ));
        }
    }
    Ok(())
}

fn validate_progress(p: &pb::ShardProgress) -> Result<(), Status> {
    crate::spec::validate_name(&p.job).map_err(|e| invalid("shard_progress.job", e.message))?;
    if !(p.energy_joules.is_finite() && p.energy_joules >= 0.0) {
        return Err(invalid(
            "shard_progress.energy_joules",
            format!("must be a finite number ≥ 0 (got {})", p.energy_joules),
        ));
    }
    if p.loss.is_some_and(|l| !l.is_finite()) {
        return Err(invalid("shard_progress.loss", "must be finite"));
    }
    if p.extra.len() > 16 {
        return Err(invalid("shard_progress.extra", format!("has {} keys; at most 16", p.extra.len())));
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentSessions {
    type SessionStream = BoxStream<'static, Result<pb::ControllerMessage, Status>>;

    async fn bootstrap(
        &self,
        request: Request<pb::BootstrapRequest>,
    ) -> Result<Response<pb::BootstrapResponse>, Status> {
        let principal = request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no credentials: bootstrap with a bootstrap token"))?;
        let Some(signer) = &self.signer else {
            return Err(Status::failed_precondition(
                "this controller signs no node certificates: start it with --client-ca-key",
            ));
        };
        // A renewal proves itself with the node's certificate in force, not an older one.
        if principal.role == Role::Node {
            self.check_pinned(&principal, &crate::tls::PeerInfo::of(&request)).await?;
        }
        let answer = signer.sign(&principal, request.get_ref(), unix_ms()).await?;
        let node = &request.get_ref().node_name;
        self.controller.emit_by("node", node, "certificate-issued", "node certificate issued".into(), Some(&principal));
        Ok(Response::new(answer))
    }

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = crate::tls::PeerInfo::of(&request);
        let address = peer.remote.map(|a| a.ip());
        // The auth layer let only a node's principal through; its name is the node's.
        let identity = request.extensions().get::<Principal>().cloned();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no register message within 10 s"))??
            .ok_or_else(|| Status::cancelled("stream closed before register"))?;
        let Some(Body::Register(register)) = first.body else {
            return Err(invalid("body", "of the first message of a session must be register"));
        };
        validate_register(&register)?;
        check_identity(identity.as_ref(), &register.node_name)?;
        if let Some(principal) = &identity {
            self.check_pinned(principal, &peer).await?;
        }
        for (i, s) in register.shards.iter().enumerate() {
            validate_shard_status(s).map_err(|e| invalid(&format!("register.shards[{i}]"), e.message()))?;
        }

        let c = &self.controller;
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let registered = pb::Registered {
            heartbeat_interval_ms: c.settings.node_lease.as_millis() as u32 / 3,
            telemetry_interval_ms: c.settings.telemetry_interval.as_millis() as u32,
            log_grant_key: c.log_grants.node_key(&register.node_name),
            term: c.term,
        };
        tx.try_send(Ok(pb::ControllerMessage { body: Some(pb::controller_message::Body::Registered(registered)) }))
            .map_err(|_| Status::internal("session queue"))?;
        let node = register.node_name.clone();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let session = c.registry.register(&register, address, tx.clone(), alive.clone(), Instant::now(), unix_ms());
        // The caps it registers with are recorded before anything above them is sent (invariant 9).
        c.power_writer.node_registered();
        c.emit(
            "node",
            &node,
            "registered",
            format!("{} GPU(s), agent {}", register.gpus.len(), register.agent_version),
        );
        c.wake();

        // Heartbeats, so the agent can tell a quiet controller from a lost one: several per the
        // agent's failsafe deadline, for as long as this is the node's current session. A
        // caretaker says so with each (invariant 11): the notice sent when caretaking began may
        // have met a full queue.
        let beat = tx.clone();
        let caring = self.controller.clone();
        let every =
            (crate::registry::failsafe_after(&register) / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if !alive.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let heartbeat = pb::Heartbeat { unix_ms: unix_ms() };
                let message = pb::ControllerMessage { body: Some(pb::controller_message::Body::Heartbeat(heartbeat)) };
                if beat.send(Ok(message)).await.is_err() {
                    return;
                }
                if caring.caretaking() {
                    let notice = pb::Caretaking { term: caring.term, caretaking: true };
                    let message =
                        pb::ControllerMessage { body: Some(pb::controller_message::Body::Caretaking(notice)) };
                    if beat.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
            }
        });

        let controller = self.controller.clone();
        tokio::spawn(async move {
            let end = serve_inbound(&controller, &node, session, &mut inbound).await;
            controller.registry.disconnect(&node, session);
            match end {
                Ok(()) => controller.emit("node", &node, "disconnected", "session closed".into()),
                Err(status) => {
                    controller.emit("node", &node, "disconnected", status.message().to_string());
                    let _ = tx.send(Err(status)).await;
                }
            }
            controller.wake();
        });
        Ok(Response::new(ReceiverStream::new(rx).boxed()))
    }
}

/// Handle an agent's messages until its stream ends (Ok) or it sends something malformed.
async fn serve_inbound(
    c: &Controller,
    node: &str,
    session: u64,
    inbound: &mut Streaming<pb::AgentMessage>,
) -> Result<(), Status> {
    loop {
        let message = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(status) => {
                tracing::debug!(node, %status, "Agent stream ended with an error.");
                return Ok(());
            }
        };
        // Every message renews the node's lease, in the call that takes it in. `None` from one
        // of them: replaced by a newer session of the same node.
        let heard = Heard { session, at: Instant::now(), unix_ms: unix_ms() };
        match message.body {
            Some(Body::Telemetry(t)) => {
                let Some(changes) = c.registry.observe_telemetry(node, heard, t) else { return Ok(()) };
                if !changes.is_empty() {
                    for change in &changes {
                        c.emit_gpu_work(node, change);
                    }
                    // The budget for jobs changed: a power event, with its settle time.
                    c.acks.power_event();
                    c.wake();
                }
            }
            Some(Body::ShardStatus(s)) => {
                let state = validate_shard_status(&s)?;
                match c.registry.report_shard(node, heard, s, state) {
                    None => return Ok(()),
                    Some(true) => c.wake(),
                    Some(false) => {}
                }
            }
            Some(Body::CapAck(ack)) => {
                let applied: Vec<(u32, f64)> =
                    ack.applied.iter().filter(|c| c.watts.is_finite()).map(|c| (c.index, c.watts)).collect();
                let outcome = ack.outcome();
                let mode = match ack.enforce_mode() {
                    pb::EnforceMode::Unspecified => pb::EnforceMode::On,
                    mode => mode,
                };
                // The agent's mode, not the outcome: a stale answer from a dry-run agent does not
                // make it enforce.
                let enforced = mode == pb::EnforceMode::On && outcome != pb::CapOutcome::NotEnforced;
                let Some(effect) = c.registry.acknowledge(node, heard, ack.epoch, &applied, enforced, mode) else {
                    return Ok(());
                };
                let last = match effect {
                    AckEffect::LastOwed { more_to_order } => {
                        c.acks.last_owed_settled(more_to_order, &c.metrics);
                        true
                    }
                    AckEffect::Nothing => false,
                };
                // Applied, answered by a node that does not enforce, or overtaken by a newer
                // order: nothing went wrong.
                let error = match outcome {
                    pb::CapOutcome::Applied | pb::CapOutcome::NotEnforced | pb::CapOutcome::Stale => false,
                    pb::CapOutcome::Rejected | pb::CapOutcome::Failed | pb::CapOutcome::Unspecified => true,
                };
                if error {
                    c.emit("node", node, "cap-error", ack.error.clone());
                }
                // Only the last acknowledgement owed runs a pass: it may free increases.
                if last || error {
                    c.wake();
                }
            }
            Some(Body::ShardProgress(p)) => {
                validate_progress(&p)?;
                if !c.registry.touch(node, heard) {
                    return Ok(());
                }
                let rank0 = (p.shard == 0).then(|| p.job.clone());
                // A curve that moved shares power differently (when power is short).
                if c.speed_curves.record(&p) {
                    c.wake();
                }
                c.progress.record(p);
                if let Some(progress) = rank0.and_then(|job| c.progress.job(&job).map(|p| (job, p))) {
                    c.metrics.set_progress(&progress.0, &progress.1);
                }
            }
            Some(Body::PowerTrace(t)) => {
                validate_trace(&t)?;
                if !c.registry.touch(node, heard) {
                    return Ok(());
                }
                c.swings.record(node, &t);
            }
            Some(Body::Register(_)) => return Err(invalid("body", "register may only be the first message")),
            None => return Err(invalid("body", "is required")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Credential;

    #[test]
    fn a_node_registers_only_under_its_own_name() {
        let node = |name: &str, role| Principal { name: name.into(), role, credential: Credential::Certificate };
        assert!(check_identity(Some(&node("n1", Role::Node)), "n1").is_ok());
        let hijack = check_identity(Some(&node("n2", Role::Node)), "n1").unwrap_err();
        assert_eq!(hijack.code(), tonic::Code::PermissionDenied);
        assert!(hijack.message().contains("n2 (node) may not register node \"n1\""), "{}", hijack.message());
        assert_eq!(
            check_identity(Some(&node("n1", Role::Admin)), "n1").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(check_identity(None, "n1").unwrap_err().code(), tonic::Code::Unauthenticated);
    }
}
