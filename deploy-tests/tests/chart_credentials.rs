//! The chart's credentials, used for real: the Secrets `helm template` makes (Helm's own CA and
//! certificate functions, its token digests) are written to files, and a real controller, agent
//! and wattctl run with the arguments the chart gives them — the agent bootstraps its node
//! certificate with the chart's bootstrap token, and `helm test`'s wattctl call authenticates
//! with its token. Only the addresses and paths of the cluster are swapped for this machine's.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use watt_deploy_tests::*;
use watt_system_tests::{bin, free_port, wait_for, Proc};

/// Every key of a rendered Secret, decoded, written under `dir`.
fn write_secret(docs: &[serde_yaml::Value], name: &str, dir: &Path) -> BTreeMap<String, String> {
    let secret = find(docs, "Secret", name);
    let mut values = BTreeMap::new();
    for (key, value) in secret["data"].as_mapping().unwrap() {
        let key = key.as_str().unwrap().to_string();
        let bytes = base64::engine::general_purpose::STANDARD.decode(value.as_str().unwrap()).unwrap();
        std::fs::write(dir.join(&key), &bytes).unwrap();
        values.insert(key, String::from_utf8(bytes).unwrap());
    }
    values
}

fn args(doc: &serde_yaml::Value) -> Vec<String> {
    doc["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_charts_certificates_and_tokens_admit_its_agents_and_helm_test_and_no_one_else() {
    let (ok, rendered, err) = helm_template(&[]);
    assert!(ok, "{err}");
    let docs = documents(&rendered);
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    write_secret(&docs, "watt-pki", &secrets);
    let tokens = write_secret(&docs, "watt-tokens", &secrets);
    let local = |arg: &str, port: u16| {
        arg.replace("/etc/watt/pki/", &format!("{}/", secrets.display()))
            .replace("/etc/watt/tokens/", &format!("{}/", secrets.display()))
            .replace("/etc/watt/bootstrap/", &format!("{}/", secrets.display()))
            .replace("https://watt-controller:7070", &format!("https://localhost:{port}"))
    };

    // The controller, as the StatefulSet runs it, on this machine's ports and a scratch store.
    let (grpc, metrics) = (free_port(), free_port());
    let mut controller_args: Vec<String> = args(find(&docs, "StatefulSet", "watt-controller"))
        .iter()
        .filter(|a| !a.starts_with("--listen") && !a.starts_with("--metrics-addr") && !a.starts_with("--store"))
        .map(|a| local(a, grpc))
        .collect();
    controller_args.extend([
        format!("--listen=127.0.0.1:{grpc}"),
        format!("--metrics-addr=127.0.0.1:{metrics}"),
        format!("--store=file:{}", dir.path().join("w.redb").display()),
    ]);
    let mut cmd = Command::new(bin("watt-controller"));
    cmd.args(&controller_args);
    let controller = Proc::spawn("controller", cmd);
    controller.wait_line("Serving gRPC.", Duration::from_secs(30));

    // An agent as the DaemonSet runs it, on simulated GPUs: it bootstraps its certificate.
    let agent_args: Vec<String> = args(find(&docs, "DaemonSet", "watt-agent"))
        .iter()
        .filter(|a| {
            !["--backend", "--state-dir", "--metrics-addr", "--logs-addr"].iter().any(|flag| a.starts_with(flag))
        })
        .map(|a| local(a, grpc))
        .collect();
    let mut cmd = Command::new(bin("watt-agent"));
    cmd.args(&agent_args)
        .args(["--backend=sim", "--sim-gpus=2", "--metrics-addr=127.0.0.1:0", "--logs-addr=127.0.0.1:0"])
        .arg(format!("--state-dir={}", dir.path().join("agent").display()))
        .env("WATT_NODE_NAME", "gpu-node-1");
    let agent = Proc::spawn("agent", cmd);
    agent.wait_line("Registered with the controller.", Duration::from_secs(30));
    assert!(dir.path().join("agent/pki/node.pem").is_file());

    // helm test's wattctl call, with its token from the Secret.
    let test = find(&docs, "Pod", "watt-test-controller");
    let test_args: Vec<String> = test["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| local(a.as_str().unwrap(), grpc))
        .collect();
    let wattctl = |token: &str| {
        Command::new(bin("wattctl"))
            .args(&test_args)
            .env("WATT_TOKEN", token)
            .env_remove("WATT_CONTROLLER")
            .output()
            .unwrap()
    };
    let nodes = wait_for(Duration::from_secs(20), "helm test to list the node", || {
        let out = wattctl(&tokens["helm-test-token"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.contains("gpu-node-1")).then_some(text)
    });
    assert!(nodes.contains("ready"), "{nodes}");
    // The same call with the bootstrap token, or none, is refused.
    let bootstrap = wattctl(&tokens["bootstrap-token"]);
    assert!(String::from_utf8_lossy(&bootstrap.stderr).contains("bootstrap (bootstrap) may not call"));
    let forged = wattctl("watt_forged");
    assert!(!forged.status.success());
    drop(agent);
    drop(controller);
}
