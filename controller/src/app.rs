//! Wires the controller together: store → controller core → gRPC services (agent sessions,
//! client API, health, reflection) + reconcile loop + metrics endpoint, with one shutdown path.

use std::future::Future;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use watt_proto::v1 as pb;
use watt_proto::v1::agent_service_server::AgentServiceServer;
use watt_proto::v1::control_service_server::ControlServiceServer;
use watt_proto::v1::power_service_server::PowerServiceServer;

use crate::api::{ControlApi, PowerApi, MAX_REQUEST_BYTES};
use crate::config::ControllerConfig;
use crate::error::ControllerError;
use crate::metrics::Metrics;
use crate::reconcile::Controller;
use crate::session::AgentSessions;
use crate::store;

/// How long open streams (agent sessions, event watches) may hold the exit after a signal.
const DRAIN: Duration = Duration::from_secs(5);

pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, ControllerError> {
    TcpListener::bind(addr).await.map_err(|source| ControllerError::Listen { addr, source })
}

/// Run the controller until `shutdown` resolves.
pub async fn run(
    config: ControllerConfig,
    listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    let store = store::open(&config.store).await?;
    let metrics = Metrics::new()?;
    let controller = Controller::new(store, config.settings(), metrics.clone()).await?;

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AgentServiceServer<AgentSessions>>().await;
    health_reporter.set_serving::<ControlServiceServer<ControlApi>>().await;
    health_reporter.set_serving::<PowerServiceServer<PowerApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ControllerError::Serve(e.to_string()))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let wait_stop = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let reconciling = tokio::spawn(controller.clone().run(wait_stop()));
    let metering = tokio::spawn(controller.clone().run_meter(wait_stop()));
    let metrics_app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics.clone());
    let metrics_server = tokio::spawn({
        let stop = wait_stop();
        async move { axum::serve(metrics_listener, metrics_app).with_graceful_shutdown(stop).await }
    });

    let addr = listener
        .local_addr()
        .map_err(|source| ControllerError::Io { context: "cannot read the bound address", source })?;
    tracing::info!(addr = %addr, store = %config.store, lease = %watt_common::duration::show(config.node_lease), "Serving gRPC.");
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health)
        .add_service(reflection)
        .add_service(AgentServiceServer::new(AgentSessions::new(controller.clone())))
        .add_service(PowerServiceServer::new(PowerApi::new(controller.clone())))
        .add_service(
            ControlServiceServer::new(ControlApi::new(controller.clone())).max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), wait_stop());
    let grpc = tokio::spawn(grpc);

    shutdown.await;
    tracing::info!("Shutting down.");
    let _ = stop_tx.send(true);
    // End every agent session's outbound stream, so their connections can close.
    for entry in controller.registry.lock().values_mut() {
        entry.session = None;
    }
    let _ = reconciling.await;
    let _ = metering.await;
    let served = match tokio::time::timeout(DRAIN, grpc).await {
        Ok(joined) => joined
            .map_err(|e| ControllerError::Serve(e.to_string()))?
            .map_err(|e| ControllerError::Serve(e.to_string())),
        Err(_) => {
            tracing::warn!("Open streams did not close within 5 s; exiting anyway.");
            Ok(())
        }
    };
    let _ = tokio::time::timeout(DRAIN, metrics_server).await;
    served
}

async fn render_metrics(State(metrics): State<Metrics>) -> impl axum::response::IntoResponse {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&metrics.registry.gather(), &mut buf) {
        tracing::error!(error = %e, "Cannot encode metrics; this is a bug.");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], buf)
}
