//! Allocation time at 200,000 GPUs / 10,000 jobs (target < 50 ms on one core), and with a
//! four-level tree of power domains: 10 feeds, 250 rows, 3,125 racks (target < 100 ms).
//! Run with `cargo bench -p watt-controller --bench allocator`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use watt_controller::power::allocator::{allocate, JobLoad};
use watt_controller::power::curve::Curve;
use watt_controller::power::domain_allocation::{allocate_within_domains, domain_watts, DomainLoad, Spread};

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

/// The site under 10 feeds, 250 rows and 3,125 racks of 8 nodes (8 GPUs each): every shard on
/// the next node, so jobs span racks; positions 0–9 feeds, 10–259 rows, 260– racks. Every
/// fourth rack is derated to 60% of its GPUs at full power, the others to 85%; rows hold 90% of
/// their racks, feeds 95% of their rows.
fn tree(jobs: &[JobLoad]) -> (Vec<Spread>, Vec<DomainLoad>) {
    const FEEDS: usize = 10;
    const ROWS: usize = 250;
    const RACKS: usize = 3_125;
    let rack_full = 8.0 * 8.0 * 700.0;
    let mut domains = Vec::with_capacity(FEEDS + ROWS + RACKS);
    let row_of_rack = |r: usize| r * ROWS / RACKS;
    let feed_of_row = |w: usize| w * FEEDS / ROWS;
    let racks_in_row = |w: usize| (0..RACKS).filter(|&r| row_of_rack(r) == w).count() as f64;
    let rows_in_feed = |f: usize| (0..ROWS).filter(|&w| feed_of_row(w) == f).map(racks_in_row).sum::<f64>();
    for f in 0..FEEDS {
        domains.push(DomainLoad { limit_watts: 0.95 * 0.9 * rack_full * rows_in_feed(f), others_watts: 0.0 });
    }
    for w in 0..ROWS {
        domains.push(DomainLoad { limit_watts: 0.9 * rack_full * racks_in_row(w), others_watts: 0.0 });
    }
    for r in 0..RACKS {
        let derating = if r % 4 == 0 { 0.6 } else { 0.85 };
        domains.push(DomainLoad { limit_watts: derating * rack_full, others_watts: 0.0 });
    }
    let mut node = 0usize;
    let spreads = jobs
        .iter()
        .map(|j| {
            (0..j.shards)
                .map(|_| {
                    let rack = node / 8;
                    node += 1;
                    let row = row_of_rack(rack);
                    vec![feed_of_row(row) as u32, (FEEDS + row) as u32, (FEEDS + ROWS + rack) as u32]
                })
                .collect()
        })
        .collect();
    (spreads, domains)
}

fn bench_domains(c: &mut Criterion) {
    let jobs = jobs(true);
    let (spreads, domains) = tree(&jobs);
    let full = 200_000.0 * 700.0;
    // Every domain within its limit, and the site's budget kept.
    for share in [1.05, 0.75] {
        let a = allocate_within_domains(full * share, &jobs, &spreads, 0.0, 100.0, &domains);
        let used = domain_watts(&a, &jobs, &spreads, &domains, 100.0);
        assert!(used.iter().zip(&domains).all(|(u, d)| *u <= d.limit_watts * (1.0 + 1e-9) + 1e-6));
        assert!(a.fits && a.total_watts <= full * share * (1.0 + 1e-9));
    }
    let mut group = c.benchmark_group("allocate_200k_gpus_10k_jobs_3385_domains");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for (name, share) in [("site_full_power_racks_derated", 1.05), ("site_cut_25_percent_racks_derated", 0.75)] {
        group.bench_function(name, |b| {
            b.iter(|| black_box(allocate_within_domains(full * share, &jobs, &spreads, 0.0, 100.0, &domains)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench, bench_domains);
criterion_main!(benches);
