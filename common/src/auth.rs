//! Who may do what in Watt: the roles a principal holds, how a certificate names its principal
//! and role, and bearer tokens as the controller stores them (hashed). The controller enforces
//! the roles; `wattctl certs` and `wattctl up` issue credentials that carry them.
//!
//! The certificate convention, as Kubernetes reads client certificates: the subject's common
//! name (CN) is the principal's name and its organization (O) is `watt:<role>`. A node's
//! certificate has CN = its node name and O = `watt:node`: a node's name comes from it.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A principal's role. Each RPC needs one (see the controller's `auth` module for the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Read and watch: nodes, jobs, events, power.
    Viewer,
    /// A viewer that also submits jobs and cancels its own.
    Submitter,
    /// A viewer that also sets power sources, the site limit and the reserve.
    PowerOperator,
    /// Everything a person may do, including cancelling anyone's job.
    Admin,
    /// An agent: holds the session of the node its certificate (or token) names, nothing else.
    Node,
    /// A bootstrap token: may ask for the certificate of a node that has none yet, nothing
    /// else (as kubelets bootstrap).
    Bootstrap,
}

/// What an organization (O) starts with to carry a Watt role.
pub const ORGANIZATION_PREFIX: &str = "watt:";

impl Role {
    pub const ALL: [Role; 6] =
        [Role::Viewer, Role::Submitter, Role::PowerOperator, Role::Admin, Role::Node, Role::Bootstrap];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Submitter => "submitter",
            Role::PowerOperator => "power-operator",
            Role::Admin => "admin",
            Role::Node => "node",
            Role::Bootstrap => "bootstrap",
        }
    }

    /// Whether a principal holding `self` may make a call that needs `needed`. People's roles
    /// grow from viewer to admin; a node's and a bootstrap token's roles grant only their own
    /// calls, and no person's role grants a node's (an admin cannot hold a node's session).
    pub fn allows(self, needed: Role) -> bool {
        match (self, needed) {
            (Role::Node | Role::Bootstrap, needed) => needed == self,
            (_, Role::Node) => false,
            (Role::Admin, _) => true,
            (_, Role::Viewer) => true,
            (held, needed) => held == needed,
        }
    }

    /// The organization (O) a certificate carries for this role.
    pub fn organization(self) -> String {
        format!("{ORGANIZATION_PREFIX}{}", self.as_str())
    }

    /// The role an organization names, if it is one of Watt's.
    pub fn from_organization(organization: &str) -> Option<Role> {
        organization.strip_prefix(ORGANIZATION_PREFIX)?.parse().ok()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {given:?}: use viewer, submitter, power-operator, admin, node or bootstrap")]
pub struct UnknownRole {
    pub given: String,
}

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| UnknownRole { given: s.to_string() })
    }
}

/// A new bearer token: 32 random bytes, hex, after a `watt_` prefix that secret scanners can
/// recognise.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("watt_{}", crate::hex::encode(&bytes))
}

/// How a token file stores a token: `sha256:` and the hex digest. The controller keeps only
/// digests, so a leaked token file grants nothing.
pub fn token_digest(token: &str) -> String {
    format!("sha256:{}", crate::hex::encode(&Sha256::digest(token.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn people_roles_grow_and_nodes_stand_apart() {
        use Role::*;
        let allowed: Vec<(Role, Role)> = Role::ALL
            .iter()
            .flat_map(|&h| Role::ALL.iter().map(move |&n| (h, n)))
            .filter(|(h, n)| h.allows(*n))
            .collect();
        assert_eq!(
            allowed,
            vec![
                (Viewer, Viewer),
                (Submitter, Viewer),
                (Submitter, Submitter),
                (PowerOperator, Viewer),
                (PowerOperator, PowerOperator),
                (Admin, Viewer),
                (Admin, Submitter),
                (Admin, PowerOperator),
                (Admin, Admin),
                (Admin, Bootstrap),
                (Node, Node),
                (Bootstrap, Bootstrap),
            ]
        );
    }

    #[test]
    fn roles_round_trip_through_names_and_organizations() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
            assert_eq!(Role::from_organization(&role.organization()), Some(role));
        }
        assert_eq!(Role::from_organization("system:nodes"), None);
        assert!("root".parse::<Role>().unwrap_err().to_string().contains("\"root\""));
    }

    #[test]
    fn tokens_are_random_and_stored_as_digests() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with("watt_") && a.len() == 5 + 64, "{a}");
        assert_eq!(token_digest(&a), token_digest(&a));
        assert_ne!(token_digest(&a), token_digest(&b));
        assert!(!token_digest(&a).contains(&a[5..]));
        // The digest of "abc", as sha256sum prints it.
        assert_eq!(token_digest("abc"), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
