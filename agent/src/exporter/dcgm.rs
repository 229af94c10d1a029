//! dcgm-exporter compatible metrics (`--dcgm-compat`): the names, units, types and labels of
//! NVIDIA's dcgm-exporter default counters, so dashboards and alerts written for it (NVIDIA's
//! Grafana dashboard 12239 among them) work unchanged on Watt's readings.
//!
//! dcgm-exporter's units are not Prometheus base units (MHz, MiB, percent, millijoules); they are
//! kept here on purpose, since matching them is the point.

use prometheus::proto::MetricFamily;

use super::families::{labels, Family, Kind, Labels};
use super::render::GpuView;
use crate::gpu::GpuInfo;

const MIB: f64 = 1_048_576.0;

struct DcgmField {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    value: fn(GpuView<'_>) -> Option<f64>,
}

const fn gauge(name: &'static str, help: &'static str, value: fn(GpuView<'_>) -> Option<f64>) -> DcgmField {
    DcgmField { name, help, kind: Kind::Gauge, value }
}

const FIELDS: &[DcgmField] = &[
    gauge("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", |v| Some(v.sample.sm_clock_hertz / 1e6)),
    gauge("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", |v| Some(v.sample.memory_clock_hertz / 1e6)),
    gauge("DCGM_FI_DEV_MEMORY_TEMP", "Memory temperature (in C).", |v| v.sample.memory_temperature_celsius),
    gauge("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", |v| Some(v.sample.temperature_celsius)),
    // DCGM's POWER_USAGE is nvmlDeviceGetPowerUsage: the 1 s average on GPUs that have one.
    gauge("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", |v| {
        Some(v.sample.power_average_watts.unwrap_or(v.sample.power_watts))
    }),
    gauge("DCGM_FI_DEV_POWER_USAGE_INSTANT", "Current instantaneous power usage (in W).", |v| {
        Some(v.sample.power_watts)
    }),
    DcgmField {
        name: "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        help: "Total energy consumption since boot (in mJ).",
        kind: Kind::Counter,
        value: |v| v.reading.energy_joules_total.map(|j| j * 1000.0),
    },
    gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", |v| Some((v.sample.utilization_ratio * 100.0).round())),
    // Profiling fields: DCGM reports these as ratios, 0 to 1.
    gauge("DCGM_FI_PROF_SM_ACTIVE", "The ratio of cycles an SM has at least 1 warp assigned (in %).", |v| {
        v.sample.activity.map(|a| a.sm_active)
    }),
    gauge("DCGM_FI_PROF_SM_OCCUPANCY", "The ratio of number of warps resident on an SM (in %).", |v| {
        v.sample.activity.map(|a| a.sm_occupancy)
    }),
    gauge("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "Ratio of cycles the tensor (HMMA) pipe is active (in %).", |v| {
        v.sample.activity.map(|a| a.tensor_active)
    }),
    gauge(
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "Ratio of cycles the device memory interface is active sending or receiving data (in %).",
        |v| v.sample.activity.map(|a| a.dram_active),
    ),
    gauge("DCGM_FI_PROF_PIPE_FP16_ACTIVE", "Ratio of cycles the fp16 pipes are active (in %).", |v| {
        v.sample.activity.map(|a| a.fp16_active)
    }),
    gauge("DCGM_FI_PROF_PIPE_FP32_ACTIVE", "Ratio of cycles the fp32 pipes are active (in %).", |v| {
        v.sample.activity.map(|a| a.fp32_active)
    }),
    gauge("DCGM_FI_PROF_PIPE_FP64_ACTIVE", "Ratio of cycles the fp64 pipes are active (in %).", |v| {
        v.sample.activity.map(|a| a.fp64_active)
    }),
    gauge("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", |v| {
        Some((v.sample.memory_utilization_ratio * 100.0).round())
    }),
    gauge("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", |v| {
        Some((v.sample.memory_total_bytes.saturating_sub(v.sample.memory_used_bytes) as f64 / MIB).floor())
    }),
    gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", |v| {
        Some((v.sample.memory_used_bytes as f64 / MIB).ceil())
    }),
    gauge("DCGM_FI_DEV_POWER_MGMT_LIMIT", "Current power limit for the device (in W).", |v| v.sample.power_limit_watts),
    gauge("DCGM_FI_DEV_ENFORCED_POWER_LIMIT", "Enforced power limit for the device (in W).", |v| {
        v.sample.enforced_power_limit_watts
    }),
    gauge("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "Current clock throttle reasons (bitmask).", |v| {
        Some(v.sample.throttle_reasons.0 as f64)
    }),
    gauge("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", |v| {
        Some(v.reading.last_xid.unwrap_or(0) as f64)
    }),
    DcgmField {
        name: "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
        help: "Total number of single-bit persistent ECC errors.",
        kind: Kind::Counter,
        value: |v| v.sample.ecc.map(|e| e.corrected as f64),
    },
    DcgmField {
        name: "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
        help: "Total number of double-bit persistent ECC errors.",
        kind: Kind::Counter,
        value: |v| v.sample.ecc.map(|e| e.uncorrected as f64),
    },
];

/// dcgm-exporter's label set for one GPU.
pub fn labels_for(node: &str, gpu: &GpuInfo) -> Labels {
    labels(&[
        ("gpu", &gpu.index.to_string()),
        ("UUID", &gpu.uuid),
        ("pci_bus_id", &gpu.pci_bus_id),
        ("device", &gpu.device),
        ("modelName", &gpu.model),
        ("Hostname", node),
    ])
}

/// Every DCGM family for the GPUs that answered.
pub fn families<'a>(up: impl Iterator<Item = GpuView<'a>> + Clone, labels: &[Labels]) -> Vec<MetricFamily> {
    FIELDS
        .iter()
        .filter_map(|field| {
            let mut family = Family::new(field.name, field.help, field.kind);
            for view in up.clone() {
                if let Some(value) = (field.value)(view) {
                    family.push(&labels[view.info.index as usize], &[], value);
                }
            }
            family.finish()
        })
        .collect()
}
