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

use crate::reconcile::{Controller, RequestError};
use crate::spec::{self, JobSpec};
use crate::store::StoreError;

/// Above tonic's 4 MiB default, so an oversized manifest reaches validation and is refused by
/// name rather than cut off by the transport.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct ControlApi {
    controller: Arc<Controller>,
}

impl ControlApi {
    pub fn new(controller: Arc<Controller>) -> Self {
        ControlApi { controller }
    }
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Status {
        match e {
            RequestError::Invalid(field) => Status::invalid_argument(field.to_string()),
            RequestError::NotFound(_) => Status::not_found(e.to_string()),
            RequestError::Store(StoreError::Conflict { .. }) => Status::aborted(e.to_string()),
            RequestError::Store(StoreError::Unavailable(_)) => Status::unavailable(e.to_string()),
            RequestError::Store(_) => Status::internal(e.to_string()),
        }
    }
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
        let spec = match request.into_inner().source {
            Some(Source::Manifest(text)) => JobSpec::from_manifest(&text),
            Some(Source::Spec(spec)) => JobSpec::from_proto(&spec),
            None => return Err(Status::invalid_argument("source is required: a spec or a manifest")),
        }
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(self.controller.submit(spec).await?))
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
        let name = request.into_inner().name;
        job_name(&name)?;
        Ok(Response::new(self.controller.cancel(&name).await?))
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
            }),
        });
        Ok(Response::new(stream.boxed()))
    }
}
