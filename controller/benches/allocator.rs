//! Allocation time at 200,000 GPUs / 10,000 jobs (target < 50 ms on one core).
//! Run with `cargo bench -p watt-controller --bench allocator`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use watt_controller::power::allocator::{allocate, JobLoad};
use watt_controller::power::curve::Curve;

/// 10,000 jobs of 1–4 shards × 8 GPUs: 200,000 GPUs; five priorities; flex 0–0.4; a quarter
/// elastic; every job on the shared curve, or (`learned`) each on its own, exponents 0.05–0.6,
/// with its flex kept on a curve 0.04 steeper, as learned curves are.
fn jobs(learned: bool) -> Vec<JobLoad> {
    (0..10_000u32)
        .map(|i| {
            let shards = 1 + i % 4;
            let exponent = 0.05 + 0.55 * f64::from((i * 37) % 100) / 100.0;
            JobLoad {
                name: format!("job-{i:05}"),
                priority: i64::from(i % 5),
                sequence: u64::from(i),
                flex: f64::from(i % 5) * 0.1,
                gpus_per_shard: 8,
                shards,
                min_shards: if i % 4 == 3 { 1 } else { shards },
                cap_min: 200.0,
                cap_max: 700.0,
                curve: if learned { Curve { exponent } } else { Curve::default() },
                flex_curve: if learned { Curve { exponent: exponent + 0.04 } } else { Curve::default() },
                probe: false,
                given_up_watts: Vec::new(),
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let learned = jobs(true);
    let jobs = jobs(false);
    let gpus: u64 = jobs.iter().map(|j| u64::from(j.shards * j.gpus_per_shard)).sum();
    assert_eq!(gpus, 200_000);
    let full = gpus as f64 * 700.0;
    let mut group = c.benchmark_group("allocate_200k_gpus_10k_jobs");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    for (name, share) in
        [("full_power", 1.05), ("cut_25_percent", 0.75), ("cut_to_minimum_caps", 0.30), ("deep_cut_pauses", 0.20)]
    {
        group.bench_function(name, |b| b.iter(|| black_box(allocate(full * share, &jobs, 0.0, 100.0))));
    }
    for (name, share) in [("learned_curves_cut_25_percent", 0.75), ("learned_curves_cut_to_minimum_caps", 0.30)] {
        group.bench_function(name, |b| b.iter(|| black_box(allocate(full * share, &learned, 0.0, 100.0))));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
