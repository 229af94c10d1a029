//! Gang-scheduler throughput: shards placed per second on clusters of 1,000 and 25,000 nodes of
//! 8 GPUs. Run with `cargo bench -p watt-controller --bench scheduler`.
//!
//! Each run schedules a queue of mixed jobs (1-GPU, 8-GPU, 4×8-GPU and 16×8-GPU gangs, elastic
//! and fixed, several priorities) onto the cluster: on an empty cluster, and on one already
//! 90% full where the high-priority jobs have to preempt.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use watt_controller::scheduler::{schedule, JobRequest, Node, RunningJob};
use watt_controller::spec::ShardRange;

fn cluster(nodes: usize) -> Vec<Node> {
    (0..nodes).map(|i| Node { name: format!("gpu-{i:05}"), gpus: (0..8).collect(), runtimes: Vec::new() }).collect()
}

/// A queue of `n` jobs whose shards add up to about `gpus` GPUs.
fn queue(n: usize, first_sequence: u64, priority_base: i64) -> Vec<JobRequest> {
    (0..n)
        .map(|i| {
            let (min, max, g) = match i % 4 {
                0 => (1, 1, 1),
                1 => (1, 1, 8),
                2 => (2, 4, 8),
                _ => (16, 16, 8),
            };
            JobRequest {
                name: format!("job-{}", first_sequence + i as u64),
                priority: priority_base + (i % 3) as i64,
                sequence: first_sequence + i as u64,
                shards: ShardRange { min, max },
                gpus_per_shard: g,
                runtime: None,
            }
        })
        .collect()
}

fn placed_shards(nodes: &[Node], running: &[RunningJob], pending: &[JobRequest]) -> u64 {
    schedule(nodes, running, pending).starts.iter().map(|s| s.shards.len() as u64).sum()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("schedule");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    for nodes in [1_000usize, 25_000] {
        let cluster = cluster(nodes);
        // Empty cluster: a queue that fills about 80% of it.
        let jobs = queue(nodes * 8 * 8 / 10 / 17, 0, 0);
        let shards = placed_shards(&cluster, &[], &jobs);
        group.throughput(Throughput::Elements(shards));
        group.bench_with_input(BenchmarkId::new("empty_cluster", nodes), &jobs, |b, jobs| {
            b.iter(|| black_box(schedule(&cluster, &[], jobs)))
        });

        // 90% full with low-priority work; 1,000 high-priority jobs arrive and preempt.
        let filler = queue(nodes * 8 * 9 / 10 / 17, 0, 0);
        let plan = schedule(&cluster, &[], &filler);
        let running: Vec<RunningJob> = plan
            .starts
            .into_iter()
            .map(|s| RunningJob {
                request: filler.iter().find(|j| j.name == s.job).cloned().unwrap_or_else(|| filler[0].clone()),
                shards: s.shards.into(),
                at: None,
            })
            .collect();
        let urgent = queue(1_000, 1_000_000, 100);
        let shards = placed_shards(&cluster, &running, &urgent);
        group.throughput(Throughput::Elements(shards));
        group.bench_with_input(BenchmarkId::new("full_cluster_with_preemption", nodes), &urgent, |b, urgent| {
            b.iter(|| black_box(schedule(&cluster, &running, urgent)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
