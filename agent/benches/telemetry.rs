//! Telemetry hot paths: one full sample of one simulated GPU, one sampling round of a node, and
//! rendering `/metrics` for 8 and 64 GPUs. Run with `cargo bench -p watt-agent --bench telemetry`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use watt_agent::exporter::{AgentMetrics, Renderer};
use watt_agent::gpu::sim::{SimBackend, SimModel};
use watt_agent::gpu::{Detail, GpuBackend};
use watt_agent::sampler::{Sampler, XidLog};

fn sample(c: &mut Criterion) {
    let backend = SimBackend::new(SimModel::H100, 8, 1);
    let mut group = c.benchmark_group("sample_one_gpu_sim");
    group.bench_function("fast", |b| b.iter(|| black_box(backend.sample(black_box(3), Detail::Fast))));
    group.bench_function("full", |b| b.iter(|| black_box(backend.sample(black_box(3), Detail::Full))));
    group.finish();

    let backend: Arc<dyn GpuBackend> = Arc::new(SimBackend::new(SimModel::H100, 8, 1));
    let mut sampler = Sampler::new(backend, 10, 10, Arc::new(XidLog::new(8)));
    c.bench_function("sampling_round_8_gpus_sim", |b| b.iter(|| black_box(sampler.sample_once())));
}

fn render(c: &mut Criterion) {
    let mut group = c.benchmark_group("render_metrics");
    for gpus in [8u32, 64] {
        for dcgm in [false, true] {
            let backend: Arc<dyn GpuBackend> = Arc::new(SimBackend::new(SimModel::H100, gpus, 1));
            let mut sampler = Sampler::new(backend, 10, 1, Arc::new(XidLog::new(gpus as usize)));
            let snapshot = sampler.sample_once();
            let metrics = AgentMetrics::new().expect("metrics");
            let renderer = Renderer::new("bench-node", &sampler.inventory(), dcgm, Duration::from_secs(3600), metrics);
            let name = format!("{gpus}_gpus{}", if dcgm { "_dcgm_compat" } else { "" });
            group.bench_function(name, |b| b.iter(|| black_box(renderer.render(&snapshot, snapshot.taken_at))));
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = sample, render
}
criterion_main!(benches);
