//! Log grants (see [`watt_common::grant`]): the controller's short-lived permission to read one
//! shard's log from one node's agent. The master key lives in the store (`meta/log-grant-key`);
//! each node gets only the key derived for its own name, when its session is accepted.

use watt_common::grant::{self, LogGrant};
use watt_proto::v1 as pb;

use crate::auth::Principal;
use crate::jobs::JobRecord;
use crate::reconcile::{unix_ms, Controller, RequestError};
use crate::store::{Store, StoreError};

const KEY: &str = "meta/log-grant-key";

pub struct LogGrants {
    master: Vec<u8>,
}

impl std::fmt::Debug for LogGrants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogGrants(..)")
    }
}

impl LogGrants {
    pub async fn load(store: &dyn Store) -> Result<LogGrants, StoreError> {
        Ok(LogGrants { master: crate::secrets::load_or_make(store, KEY).await? })
    }

    /// The key node `node` checks its grants with.
    pub fn node_key(&self, node: &str) -> Vec<u8> {
        grant::node_key(&self.master, node)
    }

    /// A grant for `principal` to read shard `shard` of `job` on `node`, from `now_unix_ms` for
    /// [`grant::LIFETIME_MS`]: the token and its expiry.
    pub fn grant(&self, node: &str, job: &str, shard: u32, principal: &str, now_unix_ms: i64) -> (String, i64) {
        let expires_unix_ms = now_unix_ms + grant::LIFETIME_MS;
        let g = LogGrant {
            node: node.to_string(),
            job: job.to_string(),
            shard,
            expires_unix_ms,
            principal: principal.to_string(),
        };
        (g.sign(&self.node_key(node)), expires_unix_ms)
    }
}

/// The node shard `shard` of `job` runs on now or, off its GPUs, last ran on.
fn node_of(job: &JobRecord, shard: u32) -> Result<&str, RequestError> {
    let name = &job.spec.name;
    if !job.shards.is_empty() {
        return job.shards.get(shard as usize).map(|s| s.node.as_str()).ok_or_else(|| {
            RequestError::FailedPrecondition(format!(
                "job {name} runs shards 0..{}; there is no shard {shard}",
                job.shards.len() - 1
            ))
        });
    }
    if job.last_run.is_empty() {
        return Err(RequestError::FailedPrecondition(format!("job {name} has not run yet: it has no logs")));
    }
    job.last_run.iter().find(|s| s.shard == shard).map(|s| s.node.as_str()).ok_or_else(|| {
        RequestError::FailedPrecondition(format!(
            "job {name} last ran shards 0..{}; there is no shard {shard}",
            job.last_run.len() - 1
        ))
    })
}

impl Controller {
    /// A grant for `by` to read shard `shard` of `job`'s log from the agent that runs it, or
    /// last ran it.
    pub async fn grant_logs(&self, job: &str, shard: u32, by: &Principal) -> Result<pb::LogGrant, RequestError> {
        let node = {
            let jobs = self.jobs.lock().await;
            let record = jobs.get(job).ok_or_else(|| RequestError::NotFound(job.to_string()))?;
            node_of(record, shard)?.to_string()
        };
        let url = self.registry.lock().get(&node).and_then(|e| e.logs_url()).ok_or_else(|| {
            RequestError::FailedPrecondition(format!("node {node} has not said where it serves logs"))
        })?;
        let (token, expires_unix_ms) = self.log_grants.grant(&node, job, shard, &by.to_string(), unix_ms());
        tracing::debug!(job, shard, node, by = %by, "Granted a log read.");
        Ok(pb::LogGrant { node, url, token, expires_unix_ms, node_ca_pem: String::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_grant_verifies_with_the_key_its_node_was_given_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(&format!("file:{}", dir.path().join("s.redb").display())).await.unwrap();
        let grants = LogGrants::load(store.as_ref()).await.unwrap();
        let (token, expires) = grants.grant("n1", "llama", 0, "ana (viewer)", 1_000);
        assert_eq!(expires, 1_000 + grant::LIFETIME_MS);
        let after_restart = LogGrants::load(store.as_ref()).await.unwrap();
        let verified = LogGrant::verify(&token, "n1", &after_restart.node_key("n1"), "llama", 0, 2_000).unwrap();
        assert_eq!(verified.principal, "ana (viewer)");
        assert!(LogGrant::verify(&token, "n1", &after_restart.node_key("n2"), "llama", 0, 2_000).is_err());
    }
}
