//! One `decide` over a large cluster: 25,000 nodes of 8 GPUs (200,000 GPUs) full with 1,000 jobs
//! of 25 shards, and one job waiting: what a pass with one change costs to decide.
//! Run with `cargo bench -p watt-controller --bench decide`.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use watt_controller::decide::{decide, NodeView, Now, ShardReport, View};
use watt_controller::jobs::{JobRecord, JobState};
use watt_controller::power::admission::PowerView;
use watt_controller::power::planner::{GpuCap, GpuWork, NodeCaps};
use watt_controller::regrow::RegrowTimes;
use watt_controller::scheduler::ShardAssignment;
use watt_controller::spec::{JobSpec, ShardRange};
use watt_proto::v1 as pb;

const NODES: usize = 25_000;
const SHARDS: usize = 25;

fn spec(name: String, shards: u32, gpus: u32) -> JobSpec {
    JobSpec {
        name,
        priority: 0,
        shards: ShardRange { min: shards, max: shards },
        gpus_per_shard: gpus,
        command: vec!["train".into()],
        env: Default::default(),
        workdir: None,
        checkpoint_dir: None,
        flex: 0.1,
        max_restarts: 0,
        stop_grace_ms: 1_000,
        runtime: None,
    }
}

fn record(spec: JobSpec, state: JobState, shards: Vec<ShardAssignment>) -> JobRecord {
    JobRecord {
        spec,
        state,
        sequence: 0,
        submitted_unix_ms: 0,
        epoch: 1,
        shards,
        master_port: 29_500,
        message: String::new(),
        preemptions: 0,
        resized_unix_ms: 0,
        last_run: Vec::new(),
        hold: None,
        submitted_by: String::new(),
        stopping: None,
    }
}

fn bench(c: &mut Criterion) {
    let names: Vec<String> = (0..NODES).map(|i| format!("load-{i:06}")).collect();
    let mut jobs: Vec<JobRecord> = (0..NODES / SHARDS)
        .map(|j| {
            let shards = (0..SHARDS)
                .map(|s| ShardAssignment { node: names[j * SHARDS + s].clone(), gpus: (0..8).collect() })
                .collect();
            record(spec(format!("fill-{j:05}"), SHARDS as u32, 8), JobState::Running, shards)
        })
        .collect();
    jobs.push(record(spec("probe".into(), 1, 1), JobState::Pending, Vec::new()));
    let reports: HashMap<String, Vec<Option<ShardReport>>> = jobs
        .iter()
        .filter(|j| j.state.is_active())
        .map(|j| {
            let running = ShardReport { epoch: 1, state: pb::ShardState::Running, status: None };
            (j.spec.name.clone(), vec![Some(running); SHARDS])
        })
        .collect();
    let mut power = PowerView::new(NODES as f64 * 8.0 * 700.0 * 1.2, Default::default());
    let nodes: Vec<NodeView> = names
        .iter()
        .map(|name| {
            let gpus = (0..8)
                .map(|index| GpuCap {
                    measured_watts: 650.0,
                    ..GpuCap::new(index, 200.0, 700.0, 200.0, 700.0, GpuWork::Watt)
                })
                .collect();
            let caps = NodeCaps::new(name.clone(), gpus, 0.0);
            power.add_node(&caps, 0.0);
            NodeView {
                name: name.clone(),
                last_seen_ms: 0,
                connected: true,
                marked_lost: false,
                gpus: (0..8).collect(),
                runtimes: Vec::new(),
            }
        })
        .collect();
    // Where each shard's node is, as the shell keeps it with the reports.
    let position: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let placed_at: HashMap<String, Vec<Option<usize>>> = jobs
        .iter()
        .filter(|j| j.state.is_active())
        .map(|j| (j.spec.name.clone(), j.shards.iter().map(|s| position.get(s.node.as_str()).copied()).collect()))
        .collect();
    let view = View {
        jobs: jobs.iter().collect(),
        nodes: &nodes,
        reports: &reports,
        placed_at: &placed_at,
        power: &power,
        lease_ms: 15_000,
        regrow_after_ms: 30_000,
        regrow: RegrowTimes::default(),
    };
    let d = decide(&view, Now { mono_ms: 1_000, wall_ms: 1_000 });
    assert_eq!(d.place.len(), 1, "the waiting job gets a reason: {:?}", d.place);
    assert!(d.settle.is_empty());

    let mut group = c.benchmark_group("decide");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    group.bench_function("25k_nodes_1k_jobs_one_waiting", |b| {
        b.iter(|| black_box(decide(black_box(&view), Now { mono_ms: 1_000, wall_ms: 1_000 })))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
