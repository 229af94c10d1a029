//! How agents and `wattctl` reach the controller: over TLS when the URL is `https://` (trusting
//! the given CA, presenting a client certificate when there is one), with a bearer token on
//! every call when there is one. Files are read at each connect, so a renewed certificate is
//! used from the next reconnect on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A channel to the controller that adds the bearer token (if any) to every call.
pub type AuthedChannel = InterceptedService<Channel, Bearer>;

/// The header in which a controller that does not lead names the one that does.
pub const LEADER_HEADER: &str = "watt-leader";

/// The header in which a caretaker (a leader that lost touch with the store, and only lowers
/// caps until it leads again) says the term it cares for.
pub const CARETAKER_HEADER: &str = "watt-caretaker";

/// The leader's address a follower's refusal names, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<String> {
    status.metadata().get(LEADER_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// The controllers a `--controller` value names: one URL, or several separated by commas (the
/// replicas of a controller that elects a leader).
pub fn controller_urls(spec: &str) -> Vec<String> {
    spec.split(',').map(str::trim).filter(|url| !url.is_empty()).map(str::to_string).collect()
}

/// Why no leader was found among the controllers asked.
#[derive(Debug, thiserror::Error)]
pub enum FindLeaderError {
    /// Some answered, none leads: an election is under way (or etcd is away).
    #[error("no controller leads yet (asked {asked}); an election may be under way")]
    NoLeader { asked: String },
    #[error("{0}")]
    Client(#[from] ClientError),
}

/// What a client proves itself with, and what it trusts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Credentials {
    /// The CA that signed the controller's certificate.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// A bearer token.
    pub token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A combination that cannot work, naming the setting (`ca`, `cert`, `key`, `token`).
    #[error("{setting}: {message}")]
    Invalid { setting: &'static str, message: String },
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: String, source: std::io::Error },
    #[error("{0}")]
    Connect(String),
}

impl Credentials {
    /// Whether these credentials can be used with `url`; the error names the setting at fault.
    pub fn check(&self, url: &str) -> Result<(), ClientError> {
        let invalid = |setting, message: &str| Err(ClientError::Invalid { setting, message: message.to_string() });
        match (&self.cert, &self.key) {
            (Some(_), None) => return invalid("key", "is required with a client certificate"),
            (None, Some(_)) => return invalid("cert", "is required with a client key"),
            _ => {}
        }
        if let Some(token) = &self.token {
            if token.trim().is_empty() || MetadataValue::<Ascii>::try_from(bearer_header(token)).is_err() {
                return invalid("token", "must be printable ASCII and not empty");
            }
        }
        let tls = url.starts_with("https://");
        if tls && self.ca.is_none() {
            return invalid("ca", "is required for an https:// controller: the CA that signed its certificate");
        }
        if !tls && (self.ca.is_some() || self.cert.is_some()) {
            return invalid("ca", &format!("and client certificates need an https:// controller; got {url:?}"));
        }
        Ok(())
    }

    /// A channel to `url`, connected, whose calls carry the token.
    pub async fn connect(&self, url: &str, tune: impl Fn(Endpoint) -> Endpoint) -> Result<AuthedChannel, ClientError> {
        self.check(url)?;
        let mut endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| ClientError::Invalid {
            setting: "controller",
            message: format!("{url:?} is not a URL: {e}"),
        })?;
        if let Some(ca) = &self.ca {
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("the CA", ca)?));
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(read("the certificate", cert)?, read("the key", key)?));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| ClientError::Connect(chain(&e)))?;
        }
        let channel = tune(endpoint.connect_timeout(Duration::from_secs(5))).connect().await.map_err(|e| {
            // A plain-text client talking to a TLS port sees only an HTTP/2 protocol error.
            let hint = if url.starts_with("http://") { " (if it serves TLS, use https:// and --ca)" } else { "" };
            ClientError::Connect(format!("cannot reach the controller at {url}: {}{hint}", chain(&e)))
        })?;
        Ok(InterceptedService::new(channel, self.bearer()))
    }

    /// The leading controller among `urls`, connected: each is asked whether it serves `service`
    /// (`watt.v1.AgentService`, …) with the standard gRPC health check, which a follower answers
    /// NOT_SERVING with the leader's address in a `watt-leader` header — followed next, so one
    /// URL that reaches any replica (a Service, a DNS name with several addresses) finds the
    /// leader too. A lone URL whose controller cannot say (no health service) is taken as it is.
    pub async fn connect_leader(
        &self,
        urls: &[String],
        service: &str,
        tune: impl Fn(Endpoint) -> Endpoint,
    ) -> Result<(String, AuthedChannel), FindLeaderError> {
        self.find_leader(urls, service, tune, false).await
    }

    /// [`Self::connect_leader`], or, when none leads, a caretaker: for a power cut while etcd
    /// is away, which a caretaker still applies.
    pub async fn connect_leader_or_caretaker(
        &self,
        urls: &[String],
        service: &str,
        tune: impl Fn(Endpoint) -> Endpoint,
    ) -> Result<(String, AuthedChannel), FindLeaderError> {
        self.find_leader(urls, service, tune, true).await
    }

    async fn find_leader(
        &self,
        urls: &[String],
        service: &str,
        tune: impl Fn(Endpoint) -> Endpoint,
        or_caretaker: bool,
    ) -> Result<(String, AuthedChannel), FindLeaderError> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        let mut to_ask: std::collections::VecDeque<String> = urls.iter().cloned().collect();
        let mut asked = Vec::new();
        let mut last_error = None;
        let mut answered = false;
        let mut caretaker = None;
        while let Some(url) = to_ask.pop_front() {
            if asked.contains(&url) || asked.len() >= urls.len() + 3 {
                continue;
            }
            asked.push(url.clone());
            let channel = match self.connect(&url, &tune).await {
                Ok(channel) => channel,
                Err(e @ (ClientError::Invalid { .. } | ClientError::Read { .. })) => return Err(e.into()),
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            let request = HealthCheckRequest { service: service.to_string() };
            let mut health = HealthClient::new(channel.clone());
            match tokio::time::timeout(Duration::from_secs(5), health.check(request)).await {
                Ok(Ok(answer)) if answer.get_ref().status == ServingStatus::Serving as i32 => {
                    return Ok((url, channel))
                }
                Ok(Ok(answer)) => {
                    answered = true;
                    if or_caretaker && caretaker.is_none() && answer.metadata().get(CARETAKER_HEADER).is_some() {
                        caretaker = Some((url.clone(), channel.clone()));
                    }
                    let hint = answer.metadata().get(LEADER_HEADER).and_then(|v| v.to_str().ok());
                    if let Some(leader) = hint {
                        to_ask.push_front(leader.to_string());
                    }
                }
                Ok(Err(_)) if urls.len() == 1 => return Ok((url, channel)),
                Ok(Err(status)) => last_error = Some(ClientError::Connect(format!("{url}: {}", status.message()))),
                Err(_) => last_error = Some(ClientError::Connect(format!("{url}: no answer to a health check in 5 s"))),
            }
        }
        if let Some(found) = caretaker {
            return Ok(found);
        }
        match last_error {
            Some(e) if !answered => Err(e.into()),
            _ => Err(FindLeaderError::NoLeader { asked: asked.join(", ") }),
        }
    }

    fn bearer(&self) -> Bearer {
        Bearer(self.token.as_deref().and_then(|t| MetadataValue::try_from(bearer_header(t)).ok()))
    }
}

/// Read a token kept in a file (surrounding whitespace dropped), so it stays out of `ps`.
pub fn read_token(path: &Path) -> Result<String, ClientError> {
    Ok(String::from_utf8_lossy(&read("the token file", path)?).trim().to_string())
}

fn bearer_header(token: &str) -> String {
    format!("Bearer {}", token.trim())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read { what, path: path.display().to_string(), source })
}

/// An error and its sources on one line: TLS failures hide their reason two levels down.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combinations_that_cannot_work_name_the_setting() {
        let path = || Some(PathBuf::from("x.pem"));
        let setting = |c: Credentials, url: &str| match c.check(url) {
            Err(ClientError::Invalid { setting, .. }) => setting,
            other => panic!("{other:?}"),
        };
        assert_eq!(setting(Credentials { cert: path(), ..Default::default() }, "https://c:7070"), "key");
        assert_eq!(setting(Credentials { key: path(), ca: path(), ..Default::default() }, "https://c:7070"), "cert");
        assert_eq!(setting(Credentials::default(), "https://c:7070"), "ca");
        assert_eq!(setting(Credentials { ca: path(), ..Default::default() }, "http://c:7070"), "ca");
        assert_eq!(setting(Credentials { token: Some("a\nb".into()), ..Default::default() }, "http://c"), "token");
        assert!(Credentials { token: Some("watt_ab".into()), ..Default::default() }
            .check("http://127.0.0.1:1")
            .is_ok());
        let full = Credentials { ca: path(), cert: path(), key: path(), token: None };
        assert!(full.check("https://c:7070").is_ok());
    }

    #[test]
    fn a_controller_list_is_split_on_commas() {
        assert_eq!(controller_urls("https://a:7070, https://b:7070,"), vec!["https://a:7070", "https://b:7070"]);
        assert_eq!(controller_urls("http://127.0.0.1:7070"), vec!["http://127.0.0.1:7070"]);
        assert!(controller_urls(" , ").is_empty());
    }

    #[test]
    fn the_token_rides_on_every_call() {
        let mut bearer = Credentials { token: Some(" watt_abc \n".into()), ..Default::default() }.bearer();
        let request = bearer.call(tonic::Request::new(())).unwrap();
        assert_eq!(request.metadata().get("authorization").unwrap(), "Bearer watt_abc");
        let mut none = Credentials::default().bearer();
        assert!(none.call(tonic::Request::new(())).unwrap().metadata().get("authorization").is_none());
    }
}
