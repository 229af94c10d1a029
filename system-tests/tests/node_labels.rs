//! An agent on Kubernetes takes its rack and row from its Node object (`--labels-from-node`),
//! read with the pod's service account, and the controller places it in its power domains.
//! These machines have no Kubernetes API server: the test serves the one call the agent makes
//! (`GET /api/v1/nodes/NAME`, over TLS for `kubernetes.default.svc`, with a bearer token) as
//! the API server answers it, and refuses it as the API server does (403) without the token.
// Real processes on the real clock.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use watt_system_tests::*;

const TOKEN: &str = "the-agents-service-account-token";

/// Answer each connection's one GET as the API server would.
async fn api_server(listener: tokio::net::TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut stream) = acceptor.accept(stream).await else { return };
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let request = String::from_utf8_lossy(&request).to_lowercase();
            let authorized = request.contains(&format!("authorization: bearer {}", TOKEN.to_lowercase()));
            let (status, body) = if !authorized {
                (
                    "403 Forbidden",
                    r#"{"kind":"Status","reason":"Forbidden","message":"nodes is forbidden"}"#.to_string(),
                )
            } else if request.starts_with("get /api/v1/nodes/k8s-gpu-1 ") {
                let node = serde_json::json!({
                    "kind": "Node", "apiVersion": "v1",
                    "metadata": {"name": "k8s-gpu-1", "labels": {
                        "example.com/rack": "r12", "example.com/row": "r3",
                        "kubernetes.io/hostname": "k8s-gpu-1", "nvidia.com/gpu.present": "true"}},
                });
                ("200 OK", node.to_string())
            } else {
                ("404 Not Found", r#"{"kind":"Status","reason":"NotFound"}"#.to_string())
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[test]
fn an_agent_takes_its_rack_from_its_kubernetes_node_and_without_leave_it_does_not_start() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = watt_common::pki::Authority::generate("kubernetes", Duration::from_secs(3600)).unwrap();
    let served = ca.issue_server(&["kubernetes.default.svc".into()], Duration::from_secs(3600)).unwrap();
    let (cert, key) = (dir.path().join("apiserver.crt"), dir.path().join("apiserver.key"));
    std::fs::write(&cert, &served.cert_pem).unwrap();
    std::fs::write(&key, &served.key_pem).unwrap();
    let tls = Arc::new(watt_common::tls::server_config(&cert, &key).unwrap());
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    rt.spawn(api_server(listener, tls));
    // The service account as Kubernetes mounts it.
    let account = |name: &str, token: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca.crt"), ca.cert_pem()).unwrap();
        std::fs::write(d.join("token"), token).unwrap();
        d
    };
    let granted = account("granted", TOKEN);
    let refused = account("refused", "another-token");

    let store = format!("file:{}", dir.path().join("w.redb").display());
    let controller = ControllerProc::start(&store, 0, &[]);
    let url = controller.url.clone();
    let keys = "example.com/rack,example.com/row,example.com/feed";
    let mut cmd = agent_command(
        &url,
        "k8s-gpu-1",
        2,
        &[
            "--labels-from-node",
            keys,
            "--service-account-dir",
            granted.to_str().unwrap(),
            // Given on the command line as well: it wins.
            "--labels",
            "example.com/row=r4",
        ],
    );
    cmd.env("KUBERNETES_SERVICE_HOST", "127.0.0.1").env("KUBERNETES_SERVICE_PORT", &port);
    let _agent = Proc::spawn("k8s-gpu-1", cmd);
    let set = wattctl(&url, &["power", "set-domain", "rack-12", "--limit", "10kW", "--select", "example.com/rack=r12"]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let node = wait_for(Duration::from_secs(30), "the node registered with its labels", || {
        let listed = wattctl_json(&url, &["nodes"]);
        listed.as_array().unwrap().iter().find(|n| n["name"] == "k8s-gpu-1" && n["state"] == "ready").cloned()
    });
    assert_eq!(
        node["labels"],
        serde_json::json!({"example.com/rack": "r12", "example.com/row": "r4"}),
        "the asked labels the node has, --labels over them: {node}"
    );
    assert_eq!(node["domains"], serde_json::json!(["rack-12"]), "{node}");

    // Without leave to read its Node, the agent does not start, and says why.
    let mut cmd = agent_command(
        &url,
        "k8s-gpu-2",
        2,
        &["--labels-from-node", keys, "--service-account-dir", refused.to_str().unwrap()],
    );
    cmd.env("KUBERNETES_SERVICE_HOST", "127.0.0.1").env("KUBERNETES_SERVICE_PORT", &port);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--labels-from-node") && stderr.contains("HTTP 403"), "{stderr}");
    // Outside Kubernetes it says so.
    let out = agent_command(&url, "k8s-gpu-3", 2, &["--labels-from-node", keys])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("KUBERNETES_SERVICE_HOST"), "{out:?}");
}
