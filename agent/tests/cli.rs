//! Bad input to the real binary: each gets one clear line naming the problem, and exit code 2.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};

use common::AGENT;

fn agent(args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        .env_remove("WATT_CONFIG")
        .env_remove("WATT_CONTROLLER")
        .output()
        .expect("run watt-agent")
}

fn assert_usage_error(out: &Output, must_name: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {stderr}");
    for needle in must_name {
        assert!(stderr.contains(needle), "stderr should name {needle:?}: {stderr}");
    }
    stderr
}

#[test]
fn an_unknown_backend_is_rejected_with_the_choices() {
    let out = agent(&["--backend", "cuda"]);
    assert_usage_error(&out, &["--backend", "cuda", "nvml", "sim"]);
}

#[test]
fn an_unknown_flag_is_rejected() {
    assert_usage_error(&agent(&["--sim-gpu", "4"]), &["--sim-gpu"]);
}

#[test]
fn a_too_short_sample_interval_is_rejected() {
    let stderr = assert_usage_error(
        &agent(&["--backend", "sim", "--sample-interval", "1ms"]),
        &["--sample-interval", "1ms", "100ms"],
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn an_unparsable_duration_is_rejected() {
    assert_usage_error(&agent(&["--sample-interval", "fast"]), &["--sample-interval", "fast"]);
}

#[test]
fn zero_simulated_gpus_are_rejected_from_a_flag_or_the_environment() {
    assert_usage_error(&agent(&["--backend", "sim", "--sim-gpus", "0"]), &["--sim-gpus", "got 0"]);
    let out = Command::new(AGENT).args(["--backend", "sim"]).env("WATT_SIM_GPUS", "0").output().unwrap();
    assert_usage_error(&out, &["--sim-gpus", "got 0"]);
}

#[test]
fn a_malformed_config_file_is_rejected_with_its_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "backend = \"sim\"\nsim_gpus = = 4\n").unwrap();
    let stderr = assert_usage_error(&agent(&["--config", path.to_str().unwrap()]), &["agent.toml", "line 2"]);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn an_unknown_config_key_is_rejected_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "backend = \"sim\"\nsample_intervall = \"1s\"\n").unwrap();
    assert_usage_error(&agent(&["--config", path.to_str().unwrap()]), &["sample_intervall", "unknown field"]);
}

#[test]
fn a_wrong_value_type_in_the_config_file_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "sim_model = \"v100\"\n").unwrap();
    assert_usage_error(&agent(&["--config", path.to_str().unwrap()]), &["sim_model", "v100"]);
}

#[test]
fn a_missing_config_file_is_an_error() {
    assert_usage_error(&agent(&["--config", "/nonexistent/watt/agent.toml"]), &["/nonexistent/watt/agent.toml"]);
}

#[test]
fn without_the_nvidia_driver_nvml_says_so_in_one_line_and_points_at_sim() {
    // A library path that cannot exist stands in for a machine without the driver, so this
    // test means the same on a GPU machine.
    let out = agent(&["--backend", "nvml", "--nvml-library", "/nonexistent/libnvidia-ml.so.1"]);
    let stderr = assert_usage_error(&out, &["libnvidia-ml.so.1", "--backend sim"]);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn check_config_validates_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "backend = \"sim\"\nsim_gpus = 4\nsim_model = \"a100\"\nsample_interval = \"250ms\"\n")
        .unwrap();
    let out = agent(&["--config", path.to_str().unwrap(), "--check-config"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("configuration OK") && stdout.contains("sim_gpus: 4") && stdout.contains("A100"),
        "{stdout}"
    );
    // --check-config on a bad file fails the same way a start would.
    std::fs::write(&path, "sim_gpus = 0\n").unwrap();
    assert_usage_error(&agent(&["--config", path.to_str().unwrap(), "--check-config"]), &["--sim-gpus"]);
}

#[test]
fn a_controller_session_without_credentials_or_with_half_of_them_is_rejected_by_name() {
    let sim = ["--backend", "sim", "--controller"];
    assert_usage_error(&agent(&[&sim[..], &["http://c:7070"]].concat()), &["--tls-cert", "--token-file"]);
    assert_usage_error(&agent(&[&sim[..], &["https://c:7070", "--tls-cert", "n.pem"]].concat()), &["--tls-key"]);
    assert_usage_error(
        &agent(&[&sim[..], &["https://c:7070", "--tls-cert", "n.pem", "--tls-key", "k.pem"]].concat()),
        &["--ca", "https://"],
    );
    assert_usage_error(
        &agent(&[&sim[..], &["http://c:7070", "--ca", "ca.pem", "--token-file", "t"]].concat()),
        &["--ca", "https://"],
    );
}

#[test]
fn root_shards_need_the_explicit_flag_and_an_unknown_user_is_named() {
    assert_usage_error(&agent(&["--backend", "sim", "--run-as", "root"]), &["--run-as", "--allow-root-shards"]);
    assert_usage_error(&agent(&["--backend", "sim", "--run-as", "no-such-user-x"]), &["--run-as", "no-such-user-x"]);
}

#[test]
fn logs_off_loopback_need_a_node_certificate_and_shard_limits_are_checked_by_name() {
    assert_usage_error(&agent(&["--backend", "sim", "--logs-addr", "0.0.0.0:9402"]), &["--logs-addr", "HTTPS"]);
    assert_usage_error(&agent(&["--backend", "sim", "--shard-memory-max", "12XB"]), &["--shard-memory-max", "XB"]);
    assert_usage_error(&agent(&["--backend", "sim", "--shard-memory-max", "100"]), &["--shard-memory-max", "1 MiB"]);
    assert_usage_error(&agent(&["--backend", "sim", "--shard-pids-max", "3"]), &["--shard-pids-max", "at least 16"]);
    let ok = agent(&["--backend", "sim", "--shard-memory-max", "64GiB", "--shard-pids-max", "none", "--check-config"]);
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success() && text.contains("68719476736") && text.contains("shard_pids: None"), "{text}");
}

#[test]
fn where_shards_run_and_the_runtimes_offered_are_checked_by_name_and_default_by_mode() {
    let sim = ["--backend", "sim", "--check-config"];
    assert_usage_error(&agent(&[&sim[..], &["--shard-exec", "sideways"]].concat()), &["--shard-exec", "agent or host"]);
    assert_usage_error(&agent(&[&sim[..], &["--runtimes", "PyTorch 24"]].concat()), &["--runtimes", "PyTorch 24"]);
    let config = |extra: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(AGENT);
        cmd.args(sim).args(extra).env_remove("WATT_CONFIG").env_remove("WATT_RUNTIMES");
        if let Some(value) = env {
            cmd.env("WATT_RUNTIMES", value);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(config(&[], None).contains("runtimes: []"));
    let host = config(&["--shard-exec", "host"], None);
    assert!(host.contains("Host") && host.contains("pid: 1") && host.contains("\"host\""), "{host}");
    // An image built without a RUNTIME sets the variable empty: the mode's default stands.
    assert!(config(&["--shard-exec", "host"], Some("")).contains("\"host\""));
    let image = config(&[], Some("pytorch-25.01"));
    assert!(image.contains("\"pytorch-25.01\""), "{image}");
}
