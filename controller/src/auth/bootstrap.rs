//! `AgentService.Bootstrap`: node certificates signed by the controller, as kubelets get theirs.
//!
//! An agent with no certificate holds a bootstrap token (role `bootstrap`); it makes its own key,
//! sends a certificate request for its node's name, and gets back a certificate naming that node
//! (CN = name, O = watt:node) from the client CA. The store records each name given out with the
//! fingerprint of the certificate, and a bootstrap token gets a name only once: whoever holds the
//! token cannot take the name of a node that already has a certificate. A node renews its own
//! certificate with that certificate.
//!
//! Only the node's latest certificate is accepted (it is pinned): once a node renews, or an admin
//! issues it a new one, the one before opens no session and renews nothing — a copied key is
//! worth nothing after the next renewal. An admin resets a node's identity (`wattctl
//! reset-identity`, for a re-imaged or stolen machine): its certificates are refused from then
//! on, its session ends, and the bootstrap token may claim the name once more. Certificates made
//! elsewhere (`wattctl certs issue`) have no record and are not pinned until a reset.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::Status;
use watt_common::auth::Role;
use watt_common::pki::{Authority, LEAF_VALIDITY};
use watt_proto::v1 as pb;

use super::Principal;
use crate::store::{encode_json, Expect, Store, StoreError, WatchEvent, Write};

/// Where the names given out are recorded.
pub const NODE_CERTS_PREFIX: &str = "nodecerts/";

/// A certificate request is a few hundred bytes; refuse anything far larger before parsing it.
const MAX_REQUEST_PEM: usize = 16 << 10;

/// What the store keeps of a node certificate given out, or of a node's identity reset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedRecord {
    pub node: String,
    pub by: String,
    pub unix_ms: i64,
    /// SHA-256 of the certificate's DER, hex: the one certificate of the node accepted.
    #[serde(default)]
    pub fingerprint: String,
    /// The node's identity was reset: none of its certificates is accepted, and a bootstrap
    /// token may claim its name again.
    #[serde(default)]
    pub reset: bool,
}

/// Which of a node's certificates is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pin {
    /// Only the one with this fingerprint.
    Current(String),
    /// None: the node must bootstrap again.
    Reset,
}

impl From<&IssuedRecord> for Pin {
    fn from(r: &IssuedRecord) -> Pin {
        if r.reset {
            Pin::Reset
        } else {
            Pin::Current(r.fingerprint.clone())
        }
    }
}

/// SHA-256 of a certificate's DER, hex.
pub fn fingerprint(der: &[u8]) -> String {
    watt_common::hex::encode(&Sha256::digest(der))
}

/// Signs node certificates with the client CA, and keeps which one of each node is accepted.
pub struct NodeSigner {
    authority: Authority,
    store: Arc<dyn Store>,
    valid_for: Duration,
    /// What the store says, kept at hand: registration storms read it 50,000 times.
    pins: std::sync::RwLock<crate::NameMap<String, Pin>>,
}

impl std::fmt::Debug for NodeSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSigner").field("valid_for", &self.valid_for).finish_non_exhaustive()
    }
}

impl NodeSigner {
    /// The signer, with every node's pin read from the store.
    pub async fn load(authority: Authority, store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let mut pins = crate::NameMap::default();
        for entry in store.list(NODE_CERTS_PREFIX).await? {
            let record: IssuedRecord = crate::store::decode_json(&entry.key, &entry.value)?;
            pins.insert(record.node.clone(), Pin::from(&record));
        }
        Ok(NodeSigner { authority, store, valid_for: LEAF_VALIDITY, pins: std::sync::RwLock::new(pins) })
    }

    /// Keep the pins as the store has them: another controller on the same store (a standby,
    /// a restarted one) may issue, renew or reset. Changes come from a watch; a lost watch is
    /// started again after reading every record anew.
    pub async fn follow(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        use futures::StreamExt;
        tokio::pin!(stop);
        loop {
            let watched = async {
                let mut changes = self.store.watch(NODE_CERTS_PREFIX).await?;
                // What changed before the watch began.
                for entry in self.store.list(NODE_CERTS_PREFIX).await? {
                    self.apply(WatchEvent::Put(entry));
                }
                while let Some(change) = changes.next().await {
                    self.apply(change?);
                }
                Ok::<(), StoreError>(())
            };
            tokio::select! {
                ended = watched => {
                    tracing::warn!(error = ?ended.err(), "Lost the watch on node certificates; watching again.");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = &mut stop => return,
                    }
                }
                () = &mut stop => return,
            }
        }
    }

    fn apply(&self, change: WatchEvent) {
        match change {
            WatchEvent::Put(entry) => match crate::store::decode_json::<IssuedRecord>(&entry.key, &entry.value) {
                Ok(record) => self.set_pin(&record.node, Pin::from(&record)),
                Err(e) => tracing::warn!(error = %e, "A node certificate record does not read."),
            },
            WatchEvent::Delete { key, .. } => {
                if let Some(node) = key.strip_prefix(NODE_CERTS_PREFIX) {
                    self.pins.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(node);
                }
            }
        }
    }

    fn pin(&self, node: &str) -> Option<Pin> {
        self.pins.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(node).cloned()
    }

    fn set_pin(&self, node: &str, pin: Pin) {
        self.pins.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(node.to_string(), pin);
    }

    /// Whether the certificate with `fingerprint` is the one node `node` may use now. What is
    /// kept at hand is checked first; a mismatch reads the store again (another controller may
    /// have issued a newer one) before refusing.
    pub async fn check_current(&self, node: &str, fingerprint: &str) -> Result<(), Status> {
        let accepted = |pin: &Option<Pin>| match pin {
            None => true,
            Some(Pin::Current(f)) => f == fingerprint,
            Some(Pin::Reset) => false,
        };
        if accepted(&self.pin(node)) {
            return Ok(());
        }
        let key = format!("{NODE_CERTS_PREFIX}{node}");
        let fresh = match self.store.get(&key).await? {
            Some(entry) => Some(Pin::from(&crate::store::decode_json::<IssuedRecord>(&key, &entry.value)?)),
            None => None,
        };
        if let Some(pin) = &fresh {
            self.set_pin(node, pin.clone());
        }
        match fresh {
            _ if accepted(&fresh) => Ok(()),
            Some(Pin::Reset) => Err(Status::permission_denied(format!(
                "the identity of node {node:?} was reset by an admin: its agent must bootstrap again"
            ))),
            _ => Err(Status::permission_denied(format!(
                "this certificate of node {node:?} was replaced (renewed or issued again): only the newest is accepted"
            ))),
        }
    }

    /// Refuse every certificate of `node` from now on and let a bootstrap token claim its name
    /// again.
    pub async fn reset(&self, node: &str, by: &Principal, unix_ms: i64) -> Result<(), Status> {
        let key = format!("{NODE_CERTS_PREFIX}{node}");
        let record = IssuedRecord {
            node: node.to_string(),
            by: by.name.clone(),
            unix_ms,
            fingerprint: String::new(),
            reset: true,
        };
        self.store
            .commit(vec![Write::put(key.clone(), Expect::Any, encode_json(&key, &record)?)])
            .await
            .map_err(|e| Status::unavailable(format!("cannot record the reset of {node:?}: {e}")))?;
        self.set_pin(node, Pin::Reset);
        Ok(())
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
        let key = format!("{NODE_CERTS_PREFIX}{node}");
        let expect = match principal.role {
            // Only a name never given out, or one whose identity an admin reset.
            Role::Bootstrap => match self.store.get(&key).await? {
                None => Expect::Absent,
                Some(entry) if crate::store::decode_json::<IssuedRecord>(&key, &entry.value)?.reset => {
                    Expect::Version(entry.version)
                }
                Some(_) => return Err(already_has(node)),
            },
            // Its own name only, with the certificate in force.
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
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| Status::internal(format!("the certificate just signed does not read back: {e}")))?;
        let record = IssuedRecord {
            node: node.clone(),
            by: principal.name.clone(),
            unix_ms,
            fingerprint: fingerprint(&der),
            reset: false,
        };
        match self.store.commit(vec![Write::put(key.clone(), expect, encode_json(&key, &record)?)]).await {
            Ok(_) => self.set_pin(node, Pin::from(&record)),
            Err(StoreError::Conflict { .. }) => return Err(already_has(node)),
            Err(e) => return Err(Status::unavailable(format!("cannot record the certificate of {node:?}: {e}"))),
        }
        Ok(pb::BootstrapResponse { cert_pem, ca_pem: self.authority.cert_pem().to_string() })
    }
}

fn already_has(node: &str) -> Status {
    Status::already_exists(format!(
        "node {node:?} already has a certificate: it renews with that certificate, or an admin resets its identity (wattctl reset-identity)"
    ))
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
        let signer = NodeSigner::load(Authority::generate("test", AUTHORITY_VALIDITY).unwrap(), store).await.unwrap();
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

    fn fingerprint_of(pem: &str) -> String {
        fingerprint(&CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
    }

    #[tokio::test]
    async fn only_the_newest_certificate_is_accepted_and_a_reset_lets_the_name_be_claimed_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(&format!("file:{}", dir.path().join("s.redb").display())).await.unwrap();
        let authority = Authority::generate("test", AUTHORITY_VALIDITY).unwrap();
        let copy = Authority::load(authority.cert_pem(), authority.key_pem()).unwrap();
        let signer = NodeSigner::load(authority, store.clone()).await.unwrap();
        let (_, csr) = node_request("gpu-1").unwrap();
        let ask = pb::BootstrapRequest { node_name: "gpu-1".into(), request_pem: csr.clone() };
        let token = principal("bootstrap", Role::Bootstrap);
        // A node with no record here (its certificate made elsewhere) is not pinned.
        assert!(signer.check_current("gpu-1", "anything").await.is_ok());

        let first = fingerprint_of(&signer.sign(&token, &ask, 1).await.unwrap().cert_pem);
        assert!(signer.check_current("gpu-1", &first).await.is_ok());
        let renewed = fingerprint_of(&signer.sign(&principal("gpu-1", Role::Node), &ask, 2).await.unwrap().cert_pem);
        assert_ne!(first, renewed);
        let old = signer.check_current("gpu-1", &first).await.unwrap_err();
        assert_eq!(old.code(), tonic::Code::PermissionDenied);
        assert!(old.message().contains("replaced"), "{old:?}");
        // Another controller on the same store knows the same, and follows what changes.
        let other = Arc::new(NodeSigner::load(copy, store).await.unwrap());
        assert!(other.check_current("gpu-1", &renewed).await.is_ok());
        assert!(other.check_current("gpu-1", &first).await.is_err());
        tokio::spawn(other.clone().follow(std::future::pending()));

        // A reset: no certificate of the node is accepted, and the bootstrap token may claim
        // the name again, once.
        signer.reset("gpu-1", &principal("root", Role::Admin), 3).await.unwrap();
        let reset = signer.check_current("gpu-1", &renewed).await.unwrap_err();
        assert!(reset.message().contains("reset"), "{reset:?}");
        let mut followed = false;
        for _ in 0..100 {
            if other.check_current("gpu-1", &renewed).await.is_err() {
                followed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(followed, "the other controller hears of the reset");
        let again = fingerprint_of(&signer.sign(&token, &ask, 4).await.unwrap().cert_pem);
        assert!(signer.check_current("gpu-1", &again).await.is_ok());
        assert_eq!(signer.sign(&token, &ask, 5).await.unwrap_err().code(), tonic::Code::AlreadyExists);
    }
}
