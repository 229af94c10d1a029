//! Learned speed curves end to end: a compute-bound and a memory-bound `watt-worker` job (their
//! simulated GPUs pace each by its own true curve, chosen by `WATT_SIM_WORKLOAD`) through a 25%
//! cut, on two clusters side by side in the same run — one controller sharing power by learned
//! curves, one by the shared curve. Judged by the workers' own steps.
// Real processes on the real clock.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::time::{Duration, Instant};

use serde_json::Value;
use watt_system_tests::*;

const JOBS: [(&str, &str); 2] = [("dense", "compute-bound"), ("stream", "memory-bound")];

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn describe(url: &str, job: &str) -> Value {
    wattctl_json(url, &["describe", "job", job])
}

/// Each job's steps per second over `window`, from rank 0's reports as the controller has them.
fn rates(url: &str, window: Duration) -> Vec<f64> {
    let at = |url: &str| -> Vec<(f64, f64)> {
        JOBS.iter()
            .map(|(job, _)| {
                let p = &describe(url, job)["progress"];
                (f(p, "step"), f(p, "updated_unix_ms"))
            })
            .collect()
    };
    let before = at(url);
    idle(window);
    let after = at(url);
    before.iter().zip(after).map(|((s0, t0), (s1, t1))| (s1 - s0) / ((t1 - t0) / 1_000.0)).collect()
}

fn caps(url: &str) -> Vec<f64> {
    let status = wattctl_json(url, &["power", "status"]);
    JOBS.iter()
        .map(|(job, _)| {
            let j = status["jobs"].as_array().unwrap().iter().find(|j| j["name"] == *job).unwrap();
            f(j, "cap_watts")
        })
        .collect()
}

/// What one cluster did: caps and rates at full power and in the cut, and the curves it learnt.
#[derive(Debug)]
struct Outcome {
    full_rates: Vec<f64>,
    cut_caps: Vec<f64>,
    cut_rates: Vec<f64>,
    curves: Vec<Value>,
    status: Value,
}

impl Outcome {
    /// Throughput kept: each job's rate in the cut over its rate at full power, averaged.
    fn kept(&self) -> f64 {
        self.cut_rates.iter().zip(&self.full_rates).map(|(c, f)| c / f).sum::<f64>() / self.full_rates.len() as f64
    }
}

fn run(dir: &std::path::Path, policy: &str) -> Outcome {
    let args = ["--reconcile-interval", "200ms", "--speed-curves", policy];
    // Node names of its own: an agent's state directory (shard logs, progress sockets) is named
    // after its node.
    let controller = ControllerProc::start(&format!("file:{}", dir.join("w.redb").display()), 0, &args);
    let url = controller.url.clone();
    let _agents: Vec<Proc> = (1..=2).map(|i| agent(&url, &format!("{policy}-{i}"), 4)).collect();
    wait_for(Duration::from_secs(30), "2 nodes ready", || {
        let listed = wattctl_json(&url, &["nodes"]);
        (listed.as_array().unwrap().iter().filter(|n| n["state"] == "ready").count() == 2).then_some(())
    });
    set_grid(&url, "20kW", None);
    for (job, workload) in JOBS {
        let manifest = format!(
            "name: {job}\npriority: 1\nflex: 0.3\nshards: {{min: 1, max: 1}}\ngpus_per_shard: 4\n\
             env: {{WATT_SIM_WORKLOAD: {workload}}}\n\
             command: ['{}', --steps, '100000000', --step-time, 40ms, --model, mlp, --features, '8', --log-every, '0']\n",
            bin("watt-worker").display()
        );
        let out = submit(&url, &manifest);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    wait_for(Duration::from_secs(60), "both jobs reporting progress", || {
        JOBS.iter().all(|(job, _)| describe(&url, job)["progress"]["step"].as_f64().unwrap_or(0.0) > 10.0).then_some(())
    });
    if policy == "learned" {
        // The GPUs' activity gives each job a prior before any cap has moved.
        wait_for(Duration::from_secs(30), "each job's activity prior", || {
            JOBS.iter().all(|(job, _)| describe(&url, job)["speed_curve"]["source"] == "activity").then_some(())
        });
    }
    // Windows at full power first, so that the cut's caps teach the curves something.
    idle(Duration::from_secs(12));
    let full_rates = rates(&url, Duration::from_secs(10));
    // A 25% cut of what the cluster counts at full power.
    let counted = f(&wattctl_json(&url, &["power", "status"]), "counted_watts");
    let available = format!("{}W", (0.75 * counted / 0.95).round());
    set_grid(&url, &available, None);
    // Long enough for 10 s windows at the new caps to be learnt and acted on.
    idle(Duration::from_secs(30));
    let cut_rates = rates(&url, Duration::from_secs(10));
    Outcome {
        full_rates,
        cut_caps: caps(&url),
        cut_rates,
        curves: JOBS.iter().map(|(job, _)| describe(&url, job)["speed_curve"].clone()).collect(),
        status: wattctl_json(&url, &["power", "status"]),
    }
}

#[test]
fn learned_curves_give_the_compute_bound_job_the_power_and_keep_more_throughput_than_the_shared_curve() {
    let started = Instant::now();
    let (learned_dir, shared_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (learned, shared) = std::thread::scope(|s| {
        let learned = s.spawn(|| run(learned_dir.path(), "learned"));
        let shared = s.spawn(|| run(shared_dir.path(), "shared"));
        (learned.join().unwrap(), shared.join().unwrap())
    });
    eprintln!("learned: {learned:?}\nshared: {shared:?}\n({:.0} s)", started.elapsed().as_secs_f64());

    // The shared curve cannot tell them apart: equal jobs, equal caps.
    let [dense, stream] = [shared.cut_caps[0], shared.cut_caps[1]];
    assert!((dense - stream).abs() < 5.0, "shared curve: {dense} W vs {stream} W");
    // Learned: the compute-bound job keeps the power, the memory-bound one gives it up.
    let [dense, stream] = [learned.cut_caps[0], learned.cut_caps[1]];
    assert!(dense > stream + 100.0, "learned curves: dense {dense} W, stream {stream} W");
    let exponent = |c: &Value| c["exponent"].as_f64().unwrap();
    assert!(exponent(&learned.curves[0]) > exponent(&learned.curves[1]) + 0.2, "{:?}", learned.curves);
    assert!(learned.curves.iter().all(|c| c["in_use"] == true), "{:?}", learned.curves);
    assert!(shared.curves.iter().all(|c| c["in_use"] == false), "{:?}", shared.curves);
    // The memory-bound job ran at two caps: its curve is measured now, and flat.
    let stream = &learned.curves[1];
    assert_eq!(stream["source"], "measured", "{stream}");
    assert!(stream["speed_at_60_percent"].as_f64().unwrap() > 0.93, "{stream}");
    // The workers' own steps: more throughput kept with the learned curves.
    let (kept_learned, kept_shared) = (learned.kept(), shared.kept());
    eprintln!("throughput kept through the cut: learned {kept_learned:.3}, shared {kept_shared:.3}");
    assert!(kept_learned > kept_shared + 0.02, "learned {kept_learned:.3} vs shared {kept_shared:.3}");
    // Both within their limit, on the meter too.
    for status in [&learned.status, &shared.status] {
        assert!(f(status, "counted_watts") <= f(status, "limit_watts") + 1e-6, "{status}");
        assert_eq!(status["budget_violations"], 0, "{status}");
        assert_eq!(status["measured_violations"], 0, "{status}");
    }
}
