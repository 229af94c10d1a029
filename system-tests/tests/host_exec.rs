//! Shards in the host's namespaces (`--shard-exec host`), end to end on loopback. The "host" is
//! a process of this machine in a mount namespace of its own, where a tmpfs holds the training
//! program: the agent, outside it, enters that namespace for each shard (`--host-namespace-pid`,
//! as it enters the host init's with the chart's hostPID). The shard runs there as `nobody`,
//! is stopped by SIGTERM then SIGKILL, leaves no process behind, and its log is readable; a
//! command the host does not have fails the shard at once, naming the runtime; a job that names a
//! runtime no node offers waits, saying so.
// Real processes on the real clock.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use watt_system_tests::*;

/// The training program, only in the "host's" file system: it says where it runs, leaves a child
/// that must not outlive it, and ignores SIGTERM, so only SIGKILL ends it.
const TRAIN: &str = r#"#!/bin/sh
echo "train: running as $(id -un) with $(cat /proc/self/mountinfo | wc -l) mounts"
[ -f "$0" ] && echo "train: my own file is here, in the host's namespace"
sleep 7777 &
trap 'echo "train: SIGTERM, not stopping"' TERM
while :; do sleep 0.2; done
"#;

/// A process in a mount namespace of its own with a tmpfs at `dir` holding `train`: the host.
fn host_namespace(dir: &std::path::Path) -> Proc {
    assert!(nix::unistd::Uid::effective().is_root(), "host execution needs root (setns): run the tests as root");
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), TRAIN).unwrap();
    let setup = format!(
        "mount -t tmpfs -o mode=755 tmpfs {dir} && cp {script} {dir}/train && chmod 755 {dir}/train && exec sleep 3600",
        dir = dir.display(),
        script = script.path().display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &setup]);
    let host = Proc::spawn("host", cmd);
    let train = format!("/proc/{}/root{}/train", host.pid(), dir.display());
    wait_for(Duration::from_secs(10), "the host's program in place", || {
        std::path::Path::new(&train).is_file().then_some(())
    });
    // Kept until the copy is made: the file is removed when `script` drops.
    drop(script);
    host
}

fn describe(url: &str, job: &str) -> Value {
    wattctl_json(url, &["describe", "job", job])
}

#[test]
fn a_shard_runs_in_the_hosts_namespaces_stops_by_sigterm_then_sigkill_and_a_missing_command_fails_at_once() {
    let work = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host = host_namespace(dir.path());
    assert!(!dir.path().join("train").exists(), "outside the host's namespace there is no program");

    let controller = ControllerProc::start(&format!("file:{}", work.path().join("w.redb").display()), 0, &[]);
    let url = controller.url.clone();
    let pid = host.pid().to_string();
    let _agent = agent_with(&url, "hosted", 2, &["--shard-exec", "host", "--host-namespace-pid", &pid]);
    let nodes = wait_for(Duration::from_secs(30), "the node ready", || {
        let nodes = wattctl_json(&url, &["nodes"]);
        (nodes[0]["state"] == "ready").then_some(nodes)
    });
    assert_eq!(
        (nodes[0]["runtimes"].clone(), nodes[0]["shard_exec"].clone()),
        (Value::from(vec!["host"]), Value::from("host")),
        "{nodes}"
    );

    // A job for the host's runtime: runs there, as nobody.
    let train = format!("{}/train", dir.path().display());
    let manifest =
        format!("name: hosted\nruntime: host\nshards: {{min: 1, max: 1}}\ngpus_per_shard: 1\nstop_grace: 2s\ncommand: [{train}]\n");
    assert!(submit(&url, &manifest).status.success());
    let job = wait_for(Duration::from_secs(30), "the job running in the host's namespace", || {
        let job = describe(&url, "hosted");
        (job["state"] == "running"
            && job["placement"][0]["message"].as_str().is_some_and(|m| m.contains("runtime host")))
        .then_some(job)
    });
    assert!(job["placement"][0]["message"].as_str().unwrap().contains("the host's file system"), "{job}");
    let log = wait_for(Duration::from_secs(10), "its log", || {
        let out = wattctl(&url, &["logs", "hosted"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.contains("in the host's namespace").then_some(text)
    });
    assert!(log.contains("train: running as nobody"), "{log}");
    let text = String::from_utf8(wattctl(&url, &["describe", "job", "hosted"]).stdout).unwrap();
    assert!(text.contains("Runtime:        host") && text.contains("runtime host (the host's file system)"), "{text}");

    // Stopped: SIGTERM (ignored), SIGKILL after the 2 s grace, nothing left behind.
    let stopping = Instant::now();
    assert!(wattctl(&url, &["cancel", "hosted"]).status.success());
    let job = wait_for(Duration::from_secs(20), "the shard's end recorded", || {
        let job = describe(&url, "hosted");
        (job["last_run"][0]["state"] == "stopped").then_some(job)
    });
    assert_eq!(job["last_run"][0]["signal"], 9, "killed after its grace: {job}");
    assert!(stopping.elapsed() >= Duration::from_secs(2), "not before the grace period");
    let log = String::from_utf8(wattctl(&url, &["logs", "hosted"]).stdout).unwrap();
    assert!(log.contains("train: SIGTERM, not stopping"), "{log}");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.trim() == "sleep 7777")
        .collect();
    assert!(left.is_empty(), "a process outlived its shard: {left:?}");

    // A command the host does not have: failed at once, no restart, the runtime named.
    let missing = format!("{}/missing", dir.path().display());
    let manifest =
        format!("name: typo\nshards: {{min: 1, max: 1}}\ngpus_per_shard: 1\nmax_restarts: 3\ncommand: [{missing}]\n");
    let submitted = Instant::now();
    assert!(submit(&url, &manifest).status.success());
    let job = wait_for(Duration::from_secs(20), "the job failed", || {
        let job = describe(&url, "typo");
        (job["state"] == "failed").then_some(job)
    });
    println!("a missing command: failed {:.2} s after submission", submitted.elapsed().as_secs_f64());
    assert!(submitted.elapsed() < Duration::from_secs(10), "at once, not after restarts with backoff");
    let message = job["message"].as_str().unwrap();
    assert!(message.contains("runtime host") && message.contains("/missing") && message.contains("not found"), "{job}");
    assert_eq!(job["last_run"][0]["restarts"], 0, "{job}");

    // A runtime no node offers: the job waits, saying so.
    let manifest = format!("name: elsewhere\nruntime: pytorch-24.10\nshards: {{min: 1, max: 1}}\ngpus_per_shard: 1\ncommand: {IDLE_COMMAND}\n");
    assert!(submit(&url, &manifest).status.success());
    let job = wait_for(Duration::from_secs(20), "the job waiting for its runtime", || {
        let job = describe(&url, "elsewhere");
        job["message"].as_str().is_some_and(|m| m.contains("runtime pytorch-24.10")).then_some(job)
    });
    assert_eq!(job["state"], "pending", "{job}");
}
