//! Managed workers end to end: a controller, two agents with simulated GPUs, and a `watt-worker`
//! job of two shards that the agents' supervisors start with the torchrun environment; the
//! ranks meet, train with the ring all-reduce, checkpoint, and finish.
// Real processes on the real clock.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::time::Duration;

use watt_system_tests::*;

/// The two tests train real workers on the machine's cores and one judges speed: run side by
/// side on two cores, the other's workers slowed the first one's full-power steps/s below its
/// steps/s after the cut (16.0 → 18.1). One at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_watt_worker_job_of_two_shards_trains_to_the_end_under_the_supervisors() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let (controller, _agents) = local_cluster(dir.path(), 2, 4, &["--reconcile-interval", "200ms"]);
    let url = controller.url.clone();
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
        ["node-1", "node-2"].iter().map(|n| state_dir(n).join("logs/train/shard-0.log")).find(|p| p.exists()).unwrap(),
    )
    .unwrap();
    assert!(rank0.contains("training mlp") && rank0.contains("on 2 rank(s)"), "{rank0}");
    let events = String::from_utf8_lossy(&wattctl(&url, &["events"]).stdout).into_owned();
    assert!(events.contains("succeeded"), "{events}");
}

fn job(url: &str) -> serde_json::Value {
    wattctl_json(url, &["describe", "job", "elastic"])
}

fn worker_flags(steps: u64, step_time: &str) -> Vec<String> {
    [
        "--steps",
        &steps.to_string(),
        "--step-time",
        step_time,
        "--checkpoint-every",
        "50",
        "--model",
        "mlp",
        "--features",
        "32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The controller's steps/s for the job once it has run 4 s at `placement` shards (a resize
/// starts a new rate window; the caps and the speed they allow settle within a second or two).
fn steady_rate(url: &str, placement: usize) -> f64 {
    let epoch = wait_for(Duration::from_secs(60), "the placement", || {
        let j = job(url);
        let shards = j["placement"].as_array().map_or(0, Vec::len);
        let reporting = j["progress"]["steps_per_second"].as_f64().unwrap_or(0.0) > 0.0;
        (j["state"] == "running" && shards == placement && reporting).then(|| j["epoch"].clone())
    });
    std::thread::park_timeout(Duration::from_secs(4));
    let j = job(url);
    assert_eq!(j["epoch"], epoch, "no resize while measuring: {j}");
    j["progress"]["steps_per_second"].as_f64().unwrap()
}

#[test]
fn a_power_cut_shrinks_a_training_job_and_slows_it_power_back_regrows_it_and_no_work_is_lost() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    const STEPS: u64 = 600;
    let dir = tempfile::tempdir().unwrap();
    let (controller, _agents) =
        local_cluster(dir.path(), 4, 2, &["--reconcile-interval", "200ms", "--regrow-after", "1s"]);
    let url = controller.url.clone();
    set_grid(&url, "20kW", None);
    let checkpoints = dir.path().join("ckpt");
    let command: Vec<String> =
        std::iter::once(bin("watt-worker").display().to_string()).chain(worker_flags(STEPS, "50ms")).collect();
    let manifest = serde_json::json!({
        "name": "elastic", "shards": {"min": 2, "max": 4}, "gpus_per_shard": 2, "flex": 0.0,
        "command": command, "checkpoint_dir": checkpoints.display().to_string(), "stop_grace": "10s",
    });
    assert!(submit(&url, &manifest.to_string()).status.success());

    // Full power: 4 shards at full speed.
    let full = steady_rate(&url, 4);
    let before = job(&url);
    assert!(before["progress"]["energy_per_step_joules"].as_f64().unwrap() > 0.0, "{before}");
    let metrics = controller.metrics();
    assert!(metrics.contains("watt_job_steps_per_second{job=\"elastic\"}"), "{metrics}");
    let described = String::from_utf8_lossy(&wattctl(&url, &["describe", "job", "elastic"]).stdout).into_owned();
    assert!(described.contains("steps/s") && described.contains("J/step"), "{described}");

    // Its output, from the agent that runs rank 0; a shard that does not exist is named.
    let logs = wattctl(&url, &["logs", "elastic", "--shard", "0"]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.status.success() && text.contains("training mlp") && text.contains("on 4 rank(s)"), "{text}");
    let missing = wattctl(&url, &["logs", "elastic", "--shard", "9"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("there is no shard 9"));
    assert_eq!(wattctl(&url, &["logs", "nope"]).status.code(), Some(1));

    // 8 GPUs at their 200 W minimum need 1.6 kW; a 1.425 kW limit holds 3 shards (6 × 200 W +
    // 2 idle × 100 W = 1.4 kW): the job shrinks to 3 and runs at minimum caps.
    set_grid(&url, "1.5kW", None);
    let cut = steady_rate(&url, 3);
    assert!(cut < 0.85 * full, "steps/s falls with the cut: {full:.1} → {cut:.1}");

    // Power back: it regrows to 4 shards and finishes.
    set_grid(&url, "20kW", None);
    wait_for(Duration::from_secs(60), "the job regrown", || {
        let j = job(&url);
        (j["placement"].as_array().map_or(0, Vec::len) == 4 && j["state"] == "running").then_some(())
    });
    let done = wait_for(Duration::from_secs(120), "the job to finish", || {
        let j = job(&url);
        (j["state"] == "succeeded" || j["state"] == "failed").then_some(j)
    });
    assert_eq!(done["state"], "succeeded", "{done}");
    let power = wattctl_json(&url, &["power", "status"]);
    assert_eq!(
        (power["budget_violations"].as_u64(), power["measured_violations"].as_u64()),
        (Some(0), Some(0)),
        "the cut was feasible: neither the accounting nor the meter saw a violation: {power}"
    );
    let events = String::from_utf8_lossy(&wattctl(&url, &["events"]).stdout).into_owned();
    assert!(events.contains("shrunk") && events.contains("grown"), "{events}");

    // The same training, uninterrupted, as one process: the same weights.
    let reference = dir.path().join("reference");
    let out = std::process::Command::new(bin("watt-worker"))
        .args(worker_flags(STEPS, "0s"))
        .env("WATT_CHECKPOINT_DIR", &reference)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let name = format!("step-{STEPS:012}.ckpt");
    let (a, b) = (
        watt_worker::checkpoint::load(&reference.join(&name)).unwrap(),
        watt_worker::checkpoint::load(&checkpoints.join(&name)).unwrap(),
    );
    let scale = a.params.iter().map(|v| v.abs()).fold(0.0, f64::max);
    let diff = a.params.iter().zip(&b.params).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(diff / scale < 1e-6, "relative difference {:e}", diff / scale);
}
