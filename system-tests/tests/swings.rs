//! Power-swing monitoring end to end: agents sampling their simulated GPUs at the driver's
//! 10 Hz send every round to the controller, which finds each job's swing and where in the
//! spectrum it lies. Two synchronous jobs, one stepping every second and one every five: the
//! first's variation is in the 1–5 Hz band, the second's below 1 Hz.
// Real processes on the real clock.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::time::Duration;

use serde_json::Value;
use watt_system_tests::*;

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn a_job_stepping_every_second_swings_at_one_to_five_hertz_and_one_stepping_every_five_below_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().join("watt.redb").display());
    let controller = ControllerProc::start(&store, 0, &["--reconcile-interval", "200ms"]);
    let url = controller.url.clone();
    let _agents: Vec<Proc> =
        (1..=2).map(|i| agent_with(&url, &format!("node-{i}"), 8, &["--sample-interval", "100ms"])).collect();
    wait_for(Duration::from_secs(30), "2 nodes", || {
        (wattctl_json(&url, &["nodes"]).as_array().unwrap().iter().filter(|n| n["state"] == "ready").count() == 2)
            .then_some(())
    });
    set_grid(&url, "20kW", None);
    for (job, period) in [("fast", "1s"), ("slow", "5s")] {
        let m = format!(
            "name: {job}\nshards: {{min: 1, max: 1}}\ngpus_per_shard: 8\ncommand: {IDLE_COMMAND}\nenv: {{WATT_SIM_STEP_PERIOD: {period}}}\n"
        );
        assert!(submit(&url, &m).status.success());
    }
    wait_for(Duration::from_secs(60), "both jobs' swings", || {
        idle(Duration::from_secs(1));
        let p = wattctl_json(&url, &["power", "status"]);
        let jobs = p["jobs"].as_array().unwrap();
        (jobs.len() == 2 && jobs.iter().all(|j| j["swing"].is_object())).then_some(())
    });
    // The first windows with a job also hold its start; the one read after 13 s holds only its
    // running (10 s, two seconds behind).
    idle(Duration::from_secs(13));
    let status = wattctl_json(&url, &["power", "status"]);
    let swing =
        |job: &str| status["jobs"].as_array().unwrap().iter().find(|j| j["name"] == job).unwrap()["swing"].clone();
    let (fast, slow) = (swing("fast"), swing("slow"));
    eprintln!("fast: {fast}\nslow: {slow}\nsite: {}", status["swing"]);
    // Eight GPUs between their cap (700 W) in compute and far below it in the all-reduce.
    assert!(f(&fast, "swing_watts") > 2_000.0, "{fast}");
    assert!(f(&fast, "share_1_to_5_hz") > 0.7 && f(&fast, "share_0_1_to_1_hz") < 0.15, "{fast}");
    assert!(f(&slow, "share_0_1_to_1_hz") > 0.7 && f(&slow, "share_1_to_5_hz") < 0.25, "{slow}");
    let site = &status["swing"];
    assert!(f(site, "swing_watts") > 0.0 && f(site, "mean_watts") > f(&fast, "mean_watts"), "{site}");
    // The same figures as metrics, with the alert's threshold.
    let metrics = controller.metrics();
    let share = samples(&metrics, "watt_job_power_swing_band_ratio")
        .into_iter()
        .find(|(labels, _)| labels.contains("job=\"fast\"") && labels.contains("band=\"1-5Hz\""))
        .map(|(_, v)| v);
    assert!(share.is_some_and(|s| s > 0.7), "{metrics}");
    assert!(metrics.lines().any(|l| l == "watt_power_swing_alert_ratio 0.5"), "{metrics}");
    assert!(metrics.contains("watt_power_swing_band_ratio{band=\"0.1-1Hz\"}"), "{metrics}");
}
