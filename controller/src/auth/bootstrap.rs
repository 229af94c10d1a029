//! `AgentService.Bootstrap`: node certificates signed by the controller, as kubelets get theirs.
//!
//! An agent with no certificate holds a bootstrap token (role `bootstrap`); it makes its own key,
//! sends a certificate request for its node's name, and gets back a certificate naming that node
//! (CN = name, O = watt:node) from the client CA. The store records each name given out, and a
//! bootstrap token gets a name only once: whoever holds the token cannot take the name of a node
//! that already has a certificate (an admin can re-issue one, for a re-imaged machine). A node
//! renews its own certificate with that certificate.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::Status;
use watt_common::auth::Role;
use watt_common::pki::{Authority, LEAF_VALIDITY};
use watt_proto::v1 as pb;

use super::Principal;
use crate::store::{encode_json, Expect, Store, StoreError, Write};

/// Where the names given out are recorded.
pub const NODE_CERTS_PREFIX: &str = "nodecerts/";

/// A certificate request is a few hundred bytes; refuse anything far larger before parsing it.
const MAX_REQUEST_PEM: usize = 16 << 10;

/// What the store keeps of a node certificate given out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedRecord {
    pub node: String,
    pub by: String,
    pub unix_ms: i64,
}

/// Signs node certificates with the client CA.
pub struct NodeSigner {
    authority: Authority,
    store: Arc<dyn Store>,
    valid_for: Duration,
}

impl std::fmt::Debug for NodeSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSigner").field("valid_for", &self.valid_for).finish_non_exhaustive()
    }
}

impl NodeSigner {
    pub fn new(authority: Authority, store: Arc<dyn Store>) -> Self {
        NodeSigner { authority, store, valid_for: LEAF_VALIDITY }
    }

    /// Sign `request` for the principal that sent it, or say why not.
    pub async fn sign(
        &self,
        principal: &Principal,
        request: &pb::BootstrapRequest,
        unix_ms: i64,
    ) -> Result<pb::BootstrapResponse, Status> {
        crate::session::validate_node_name("node_name", &request.node_name)?;
        if request.request_pem.len() > MAX_REQUEST_PEM {
            return Err(Status::invalid_argument(format!(
                "request_pem is {} bytes; a certificate request is at most {MAX_REQUEST_PEM}",
                request.request_pem.len()
            )));
        }
        let node = &request.node_name;
        let expect = match principal.role {
            // Only a name never given out.
            Role::Bootstrap => Expect::Absent,
            // Its own name only.
            Role::Node if principal.name == *node => Expect::Any,
            Role::Admin => Expect::Any,
            _ => {
                return Err(Status::permission_denied(format!(
                    "{principal} may not get a certificate for node {node:?}"
                )))
            }
        };
        let cert_pem = self
            .authority
            .sign_node_request(node, &request.request_pem, self.valid_for)
            .map_err(|e| Status::invalid_argument(format!("request_pem: {e}")))?;
        let key = format!("{NODE_CERTS_PREFIX}{node}");
        let record = IssuedRecord { node: node.clone(), by: principal.name.clone(), unix_ms };
        match self.store.commit(vec![Write::put(key.clone(), expect, encode_json(&key, &record)?)]).await {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => {
                return Err(Status::already_exists(format!(
                    "node {node:?} already has a certificate: it renews with that certificate, or an admin issues a new one"
                )))
            }
            Err(e) => return Err(Status::unavailable(format!("cannot record the certificate of {node:?}: {e}"))),
        }
        Ok(pb::BootstrapResponse { cert_pem, ca_pem: self.authority.cert_pem().to_string() })
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        Status::internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Credential;
    use watt_common::pki::{node_request, AUTHORITY_VALIDITY};

    fn principal(name: &str, role: Role) -> Principal {
        Principal { name: name.into(), role, credential: Credential::Token }
    }

    #[tokio::test]
    async fn a_bootstrap_token_gets_each_name_once_and_a_node_renews_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(&format!("file:{}", dir.path().join("s.redb").display())).await.unwrap();
        let signer = NodeSigner::new(Authority::generate("test", AUTHORITY_VALIDITY).unwrap(), store);
        let (_, csr) = node_request("gpu-1").unwrap();
        let ask = |node: &str| pb::BootstrapRequest { node_name: node.into(), request_pem: csr.clone() };
        let token = principal("bootstrap", Role::Bootstrap);

        let first = signer.sign(&token, &ask("gpu-1"), 1).await.unwrap();
        assert!(first.cert_pem.contains("BEGIN CERTIFICATE") && first.ca_pem.contains("BEGIN CERTIFICATE"));
        let again = signer.sign(&token, &ask("gpu-1"), 2).await.unwrap_err();
        assert_eq!(again.code(), tonic::Code::AlreadyExists, "{again:?}");
        assert!(signer.sign(&principal("gpu-1", Role::Node), &ask("gpu-1"), 3).await.is_ok());
        let other = signer.sign(&principal("gpu-2", Role::Node), &ask("gpu-1"), 4).await.unwrap_err();
        assert_eq!(other.code(), tonic::Code::PermissionDenied);
        assert!(signer.sign(&principal("root", Role::Admin), &ask("gpu-1"), 5).await.is_ok());
        let bad = signer.sign(&token, &ask("bad name!"), 6).await.unwrap_err();
        assert!(bad.message().starts_with("node_name"), "{bad:?}");
        let garbage = pb::BootstrapRequest { node_name: "gpu-9".into(), request_pem: "junk".into() };
        let refused = signer.sign(&token, &garbage, 7).await.unwrap_err();
        assert!(refused.message().starts_with("request_pem"), "{refused:?}");
        // A refused request records nothing: gpu-9 can still bootstrap.
        assert!(signer.sign(&token, &ask("gpu-9"), 8).await.is_ok());
    }
}
