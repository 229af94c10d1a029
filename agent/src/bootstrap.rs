//! A node's certificate, got from its controller the first time the agent starts (as a kubelet
//! bootstraps): the agent makes its own key, sends a certificate request for its node's name with
//! the bootstrap token, and keeps the key and the certificate it gets back in its state
//! directory. From then on it presents that certificate; the key never leaves the node. Within
//! [`RENEW_BEFORE`] of its expiry the agent asks for a new one the same way, proving itself with
//! the certificate it has.

use std::path::{Path, PathBuf};

use watt_common::client::{read_token, ClientError, Credentials};
use watt_common::pki;
use watt_proto::v1 as pb;
use watt_proto::v1::agent_service_client::AgentServiceClient;

/// How long before its certificate expires an agent renews it.
pub const RENEW_BEFORE: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// How often a running agent looks at its certificate's end.
pub const RENEW_CHECK: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// Whether the node's certificate is within [`RENEW_BEFORE`] of its end (a node with none yet
/// gets one when its session starts).
pub fn renewal_due(files: &NodeCertFiles) -> bool {
    files.exist() && expires_within(&files.cert, RENEW_BEFORE)
}

/// The node's certificate and key, under the agent's state directory.
#[derive(Debug, Clone)]
pub struct NodeCertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl NodeCertFiles {
    pub fn in_dir(dir: &Path) -> Self {
        NodeCertFiles { cert: dir.join("node.pem"), key: dir.join("node-key.pem") }
    }

    fn exist(&self) -> bool {
        self.cert.is_file() && self.key.is_file()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Leader(#[from] watt_common::client::FindLeaderError),
    #[error("the controller refused the node's certificate request: {0}")]
    Refused(tonic::Status),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("cannot write or read {path}: {source}")]
    Dir { path: String, source: std::io::Error },
}

/// `credentials` with the node's certificate: the one kept in `files`, or a new one the
/// leading controller among `urls` signs for `node` on the bootstrap token in `token_file`.
pub async fn node_credentials(
    urls: &[String],
    credentials: Credentials,
    token_file: &Path,
    node: &str,
    files: &NodeCertFiles,
) -> Result<Credentials, BootstrapError> {
    let renew = renewal_due(files);
    if !files.exist() || renew {
        // A first certificate on the bootstrap token; a renewal on the certificate itself.
        let proof = if renew {
            Credentials {
                cert: Some(files.cert.clone()),
                key: Some(files.key.clone()),
                token: None,
                ..credentials.clone()
            }
        } else {
            Credentials { token: Some(read_token(token_file)?), cert: None, key: None, ..credentials.clone() }
        };
        let service = watt_proto::v1::agent_service_server::SERVICE_NAME;
        let (_, channel) = proof.connect_leader(urls, service, |endpoint| endpoint).await?;
        let (key_pem, request_pem) = if renew {
            let key_pem = std::fs::read_to_string(&files.key)
                .map_err(|source| BootstrapError::Dir { path: files.key.display().to_string(), source })?;
            let request = pki::node_renewal_request(node, &key_pem)?;
            (None, request)
        } else {
            let (key, request) = pki::node_request(node)?;
            (Some(key), request)
        };
        let answer = AgentServiceClient::new(channel)
            .bootstrap(pb::BootstrapRequest { node_name: node.to_string(), request_pem })
            .await
            .map_err(BootstrapError::Refused)?
            .into_inner();
        if let Some(dir) = files.cert.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|source| BootstrapError::Dir { path: dir.display().to_string(), source })?;
        }
        // The key first (a new one only on a first bootstrap); the certificate replaced whole, by
        // a rename, so it is never read half written.
        if let Some(key_pem) = key_pem {
            pki::write_private(&files.key, &key_pem)?;
        }
        let fresh = files.cert.with_extension("pem.new");
        pki::write_public(&fresh, &answer.cert_pem)?;
        std::fs::rename(&fresh, &files.cert)
            .map_err(|source| BootstrapError::Dir { path: files.cert.display().to_string(), source })?;
        tracing::info!(node, renewed = renew, cert = %files.cert.display(), "Got this node's certificate from the controller.");
    }
    Ok(Credentials { cert: Some(files.cert.clone()), key: Some(files.key.clone()), token: None, ..credentials })
}

/// Whether the PEM certificate at `path` expires within `window` (or cannot be read).
fn expires_within(path: &Path, window: std::time::Duration) -> bool {
    let Some(not_after) = std::fs::read_to_string(path).ok().and_then(|pem| pki::not_after_unix(&pem)) else {
        return true;
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    not_after - now < window.as_secs() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_renewed_within_a_month_of_its_end() {
        use watt_common::auth::Role;
        use watt_common::pki::{Authority, AUTHORITY_VALIDITY};
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::generate("test", AUTHORITY_VALIDITY).unwrap();
        let files = NodeCertFiles::in_dir(dir.path());
        let path = files.cert.clone();
        assert!(!renewal_due(&files), "no certificate yet: the session's start gets one");
        std::fs::write(&files.key, "key").unwrap();
        let days = |n: u64| std::time::Duration::from_secs(n * 24 * 3600);
        std::fs::write(&path, ca.issue_client("n", Role::Node, days(365)).unwrap().cert_pem).unwrap();
        assert!(!expires_within(&path, RENEW_BEFORE));
        assert!(!renewal_due(&files));
        std::fs::write(&path, ca.issue_client("n", Role::Node, days(20)).unwrap().cert_pem).unwrap();
        assert!(expires_within(&path, RENEW_BEFORE));
        assert!(renewal_due(&files));
        std::fs::write(&path, "garbage").unwrap();
        assert!(expires_within(&path, RENEW_BEFORE), "an unreadable certificate is replaced");
    }
}
