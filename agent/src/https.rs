//! The agent's logs endpoint server: HTTPS with this node's certificate (read again for each
//! connection, so a renewed one is used at once), or plain HTTP where the node has none (then
//! only on loopback: see the `logs_addr` check in `config`).
//!
//! Each connection is served on its own task with a deadline for its TLS handshake and for each
//! request's headers, so a client that connects and says nothing holds up no one else.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};

use crate::bootstrap::NodeCertFiles;

/// How long a client has to finish its TLS handshake, and then to send each request's headers.
const DEADLINE: Duration = Duration::from_secs(10);

/// Serve `router` on `listener` until `shutdown`: over TLS with the certificate in `tls`, or in
/// plain text without one.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<NodeCertFiles>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    tracing::warn!(error = %e, "Cannot accept a connection on the logs port.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        tokio::spawn(connection(stream, router.clone(), tls.clone()));
    }
}

async fn connection(stream: TcpStream, router: Router, tls: Option<NodeCertFiles>) {
    let peer = stream.peer_addr().ok();
    let service = TowerToHyperService::new(router);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(DEADLINE);
    let served = match tls {
        None => http.serve_connection(TokioIo::new(stream), service).await,
        Some(files) => {
            let config = match watt_common::tls::server_config(&files.cert, &files.key) {
                Ok(config) => config,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot serve logs over HTTPS: this node's certificate is not usable.");
                    return;
                }
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            match tokio::time::timeout(DEADLINE, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => http.serve_connection(TokioIo::new(stream), service).await,
                Ok(Err(e)) => {
                    tracing::debug!(peer = ?peer, error = %e, "TLS handshake on the logs port failed.");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = ?peer, "TLS handshake on the logs port timed out.");
                    return;
                }
            }
        }
    };
    if let Err(e) = served {
        tracing::debug!(peer = ?peer, error = %e, "Logs connection ended with an error.");
    }
}
