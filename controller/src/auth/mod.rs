//! Every call's principal, and whether its role allows the call.
//!
//! A principal comes from the client certificate the TLS handshake verified (CN = name,
//! O = `watt:<role>`, see [`watt_common::auth`]) or from a bearer token in the token file
//! ([`tokens`]); a token sent with a call is preferred to the connection's certificate. What
//! each RPC needs is one table, [`access`]: a method missing from it is refused (deny by
//! default), so a new RPC cannot be reachable before someone decides who may call it.
//! [`layer`] applies both to every gRPC call before any service sees it and hands the principal
//! to the service in the request's extensions.

pub mod bootstrap;
pub mod layer;
pub mod tokens;

use std::fmt;
use std::sync::Arc;

use tonic::transport::CertificateDer;
use tonic::Status;
use watt_common::auth::Role;
use x509_parser::prelude::{FromDer, X509Certificate};

use self::tokens::TokenFile;

/// Who made a call, and with what role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    pub credential: Credential,
}

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Certificate,
    Token,
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health checks: probes carry no credentials and learn only "serving".
    Anyone,
    /// A principal whose role allows one of these.
    Roles(&'static [Role]),
}

/// What each gRPC method needs; `None` for a method nobody may call.
pub fn access(path: &str) -> Option<Access> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    match (service, method) {
        ("grpc.health.v1.Health", _) => Some(Access::Anyone),
        ("grpc.reflection.v1.ServerReflection", "ServerReflectionInfo") => Some(Access::Roles(&[Role::Viewer])),
        ("watt.v1.AgentService", "Session") => Some(Access::Roles(&[Role::Node])),
        // A bootstrap token gets a new node its first certificate; a node renews its own.
        ("watt.v1.AgentService", "Bootstrap") => Some(Access::Roles(&[Role::Bootstrap, Role::Node])),
        (
            "watt.v1.ControlService",
            "GetJob" | "ListJobs" | "ListNodes" | "ListEvents" | "WatchEvents" | "GrantLogs",
        ) => Some(Access::Roles(&[Role::Viewer])),
        // Cancelling someone else's job needs admin; the service checks whose job it is.
        ("watt.v1.ControlService", "SubmitJob" | "CancelJob") => Some(Access::Roles(&[Role::Submitter])),
        ("watt.v1.ControlService", "ResetNodeIdentity") => Some(Access::Roles(&[Role::Admin])),
        ("watt.v1.PowerService", "GetPowerStatus" | "WatchPower") => Some(Access::Roles(&[Role::Viewer])),
        ("watt.v1.PowerService", "SetSource" | "RemoveSource" | "SetSite" | "SetDomain" | "RemoveDomain") => {
            Some(Access::Roles(&[Role::PowerOperator]))
        }
        _ => None,
    }
}

/// Finds the principal of a call.
#[derive(Debug, Default)]
pub struct Authenticator {
    tokens: Option<Arc<TokenFile>>,
}

impl Authenticator {
    pub fn new(tokens: Option<Arc<TokenFile>>) -> Self {
        Authenticator { tokens }
    }

    /// The principal of a call from its `authorization` header and the client certificate chain
    /// its connection presented (already verified against the client CA by TLS).
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<Principal, Status> {
        if let Some(header) = authorization {
            let token = std::str::from_utf8(header)
                .ok()
                .and_then(|h| h.strip_prefix("Bearer "))
                .ok_or_else(|| Status::unauthenticated("the authorization header must be \"Bearer <token>\""))?;
            let Some(tokens) = &self.tokens else {
                return Err(Status::unauthenticated("this controller takes no bearer tokens (no --token-file)"));
            };
            return tokens
                .principal(token.trim())
                .ok_or_else(|| Status::unauthenticated("the bearer token is not in the controller's token file"));
        }
        match peer_certs.and_then(|chain| chain.first()) {
            Some(leaf) => principal_of_certificate(leaf),
            None => Err(Status::unauthenticated(
                "no credentials: present a client certificate signed by the controller's client CA, or a bearer token",
            )),
        }
    }

    /// The principal of a call if it may make it; otherwise `Unauthenticated` or
    /// `PermissionDenied`, saying what is missing.
    pub fn authorize(
        &self,
        path: &str,
        authorization: Option<&[u8]>,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<Option<Principal>, Status> {
        let needed: &[Role] = match access(path) {
            None => return Err(Status::permission_denied(format!("{path} is not a method anyone may call"))),
            Some(Access::Anyone) => return Ok(None),
            Some(Access::Roles(roles)) => roles,
        };
        let principal = self.authenticate(authorization, peer_certs)?;
        if !needed.iter().any(|&role| principal.role.allows(role)) {
            let names: Vec<&str> = needed.iter().map(|r| r.as_str()).collect();
            return Err(Status::permission_denied(format!(
                "{principal} may not call {path}: it needs the {} role{}",
                names.join(" or "),
                if needed.contains(&Role::Node) { "" } else { " or admin" }
            )));
        }
        Ok(Some(principal))
    }
}

/// The principal a verified client certificate names: CN and the `watt:<role>` organization.
pub fn principal_of_certificate(der: &CertificateDer<'_>) -> Result<Principal, Status> {
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| Status::unauthenticated(format!("the client certificate cannot be read: {e}")))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
        .ok_or_else(|| Status::unauthenticated("the client certificate has no common name (CN) to name its principal"))?
        .to_string();
    let roles: Vec<Role> =
        subject.iter_organization().filter_map(|o| o.as_str().ok()).filter_map(Role::from_organization).collect();
    match roles.as_slice() {
        [role] => Ok(Principal { name, role: *role, credential: Credential::Certificate }),
        [] => Err(Status::permission_denied(format!(
            "the certificate of {name:?} has no Watt role: its organization (O) must be watt:<role>"
        ))),
        _ => Err(Status::permission_denied(format!(
            "the certificate of {name:?} names {} Watt roles; it must name one",
            roles.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use watt_common::pki::{Authority, AUTHORITY_VALIDITY, LEAF_VALIDITY};

    fn der(pem: &str) -> CertificateDer<'static> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        CertificateDer::from(pem.contents)
    }

    #[test]
    fn every_method_of_every_service_has_an_entry() {
        let services = [
            (watt_proto::v1::FILE_DESCRIPTOR_SET, "watt.v1."),
            (tonic_health::pb::FILE_DESCRIPTOR_SET, "grpc.health.v1."),
        ];
        let mut methods = 0;
        for (set, package) in services {
            let set = <prost_types::FileDescriptorSet as prost::Message>::decode(set).unwrap();
            for service in set.file.iter().flat_map(|f| &f.service) {
                for method in &service.method {
                    let path = format!("/{package}{}/{}", service.name(), method.name());
                    assert!(access(&path).is_some(), "{path} has no entry in auth::access");
                    methods += 1;
                }
            }
        }
        assert_eq!(methods, 20, "18 of Watt's methods and 2 of health");
        assert_eq!(access("/watt.v1.ControlService/DropEverything"), None);
        assert_eq!(access("nonsense"), None);
    }

    #[test]
    fn a_certificate_names_its_principal_and_role() {
        let ca = Authority::generate("test", AUTHORITY_VALIDITY).unwrap();
        let alice = ca.issue_client("alice", Role::Submitter, LEAF_VALIDITY).unwrap();
        let p = principal_of_certificate(&der(&alice.cert_pem)).unwrap();
        assert_eq!(p, Principal { name: "alice".into(), role: Role::Submitter, credential: Credential::Certificate });
        let server = ca.issue_server(&["localhost".into()], LEAF_VALIDITY).unwrap();
        let err = principal_of_certificate(&der(&server.cert_pem)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("watt:<role>"), "{}", err.message());
    }

    #[test]
    fn calls_are_refused_with_the_code_and_what_is_missing() {
        let ca = Authority::generate("test", AUTHORITY_VALIDITY).unwrap();
        let viewer = [der(&ca.issue_client("vera", Role::Viewer, LEAF_VALIDITY).unwrap().cert_pem)];
        let node = [der(&ca.issue_client("gpu-1", Role::Node, LEAF_VALIDITY).unwrap().cert_pem)];
        let admin = [der(&ca.issue_client("root", Role::Admin, LEAF_VALIDITY).unwrap().cert_pem)];
        let auth = Authenticator::default();
        let submit = "/watt.v1.ControlService/SubmitJob";

        let none = auth.authorize(submit, None, None).unwrap_err();
        assert_eq!(none.code(), tonic::Code::Unauthenticated);
        assert!(none.message().contains("no credentials"), "{}", none.message());
        let denied = auth.authorize(submit, None, Some(&viewer)).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("vera (viewer)") && denied.message().contains("submitter"));
        assert!(auth.authorize("/watt.v1.ControlService/ListJobs", None, Some(&viewer)).unwrap().is_some());
        // A node holds sessions and nothing else; no person holds a node's session.
        assert!(auth.authorize("/watt.v1.ControlService/ListJobs", None, Some(&node)).is_err());
        assert!(auth.authorize("/watt.v1.AgentService/Session", None, Some(&node)).is_ok());
        let admin_as_node = auth.authorize("/watt.v1.AgentService/Session", None, Some(&admin)).unwrap_err();
        assert_eq!(admin_as_node.code(), tonic::Code::PermissionDenied);
        assert!(auth.authorize("/watt.v1.PowerService/SetSite", None, Some(&admin)).is_ok());
        // Health needs nobody; an unknown method nobody may call.
        assert_eq!(auth.authorize("/grpc.health.v1.Health/Check", None, None).unwrap(), None);
        let unknown = auth.authorize("/watt.v1.ControlService/Nope", None, Some(&admin)).unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::PermissionDenied);
        // A bearer token without a token file, or a malformed header, is refused by name.
        let token = auth.authorize(submit, Some(b"Bearer watt_x"), None).unwrap_err();
        assert!(token.message().contains("--token-file"), "{}", token.message());
        let basic = auth.authorize(submit, Some(b"Basic YQ=="), None).unwrap_err();
        assert_eq!(basic.code(), tonic::Code::Unauthenticated);
    }
}
