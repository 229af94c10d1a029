//! One HTTP/1.1 GET with a bearer token, over TLS that verifies the server's certificate for a
//! name the caller chooses (an agent's node name, whatever address it is reached at), or in plain
//! text on loopback. `wattctl logs` reads shards' logs from agents with it.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

/// How long connecting, the handshake and the whole answer may take.
const TIMEOUT: Duration = Duration::from_secs(15);

/// What the server answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url:?} is not an http:// or https:// URL with a host and port")]
    Url { url: String },
    #[error("an https:// URL needs the CA that signed its certificate")]
    NoCa,
    #[error("{0:?} is not a name a certificate can carry")]
    ServerName(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Http(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// GET `url` with `Authorization: Bearer <bearer>`; over TLS (for `https://`) the server must
/// present a certificate for `server_name` signed by what `tls` trusts. At most `limit` bytes of
/// body are read.
pub async fn get(
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    server_name: &str,
    bearer: &str,
    limit: usize,
) -> Result<Answer, FetchError> {
    tokio::time::timeout(TIMEOUT, async {
        let bad_url = || FetchError::Url { url: url.to_string() };
        let uri: http::Uri = url.parse().map_err(|_| bad_url())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad_url()),
        };
        let authority = uri.authority().ok_or_else(bad_url)?.clone();
        let port = authority.port_u16().ok_or_else(bad_url)?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header("host", authority.as_str())
            .header("authorization", format!("Bearer {bearer}"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if https {
            let config = tls.ok_or(FetchError::NoCa)?;
            let name = ServerName::try_from(server_name.to_string())
                .map_err(|_| FetchError::ServerName(server_name.into()))?;
            let stream = tokio_rustls::TlsConnector::from(config).connect(name, stream).await?;
            send(TokioIo::new(stream), request, limit).await
        } else {
            send(TokioIo::new(stream), request, limit).await
        }
    })
    .await
    .map_err(|_| FetchError::Timeout(TIMEOUT))?
}

async fn send<T>(io: T, request: http::Request<Empty<Bytes>>, limit: usize) -> Result<Answer, FetchError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let http = |e: hyper::Error| FetchError::Http(e.to_string());
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.map_err(http)?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(http)?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| FetchError::Http(format!("reading the answer: {e}")))?
        .to_bytes()
        .to_vec();
    Ok(Answer { status: parts.status.as_u16(), headers: parts.headers, body })
}
