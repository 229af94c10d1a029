//! Turns a [`NodeSnapshot`] into the Prometheus text format.
//!
//! Rendering reads the latest snapshot and nothing else, so a scrape never waits on a GPU and
//! never shows a value the last round did not read: a GPU that failed, or a sampler that
//! stalled, shows `watt_gpu_up 0` and no readings.

use std::sync::Arc;
use std::time::Duration;

use prometheus::proto::MetricFamily;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::time::Instant;

use super::dcgm;
use super::families::{labels, Family, Kind, Labels};
use crate::enforcer::Enforcer;
use crate::gpu::{GpuInfo, GpuSample, ThrottleReasons};
use crate::sampler::{GpuReading, NodeSnapshot};

/// What the table below reads a value from: one GPU that answered this round.
#[derive(Debug, Clone, Copy)]
pub struct GpuView<'a> {
    pub info: &'a GpuInfo,
    pub reading: &'a GpuReading,
    pub sample: &'a GpuSample,
}

/// One per-GPU metric: its name, help, kind and where its value comes from.
#[derive(Debug)]
pub struct GpuMetric {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub value: fn(GpuView<'_>) -> Option<f64>,
}

const fn gauge(name: &'static str, help: &'static str, value: fn(GpuView<'_>) -> Option<f64>) -> GpuMetric {
    GpuMetric { name, help, kind: Kind::Gauge, value }
}

/// Watt's per-GPU readings, labelled `node`, `gpu`, `uuid`, `model`.
pub const GPU_METRICS: &[GpuMetric] = &[
    gauge("watt_gpu_power_watts", "Board power draw, instantaneous where the GPU offers it.", |v| Some(v.sample.power_watts)),
    gauge("watt_gpu_power_average_watts", "Board power draw averaged by the driver over 1 s.", |v| v.sample.power_average_watts),
    GpuMetric {
        name: "watt_gpu_energy_joules_total",
        help: "Energy used since the driver loaded: the driver's counter, carried forward by integrating power between its reads.",
        kind: Kind::Counter,
        value: |v| v.reading.energy_joules_total,
    },
    gauge("watt_gpu_power_limit_watts", "Power limit set on the GPU (power management limit).", |v| v.sample.power_limit_watts),
    gauge(
        "watt_gpu_enforced_power_limit_watts",
        "Power limit the GPU enforces: the lowest of every limit in force.",
        |v| v.sample.enforced_power_limit_watts,
    ),
    gauge("watt_gpu_power_limit_min_watts", "Lowest power limit the GPU accepts.", |v| Some(v.info.power_limit.min_watts)),
    gauge("watt_gpu_power_limit_max_watts", "Highest power limit the GPU accepts.", |v| Some(v.info.power_limit.max_watts)),
    gauge("watt_gpu_power_limit_default_watts", "The board's default power limit.", |v| Some(v.info.power_limit.default_watts)),
    gauge("watt_gpu_utilization_ratio", "Share of the last sample period a kernel was running, 0 to 1.", |v| Some(v.sample.utilization_ratio)),
    // The performance monitor's (GPM, Hopper and newer) shares of the last detail period.
    gauge("watt_gpu_sm_active_ratio", "Share of time the SMs had a warp resident, 0 to 1 (GPM).", |v| v.sample.activity.map(|a| a.sm_active)),
    gauge("watt_gpu_sm_occupancy_ratio", "Resident warps over the SMs' maximum, 0 to 1 (GPM).", |v| v.sample.activity.map(|a| a.sm_occupancy)),
    gauge("watt_gpu_tensor_active_ratio", "Share of time the tensor pipes were busy, 0 to 1 (GPM).", |v| v.sample.activity.map(|a| a.tensor_active)),
    gauge("watt_gpu_dram_active_ratio", "Share of time the memory interface was busy, 0 to 1 (GPM).", |v| v.sample.activity.map(|a| a.dram_active)),
    gauge("watt_gpu_fp16_active_ratio", "Share of time the FP16 pipes were busy, 0 to 1 (GPM).", |v| v.sample.activity.map(|a| a.fp16_active)),
    gauge("watt_gpu_fp32_active_ratio", "Share of time the FP32 pipes were busy, 0 to 1 (GPM).", |v| v.sample.activity.map(|a| a.fp32_active)),
    gauge("watt_gpu_fp64_active_ratio", "Share of time the FP64 pipes were busy, 0 to 1 (GPM).", |v| v.sample.activity.map(|a| a.fp64_active)),
    gauge(
        "watt_gpu_memory_utilization_ratio",
        "Share of the last sample period device memory was read or written, 0 to 1.",
        |v| Some(v.sample.memory_utilization_ratio),
    ),
    gauge("watt_gpu_memory_used_bytes", "Device memory in use.", |v| Some(v.sample.memory_used_bytes as f64)),
    gauge("watt_gpu_memory_total_bytes", "Device memory in all.", |v| Some(v.sample.memory_total_bytes as f64)),
    gauge("watt_gpu_temperature_celsius", "GPU core temperature.", |v| Some(v.sample.temperature_celsius)),
    gauge("watt_gpu_memory_temperature_celsius", "HBM temperature, where reported.", |v| v.sample.memory_temperature_celsius),
    gauge("watt_gpu_sm_clock_hertz", "Current SM clock.", |v| Some(v.sample.sm_clock_hertz)),
    gauge("watt_gpu_memory_clock_hertz", "Current memory clock.", |v| Some(v.sample.memory_clock_hertz)),
    gauge(
        "watt_gpu_throttle_reasons",
        "NVML clock-event (throttle) reasons as a bit set; 4 is the SW power cap.",
        |v| Some(v.sample.throttle_reasons.0 as f64),
    ),
    gauge("watt_gpu_pcie_tx_bytes_per_second", "PCIe transmit throughput.", |v| v.sample.pcie.map(|p| p.tx_bytes_per_second)),
    gauge("watt_gpu_pcie_rx_bytes_per_second", "PCIe receive throughput.", |v| v.sample.pcie.map(|p| p.rx_bytes_per_second)),
    gauge("watt_gpu_compute_processes", "Compute processes running on the GPU.", |v| v.sample.processes.as_ref().map(|p| p.len() as f64)),
];

/// The agent's own metrics, updated as it works (the GPU metrics are built per scrape).
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    pub registry: Registry,
    pub sample_duration: Histogram,
}

impl AgentMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let sample_duration = Histogram::with_opts(
            HistogramOpts::new("watt_agent_sample_duration_seconds", "Time to read every GPU once.")
                .buckets(vec![1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
        )?;
        registry.register(Box::new(sample_duration.clone()))?;
        let build =
            IntGaugeVec::new(Opts::new("watt_agent_build_info", "Always 1; the version in a label."), &["version"])?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(AgentMetrics { registry, sample_duration })
    }

    /// The session's metrics, registered only for an agent that has a controller: an agent that
    /// never reached its controller shows `watt_agent_controller_registrations_total 0`.
    pub fn session(&self) -> Result<SessionMetrics, prometheus::Error> {
        let connected = IntGauge::new(
            "watt_agent_controller_connected",
            "1 while the agent holds a registered session with its controller.",
        )?;
        let registrations = IntCounter::new(
            "watt_agent_controller_registrations_total",
            "Sessions the controller accepted since the agent started; 0: it has never reached its controller.",
        )?;
        let cap_orders = IntCounter::new("watt_agent_cap_orders_total", "Cap orders received from the controller.")?;
        self.registry.register(Box::new(connected.clone()))?;
        self.registry.register(Box::new(registrations.clone()))?;
        let stale_term_orders = IntCounter::new(
            "watt_agent_stale_term_orders_total",
            "Orders ignored because they came from a leader older than one the agent has heard.",
        )?;
        let term = IntGauge::new("watt_agent_controller_term", "The highest leader's term the agent has heard.")?;
        let caretaker = IntGauge::new(
            "watt_agent_controller_caretaker",
            "1 while the agent's controller is a caretaker (out of touch with its store: cap decreases only).",
        )?;
        let caretaker_refused = IntCounter::new(
            "watt_agent_caretaker_refused_orders_total",
            "Orders refused because a caretaker sent them and they were not cap decreases.",
        )?;
        self.registry.register(Box::new(caretaker.clone()))?;
        self.registry.register(Box::new(caretaker_refused.clone()))?;
        self.registry.register(Box::new(cap_orders.clone()))?;
        self.registry.register(Box::new(stale_term_orders.clone()))?;
        self.registry.register(Box::new(term.clone()))?;
        Ok(SessionMetrics {
            connected,
            registrations,
            cap_orders,
            stale_term_orders,
            term,
            caretaker,
            caretaker_refused,
        })
    }
}

/// What the session with the controller counts.
#[derive(Debug, Clone)]
pub struct SessionMetrics {
    pub connected: IntGauge,
    pub registrations: IntCounter,
    pub cap_orders: IntCounter,
    pub stale_term_orders: IntCounter,
    pub term: IntGauge,
    pub caretaker: IntGauge,
    pub caretaker_refused: IntCounter,
}

/// Renders snapshots for one node. Labels are built once, at start.
#[derive(Debug)]
pub struct Renderer {
    dcgm_compat: bool,
    stale_after: Duration,
    node_labels: Labels,
    gpu_labels: Vec<Labels>,
    info_labels: Vec<Labels>,
    dcgm_labels: Vec<Labels>,
    agent: AgentMetrics,
    enforcer: Option<Arc<Enforcer>>,
}

impl Renderer {
    /// A snapshot older than `stale_after` is shown as every GPU down.
    pub fn new(
        node: &str,
        inventory: &[GpuInfo],
        dcgm_compat: bool,
        stale_after: Duration,
        agent: AgentMetrics,
    ) -> Self {
        let gpu_labels = inventory
            .iter()
            .map(|g| labels(&[("node", node), ("gpu", &g.index.to_string()), ("uuid", &g.uuid), ("model", &g.model)]))
            .collect();
        let info_labels = inventory
            .iter()
            .map(|g| {
                labels(&[
                    ("node", node),
                    ("gpu", &g.index.to_string()),
                    ("uuid", &g.uuid),
                    ("model", &g.model),
                    ("pci_bus_id", &g.pci_bus_id),
                    ("device", &g.device),
                ])
            })
            .collect();
        let dcgm_labels = inventory.iter().map(|g| dcgm::labels_for(node, g)).collect();
        Renderer {
            dcgm_compat,
            stale_after,
            node_labels: labels(&[("node", node)]),
            gpu_labels,
            info_labels,
            dcgm_labels,
            agent,
            enforcer: None,
        }
    }

    /// Also export what the enforcer ordered and whether it is in failsafe.
    pub fn with_enforcer(mut self, enforcer: Arc<Enforcer>) -> Self {
        self.enforcer = Some(enforcer);
        self
    }

    /// Whether the sampler has published recently enough to be believed.
    pub fn is_fresh(&self, snapshot: &NodeSnapshot, now: Instant) -> bool {
        snapshot.round > 0 && now.saturating_duration_since(snapshot.taken_at) <= self.stale_after
    }

    /// Every family, in a stable order.
    pub fn families(&self, snapshot: &NodeSnapshot, now: Instant) -> Vec<MetricFamily> {
        let fresh = self.is_fresh(snapshot, now);
        // (info, reading, sample if up) per GPU; a stale snapshot counts as every GPU down.
        let gpus: Vec<_> = snapshot
            .inventory
            .iter()
            .zip(&snapshot.gpus)
            .map(|(info, reading)| (info, reading, reading.sample.as_ref().filter(|_| fresh)))
            .collect();
        let up = || gpus.iter().filter_map(|&(info, reading, sample)| Some(GpuView { info, reading, sample: sample? }));

        let mut out = Vec::with_capacity(GPU_METRICS.len() + 24);
        let mut push = |family: Family| out.extend(family.finish());

        let mut up_family = Family::new("watt_gpu_up", "1 if the GPU answered the last sample, 0 if not.", Kind::Gauge);
        let mut info = Family::new("watt_gpu_info", "Always 1; the GPU's identity in labels.", Kind::Gauge);
        let mut errors =
            Family::new("watt_gpu_read_errors_total", "Samples in which reading the GPU failed.", Kind::Counter);
        let mut xids =
            Family::new("watt_gpu_xid_errors_total", "Critical XID errors the driver reported.", Kind::Counter);
        let mut last_xid = Family::new("watt_gpu_last_xid", "Code of the last critical XID error.", Kind::Gauge);
        for &(gpu, reading, sample) in &gpus {
            let i = gpu.index as usize;
            up_family.push(&self.gpu_labels[i], &[], if sample.is_some() { 1.0 } else { 0.0 });
            info.push(&self.info_labels[i], &[], 1.0);
            errors.push(&self.gpu_labels[i], &[], reading.read_errors_total as f64);
            xids.push(&self.gpu_labels[i], &[], reading.xid_errors_total as f64);
            if let Some(code) = reading.last_xid {
                last_xid.push(&self.gpu_labels[i], &[], code as f64);
            }
        }
        push(up_family);
        push(info);
        push(errors);
        push(xids);
        push(last_xid);

        for metric in GPU_METRICS {
            let mut family = Family::new(metric.name, metric.help, metric.kind);
            for view in up() {
                if let Some(value) = (metric.value)(view) {
                    family.push(&self.gpu_labels[view.info.index as usize], &[], value);
                }
            }
            push(family);
        }

        let mut reasons = Family::new(
            "watt_gpu_throttle_reason_active",
            "1 while the named clock-event (throttle) reason holds the GPU's clocks down.",
            Kind::Gauge,
        );
        let mut ecc =
            Family::new("watt_gpu_ecc_errors_total", "ECC errors over the GPU's life, by type.", Kind::Counter);
        for view in up() {
            let base = &self.gpu_labels[view.info.index as usize];
            for (reason, name) in ThrottleReasons::NAMED {
                let active = view.sample.throttle_reasons.contains(reason);
                reasons.push(base, &[("reason", name)], if active { 1.0 } else { 0.0 });
            }
            if let Some(counts) = view.sample.ecc {
                ecc.push(base, &[("type", "corrected")], counts.corrected as f64);
                ecc.push(base, &[("type", "uncorrected")], counts.uncorrected as f64);
            }
        }
        push(reasons);
        push(ecc);

        if let Some(host) = snapshot.host.filter(|_| fresh) {
            let n = &self.node_labels;
            let host_gauges: [(&str, &str, f64); 4] = [
                ("watt_host_cpu_utilization_ratio", "Busy share of all host CPUs, 0 to 1.", host.cpu_utilization_ratio),
                ("watt_host_cpus", "Logical CPUs on the host.", host.cpus as f64),
                ("watt_host_memory_used_bytes", "Host memory in use.", host.memory_used_bytes as f64),
                ("watt_host_memory_total_bytes", "Host memory in all.", host.memory_total_bytes as f64),
            ];
            for (name, help, value) in host_gauges {
                let mut family = Family::new(name, help, Kind::Gauge);
                family.push(n, &[], value);
                push(family);
            }
            let mut load =
                Family::new("watt_host_load_average", "Run-queue load average over the window.", Kind::Gauge);
            load.push(n, &[("window", "1m")], host.load1);
            load.push(n, &[("window", "5m")], host.load5);
            load.push(n, &[("window", "15m")], host.load15);
            push(load);
        }

        if let Some(power) = snapshot.node_power.filter(|_| fresh) {
            let mut family = Family::new(
                "watt_node_power_watts",
                "What the node draws besides its GPUs, by source: rapl (CPU packages and DRAM, from the powercap counters), overhead (configured: fans, NICs, PSU losses).",
                Kind::Gauge,
            );
            if let Some(rapl) = power.rapl_watts {
                family.push(&self.node_labels, &[("source", "rapl")], rapl);
            }
            family.push(&self.node_labels, &[("source", "overhead")], power.overhead_watts);
            push(family);
        }

        let mut age = Family::new(
            "watt_agent_last_sample_age_seconds",
            "Time since the sampler last read the GPUs; readings older than the staleness limit are withheld.",
            Kind::Gauge,
        );
        age.push(&self.node_labels, &[], now.saturating_duration_since(snapshot.taken_at).as_secs_f64());
        push(age);
        let mut rounds = Family::new("watt_agent_sample_rounds_total", "Sampling rounds completed.", Kind::Counter);
        rounds.push(&self.node_labels, &[], snapshot.round as f64);
        push(rounds);

        if let Some(enforcer) = &self.enforcer {
            let mut ordered = Family::new(
                "watt_gpu_power_limit_ordered_watts",
                "The cap last ordered by the controller, or the failsafe cap.",
                Kind::Gauge,
            );
            for (i, cap) in enforcer.ordered().iter().enumerate() {
                if let (Some(labels), Some(cap)) = (self.gpu_labels.get(i), cap) {
                    ordered.push(labels, &[], *cap);
                }
            }
            push(ordered);
            let mut failsafe =
                Family::new("watt_agent_failsafe", "1 while every GPU is held at its failsafe cap.", Kind::Gauge);
            failsafe.push(&self.node_labels, &[], if enforcer.in_failsafe() { 1.0 } else { 0.0 });
            push(failsafe);
            let mut mode =
                Family::new("watt_agent_enforce_mode", "Always 1; the enforcement mode in a label.", Kind::Gauge);
            mode.push(&self.node_labels, &[("mode", enforcer.mode().as_str())], 1.0);
            push(mode);
        }

        if self.dcgm_compat {
            out.extend(dcgm::families(up(), &self.dcgm_labels));
        }
        out.extend(self.agent.registry.gather());
        out
    }

    /// The text exposition format.
    pub fn render(&self, snapshot: &NodeSnapshot, now: Instant) -> Vec<u8> {
        let families = self.families(snapshot, now);
        let mut buf = Vec::with_capacity(16 * 1024 + snapshot.gpus.len() * 8 * 1024);
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(error = %e, "Cannot encode metrics; this is a bug.");
        }
        buf
    }

    pub fn agent_metrics(&self) -> &AgentMetrics {
        &self.agent
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use super::*;
    use crate::gpu::sim::{SimBackend, SimModel};
    use crate::sampler::{Sampler, XidLog};

    fn value(families: &[MetricFamily], name: &str, gpu: &str) -> Option<f64> {
        let family = families.iter().find(|f| f.name() == name)?;
        family.get_metric().iter().find(|m| m.get_label().iter().any(|l| l.name() == "gpu" && l.value() == gpu)).map(
            |m| match family.get_field_type() {
                prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                _ => m.get_gauge().get_value(),
            },
        )
    }

    fn setup(dcgm: bool) -> (Arc<SimBackend>, Sampler, Renderer) {
        let backend = Arc::new(SimBackend::new(SimModel::H200, 2, 9));
        let sampler = Sampler::new(backend.clone(), 10, 1, Arc::new(XidLog::new(2)));
        let renderer =
            Renderer::new("n1", &sampler.inventory(), dcgm, Duration::from_secs(5), AgentMetrics::new().unwrap());
        (backend, sampler, renderer)
    }

    #[test]
    fn a_failed_gpu_shows_up_zero_and_no_readings() {
        let (backend, mut sampler, renderer) = setup(true);
        backend.faults(1).lost.store(true, Ordering::Relaxed);
        let snapshot = sampler.sample_once();
        let f = renderer.families(&snapshot, snapshot.taken_at);
        assert_eq!(value(&f, "watt_gpu_up", "0"), Some(1.0));
        assert_eq!(value(&f, "watt_gpu_up", "1"), Some(0.0));
        assert_eq!(value(&f, "watt_gpu_read_errors_total", "1"), Some(1.0));
        for metric in GPU_METRICS {
            assert_eq!(value(&f, metric.name, "1"), None, "{} must not be shown for a failed GPU", metric.name);
        }
        assert!(value(&f, "watt_gpu_power_watts", "0").is_some());
        assert_eq!(value(&f, "DCGM_FI_DEV_POWER_USAGE", "1"), None);
    }

    #[test]
    fn a_stalled_sampler_withholds_every_reading() {
        let (_backend, mut sampler, renderer) = setup(false);
        let snapshot = sampler.sample_once();
        let fresh = renderer.families(&snapshot, snapshot.taken_at + Duration::from_secs(4));
        assert_eq!(value(&fresh, "watt_gpu_up", "0"), Some(1.0));
        let stale = renderer.families(&snapshot, snapshot.taken_at + Duration::from_secs(6));
        assert_eq!(value(&stale, "watt_gpu_up", "0"), Some(0.0));
        assert_eq!(value(&stale, "watt_gpu_power_watts", "0"), None);
        assert_eq!(value(&stale, "watt_agent_last_sample_age_seconds", "0"), None, "node-level, no gpu label");
    }

    #[test]
    fn dcgm_fields_use_dcgm_units() {
        let (_backend, mut sampler, renderer) = setup(true);
        let snapshot = sampler.sample_once();
        let f = renderer.families(&snapshot, snapshot.taken_at);
        let s = snapshot.gpus[0].sample.as_ref().unwrap();
        assert_eq!(value(&f, "DCGM_FI_DEV_SM_CLOCK", "0"), Some(s.sm_clock_hertz / 1e6));
        assert_eq!(value(&f, "DCGM_FI_DEV_GPU_UTIL", "0"), Some((s.utilization_ratio * 100.0).round()));
        assert_eq!(value(&f, "DCGM_FI_DEV_FB_USED", "0"), Some((s.memory_used_bytes as f64 / 1_048_576.0).ceil()));
        let energy_mj = value(&f, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "0").unwrap();
        assert_eq!(energy_mj, snapshot.gpus[0].energy_joules_total.unwrap() * 1000.0);
        assert_eq!(value(&f, "DCGM_FI_DEV_POWER_MGMT_LIMIT", "0"), Some(700.0));
        assert_eq!(value(&f, "DCGM_FI_DEV_XID_ERRORS", "0"), Some(0.0));
        // Profiling fields as DCGM gives them: ratios, 0 to 1, the same as Watt's own names.
        let a = s.activity.expect("an H200 has a performance monitor");
        assert_eq!(value(&f, "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "0"), Some(a.tensor_active));
        assert_eq!(value(&f, "DCGM_FI_PROF_SM_ACTIVE", "0"), Some(a.sm_active));
        assert_eq!(value(&f, "DCGM_FI_PROF_DRAM_ACTIVE", "0"), Some(a.dram_active));
        assert_eq!(value(&f, "DCGM_FI_PROF_SM_OCCUPANCY", "0"), Some(a.sm_occupancy));
        assert_eq!(value(&f, "watt_gpu_tensor_active_ratio", "0"), Some(a.tensor_active));
        for name in ["DCGM_FI_PROF_SM_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "watt_gpu_sm_occupancy_ratio"] {
            assert!((0.0..=1.0).contains(&value(&f, name, "1").unwrap()), "{name} is a ratio");
        }
        let labels: Vec<_> = f.iter().find(|m| m.name() == "DCGM_FI_DEV_GPU_TEMP").unwrap().get_metric()[0]
            .get_label()
            .iter()
            .map(|l| l.name().to_string())
            .collect();
        for want in ["gpu", "UUID", "device", "modelName", "Hostname"] {
            assert!(labels.iter().any(|l| l == want), "label {want} missing from {labels:?}");
        }
    }

    /// A GPU without a performance monitor (an A100) exports no activity family at all.
    #[test]
    fn a_gpu_without_gpm_exports_no_activity() {
        let backend = Arc::new(SimBackend::new(SimModel::A100, 1, 9));
        let mut sampler = Sampler::new(backend.clone(), 10, 1, Arc::new(XidLog::new(1)));
        let renderer =
            Renderer::new("n1", &sampler.inventory(), true, Duration::from_secs(5), AgentMetrics::new().unwrap());
        let snapshot = sampler.sample_once();
        let f = renderer.families(&snapshot, snapshot.taken_at);
        assert!(value(&f, "watt_gpu_power_watts", "0").is_some());
        for name in ["watt_gpu_sm_active_ratio", "watt_gpu_tensor_active_ratio", "DCGM_FI_PROF_SM_ACTIVE"] {
            assert!(f.iter().all(|m| m.name() != name || m.get_metric().is_empty()), "{name} exported without GPM");
        }
    }

    #[test]
    fn without_dcgm_compat_no_dcgm_names_appear() {
        let (_backend, mut sampler, renderer) = setup(false);
        let snapshot = sampler.sample_once();
        let text = String::from_utf8(renderer.render(&snapshot, snapshot.taken_at)).unwrap();
        assert!(!text.contains("DCGM_FI_"));
        assert!(text.contains("watt_gpu_power_watts{node=\"n1\",gpu=\"1\""));
    }
}
