//! The gRPC port's TLS, done here rather than by tonic so that the controller's certificate can
//! change under a running controller: cert-manager renews it in place, an operator replaces it,
//! and new connections get the new one within [`RELOAD_EVERY`] — no restart, no agent cut off
//! (established connections keep the certificate they were made with).
//!
//! Clients may present a certificate signed by the client CA (agents, people) or none (people
//! with bearer tokens): the auth layer decides what each call needs. Every handshake runs on its
//! own task with a deadline, so a client that connects and says nothing holds up no one else.
//! The peer's address and certificates travel with each request as [`PeerInfo`].

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ControllerError;

/// How often the certificate files are looked at for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// How long a client has to finish its handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the server to take them.
const QUEUE: usize = 1024;

/// The files the gRPC port's TLS is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA client certificates must be signed by; without it, no client certificates.
    pub client_ca: Option<PathBuf>,
}

/// What the files look like (size and modification time of each): a change means reload.
type Stamp = Vec<Option<(u64, SystemTime)>>;

impl TlsFiles {
    fn stamp(&self) -> Stamp {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|path| std::fs::metadata(path).ok().and_then(|m| Some((m.len(), m.modified().ok()?))))
            .collect()
    }

    /// A server configuration from the files as they are now.
    pub fn load(&self) -> Result<rustls::ServerConfig, ControllerError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let failed = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
            ControllerError::Tls(format!("{what} {}: {e}", path.display()))
        };
        let chain = certificates("the TLS certificate", &self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| failed("the TLS key", &self.key, &e))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ControllerError::Tls(e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates("the client CA", ca)? {
                    roots.add(cert).map_err(|e| failed("the client CA", ca, &e))?;
                }
                // Optional: people may bring a bearer token instead of a certificate.
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| failed("the client CA", ca, &e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| failed("the TLS key", &self.key, &e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ControllerError> {
    let failed = |e: &dyn std::fmt::Display| ControllerError::Tls(format!("{what} {}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| failed(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(&e))?;
    if certs.is_empty() {
        return Err(failed(&"no PEM certificate in it"));
    }
    Ok(certs)
}

/// The TLS configuration in force, replaced when its files change.
#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<(Arc<rustls::ServerConfig>, Stamp)>,
}

impl ReloadingTls {
    /// Load `files`; an error here stops the start, naming the file.
    pub fn open(files: TlsFiles) -> Result<Arc<ReloadingTls>, ControllerError> {
        let stamp = files.stamp();
        let config = Arc::new(files.load()?);
        Ok(Arc::new(ReloadingTls { files, current: RwLock::new((config, stamp)) }))
    }

    fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).0.clone()
    }

    /// Load the files again if they changed. A change that does not load (a certificate written
    /// before its key, a broken file) keeps what is in force and is tried again next time.
    /// Returns whether a new configuration is in force.
    pub fn reload_if_changed(&self) -> bool {
        let stamp = self.files.stamp();
        if stamp == self.current.read().unwrap_or_else(PoisonError::into_inner).1 {
            return false;
        }
        match self.files.load() {
            Ok(config) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = (Arc::new(config), stamp);
                tracing::info!(cert = %self.files.cert.display(), "Loaded the changed TLS certificate: new connections get it.");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "The TLS files changed but do not load; keeping the certificate in force.");
                false
            }
        }
    }

    /// Look for changes every [`RELOAD_EVERY`] until `stop`.
    pub async fn watch(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.reload_if_changed(); }
                () = &mut stop => return,
            }
        }
    }

    /// The connections `listener` accepts, each once its handshake is done.
    pub fn incoming(self: Arc<Self>, listener: TcpListener) -> ReceiverStream<io::Result<TlsConnection>> {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    // The server stopped taking connections.
                    () = tx.closed() => return,
                };
                let (tcp, remote) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors, most likely: wait rather than spin.
                        tracing::warn!(error = %e, "Cannot accept a connection.");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(TlsConnection { stream, remote })).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed."),
                        Err(_) => tracing::debug!(%remote, "TLS handshake timed out."),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Who is at the other end of a connection: its address and, over TLS, the certificates it
/// presented. In each request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl PeerInfo {
    /// The peer of a request, over TLS (ours) or plain TCP (tonic's).
    pub fn of<T>(request: &tonic::Request<T>) -> PeerInfo {
        match request.extensions().get::<PeerInfo>() {
            Some(info) => info.clone(),
            None => PeerInfo { remote: request.remote_addr(), certs: None },
        }
    }
}

/// A connection after its handshake.
#[derive(Debug)]
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    remote: SocketAddr,
}

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        let certs = self.stream.get_ref().1.peer_certificates().map(|c| Arc::new(c.to_vec()));
        PeerInfo { remote: Some(self.remote), certs }
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use watt_common::pki::{Authority, LEAF_VALIDITY};

    /// A served certificate's DER, as a client sees it.
    async fn served(addr: SocketAddr, ca: &Path) -> Vec<u8> {
        let config = Arc::new(watt_common::tls::client_config(ca).unwrap());
        let mut config = (*config).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
        stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    /// An authority (its certificate in `ca.pem`) and where a served certificate goes in `dir`.
    fn authority(dir: &Path) -> (Authority, PathBuf, TlsFiles) {
        let ca = Authority::generate("test", LEAF_VALIDITY).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        (ca, ca_file, TlsFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key"), client_ca: None })
    }

    /// A new certificate for localhost from `ca`, written to `files`.
    fn issue(ca: &Authority, files: &TlsFiles) -> watt_common::pki::Issued {
        let issued = ca.issue_server(&["localhost".into()], LEAF_VALIDITY).unwrap();
        std::fs::write(&files.cert, &issued.cert_pem).unwrap();
        std::fs::write(&files.key, &issued.key_pem).unwrap();
        issued
    }

    #[tokio::test]
    async fn a_replaced_certificate_serves_new_connections_and_a_broken_one_is_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_file, files) = authority(dir.path());
        let first = issue(&ca, &files);
        let tls = ReloadingTls::open(files.clone()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = tls.clone().incoming(listener);
        // Keep the server side of each connection taken, as tonic would.
        tokio::spawn(async move {
            use tokio_stream::StreamExt;
            let mut held = Vec::new();
            while let Some(c) = incoming.next().await {
                held.push(c);
            }
        });
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec();
        assert_eq!(served(addr, &ca_file).await, der(&first.cert_pem));
        assert!(!tls.reload_if_changed(), "nothing changed");

        let second = issue(&ca, &files);
        assert!(tls.reload_if_changed());
        assert_eq!(served(addr, &ca_file).await, der(&second.cert_pem));

        // A certificate without its key (written first, or broken) is not loaded.
        std::fs::write(&files.cert, "not a certificate").unwrap();
        assert!(!tls.reload_if_changed());
        assert_eq!(served(addr, &ca_file).await, der(&second.cert_pem));
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_handshake_holds_up_no_one() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_file, files) = authority(dir.path());
        issue(&ca, &files);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = ReloadingTls::open(files).unwrap().incoming(listener);
        let _silent = TcpStream::connect(addr).await.unwrap();
        let client = tokio::spawn(async move { served(addr, &ca_file).await });
        use tokio_stream::StreamExt;
        let first = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(matches!(first, Ok(Some(Ok(_)))), "the second client's connection came first");
        client.await.unwrap();
    }
}
