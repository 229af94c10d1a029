//! Weighted throughput kept through a scripted 25% power cut: Watt's allocator, sharing power by
//! each job's learned speed curve, against the same allocator on one shared curve, two
//! baselines, and an oracle that knows every job's true curve — same cluster, same trace, same
//! run.
//!
//!     cargo bench -p watt-controller --bench policies
//!
//! - **uniform**: every GPU gets the same cap, budget / GPUs (what DCGM's group power budget
//!   does), clamped to the GPUs' range;
//! - **preempt-lowest**: lowest-priority jobs (newest first) are paused until the rest fit at
//!   full power;
//! - **shared curve**: the allocator (flex first, then weighted water-filling, then
//!   shrink/pause) with one curve for every job, as Watt did before it learned curves;
//! - **learned**: the allocator on each job's [`SpeedFit`], as the controller runs it: the prior
//!   from the job's GPU activity (noisy, as GPM reads it), then every 10 s window an
//!   observation of its steps/s at the cap it ran under, with 3% noise, and power shared again
//!   by what it learnt (the trace is stepped every 10 s);
//! - **oracle**: the allocator on each job's true curve.
//!
//! Each job has a true curve: a third compute-bound (speed 0.82 at 70% of the maximum cap), a
//! third memory-bound (0.97), a third mixed (0.90, the shared curve). Throughput of a job is
//! shards × its true speed at its cap, weighted by the allocator's priority levels. "Kept" is
//! weighted throughput divided by what full power would give; "within flex": jobs not paused and
//! slowed, on their true curve, by no more than they tolerate.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use watt_controller::power::allocator::{allocate, JobLoad};
use watt_controller::power::curve::Curve;
use watt_controller::power::speed_fit::{FittedCurves, Prior, SpeedFit};

const GPUS_PER_NODE: u32 = 8;
const COMPUTE_BOUND: f64 = 0.55;
const MEMORY_BOUND: f64 = 0.08;
const MIXED: f64 = 0.295;

/// Deterministic noise in [-1, 1].
fn noise(seed: u64, i: u64) -> f64 {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

struct Job {
    load: JobLoad,
    weight: f64,
    truth: Curve,
    fit: SpeedFit,
}

/// 2,048 GPUs in jobs of 1–4 shards × 8 GPUs, priorities 0–4, flex cycling through `flex`, true
/// curves cycling through compute-bound, memory-bound, mixed (or all `shared_truth`).
fn cluster(flex: &[f64], heterogeneous: bool) -> Vec<Job> {
    let mut loads = Vec::new();
    let mut gpus = 0;
    let mut i = 0u32;
    while gpus < 2_048 {
        let shards = (1 + i % 4).min((2_048 - gpus) / GPUS_PER_NODE);
        loads.push(JobLoad {
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
            flex_curve: Curve::default(),
            probe: false,
            given_up_watts: Vec::new(),
        });
        gpus += shards * GPUS_PER_NODE;
        i += 1;
    }
    let mut levels: Vec<i64> = loads.iter().map(|j| j.priority).collect();
    levels.sort_unstable();
    levels.dedup();
    loads
        .into_iter()
        .enumerate()
        .map(|(k, load)| {
            // The kind cycles on a different period than flex and priority.
            let kind = if heterogeneous { (k * 5 / 3) % 3 } else { 2 };
            let (truth, math, memory) = match kind {
                0 => (COMPUTE_BOUND, 0.75, 0.2),
                1 => (MEMORY_BOUND, 0.17, 0.67),
                _ => (MIXED, 0.37, 0.43),
            };
            let k = k as u64;
            // What GPM reads is noisy too: ±0.08 on each share.
            let prior =
                Prior::from_activity(math + 0.08 * noise(7, 2 * k), memory + 0.08 * noise(7, 2 * k + 1)).unwrap();
            Job {
                weight: 1.0 + levels.partition_point(|&p| p < load.priority) as f64,
                load,
                truth: Curve { exponent: truth },
                fit: SpeedFit::new(prior),
            }
        })
        .collect()
}

const POLICIES: [&str; 5] = [
    "uniform caps (DCGM group budget)",
    "preempt lowest priority at full power",
    "watt allocator, one shared curve",
    "watt allocator, learned curves",
    "oracle: the allocator on the true curves",
];

/// (weighted throughput, share of jobs within their flex).
type Score = (f64, f64);
/// A job's (cap, paused).
type Placed = (f64, bool);

/// Per policy: (weighted throughput, jobs within their flex) over one 10 s step, and each job's
/// (cap, paused) under the learned policy.
fn step(jobs: &[Job], budget: f64, idle: f64) -> ([Score; 5], Vec<Placed>) {
    let gpus: f64 = jobs.iter().map(|j| f64::from(j.load.shards * j.load.gpus_per_shard)).sum();
    let n = jobs.len() as f64;
    let within = |j: &Job, cap: f64| j.truth.speed(cap, 700.0) >= 1.0 - j.load.flex - 1e-9;
    let score = |caps: &[(f64, bool)]| {
        let throughput: f64 = jobs
            .iter()
            .zip(caps)
            .filter(|(_, (_, paused))| !paused)
            .map(|(j, (cap, _))| j.weight * f64::from(j.load.shards) * j.truth.speed(*cap, 700.0))
            .sum();
        let kept = jobs.iter().zip(caps).filter(|(j, (cap, paused))| !paused && within(j, *cap)).count() as f64 / n;
        (throughput, kept)
    };
    // Uniform.
    let cap = (budget / gpus).clamp(200.0, 700.0);
    let uniform: Vec<(f64, bool)> = jobs.iter().map(|_| (cap, false)).collect();
    // Preempt lowest priority, newest first, at full power.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&jobs[a].load, &jobs[b].load);
        x.priority.cmp(&y.priority).then(y.sequence.cmp(&x.sequence))
    });
    let mut draw = gpus * 700.0;
    let mut preempt: Vec<(f64, bool)> = jobs.iter().map(|_| (700.0, false)).collect();
    for &i in &order {
        if draw <= budget {
            break;
        }
        preempt[i].1 = true;
        draw -= f64::from(jobs[i].load.shards * jobs[i].load.gpus_per_shard) * (700.0 - idle);
    }
    // The allocator on some curve per job.
    let watt = |curves: &dyn Fn(&Job) -> FittedCurves| -> Vec<(f64, bool)> {
        let loads: Vec<JobLoad> = jobs
            .iter()
            .map(|j| {
                let c = curves(j);
                JobLoad { curve: c.curve, flex_curve: c.flex_curve, ..j.load.clone() }
            })
            .collect();
        let a = allocate(budget, &loads, 0.0, idle);
        assert!(a.fits);
        a.jobs.iter().map(|x| (x.cap_watts, x.paused)).collect()
    };
    let shared = watt(&|_| FittedCurves::default());
    let learned = watt(&|j| j.fit.curves());
    let oracle = watt(&|j| FittedCurves { curve: j.truth, flex_curve: j.truth, probe: false });
    ([score(&uniform), score(&preempt), score(&shared), score(&learned), score(&oracle)], learned)
}

fn main() {
    run("A: every job tolerates 10–30% slowdown", &[0.1, 0.2, 0.3, 0.1, 0.2, 0.1], true);
    println!();
    run("B: a third of jobs rigid (flex 0), the rest 10–30%", &[0.0, 0.1, 0.2, 0.0, 0.3, 0.1], true);
    println!();
    run(
        "C: as A, every job on the shared curve (learning has nothing to find)",
        &[0.1, 0.2, 0.3, 0.1, 0.2, 0.1],
        false,
    );
}

fn run(mix: &str, flex: &[f64], heterogeneous: bool) {
    let mut jobs = cluster(flex, heterogeneous);
    let gpus: f64 = jobs.iter().map(|j| f64::from(j.load.shards * j.load.gpus_per_shard)).sum();
    let full_power = gpus * 700.0;
    let full: f64 = jobs.iter().map(|j| j.weight * f64::from(j.load.shards)).sum();
    // The trace, one step every 10 s: 10 min at full power, 30 min cut by 25%, 20 min restored.
    let trace: Vec<f64> = (0..360).map(|s| if (60..240).contains(&s) { 0.75 } else { 1.0 }).collect();
    let mut kept = [0.0; 5];
    let mut kept_cut = [0.0; 5];
    let mut promises = [0.0; 5];
    let mut first_cut_minute = [0.0; 5];
    let mut sample = 0u64;
    for (s, &share) in trace.iter().enumerate() {
        let (scores, learned_caps) = step(&jobs, full_power * share, 100.0);
        for k in 0..5 {
            kept[k] += scores[k].0 / full;
            if share < 1.0 {
                kept_cut[k] += scores[k].0 / full;
                promises[k] += scores[k].1;
            }
            if (60..66).contains(&s) {
                first_cut_minute[k] += scores[k].0 / full / 6.0;
            }
        }
        // What the learned policy's jobs are measured doing over this 10 s window.
        for (j, (cap, paused)) in jobs.iter_mut().zip(learned_caps) {
            if !paused {
                sample += 1;
                let rate = 5.0 * j.truth.speed(cap, 700.0) * (1.0 + 0.03 * noise(11, sample));
                j.fit.observe(0, cap, rate);
            }
        }
    }
    let steps = trace.len() as f64;
    let cut_steps = trace.iter().filter(|&&s| s < 1.0).count() as f64;
    let error: f64 =
        jobs.iter().map(|j| (j.fit.exponent().0 - j.truth.exponent).abs()).sum::<f64>() / jobs.len() as f64;
    println!("mix {mix}; {} jobs on {gpus} GPUs; trace: 60 min, 25% cut from minute 10 to 40", jobs.len());
    println!();
    println!(
        "| policy | weighted throughput kept during the cut | in its first minute | over the whole trace | jobs within their flex during the cut |"
    );
    println!("|---|---|---|---|---|");
    for (k, name) in POLICIES.iter().enumerate() {
        println!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.0}% |",
            kept_cut[k] / cut_steps,
            first_cut_minute[k],
            kept[k] / steps,
            100.0 * promises[k] / cut_steps
        );
    }
    println!();
    println!(
        "learned − shared during the cut: {:+.3}; oracle − learned: {:+.3}; mean |learned exponent − true| at the end: {error:.3}",
        (kept_cut[3] - kept_cut[2]) / cut_steps,
        (kept_cut[4] - kept_cut[3]) / cut_steps,
    );
}
