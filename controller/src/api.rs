//! `ControlService`: the client API behind `wattctl`. Every request is validated before it
//! touches state; a bad one gets `InvalidArgument` naming the field and changes nothing.

use std::sync::Arc;

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};
use watt_proto::v1 as pb;
use watt_proto::v1::submit_job_request::Source;

use crate::auth::bootstrap::NodeSigner;
use crate::auth::Principal;
use crate::power::domains::Domain;
use crate::power::table::{Applied, PowerChange, PowerError, SiteUpdate, SourceUpdate};
use crate::power::SourceKind;
use crate::reconcile::{Controller, RequestError};
use crate::spec::{self, JobSpec};
use crate::store::StoreError;

/// Above tonic's 4 MiB default, so an oversized manifest reaches validation and is refused by
/// name rather than cut off by the transport.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct ControlApi {
    controller: Arc<Controller>,
    /// The CA that signs node certificates (`--client-ca`), handed out with log grants.
    node_ca_pem: String,
    /// Who signs node certificates and keeps which is accepted (`--client-ca-key`).
    node_signer: Option<Arc<NodeSigner>>,
}

impl ControlApi {
    pub fn new(controller: Arc<Controller>) -> Self {
        ControlApi { controller, node_ca_pem: String::new(), node_signer: None }
    }

    /// Node identities can be reset through `signer`.
    pub fn with_node_signer(mut self, signer: Option<Arc<NodeSigner>>) -> Self {
        self.node_signer = signer;
        self
    }

    /// Grants say that agents' certificates are checked against `pem`.
    pub fn with_node_ca(mut self, pem: String) -> Self {
        self.node_ca_pem = pem;
        self
    }
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Status {
        match e {
            RequestError::Invalid(field) => Status::invalid_argument(field.to_string()),
            RequestError::NotFound(_) => Status::not_found(e.to_string()),
            RequestError::Forbidden(_) => Status::permission_denied(e.to_string()),
            RequestError::Exhausted(_) => Status::resource_exhausted(e.to_string()),
            RequestError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            RequestError::Store(StoreError::Conflict { .. }) => Status::aborted(e.to_string()),
            RequestError::Store(StoreError::Unavailable(_) | StoreError::Deposed { .. }) => {
                Status::unavailable(e.to_string())
            }
            RequestError::Store(_) => Status::internal(e.to_string()),
        }
    }
}

/// The principal the auth layer found for this call (every method but the health check has one).
fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request.extensions().get::<Principal>().cloned().ok_or_else(|| Status::unauthenticated("no credentials"))
}

fn job_name(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("name is required"));
    }
    spec::validate_name(name).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl pb::control_service_server::ControlService for ControlApi {
    async fn submit_job(&self, request: Request<pb::SubmitJobRequest>) -> Result<Response<pb::Job>, Status> {
        let by = principal(&request)?;
        let spec = match request.into_inner().source {
            Some(Source::Manifest(text)) => JobSpec::from_manifest(&text),
            Some(Source::Spec(spec)) => JobSpec::from_proto(&spec),
            None => return Err(Status::invalid_argument("source is required: a spec or a manifest")),
        }
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(self.controller.submit(spec, &by).await?))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let name = request.into_inner().name;
        job_name(&name)?;
        Ok(Response::new(self.controller.job(&name).await?))
    }

    async fn list_jobs(&self, _: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        Ok(Response::new(pb::ListJobsResponse { jobs: self.controller.list_jobs().await }))
    }

    async fn cancel_job(&self, request: Request<pb::CancelJobRequest>) -> Result<Response<pb::Job>, Status> {
        let by = principal(&request)?;
        let name = request.into_inner().name;
        job_name(&name)?;
        Ok(Response::new(self.controller.cancel(&name, &by).await?))
    }

    async fn list_nodes(&self, _: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        Ok(Response::new(pb::ListNodesResponse { nodes: self.controller.list_nodes().await }))
    }

    async fn list_events(&self, _: Request<pb::ListEventsRequest>) -> Result<Response<pb::ListEventsResponse>, Status> {
        Ok(Response::new(pb::ListEventsResponse { events: self.controller.recent_events() }))
    }

    type WatchEventsStream = BoxStream<'static, Result<pb::Event, Status>>;

    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let stream = BroadcastStream::new(self.controller.events.subscribe()).map(|item| match item {
            Ok(event) => Ok(event),
            // A slow watcher is told what it missed rather than cut off.
            Err(BroadcastStreamRecvError::Lagged(n)) => Ok(pb::Event {
                unix_ms: crate::reconcile::unix_ms(),
                kind: "watch".into(),
                name: String::new(),
                reason: "lagged".into(),
                message: format!("{n} events were dropped because this watcher fell behind"),
                by: String::new(),
            }),
        });
        Ok(Response::new(stream.boxed()))
    }

    async fn reset_node_identity(
        &self,
        request: Request<pb::ResetNodeIdentityRequest>,
    ) -> Result<Response<pb::ResetNodeIdentityResponse>, Status> {
        let by = principal(&request)?;
        let node = request.into_inner().node;
        crate::session::validate_node_name("node", &node)?;
        let Some(signer) = &self.node_signer else {
            return Err(Status::failed_precondition(
                "this controller signs no node certificates (no --client-ca-key): there is no identity to reset",
            ));
        };
        signer.reset(&node, &by, crate::reconcile::unix_ms()).await?;
        let why = format!("the identity of node {node:?} was reset by {by}: its agent must bootstrap again");
        self.controller.registry.end_session(&node, Status::permission_denied(why));
        self.controller.emit_by(
            "node",
            &node,
            "identity-reset",
            "every certificate of the node refused from now on; it may bootstrap again".into(),
            Some(&by),
        );
        Ok(Response::new(pb::ResetNodeIdentityResponse {}))
    }

    async fn grant_logs(&self, request: Request<pb::GrantLogsRequest>) -> Result<Response<pb::LogGrant>, Status> {
        let by = principal(&request)?;
        let r = request.into_inner();
        job_name(&r.job).map_err(|e| Status::invalid_argument(format!("job: {}", e.message())))?;
        let grant = self.controller.grant_logs(&r.job, r.shard, &by).await?;
        Ok(Response::new(pb::LogGrant { node_ca_pem: self.node_ca_pem.clone(), ..grant }))
    }
}

/// `PowerService`: sources, site settings and the power status.
#[derive(Debug, Clone)]
pub struct PowerApi {
    controller: Arc<Controller>,
}

impl PowerApi {
    pub fn new(controller: Arc<Controller>) -> Self {
        PowerApi { controller }
    }

    /// Put `change` in force (a tightening at once, a loosening once stored: see
    /// [`crate::power_writer`]), announce it, and move caps now: the answer reflects the change
    /// (and its notes, such as a budget below the minimum caps), and says whether the store holds
    /// it yet — a cut does not wait on the store for its orders, only a moment for the answer.
    async fn change(&self, change: PowerChange, by: &Principal) -> Result<pb::PowerStatus, Status> {
        let (applied, generation) = self.controller.change_power(&change).await?;
        self.controller.acks.power_event();
        let (subject, reason, text) = match &applied {
            Applied::Source(s) => (
                s.name.clone(),
                "source-set",
                format!(
                    "{} {:.0} W available{}",
                    s.kind.as_str(),
                    s.available_watts,
                    ramp_text(s.ramp_watts_per_second)
                ),
            ),
            Applied::Removed(name) => (name.clone(), "source-removed", "source removed".to_string()),
            Applied::Domain(d) => (
                d.name.clone(),
                "domain-set",
                format!(
                    "limit {:.0} W over nodes labelled {}{}",
                    d.limit_watts,
                    d.selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                    d.parent.as_ref().map_or(String::new(), |p| format!(", within {p}"))
                ),
            ),
            Applied::DomainRemoved(name) => (name.clone(), "domain-removed", "domain removed".to_string()),
            Applied::GridSchedule { windows } => {
                ("grid".to_string(), "grid-schedule-set", format!("{windows} windows of grid events"))
            }
            Applied::Site(site) => (
                "site".to_string(),
                "site-set",
                format!(
                    "reserve {:.1}%, PUE {}, node overhead {:.0} W, ramp up {}, ramp down {}",
                    site.reserve_ratio * 100.0,
                    site.pue,
                    site.node_overhead_watts,
                    site.ramp_up_watts_per_second.map_or("unlimited".into(), |r| format!("{r:.0} W/s")),
                    site.ramp_down_watts_per_second.map_or("at once".into(), |r| format!("{r:.0} W/s")),
                ),
            ),
        };
        self.controller.emit_by("power", &subject, reason, text, Some(by));
        self.controller.reconcile_after_change().await;
        let stored = self.controller.power_writer.stored_by(generation, STORE_WAIT).await;
        let mut status = self.controller.power_status_now();
        status.change_unstored |= !stored;
        Ok(status)
    }
}

/// How long a power call's answer waits for the store to hold its change (the change is in
/// force, and its orders sent, before this).
const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl From<PowerError> for Status {
    fn from(e: PowerError) -> Status {
        match e {
            PowerError::Invalid(field) => Status::invalid_argument(field.to_string()),
            PowerError::UnknownSource(_) | PowerError::UnknownDomain(_) => Status::not_found(e.to_string()),
            PowerError::Store(s) => RequestError::Store(s).into(),
            PowerError::Caretaking { .. } => Status::unavailable(e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl pb::power_service_server::PowerService for PowerApi {
    async fn set_source(&self, request: Request<pb::SetSourceRequest>) -> Result<Response<pb::PowerStatus>, Status> {
        let by = principal(&request)?;
        let source = request.into_inner().source.ok_or_else(|| Status::invalid_argument("source is required"))?;
        let kind = match pb::SourceKind::try_from(source.kind) {
            Ok(pb::SourceKind::Grid) => SourceKind::Grid,
            Ok(pb::SourceKind::Generator) => SourceKind::Generator,
            Ok(pb::SourceKind::Battery) => SourceKind::Battery,
            Ok(pb::SourceKind::Manual) => SourceKind::Manual,
            _ => return Err(Status::invalid_argument("source.kind must be grid, generator, battery or manual")),
        };
        let update = SourceUpdate {
            name: source.name,
            kind,
            available_watts: source.available_watts,
            ramp_watts_per_second: source.ramp_watts_per_second,
            domain: Some(source.domain).filter(|d| !d.is_empty()),
        };
        Ok(Response::new(self.change(PowerChange::SetSource(update), &by).await?))
    }

    async fn remove_source(
        &self,
        request: Request<pb::RemoveSourceRequest>,
    ) -> Result<Response<pb::PowerStatus>, Status> {
        let by = principal(&request)?;
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        Ok(Response::new(self.change(PowerChange::RemoveSource(name), &by).await?))
    }

    async fn set_domain(&self, request: Request<pb::SetDomainRequest>) -> Result<Response<pb::PowerStatus>, Status> {
        let by = principal(&request)?;
        let d = request.into_inner().domain.ok_or_else(|| Status::invalid_argument("domain is required"))?;
        let domain = Domain {
            name: d.name,
            parent: Some(d.parent).filter(|p| !p.is_empty()),
            limit_watts: d.limit_watts,
            selector: d.selector.into_iter().collect(),
        };
        Ok(Response::new(self.change(PowerChange::SetDomain(domain), &by).await?))
    }

    async fn remove_domain(
        &self,
        request: Request<pb::RemoveDomainRequest>,
    ) -> Result<Response<pb::PowerStatus>, Status> {
        let by = principal(&request)?;
        let name = request.into_inner().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        Ok(Response::new(self.change(PowerChange::RemoveDomain(name), &by).await?))
    }

    async fn set_site(&self, request: Request<pb::SetSiteRequest>) -> Result<Response<pb::PowerStatus>, Status> {
        let by = principal(&request)?;
        let r = request.into_inner();
        let update = SiteUpdate {
            reserve_ratio: r.reserve_ratio,
            pue: r.pue,
            node_overhead_watts: r.node_overhead_watts,
            idle_gpu_watts: r.idle_gpu_watts,
            ramp_up_watts_per_second: r.ramp_up_watts_per_second,
            ramp_down_watts_per_second: r.ramp_down_watts_per_second,
        };
        Ok(Response::new(self.change(PowerChange::SetSite(update), &by).await?))
    }

    async fn get_power_status(
        &self,
        _: Request<pb::GetPowerStatusRequest>,
    ) -> Result<Response<pb::PowerStatus>, Status> {
        Ok(Response::new(self.controller.power_status_now()))
    }

    type WatchPowerStream = BoxStream<'static, Result<pb::PowerStatus, Status>>;

    async fn watch_power(&self, _: Request<pb::WatchPowerRequest>) -> Result<Response<Self::WatchPowerStream>, Status> {
        let stream = tokio_stream::wrappers::WatchStream::new(self.controller.power_status.subscribe()).map(Ok);
        Ok(Response::new(stream.boxed()))
    }
}

fn ramp_text(ramp: Option<f64>) -> String {
    ramp.map(|r| format!(", ramp {r:.0} W/s")).unwrap_or_default()
}
