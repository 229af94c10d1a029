//! A node's labels from its Kubernetes Node object (`--labels-from-node`): on a Helm install the
//! racks and rows a site already labels its nodes with (`example.com/rack=r12`) are the labels
//! power domains select by, with nothing typed per node.
//!
//! The agent reads its own Node once, at start, with the pod's service account (in-cluster: the
//! API server's address from `KUBERNETES_SERVICE_HOST`/`_PORT`, its CA and the token mounted
//! under `/var/run/secrets/kubernetes.io/serviceaccount`); the chart grants `get` on nodes only
//! when labels are asked for. Why not an init container with kubectl, or cert-manager-style
//! machinery: one read of one object needs no other image, and the agent already speaks HTTPS
//! with a bearer token (`watt_common::fetch`). A node it cannot read fails the start, naming
//! why: a node outside the rack it stands in would leave that rack's breaker unguarded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a pod finds its service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The name the API server's certificate carries for in-cluster clients.
const API_SERVER_NAME: &str = "kubernetes.default.svc";
/// A Node object is a few kilobytes; far more is not one.
const MAX_NODE_BYTES: usize = 4 << 20;

/// How to reach the API server from inside the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct InCluster {
    /// `https://HOST:PORT`.
    pub api: String,
    pub ca: PathBuf,
    pub token: PathBuf,
}

impl InCluster {
    /// From the environment every pod gets and its service account's files.
    pub fn from_env(service_account: &Path) -> Result<InCluster, String> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            "KUBERNETES_SERVICE_HOST is not set: --labels-from-node works inside a Kubernetes pod".to_string()
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        Ok(InCluster {
            api: format!("https://{host}:{port}"),
            ca: service_account.join("ca.crt"),
            token: service_account.join("token"),
        })
    }
}

/// The labels `keys` of node `node`, read from the API server; a key the node lacks is left out.
pub async fn read(cluster: &InCluster, node: &str, keys: &[String]) -> Result<BTreeMap<String, String>, String> {
    let token = std::fs::read_to_string(&cluster.token)
        .map_err(|e| format!("cannot read the service account's token {}: {e}", cluster.token.display()))?;
    let tls = watt_common::tls::client_config(&cluster.ca)
        .map_err(|e| format!("the API server's CA {}: {e}", cluster.ca.display()))?;
    let url = format!("{}/api/v1/nodes/{node}", cluster.api);
    let answer = watt_common::fetch::get(&url, Some(Arc::new(tls)), API_SERVER_NAME, token.trim(), MAX_NODE_BYTES)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if answer.status != 200 {
        let why = String::from_utf8_lossy(&answer.body).chars().take(300).collect::<String>();
        let hint = if answer.status == 403 { " (the chart grants it with agent.labelsFromNode)" } else { "" };
        return Err(format!("GET {url}: HTTP {}{hint}: {why}", answer.status));
    }
    pick(&answer.body, keys)
}

/// The labels `keys` of the Node object `body`, each checked as `--labels` are.
pub fn pick(body: &[u8], keys: &[String]) -> Result<BTreeMap<String, String>, String> {
    let node: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not a Node object: {e}"))?;
    let labels = node["metadata"]["labels"].as_object().cloned().unwrap_or_default();
    let mut picked = BTreeMap::new();
    for key in keys {
        let Some(value) = labels.get(key) else { continue };
        let value = value.as_str().ok_or_else(|| format!("label {key} is not a string"))?;
        watt_common::names::check_label(key, value)?;
        picked.insert(key.clone(), value.to_string());
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_asked_labels_are_taken_and_checked() {
        let node = serde_json::json!({
            "kind": "Node",
            "metadata": {"name": "gpu-17", "labels": {
                "example.com/rack": "r12", "example.com/row": "r3", "kubernetes.io/hostname": "gpu-17"}},
        });
        let keys = vec!["example.com/rack".to_string(), "example.com/row".into(), "example.com/feed".into()];
        let picked = pick(node.to_string().as_bytes(), &keys).unwrap();
        let pairs: Vec<(&str, &str)> = picked.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("example.com/rack", "r12"), ("example.com/row", "r3")], "a missing key is left out");
        let bad = serde_json::json!({"metadata": {"labels": {"example.com/rack": "no spaces allowed"}}});
        assert!(pick(bad.to_string().as_bytes(), &keys).is_err());
        assert!(pick(b"<html>", &keys).unwrap_err().contains("not a Node object"));
    }
}
