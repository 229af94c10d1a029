//! Power-swing analysis at scale: what the controller spends each second laying every node's
//! 10 Hz power trace on one grid and analyzing the site and every job, and what taking one
//! node's trace costs. Run with `cargo bench -p watt-controller --bench swings`.
//!
//! 1,000 and 25,000 nodes of 8 GPUs, one job per 25 nodes (25 shards × 8 GPUs, as the sessions
//! bench fills its cluster), every node's trace covering the last 15 s at 10 Hz.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use watt_controller::swings::Swings;
use watt_proto::v1 as pb;

/// One second of a node's rounds at 10 Hz from `from_ms`, all of its GPUs in job `job`.
fn trace(from_ms: i64, node: usize, job: &str) -> pb::PowerTrace {
    let watts: Vec<f32> = (0..10).map(|i| if (i + node) % 10 < 7 { 5_600.0 } else { 2_000.0 }).collect();
    pb::PowerTrace {
        start_unix_ms: from_ms,
        offsets_ms: (0..10).map(|i| i * 100).collect(),
        node_watts: watts.clone(),
        jobs: vec![pb::JobTrace { job: job.into(), watts }],
    }
}

fn filled(nodes: usize) -> Swings {
    let swings = Swings::default();
    for second in 0..15 {
        for n in 0..nodes {
            swings.record(&format!("gpu-{n:05}"), &trace(second * 1_000, n, &format!("job-{:04}", n / 25)));
        }
    }
    swings
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("swings");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for nodes in [1_000usize, 25_000] {
        let swings = filled(nodes);
        group.bench_with_input(BenchmarkId::new("analyze_every_second", nodes), &swings, |b, s| {
            b.iter(|| black_box(s.analyze(15_000)))
        });
        // Each iteration the node's next second (older rounds fall out as new ones come in).
        let mut one = trace(15_000, 7, "job-0000");
        group.bench_with_input(BenchmarkId::new("record_one_trace", nodes), &swings, |b, s| {
            b.iter(|| {
                one.start_unix_ms += 1_000;
                s.record(black_box("gpu-00007"), black_box(&one))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
