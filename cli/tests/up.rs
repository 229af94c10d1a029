//! `wattctl up` end to end: the shipped scenario played ten times faster runs to its end and
//! prints the summary with no budget violation; SIGTERM or SIGINT to `wattctl`, while the cluster
//! runs or while it is still starting, stops the cluster it started, and no process of it is left
//! behind.
// Real processes on the real clock.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// wattctl with its configuration file in a directory of this test process's own, so `up`
/// writes its context there and never into the user's home.
fn wattctl() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wattctl"));
    cmd.env("WATT_CONFIG", std::env::temp_dir().join(format!("watt-up-test-{}/config.yaml", std::process::id())));
    cmd
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Processes whose command line or environment mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let path = entry.path();
        if !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        for file in ["cmdline", "environ"] {
            let bytes = std::fs::read(path.join(file)).unwrap_or_default();
            if String::from_utf8_lossy(&bytes).contains(needle) {
                let cmd = String::from_utf8_lossy(&std::fs::read(path.join("cmdline")).unwrap_or_default())
                    .replace('\0', " ");
                found.push(format!("{}: {cmd}", path.display()));
                break;
            }
        }
    }
    found
}

fn gone(needle: &str) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if processes_mentioning(needle).is_empty() {
            return true;
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
    false
}

#[test]
fn a_deep_cut_keeps_measured_draw_under_the_limit_and_a_cut_below_the_floor_is_called_infeasible() {
    let scenario = repo().join("examples/scenarios/deep-cut.yaml");
    let out = wattctl().args(["up", "--scenario"]).arg(&scenario).args(["--speed", "6"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Summary — scenario deep-cut"), "{stdout}");
    assert!(stdout.contains("budget violations       0"), "{stdout}");
    assert!(stdout.contains("measured violations     0"), "the meter agrees on the feasible cut: {stdout}");
    assert!(stdout.contains("infeasible limit        yes"), "the cut below the floor is said out loud: {stdout}");
    assert!(stdout.lines().any(|l| l.contains("INFEASIBLE")), "the live view says so while it lasts: {stdout}");
}

#[test]
fn the_shipped_scenario_runs_to_its_end_with_no_violation_and_leaves_nothing_behind() {
    let scenario = repo().join("examples/scenarios/generator-trip.yaml");
    let child = wattctl()
        .args(["up", "--scenario"])
        .arg(&scenario)
        .args(["--speed", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let needle = format!("watt-up-{}", child.id());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Summary — scenario generator-trip"), "{stdout}");
    assert!(stdout.contains("power events            4"), "{stdout}");
    assert!(stdout.contains("budget violations       0"), "{stdout}");
    assert!(stdout.contains("measured violations     0"), "the meter agrees: {stdout}");
    assert!(stdout.contains("weighted throughput kept"), "{stdout}");
    for job in ["pretrain", "finetune", "sweep"] {
        let line = stdout.lines().find(|l| l.contains(&format!("steps {job}"))).unwrap_or_else(|| panic!("{stdout}"));
        let steps: u64 = line.split_whitespace().last().unwrap().parse().unwrap();
        assert!(steps > 0, "{job} trained: {line}");
    }
    assert!(gone(&needle), "left behind: {:?}", processes_mentioning(&needle));
}

#[test]
fn a_signal_to_wattctl_stops_the_whole_cluster() {
    for signal in ["-TERM", "-INT"] {
        // A configuration file of this run's own: `up` adds its context there.
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        let mut child = wattctl()
            .env("WATT_CONFIG", &config)
            .args(["up", "--nodes", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let needle = format!("watt-up-{}", child.id());
        // Running: the workers of its jobs are up.
        let t0 = Instant::now();
        while processes_mentioning(&needle).iter().filter(|p| p.contains("watt-worker")).count() < 3 {
            if let Ok(Some(status)) = child.try_wait() {
                let mut said = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut said);
                }
                panic!("wattctl up ended ({status}) before its workers started: {said}");
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no workers started: {:?}", processes_mentioning(&needle));
            std::thread::park_timeout(Duration::from_millis(200));
        }
        // Another wattctl reaches it through the `up` context, over TLS with up's admin certificate.
        let nodes =
            wattctl().env("WATT_CONFIG", &config).args(["--context", "up", "-o", "json", "nodes"]).output().unwrap();
        assert!(nodes.status.success(), "{}", String::from_utf8_lossy(&nodes.stderr));
        let listed: serde_json::Value = serde_json::from_slice(&nodes.stdout).unwrap();
        assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
        let refused = wattctl()
            .env("WATT_CONFIG", dir.path().join("none.yaml"))
            .arg("--controller")
            .arg(context_field(&config, "controller"))
            .arg("--ca")
            .arg(context_field(&config, "ca"))
            .arg("nodes")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && said.contains("no credentials"), "{said}");
        assert!(Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap().success());
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{signal}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("Summary") && stdout.contains("budget violations       0"), "{stdout}");
        assert!(gone(&needle), "{signal}: left behind: {:?}", processes_mentioning(&needle));
        let after = std::fs::read_to_string(&config).unwrap();
        assert!(!after.contains("name: up"), "the context went with the cluster: {after}");
    }
}

/// A field of the (only) context in `config`.
fn context_field(config: &std::path::Path, field: &str) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let line =
        text.lines().find(|l| l.trim_start().trim_start_matches("- ").starts_with(&format!("{field}:"))).unwrap();
    line.split_once(':').unwrap().1.trim().to_string()
}

#[test]
fn a_signal_while_the_cluster_starts_stops_what_was_started() {
    let child = wattctl().args(["up", "--nodes", "2"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let needle = format!("watt-up-{}", child.id());
    // The controller is up but the agents have not all registered yet: `up` is still starting.
    let t0 = Instant::now();
    while !processes_mentioning(&needle).iter().any(|p| p.contains("watt-controller")) {
        assert!(t0.elapsed() < Duration::from_secs(30), "no controller started");
        std::thread::park_timeout(Duration::from_millis(10));
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}{stderr}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("stopping (signal)"), "{stderr}");
    assert!(gone(&needle), "left behind: {:?}", processes_mentioning(&needle));
}

#[test]
fn bad_arguments_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: x\nsources: [{name: g, kind: nuclear, available: 1kW}]\nduration: 1s\n").unwrap();
    for (args, want) in [
        (vec!["up", "--speed", "0"], "--speed"),
        (vec!["up", "--scenario", bad.to_str().unwrap()], "sources[0].kind"),
        (vec!["up", "--scenario", "/no/such/file.yaml"], "--scenario"),
    ] {
        let out = wattctl().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: want {want} in {stderr}");
    }
}
