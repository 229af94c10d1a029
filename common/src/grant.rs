//! Log grants: the controller's short-lived permission to read one shard's log on one node.
//!
//! `wattctl logs` asks the controller (a viewer's call, authorized there like any other) for a
//! grant, then reads the log from the agent over HTTPS with the grant as its bearer token: the
//! training output never flows through the controller, and the agent needs no table of users.
//!
//! A grant names the node, the job, the shard, its expiry and the principal it was given to, and
//! is signed with HMAC-SHA256 under the node's own key: the HMAC of the node's name under a key
//! only the controller (and its store) holds. Each agent learns its key when its session is
//! accepted, so a node that is taken over can forge grants for itself only, never for another
//! node's logs.
//!
//! Wire form: `<hex of the fields, one per line>.<hex of the MAC>`; the principal is the last
//! field, so whatever its name holds cannot shift the others.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::hex;

/// How long a grant is good for: long enough for one `wattctl logs`, which asks again for a
/// long `--follow`.
pub const LIFETIME_MS: i64 = 5 * 60 * 1000;

/// How far an agent's clock may be behind the controller's and still accept a grant at its end.
pub const CLOCK_SLACK_MS: i64 = 30 * 1000;

const VERSION: &str = "watt-log-grant-1";

/// Permission to read shard `shard` of `job` on `node` until `expires_unix_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogGrant {
    pub node: String,
    pub job: String,
    pub shard: u32,
    pub expires_unix_ms: i64,
    /// Who asked for it, for the agent's log of who read what.
    pub principal: String,
}

/// Why a grant is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("the log grant is malformed")]
    Malformed,
    #[error("the log grant's signature does not verify on this node")]
    BadSignature,
    #[error("the log grant has expired")]
    Expired,
    #[error("the log grant is for another node")]
    OtherNode,
    #[error("the log grant is for another job or shard")]
    OtherShard,
}

/// Node `node`'s grant key under the controller's `master` key.
pub fn node_key(master: &[u8], node: &str) -> Vec<u8> {
    mac(master, format!("log-grant-key/{node}").as_bytes()).to_vec()
}

fn mac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

impl LogGrant {
    fn fields(&self) -> String {
        format!("{VERSION}\n{}\n{}\n{}\n{}\n{}", self.node, self.job, self.shard, self.expires_unix_ms, self.principal)
    }

    /// The grant's wire form, signed with the node's key.
    pub fn sign(&self, node_key: &[u8]) -> String {
        let fields = self.fields();
        format!("{}.{}", hex::encode(fields.as_bytes()), hex::encode(&mac(node_key, fields.as_bytes())))
    }

    /// Check `token` on node `node` (whose key is `node_key`) at `now_unix_ms`, for reading
    /// shard `shard` of `job`: the grant, or why not.
    pub fn verify(
        token: &str,
        node: &str,
        node_key: &[u8],
        job: &str,
        shard: u32,
        now_unix_ms: i64,
    ) -> Result<LogGrant, GrantError> {
        let (fields_hex, mac_hex) = token.split_once('.').ok_or(GrantError::Malformed)?;
        let fields = hex::decode(fields_hex).ok_or(GrantError::Malformed)?;
        let claimed = hex::decode(mac_hex).ok_or(GrantError::Malformed)?;
        let mut check = <Hmac<Sha256> as Mac>::new_from_slice(node_key).expect("HMAC takes keys of any length");
        check.update(&fields);
        // Constant time: a guess learns nothing from how long the comparison took.
        check.verify_slice(&claimed).map_err(|_| GrantError::BadSignature)?;
        let grant = Self::parse(&fields).ok_or(GrantError::Malformed)?;
        if grant.node != node {
            return Err(GrantError::OtherNode);
        }
        if grant.job != job || grant.shard != shard {
            return Err(GrantError::OtherShard);
        }
        if now_unix_ms > grant.expires_unix_ms.saturating_add(CLOCK_SLACK_MS) {
            return Err(GrantError::Expired);
        }
        Ok(grant)
    }

    fn parse(fields: &[u8]) -> Option<LogGrant> {
        let text = std::str::from_utf8(fields).ok()?;
        let mut parts = text.splitn(6, '\n');
        if parts.next()? != VERSION {
            return None;
        }
        Some(LogGrant {
            node: parts.next()?.to_string(),
            job: parts.next()?.to_string(),
            shard: parts.next()?.parse().ok()?,
            expires_unix_ms: parts.next()?.parse().ok()?,
            principal: parts.next()?.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> LogGrant {
        LogGrant {
            node: "n1".into(),
            job: "llama".into(),
            shard: 2,
            expires_unix_ms: 1_000_000,
            principal: "ana\n(x)".into(),
        }
    }

    #[test]
    fn a_grant_verifies_on_its_node_for_its_shard_until_it_expires() {
        let key = node_key(b"master", "n1");
        let token = grant().sign(&key);
        assert_eq!(LogGrant::verify(&token, "n1", &key, "llama", 2, 999_000), Ok(grant()));
        assert_eq!(LogGrant::verify(&token, "n1", &key, "llama", 2, 1_000_000 + CLOCK_SLACK_MS), Ok(grant()));
        let late = 1_000_001 + CLOCK_SLACK_MS;
        assert_eq!(LogGrant::verify(&token, "n1", &key, "llama", 2, late), Err(GrantError::Expired));
        assert_eq!(LogGrant::verify(&token, "n1", &key, "llama", 3, 0), Err(GrantError::OtherShard));
        assert_eq!(LogGrant::verify(&token, "n1", &key, "other", 2, 0), Err(GrantError::OtherShard));
    }

    #[test]
    fn another_nodes_key_neither_verifies_nor_forges_a_grant() {
        let (k1, k2) = (node_key(b"master", "n1"), node_key(b"master", "n2"));
        assert_ne!(k1, k2);
        assert_ne!(node_key(b"other master", "n1"), k1);
        // n2 holds its own key only: what it signs for n1 does not verify on n1.
        let forged = grant().sign(&k2);
        assert_eq!(LogGrant::verify(&forged, "n1", &k1, "llama", 2, 0), Err(GrantError::BadSignature));
        // A grant for n1 shown to n2 is refused there too.
        assert_eq!(LogGrant::verify(&grant().sign(&k1), "n2", &k2, "llama", 2, 0), Err(GrantError::BadSignature));
        let mut for_n2 = grant();
        for_n2.node = "n2".into();
        assert_eq!(LogGrant::verify(&for_n2.sign(&k2), "n1", &k2, "llama", 2, 0), Err(GrantError::OtherNode));
    }

    #[test]
    fn a_changed_field_or_a_malformed_token_is_refused() {
        let key = node_key(b"master", "n1");
        let token = grant().sign(&key);
        let (fields, mac) = token.split_once('.').unwrap();
        let text = String::from_utf8(hex::decode(fields).unwrap()).unwrap();
        let longer = hex::encode(text.replace("1000000", "9000000").as_bytes());
        assert_eq!(
            LogGrant::verify(&format!("{longer}.{mac}"), "n1", &key, "llama", 2, 0),
            Err(GrantError::BadSignature)
        );
        for bad in ["", "abc", "zz.00", "00.zz", &format!("{fields}.")] {
            let e = LogGrant::verify(bad, "n1", &key, "llama", 2, 0).unwrap_err();
            assert!(matches!(e, GrantError::Malformed | GrantError::BadSignature), "{bad}: {e:?}");
        }
    }
}
