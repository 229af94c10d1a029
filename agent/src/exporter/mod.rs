//! The Prometheus endpoint: `GET /metrics` renders the latest snapshot, `GET /healthz` says
//! whether the sampler is keeping up. Scrapes never touch a GPU, so they cost the same however
//! slow the driver is.

pub mod dcgm;
pub mod families;
pub mod render;

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::sampler::NodeSnapshot;
pub use render::{AgentMetrics, Renderer, SessionMetrics};

/// Prometheus' text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone)]
struct Shared {
    renderer: Arc<Renderer>,
    snapshots: watch::Receiver<Arc<NodeSnapshot>>,
}

/// The HTTP routes, for serving or for tests.
pub fn router(renderer: Arc<Renderer>, snapshots: watch::Receiver<Arc<NodeSnapshot>>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/", get(index))
        .with_state(Shared { renderer, snapshots })
}

/// Serve until `shutdown` resolves, then finish the requests in flight.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn metrics(State(shared): State<Shared>) -> Response {
    let snapshot = shared.snapshots.borrow().clone();
    let body = shared.renderer.render(&snapshot, Instant::now());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

async fn healthz(State(shared): State<Shared>) -> Response {
    let snapshot = shared.snapshots.borrow().clone();
    let now = Instant::now();
    if shared.renderer.is_fresh(&snapshot, now) {
        let up = snapshot.gpus.iter().filter(|g| g.sample.is_some()).count();
        (StatusCode::OK, format!("ok: {up} of {} GPUs answering\n", snapshot.gpus.len())).into_response()
    } else if snapshot.round == 0 {
        (StatusCode::SERVICE_UNAVAILABLE, "starting: no sample yet\n").into_response()
    } else {
        let age = now.saturating_duration_since(snapshot.taken_at);
        (StatusCode::SERVICE_UNAVAILABLE, format!("stalled: last sample {:.1}s ago\n", age.as_secs_f64()))
            .into_response()
    }
}

async fn index() -> &'static str {
    "watt-agent: see /metrics and /healthz\n"
}
