//! Weighted throughput kept through a scripted 25% power cut: Watt's allocator against two
//! baselines on the same cluster and trace, in the same run.
//!
//!     cargo bench -p watt-controller --bench policies
//!
//! - **uniform**: every GPU gets the same cap, budget / GPUs (what DCGM's group power budget
//!   does), clamped to the GPUs' range;
//! - **preempt-lowest**: lowest-priority jobs (newest first) are paused until the rest fit at
//!   full power;
//! - **watt**: the allocator (flex first, then weighted water-filling, then shrink/pause).
//!
//! Throughput of a job is shards × speed(cap) under the same concave curve for all three, and
//! weighted by the allocator's priority levels. "Kept" is weighted throughput over the trace
//! divided by what full power would have given.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use watt_controller::power::allocator::{allocate, JobLoad};
use watt_controller::power::curve::Curve;

const GPUS_PER_NODE: u32 = 8;

/// 2,048 GPUs in jobs of 1–4 shards × 8 GPUs, priorities 0–4, flex cycling through `flex`.
fn cluster(flex: &[f64]) -> Vec<JobLoad> {
    let mut jobs = Vec::new();
    let mut gpus = 0;
    let mut i = 0u32;
    while gpus < 2_048 {
        let shards = (1 + i % 4).min((2_048 - gpus) / GPUS_PER_NODE);
        jobs.push(JobLoad {
            name: format!("job-{i:03}"),
            priority: i64::from((i * 7) % 5),
            sequence: u64::from(i),
            flex: flex[i as usize % flex.len()],
            gpus_per_shard: GPUS_PER_NODE,
            shards,
            min_shards: shards,
            cap_min: 200.0,
            cap_max: 700.0,
            curve: Curve::default(),
            given_up_watts: Vec::new(),
        });
        gpus += shards * GPUS_PER_NODE;
        i += 1;
    }
    jobs
}

fn weights(jobs: &[JobLoad]) -> Vec<f64> {
    let mut levels: Vec<i64> = jobs.iter().map(|j| j.priority).collect();
    levels.sort_unstable();
    levels.dedup();
    jobs.iter().map(|j| 1.0 + levels.partition_point(|&p| p < j.priority) as f64).collect()
}

/// Per policy: weighted throughput, and the share of jobs running within their flex (not paused,
/// slowed by no more than they tolerate).
fn step(jobs: &[JobLoad], w: &[f64], budget: f64, idle: f64) -> [(f64, f64); 3] {
    let curve = Curve::default();
    let gpus: f64 = jobs.iter().map(|j| f64::from(j.shards * j.gpus_per_shard)).sum();
    // Uniform.
    let cap = (budget / gpus).clamp(200.0, 700.0);
    let within = |speed: f64, j: &JobLoad| speed >= 1.0 - j.flex - 1e-9;
    let n = jobs.len() as f64;
    let uniform: f64 = jobs.iter().zip(w).map(|(j, w)| w * f64::from(j.shards) * curve.speed(cap, 700.0)).sum();
    let uniform_kept = jobs.iter().filter(|j| within(curve.speed(cap, 700.0), j)).count() as f64 / n;
    // Preempt lowest priority, newest first, at full power.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by(|&a, &b| jobs[a].priority.cmp(&jobs[b].priority).then(jobs[b].sequence.cmp(&jobs[a].sequence)));
    let mut draw = gpus * 700.0;
    let mut paused = vec![false; jobs.len()];
    for &i in &order {
        if draw <= budget {
            break;
        }
        paused[i] = true;
        draw -= f64::from(jobs[i].shards * jobs[i].gpus_per_shard) * (700.0 - idle);
    }
    let preempt: f64 =
        jobs.iter().zip(w).zip(&paused).filter(|(_, p)| !**p).map(|((j, w), _)| w * f64::from(j.shards)).sum();
    let preempt_kept = paused.iter().filter(|p| !**p).count() as f64 / n;
    // Watt.
    let a = allocate(budget, jobs, 0.0, idle);
    assert!(a.fits);
    let watt: f64 = a
        .jobs
        .iter()
        .zip(jobs)
        .zip(w)
        .filter(|((x, _), _)| !x.paused)
        .map(|((x, j), w)| w * f64::from(x.shards) * curve.speed(x.cap_watts, j.cap_max))
        .sum();
    let watt_kept =
        a.jobs.iter().zip(jobs).filter(|(x, j)| !x.paused && within(curve.speed(x.cap_watts, j.cap_max), j)).count()
            as f64
            / n;
    [(uniform, uniform_kept), (preempt, preempt_kept), (watt, watt_kept)]
}

fn main() {
    // Two workload mixes: every job tolerates some slowdown; and a third of jobs rigid.
    run("every job tolerates 10–30% slowdown", &[0.1, 0.2, 0.3, 0.1, 0.2, 0.1]);
    println!();
    run("a third of jobs rigid (flex 0), the rest 10–30%", &[0.0, 0.1, 0.2, 0.0, 0.3, 0.1]);
}

fn run(mix: &str, flex: &[f64]) {
    let jobs = cluster(flex);
    let w = weights(&jobs);
    let gpus: f64 = jobs.iter().map(|j| f64::from(j.shards * j.gpus_per_shard)).sum();
    let full_power = gpus * 700.0;
    let full: f64 = jobs.iter().zip(&w).map(|(j, w)| w * f64::from(j.shards)).sum();
    // The trace, one step a minute: 10 min at full power, 30 min cut by 25%, 20 min restored.
    let trace: Vec<f64> = (0..60).map(|m| if (10..40).contains(&m) { 0.75 } else { 1.0 }).collect();
    let mut kept = [0.0; 3];
    let mut kept_cut = [0.0; 3];
    let mut promises = [0.0; 3];
    for &share in &trace {
        let s = step(&jobs, &w, full_power * share, 100.0);
        for k in 0..3 {
            kept[k] += s[k].0 / full;
            if share < 1.0 {
                kept_cut[k] += s[k].0 / full;
                promises[k] += s[k].1;
            }
        }
    }
    let minutes = trace.len() as f64;
    let cut_minutes = trace.iter().filter(|&&s| s < 1.0).count() as f64;
    println!("mix: {mix}; {} jobs on {gpus} GPUs; trace: 60 min, 25% cut from minute 10 to 40", jobs.len());
    println!();
    println!("| policy | weighted throughput kept during the cut | over the whole trace | jobs within their flex during the cut |");
    println!("|---|---|---|---|");
    for (k, name) in ["uniform caps (DCGM group budget)", "preempt lowest priority at full power", "watt allocator"]
        .iter()
        .enumerate()
    {
        println!(
            "| {name} | {:.3} | {:.3} | {:.0}% |",
            kept_cut[k] / cut_minutes,
            kept[k] / minutes,
            100.0 * promises[k] / cut_minutes
        );
    }
}
