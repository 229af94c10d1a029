//! Managed workers end to end: a controller, two agents with simulated GPUs, and a `watt-worker`
//! job of two shards that the agents' supervisors start with the torchrun environment; the
//! ranks meet, train with the ring all-reduce, checkpoint, and finish.
// Real processes on the real clock.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_watt_worker_job_of_two_shards_trains_to_the_end_under_the_supervisors() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProc::start(
        &format!("file:{}", dir.path().join("w.redb").display()),
        0,
        &["--reconcile-interval", "200ms"],
    );
    let url = controller.url.clone();
    let _agents: Vec<Proc> = ["node-a", "node-b"].iter().map(|n| agent(&url, n, 4)).collect();
    wait_for(Duration::from_secs(20), "2 nodes", || {
        (wattctl_json(&url, &["nodes"]).as_array().unwrap().len() == 2).then_some(())
    });
    let checkpoints = dir.path().join("ckpt");
    let manifest = format!(
        "name: train\nshards: {{min: 2, max: 2}}\ngpus_per_shard: 4\ncheckpoint_dir: {}\n\
         command: ['{}', --steps, '200', --step-time, 5ms, --checkpoint-every, '50', --model, mlp]\n",
        checkpoints.display(),
        bin("watt-worker").display()
    );
    let out = submit(&url, &manifest);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job = wait_for(Duration::from_secs(90), "the job to finish", || {
        let j = jobs(&url)["train"].clone();
        (j["state"] == "succeeded" || j["state"] == "failed").then_some(j)
    });
    assert_eq!(job["state"], "succeeded", "{job}");

    // Rank 0 wrote the final checkpoint where the job said; both ranks logged under their agents.
    let last = checkpoints.join("step-000000000200.ckpt");
    assert!(last.exists(), "no final checkpoint in {}", checkpoints.display());
    let rank0 = std::fs::read_to_string(
        ["node-a", "node-b"].iter().map(|n| state_dir(n).join("logs/train/shard-0.log")).find(|p| p.exists()).unwrap(),
    )
    .unwrap();
    assert!(rank0.contains("training mlp") && rank0.contains("on 2 rank(s)"), "{rank0}");
    let events = String::from_utf8_lossy(&wattctl(&url, &["events"]).stdout).into_owned();
    assert!(events.contains("succeeded"), "{events}");
}
