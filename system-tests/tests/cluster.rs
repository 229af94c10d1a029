//! End to end with real processes on loopback: a controller, four agents with simulated GPUs,
//! and `wattctl`. Jobs fill the cluster, overfill it, preempt by priority, move off an agent
//! killed with SIGKILL, and survive a controller killed with SIGKILL — on both stores.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::Value;
use watt_system_tests::*;

fn ready_nodes(url: &str) -> usize {
    wattctl_json(url, &["nodes"]).as_array().unwrap().iter().filter(|n| n["state"] == "ready").count()
}

fn nodes_of(job: &Value) -> Vec<String> {
    job["placement"].as_array().unwrap().iter().map(|s| s["node"].as_str().unwrap().to_string()).collect()
}

/// Every (node, GPU) held by a placed job, asserting none is held twice.
fn assert_no_double_booking(jobs: &BTreeMap<String, Value>) {
    let mut held = HashSet::new();
    for (name, job) in jobs {
        for shard in job["placement"].as_array().unwrap() {
            for gpu in shard["gpus"].as_array().unwrap() {
                let key = (shard["node"].as_str().unwrap().to_string(), gpu.as_u64().unwrap());
                assert!(held.insert(key.clone()), "{key:?} booked twice (by {name})");
            }
        }
    }
}

#[test]
fn jobs_fill_overfill_preempt_and_move_off_a_killed_agent() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().join("watt.redb").display());
    let controller = ControllerProc::start(&store, 0, &["--node-lease", "2s", "--reconcile-interval", "200ms"]);
    let url = controller.url.clone();
    let mut agents: BTreeMap<String, Proc> =
        (1..=4).map(|i| (format!("node-{i}"), agent(&url, &format!("node-{i}"), 8))).collect();
    wait_for(Duration::from_secs(30), "4 ready nodes", || (ready_nodes(&url) == 4).then_some(()));

    // Fill: a fixed job on two nodes, an elastic one that takes the other two.
    for (name, prio, min, max) in [("fixed", 1, 2, 2), ("elastic", 1, 1, 4)] {
        let out = submit(&url, &job_manifest(name, prio, min, max, 8));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let placed = wait_for(Duration::from_secs(20), "fixed and elastic running", || {
        let j = jobs(&url);
        (j["fixed"]["state"] == "running" && j["elastic"]["state"] == "running").then_some(j)
    });
    assert_eq!(nodes_of(&placed["fixed"]).len(), 2);
    assert_eq!(nodes_of(&placed["elastic"]).len(), 2, "elastic starts at the largest size that fits: {placed:?}");
    assert_no_double_booking(&placed);

    // The controller's metrics say the same, and pass promtool.
    let metrics = controller.metrics();
    for line in [
        "watt_controller_nodes{state=\"ready\"} 4",
        "watt_controller_sessions 4",
        "watt_jobs{state=\"running\"} 2",
        "watt_controller_gpus{state=\"allocated\"} 32",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in controller metrics:\n{metrics}");
    }
    assert!(metrics.contains("watt_scheduling_duration_seconds_bucket"));
    promtool_check(&metrics);

    // Overfill: no room, same priority: waits, preempts nothing.
    assert!(submit(&url, &job_manifest("late", 1, 1, 1, 8)).status.success());
    std::thread::park_timeout(Duration::from_millis(800));
    let j = jobs(&url);
    assert_eq!(j["late"]["state"], "pending", "{:?}", j["late"]);
    assert_eq!((j["fixed"]["state"].clone(), j["elastic"]["state"].clone()), ("running".into(), "running".into()));

    // Preempt: a high-priority job needing two nodes takes them from the newest low-priority job.
    assert!(submit(&url, &job_manifest("urgent", 10, 2, 2, 8)).status.success());
    let j = wait_for(Duration::from_secs(20), "urgent running", || {
        let j = jobs(&url);
        (j["urgent"]["state"] == "running").then_some(j)
    });
    assert_eq!(j["elastic"]["state"], "pending", "the newest lowest-priority job is preempted: {:?}", j["elastic"]);
    assert!(j["elastic"]["message"].as_str().unwrap().contains("preempted by higher-priority job urgent"));
    assert_eq!(j["elastic"]["preemptions"], 1);
    assert_eq!(j["fixed"]["state"], "running", "only as many jobs as needed are preempted");
    assert_eq!(j["late"]["state"], "pending");
    assert_no_double_booking(&j);

    // SIGKILL an agent under `urgent`: after the lease its node is lost and `urgent` is placed
    // again, off the dead node, at a new epoch — preempting `fixed`, the only lower-priority job,
    // since three nodes cannot hold both.
    let victim = nodes_of(&j["urgent"])[0].clone();
    let epoch_before = j["urgent"]["epoch"].as_u64().unwrap();
    agents.get_mut(&victim).unwrap().kill9();
    let nodes = wait_for(Duration::from_secs(20), "the killed agent's node to be lost", || {
        let nodes = wattctl_json(&url, &["nodes"]);
        nodes.as_array().unwrap().iter().any(|n| n["name"] == victim.as_str() && n["state"] == "lost").then_some(nodes)
    });
    assert_eq!(nodes.as_array().unwrap().iter().filter(|n| n["state"] == "ready").count(), 3);
    let j = wait_for(Duration::from_secs(20), "urgent placed again off the lost node", || {
        let j = jobs(&url);
        let urgent = &j["urgent"];
        (urgent["epoch"].as_u64().unwrap() > epoch_before && urgent["state"] == "running").then_some(j)
    });
    assert!(!nodes_of(&j["urgent"]).contains(&victim), "{:?}", j["urgent"]);
    assert_eq!(j["fixed"]["state"], "pending", "{:?}", j["fixed"]);
    assert!(j["fixed"]["message"].as_str().unwrap().contains("preempted by higher-priority job urgent"));
    assert_no_double_booking(&j);

    let events = String::from_utf8(wattctl(&url, &["events"]).stdout).unwrap();
    for needle in ["submitted", "placed", "preempted", "lost"] {
        assert!(events.contains(needle), "events should mention {needle}: {events}");
    }
}

/// Submit three jobs, SIGKILL the controller, start it again on the same store: all three are
/// there with the same sequence numbers, and new submissions continue the sequence.
fn survives_a_controller_kill(store: &str) {
    let port = free_port();
    let mut controller = ControllerProc::start(store, port, &[]);
    let url = controller.url.clone();
    let _agent = agent(&url, "steady", 8);
    wait_for(Duration::from_secs(20), "the agent to register", || (ready_nodes(&url) == 1).then_some(()));
    for (i, name) in ["alpha", "beta", "gamma"].iter().enumerate() {
        let out = submit(&url, &job_manifest(name, i as i64, 1, 2, 4));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let before = jobs(&url);
    controller.proc.kill9();

    let mut controller = ControllerProc::start(store, port, &[]);
    // On etcd, the killed controller's leadership lasts until its lease ends.
    controller.wait_leading(Duration::from_secs(30));
    // The agent finds the new controller by itself (reconnect with backoff).
    wait_for(Duration::from_secs(30), "the agent to reconnect", || (ready_nodes(&controller.url) == 1).then_some(()));
    let after = jobs(&controller.url);
    assert_eq!(after.keys().collect::<Vec<_>>(), vec!["alpha", "beta", "gamma"]);
    for name in ["alpha", "beta", "gamma"] {
        assert_eq!(after[name]["sequence"], before[name]["sequence"], "{name}");
        assert_eq!(after[name]["priority"], before[name]["priority"], "{name}");
    }
    assert!(submit(&controller.url, &job_manifest("delta", 0, 1, 1, 1)).status.success());
    let delta = &jobs(&controller.url)["delta"];
    assert_eq!(delta["sequence"].as_u64().unwrap(), before["gamma"]["sequence"].as_u64().unwrap() + 1);
    // A duplicate of a job from before the restart is still refused.
    let dup = submit(&controller.url, &job_manifest("beta", 0, 1, 1, 1));
    assert_eq!(dup.status.code(), Some(1));
}

#[test]
fn jobs_survive_a_controller_sigkill_with_the_file_store() {
    let dir = tempfile::tempdir().unwrap();
    survives_a_controller_kill(&format!("file:{}", dir.path().join("watt.redb").display()));
}

#[test]
fn jobs_survive_a_controller_sigkill_with_the_etcd_store() {
    let etcd = Etcd::start();
    survives_a_controller_kill(&format!("etcd://{}", etcd.endpoint()));
}

fn promtool_check(text: &str) {
    use std::io::Write;
    let promtool = which("promtool")
        .expect("`promtool` is not installed: run `apt-get install -y prometheus` (scripts/test does this)");
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics: {report}");
}

/// A node that holds a placement and never comes back after a controller restart: it is lost
/// when its lease runs out, and its job runs again elsewhere — not "running" on a ghost forever.
#[test]
fn a_node_gone_for_good_across_a_controller_restart_is_lost_and_its_job_moves() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().join("watt.redb").display());
    let port = free_port();
    let args = ["--node-lease", "3s", "--reconcile-interval", "200ms"];
    let mut controller = ControllerProc::start(&store, port, &args);
    let url = controller.url.clone();
    let mut agents: BTreeMap<String, Proc> =
        ["gone", "stays"].iter().map(|n| (n.to_string(), agent(&url, n, 8))).collect();
    wait_for(Duration::from_secs(20), "both nodes", || (ready_nodes(&url) == 2).then_some(()));
    assert!(submit(&url, &job_manifest("solo", 1, 1, 1, 8)).status.success());
    let placed = wait_for(Duration::from_secs(20), "the job running", || {
        let j = jobs(&url)["solo"].clone();
        (j["state"] == "running").then_some(j)
    });
    let first = nodes_of(&placed)[0].clone();
    // The node the job runs on and the controller die together; only the other comes back.
    controller.proc.kill9();
    agents.get_mut(&first).unwrap().kill9();
    let controller = ControllerProc::start(&store, port, &args);
    let url = controller.url.clone();
    let moved = wait_for(Duration::from_secs(30), "the job running on the node that stayed", || {
        let j = jobs(&url)["solo"].clone();
        (j["state"] == "running" && nodes_of(&j) != vec![first.clone()]).then_some(j)
    });
    assert_ne!(nodes_of(&moved), vec![first.clone()], "{moved}");
    let listed = wattctl_json(&url, &["nodes"]);
    let ghost = listed.as_array().unwrap().iter().find(|n| n["name"] == first.as_str()).unwrap();
    assert_eq!(ghost["state"], "lost", "{listed}");
    let events = String::from_utf8(wattctl(&url, &["events"]).stdout).unwrap();
    assert!(events.lines().any(|l| l.contains(&first) && l.contains("lost")), "{events}");
}
