//! Wires the controller together: store → controller core → gRPC services (agent sessions,
//! client API, health, reflection) + reconcile loop + metrics endpoint, with one shutdown path.

use std::future::Future;
use std::sync::Arc;
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
use crate::auth::bootstrap::NodeSigner;
use crate::auth::layer::AuthLayer;
use crate::auth::tokens::TokenFile;
use crate::auth::Authenticator;
use crate::config::ControllerConfig;
use crate::error::ControllerError;
use crate::metrics::Metrics;
use crate::reconcile::Controller;
use crate::session::AgentSessions;
use crate::store;
use crate::store::observed::StoreHealth;
use crate::tls::{ReloadingTls, TlsFiles};

/// How long open streams (agent sessions, event watches) may hold the exit after a signal.
const DRAIN: Duration = Duration::from_secs(5);

/// Connections waiting to be accepted. When thousands of agents reconnect at once (a controller
/// restart), a short queue drops their SYNs and each waits out TCP's retransmission backoff
/// (1 s, 3 s, 7 s, … a minute): the kernel caps this at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 16_384;

pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, ControllerError> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        // As TcpListener::bind does: a restarted controller rebinds a port with connections in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| ControllerError::Listen { addr, source })
}

/// Run the controller until `shutdown` resolves.
pub async fn run(
    config: ControllerConfig,
    listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    let metrics = Metrics::new()?;
    let store_health = StoreHealth::new(metrics.store_write_failures.clone(), metrics.store_writable.clone());
    let store: Arc<dyn store::Store> = Arc::new(store::observed::Observed::new(
        store::open_with(&config.store, etcd_tls(&config)?).await?,
        store_health.clone(),
    ));
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
    tokio::spawn(crate::retention::sweep(controller.clone(), wait_stop()));
    let metrics_app = Router::new()
        .route("/metrics", get(render_metrics))
        .with_state(metrics.clone())
        .route("/healthz", get(healthz).with_state(store_health));
    let metrics_server = tokio::spawn({
        let stop = wait_stop();
        async move { axum::serve(metrics_listener, metrics_app).with_graceful_shutdown(stop).await }
    });

    let addr = listener
        .local_addr()
        .map_err(|source| ControllerError::Io { context: "cannot read the bound address", source })?;
    let tokens = match &config.token_file {
        Some(path) => {
            let tokens = TokenFile::open(path)?;
            tokio::spawn(tokens.clone().watch(wait_stop()));
            Some(tokens)
        }
        None => None,
    };
    let auth = AuthLayer::new(Arc::new(Authenticator::new(tokens)), metrics.refused_calls.clone());
    let signer = node_signer(&config, &controller).await?;
    if let Some(signer) = &signer {
        tokio::spawn(signer.clone().follow(wait_stop()));
    }
    let node_ca = match &config.client_ca {
        Some(path) => read_credential("the client CA", path)?,
        None => String::new(),
    };
    let tls = match &config.tls {
        Some(files) => {
            let tls = ReloadingTls::open(TlsFiles {
                cert: files.cert.clone(),
                key: files.key.clone(),
                client_ca: config.client_ca.clone(),
            })?;
            tokio::spawn(tls.clone().watch(wait_stop()));
            Some(tls)
        }
        None => None,
    };
    if config.plain_text_off_loopback() {
        metrics.insecure_listener.set(1);
        tokio::spawn(warn_insecure(addr, wait_stop()));
    }
    tracing::info!(
        addr = %addr,
        tls = config.tls.is_some(),
        store = %config.store,
        lease = %watt_common::duration::show(config.node_lease),
        "Serving gRPC."
    );
    let router = tonic::transport::Server::builder()
        .layer(auth)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health)
        .add_service(reflection)
        .add_service(AgentServiceServer::new(AgentSessions::new(controller.clone(), signer.clone())))
        .add_service(PowerServiceServer::new(PowerApi::new(controller.clone())))
        .add_service(
            ControlServiceServer::new(
                ControlApi::new(controller.clone()).with_node_ca(node_ca).with_node_signer(signer.clone()),
            )
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        );
    let grpc = match tls {
        Some(tls) => tokio::spawn(router.serve_with_incoming_shutdown(tls.incoming(listener), wait_stop())),
        None => tokio::spawn(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), wait_stop())),
    };

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

/// The signer of node certificates, when the controller has its client CA's key.
async fn node_signer(
    config: &ControllerConfig,
    controller: &Controller,
) -> Result<Option<Arc<NodeSigner>>, ControllerError> {
    let (Some(ca), Some(key)) = (&config.client_ca, &config.client_ca_key) else { return Ok(None) };
    let read = read_credential;
    let authority = watt_common::pki::Authority::load(&read("the client CA", ca)?, &read("the client CA key", key)?)
        .map_err(|e| ControllerError::Tls(e.to_string()))?;
    Ok(Some(Arc::new(NodeSigner::load(authority, controller.store.clone()).await?)))
}

/// TLS to etcd, read from the files the configuration names.
fn etcd_tls(config: &ControllerConfig) -> Result<Option<store::EtcdTls>, ControllerError> {
    let Some(files) = &config.etcd_tls else { return Ok(None) };
    let client = match &files.client {
        Some(pair) => Some((
            read_credential("the etcd client certificate", &pair.cert)?,
            read_credential("the etcd client key", &pair.key)?,
        )),
        None => None,
    };
    Ok(Some(store::EtcdTls { ca_pem: read_credential("the etcd CA", &files.ca)?, client }))
}

/// A PEM file the controller needs to start, or an error naming what it is.
fn read_credential(what: &'static str, path: &std::path::Path) -> Result<String, ControllerError> {
    std::fs::read_to_string(path).map_err(|source| ControllerError::Credentials {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// An operator who chose plain text off loopback hears about it every minute.
async fn warn_insecure(addr: std::net::SocketAddr, stop: impl Future<Output = ()>) {
    let mut every_minute = tokio::time::interval(Duration::from_secs(60));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = every_minute.tick() => tracing::warn!(
                addr = %addr,
                "Listening off loopback without TLS (--insecure): bearer tokens and job secrets cross the network in plain text."
            ),
            () = &mut stop => return,
        }
    }
}

/// 200 "ok" while the store takes writes; 503 naming the store's failure otherwise (a full disk,
/// an unreachable etcd), until a write succeeds again.
async fn healthz(State(health): State<StoreHealth>) -> (axum::http::StatusCode, String) {
    match health.failure() {
        None => (axum::http::StatusCode::OK, "ok\n".into()),
        Some(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("store: {why}\n")),
    }
}

async fn render_metrics(State(metrics): State<Metrics>) -> impl axum::response::IntoResponse {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&metrics.registry.gather(), &mut buf) {
        tracing::error!(error = %e, "Cannot encode metrics; this is a bug.");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], buf)
}
